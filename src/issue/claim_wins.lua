-- Claims one-win wins in one partition, and tells when the partition's current Redis
-- life began (the life hash of `tokens/mark.lua`: `rid`, `since`; a flush, a restart or
-- a failover starts another, and this script starts it when it finds none of this
-- identity). A claim made before that may have been lost, so the caller checks the
-- award's own claim (made now, or held by a twin request) in a scene that opened before
-- it against the ledger.
-- KEYS[1]: the partition's life hash; KEYS[2 ..]: award i's user's wins hash (same slot)
-- ARGV[2i-1], ARGV[2i]: award i's scene (`activity/scene`) and out_trade_no
-- Returns {since (ms), then per award: '1' when its claim was made now else '0', and the
-- holder of the scene's claim after this call}.
-- With no awards it only starts the life where none is held (an instance starting).
local rid = run_id()
local life = redis.call('HMGET', KEYS[1], 'rid', 'since')
local since = life[2]
if life[1] ~= rid or not since then
  local t = redis.call('TIME')
  since = tostring(tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000))
  redis.call('HSET', KEYS[1], 'rid', rid, 'since', since)
end
local out = {since}
for i = 2, #KEYS do
  local scene, otn = ARGV[2 * i - 3], ARGV[2 * i - 2]
  out[2 * i - 2] = tostring(redis.call('HSETNX', KEYS[i], scene, otn))
  out[2 * i - 1] = redis.call('HGET', KEYS[i], scene)
end
return out
