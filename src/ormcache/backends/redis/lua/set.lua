-- KEYS: entry, n generation keys, n lease keys.
-- ARGV: value, ttl ms (0: none), n, keep spec (need:upto ms, or 0: persist; see keep()), gens...
-- Compare-and-set: stores (1) only if every generation is the snapshot's and no tag is
-- leased, else 0. (The snapshot's generations are usable, so equal ones are too.) The
-- generations then live at least `keep` ms (the entry's TTL and some): long enough for
-- the entry, and not much longer.
local n = tonumber(ARGV[3])
for i = 1, n do
  if redis.pcall('GET', KEYS[1 + i]) ~= ARGV[4 + i] then return 0 end
end
if leased(n + 2, 2 * n + 1) then return 0 end
if ARGV[2] == '0' then
  redis.call('SET', KEYS[1], ARGV[1])
else
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
end
for i = 1, n do
  keep(KEYS[1 + i], ARGV[4])
end
return 1
