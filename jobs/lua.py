"""The Lua scripts behind every multi-key Redis update. The caller passes the time in."""

from __future__ import annotations

#: Lua helpers prepended to the scripts that use them. ``intake_add``: a job's intake entry
#: (id, class, tenant, and its deadline when it has one: what the scheduler needs before it
#: loads the job); returns the entry's id. ``count``: adds one to a counter of a table (the
#: counters are summed in Lua and written with one ``HINCRBY`` per field).
_INTAKE_ADD = """
local function intake_add(intake, id, p, t, d)
  if d and d ~= '' then
    return redis.call('XADD', intake, '*', 'id', id, 'p', p, 't', t, 'd', d)
  end
  return redis.call('XADD', intake, '*', 'id', id, 'p', p, 't', t)
end
"""
_COUNT = """
local function count(t, field) t[field] = (t[field] or 0) + 1 end
"""

#: KEYS: job, intake, tenant pending set.
#: ARGV: id, spec JSON, ttl, max pending, priority, tenant, deadline ('' for none).
#: Returns {1, sid} when enqueued, {0, ''} when the job already exists, {-1, ''} over quota.
ENQUEUE = _INTAKE_ADD + """
if redis.call('EXISTS', KEYS[1]) == 1 then return {0, ''} end
local limit = tonumber(ARGV[4])
if limit > 0 and redis.call('SCARD', KEYS[3]) >= limit then return {-1, ''} end
local sid = intake_add(KEYS[2], ARGV[1], ARGV[5], ARGV[6], ARGV[7])
redis.call('HSET', KEYS[1], 'spec', ARGV[2], 'state', 'QUEUED', 'sid', sid)
redis.call('EXPIRE', KEYS[1], ARGV[3])
redis.call('SADD', KEYS[3], ARGV[1])
redis.call('EXPIRE', KEYS[3], ARGV[3])
return {1, sid}
"""

#: KEYS: intake, stats hash, recent stats bucket, then per job: job key, tenant pending set.
#: ARGV: ttl, max pending (0: no limit), publish ('1' or '0'), bucket ttl, then per job: id,
#: spec JSON, priority, tenant, deadline ('' for none), stats label (``tenant|provider|model``,
#: counted when the job is published).
#: Stages jobs (payload written, state STAGED, counted against the tenant's quota, not yet
#: in intake: the scheduler cannot see them) only if every tenant stays within its quota:
#: otherwise writes nothing and returns {-1}. With publish '1' the staged jobs are also
#: published in the same step (as ``PUBLISH`` would: intake entry, QUEUED, counted as
#: submitted), for a submit whose jobs all fit one step. Returns, per job, 1 staged or 0
#: already there (a repeat, or a withdrawn submit's tombstone).
STAGE = _INTAKE_ADD + _COUNT + """
local limit = tonumber(ARGV[2])
local now = ARGV[3] == '1'
local n = (#KEYS - 3) / 2
local new = {}
local adds = {}
for i = 1, n do
  if redis.call('EXISTS', KEYS[2 + 2 * i]) == 0 then
    new[i] = true
    local tk = KEYS[3 + 2 * i]
    adds[tk] = (adds[tk] or 0) + 1
  end
end
if limit > 0 then
  for tk, k in pairs(adds) do
    if redis.call('SCARD', tk) + k > limit then return {-1} end
  end
end
local totals, recent, pending = {}, {}, {}
local out = {}
for i = 1, n do
  local a = 4 + (i - 1) * 6
  local jk = KEYS[2 + 2 * i]
  if new[i] then
    if now then
      local sid = intake_add(KEYS[1], ARGV[a + 1], ARGV[a + 3], ARGV[a + 4], ARGV[a + 5])
      redis.call('HSET', jk, 'spec', ARGV[a + 2], 'state', 'QUEUED', 'sid', sid,
                 'p', ARGV[a + 3], 't', ARGV[a + 4], 'd', ARGV[a + 5], 'm', ARGV[a + 6])
      count(totals, 's|' .. ARGV[a + 3] .. '|' .. ARGV[a + 6])
      count(recent, 's|' .. ARGV[a + 3])
    else
      redis.call('HSET', jk, 'spec', ARGV[a + 2], 'state', 'STAGED',
                 'p', ARGV[a + 3], 't', ARGV[a + 4], 'd', ARGV[a + 5], 'm', ARGV[a + 6])
    end
    redis.call('EXPIRE', jk, ARGV[1])
    local tk = KEYS[3 + 2 * i]
    local members = pending[tk] or {}
    members[#members + 1] = ARGV[a + 1]
    pending[tk] = members
    out[i] = 1
  else
    out[i] = 0
  end
end
for tk, members in pairs(pending) do  -- one SADD per tenant (each is a write to the AOF)
  for j = 1, #members, 1000 do
    redis.call('SADD', tk, unpack(members, j, math.min(j + 999, #members)))
  end
  redis.call('EXPIRE', tk, ARGV[1])
end
for field, k in pairs(totals) do redis.call('HINCRBY', KEYS[2], field, k) end
for field, k in pairs(recent) do redis.call('HINCRBY', KEYS[3], field, k) end
if next(recent) then redis.call('EXPIRE', KEYS[3], ARGV[4]) end
return out
"""

