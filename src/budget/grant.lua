-- Applies one grant (budget moved from MySQL) to a sub-stock, exactly once, then takes
-- the given amounts from it, as take_many.lua does.
-- KEYS[1]: the sub-stock hash
-- ARGV[1]: grant id   ARGV[2]: grant cents   ARGV[3..]: amounts to take now (may be none)
-- Returns {state, avail_after_cents, taken_3, ...}. A sub-stock that is not spendable
-- (state 1, 2 or 3, see stock.lua; grants only go to initialised generations, so a
-- missing sub-stock was lost) gets nothing: the grant stays unapplied and is accounted
-- when its generation is drained or found lost.
local state = stock_state(KEYS[1])
if state ~= 0 then return {state, 0} end
if redis.call('HSETNX', KEYS[1], 'g:' .. ARGV[1], ARGV[2]) == 1 then
  redis.call('HINCRBY', KEYS[1], 'avail', ARGV[2])
  redis.call('HINCRBY', KEYS[1], 'funded', ARGV[2])
end
return take_amounts(KEYS[1], 3)
