-- load: the jobs' specs, states and batches, read in one step.
--
-- KEYS  the jobs
-- ARGV  (none)
-- Moves nothing
-- Returns a flat list, three items per job: spec, state, batch (false where missing).
local out = {}
for i = 1, #KEYS do
  local job = KEYS[i]
  local v = redis.call('HMGET', job, 'spec', 'state', 'batch')
  out[3 * i - 2], out[3 * i - 1], out[3 * i] = v[1], v[2], v[3]
end
return out
