-- take_to_expire: the scheduler takes jobs whose deadline passed out of intake, to store
-- their EXPIRED results.
--
-- KEYS  lease, intake, then per job: job, pending (its tenant's set)
-- ARGV  token (the caller's lease), marker (a batch id no batch has), then the jobs' ids
-- Moves QUEUED -> SCHEDULED (in the marker batch, never in flight: should the caller die
--       before storing the results, the reconciler puts them back and they expire again)
-- Guarantees fenced by the lease, like a claim: a paused former scheduler must not
--       expire jobs its successor sent.
-- Returns the ids taken, or -1 without the lease.
local lease, intake = KEYS[1], KEYS[2]
local token, marker = ARGV[1], ARGV[2]

if redis.call('GET', lease) ~= token then return -1 end
local taken, pending, sids = {}, {}, {}
for i = 3, #ARGV do
  local job, tk = KEYS[3 + (i - 3) * 2], KEYS[4 + (i - 3) * 2]
  local v = redis.call('HMGET', job, 'state', 'sid')
  if v[1] == 'QUEUED' then
    redis.call('HSET', job, 'state', 'SCHEDULED', 'batch', marker, 'sid', '')
    if v[2] and v[2] ~= '' then sids[#sids + 1] = v[2] end
    local left = pending[tk] or {}
    left[#left + 1] = ARGV[i]
    pending[tk] = left
    taken[#taken + 1] = ARGV[i]
  end
end
for tk, ids in pairs(pending) do redis.call('SREM', tk, unpack(ids)) end
for i = 1, #sids, 1000 do
  redis.call('XDEL', intake, unpack(sids, i, math.min(i + 999, #sids)))
end
return taken
