-- The grab step of a red packet, from its cache alone.
-- KEYS[1]: the packet's cache hash (`left`: shares left, `exp`: expiry in ms,
--   `u:<user>`: the cents each opener got)
-- ARGV[1]: user id   ARGV[2]: now (ms)
-- Returns 0 eligible, 1 finished, 2 already opened by this user, 3 expired, 4 not cached.
if redis.call('EXISTS', KEYS[1]) == 0 then return 4 end
if redis.call('HEXISTS', KEYS[1], 'u:' .. ARGV[1]) == 1 then return 2 end
if tonumber(redis.call('HGET', KEYS[1], 'exp') or '0') <= tonumber(ARGV[2]) then return 3 end
if tonumber(redis.call('HGET', KEYS[1], 'left') or '0') <= 0 then return 1 end
return 0
