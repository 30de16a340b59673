-- helpers: the counters. The one place their fields are written (jobs/stats.py reads
-- them). In the stats hash (pb:stats), since the start, by class and label
-- (tenant|provider|model):
--   s|class|label          submitted
--   f|state|class|label    finished, by final state
--   m|class|label          finished after its deadline (missed)
--   c|kind|class|label     answered without a provider call of its own (kind: exact,
--                          semantic, coalesced)
--   $|tenant|provider|model  US dollars spent (HINCRBYFLOAT; the deployment that answered)
--   v|reason|tenant          US dollars saved, by reason (exact_cache, coalesced,
--                            semantic_cache, prefix_cache, batch_discount)
-- and in the recent bucket (pb:recent:{bucket}, 10 s): s|class, f|state|class, m|class.
--
-- Scripts count into Lua tables and write each field once (one HINCRBY per field, each
-- a write to the AOF) with add_counts.
local function count(t, field) t[field] = (t[field] or 0) + 1 end

local function count_submitted(totals, recent, class, label)
  count(totals, 's|' .. class .. '|' .. label)
  count(recent, 's|' .. class)
end

local function count_finished(totals, recent, state, class, label)
  count(totals, 'f|' .. state .. '|' .. class .. '|' .. label)
  count(recent, 'f|' .. state .. '|' .. class)
end

local function count_missed(totals, recent, class, label)
  count(totals, 'm|' .. class .. '|' .. label)
  count(recent, 'm|' .. class)
end

local function count_hit(totals, kind, class, label)
  count(totals, 'c|' .. kind .. '|' .. class .. '|' .. label)
end

local function add_counts(key, t)
  for field, n in pairs(t) do redis.call('HINCRBY', key, field, n) end
end

-- money: fields and amounts as 'field\tamount' lines (built by jobs/steps/results.py)
local function count_money(t, money)
  for field, amount in string.gmatch(money, '([^\t\n]+)\t([^\n]+)') do
    t[field] = (t[field] or 0) + tonumber(amount)
  end
end

local function add_floats(key, t)
  for field, x in pairs(t) do redis.call('HINCRBYFLOAT', key, field, tostring(x)) end
end
