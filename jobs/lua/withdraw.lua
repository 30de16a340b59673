-- withdraw: undoes a submit that failed half way (say, its SQL write did not happen).
--
-- KEYS  intake, then per job: job, pending (its tenant's pending set)
-- ARGV  tombstone_ttl, then the jobs' ids
-- Moves STAGED, QUEUED, FOLLOWING or (none) -> WITHDRAWN; a job already in motion or
--       final is left as it is
-- Guarantees a withdrawn job never runs: a job Redis does not hold gets a tombstone,
--       so a late copy of the submit cannot create it.
-- Returns per job 'WITHDRAWN', or the state of the job left alone.
local intake = KEYS[1]
local tombstone_ttl = ARGV[1]

local out = {}
for i = 1, (#KEYS - 1) / 2 do
  local job, pending = KEYS[2 * i], KEYS[2 * i + 1]
  local v = redis.call('HMGET', job, 'state', 'sid')
  local st = v[1]
  if not st or st == 'STAGED' or st == 'QUEUED' or st == 'WITHDRAWN' or st == 'FOLLOWING' then
    if v[2] then redis.call('XDEL', intake, v[2]) end
    redis.call('DEL', job)
    redis.call('HSET', job, 'state', 'WITHDRAWN')
    redis.call('EXPIRE', job, tombstone_ttl)
    redis.call('SREM', pending, ARGV[i + 1])
    out[i] = 'WITHDRAWN'
  else
    out[i] = st
  end
end
return out
