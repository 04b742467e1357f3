-- Marks booked tokens settled, acknowledges settlement stream entries and stores account
-- snapshots, atomically in one partition. Runs only after the MySQL commit.
-- KEYS[1]: the partition's settled index (zset)   KEYS[2]: the partition's stream
-- KEYS[3 .. 2+n]: token i's user status hash; then the activities' counters hashes;
--   then 2 per snapshot j: its user's status hash and the user's legacy snapshot hash
--   (`acct:`, where earlier releases kept the snapshot); last, the partition's life hash
-- ARGV[1]: now (ms)   ARGV[2]: consumer group   ARGV[3]: n tokens   ARGV[4]: m snapshots
-- ARGV[5]: k stream entries to acknowledge   ARGV[6]: c counters hashes
-- ARGV[7]: g counter groups (the tokens of one counters hash, hour and budget generation)
-- ARGV[8]: '1' while instances of earlier releases may run (`wallet.snapshot_compat`)
-- then 3 per group: index in KEYS of its counters hash, hour (YYYYMMDDHH), `g{gen}`;
-- then 4 per token: out_trade_no, its settled index member (`user|out_trade_no`),
--   amount, index of its counter group (1-based, in the order above)
-- then 5 per snapshot: version, balance, total income, withdrawn, the fence it lifts ('' for
-- none); then the k entry ids. The caller writes the members and groups whole, so
-- nothing is concatenated per token here.
--
-- The snapshot lives in the user's status hash, beside the statuses it agrees with,
-- in two fields whose names start with `=` (an out_trade_no starts with a digit): `=s`
-- holds `version|balance|total income|withdrawn`, `=r` holds `identity|age`, the identity
-- of the Redis data it was written in (shortened) and how long into the partition's
-- current Redis life it was written (ms, Redis's clock); a field `=f:<id>` per open
-- fence. Few and short fields keep the hash in Redis's compact encoding, and a user's
-- tokens and snapshot take one read and one write here, and one read in a view.
-- After a flush, a restart or a failover, the first script to find no life of the
-- current identity starts one (this one, a one-win claim or an instance starting: the
-- life hash holds `rid` and `since`). Views trust a snapshot only when it was written once
-- its life was older than any fenced change takes: a loss may have taken a fence away,
-- and a snapshot written before the change it announced was marked may hide it (the next
-- one written late enough is trusted). A snapshot replaces one of an older version, or
-- one of another identity that is not newer (a late mark of an earlier commit never
-- replaces a later snapshot the AOF kept). Its fence goes with it: the change the fence
-- announced is in this snapshot (or a newer one).
-- Earlier releases keep the snapshot and fences in `acct:` (full identity, fields
-- v, b, i, w, rid, wr, rs, wt, f:<id>). While instances of one may run (compat), this
-- script also keeps `acct:` as they do, so their views stay exact, and this release's
-- views read both hashes (the newer snapshot and every fence); fences go in both.
-- Once only this release runs (not compat), `acct:` is no longer kept: views go to
-- MySQL while a user still has one, and this script moves an `acct:` that holds no
-- fence into the status hash when it is newer than the one there (an earlier release's
-- mark flipped statuses with it), then deletes it. One holding a fence is left alone
-- (its release lifts it). A fence lifted here is lifted in both hashes.
-- The settled counters are summed per counter group, the index members go in one ZADD
-- per 256, the entries in one XACK and one XDEL. Returns how many tokens went from
-- pending to settled now.
local n, m = tonumber(ARGV[3]), tonumber(ARGV[4])
local k, c, g = tonumber(ARGV[5]), tonumber(ARGV[6]), tonumber(ARGV[7])
local compat = ARGV[8] == '1'
local changed = 0
local counts = {}
for j = 1, g do
  counts[j] = {0, 0}
end
local members = {}
local first = 9 + 3 * g
local b = first + 4 * n
-- The identity as a snapshot holds it: 24 characters of each of its two ids.
local function short(id)
  return string.sub(id, 1, 24) .. ':' .. string.sub(id, 42, 65)
end
local rid, full_rid, since, written, age = nil, nil, nil, nil, nil
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
  full_rid, rid = rid, short(rid)
  age = tostring(tonumber(written) - tonumber(since))
end
-- Whether a snapshot of version `incoming` written now replaces the stored one, of
-- version `stored` (-1 for none) written under identity `stored_rid` (either layout).
local function replaces(stored_rid, stored, current_rid, incoming)
  return (stored_rid == current_rid and incoming > stored)
    or (stored_rid ~= current_rid and incoming >= stored)
end
-- The version of a packed snapshot (-1 for none) and the identity of its `=r`.
local function version_of(packed)
  return tonumber(packed and string.match(packed, '^%d+') or '-1')
end
local function identity_of(packed)
  return packed and string.match(packed, '^[^|]*') or ''
end
-- The tokens of each status hash (a user's) are read in one HMGET and flipped in one
-- HSET, at most 256 at a time: a withdrawal's forced settlement marks all of one user's
-- tokens at once. The user's snapshot is read and written with the first of those. A
-- token named twice in one read is looked at once (`seen`); named again in a later read,
-- it is read back settled.
local by_key, keys_in_order, snapshot_of = {}, {}, {}
local function status_hash(key)
  local at = by_key[key]
  if not at then
    at = {}
    by_key[key] = at
    keys_in_order[#keys_in_order + 1] = key
  end
  return at
end
for i = 0, n - 1 do
  local at = status_hash(KEYS[3 + i])
  at[#at + 1] = first + 4 * i
end
for j = 0, m - 1 do
  local key = KEYS[3 + n + c + 2 * j]
  status_hash(key)
  snapshot_of[key] = j
end
for _, status_key in ipairs(keys_in_order) do
  local at = by_key[status_key]
  local j = snapshot_of[status_key]
  local a, lift, legacy = nil, '', nil
  if j then
    a = b + 5 * j
    lift = ARGV[a + 4]
    local acct = KEYS[3 + n + c + 2 * j + 1]
    if compat then
      -- The layout of earlier releases, kept as they keep it, for their views.
      local current = redis.call('HMGET', acct, 'v', 'rid')
      local incoming, stored = tonumber(ARGV[a]), tonumber(current[1] or '-1') or -1
      if replaces(current[2], stored, full_rid, incoming) then
        redis.call('HSET', acct, 'v', ARGV[a], 'b', ARGV[a + 1], 'i', ARGV[a + 2],
          'w', ARGV[a + 3], 'rid', full_rid, 'wr', full_rid, 'rs', since, 'wt', written)
      end
    end
    if lift ~= '' then
      redis.call('HDEL', acct, 'f:' .. lift)
    end
    if not compat and redis.call('EXISTS', acct) == 1 then
      local flat = redis.call('HGETALL', acct)
      local fenced = false
      legacy = {}
      for f = 1, #flat, 2 do
        legacy[flat[f]] = flat[f + 1]
        if string.sub(flat[f], 1, 2) == 'f:' then
          fenced = true
        end
      end
      if fenced then
        legacy = nil
      else
        redis.call('DEL', acct)
      end
    end
  end
  for from = 1, math.max(#at, 1), 256 do
    local to = math.min(from + 255, #at)
    local seen = {}
    local fields = {}
    for x = from, to do
      fields[#fields + 1] = ARGV[at[x]]
    end
    if j and from == 1 then
      fields[#fields + 1] = '=s'
      fields[#fields + 1] = '=r'
    end
    local values = redis.call('HMGET', status_key, unpack(fields))
    local flips = {}
    for x = from, to do
      local t = at[x]
      local otn, status = ARGV[t], values[x - from + 1]
      local letter = status and string.sub(status, 1, 1)
      if (letter == 'p' or letter == 'c') and not seen[otn] then
        seen[otn] = true
        -- cash p -> s, coupon c -> d
        flips[#flips + 1] = otn
        flips[#flips + 1] = (letter == 'p' and 's' or 'd') .. string.sub(status, 2)
        local counted = counts[tonumber(ARGV[t + 3])]
        counted[1] = counted[1] + 1
        counted[2] = counted[2] + tonumber(ARGV[t + 2])
        members[#members + 1] = ARGV[1]
        members[#members + 1] = ARGV[t + 1]
        if #members >= 512 then
          redis.call('ZADD', KEYS[1], unpack(members))
          members = {}
        end
        changed = changed + 1
      end
    end
    if j and from == 1 then
      local stored, stored_rid = version_of(values[#fields - 1]), identity_of(values[#fields])
      -- The migrated legacy snapshot, or the incoming one over it, go at base + 1 .. 4.
      local base = #flips
      if legacy and (tonumber(legacy['v'] or '-1') or -1) > stored then
        -- Written by an earlier release's mark: trusted (`-` otherwise) only when that
        -- mark wrote `wr` too, as views of that release required.
        local from_mark = legacy['wr'] and legacy['wr'] == legacy['rid']
        stored_rid = from_mark and short(legacy['rid']) or '-'
        stored = tonumber(legacy['v'])
        flips[base + 1] = '=s'
        flips[base + 2] = legacy['v'] .. '|' .. (legacy['b'] or '') .. '|' .. (legacy['i'] or '')
          .. '|' .. (legacy['w'] or '')
        flips[base + 3] = '=r'
        flips[base + 4] = stored_rid .. '|'
          .. tostring((tonumber(legacy['wt'] or '0') or 0) - (tonumber(legacy['rs'] or '0') or 0))
      end
      local incoming = tonumber(ARGV[a])
      if replaces(stored_rid, stored, rid, incoming) then
        flips[base + 1] = '=s'
        flips[base + 2] = ARGV[a] .. '|' .. ARGV[a + 1] .. '|' .. ARGV[a + 2] .. '|' .. ARGV[a + 3]
        flips[base + 3] = '=r'
        flips[base + 4] = rid .. '|' .. age
      end
    end
    if #flips > 0 then
      redis.call('HSET', status_key, unpack(flips))
    end
  end
  if lift ~= '' then
    redis.call('HDEL', status_key, '=f:' .. lift)
  end
end
if #members > 0 then
  redis.call('ZADD', KEYS[1], unpack(members))
end
for j = 1, g do
  local counted = counts[j]
  if counted[1] > 0 then
    local a = 9 + 3 * (j - 1)
    local key, hour, gen = KEYS[tonumber(ARGV[a])], ARGV[a + 1], ARGV[a + 2]
    redis.call('HINCRBY', key, hour .. ':sn', counted[1])
    redis.call('HINCRBY', key, hour .. ':sc', counted[2])
    redis.call('HINCRBY', key, gen .. ':sn', counted[1])
    redis.call('HINCRBY', key, gen .. ':sc', counted[2])
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
