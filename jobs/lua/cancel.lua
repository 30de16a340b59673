-- cancel: a caller cancels a job that has not started.
--
-- KEYS  job, events (the scheduler's events stream)
-- ARGV  id
-- Moves STAGED, QUEUED, SCHEDULED or FOLLOWING -> CANCELLED (the scheduler then stores
--       its CANCELLED result through finish_many); RUNNING and final jobs are left alone
-- Guarantees a cancelled job does not start: mark_running skips it.
-- Returns the state found ('' when Redis does not know the job).
local job, events = KEYS[1], KEYS[2]
local id = ARGV[1]

local st = redis.call('HGET', job, 'state')
if not st then return '' end
if st == 'STAGED' or st == 'QUEUED' or st == 'SCHEDULED' or st == 'FOLLOWING' then
  redis.call('HSET', job, 'state', 'CANCELLED')
  redis.call('XADD', events, 'MAXLEN', '~', '100000', '*', 'cancel', id)
end
return st
