-- helper count(table, field)
--
-- Adds one to a counter of a Lua table. Scripts count in tables and write each field
-- once (one HINCRBY per field, each a write to the AOF), through `add_counts`.
local function count(t, field) t[field] = (t[field] or 0) + 1 end

local function add_counts(key, t)
  for field, n in pairs(t) do redis.call('HINCRBY', key, field, n) end
end
