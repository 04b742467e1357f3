-- Stores freshly minted tokens, atomically: each token and its status, the hourly
-- counters, and one settlement stream entry per partition for the tokens stored by this
-- call (field `b`: one line per token, `user|out_trade_no|amount|activity|scene|at|gen`,
-- and `|c` after it for a coupon).
-- On a cluster a call holds one partition's tokens (every key in its slot); on a single
-- node one call may hold several partitions' tokens (a batch of single awards is spread
-- over many partitions, and a call per partition would cost a script run per award).
-- Arguments are compact: the caller writes each token's status value and stream line
-- whole, and sums the counters of the call per counter group, so the script parses
-- nothing and concatenates nothing per token.
-- KEYS[1 .. s]: the settlement streams of the call's partitions
-- then, for token i (1-based): KEYS[s+2i-1] its user's token hash (out_trade_no ->
--   encoded SignedToken, or the trim marker once settled and trimmed), KEYS[s+2i] its
--   user's status hash (out_trade_no -> "p|amount|at_ms|activity|scene|gen", "c|..." for
--   a coupon, whose activity is its template and amount one unit of stock); after those,
--   the counter hashes of the call's activities (per hour: n, c; per budget
--   generation: g{gen}:n, g{gen}:c).
-- ARGV[1]: number of tokens n; ARGV[2]: number of streams s; ARGV[3]: number of counter
--   groups g; then 5 values per group (the tokens of one counter hash, hour and budget
--   generation): index in KEYS of its counter hash, hour (YYYYMMDDHH), `g{gen}`, tokens,
--   cents; then 6 values per token: out_trade_no, token bytes, status value, stream
--   line, its stream's index in KEYS * 65536 + its group's index (1-based, in the order
--   above), cents of stock.
-- Returns one value per token: false when stored now, or what is already held under its
-- out_trade_no (a concurrent duplicate won the race, or the token was trimmed: the
-- caller gives its budget back, and its group counts it out). Amounts are at most 10^13
-- and a call carries at most 128 tokens, so the sums below stay exact in Lua's doubles.
local n, s, g = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local groups = {}
for j = 1, g do
  local a = 4 + (j - 1) * 5
  groups[j] = {tonumber(ARGV[a + 3]), tonumber(ARGV[a + 4])}
end
local base = 4 + g * 5
local out = {}
local lines = {}
for i = 1, n do
  local a = base + (i - 1) * 6
  local otn, tokens = ARGV[a], KEYS[s + 2 * i - 1]
  local where = tonumber(ARGV[a + 4])
  if redis.call('HSETNX', tokens, otn, ARGV[a + 1]) == 0 then
    out[i] = redis.call('HGET', tokens, otn)
    local counted = groups[where % 65536]
    counted[1] = counted[1] - 1
    counted[2] = counted[2] - tonumber(ARGV[a + 5])
  else
    redis.call('HSET', KEYS[s + 2 * i], otn, ARGV[a + 2])
    local stream = math.floor(where / 65536)
    local mine = lines[stream]
    if not mine then
      mine = {}
      lines[stream] = mine
    end
    mine[#mine + 1] = ARGV[a + 3]
    out[i] = false
  end
end
for stream, mine in pairs(lines) do
  redis.call('XADD', KEYS[stream], '*', 'b', table.concat(mine, '\n'))
end
for j = 1, g do
  local counted = groups[j]
  if counted[1] > 0 then
    local a = 4 + (j - 1) * 5
    local key, hour, gen = KEYS[tonumber(ARGV[a])], ARGV[a + 1], ARGV[a + 2]
    redis.call('HINCRBY', key, hour .. ':n', counted[1])
    redis.call('HINCRBY', key, hour .. ':c', counted[2])
    redis.call('HINCRBY', key, gen .. ':n', counted[1])
    redis.call('HINCRBY', key, gen .. ':c', counted[2])
  end
end
return out
