-- Stores a freshly minted token, atomically, in the user's partition.
-- KEYS[1]: the user's token hash      (out_trade_no -> encoded SignedToken)
-- KEYS[2]: the user's status hash     (out_trade_no -> "p|amount|at_ms|activity|scene")
-- KEYS[3]: the activity's counters in this partition (per hour: n, c)
-- KEYS[4]: the partition's settlement stream
-- ARGV[1]: out_trade_no   ARGV[2]: token bytes   ARGV[3]: hour (YYYYMMDDHH)
-- ARGV[4]: amount cents   ARGV[5]: user id       ARGV[6]: activity id
-- ARGV[7]: scene id       ARGV[8]: issued at (ms)
-- Returns nil when stored, or the token already stored under this out_trade_no (a
-- concurrent duplicate won the race; the caller gives its budget back).
if redis.call('HSETNX', KEYS[1], ARGV[1], ARGV[2]) == 0 then
  return redis.call('HGET', KEYS[1], ARGV[1])
end
redis.call('HSET', KEYS[2], ARGV[1],
  'p|' .. ARGV[4] .. '|' .. ARGV[8] .. '|' .. ARGV[6] .. '|' .. ARGV[7])
redis.call('HINCRBY', KEYS[3], ARGV[3] .. ':n', 1)
redis.call('HINCRBY', KEYS[3], ARGV[3] .. ':c', ARGV[4])
redis.call('XADD', KEYS[4], '*', 'u', ARGV[5], 'o', ARGV[1], 'a', ARGV[4],
  'act', ARGV[6], 'sc', ARGV[7], 't', ARGV[8])
return false
