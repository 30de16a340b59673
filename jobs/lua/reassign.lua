-- reassign: a batch that killed its worker again and again (a poison job among them) is
-- split: each of its jobs moves to a batch of its own, sent one by one.
--
-- KEYS  inflight, then the jobs
-- ARGV  old (the batch's id), now, then per job (2 each): its new batch's id and in-flight member
-- Moves SCHEDULED or RUNNING (in the old batch) -> SCHEDULED (in its new batch)
-- Guarantees a job is in one batch at a time; the new batch is in flight before it is sent.
-- Returns per job 1 moved, 0 left alone.
local inflight = KEYS[1]
local old, now = ARGV[1], ARGV[2]

local out = {}
for i = 2, #KEYS do
  local job = KEYS[i]
  local v = redis.call('HMGET', job, 'state', 'batch')
  local j = (i - 2) * 2
  if (v[1] == 'SCHEDULED' or v[1] == 'RUNNING') and v[2] == old then
    redis.call('HSET', job, 'state', 'SCHEDULED', 'batch', ARGV[3 + j])
    redis.call('ZADD', inflight, now, ARGV[4 + j])
    out[#out + 1] = 1
  else
    out[#out + 1] = 0
  end
end
return out
