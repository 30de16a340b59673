-- stage: the first half of a submit. Writes the jobs' payloads, counted against their
-- tenants' quotas but invisible to the scheduler until `publish` (with publish = '1',
-- published in the same step: a submit whose jobs all fit one call).
--
-- KEYS  intake, stats, recent (the stats bucket of this minute),
--       then per job: job, pending (its tenant's pending set)
-- ARGV  ttl, max_pending (0: no limit), publish ('1' or '0'), bucket_ttl,
--       then per job (6 each): id, spec (JSON), class, tenant, deadline ('' none),
--       label (tenant|provider|model: the counters' label)
-- Moves (none) -> STAGED, or (none) -> QUEUED with publish = '1'
-- Guarantees all or nothing against the quota: if any tenant would exceed max_pending,
--       nothing is written. A job that exists (a repeat, or a withdrawn submit's
--       tombstone) is left alone. A published job is counted as submitted once
--       (s|class|label in stats, s|class in recent).
-- Returns {-1} over the quota, else per job 1 staged (or published) or 0 already there.
--
-- The job hash (pb:job:{id}) written here: spec, state, p (class), t (tenant), d (deadline),
-- label (tenant|provider|model, what the job is counted under), and sid (its intake entry,
-- when published). Later steps add batch (claim), leads / lead / key / counted (coalesce).
--@include _intake_add
--@include _count
local intake, stats, recent_key = KEYS[1], KEYS[2], KEYS[3]
local ttl, limit, publish_now, bucket_ttl = ARGV[1], tonumber(ARGV[2]), ARGV[3] == '1', ARGV[4]
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
  local id, spec, class, tenant, deadline, label =
    ARGV[a + 1], ARGV[a + 2], ARGV[a + 3], ARGV[a + 4], ARGV[a + 5], ARGV[a + 6]
  local jk, tk = KEYS[2 + 2 * i], KEYS[3 + 2 * i]
  if new[i] then
    if publish_now then
      local sid = intake_add(intake, id, class, tenant, deadline)
      redis.call('HSET', jk, 'spec', spec, 'state', 'QUEUED', 'sid', sid,
                 'p', class, 't', tenant, 'd', deadline, 'label', label)
      count_submitted(totals, recent, class, label)
    else
      redis.call('HSET', jk, 'spec', spec, 'state', 'STAGED',
                 'p', class, 't', tenant, 'd', deadline, 'label', label)
    end
    redis.call('EXPIRE', jk, ttl)
    local members = pending[tk] or {}
    members[#members + 1] = id
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
  redis.call('EXPIRE', tk, ttl)
end
add_counts(stats, totals)
add_counts(recent_key, recent)
if next(recent) then redis.call('EXPIRE', recent_key, bucket_ttl) end
return out
