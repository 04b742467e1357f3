-- Takes several awards' amounts from one budget sub-stock in one call.
-- KEYS[1]: the sub-stock hash
-- ARGV: the amounts in cents, each > 0
-- Each amount is taken whole while `avail` covers it, in order; an amount it does not
-- cover is skipped (its award tries other sub-stocks). `avail` never goes below zero.
-- Returns {state, avail_after_cents, taken_1, taken_2, ...} with taken_i 1 or 0; nothing
-- is taken unless state is 0 (see stock.lua). Amounts are at most 10^13 cents and a call
-- carries at most 64 of them, so every sum stays exact in Lua's doubles.
local state = stock_state(KEYS[1])
if state ~= 0 then return {state, 0} end
return take_amounts(KEYS[1], 1)
