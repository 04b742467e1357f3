-- Stores freshly minted tokens, atomically: each token and its status, the hourly
-- counters, and one settlement stream entry per partition for the tokens stored by this
-- call (field `b`: one line per token, `user|out_trade_no|amount|activity|scene|at|gen`,
-- and `|c` after it for a coupon). A call may also take its tokens' money from budget
-- sub-stocks (identity.lua and budget/stock.lua are prepended): a token is then stored
-- only when its sub-stock is spendable and covers it, and its money stays taken only
-- when it is stored, so a take and its token are one atomic step. Every token of such
-- a call names its sub-stock and a positive amount (the script refuses the call before
-- it writes anything otherwise).
-- On a cluster a call holds one partition's tokens (every key in its slot) and takes
-- only from sub-stocks placed in that partition (`issue.sub_stocks_in_partitions`); on a
-- single node one call may hold several partitions' tokens (a batch of single awards is
-- spread over many partitions, and a call per partition would cost a script run per
-- award) and take from any sub-stock.
-- Arguments are compact: the caller writes each token's status value and stream line
-- whole, and sums the counters of the call per counter group, so the script parses
-- nothing and concatenates nothing per token.
-- KEYS[1 .. s]: the settlement streams of the call's partitions; KEYS[s+1 .. s+k]: the
--   sub-stocks the call takes from (k = 0: a plain store)
-- then, with t = s + k, for token i (1-based): KEYS[t+2i-1] its user's token hash
--   (out_trade_no -> encoded SignedToken, or the trim marker once settled and trimmed),
--   KEYS[t+2i] its user's status hash (out_trade_no -> "p|amount|at_ms|activity|scene|gen",
--   "c|..." for a coupon, whose activity is its template and amount one unit of stock);
--   after those, the counter hashes of the call's activities (per hour: n, c; per
--   budget generation: g{gen}:n, g{gen}:c).
-- ARGV[1]: number of tokens n; ARGV[2]: number of streams s; ARGV[3]: number of counter
--   groups g; ARGV[4]: number of sub-stocks k; then 5 values per group (the tokens of
--   one counter hash, hour and budget generation): index in KEYS of its counter hash,
--   hour (YYYYMMDDHH), `g{gen}`, tokens, cents; then 6 values per token: out_trade_no,
--   token bytes, status value, stream line, where it goes ((sub-stock * 65536 +
--   stream) * 65536 + group: its sub-stock's, stream's and group's 1-based places in the
--   order above, sub-stock 0 when it takes nothing), cents of stock.
-- Returns one value per token: false when stored now; what is already held under its
-- out_trade_no (a concurrent duplicate won the race, or the token was trimmed: the
-- caller gives back any budget it took for it before, a token that takes took
-- nothing); or, for a token that takes and is not held, an integer when it was neither
-- stored nor took anything: 0 when its sub-stock does not cover it, otherwise the
-- sub-stock's state (stock.lua). Then two integers per
-- sub-stock: its state and what it holds after the call. Tokens not stored are counted
-- out of their group. Amounts are at most 10^13 and a call carries at most 128 tokens,
-- so the sums below stay exact in Lua's doubles.
local n, s, g, k = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local t = s + k
local groups = {}
for j = 1, g do
  local a = 5 + (j - 1) * 5
  groups[j] = {tonumber(ARGV[a + 3]), tonumber(ARGV[a + 4])}
end
local base = 5 + g * 5
-- Per sub-stock: {state, avail, taken}. The money is taken before any token is written:
-- should the script fail half-way (Redis does not undo a script's writes), tokens
-- without their money can never remain, only money without its token (a leak, which
-- repair returns). A token found held afterwards gets its money back.
local stocks = {}
for j = 1, k do
  local state, avail = stock_state(KEYS[s + j]), 0
  if state == 0 then
    avail = tonumber(redis.call('HGET', KEYS[s + j], 'avail') or '0')
  end
  stocks[j] = {state, avail, 0}
end
local refused = {}
if k > 0 then
  for i = 1, n do
    local a = base + (i - 1) * 6
    local stock = stocks[math.floor(tonumber(ARGV[a + 4]) / 4294967296)]
    if not stock then
      return redis.error_reply('store.lua: a token names no sub-stock')
    end
    local cents = tonumber(ARGV[a + 5])
    if not (cents > 0) then
      return redis.error_reply('store.lua: a token that takes must be worth something')
    end
    if stock[1] ~= 0 then
      refused[i] = stock[1]
    elseif cents > stock[2] then
      refused[i] = 0
    else
      stock[2] = stock[2] - cents
      stock[3] = stock[3] + cents
    end
  end
  for j = 1, k do
    if stocks[j][3] > 0 then
      stocks[j][2] = redis.call('HINCRBY', KEYS[s + j], 'avail', -stocks[j][3])
    end
    stocks[j][3] = 0
  end
end
local out = {}
local lines = {}
for i = 1, n do
  local a = base + (i - 1) * 6
  local otn, tokens = ARGV[a], KEYS[t + 2 * i - 1]
  local where, cents = tonumber(ARGV[a + 4]), tonumber(ARGV[a + 5])
  if refused[i] then
    out[i] = redis.call('HGET', tokens, otn) or refused[i]
  elseif redis.call('HSETNX', tokens, otn, ARGV[a + 1]) == 0 then
    out[i] = redis.call('HGET', tokens, otn)
    local stock = stocks[math.floor(where / 4294967296)]
    if stock then
      stock[3] = stock[3] + cents
    end
  else
    redis.call('HSET', KEYS[t + 2 * i], otn, ARGV[a + 2])
    local stream = math.floor(where / 65536) % 65536
    local mine = lines[stream]
    if not mine then
      mine = {}
      lines[stream] = mine
    end
    mine[#mine + 1] = ARGV[a + 3]
    out[i] = false
  end
  if out[i] ~= false then
    local counted = groups[where % 65536]
    counted[1] = counted[1] - 1
    counted[2] = counted[2] - cents
  end
end
for j = 1, k do
  local stock = stocks[j]
  if stock[3] > 0 then
    stock[2] = redis.call('HINCRBY', KEYS[s + j], 'avail', stock[3])
  end
  out[n + 2 * j - 1] = stock[1]
  out[n + 2 * j] = stock[2]
end
for stream, mine in pairs(lines) do
  redis.call('XADD', KEYS[stream], '*', 'b', table.concat(mine, '\n'))
end
for j = 1, g do
  local counted = groups[j]
  if counted[1] > 0 then
    local a = 5 + (j - 1) * 5
    local key, hour, gen = KEYS[tonumber(ARGV[a])], ARGV[a + 1], ARGV[a + 2]
    redis.call('HINCRBY', key, hour .. ':n', counted[1])
    redis.call('HINCRBY', key, hour .. ':c', counted[2])
    redis.call('HINCRBY', key, gen .. ':n', counted[1])
    redis.call('HINCRBY', key, gen .. ':c', counted[2])
  end
end
return out
