-- coalesce: identical requests share one provider call. The first staged job of a cache
-- key leads; a staged job that finds a leader follows it.
--
-- KEYS  lead (the key's leader), followers (the leader's followers), job, stats,
--       recent (the stats bucket of this minute)
-- ARGV  id, ttl, bucket_ttl, class, label (tenant|provider|model), key (the cache key)
-- Moves STAGED -> FOLLOWING (a follower: never published; it is answered with its
--       leader's result, or released to run on its own if the leader fails)
-- Guarantees a follower is counted as submitted once, here (its hash holds `counted`,
--       so publish does not count it again when it is released).
-- Returns the leader's id (the job's own when it leads).
--@include _count
local lead, followers, job, stats, recent = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local id, ttl, bucket_ttl, class, label, key =
  ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6]

local leader = redis.call('GET', lead)
if not leader or leader == id then
  redis.call('SET', lead, id, 'EX', ttl)
  redis.call('HSET', job, 'leads', key)
  return id
end
if redis.call('HGET', job, 'state') ~= 'STAGED' then return id end
redis.call('SADD', followers, id)
redis.call('EXPIRE', followers, ttl)
redis.call('HSET', job, 'state', 'FOLLOWING', 'lead', leader, 'key', key, 'counted', '1')
local totals, minute = {}, {}
count_submitted(totals, minute, class, label)
add_counts(stats, totals)
add_counts(recent, minute)
redis.call('EXPIRE', recent, bucket_ttl)
return leader
