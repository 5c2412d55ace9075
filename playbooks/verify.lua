--[[
playbooks/verify.lua: the primary and the target compared again, while the
application writes, any time after full.lua is READY FOR CUTOVER and before
the cutover.

    migrun playbooks/verify.lua --config migration.lua [all] [--dry-run]

By default it brings the live verification up to date: the rows the source
changed since the last one (read from migrun's watch slot), the rows written
on the target behind DMS's back (the sentinel) and the differences it named
are compared again, in rounds, until only what changes as it looks is left
for the cutover. Run it now and then until the cutover: the watch slot holds
the primary's WAL since the last verification, and the cutover's window has
less left to compare. With `all`, every table is hashed whole again (what
full.lua's catch_up did), still under writes.

A difference is named by table and key; playbooks/repair.lua mends it.
It writes nothing on the source or the target but fence rows, the watch slot's
position and the sentinel's notes it has looked at.
]]
local playbook = require "migrun.playbook"
local steps = require "migrun.steps"
local text = require "migrun.text"

local P = playbook.new{ name = "verify", title = "Verify the primary against the target, under writes",
  args = { { "what", "all: hash every table whole again (default: what changed since the last verification)" } },
  min_args = 0 }

P:step{ "verify", "Verify the primary against the target, under writes", always = true,
  run = function(ctx)
    if not ctx:main_done("catch_up") then
      return nil, "full.lua has not reached READY FOR CUTOVER: run it to its end first; nothing was done"
    end
    local what = ctx.args.what
    if what ~= nil and what ~= "all" then return nil, ("unknown argument %q: `all` or nothing"):format(what) end
    local whole
    if what == "all" then
      whole = {}
      for i, t in ipairs(ctx:main_facts().know_data.tables) do whole[i] = text.key(t) end
    end
    local r, why = steps.live_qa(ctx, "Live verification (primary vs target, under writes)", { whole = whole })
    if not r then return nil, why end
    return { whole = r.compared.whole, keys = r.compared.keys, pending = r.pending.keys, position = r.position }
  end }

os.exit(P:main(arg))
