-- KEYS: a computation lock. ARGV: our token.
-- Delete the lock only if we still hold it: after our TTL ran out it may be someone else's.
if redis.pcall('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
