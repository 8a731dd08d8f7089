-- Is any of the lease keys KEYS[first..last] held? Expired tokens are dropped first
-- (scores are expiry times in ms, by the server's clock), and so are tokens that would
-- expire later than any lease can last (MAX_LEASE_MS, the bound Settings puts on
-- lease_ttl): not ours, and one that never expired would refuse every store on its tag
-- for good (on the namespace tag, every store). A lease key of another type holds no
-- lease we can read: it is dropped, and counts as held this once (refusing a store is
-- always safe).
local MAX_LEASE_MS = 600000
local function leased(first, last)
  local t = redis.call('TIME')
  local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  for i = first, last do
    if redis.call('EXISTS', KEYS[i]) == 1 then
      if failed(redis.pcall('ZREMRANGEBYSCORE', KEYS[i], '-inf', now)) then
        redis.call('DEL', KEYS[i])
        return true
      end
      redis.call('ZREMRANGEBYSCORE', KEYS[i], '(' .. (now + MAX_LEASE_MS), '+inf')
      if redis.call('ZCARD', KEYS[i]) > 0 then return true end
    end
  end
  return false
end
