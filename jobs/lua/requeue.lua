-- requeue: a job of a batch whose task was lost goes back to intake (or of a provider
-- batch the job store never recorded: its scheduler died between claim and record).
--
-- KEYS  job, intake, pending (its tenant's set), lease
-- ARGV  id, batch (the lost batch's id), class, tenant, deadline ('' none),
--       token (the caller's lease; '' for a tool run without a scheduler)
-- Moves SCHEDULED, RUNNING or AT_PROVIDER (in that batch) -> QUEUED
-- Guarantees fenced by the lease: a paused former scheduler must not re-enqueue what its
--       successor sent. A job that moved on (final, or in another batch) is left alone.
-- Returns 1 requeued, 0 left alone, -1 without the lease.
--@include _intake_add
local job, intake, pending, lease = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local id, batch, class, tenant, deadline, token =
  ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6]

if token ~= '' and redis.call('GET', lease) ~= token then return -1 end
local v = redis.call('HMGET', job, 'state', 'batch')
if (v[1] ~= 'SCHEDULED' and v[1] ~= 'RUNNING' and v[1] ~= 'AT_PROVIDER')
    or v[2] ~= batch then return 0 end
local sid = intake_add(intake, id, class, tenant, deadline)
redis.call('HSET', job, 'state', 'QUEUED', 'sid', sid)
redis.call('HDEL', job, 'batch')
redis.call('SADD', pending, id)
return 1
