-- Is any of the lease keys KEYS[first..last] held? Expired tokens are dropped first
-- (scores are expiry times in ms, by the server's clock).
local function leased(first, last)
  local t = redis.call('TIME')
  local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  for i = first, last do
    if redis.call('EXISTS', KEYS[i]) == 1 then
      redis.call('ZREMRANGEBYSCORE', KEYS[i], '-inf', now)
      if redis.call('ZCARD', KEYS[i]) > 0 then return true end
    end
  end
  return false
end
