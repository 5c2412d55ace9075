-- migrun.loadprogress: the full load's progress in the plan's unit (on-disk
-- bytes), so that "done of total" compares like with like whatever COPY
-- sends. No server.
local loadprogress = require "migrun.loadprogress"

describe("migrun.loadprogress", function()
  local TABLES = {
    { schema = "public", name = "a", bytes = 1000, rows_estimate = 10 },
    { schema = "public", name = "b", bytes = 9000, rows_estimate = 100 },
    { schema = "public", name = "c", bytes = 4000 },                     -- never analyzed: no estimate
  }

  it("counts loaded tables whole and tables under way by their share of rows, never whole until committed", function()
    local state = { loaded = {}, chunks = {} }
    local p = loadprogress.new(TABLES, state)
    assert.equal(14000, p.total)
    assert.equal(0, p:done())
    -- b: 50 of ~100 rows copied, whatever the COPY bytes
    assert.equal(4500, p:update{ table = "public.b", rows = 50, bytes = 123456 })
    -- a committed: its whole on-disk size, not the 900 bytes COPY sent
    state.loaded["public.a"] = { rows = 10, bytes = 900 }
    assert.equal(5500, p:done())
    -- more rows than the estimate: 99% until committed
    assert.equal(1000 + 8910, p:update{ table = "public.b", rows = 150, bytes = 1 })
    state.loaded["public.b"] = { rows = 150, bytes = 200000 }
    assert.equal(10000, p:done())
    -- without an estimate, the share of COPY bytes against the on-disk size
    assert.equal(10000 + 1000, p:update{ table = "public.c", rows = 7, bytes = 1000 })
    state.loaded["public.c"] = { rows = 40, bytes = 3000 }
    assert.equal(p.total, p:done())
    assert.equal(4000, p:table_done("public.c"))
  end)

  it("adds a split table's committed chunks to the chunks under way", function()
    local state = { loaded = {}, chunks = { ["public.b"] = { done = { ["1"] = { rows = 20, bytes = 99 } } } } }
    local p = loadprogress.new(TABLES, state)
    assert.equal(1800, p:done())
    p:update{ table = "public.b", chunk = 2, rows = 30, bytes = 5 }
    assert.equal(4500, p:done())
    -- chunk 2 committed: counted once, from the journal
    state.chunks["public.b"].done["2"] = { rows = 30, bytes = 5 }
    assert.equal(4500, p:done())
  end)

  it("sums the on-disk size of the tables a journal says are loaded", function()
    assert.same({ 5000, 2 }, { loadprogress.loaded(TABLES, { ["public.a"] = {}, ["public.c"] = {} }) })
    assert.same({ 0, 0 }, { loadprogress.loaded(TABLES, nil) })
  end)
end)
