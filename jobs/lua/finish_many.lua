-- finish_many: store jobs' results. Every path that makes a job final ends here.
--
-- KEYS  intake, stats, recent (the stats bucket of this minute), stored (the stream of
--       stored ids), then per job (4 each): job, result (its Celery result key),
--       pending (its tenant's set), stream (its output stream)
-- ARGV  result_ttl, job_ttl, bucket_ttl, stored_minid (the oldest entry id the stream of
--       stored ids keeps: a time in ms), stream_len (a job stream's length),
--       then per job (9 each): id, meta (the Celery meta JSON), state (the final state),
--       class ('' to read it from the job), label (tenant|provider|model; the one the
--       job was counted under as submitted wins), missed ('1' when it missed its
--       deadline), submitted ('1' for a job answered at its submit: it has no job hash,
--       and is counted as submitted here), hit (the cache that answered it: exact,
--       semantic, coalesced; '' for none), money (what it spent and saved: 'field\tUSD'
--       lines of the stats hash's $ and v fields; '' for none)
-- Moves any state -> the final state given (SUCCEEDED, FAILED, EXPIRED, CANCELLED)
-- Guarantees first write wins: a job's result is stored once; only then is it published
--       for Celery's result consumer, dropped from intake and its tenant's pending set,
--       its output stream ended (an `end` entry with the state, when the job has a
--       stream), and counted as finished (f|state|class|label, and, when it missed its
--       deadline, m|class|label; a cache hit, c|kind|class|label; see _count) under
--       the labels it was counted under as submitted, and its money ($ and v fields): a
--       result is counted where it is stored, once. The ids stored go to the stream of stored ids in one entry.
-- Returns per job 0 (a result was there), else 1, or the cache key it leads (identical
--       requests wait for it).
--@include _count
local intake, stats, recent_key, stored = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local result_ttl, job_ttl, bucket_ttl, stored_minid, stream_len =
  ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5]

local out = {}
local done = {}
local totals, recent, pending, money = {}, {}, {}, {}
for i = 1, (#KEYS - 4) / 4 do
  local job, result, tk, stream = KEYS[4 * i + 1], KEYS[4 * i + 2], KEYS[4 * i + 3], KEYS[4 * i + 4]
  local a = 5 + (i - 1) * 9
  local id, meta, state, class, label, missed, submitted, hit, spent =
    ARGV[a + 1], ARGV[a + 2], ARGV[a + 3], ARGV[a + 4], ARGV[a + 5], ARGV[a + 6],
    ARGV[a + 7], ARGV[a + 8], ARGV[a + 9]
  if redis.call('SET', result, meta, 'NX', 'EX', result_ttl) then
    done[#done + 1] = id
    redis.call('PUBLISH', result, meta)
    local v = redis.call('HMGET', job, 'sid', 'p', 'leads', 'label')
    if v[1] and v[1] ~= '' then  -- still in intake ('' once claimed)
      redis.call('XDEL', intake, v[1])
      redis.call('HDEL', job, 'sid')
    end
    if class == '' then class = v[2] or '' end
    label = v[4] or label
    if submitted ~= '1' then  -- a job answered at its submit has no hash to update
      redis.call('HSET', job, 'state', state)
      redis.call('EXPIRE', job, job_ttl)
    end
    if redis.call('EXISTS', stream) == 1 then
      redis.call('XADD', stream, 'MAXLEN', '~', stream_len, '*', 'end', state)
    end
    local members = pending[tk] or {}
    members[#members + 1] = id
    pending[tk] = members
    if submitted == '1' then count_submitted(totals, recent, class, label) end
    count_finished(totals, recent, state, class, label)
    if missed == '1' then count_missed(totals, recent, class, label) end
    if hit ~= '' then count_hit(totals, hit, class, label) end
    if spent ~= '' then count_money(money, spent) end
    out[i] = v[3] or 1
  else
    out[i] = 0
  end
end
for tk, members in pairs(pending) do  -- one SREM per tenant (each is a write to the AOF)
  for j = 1, #members, 1000 do
    redis.call('SREM', tk, unpack(members, j, math.min(j + 999, #members)))
  end
end
add_counts(stats, totals)
add_floats(stats, money)
add_counts(recent_key, recent)
redis.call('EXPIRE', recent_key, bucket_ttl)
if #done > 0 then
  redis.call('XADD', stored, 'MINID', '~', stored_minid, '*', 'ids', table.concat(done, ','))
end
return out
