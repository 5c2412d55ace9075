--[[
playbooks/repair.lua: the rows the verification found different, copied
again from the source to the target by key, while CDC runs, instead of
restarting their group.

    migrun playbooks/repair.lua --config migration.lua [--dry-run] [--yes]

It takes the differences the last verification named (full.lua's catch_up,
playbooks/verify.lua, or the cutover's), shows every table and how many
rows it would replace, and asks; then, table by table, in one transaction on
the target, deletes the rows with those keys and inserts the source's (as
DMS writes: triggers and foreign keys do not fire); then verifies again,
under writes, and says whether they are equal now. A table without a key is
refused, with what to do instead (restart its group). --dry-run prints every
statement and changes nothing.
]]
local playbook = require "migrun.playbook"
local steps = require "migrun.steps"
local repair = require "migrun.repair"
local verify = require "migrun.verify"

local P = playbook.new{ name = "repair", title = "Repair: the differing rows copied again from the source, by key" }

local function plan(ctx) return ctx.facts.differences.plan end

P:step{ "differences", "The differences the last verification named, and what can be mended by key", always = true,
  run = function(ctx)
    if not ctx:main_done("dms_setup") then
      return nil, "full.lua has not set up DMS yet: there is nothing to repair; nothing was done"
    end
    local state = assert(verify.load(ctx.state_dir))
    local p = repair.plan(state and state.differences or {}, ctx:main_facts().groups.groups)
    for _, t in ipairs(p.tables) do
      ctx:say("%s: %d row(s) to copy again by key%s", t.table, #t.keys,
        t.complete and "" or " (more may differ: the verification after the repair will say)")
    end
    for _, r in ipairs(p.refused) do ctx:warn("%s cannot be repaired: %s; %s", r.table, r.why, r.what_to_do) end
    if #p.tables == 0 and #p.refused == 0 then ctx:say("the last verification found no difference: nothing to repair") end
    if #p.refused > 0 and #p.tables == 0 then
      return nil, ("%d table(s) cannot be repaired by key (see above); nothing was changed"):format(#p.refused)
    end
    return { plan = p }
  end }

P:step{ "repair", "Replace the differing rows on the target with the source's",
  destructive = function(ctx)
    local p = plan(ctx)
    if #p.tables == 0 then return nil end
    local names = {}
    for i, t in ipairs(p.tables) do names[i] = ("%s (%d)"):format(t.table, #t.keys) end
    return ("replace %d row(s) on the target with the source's: %s"):format(p.rows, table.concat(names, ", "))
  end,
  run = function(ctx)
    local r = assert(repair.run(ctx.source, ctx.target, plan(ctx), { say = ctx.print }))
    ctx:report_table("Rows copied again from the source", repair.REPORT_COLUMNS, repair.report_rows(r))
    return { rows = r.rows, tables = #r.tables }
  end }

P:step{ "verify", "Verify again, under writes: are they equal now?",
  run = function(ctx)
    local r, why = steps.live_qa(ctx, "Verification after the repair (primary vs target, under writes)")
    if not r then return nil, why end
    if #plan(ctx).refused > 0 then
      return nil, ("the rows that could be were mended; %d table(s) without a key still differ (see above)")
        :format(#plan(ctx).refused)
    end
    ctx:say("repaired: every table verified equal again")
    return { equal = true }
  end }

os.exit(P:main(arg))
