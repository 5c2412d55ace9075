-- A tour of the migrun modules: `migrun playbooks/tour.lua [--quick]`.
require("migrun.tour").run{ quick = arg[1] == "--quick" }
