-- One user's record as the wallet view reads it, atomically: the status hash, the account
-- snapshot hash (with its fences) and the identity of the Redis data now.
-- KEYS[1]: the user's status hash   KEYS[2]: the user's account snapshot hash
return {redis.call('HGETALL', KEYS[1]), redis.call('HGETALL', KEYS[2]), run_id()}
