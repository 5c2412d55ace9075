-- A tour of the migrun modules: `migrun playbooks/tour.lua [--quick]`.
require("migrun.rehearsal.tour").run{ quick = arg[1] == "--quick" }
