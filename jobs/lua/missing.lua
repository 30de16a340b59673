-- missing: which of these keys do not exist (the reconciler's check of jobs and results).
--
-- KEYS  the keys
-- ARGV  (none)
-- Moves nothing
-- Returns the 1-based positions of the keys that do not exist.
local out = {}
for i = 1, #KEYS do
  local key = KEYS[i]
  if redis.call('EXISTS', key) == 0 then out[#out + 1] = i end
end
return out
