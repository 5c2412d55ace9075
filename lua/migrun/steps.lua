--[[
migrun.steps: step bodies that more than one playbook runs the same way
(full.lua on every table, partial_restart.lua on one group's), so that each
playbook keeps only the line that says which tables.

  P:step{ "qa", "Quick QA ...", run = function(ctx) return steps.quick_qa(ctx, tables(ctx)) end }

  steps.verify_indexes(ctx, tables) -> { verified = true } | nil, why
      every index and constraint of the (paused) replica's tables exists on
      the target; each missing one is named.
  steps.quick_qa(ctx, tables) -> facts | nil, why
      per-month and exact counts, replica against target, into the report;
      a difference fails the step with the table of them.
]]
local catalog = require "migrun.catalog"
local qa = require "migrun.qa"

local steps = {}

function steps.verify_indexes(ctx, tables)
  local missing = catalog.missing_on_target(
    assert(catalog.constraints_and_indexes(ctx.replica, tables)),
    assert(catalog.constraints_and_indexes(ctx.target, tables)))
  if #missing > 0 and not ctx.dry_run then
    for _, m in ipairs(missing) do ctx:warn("missing on the target: %s %s", m.table, m.definition) end
    return nil, ("%d index(es) or constraint(s) of the source are missing on the target"):format(#missing)
  end
  return { verified = true }
end

function steps.quick_qa(ctx, tables)
  if ctx.dry_run then
    ctx:say("would compare %d table(s) on the replica and the target", #tables)
    return {}
  end
  local r = assert(qa.compare(ctx.replica, ctx.target, tables, ctx.config.qa, { mode = "quick" }))
  ctx:report_table("Quick QA (replica vs target)", qa.report_columns(), qa.report_rows(r))
  if r.differences > 0 then
    ctx:say("%s", qa.format(r))
    return nil, ("%d QA difference(s) between the replica and the target"):format(r.differences)
  end
  return { checks = #r.checks, seed = r.seed }
end

return steps
