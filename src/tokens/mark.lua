-- Marks booked tokens settled, acknowledges their stream entries and stores account
-- snapshots, atomically in one partition. Runs only after the MySQL commit.
-- KEYS[1]: the partition's settled index (zset)   KEYS[2]: the partition's stream
-- KEYS[3+2i], KEYS[4+2i]: token i's user status hash and activity counters hash
-- KEYS[3+2n+j]: snapshot j's account snapshot hash
-- ARGV[1]: now (ms)   ARGV[2]: consumer group   ARGV[3]: n tokens   ARGV[4]: m snapshots
-- ARGV[5+6i ..]: token i: out_trade_no, hour, amount, user id, stream entry id ('' = none),
--   budget generation
-- ARGV[5+6n+4j ..]: snapshot j: version, balance, total income, withdrawn
-- Returns how many tokens went from pending to settled now.
local n = tonumber(ARGV[3])
local m = tonumber(ARGV[4])
local changed = 0
for i = 0, n - 1 do
  local status_key = KEYS[3 + 2 * i]
  local counters_key = KEYS[4 + 2 * i]
  local a = 5 + 6 * i
  local otn, hour, amount, user, entry = ARGV[a], ARGV[a + 1], ARGV[a + 2], ARGV[a + 3], ARGV[a + 4]
  local gen = ARGV[a + 5]
  local status = redis.call('HGET', status_key, otn)
  if status and string.sub(status, 1, 1) == 'p' then
    redis.call('HSET', status_key, otn, 's' .. string.sub(status, 2))
    redis.call('HINCRBY', counters_key, hour .. ':sn', 1)
    redis.call('HINCRBY', counters_key, hour .. ':sc', amount)
    redis.call('HINCRBY', counters_key, 'g' .. gen .. ':sn', 1)
    redis.call('HINCRBY', counters_key, 'g' .. gen .. ':sc', amount)
    redis.call('ZADD', KEYS[1], ARGV[1], user .. '|' .. otn)
    changed = changed + 1
  end
  if entry ~= '' then
    redis.call('XACK', KEYS[2], ARGV[2], entry)
    redis.call('XDEL', KEYS[2], entry)
  end
end
for j = 0, m - 1 do
  local key = KEYS[3 + 2 * n + j]
  local b = 5 + 6 * n + 4 * j
  local current = tonumber(redis.call('HGET', key, 'v') or '-1')
  if tonumber(ARGV[b]) > current then
    redis.call('HSET', key, 'v', ARGV[b], 'b', ARGV[b + 1], 'i', ARGV[b + 2], 'w', ARGV[b + 3])
  end
end
return changed
