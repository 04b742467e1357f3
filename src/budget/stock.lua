-- Shared head of every sub-stock script (prepended by budget.rs).
-- A sub-stock hash holds `avail` (cents that may be spent), `funded` (sum of the grants
-- applied), `rid` (the identity of the Redis data it was initialised in), `closed` and
-- `drained` once drained, and `g:<grant id>` for every grant applied (idempotency).
--
-- The identity is the process's run_id with its replication id: a restart (even from an
-- AOF missing its last second) changes the first, a failover or a failback to a former
-- master whose writes were lost changes the second.
--
-- stock_state(key) is 0 when the sub-stock may be spent; 1 when it was drained; 2 when
-- it was initialised under another identity (its `avail` may have been rewound and
-- cannot be trusted); 3 when it does not exist (never initialised, or lost to a flush).
local function run_id()
  local info = redis.call('INFO', 'server', 'replication')
  return (string.match(info, 'run_id:(%w+)') or '') .. ':' ..
    (string.match(info, 'master_replid:(%w+)') or '')
end
local function stock_state(key)
  local f = redis.call('HMGET', key, 'rid', 'closed')
  if f[2] then return 1 end
  if not f[1] then return 3 end
  if f[1] ~= run_id() then return 2 end
  return 0
end

-- Takes ARGV[first], ARGV[first + 1], ... from a spendable sub-stock, in order, each whole
-- while `avail` covers it (an amount it does not cover is skipped). `avail` never goes
-- below zero. Returns {0, avail_after_cents, taken...} with taken 1 or 0 per amount.
local function take_amounts(key, first)
  local avail = tonumber(redis.call('HGET', key, 'avail') or '0')
  local out = {0, 0}
  local total = 0
  for i = first, #ARGV do
    local amount = tonumber(ARGV[i])
    if amount > 0 and amount <= avail then
      avail = avail - amount
      total = total + amount
      out[#out + 1] = 1
    else
      out[#out + 1] = 0
    end
  end
  if total > 0 then
    avail = redis.call('HINCRBY', key, 'avail', -total)
  end
  out[2] = avail
  return out
end
