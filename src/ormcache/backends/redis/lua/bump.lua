-- KEYS: generation keys. ARGV: fresh value, generation ttl ms.
bump(1, #KEYS, ARGV[1], ARGV[2])
return 1
