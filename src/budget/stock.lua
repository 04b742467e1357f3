-- Shared head of every sub-stock script (prepended by budget/mod.rs).
-- A sub-stock hash holds `avail` (cents that may be spent), `funded` (sum of the grants
-- applied), `rid` (the identity of the Redis data it was initialised in), `closed` and
-- `drained` once drained, and `g:<grant id>` for every grant applied (idempotency).
--
-- run_id() is the identity of the Redis data (src/store/identity.lua, prepended too).
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
