-- publish: the second half of a submit. Every STAGED job of the call becomes visible to
-- the scheduler, all in one step.
--
-- KEYS  intake, stats, recent (the stats bucket of this minute), then the jobs
-- ARGV  bucket_ttl, then the jobs' ids (in the order of their KEYS)
-- Moves STAGED -> QUEUED (other states are left alone: a job cancelled or withdrawn
--       meanwhile stays so)
-- Guarantees a job is counted as submitted once (a released follower was counted when
--       it arrived: its hash holds `counted`).
-- Returns how many jobs were published.
--@include _intake_add
--@include _count
local intake, stats, recent_key = KEYS[1], KEYS[2], KEYS[3]
local bucket_ttl = ARGV[1]

local done = 0
local totals, recent = {}, {}
for i = 4, #KEYS do
  local job = KEYS[i]
  local v = redis.call('HMGET', job, 'state', 'p', 't', 'd', 'label', 'counted')
  local state, class, tenant, deadline, label, counted = v[1], v[2], v[3], v[4], v[5], v[6]
  if state == 'STAGED' then
    local sid = intake_add(intake, ARGV[i - 2], class, tenant, deadline)
    redis.call('HSET', job, 'state', 'QUEUED', 'sid', sid)
    if not counted then
      count_submitted(totals, recent, class, label or (tenant .. '||'))
    end
    done = done + 1
  end
end
add_counts(stats, totals)
add_counts(recent_key, recent)
if done > 0 then redis.call('EXPIRE', recent_key, bucket_ttl) end
return done
