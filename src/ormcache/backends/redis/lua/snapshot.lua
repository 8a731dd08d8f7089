-- KEYS: n generation keys, then n lease keys. ARGV: fresh value, generation ttl ms, n.
-- The current generations, or nil while a tag is leased. A generation that is missing
-- or unusable starts over at the fresh value, which no entry can have recorded.
local n = tonumber(ARGV[3])
if leased(n + 1, 2 * n) then return false end
local out = {}
for i = 1, n do
  local g = redis.pcall('GET', KEYS[i])
  if not usable(g) then
    g = ARGV[1]
    redis.call('SET', KEYS[i], g, 'PX', ARGV[2])
  end
  out[i] = g
end
return out
