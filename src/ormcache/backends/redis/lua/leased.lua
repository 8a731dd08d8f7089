-- Is any of the lease keys KEYS[first..last] held? Expired tokens are dropped first
-- (scores are expiry times in ms, by the server's clock). A lease key of another type
-- holds no lease we can read: it is dropped, and counts as held this once (refusing a
-- store is always safe).
local function leased(first, last)
  local t = redis.call('TIME')
  local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  for i = first, last do
    if redis.call('EXISTS', KEYS[i]) == 1 then
      if failed(redis.pcall('ZREMRANGEBYSCORE', KEYS[i], '-inf', now)) then
        redis.call('DEL', KEYS[i])
        return true
      end
      if redis.call('ZCARD', KEYS[i]) > 0 then return true end
    end
  end
  return false
end
