-- Shared head of every sub-stock script (prepended by budget.rs).
-- A sub-stock hash holds `avail` (cents that may be spent), `funded` (sum of the grants
-- applied), `rid` (the run_id of the Redis process that initialised it), `closed` and
-- `drained` once drained, and `g:<grant id>` for every grant applied (idempotency).
--
-- stock_state(key) is 0 when the sub-stock may be spent; 1 when it was drained; 2 when
-- it was initialised by another Redis process (a restart from an older AOF or a failover
-- may have rewound it, so its `avail` cannot be trusted); 3 when it does not exist
-- (never initialised, or lost to a flush).
local function run_id()
  return string.match(redis.call('INFO', 'server'), 'run_id:(%w+)')
end
local function stock_state(key)
  local f = redis.call('HMGET', key, 'rid', 'closed')
  if f[2] then return 1 end
  if not f[1] then return 3 end
  if f[1] ~= run_id() then return 2 end
  return 0
end
