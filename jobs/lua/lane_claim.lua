-- lane_claim: the scheduler takes jobs for a provider batch (the half-price lane: a
-- provider's own batch endpoint).
--
-- KEYS  lease, lanes (sorted set of the open provider batches), intake, then per job:
--       job, pending (its tenant's set)
-- ARGV  token (the caller's lease), batch (the provider batch's id), now, then the jobs'
--       ids
-- Moves QUEUED -> AT_PROVIDER (in this provider batch); any other state is skipped
-- Guarantees fenced by the lease: a paused former scheduler claims nothing. The provider
--       batch is in `lanes` from its claim until it is closed; never in flight (no worker
--       runs it: the reconciler leaves its jobs alone once the job store records them
--       at the provider). A job is in at most one batch.
-- Returns the ids claimed, or -1 without the lease.
--@include _take_queued
local lease, lanes, intake = KEYS[1], KEYS[2], KEYS[3]
local token, batch, now = ARGV[1], ARGV[2], ARGV[3]

if redis.call('GET', lease) ~= token then return -1 end
local claimed = take_queued(intake, batch, 4, 4)
if #claimed > 0 then
  for i = 4, #ARGV do
    local job = KEYS[4 + (i - 4) * 2]
    local v = redis.call('HMGET', job, 'state', 'batch')
    if v[1] == 'SCHEDULED' and v[2] == batch then
      redis.call('HSET', job, 'state', 'AT_PROVIDER')
    end
  end
  redis.call('ZADD', lanes, now, batch)
end
return claimed
