-- KEYS: one generation key, its lease key. ARGV: the generation a snapshot recorded,
-- keep spec (need:upto ms, or 0: persist; see keep()).
-- 1 if that generation is still current and the tag is not leased; the generation then
-- lives at least `keep` ms, as long as the entry about to be stored needs it.
if redis.pcall('GET', KEYS[1]) ~= ARGV[1] then return 0 end
if leased(2, 2) then return 0 end
keep(KEYS[1], ARGV[2])
return 1
