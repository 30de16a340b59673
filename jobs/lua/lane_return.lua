-- lane_return: jobs of a provider batch go back to the fast path (a line that failed for
-- a transient reason, an answer that did not validate, a provider batch that expired or
-- was cancelled while their deadline still allows).
--
-- KEYS  intake, then per job: job, pending (its tenant's set)
-- ARGV  batch (the provider batch's id), then per job (5 each): id, class, tenant,
--       deadline ('' none), spec (its JSON with lane 'fast': it never goes to a provider
--       batch again)
-- Moves AT_PROVIDER (in this provider batch) -> QUEUED
-- Guarantees a job moves once, and only out of the provider batch that holds it: a job
--       in another state or batch (final, cancelled, moved already) is left alone.
-- Returns per job 1 moved, 0 left alone.
--@include _intake_add
local intake = KEYS[1]
local batch = ARGV[1]

local out = {}
for i = 1, (#KEYS - 1) / 2 do
  local job, pending = KEYS[2 * i], KEYS[2 * i + 1]
  local a = 1 + (i - 1) * 5
  local id, class, tenant, deadline, spec =
    ARGV[a + 1], ARGV[a + 2], ARGV[a + 3], ARGV[a + 4], ARGV[a + 5]
  local v = redis.call('HMGET', job, 'state', 'batch')
  if v[1] == 'AT_PROVIDER' and v[2] == batch then
    local sid = intake_add(intake, id, class, tenant, deadline)
    redis.call('HSET', job, 'state', 'QUEUED', 'sid', sid, 'spec', spec)
    redis.call('HDEL', job, 'batch')
    redis.call('SADD', pending, id)
    out[i] = 1
  else
    out[i] = 0
  end
end
return out
