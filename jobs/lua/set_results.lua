-- set_results: the Celery result records of jobs answered at submit, in one call.
--
-- KEYS  the result keys
-- ARGV  ttl, then per key its value (the Celery meta JSON)
-- Moves nothing (finish_many records the jobs' final states)
-- Returns how many were set.
local ttl = ARGV[1]
for i, key in ipairs(KEYS) do
  redis.call('SET', key, ARGV[i + 1], 'EX', ttl)
end
return #KEYS
