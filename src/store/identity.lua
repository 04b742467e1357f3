-- The identity of the Redis data a script runs in: the process's run_id with its
-- replication id. A restart (even from an AOF missing its last second) changes the first,
-- a failover or a failback to a former master whose writes were lost changes the second.
-- Anything written under another identity may have been rewound and is not trusted.
local function run_id()
  local info = redis.call('INFO', 'server', 'replication')
  return (string.match(info, 'run_id:(%w+)') or '') .. ':' ..
    (string.match(info, 'master_replid:(%w+)') or '')
end
