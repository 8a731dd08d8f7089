-- KEYS: the entry. ARGV: the generation key prefix.
-- The entry if it parses and every generation it recorded is current, else nil.
local v = redis.call('GET', KEYS[1])
if not v or #v < 6 or string.sub(v, 1, 4) ~= 'OCE1' then return false end
local hl = string.byte(v, 5) * 256 + string.byte(v, 6)
if #v < 6 + hl then return false end
local header = string.sub(v, 7, 6 + hl)
local keys, gens, pos = {}, {}, 1
while pos <= hl do
  local a = string.find(header, '\n', pos, true)
  if not a then return false end
  local b = string.find(header, '\n', a + 1, true)
  if not b then return false end
  keys[#keys + 1] = ARGV[1] .. string.sub(header, pos, a - 1)
  gens[#gens + 1] = string.sub(header, a + 1, b - 1)
  pos = b + 1
end
if #keys > 0 then
  local cur = redis.call('MGET', unpack(keys))
  for i = 1, #keys do
    if cur[i] ~= gens[i] then return false end
  end
end
return v
