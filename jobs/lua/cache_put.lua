-- cache_put: store an answer in the exact cache, keeping its partition within bounds.
--
-- KEYS  entry, index (the partition's entries by time), sizes (the partition's entry
--       sizes), bytes (the partition's total), partitions (the registry of partitions)
-- ARGV  value (the entry's JSON), ttl, now, max_entries, max_bytes, partition (its name)
-- Moves nothing (jobs are final before their answers are cached)
-- Guarantees the partition keeps within max_entries and max_bytes: entries past their
--       ttl leave its accounts first, then the oldest. The partition is registered, so
--       a purge finds it without a keyspace scan. Every key the script writes is in
--       KEYS: the evicted entries leave the accounts here and their keys are returned
--       for the caller to delete (each also expires on its own after ttl).
-- Returns the evicted entries' keys.
local entry, index, sizes, bytes_key, partitions = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local value, ttl, now, at = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), ARGV[3]
local max_entries, max_bytes, partition = tonumber(ARGV[4]), tonumber(ARGV[5]), ARGV[6]

local evicted = {}
local function forget(k)  -- out of the accounts; the caller deletes the key
  local size = tonumber(redis.call('HGET', sizes, k) or '0')
  redis.call('HDEL', sizes, k)
  redis.call('ZREM', index, k)
  return tonumber(redis.call('DECRBY', bytes_key, size))
end
local function evict(k)
  evicted[#evicted + 1] = k
  return forget(k)
end
if redis.call('HEXISTS', sizes, entry) == 1 then forget(entry) end  -- replaced
redis.call('SET', entry, value, 'EX', ttl)
redis.call('ZADD', index, at, entry)
redis.call('HSET', sizes, entry, #value)
local bytes = tonumber(redis.call('INCRBY', bytes_key, #value))
for _, k in ipairs(redis.call('ZRANGEBYSCORE', index, '-inf', now - ttl, 'LIMIT', 0, 100)) do
  bytes = evict(k)
end
while redis.call('ZCARD', index) > max_entries or bytes > max_bytes do
  local first = redis.call('ZRANGE', index, 0, 0)
  if #first == 0 then break end
  bytes = evict(first[1])
end
redis.call('EXPIRE', index, ttl * 2)
redis.call('EXPIRE', sizes, ttl * 2)
redis.call('EXPIRE', bytes_key, ttl * 2)
redis.call('ZADD', partitions, at, partition)
return evicted
