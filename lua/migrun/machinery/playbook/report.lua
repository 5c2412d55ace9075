--[[
migrun.playbook.report: the Markdown report of a playbook run, written at
the end of a run and when it fails to state_dir/reports/<started>-<playbook>.md
(one per run, never overwritten) and to state_dir/report.md (the latest). Everything comes
from the journal (so a resumed run reports what earlier runs did too):

  # <title>: <migration>
  run outcome, config file, state directory, when
  | step | outcome | started | ended | duration |   every step of the playbook
  the error, if the run failed
  ## <step>: <title>      each step's report tables (ctx:report_table) and facts

  report.render{ playbook = P, journal = J, run = run_record, config_path = } -> markdown
  (tables are migrun.text.markdown's)
]]
local text = require "migrun.text"

local report = {}

-- A value inside a Markdown paragraph: one line, pipes escaped.
local function cell(v)
  if v == nil then return "" end
  return (tostring(v):gsub("|", "\\|"):gsub("\n", " "))
end

local function short(v, limit)
  local s
  if type(v) == "table" then
    local n = 0
    for _ in pairs(v) do n = n + 1 end
    s = #v > 0 and ("(%d items)"):format(#v) or ("(%d entries)"):format(n)
  else
    s = tostring(v)
  end
  if #s > limit then s = s:sub(1, limit - 3) .. "..." end
  return s
end

local function facts_lines(facts)
  local keys = {}
  for k in pairs(facts or {}) do keys[#keys + 1] = tostring(k) end
  table.sort(keys)
  if #keys == 0 then return nil end
  local rows = {}
  for _, k in ipairs(keys) do
    local v = facts[k]
    if v == nil then v = facts[tonumber(k)] end
    rows[#rows + 1] = { k, short(v, 80) }
  end
  return text.markdown({ "fact", "value" }, rows)
end

function report.render(opts)
  local P, J, run = opts.playbook, opts.journal, opts.run or {}
  local steps = J:steps(P.name)
  local out = {}
  local function add(s) out[#out + 1] = s end
  add(("# %s: %s\n\n"):format(P.title or P.name, J.data.migration or "?"))
  add(("- playbook: `%s`\n"):format(P.name))
  add(("- outcome: **%s**%s\n"):format(run.outcome or "?", run.dry_run and " (dry run: nothing was changed)" or ""))
  if opts.config_path then add(("- config: `%s`\n"):format(opts.config_path)) end
  if opts.state_dir then add(("- state directory: `%s`\n"):format(opts.state_dir)) end
  add(("- run: %s to %s\n"):format(run.started_at or "?", run.ended_at or "?"))
  if run.skipped and #run.skipped > 0 then
    add(("- skipped (done before): %s\n"):format(table.concat(run.skipped, ", ")))
  end
  add("\n## Steps\n\n")
  local rows = {}
  for i, step in ipairs(P.steps) do
    local s = steps[step.name] or {}
    rows[#rows + 1] = { i, step.name, s.status or "pending", s.started_at or "", s.ended_at or "",
                        text.duration(s.duration), step.title }
  end
  add(text.markdown({ "#", "step", "outcome", "started", "ended", "duration", "what" }, rows))
  if run.error then
    add(("\n**Error:** %s\n"):format(cell(run.error)))
  end
  for _, step in ipairs(P.steps) do
    local s = steps[step.name]
    if s and (s.tables and #s.tables > 0 or s.error or (s.facts and next(s.facts))) then
      add(("\n## %s: %s\n"):format(step.name, step.title))
      if s.error then add(("\n**%s:** %s\n"):format(s.status == "failed" and "Failed" or "Last error", cell(s.error))) end
      for _, t in ipairs(s.tables or {}) do
        add(("\n### %s\n\n"):format(t.title))
        add(text.markdown(t.columns, t.rows))
      end
      local facts = facts_lines(s.facts)
      if facts then
        add("\n### Facts\n\n")
        add(facts)
      end
    end
  end
  return table.concat(out)
end

return report
