-- Writes what the cache of a red packet knows after a commit in MySQL.
-- KEYS[1]: the packet's cache hash (see grab.lua)
-- ARGV[1]: shares left as committed   ARGV[2]: expiry (ms)   ARGV[3]: the cache's own
--   expiry (ms)   then pairs of user id, cents opened.
-- `left` only ever falls: a writer that read the packet earlier never raises it again.
local left = tonumber(ARGV[1])
local current = redis.call('HGET', KEYS[1], 'left')
if current and tonumber(current) < left then left = tonumber(current) end
redis.call('HSET', KEYS[1], 'left', left, 'exp', ARGV[2])
for i = 4, #ARGV, 2 do
  redis.call('HSET', KEYS[1], 'u:' .. ARGV[i], ARGV[i + 1])
end
redis.call('PEXPIREAT', KEYS[1], ARGV[3])
return {left}
