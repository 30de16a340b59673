-- take_tokens: a worker takes tokens from rate-limit buckets before a provider call.
--
-- KEYS  the buckets (a deployment's, a tenant's: requests and tokens)
-- ARGV  per bucket (3 each): capacity, refill (per second), cost
-- Moves nothing
-- Guarantees all or nothing: the cost is taken from every bucket if all have enough,
--       otherwise from none. The time is the server's (TIME), so workers with skewed
--       clocks share one refill rate.
-- Returns the seconds until every bucket will have enough, as a string ('0': taken;
--       Lua numbers would become integers).
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local wait = 0
local state = {}
for i = 1, #KEYS do
  local bucket = KEYS[i]
  local cap = tonumber(ARGV[1 + (i - 1) * 3])
  local rate = tonumber(ARGV[2 + (i - 1) * 3])
  local cost = math.min(tonumber(ARGV[3 + (i - 1) * 3]), cap)
  local v = redis.call('HMGET', bucket, 'tokens', 'ts')
  local tokens = tonumber(v[1]) or cap
  local ts = tonumber(v[2]) or now
  tokens = math.min(cap, tokens + math.max(0, now - ts) * rate)
  if tokens < cost then wait = math.max(wait, (cost - tokens) / rate) end
  state[i] = {tokens, cost, math.ceil(cap / rate) * 2 + 1}
end
for i = 1, #KEYS do
  local bucket = KEYS[i]
  local tokens = state[i][1]
  if wait == 0 then tokens = tokens - state[i][2] end
  redis.call('HSET', bucket, 'tokens', tostring(tokens), 'ts', tostring(now))
  redis.call('EXPIRE', bucket, state[i][3])
end
return tostring(wait)
