-- The identity of the Redis data a script runs in: the process's run_id with its
-- replication id. A restart (even from an AOF missing its last second) changes the first,
-- a failover or a failback to a former master whose writes were lost changes the second.
-- Anything written under another identity may have been rewound and is not trusted.
-- Plain finds rather than patterns over the whole text: this runs in every take, view
-- and mark, and a pattern scan of INFO cost more than the INFO itself. It cannot change
-- while a script runs, so a script reads it once however often it asks.
local identity
local function run_id()
  if identity then return identity end
  local info = redis.call('INFO', 'server', 'replication')
  local function field(name)
    local at = string.find(info, name, 1, true)
    return at and string.match(info, '^%w+', at + #name) or ''
  end
  identity = field('\nrun_id:') .. ':' .. field('\nmaster_replid:')
  return identity
end
