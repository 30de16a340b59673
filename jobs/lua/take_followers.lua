-- take_followers: a leader is final; its followers are handed over to be answered with
-- its result (or released) and it leads no more.
--
-- KEYS  lead (the key's leader), followers (the leader's followers)
-- ARGV  id (the leader's)
-- Moves nothing (finish_many or release_followers moves the followers)
-- Guarantees the followers are handed over once: the set is deleted as it is read.
-- Returns the followers' ids.
local lead, followers = KEYS[1], KEYS[2]
local id = ARGV[1]

if redis.call('GET', lead) == id then redis.call('DEL', lead) end
local out = redis.call('SMEMBERS', followers)
redis.call('DEL', followers)
return out
