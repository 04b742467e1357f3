-- Takes money from one budget sub-stock.
-- KEYS[1]: the sub-stock hash (fields `avail`, `funded`)
-- ARGV[1]: amount in cents, > 0
-- ARGV[2]: "all" takes the whole amount or nothing; "upto" takes min(avail, amount)
-- Returns {taken_cents, avail_after_cents}.
-- The common case (the amount is there) is a single HINCRBY. A shortfall is put back
-- before the script ends: scripts run atomically, so no client ever sees `avail` < 0.
local amount = tonumber(ARGV[1])
local avail = redis.call('HINCRBY', KEYS[1], 'avail', -amount)
if avail >= 0 then
  return {amount, avail}
end
local before = avail + amount
local take = 0
if ARGV[2] == 'upto' and before > 0 then
  take = before
end
avail = redis.call('HINCRBY', KEYS[1], 'avail', amount - take)
return {take, avail}
