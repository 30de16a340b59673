-- release_followers: followers whose leader failed (or is gone) run on their own.
--
-- KEYS  the jobs
-- ARGV  (none)
-- Moves FOLLOWING -> STAGED (the caller then publishes them: STAGED -> QUEUED)
-- Guarantees a job that is no longer following (final, cancelled) is left alone.
-- Returns per job 1 released, else 0.
local out = {}
for i = 1, #KEYS do
  local job = KEYS[i]
  if redis.call('HGET', job, 'state') == 'FOLLOWING' then
    redis.call('HSET', job, 'state', 'STAGED')
    redis.call('HDEL', job, 'lead')
    out[i] = 1
  else
    out[i] = 0
  end
end
return out
