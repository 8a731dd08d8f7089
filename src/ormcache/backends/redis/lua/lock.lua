-- KEYS: a computation lock. ARGV: token, ttl ms. 1 if taken, 0 if someone holds it.
-- Every lock we take expires and is a string: a key here without an expiry, or of
-- another type, is not a lock and would block every miss on its key forever, so it goes.
-- So does one that lives far longer than any lock is taken for (ten times ours, and at
-- least a minute: another process may be configured otherwise): every miss on its key
-- would wait for it until it expired.
local pttl = redis.call('PTTL', KEYS[1])
local longest = math.max(10 * tonumber(ARGV[2]), 60000)
if pttl == -1 or pttl > longest
   or (pttl >= 0 and redis.call('TYPE', KEYS[1]).ok ~= 'string') then
  redis.call('DEL', KEYS[1])
end
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then return 1 end
return 0
