-- Initialises a sub-stock of a generation that is not ready yet (no grant has gone to
-- it): records this Redis data's identity as its owner. A drained sub-stock stays
-- drained, and one already funded is left alone (another instance readied the
-- generation meanwhile: re-stamping it could hide a loss).
-- KEYS[1]: the sub-stock hash
-- Returns 1 when drained (closed), 2 when already funded, 0 when initialised now.
if redis.call('HGET', KEYS[1], 'closed') then return 1 end
if redis.call('HEXISTS', KEYS[1], 'funded') == 1 then return 2 end
redis.call('HSET', KEYS[1], 'rid', run_id())
return 0
