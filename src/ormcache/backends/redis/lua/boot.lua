-- KEYS: the namespace's boot key, the namespace generation key. ARGV: fresh, gen ttl ms.
-- Run on every new connection before its first command. A server whose run id differs
-- from the one the boot key holds has restarted (or is another server: a failover)
-- since the namespace last checked, and may have loaded an older RDB or AOF, whose
-- generations are older than bumps it acknowledged: every entry is then suspect, so
-- the namespace is bumped. A missing boot key (a server that came back empty, an
-- evicted key) bumps too: nothing is lost by it. Returns 1 if it bumped, 0 if not, -1
-- if the server refused INFO (an ACL user without it: no check; `ormcache ping` warns).
local info = redis.pcall('INFO', 'server')
if type(info) ~= 'string' then return -1 end
local id = string.match(info, 'run_id:(%x+)')
if not id then return -1 end
if redis.pcall('GET', KEYS[1]) == id then return 0 end
bump(2, 2, ARGV[1], ARGV[2])
redis.pcall('SET', KEYS[1], id)
return 1
