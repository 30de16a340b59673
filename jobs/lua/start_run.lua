-- start_run: the start of a batch task: may this delivery run?
--
-- KEYS  deliveries (the batch's deliveries hash), run (the batch's run key), inflight,
--       outbox
-- ARGV  retry (the task's retry number), ttl, send (this send's id), now,
--       member (the batch's in-flight member), token (this delivery's own id, new for
--       every delivery a worker takes), redelivered ('1' when the broker marked the
--       message as delivered before: its worker was lost), batch (its id)
-- Moves nothing (mark_running moves the jobs); the batch leaves the outbox
-- Guarantees the first send of a batch to arrive wins, and one delivery of it runs at a
--       time: a re-delivery after a lost worker, or a retry the task asked for (a higher
--       retry number), takes the run over; a second copy of a delivery that another
--       worker runs (a broker failover can hand out a message twice, unmarked) does not
--       run; the same delivery starting again (its start was cut short) runs, counted
--       once. The batch's in-flight entry is refreshed to now, so a batch that waited in
--       the broker, or was delivered again after a lost worker, is not taken for lost
--       while it runs. A batch stays in the outbox until one of its sends starts, so a
--       send that a Redis failover lost is sent again (the scheduler re-sends the outbox).
-- Returns -1 when this delivery may not run, else how many deliveries of the batch
--       followed a lost worker (count_delivery).
--@include _count_delivery
local deliveries, run, inflight, outbox = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local retry, ttl, send, now, member = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5]
local token, redelivered, batch = ARGV[6], ARGV[7], ARGV[8]

local value = send .. ' ' .. retry .. ' ' .. token
if not redis.call('SET', run, value, 'NX', 'EX', ttl) then
  -- "send retry token" (a value of an older version is its send alone)
  local held_send, held_retry, held_token = string.match(
    redis.call('GET', run) or '', '^(%S*) ?(%S*) ?(%S*)$')
  if held_send ~= send then return -1 end
  if held_token == token then
    redis.call('ZADD', inflight, now, member)
    return count_delivery(deliveries, retry, ttl, false)
  end
  if redelivered ~= '1' and tonumber(retry) <= (tonumber(held_retry) or -1) then return -1 end
  redis.call('SET', run, value, 'EX', ttl)
end
redis.call('ZADD', inflight, now, member)
redis.call('HDEL', outbox, batch)
return count_delivery(deliveries, retry, ttl, true)
