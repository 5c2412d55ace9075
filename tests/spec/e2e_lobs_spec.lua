-- LOB safety end to end on the lab and the DMS emulator: public.documents in
-- limited LOB mode at 64 KB in a group of its own. full.lua reaches READY
-- with its values (up to ~48 KB) compared whole; then values longer than the
-- limit are written on the source during CDC. DMS (the emulator) cuts them and
-- logs a warning; the cut JSON is refused by the target, which keeps the old
-- values. The cutover refuses at its LOB check, naming table, column and keys,
-- with the tasks still running; full.lua's catch-up, run again, says the same.
local H = require "helpers.rehearsal"

describe("LOB truncation", function()
  local R

  setup(function()
    R = H.rehearsal("e2e-lobs", { config = {
      groups = { largest_alone = 1, explicit = { { name = "docs", tables = { "public.documents" } } } },
      lobs = { tables = { ["public.documents"] = { max_kb = 64, truncation_ok = true } } } } })
  end)
  teardown(function() if R then R:close() end end)

  local function sql(cluster, q, ...)
    local c = H.connect(cluster, "test")
    local res = assert(c:exec(q, ...))
    local rows = {}
    for r in res:rows() do rows[#rows + 1] = r end
    c:close()
    return rows
  end

  it("is found after catch-up and stops the cutover, naming table, column and key", function()
    local full = H.run(R, "full.lua", { "--yes" })
    assert.is_true(full.ok, full.output)
    assert.truthy(full.output:find("READY FOR CUTOVER", 1, true), full.output)
    assert.truthy(full.output:find("no LOB value truncated", 1, true), full.output)
    -- the documents' group: LobMaxSize 64, batch apply on (limited LOB mode)
    local plan = H.journal(R).playbooks.full.steps.groups.facts.groups
    assert.equal("public", plan[1].tables[1].schema)
    assert.equal("documents", plan[1].tables[1].name)
    assert.is_nil(plan[1].batch_note)
    -- the values above half the limit (text is NCLOB to DMS) were compared, and were equal
    local big = sql(R.lab.source, "select count(*) as n from documents where octet_length(body::text) > 32768")[1].n
    assert.is_true(big > 0, "the sample has no document above 32 KB")

    -- during CDC: two documents grow past 64 KB
    local ids = sql(R.lab.source, "select id from documents order by id limit 2")
    for _, r in ipairs(ids) do
      sql(R.lab.source, "update documents set body = json_build_object('id', id, 'text', repeat('y', 100000)) where id = $1", r.id)
    end
    assert.is_true(H.wait_applied(R, 120), "the tasks did not apply the updates")

    local c = H.run(R, "cutover.lua", { "--yes" })
    assert.falsy(c.ok, c.output)
    assert.truthy(c.output:find("refusing to cut over", 1, true), c.output)
    for _, r in ipairs(ids) do
      local len = sql(R.lab.source, "select octet_length(body::text) as n from documents where id = $1", r.id)[1].n
      assert.truthy(c.output:find(("public.documents.body id=%d: %d bytes on the source"):format(r.id, len), 1, true),
        c.output)
    end
    assert.truthy(c.output:find("was truncated to 65536 bytes", 1, true), c.output) -- the task log's warning
    -- found before writes stop: nothing was done
    local steps = H.journal(R).playbooks.cutover.steps
    assert.equal("failed", steps.verify_live.status)
    assert.is_nil(steps.stop_writes)
    assert.is_nil(steps.stop_tasks)
    local client = assert(R.lab:dms_client())
    for _, t in ipairs(assert(client:describe_replication_tasks())) do assert.equal("running", t.Status) end

    -- full.lua's catch-up, run again, finds it too
    local again = H.run(R, "full.lua", { "--yes" })
    assert.falsy(again.ok, again.output)
    assert.truthy(again.output:find("LOB value(s) truncated", 1, true), again.output)
    assert.truthy(again.output:find(("public.documents.body id=%d"):format(ids[1].id), 1, true), again.output)
    assert.equal("failed", (H.step_status(R, "catch_up")))
  end)
end)
