-- A generation we can use: what INCR can advance, in the one spelling Redis and
-- Python agree on (0, or digits without a leading zero, below 2^63-1). Anything else
-- (garbage, a float, an empty string, a huge number, the wrong Redis type, missing) is
-- unknown: never served against, never stored against, replaced when seen.
local function usable(g)
  if type(g) ~= 'string' or #g == 0 or #g > 19 then return false end
  if g == '0' then return true end
  if not string.find(g, '^[1-9][0-9]*$') then return false end
  return #g < 19 or g < '9223372036854775807'
end

-- Make a generation live at least `need` ms ('0': for ever), never shorter than it
-- already does: another entry may need it longer. The spec is "need:upto": when it must
-- be extended, it is extended to `upto` ms, a margin beyond the need, so that the stores
-- that follow leave it alone for a while: every change to a generation key, an expiry
-- included, is pushed to every near cache, which then forgets that generation.
-- (Allowed when memory is full; pcall anyway.)
local function keep(key, spec)
  local left = redis.call('PTTL', key)
  if left < 0 then return end  -- persistent already, or gone
  if spec == '0' then
    redis.pcall('PERSIST', key)
    return
  end
  local need, upto = string.match(spec, '^(%d+):(%d+)$')
  if not need then return end
  if left < tonumber(need) then
    redis.pcall('PEXPIRE', key, upto)
  end
end

-- Whether a reply of redis.pcall is an error (such as WRONGTYPE or OOM).
local function failed(reply)
  return type(reply) == 'table' and reply.err ~= nil
end
