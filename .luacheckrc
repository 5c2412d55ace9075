-- luacheck (Debian's lua-check), run by `make test` (ctest: luacheck).
std = "lua54"
max_line_length = 160
-- unused arguments of callbacks are part of their signature; an inner
-- variable may shadow an outer one of the same meaning
unused_args = false
ignore = { "431", "421" }
files["tests/"] = { std = "+busted" }
files["tests/spec/pretty_spec.lua"] = { ignore = { "122" } } -- io.stdout swapped for a capture
files["tests/fixtures/sigv4/vectors.lua"] = { max_line_length = false } -- AWS's published vectors
exclude_files = { "build*/**" }
