-- Takes money from one budget sub-stock.
-- KEYS[1]: the sub-stock hash
-- ARGV[1]: amount in cents, > 0
-- ARGV[2]: "all" takes the whole amount or nothing; "upto" takes min(avail, amount)
-- Returns {state, taken_cents, avail_after_cents}; nothing is taken unless state is 0
-- (see stock.lua). `avail` never goes below zero.
local state = stock_state(KEYS[1])
if state ~= 0 then return {state, 0, 0} end
local avail = tonumber(redis.call('HGET', KEYS[1], 'avail') or '0')
local amount = tonumber(ARGV[1])
local take = 0
if avail >= amount then
  take = amount
elseif ARGV[2] == 'upto' and avail > 0 then
  take = avail
end
if take > 0 then
  avail = redis.call('HINCRBY', KEYS[1], 'avail', -take)
end
return {0, take, avail}