#: KEYS: intake, stats hash, recent stats bucket, then job keys. ARGV: bucket ttl, then
#: job ids. Publishes staged jobs, all in one step: each STAGED job gets its intake entry
#: and becomes QUEUED, and is counted as submitted (``s|class|label`` in the stats hash,
#: ``s|class`` in the bucket). Returns how many were published.
PUBLISH = _INTAKE_ADD + _COUNT + """
local done = 0
local totals, recent = {}, {}
for i = 4, #KEYS do
  local v = redis.call('HMGET', KEYS[i], 'state', 'p', 't', 'd', 'm', 'counted')
  if v[1] == 'STAGED' then
    local sid = intake_add(KEYS[1], ARGV[i - 2], v[2], v[3], v[4])
    redis.call('HSET', KEYS[i], 'state', 'QUEUED', 'sid', sid)
    if not v[6] then  -- a released follower was counted when it arrived
      count(totals, 's|' .. v[2] .. '|' .. (v[5] or (v[3] .. '||')))
      count(recent, 's|' .. v[2])
    end
    done = done + 1
  end
end
for field, n in pairs(totals) do redis.call('HINCRBY', KEYS[2], field, n) end
for field, n in pairs(recent) do redis.call('HINCRBY', KEYS[3], field, n) end
if done > 0 then redis.call('EXPIRE', KEYS[3], ARGV[1]) end
return done
"""

#: KEYS: intake, then per job: job key, tenant pending set. ARGV: tombstone ttl, then ids.
#: Undoes a submit that failed: a job not yet taken by the scheduler (STAGED or QUEUED)
#: is withdrawn; a job Redis does not hold gets a tombstone, so a late copy of the submit
#: cannot create it. Either way it is left as state WITHDRAWN, and never runs. Returns,
#: per job, 'WITHDRAWN', or the state of a job already in motion or final.
WITHDRAW = """
local out = {}
for i = 1, (#KEYS - 1) / 2 do
  local jk = KEYS[2 * i]
  local v = redis.call('HMGET', jk, 'state', 'sid')
  local st = v[1]
  if not st or st == 'STAGED' or st == 'QUEUED' or st == 'WITHDRAWN' or st == 'FOLLOWING' then
    if v[2] then redis.call('XDEL', KEYS[1], v[2]) end
    redis.call('DEL', jk)
    redis.call('HSET', jk, 'state', 'WITHDRAWN')
    redis.call('EXPIRE', jk, ARGV[1])
    redis.call('SREM', KEYS[2 * i + 1], ARGV[i + 1])
    out[i] = 'WITHDRAWN'
  else
    out[i] = st
  end
end
return out
"""

