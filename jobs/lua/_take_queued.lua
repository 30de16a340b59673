-- helper take_queued(intake, batch, key_at, arg_at) -> the ids taken
--
-- The jobs given from KEYS[key_at] on (pairs: job, pending) and ARGV[arg_at] on (their
-- ids) that are still QUEUED become SCHEDULED in `batch`: out of intake (their entries
-- deleted, 1,000 at a time) and out of their tenants' pending sets (one SREM per tenant).
-- Other jobs are left alone. `intake` must be a name bound to a KEYS entry.
local function take_queued(intake, batch, key_at, arg_at)
  local taken, pending, sids = {}, {}, {}
  for i = arg_at, #ARGV do
    local k = key_at + (i - arg_at) * 2
    local job, tk = KEYS[k], KEYS[k + 1]
    local v = redis.call('HMGET', job, 'state', 'sid')
    if v[1] == 'QUEUED' then
      redis.call('HSET', job, 'state', 'SCHEDULED', 'batch', batch, 'sid', '')
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
end
