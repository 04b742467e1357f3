-- Reads whether users are flagged, and whether the flagged set is whole: it is whole
-- when its marker names the identity of the Redis data it was restored in (a flush
-- takes the marker with the set; a restart or a failover, which may have rewound the
-- set, changes the identity). A set not whole is restored from MySQL by the caller.
-- KEYS[1]: the flagged set, KEYS[2]: its marker (same slot)
-- ARGV: user ids
-- Returns {1 when whole else 0, the identity, then 1 or 0 per user: flagged}.
local rid = run_id()
local out = {redis.call('GET', KEYS[2]) == rid and 1 or 0, rid}
for i = 1, #ARGV do
  out[i + 2] = redis.call('ZSCORE', KEYS[1], ARGV[i]) and 1 or 0
end
return out
