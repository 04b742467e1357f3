-- One user's record as the wallet view reads it, atomically: the status hash, the account
-- snapshot hash (with its fences), the identity of the Redis data now and the time now
-- (ms, Redis's clock, the one a snapshot's `rs` was taken with).
-- KEYS[1]: the user's status hash   KEYS[2]: the user's account snapshot hash
local t = redis.call('TIME')
return {redis.call('HGETALL', KEYS[1]), redis.call('HGETALL', KEYS[2]), run_id(),
  tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)}
