-- Drains a sub-stock for good: no take or grant succeeds on it afterwards. Repeatable:
-- a second call answers what the first one drained.
-- KEYS[1]: the sub-stock hash
-- Returns {state, drained_cents, applied grant id, ...} where state is 0 (drained now or
-- before) or 2/3 (lost, see stock.lua: nothing drained, its grants are in doubt). A lost
-- sub-stock is closed too, so no instance spends it later, whatever it comes back as.
local state = stock_state(KEYS[1])
if state == 2 then
  redis.call('HSET', KEYS[1], 'closed', '1', 'lost', '1', 'avail', '0')
  return {2, 0}
end
if state == 3 then return {3, 0} end
if redis.call('HGET', KEYS[1], 'lost') then return {2, 0} end
-- Drained before: still to be trusted only under the identity it was drained in.
if state == 1 and redis.call('HGET', KEYS[1], 'rid') ~= run_id() then return {2, 0} end
if state == 0 then
  local avail = redis.call('HGET', KEYS[1], 'avail') or '0'
  redis.call('HSET', KEYS[1], 'closed', '1', 'drained', avail, 'avail', '0')
end
local out = {0, tonumber(redis.call('HGET', KEYS[1], 'drained') or '0')}
for _, field in ipairs(redis.call('HKEYS', KEYS[1])) do
  if string.sub(field, 1, 2) == 'g:' then
    out[#out + 1] = tonumber(string.sub(field, 3))
  end
end
return out
