-- KEYS: the entry, the write probe (a key that is never set). ARGV: the generation key
-- prefix. The entry if every generation it recorded is current; nil if missing or
-- stale; 0 if the key holds something that is not an entry (the caller deletes it as
-- corrupt). Fails while the server refuses writes (a failed save: MISCONF; a read-only
-- replica; too few replicas for min-replicas-to-write): a bump cannot be delivered then,
-- so nothing may be served. (Full memory is not refused here: a bump then deletes.)
redis.call('PEXPIRE', KEYS[2], 1)
local v = redis.pcall('GET', KEYS[1])
if not v then return false end
if type(v) ~= 'string' then return 0 end
if #v < 6 or string.sub(v, 1, 4) ~= 'OCE1' then return 0 end
local hl = string.byte(v, 5) * 256 + string.byte(v, 6)
if #v < 6 + hl then return 0 end
local header = string.sub(v, 7, 6 + hl)
local keys, gens, pos = {}, {}, 1
while pos <= hl do
  local a = string.find(header, '\n', pos, true)
  if not a then return 0 end
  local b = string.find(header, '\n', a + 1, true)
  if not b then return 0 end
  local gen = string.sub(header, a + 1, b - 1)
  if not string.find(gen, '^[0-9]+$') then return 0 end
  keys[#keys + 1] = ARGV[1] .. string.sub(header, pos, a - 1)
  gens[#gens + 1] = gen
  pos = b + 1
end
if #keys > 0 then
  -- MGET answers nil for a key of another type: that generation is unknown, a miss.
  local cur = redis.call('MGET', unpack(keys))
  for i = 1, #keys do
    if cur[i] ~= gens[i] then return false end
  end
end
return v
