-- KEYS: n generation keys, n lease keys. ARGV: fresh, gen ttl ms, n, token.
-- Bump again, then drop this token's lease (after COMMIT or rollback). A lease key of
-- another type holds no lease: it is deleted.
local n = tonumber(ARGV[3])
bump(1, n, ARGV[1], ARGV[2])
for i = n + 1, 2 * n do
  if failed(redis.pcall('ZREM', KEYS[i], ARGV[4])) then redis.call('DEL', KEYS[i]) end
end
return 1
