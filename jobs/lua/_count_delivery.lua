-- helper count_delivery(deliveries, retry, ttl, new) -> deliveries that followed a lost worker
--
-- Counts one delivery of a batch's message with its retry number (when ``new``: a
-- delivery starting again is not counted twice). A message delivered again with the same
-- retry number was not finished by the worker that had it; a retry the task asked for
-- itself (after a Redis or SQL error) carries the next number and is not counted as lost.
local function count_delivery(deliveries, retry, ttl, new)
  if new then
    redis.call('HINCRBY', deliveries, retry, 1)
    redis.call('EXPIRE', deliveries, ttl)
  end
  local lost = 0
  for _, n in ipairs(redis.call('HVALS', deliveries)) do lost = lost + tonumber(n) - 1 end
  return lost
end
