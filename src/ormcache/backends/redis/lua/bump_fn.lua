-- Advance the generation keys KEYS[first..last]. A missing generation restarts at a
-- fresh random value, never at INCR's 1, which could equal a generation recorded
-- before the key vanished.
local function bump(first, last, fresh, ttl)
  for i = first, last do
    if redis.call('EXISTS', KEYS[i]) == 1 then
      redis.call('INCR', KEYS[i])
    else
      redis.call('SET', KEYS[i], fresh)
    end
    redis.call('PEXPIRE', KEYS[i], ttl)
  end
end
