-- Records that an award was answered with only a greeting (a coupon scene's fallback), so
-- a retry is answered the same, unless a token was stored under its out_trade_no first.
-- KEYS[1]: the user's token hash, KEYS[2]: the partition's marker index (same slot)
-- ARGV[1]: out_trade_no, ARGV[2]: the greeting marker, ARGV[3]: the marker index member,
-- ARGV[4]: when the marker may go (ms: its activity's end plus the retry grace)
-- Returns false when recorded now, or what the token hash already holds.
if redis.call('HSETNX', KEYS[1], ARGV[1], ARGV[2]) == 1 then
  redis.call('ZADD', KEYS[2], ARGV[4], ARGV[3])
  return false
end
return redis.call('HGET', KEYS[1], ARGV[1])