#: KEYS: lease, outbox, inflight, intake, then (job, tenant pending set) pairs.
#: ARGV: lease token, batch id, batch meta JSON, now, in-flight member, then job ids.
#: Claims the jobs still QUEUED for the batch, takes them out of intake, records the batch
#: in the outbox (until the scheduler confirms it sent the batch, ``ack_sent``; a new
#: scheduler re-sends what it holds) and counts it in flight (before it is sent, so a fast
#: worker's "done" always comes after), only while the caller holds the lease (fencing).
#: Returns the claimed ids, or -1 without the lease.
CLAIM = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return -1 end
local claimed = {}
local pending = {}
local sids = {}
for i = 6, #ARGV do
  local jk = KEYS[5 + (i - 6) * 2]
  local tk = KEYS[6 + (i - 6) * 2]
  local v = redis.call('HMGET', jk, 'state', 'sid')
  if v[1] == 'QUEUED' then
    redis.call('HSET', jk, 'state', 'SCHEDULED', 'batch', ARGV[2], 'sid', '')
    if v[2] and v[2] ~= '' then sids[#sids + 1] = v[2] end
    local left = pending[tk] or {}
    left[#left + 1] = ARGV[i]
    pending[tk] = left
    claimed[#claimed + 1] = ARGV[i]
  end
end
for tk, ids in pairs(pending) do redis.call('SREM', tk, unpack(ids)) end
for i = 1, #sids, 1000 do
  redis.call('XDEL', KEYS[4], unpack(sids, i, math.min(i + 999, #sids)))
end
if #claimed > 0 then
  redis.call('HSET', KEYS[2], ARGV[2], ARGV[3] .. '\\n' .. table.concat(claimed, ','))
  redis.call('ZADD', KEYS[3], ARGV[4], ARGV[5])
end
return claimed
"""

#: KEYS: lease, intake, then (job, tenant pending set) pairs. ARGV: lease token, marker
#: batch id, then job ids. Takes jobs still QUEUED out of intake to expire them, fenced by
#: the lease like a claim (a paused former scheduler must not expire jobs its successor
#: sent): each becomes SCHEDULED in the marker batch (never in flight, so should the
#: caller die before storing the EXPIRED results, the reconciler puts them back and they
#: expire again). Returns the ids taken, or -1 without the lease.
TAKE_TO_EXPIRE = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return -1 end
local taken, pending, sids = {}, {}, {}
for i = 3, #ARGV do
  local jk = KEYS[3 + (i - 3) * 2]
  local tk = KEYS[4 + (i - 3) * 2]
  local v = redis.call('HMGET', jk, 'state', 'sid')
  if v[1] == 'QUEUED' then
    redis.call('HSET', jk, 'state', 'SCHEDULED', 'batch', ARGV[2], 'sid', '')
    if v[2] and v[2] ~= '' then sids[#sids + 1] = v[2] end
    local left = pending[tk] or {}
    left[#left + 1] = ARGV[i]
    pending[tk] = left
    taken[#taken + 1] = ARGV[i]
  end
end
for tk, ids in pairs(pending) do redis.call('SREM', tk, unpack(ids)) end
for i = 1, #sids, 1000 do
  redis.call('XDEL', KEYS[2], unpack(sids, i, math.min(i + 999, #sids)))
end
return taken
"""

#: KEYS: job, intake, tenant pending set, lease. ARGV: id, batch id, priority, tenant,
#: deadline ('' for none), lease token ('' for a tool run without a scheduler).
#: Puts a job that is still SCHEDULED or RUNNING in ``batch id`` (a batch that is no
#: longer in flight: its task was lost) back into intake, only while the caller holds the
#: lease (a paused former scheduler must not re-enqueue what its successor sent). Returns
#: 1 if it did, -1 without the lease.
REQUEUE = _INTAKE_ADD + """
if ARGV[6] ~= '' and redis.call('GET', KEYS[4]) ~= ARGV[6] then return -1 end
local v = redis.call('HMGET', KEYS[1], 'state', 'batch')
if (v[1] ~= 'SCHEDULED' and v[1] ~= 'RUNNING') or v[2] ~= ARGV[2] then return 0 end
local sid = intake_add(KEYS[2], ARGV[1], ARGV[3], ARGV[4], ARGV[5])
redis.call('HSET', KEYS[1], 'state', 'QUEUED', 'sid', sid)
redis.call('HDEL', KEYS[1], 'batch')
redis.call('SADD', KEYS[3], ARGV[1])
return 1
"""

#: KEYS: job keys. ARGV: batch id. Marks the jobs that belong to this batch (SCHEDULED
#: for it, or RUNNING in it: a re-delivery) RUNNING; returns, per key, the state found,
#: or 'OTHER' for a job that belongs to another batch (so the caller skips it: a job runs
#: only in the batch that claimed it), followed by the job's spec when it is now RUNNING
#: (else false): a flat list, two items per key.
MARK_RUNNING = """
local out = {}
for i = 1, #KEYS do
  local v = redis.call('HMGET', KEYS[i], 'state', 'batch', 'spec')
  local st, owner = v[1], v[2]
  if (st == 'SCHEDULED' or st == 'RUNNING') and owner == ARGV[1] then
    redis.call('HSET', KEYS[i], 'state', 'RUNNING')
    out[2 * i - 1] = 'RUNNING'
    out[2 * i] = v[3]
  else
    if (st == 'SCHEDULED' or st == 'RUNNING') then st = 'OTHER' end
    out[2 * i - 1] = st or ''
    out[2 * i] = false
  end
end
return out
"""

#: KEYS: in-flight set, then job keys. ARGV: old batch id, now, then per job: new batch
#: id, new in-flight member. Moves each job still SCHEDULED or RUNNING in the old batch to
#: its new batch (SCHEDULED) and counts the new batch in flight. Returns, per job, 1 if
#: moved.
REASSIGN = """
local out = {}
for i = 2, #KEYS do
  local v = redis.call('HMGET', KEYS[i], 'state', 'batch')
  local j = (i - 2) * 2
  if (v[1] == 'SCHEDULED' or v[1] == 'RUNNING') and v[2] == ARGV[1] then
    redis.call('HSET', KEYS[i], 'state', 'SCHEDULED', 'batch', ARGV[3 + j])
    redis.call('ZADD', KEYS[1], ARGV[2], ARGV[4 + j])
    out[#out + 1] = 1
  else
    out[#out + 1] = 0
  end
end
return out
"""

#: The second half of ``START_RUN`` (KEYS[1]: deliveries hash; ARGV: the task's retry
#: number, ttl). Counts one delivery of the batch's message with that retry number; returns how many
#: deliveries followed a lost worker: a message delivered again with the same retry
#: number was not finished by the worker that had it (a retry the task asked for itself,
#: after a Redis or SQL error, carries the next number and is not counted).
COUNT_DELIVERY = """
redis.call('HINCRBY', KEYS[1], ARGV[1], 1)
redis.call('EXPIRE', KEYS[1], ARGV[2])
local lost = 0
for _, n in ipairs(redis.call('HVALS', KEYS[1])) do lost = lost + tonumber(n) - 1 end
return lost
"""

#: KEYS: job keys. Returns each job's spec, state and batch (false where missing): a
#: flat list, three items per key.
LOAD = """
local out = {}
for i = 1, #KEYS do
  local v = redis.call('HMGET', KEYS[i], 'spec', 'state', 'batch')
  out[3 * i - 2], out[3 * i - 1], out[3 * i] = v[1], v[2], v[3]
end
return out
"""

#: KEYS: keys. Returns the (1-based) positions of the keys that do not exist.
MISSING = """
local out = {}
for i = 1, #KEYS do
  if redis.call('EXISTS', KEYS[i]) == 0 then out[#out + 1] = i end
end
return out
"""

#: KEYS: deliveries hash, the batch's run key, in-flight set. ARGV: the task's retry
#: number, ttl, send id, now, the batch's in-flight member.
#: The start of a batch task: whether this send may run (the first send to arrive wins, and
#: a re-delivery of that same send, after a worker died, runs again; else -1), and if so
#: its in-flight entry is refreshed to now (a batch that waited in the broker, or was
#: delivered again after a lost worker, is not taken for lost while it runs) and
#: ``COUNT_DELIVERY``'s count is returned, in one step.
START_RUN = """
local won = redis.call('SET', KEYS[2], ARGV[3], 'NX', 'EX', ARGV[2])
if not won and redis.call('GET', KEYS[2]) ~= ARGV[3] then return -1 end
redis.call('ZADD', KEYS[3], ARGV[4], ARGV[5])
""" + COUNT_DELIVERY

#: KEYS: intake, stats hash, recent stats bucket, stream of stored ids, then per job: job,
#: celery result key, tenant pending set, the job's output stream. ARGV: result ttl, job
#: key ttl, bucket ttl, the oldest entry id the stream of stored ids keeps (a time in
#: ms: ``MINID``), a job stream's length, then per job: id,
#: Celery meta JSON, final state, class ('' to read it from the job), stats label
#: (``tenant|provider|model``; the one the job was counted under when submitted wins),
#: missed its deadline ('1' or '0').
#: Stores each result unless one exists (first wins), publishes it for Celery's result
#: consumer, records the final state, drops the job from intake, ends the job's output
#: stream (an ``end`` entry with the state, when the job has a stream) and counts it as
#: finished (``f|state|class|label``, and ``m|class|label`` when it missed its deadline;
#: ``f|state|class`` and ``m|class`` in the bucket): a result is counted where it is
#: stored, once, under the labels it was counted under as submitted. The ids stored go
#: to the stream of stored ids in one entry. Returns, per job, 1 if its result was
#: stored (the cache key it leads, for a job identical requests wait for), else 0.
FINISH_MANY = _COUNT + """
local out = {}
local done = {}
local totals, recent, pending = {}, {}, {}
for i = 1, (#KEYS - 4) / 4 do
  local jk, rk, tk, sk = KEYS[4 * i + 1], KEYS[4 * i + 2], KEYS[4 * i + 3], KEYS[4 * i + 4]
  local a = 5 + (i - 1) * 6
  if redis.call('SET', rk, ARGV[a + 2], 'NX', 'EX', ARGV[1]) then
    done[#done + 1] = ARGV[a + 1]
    redis.call('PUBLISH', rk, ARGV[a + 2])
    local v = redis.call('HMGET', jk, 'sid', 'p', 'leads', 'm')
    if v[1] and v[1] ~= '' then  -- still in intake ('' once claimed)
      redis.call('XDEL', KEYS[1], v[1])
      redis.call('HDEL', jk, 'sid')
    end
    local cls = ARGV[a + 4]
    if cls == '' then cls = v[2] or '' end
    local label = v[4] or ARGV[a + 5]
    redis.call('HSET', jk, 'state', ARGV[a + 3])
    redis.call('EXPIRE', jk, ARGV[2])
    if redis.call('EXISTS', sk) == 1 then
      redis.call('XADD', sk, 'MAXLEN', '~', ARGV[5], '*', 'end', ARGV[a + 3])
    end
    local members = pending[tk] or {}
    members[#members + 1] = ARGV[a + 1]
    pending[tk] = members
    count(totals, 'f|' .. ARGV[a + 3] .. '|' .. cls .. '|' .. label)
    count(recent, 'f|' .. ARGV[a + 3] .. '|' .. cls)
    if ARGV[a + 6] == '1' then
      count(totals, 'm|' .. cls .. '|' .. label)
      count(recent, 'm|' .. cls)
    end
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
for field, n in pairs(totals) do redis.call('HINCRBY', KEYS[2], field, n) end
for field, n in pairs(recent) do redis.call('HINCRBY', KEYS[3], field, n) end
redis.call('EXPIRE', KEYS[3], ARGV[3])
if #done > 0 then
  redis.call('XADD', KEYS[4], 'MINID', '~', ARGV[4], '*', 'ids', table.concat(done, ','))
end
return out
"""

#: KEYS: job, events stream. ARGV: id.
#: Marks a STAGED, QUEUED, SCHEDULED or FOLLOWING job CANCELLED and tells the scheduler.
#: Returns the state found ('' when the job is unknown to Redis).
CANCEL = """
local st = redis.call('HGET', KEYS[1], 'state')
if not st then return '' end
if st == 'STAGED' or st == 'QUEUED' or st == 'SCHEDULED' or st == 'FOLLOWING' then
  redis.call('HSET', KEYS[1], 'state', 'CANCELLED')
  redis.call('XADD', KEYS[2], 'MAXLEN', '~', '100000', '*', 'cancel', ARGV[1])
end
return st
"""

#: KEYS: lease. ARGV: token, ttl ms. Takes the lease if free or already ours, and renews
#: it. Returns 1 when held.
LEASE = """
local holder = redis.call('GET', KEYS[1])
if holder == false then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
if holder == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0
"""

#: KEYS: lease. ARGV: token. Gives the lease up if held.
RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""

#: KEYS: token buckets. ARGV: per bucket: capacity, refill per second, cost.
#: Takes ``cost`` from every bucket if all have enough; otherwise takes nothing and
#: returns the seconds until they will (as a string: Lua numbers become integers). The
#: time is the server's (``TIME``), so workers with skewed clocks share one refill rate.
TAKE_TOKENS = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local wait = 0
local state = {}
for i = 1, #KEYS do
  local cap = tonumber(ARGV[1 + (i - 1) * 3])
  local rate = tonumber(ARGV[2 + (i - 1) * 3])
  local cost = math.min(tonumber(ARGV[3 + (i - 1) * 3]), cap)
  local v = redis.call('HMGET', KEYS[i], 'tokens', 'ts')
  local tokens = tonumber(v[1]) or cap
  local ts = tonumber(v[2]) or now
  tokens = math.min(cap, tokens + math.max(0, now - ts) * rate)
  if tokens < cost then wait = math.max(wait, (cost - tokens) / rate) end
  state[i] = {tokens, cost, math.ceil(cap / rate) * 2 + 1}
end
for i = 1, #KEYS do
  local tokens = state[i][1]
  if wait == 0 then tokens = tokens - state[i][2] end
  redis.call('HSET', KEYS[i], 'tokens', tostring(tokens), 'ts', tostring(now))
  redis.call('EXPIRE', KEYS[i], state[i][3])
end
return tostring(wait)
"""


#: KEYS: entry, partition index, partition sizes, partition bytes, the partitions' registry.
#: ARGV: entry JSON, ttl, now, most entries, most bytes, partition name. Stores a cached
#: result, registers its partition (so a purge finds it without a keyspace scan) and keeps
#: the partition within its bounds: entries past their ttl leave its accounts, then the
#: oldest go until it fits. (The evicted entries' keys are read from the index.)
CACHE_PUT = """
local function drop(k)
  local size = tonumber(redis.call('HGET', KEYS[3], k) or '0')
  redis.call('HDEL', KEYS[3], k)
  redis.call('ZREM', KEYS[2], k)
  redis.call('DEL', k)
  return tonumber(redis.call('DECRBY', KEYS[4], size))
end
if redis.call('HEXISTS', KEYS[3], KEYS[1]) == 1 then drop(KEYS[1]) end
redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
redis.call('ZADD', KEYS[2], ARGV[3], KEYS[1])
redis.call('HSET', KEYS[3], KEYS[1], #ARGV[1])
local bytes = tonumber(redis.call('INCRBY', KEYS[4], #ARGV[1]))
local cutoff = tonumber(ARGV[3]) - tonumber(ARGV[2])
for _, k in ipairs(redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', cutoff, 'LIMIT', 0, 100)) do
  bytes = drop(k)
end
while redis.call('ZCARD', KEYS[2]) > tonumber(ARGV[4]) or bytes > tonumber(ARGV[5]) do
  local first = redis.call('ZRANGE', KEYS[2], 0, 0)
  if #first == 0 then break end
  bytes = drop(first[1])
end
for i = 2, 4 do redis.call('EXPIRE', KEYS[i], tonumber(ARGV[2]) * 2) end
redis.call('ZADD', KEYS[5], ARGV[3], ARGV[6])
return bytes
"""

#: KEYS: lead, followers, job, stats hash, recent bucket. ARGV: job id, ttl, bucket ttl,
#: class, stats label, cache key. Coalescing: the first job of a key leads (its provider
#: call serves the others); a job that finds a leader follows it (state FOLLOWING: it is
#: not published to intake, and is counted as submitted now). Returns the leader's id.
COALESCE = """
local leader = redis.call('GET', KEYS[1])
if not leader or leader == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
  redis.call('HSET', KEYS[3], 'leads', ARGV[6])
  return ARGV[1]
end
if redis.call('HGET', KEYS[3], 'state') ~= 'STAGED' then return ARGV[1] end
redis.call('SADD', KEYS[2], ARGV[1])
redis.call('EXPIRE', KEYS[2], ARGV[2])
redis.call('HSET', KEYS[3], 'state', 'FOLLOWING', 'lead', leader, 'key', ARGV[6],
           'counted', '1')
redis.call('HINCRBY', KEYS[4], 's|' .. ARGV[4] .. '|' .. ARGV[5], 1)
redis.call('HINCRBY', KEYS[5], 's|' .. ARGV[4], 1)
redis.call('EXPIRE', KEYS[5], ARGV[3])
return leader
"""

#: KEYS: lead, followers. ARGV: the leader's id. The leader is final: it leads no more,
#: and its followers are handed over (returned) and forgotten.
TAKE_FOLLOWERS = """
if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[1]) end
local out = redis.call('SMEMBERS', KEYS[2])
redis.call('DEL', KEYS[2])
return out
"""

#: KEYS: job keys. Followers whose leader failed go back to STAGED (to be published and
#: run on their own). Returns, per job, 1 if released.
RELEASE_FOLLOWERS = """
local out = {}
for i = 1, #KEYS do
  if redis.call('HGET', KEYS[i], 'state') == 'FOLLOWING' then
    redis.call('HSET', KEYS[i], 'state', 'STAGED')
    redis.call('HDEL', KEYS[i], 'lead')
    out[i] = 1
  else
    out[i] = 0
  end
end
return out
"""


#: Results of jobs answered at submit: one SET with expiry per key, in one call.
#: KEYS: the result keys; ARGV[1]: the TTL in seconds; ARGV[1 + i]: the value of KEYS[i].
SET_RESULTS = """
local ttl = ARGV[1]
for i, key in ipairs(KEYS) do
  redis.call('SET', key, ARGV[i + 1], 'EX', ttl)
end
return #KEYS
"""
