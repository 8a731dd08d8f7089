-- Advance the generation keys KEYS[first..last], every one of them, whatever they hold.
-- A generation that starts over lives `ttl` ms unless a store extends it.
-- A usable generation is incremented; any other (missing, unusable, the wrong type, at
-- the top of the range) starts over at a fresh random value, never at INCR's 1, which
-- could equal a generation recorded before the key vanished. A key that cannot be
-- written (Redis out of memory refuses INCR and SET) is deleted instead: DEL is allowed
-- when memory is full, and a missing generation matches no entry. So no tag is ever
-- left as it was, and the tags after a failing one are still bumped.
local function bump(first, last, fresh, ttl)
  for i = first, last do
    local key = KEYS[i]
    local reply
    if usable(redis.pcall('GET', key)) then
      -- INCR keeps the key's expiry: as long as the entries stored against it need.
      reply = redis.pcall('INCR', key)
    else
      reply = redis.pcall('SET', key, fresh, 'PX', ttl)
    end
    if failed(reply) then
      redis.call('DEL', key)
    end
  end
end
