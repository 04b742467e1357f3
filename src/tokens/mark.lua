-- Marks booked tokens settled, acknowledges settlement stream entries and stores account
-- snapshots, atomically in one partition. Runs only after the MySQL commit.
-- KEYS[1]: the partition's settled index (zset)   KEYS[2]: the partition's stream
-- KEYS[3 .. 2+n]: token i's user status hash; then the activities' counters hashes;
--   then snapshot j's account snapshot hash; last, the partition's life hash
-- ARGV[1]: now (ms)   ARGV[2]: consumer group   ARGV[3]: n tokens   ARGV[4]: m snapshots
-- ARGV[5]: k stream entries to acknowledge   ARGV[6]: c counters hashes
-- ARGV[7]: g counter groups (the tokens of one counters hash, hour and budget generation)
-- then 3 per group: index in KEYS of its counters hash, hour (YYYYMMDDHH), `g{gen}`;
-- then 4 per token: out_trade_no, its settled index member (`user|out_trade_no`),
--   amount, index of its counter group (1-based, in the order above)
-- then 5 per snapshot: version, balance, total income, withdrawn, the fence it lifts ('' for
-- none); then the k entry ids. The caller writes the members and groups whole, so
-- nothing is concatenated per token here.
-- A snapshot is stored with the identity of the Redis data (`rid`, and `wr` beside it,
-- which only this script writes), `rs`, when the partition's current Redis life began,
-- and `wt`, when it was written (Redis's clock). After a flush, a restart or a
-- failover, the first script to find no life of the current identity starts one (this
-- one, a one-win claim or an instance starting: the life hash holds `rid` and `since`).
-- Views trust a snapshot only when it was written once its life was older than any
-- fenced change takes: a loss may have taken a fence away, and a snapshot
-- written before the change it announced was marked may hide it (the next one written
-- late enough is trusted). A snapshot replaces one of an older version, or one of
-- another identity that is not newer (a late mark of an earlier commit never replaces a
-- later snapshot the AOF kept). Its fence field `f:<id>` goes with it: the change the
-- fence announced is in this snapshot (or a newer one).
-- The settled counters are summed per counter group, the index members go in one ZADD
-- per 256, the entries in one XACK and one XDEL. Returns how many tokens went from
-- pending to settled now.
local n, m = tonumber(ARGV[3]), tonumber(ARGV[4])
local k, c, g = tonumber(ARGV[5]), tonumber(ARGV[6]), tonumber(ARGV[7])
local changed = 0
local counts = {}
for j = 1, g do
  counts[j] = {0, 0}
end
local members = {}
local first = 8 + 3 * g
-- The tokens of each status hash (a user's) are read in one HMGET and flipped in one
-- HSET, at most 256 at a time: a withdrawal's forced settlement marks all of one user's
-- tokens at once. A token named twice in one read is looked at once (`seen`); named
-- again in a later read, it is read back settled.
local by_key, keys_in_order = {}, {}
for i = 0, n - 1 do
  local key = KEYS[3 + i]
  local at = by_key[key]
  if not at then
    at = {}
    by_key[key] = at
    keys_in_order[#keys_in_order + 1] = key
  end
  at[#at + 1] = first + 4 * i
end
for _, status_key in ipairs(keys_in_order) do
  local at = by_key[status_key]
  for from = 1, #at, 256 do
    local to = math.min(from + 255, #at)
    local seen = {}
    local otns = {}
    for j = from, to do
      otns[#otns + 1] = ARGV[at[j]]
    end
    local statuses = redis.call('HMGET', status_key, unpack(otns))
    local flips = {}
    for j = from, to do
      local a = at[j]
      local otn, status = ARGV[a], statuses[j - from + 1]
      local letter = status and string.sub(status, 1, 1)
      if (letter == 'p' or letter == 'c') and not seen[otn] then
        seen[otn] = true
        -- cash p -> s, coupon c -> d
        flips[#flips + 1] = otn
        flips[#flips + 1] = (letter == 'p' and 's' or 'd') .. string.sub(status, 2)
        local counted = counts[tonumber(ARGV[a + 3])]
        counted[1] = counted[1] + 1
        counted[2] = counted[2] + tonumber(ARGV[a + 2])
        members[#members + 1] = ARGV[1]
        members[#members + 1] = ARGV[a + 1]
        if #members >= 512 then
          redis.call('ZADD', KEYS[1], unpack(members))
          members = {}
        end
        changed = changed + 1
      end
    end
    if #flips > 0 then
      redis.call('HSET', status_key, unpack(flips))
    end
  end
end
if #members > 0 then
  redis.call('ZADD', KEYS[1], unpack(members))
end
for j = 1, g do
  local counted = counts[j]
  if counted[1] > 0 then
    local a = 8 + 3 * (j - 1)
    local key, hour, gen = KEYS[tonumber(ARGV[a])], ARGV[a + 1], ARGV[a + 2]
    redis.call('HINCRBY', key, hour .. ':sn', counted[1])
    redis.call('HINCRBY', key, hour .. ':sc', counted[2])
    redis.call('HINCRBY', key, gen .. ':sn', counted[1])
    redis.call('HINCRBY', key, gen .. ':sc', counted[2])
  end
end
local b = first + 4 * n
local rid, since, written = nil, nil, nil
if m > 0 then
  rid = run_id()
  local t = redis.call('TIME')
  written = tostring(tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000))
  local life = redis.call('HMGET', KEYS[#KEYS], 'rid', 'since')
  if life[1] == rid and life[2] then
    since = life[2]
  else
    since = written
    redis.call('HSET', KEYS[#KEYS], 'rid', rid, 'since', since)
  end
end
for j = 0, m - 1 do
  local key = KEYS[3 + n + c + j]
  local at = b + 5 * j
  local current = redis.call('HMGET', key, 'v', 'rid')
  local incoming, stored = tonumber(ARGV[at]), tonumber(current[1] or '-1')
  if (current[2] == rid and incoming > stored) or (current[2] ~= rid and incoming >= stored) then
    redis.call('HSET', key, 'v', ARGV[at], 'b', ARGV[at + 1], 'i', ARGV[at + 2],
      'w', ARGV[at + 3], 'rid', rid, 'wr', rid, 'rs', since, 'wt', written)
  end
  if ARGV[at + 4] ~= '' then
    redis.call('HDEL', key, 'f:' .. ARGV[at + 4])
  end
end
local ids = {}
for e = 0, k - 1 do
  ids[#ids + 1] = ARGV[b + 5 * m + e]
  if #ids >= 256 or e == k - 1 then
    redis.call('XACK', KEYS[2], ARGV[2], unpack(ids))
    redis.call('XDEL', KEYS[2], unpack(ids))
    ids = {}
  end
end
return changed
