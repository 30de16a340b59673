-- helper intake_add(intake, id, class, tenant, deadline) -> entry id
--
-- Appends a job's intake entry: its id, class and tenant, and its deadline when it has
-- one (what the scheduler needs before it loads the job). `intake` must be a name bound
-- to a KEYS entry by the including script.
local function intake_add(intake, id, p, t, d)
  if d and d ~= '' then
    return redis.call('XADD', intake, '*', 'id', id, 'p', p, 't', t, 'd', d)
  end
  return redis.call('XADD', intake, '*', 'id', id, 'p', p, 't', t)
end
