-- Gives cents back to the sub-stock they were taken from, if it may still be spent.
-- KEYS[1]: the sub-stock hash   ARGV[1]: cents   ARGV[2]: this give-back's id
-- The id makes the call idempotent: a cluster client that sends a call again (its answer
-- was lost to a timeout) gives the cents back once (field `r:<id>`).
-- Returns 1 when given back (now or by the first call). Otherwise (drained or lost) the
-- cents stay taken and the generation's accounting names them a leak, returned by repair.
if stock_state(KEYS[1]) ~= 0 then return 0 end
if redis.call('HSETNX', KEYS[1], 'r:' .. ARGV[2], ARGV[1]) == 0 then return 1 end
redis.call('HINCRBY', KEYS[1], 'avail', ARGV[1])
return 1
