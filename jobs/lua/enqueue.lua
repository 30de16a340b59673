-- enqueue: one job, payload and intake entry in one step (the single-job submit of tools
-- and tests; the API and the client stage and publish).
--
-- KEYS  job, intake, pending (the tenant's pending set)
-- ARGV  id, spec (JSON), ttl, max_pending (0: no limit), class, tenant, deadline ('' none)
-- Moves (none) -> QUEUED
-- Guarantees a job id is enqueued once; a tenant never holds more than max_pending jobs.
-- Returns {1, entry id} enqueued, {0, ''} the job exists, {-1, ''} over the quota.
--@include _intake_add
local job, intake, pending = KEYS[1], KEYS[2], KEYS[3]
local id, spec, ttl, limit = ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[4])
local class, tenant, deadline = ARGV[5], ARGV[6], ARGV[7]

if redis.call('EXISTS', job) == 1 then return {0, ''} end
if limit > 0 and redis.call('SCARD', pending) >= limit then return {-1, ''} end
local sid = intake_add(intake, id, class, tenant, deadline)
redis.call('HSET', job, 'spec', spec, 'state', 'QUEUED', 'sid', sid)
redis.call('EXPIRE', job, ttl)
redis.call('SADD', pending, id)
redis.call('EXPIRE', pending, ttl)
return {1, sid}
