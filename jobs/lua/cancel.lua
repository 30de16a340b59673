-- cancel: a caller cancels a job that has not started.
--
-- KEYS  job, events (the scheduler's events stream)
-- ARGV  id
-- Moves STAGED, QUEUED, SCHEDULED, FOLLOWING or AT_PROVIDER -> CANCELLED (the caller then
--       stores its CANCELLED result through finish_many); RUNNING and final jobs are left
--       alone
-- Guarantees a cancelled job does not start: mark_running skips it. A job waiting at a
--       provider's batch endpoint keeps no claim on its answer (its line's result is
--       dropped); the event tells the scheduler, which cancels the provider batch once
--       none of its jobs is left.
-- Returns the state found ('' when Redis does not know the job).
local job, events = KEYS[1], KEYS[2]
local id = ARGV[1]

local st = redis.call('HGET', job, 'state')
if not st then return '' end
if st == 'STAGED' or st == 'QUEUED' or st == 'SCHEDULED' or st == 'FOLLOWING'
    or st == 'AT_PROVIDER' then
  redis.call('HSET', job, 'state', 'CANCELLED')
  redis.call('XADD', events, 'MAXLEN', '~', '100000', '*', 'cancel', id)
end
return st
