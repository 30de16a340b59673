-- lease: the scheduler takes its lease if it is free or already its own, and renews it.
--
-- KEYS  lease
-- ARGV  token (the caller's), ttl_ms
-- Moves nothing
-- Guarantees one holder at a time; the steps that change what the scheduler owns
--       (claim, take_to_expire, requeue) check the token (fencing).
-- Returns 1 when the caller holds the lease, else 0.
local lease = KEYS[1]
local token, ttl_ms = ARGV[1], ARGV[2]

local holder = redis.call('GET', lease)
if holder == false then
  redis.call('SET', lease, token, 'PX', ttl_ms)
  return 1
end
if holder == token then
  redis.call('PEXPIRE', lease, ttl_ms)
  return 1
end
return 0
