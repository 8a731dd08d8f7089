-- KEYS: n generation keys, n lease keys. ARGV: fresh, gen ttl ms, n, token, lease ttl ms.
-- Bump, then lease each tag to the token until now + lease ttl (before COMMIT). A lease
-- key of another type holds no lease: it is replaced.
local n = tonumber(ARGV[3])
bump(1, n, ARGV[1], ARGV[2])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[5])
for i = n + 1, 2 * n do
  if failed(redis.pcall('ZADD', KEYS[i], now + ttl, ARGV[4])) then
    redis.call('DEL', KEYS[i])
    redis.call('ZADD', KEYS[i], now + ttl, ARGV[4])
  end
  if redis.call('PTTL', KEYS[i]) < ttl then redis.call('PEXPIRE', KEYS[i], ttl) end
end
return 1
