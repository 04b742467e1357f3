-- Takes money from one budget sub-stock.
-- KEYS[1]: the sub-stock hash (fields `avail`, `funded`)
-- ARGV[1]: amount in cents, > 0
-- ARGV[2]: "all" takes the whole amount or nothing; "upto" takes min(avail, amount)
-- Returns {taken_cents, avail_after_cents}. `avail` never goes below zero.
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
return {take, avail}
