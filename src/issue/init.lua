-- Initialises a sub-stock of a generation that is not ready yet (no grant has gone to
-- it): records this Redis process as its owner. A drained sub-stock stays drained.
-- KEYS[1]: the sub-stock hash
-- Returns 1 when drained (closed), 0 otherwise.
if redis.call('HGET', KEYS[1], 'closed') then return 1 end
redis.call('HSET', KEYS[1], 'rid', run_id())
return 0
