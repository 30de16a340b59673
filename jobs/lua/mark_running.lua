-- mark_running: a worker starts a batch's jobs.
--
-- KEYS  the jobs
-- ARGV  batch (the batch's id)
-- Moves SCHEDULED or RUNNING (in this batch: a re-delivery) -> RUNNING
-- Guarantees a job runs only in the batch that claimed it: a job of another batch is
--       reported 'OTHER' and the worker skips it.
-- Returns a flat list, two items per job: the state found ('RUNNING', 'OTHER', or the
--       state the job is in), and its spec when it is now RUNNING (else false).
local batch = ARGV[1]

local out = {}
for i = 1, #KEYS do
  local job = KEYS[i]
  local v = redis.call('HMGET', job, 'state', 'batch', 'spec')
  local st, owner = v[1], v[2]
  if (st == 'SCHEDULED' or st == 'RUNNING') and owner == batch then
    redis.call('HSET', job, 'state', 'RUNNING')
    out[2 * i - 1] = 'RUNNING'
    out[2 * i] = v[3]
  else
    if (st == 'SCHEDULED' or st == 'RUNNING') then st = 'OTHER' end
    out[2 * i - 1] = st or ''
    out[2 * i] = false
  end
end
return out
