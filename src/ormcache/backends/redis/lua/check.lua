-- KEYS: one generation key, its lease key. ARGV: the generation a snapshot recorded.
-- 1 if that generation is still current and the tag is not leased.
if redis.pcall('GET', KEYS[1]) ~= ARGV[1] then return 0 end
if leased(2, 2) then return 0 end
return 1
