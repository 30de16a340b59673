-- reassign: a batch that killed its worker again and again (a poison job among them) is
-- split: each of its jobs moves to a batch of its own, sent one by one.
--
-- KEYS  inflight, outbox, then the jobs
-- ARGV  old (the batch's id), now, then per job (3 each): its new batch's id, in-flight
--       member and outbox entry (the new batch's JSON, a newline, the job's id)
-- Moves SCHEDULED or RUNNING (in the old batch) -> SCHEDULED (in its new batch)
-- Guarantees a job is in one batch at a time; the new batch is in flight and in the outbox
--       before it is sent (as a claimed batch is: a send lost with a Redis is sent again).
-- Returns per job 1 moved, 0 left alone.
local inflight, outbox = KEYS[1], KEYS[2]
local old, now = ARGV[1], ARGV[2]

local out = {}
for i = 3, #KEYS do
  local job = KEYS[i]
  local v = redis.call('HMGET', job, 'state', 'batch')
  local j = (i - 3) * 3
  if (v[1] == 'SCHEDULED' or v[1] == 'RUNNING') and v[2] == old then
    local id = ARGV[3 + j]
    redis.call('HSET', job, 'state', 'SCHEDULED', 'batch', id)
    redis.call('ZADD', inflight, now, ARGV[4 + j])
    redis.call('HSET', outbox, id, ARGV[5 + j])
    out[#out + 1] = 1
  else
    out[#out + 1] = 0
  end
end
return out
