-- start_run: the start of a batch task: may this send run?
--
-- KEYS  deliveries (the batch's deliveries hash), run (the batch's run key), inflight
-- ARGV  retry (the task's retry number), ttl, send (this send's id), now,
--       member (the batch's in-flight member)
-- Moves nothing (mark_running moves the jobs)
-- Guarantees the first send of a batch to arrive wins; a re-delivery of that same send
--       (its worker died) runs again; any other send does not. The batch's in-flight
--       entry is refreshed to now, so a batch that waited in the broker, or was
--       delivered again after a lost worker, is not taken for lost while it runs.
-- Returns -1 when this send may not run, else how many deliveries of the batch
--       followed a lost worker (count_delivery).
--@include _count_delivery
local deliveries, run, inflight = KEYS[1], KEYS[2], KEYS[3]
local retry, ttl, send, now, member = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5]

local won = redis.call('SET', run, send, 'NX', 'EX', ttl)
if not won and redis.call('GET', run) ~= send then return -1 end
redis.call('ZADD', inflight, now, member)
return count_delivery(deliveries, retry, ttl)
