-- wrk script driving kvstore's native API or etcd's v3 JSON gateway with the same load shape,
-- so both are measured by one outside client (see scripts/bench).
--
--   wrk -t4 -c32 -d10s -s bench/wrk/kv.lua http://127.0.2.1:8080 -- TARGET KEYS VALUE_SIZE GET_RATIO ENDPOINTS
--
-- TARGET: kvs (PUT/GET /v1/kv/key_NNNNNNNN) or etcd (POST /v3/kv/put, /v3/kv/range with base64
-- keys and values). ENDPOINTS: comma-separated host:port list; wrk's threads are spread over them
-- round-robin (as a Service spreads connections over pods). The last line printed is one JSON
-- object with the totals and latency percentiles (ms).

local endpoints = nil
local next_thread = 0

function setup(thread)
  if endpoints == nil then
    endpoints = {}
    local list = os.getenv("KVS_WRK_ENDPOINTS") or ""
    for hostport in string.gmatch(list, "[^,]+") do
      local host, port = string.match(hostport, "^(.+):(%d+)$")
      table.insert(endpoints, wrk.lookup(host, port)[1])
    end
  end
  if #endpoints > 0 then
    thread.addr = endpoints[(next_thread % #endpoints) + 1]
  end
  thread:set("id", next_thread)
  next_thread = next_thread + 1
end

local b64chars = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
local function base64(data)
  return ((data:gsub(".", function(x)
    local r, b = "", x:byte()
    for i = 8, 1, -1 do r = r .. (b % 2 ^ i - b % 2 ^ (i - 1) > 0 and "1" or "0") end
    return r
  end) .. "0000"):gsub("%d%d%d?%d?%d?%d?", function(x)
    if #x < 6 then return "" end
    local c = 0
    for i = 1, 6 do c = c + (x:sub(i, i) == "1" and 2 ^ (6 - i) or 0) end
    return b64chars:sub(c + 1, c + 1)
  end) .. ({ "", "==", "=" })[#data % 3 + 1])
end

local target, keys, get_ratio
local puts, gets = {}, {}

function init(args)
  target = args[1] or "kvs"
  keys = tonumber(args[2] or "10000")
  local value = string.rep("v", tonumber(args[3] or "100"))
  get_ratio = tonumber(args[4] or "0")
  math.randomseed(1 + (id or 0) * 7919)
  -- Every request is prepared here, so a request costs the client a table lookup.
  local value64 = base64(value)
  for i = 0, keys - 1 do
    local key = string.format("key_%08d", i)
    if target == "etcd" then
      local k, v = base64(key), value64
      local json = { ["Content-Type"] = "application/json" }
      puts[i] = wrk.format("POST", "/v3/kv/put", json, '{"key":"' .. k .. '","value":"' .. v .. '"}')
      gets[i] = wrk.format("POST", "/v3/kv/range", json, '{"key":"' .. k .. '"}')
    else
      puts[i] = wrk.format("PUT", "/v1/kv/" .. key, nil, value)
      gets[i] = wrk.format("GET", "/v1/kv/" .. key)
    end
  end
end

function request()
  local i = math.random(0, keys - 1)
  if get_ratio > 0 and math.random() < get_ratio then
    return gets[i]
  end
  return puts[i]
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    '{"ops": %d, "errors": %d, "seconds": %.3f, "p50_ms": %.3f, "p99_ms": %.3f, "p999_ms": %.3f, "max_ms": %.3f}\n',
    summary.requests, e.connect + e.read + e.write + e.status + e.timeout, summary.duration / 1e6,
    latency:percentile(50) / 1000, latency:percentile(99) / 1000, latency:percentile(99.9) / 1000,
    latency.max / 1000))
end
