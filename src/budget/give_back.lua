-- Gives cents back to the sub-stock they were taken from, if it may still be spent.
-- KEYS[1]: the sub-stock hash   ARGV[1]: cents
-- Returns 1 when given back. Otherwise (drained or lost) the cents stay taken and the
-- generation's accounting names them a leak, returned by repair.
if stock_state(KEYS[1]) ~= 0 then return 0 end
redis.call('HINCRBY', KEYS[1], 'avail', ARGV[1])
return 1
