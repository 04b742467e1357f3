-- Raises one budget sub-stock to its share of the activity budget. Idempotent: the
-- share only grows, and only the difference to what was funded before is added.
-- KEYS[1]: the sub-stock hash (fields `avail`, `funded`)
-- ARGV[1]: the sub-stock's share of the total budget, in cents
-- Returns the cents added now (0 when already funded to that share).
local funded = tonumber(redis.call('HGET', KEYS[1], 'funded') or '0')
local target = tonumber(ARGV[1])
if target > funded then
  redis.call('HINCRBY', KEYS[1], 'avail', target - funded)
  redis.call('HSET', KEYS[1], 'funded', target)
  return target - funded
end
return 0
