-- take_to_expire: the scheduler takes jobs whose deadline passed out of intake, to store
-- their EXPIRED results.
--
-- KEYS  lease, intake, then per job: job, pending (its tenant's set)
-- ARGV  token (the caller's lease), marker (a batch id no batch has), then the jobs' ids
-- Moves QUEUED -> SCHEDULED (in the marker batch, never in flight: should the caller die
--       before storing the results, the reconciler puts them back and they expire again)
-- Guarantees fenced by the lease, like a claim: a paused former scheduler must not
--       expire jobs its successor sent.
-- Returns the ids taken, or -1 without the lease.
--@include _take_queued
local lease, intake = KEYS[1], KEYS[2]
local token, marker = ARGV[1], ARGV[2]

if redis.call('GET', lease) ~= token then return -1 end
return take_queued(intake, marker, 3, 3)
