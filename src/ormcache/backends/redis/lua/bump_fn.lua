-- Advance the generation keys KEYS[first..last], every one of them, whatever they hold.
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
      reply = redis.pcall('INCR', key)
    else
      reply = redis.pcall('SET', key, fresh)
    end
    if failed(reply) then
      redis.call('DEL', key)
    else
      redis.pcall('PEXPIRE', key, ttl)
    end
  end
end
