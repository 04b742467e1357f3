-- Stores freshly minted tokens, atomically: each token and its status, the hourly
-- counters, and one settlement stream entry per partition for the tokens stored by this
-- call (field `b`: one line per token, `user|out_trade_no|amount|activity|scene|at|gen`,
-- and `|c` after it for a coupon).
-- On a cluster a call holds one partition's tokens (every key in its slot); on a single
-- node one call may hold several partitions' tokens (a batch of single awards is spread
-- over many partitions, and a call per partition would cost a script run per award).
-- KEYS[1 .. s]: the settlement streams of the call's partitions
-- then, for token i (1-based): KEYS[s+2i-1] its user's token hash (out_trade_no ->
--   encoded SignedToken, or the trim marker once settled and trimmed), KEYS[s+2i] its
--   user's status hash (out_trade_no -> "p|amount|at_ms|activity|scene|gen", "c|..." for
--   a coupon, whose activity is its template and amount one unit of stock); after those,
--   the counter hashes of each partition's activities (per hour: n, c; per budget
--   generation: g{gen}:n, g{gen}:c).
-- ARGV[1]: number of tokens n; ARGV[2]: number of streams s; then 12 values per token:
--   out_trade_no, token bytes, hour (YYYYMMDDHH), amount cents, user id, activity id,
--   scene id, issued at (ms), index in KEYS of its counter hash, budget gen, status
--   letter ('p' cash, 'c' coupon), index in KEYS of its stream.
-- Returns one value per token: false when stored now, or what is already held under its
-- out_trade_no (a concurrent duplicate won the race, or the token was trimmed: the
-- caller gives its budget back). Amounts are at most 10^13 and a call carries at most
-- 128 tokens, so the sums below stay exact in Lua's doubles.
local n, s = tonumber(ARGV[1]), tonumber(ARGV[2])
local out = {}
local counts = {}
local lines = {}
for i = 1, n do
  local a = 3 + (i - 1) * 12
  local otn, bytes, hour, amount = ARGV[a], ARGV[a + 1], ARGV[a + 2], ARGV[a + 3]
  local user, activity, scene, at = ARGV[a + 4], ARGV[a + 5], ARGV[a + 6], ARGV[a + 7]
  local counters = KEYS[tonumber(ARGV[a + 8])]
  local gen, letter, stream = ARGV[a + 9], ARGV[a + 10], tonumber(ARGV[a + 11])
  local tokens, statuses = KEYS[s + 2 * i - 1], KEYS[s + 2 * i]
  if redis.call('HSETNX', tokens, otn, bytes) == 0 then
    out[i] = redis.call('HGET', tokens, otn)
  else
    redis.call('HSET', statuses, otn,
      letter .. '|' .. amount .. '|' .. at .. '|' .. activity .. '|' .. scene .. '|' .. gen)
    local mine = lines[stream]
    if not mine then
      mine = {}
      lines[stream] = mine
    end
    mine[#mine + 1] = user .. '|' .. otn .. '|' .. amount .. '|' .. activity .. '|' ..
      scene .. '|' .. at .. '|' .. gen .. (letter == 'c' and '|c' or '')
    local slot = counts[counters]
    if not slot then
      slot = {}
      counts[counters] = slot
    end
    for _, field in ipairs({hour, 'g' .. gen}) do
      local c = slot[field]
      if not c then
        c = {0, 0}
        slot[field] = c
      end
      c[1] = c[1] + 1
      c[2] = c[2] + tonumber(amount)
    end
    out[i] = false
  end
end
for stream, mine in pairs(lines) do
  redis.call('XADD', KEYS[stream], '*', 'b', table.concat(mine, '\n'))
end
for key, hours in pairs(counts) do
  for hour, c in pairs(hours) do
    redis.call('HINCRBY', key, hour .. ':n', c[1])
    redis.call('HINCRBY', key, hour .. ':c', c[2])
  end
end
return out
