-- release: the scheduler gives its lease up (a clean stop: a standby takes over at once).
--
-- KEYS  lease
-- ARGV  token (the caller's)
-- Moves nothing
-- Guarantees only the holder releases.
-- Returns 1 when released, else 0.
local lease = KEYS[1]
local token = ARGV[1]

if redis.call('GET', lease) == token then return redis.call('DEL', lease) end
return 0
