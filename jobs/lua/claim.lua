-- claim: the scheduler takes jobs for a batch it is about to send.
--
-- KEYS  lease, outbox, inflight, intake, then per job: job, pending (its tenant's set)
-- ARGV  token (the caller's lease), batch (id), meta (the batch's JSON), now,
--       member (the batch's in-flight member), then the jobs' ids
-- Moves QUEUED -> SCHEDULED (in this batch); any other state is skipped
-- Guarantees fenced by the lease: a paused former scheduler claims nothing. The batch is
--       in the outbox until the scheduler confirms it sent it (a new scheduler re-sends
--       what it holds) and in flight before it is sent (so a fast worker's "done"
--       always comes after). A job is in at most one batch.
-- Returns the ids claimed, or -1 without the lease.
local lease, outbox, inflight, intake = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local token, batch, meta, now, member = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5]

if redis.call('GET', lease) ~= token then return -1 end
local claimed = {}
local pending = {}
local sids = {}
for i = 6, #ARGV do
  local job, tk = KEYS[5 + (i - 6) * 2], KEYS[6 + (i - 6) * 2]
  local v = redis.call('HMGET', job, 'state', 'sid')
  if v[1] == 'QUEUED' then
    redis.call('HSET', job, 'state', 'SCHEDULED', 'batch', batch, 'sid', '')
    if v[2] and v[2] ~= '' then sids[#sids + 1] = v[2] end
    local left = pending[tk] or {}
    left[#left + 1] = ARGV[i]
    pending[tk] = left
    claimed[#claimed + 1] = ARGV[i]
  end
end
for tk, ids in pairs(pending) do redis.call('SREM', tk, unpack(ids)) end
for i = 1, #sids, 1000 do
  redis.call('XDEL', intake, unpack(sids, i, math.min(i + 999, #sids)))
end
if #claimed > 0 then
  redis.call('HSET', outbox, batch, meta .. '\n' .. table.concat(claimed, ','))
  redis.call('ZADD', inflight, now, member)
end
return claimed
