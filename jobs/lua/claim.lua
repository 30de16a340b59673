-- claim: the scheduler takes jobs for a batch it is about to send.
--
-- KEYS  lease, outbox, inflight, intake, then per job: job, pending (its tenant's set)
-- ARGV  token (the caller's lease), batch (id), meta (the batch's JSON), now,
--       member (the batch's in-flight member), then the jobs' ids
-- Moves QUEUED -> SCHEDULED (in this batch); any other state is skipped
-- Guarantees fenced by the lease: a paused former scheduler claims nothing. The batch is
--       in the outbox until the scheduler confirms it sent it (a new scheduler re-sends
--       what it holds) and in flight before it is sent (so a fast worker's "done"
--       always comes after). A job is in at most one batch.
-- Returns the ids claimed, or -1 without the lease.
--@include _take_queued
local lease, outbox, inflight, intake = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local token, batch, meta, now, member = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5]

if redis.call('GET', lease) ~= token then return -1 end
local claimed = take_queued(intake, batch, 5, 6)
if #claimed > 0 then
  redis.call('HSET', outbox, batch, meta .. '\n' .. table.concat(claimed, ','))
  redis.call('ZADD', inflight, now, member)
end
return claimed
