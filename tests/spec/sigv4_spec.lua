-- SigV4 signer (migrun.aws.sign) against the published AWS test vectors.
local aws = require "migrun.aws"
local proc = require "migrun.proc"
local tmp = require "helpers.tmp"
local SOURCE = os.getenv("MIGRUN_SOURCE_DIR") or "."
local MIGRUN = os.getenv("MIGRUN_BIN") or "build/migrun"
local SANITIZE = os.getenv("MIGRUN_SANITIZE") == "1"
local vectors = dofile(SOURCE .. "/tests/fixtures/sigv4/vectors.lua")

describe("aws.sign", function()
  for _, v in ipairs(vectors) do
    it("matches the vector " .. v.name, function()
      local s = aws.sign(v.request)
      assert.are.equal(v.signature, s.signature)
      if v.canonical_request then assert.are.equal(v.canonical_request, s.canonical_request) end
      if v.canonical_request_hash then
        assert.are.equal(v.canonical_request_hash, aws.sha256_hex(s.canonical_request))
      end
      if v.string_to_sign then assert.are.equal(v.string_to_sign, s.string_to_sign) end
      if v.canonical_request_hash then
        assert.are.equal(v.canonical_request_hash, s.string_to_sign:match("\n(%x+)$"))
      end
      if v.signed_headers then assert.are.equal(v.signed_headers, s.signed_headers) end
      if v.payload_hash then assert.are.equal(v.payload_hash, s.payload_hash) end
      if v.authorization then
        assert.are.equal(v.authorization, s.authorization)
        assert.are.equal(v.authorization, s.headers.Authorization)
      end
      if v.canonical_uri then
        assert.are.equal(v.canonical_uri, s.canonical_request:match("^[^\n]*\n([^\n]*)\n"))
      end
      if v.canonical_query then
        assert.are.equal(v.canonical_query, s.canonical_request:match("^[^\n]*\n[^\n]*\n([^\n]*)\n"))
      end
    end)
  end

  local base = vectors.constants

  local function with(t)
    for k, v in pairs(base) do if t[k] == nil then t[k] = v end end
    return t
  end

  it("adds X-Amz-Date, the session token and Host (with a non-default port) to the headers", function()
    local s = aws.sign(with{ method = "POST", url = "http://127.0.0.1:8123/", body = "{}",
      session_token = "TOKEN", headers = { ["x-amz-date"] = "19990101T000000Z" } })
    assert.are.equal("127.0.0.1:8123", s.headers.Host)
    assert.are.equal("20150830T123600Z", s.headers["X-Amz-Date"])
    assert.is_nil(s.headers["x-amz-date"])
    assert.are.equal("TOKEN", s.headers["X-Amz-Security-Token"])
    assert.are.equal("host;x-amz-date;x-amz-security-token", s.signed_headers)
    local s2 = aws.sign(with{ url = "https://example.amazonaws.com:443/" })
    assert.are.equal("example.amazonaws.com", s2.headers.Host)
  end)

  it("canonicalizes header names and values and skips unsigned headers", function()
    local s = aws.sign(with{ path = "/", headers = { Host = "h", ["My-Header1"] = "  a   b \t c ",
      ["User-Agent"] = "x", ["X-Multi"] = { "v1", " v2 " } } })
    assert.truthy(s.canonical_request:find("\nmy-header1:a b c\n", 1, true))
    assert.truthy(s.canonical_request:find("\nx-multi:v1,v2\n", 1, true))
    assert.are.equal("host;my-header1;x-amz-date;x-multi", s.signed_headers)
  end)

  it("normalizes the path and encodes the query like botocore", function()
    local s = aws.sign(with{ url = "https://h/a/./b/../c//d/?b=2&a=x%20y&a=1&c", headers = {} })
    local uri, query = s.canonical_request:match("^GET\n([^\n]*)\n([^\n]*)\n")
    assert.are.equal("/a/c/d/", uri)
    assert.are.equal("a=1&a=x%20y&b=2&c=", query)
    local t = aws.sign(with{ host = "h", path = "/", query = { b = "2", a = { "x y", "1" } } })
    assert.are.equal(query:gsub("&c=", ""), (t.canonical_request:match("^GET\n[^\n]*\n([^\n]*)\n")))
  end)

  it("recomputes a signature for exactly the headers the client listed", function()
    local s = aws.sign(with{ method = "POST", url = "http://127.0.0.1:9/", body = "{}",
      headers = { ["Content-Type"] = "application/x-amz-json-1.1" } })
    local received = {}
    for k, v in pairs(s.headers) do received[k:lower()] = v end
    received["accept"] = "*/*"
    local v = aws.sign(with{ method = "POST", url = "http://127.0.0.1:9/", body = "{}", headers = received,
      time = received["x-amz-date"], signed_headers = s.signed_headers })
    assert.are.equal(s.signature, v.signature)
  end)

  it("keeps the secret out of everything it returns", function()
    local s = aws.sign(with{ url = "https://h/" })
    local function scan(t)
      for _, v in pairs(t) do
        if type(v) == "table" then scan(v)
        else assert.is_nil(tostring(v):find(base.secret_key, 1, true)) end
      end
    end
    scan(s)
  end)

  -- The key material of a signature ("AWS4" + secret, the four derived keys)
  -- must be wiped, not just dropped: a migrun process signs under a free()
  -- that searches every block given back to malloc for it (a Lua string
  -- popped and collected, a buffer freed without OPENSSL_cleanse).
  it("leaves no key material in the memory it frees", function()
    if SANITIZE then pending("the sanitizer build has a free() of its own") return end
    local dir = tmp.dir("sigv4")
    local so = dir .. "/freed_scan.so"
    local okc, _, _, _, errc = proc.run{ "cc", "-shared", "-fPIC", "-O1", "-o", so,
      SOURCE .. "/tests/fixtures/sigv4/freed_scan.c", timeout = 60 }
    assert(okc, errc)
    local secret = "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY" .. ("%08d"):format(os.time() % 100000000)
    local day, region, service = "20150830", "us-east-1", "dms"
    local function raw(hex) return (hex:gsub("%x%x", function(h) return string.char(tonumber(h, 16)) end)) end
    local kdate = raw(aws.hmac_sha256_hex("AWS4" .. secret, day))
    local kregion = raw(aws.hmac_sha256_hex(kdate, region))
    local kservice = raw(aws.hmac_sha256_hex(kregion, service))
    local ksigning = raw(aws.hmac_sha256_hex(kservice, "aws4_request"))
    local patterns = {}
    for i, k in ipairs{ "AWS4" .. secret, kdate, kregion, kservice, ksigning } do
      patterns[i] = (k:gsub(".", function(c) return ("%02x"):format(c:byte()) end))
    end
    -- the child is given the secret alone; it signs, then collects every garbage
    local script = [[
      local aws = require "migrun.aws"
      local s = aws.sign{ method = "POST", url = "https://dms.us-east-1.amazonaws.com/", body = "{}",
        region = "us-east-1", service = "dms", access_key = "AKIDEXAMPLE", time = "20150830T123600Z",
        secret_key = io.read("a") }
      s = nil
      collectgarbage() collectgarbage()
      print("signed")
    ]]
    local ok, how, code, out, err = proc.run{ MIGRUN, "-e", script, stdin = secret, timeout = 60,
      env = { LD_PRELOAD = so, MIGRUN_FREED_SCAN = table.concat(patterns, ",") } }
    os.remove(so)
    os.remove(dir)
    assert(ok, ("%s %s %s"):format(tostring(how), tostring(code), err))
    assert.are.equal("signed\n", out)
    assert.are.equal("", err) -- "freed: n": pattern n was in a freed block
  end)

  it("raises on misuse", function()
    assert.has_error(function() aws.sign{ url = "https://h/" } end)
    assert.has_error(function() aws.sign(with{ url = "https://h/", time = "yesterday" }) end)
    assert.has_error(function() aws.sign(with{ url = "nourl" }) end)
  end)
end)
