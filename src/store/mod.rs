//! Connections to Redis and MySQL, and where every Redis key lives.
//!
//! Redis layout (`P` = key prefix, `p` = partition = `user_id mod partitions`). Every key
//! of one user sits in the hash tag `{p}`, so one Lua script can touch the user's tokens,
//! the partition's counters and the partition's stream atomically, also on a cluster:
//!
//! | key | type | holds |
//! |---|---|---|
//! | `P{p}:tok:{user}` | hash | out_trade_no → encoded SignedToken |
//! | `P{p}:st:{user}` | hash | out_trade_no → `p\|amount\|at_ms\|activity\|scene\|gen` (`s…` once settled); the account snapshot `=s` (`version\|balance\|income\|withdrawn`), `=r` (`identity\|age`) and fences `=f:<id>` (mark.lua) |
//! | `P{p}:acct:{user}` | hash | earlier releases' account snapshot; kept only in `wallet.snapshot_compat` |
//! | `P{p}:cnt:{activity}` | hash | per-hour issuance counters `{hour}:n`, `{hour}:c`, settled `{hour}:sn`, `{hour}:sc` |
//! | `P{p}:settle` | stream | one entry per token to book |
//! | `P{p}:settled` | zset | `user\|out_trade_no` by settle time, for trimming |
//! | `P:bud:{activity.gen.i}` | hash | budget sub-stock i of a generation: `avail`, `funded`, `rid`, grant ids (each in its own slot) |
//! | `P{p}:bud:activity.gen.i` | hash | the same, for a generation placed in the partitions (`issue.sub_stocks_in_partitions`): sub-stock i in partition `i mod n`, n the partitions when it opened (`budget_generations.stock_partitions`), so one store call on a cluster takes and stores |
//! | `P{p}:parked` | stream | settlement entries no booking could take, for operators |
//! | `P{p}:markers` | zset | `user\|out_trade_no` of trimmed tokens by the time their marker may go |
//! | `P:stats:{activity}` | hash | shared issued counter (`n`, `c`) |
//! | `P:switches` | hash | degradation switches |
//! | `P:lock:{job}` | string | cron job lock (owner token, with expiry) |
//! | `P:rl:{scope}:{second}` | string | a rate limit's fleet-wide count for one second (expires) |

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use anyhow::Context;
use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster_async::ClusterConnection;

use crate::config::RedisSettings;
use crate::domain::UserId;

mod db;
mod scripts;

pub use db::{bucket_of, Db, BUCKETS, MIGRATOR};
/// The head that defines `run_id()` (the identity of the Redis data) for the scripts
/// that must tell data written in another Redis life from their own.
pub const IDENTITY_LUA: &str = include_str!("identity.lua");

/// Where a budget generation's sub-stocks live: each in a slot of its own (`Spread`), or
/// sub-stock i in the slot of partition `i mod n` of the `n` partitions there were when
/// the generation opened (`InPartitions(n)`), beside the tokens a store call of that
/// partition writes, so that on a cluster the call can take from it too. Recorded per
/// generation (`budget_generations.stock_partitions`: 0 for spread, else `n`), so a
/// generation's keys never move, not even with `redis.partitions`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum StockPlacement {
    #[default]
    Spread,
    InPartitions(u32),
}

impl StockPlacement {
    /// The placement `budget_generations.stock_partitions` records.
    pub fn recorded(stock_partitions: i32) -> Self {
        match u32::try_from(stock_partitions) {
            Ok(n) if n > 0 => Self::InPartitions(n),
            _ => Self::Spread,
        }
    }
    /// What `budget_generations.stock_partitions` records for this placement.
    pub fn to_record(self) -> i32 {
        match self {
            Self::Spread => 0,
            Self::InPartitions(n) => i32::try_from(n).unwrap_or(i32::MAX),
        }
    }
    pub fn in_partitions(self) -> bool {
        self != Self::Spread
    }
    /// The partition whose slot holds sub-stock `index` (`None`: spread, a slot of its
    /// own).
    pub fn partition_of(self, index: u32) -> Option<u32> {
        match self {
            Self::Spread => None,
            Self::InPartitions(n) => Some(index % n.max(1)),
        }
    }
}

/// The identity of the Redis data as `run_id()` of [`IDENTITY_LUA`] gives it, read from
/// the text of `INFO server replication` (taken in the same transaction as the data it
/// qualifies): `<run_id>:<master_replid>`, each the alphanumeric run after its field
/// name, empty when absent.
pub fn identity_of(info: &str) -> String {
    let field = |name: &str| {
        info.find(name).map_or("", |at| {
            let rest = &info[at + name.len()..];
            let end = rest
                .find(|c: char| !c.is_ascii_alphanumeric())
                .unwrap_or(rest.len());
            &rest[..end]
        })
    };
    format!("{}:{}", field("\nrun_id:"), field("\nmaster_replid:"))
}

pub use scripts::{
    evalsha, key_slot, load_scripts, query_scripted, script, script_with_identity, slot_tag,
};

pub const SETTLE_GROUP: &str = "settle";

/// A connection to a single Redis node or to a Redis Cluster. Commands and pipelines
/// sent through it must stay within one hash slot on a cluster ([`query_scripted`] and
/// [`Redis::query`] split a pipeline by slot).
#[derive(Clone)]
pub enum RedisConn {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

impl ConnectionLike for RedisConn {
    fn req_packed_command<'a>(
        &'a mut self,
        cmd: &'a redis::Cmd,
    ) -> redis::RedisFuture<'a, redis::Value> {
        match self {
            RedisConn::Single(c) => c.req_packed_command(cmd),
            RedisConn::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipe: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> redis::RedisFuture<'a, Vec<redis::Value>> {
        match self {
            RedisConn::Single(c) => c.req_packed_commands(pipe, offset, count),
            RedisConn::Cluster(c) => c.req_packed_commands(pipe, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            RedisConn::Single(c) => c.get_db(),
            RedisConn::Cluster(c) => c.get_db(),
        }
    }
}

pub struct Redis {
    conns: Vec<RedisConn>,
    next: AtomicUsize,
    prefix: String,
    partitions: u32,
    cluster: bool,
}

impl Redis {
    /// Connects to `redis.cluster_urls` when given (a Redis Cluster), else to
    /// `redis.url` (one node).
    pub async fn connect(settings: &RedisSettings) -> anyhow::Result<Self> {
        let timeout = Duration::from_millis(settings.command_timeout_ms);
        if !settings.cluster_urls.is_empty() {
            let nodes: Vec<String> = settings
                .cluster_urls
                .iter()
                .map(|u| u.expose().to_string())
                .collect();
            let client = redis::cluster::ClusterClient::builder(nodes)
                .connection_timeout(timeout)
                .response_timeout(timeout)
                .retries(settings.cluster_retries)
                .build()
                .context("redis.cluster_urls")?;
            let mut conns = Vec::with_capacity(settings.connections);
            for _ in 0..settings.connections {
                let conn = tokio::time::timeout(
                    timeout.max(Duration::from_secs(5)),
                    client.get_async_connection(),
                )
                .await
                .context("connecting to the redis cluster timed out")?
                .context("connecting to the redis cluster")?;
                conns.push(RedisConn::Cluster(conn));
            }
            return Ok(Self {
                conns,
                next: AtomicUsize::new(0),
                prefix: settings.key_prefix.clone(),
                partitions: settings.partitions,
                cluster: true,
            });
        }
        let client = redis::Client::open(settings.url.expose()).context("redis.url")?;
        let config = ConnectionManagerConfig::new()
            .set_response_timeout(timeout)
            .set_connection_timeout(timeout)
            .set_number_of_retries(2)
            .set_max_delay(500);
        let mut conns = Vec::with_capacity(settings.connections);
        for _ in 0..settings.connections {
            let conn = tokio::time::timeout(
                timeout,
                ConnectionManager::new_with_config(client.clone(), config.clone()),
            )
            .await
            .context("connecting to redis timed out")?
            .context("connecting to redis")?;
            conns.push(RedisConn::Single(conn));
        }
        Ok(Self {
            conns,
            next: AtomicUsize::new(0),
            prefix: settings.key_prefix.clone(),
            partitions: settings.partitions,
            cluster: false,
        })
    }

    /// A multiplexed connection; calls are spread over the configured number.
    pub fn conn(&self) -> RedisConn {
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.conns.len();
        self.conns[i].clone()
    }

    /// Whether this is a Redis Cluster.
    pub fn is_cluster(&self) -> bool {
        self.cluster
    }

    /// Runs a pipeline of plain commands; on a cluster it is split by hash slot (see
    /// [`query_scripted`]).
    pub async fn query<T: redis::FromRedisValue>(
        &self,
        pipe: &redis::Pipeline,
    ) -> redis::RedisResult<T> {
        query_scripted(self, pipe, &[]).await
    }

    pub fn partitions(&self) -> u32 {
        self.partitions
    }

    /// Deletes every key under this instance's prefix (SCAN, on every master of a
    /// cluster); returns how many. For data that may go whole (shadow traffic).
    pub async fn delete_prefixed(&self) -> redis::RedisResult<u64> {
        let keys = self.scan(&format!("{}*", self.prefix)).await?;
        self.unlink(&keys).await?;
        Ok(keys.len() as u64)
    }

    /// Deletes `keys`, 500 to a pipeline.
    async fn unlink(&self, keys: &[String]) -> redis::RedisResult<()> {
        self.per_key(keys, |pipe, key| {
            pipe.cmd("UNLINK").arg(key).ignore();
        })
        .await
    }

    /// Sends the commands `add` writes for each of `keys`, 500 keys to a pipeline.
    async fn per_key(
        &self,
        keys: &[String],
        add: impl Fn(&mut redis::Pipeline, &str),
    ) -> redis::RedisResult<()> {
        for chunk in keys.chunks(500) {
            let mut pipe = redis::pipe();
            for key in chunk {
                add(&mut pipe, key);
            }
            self.query::<()>(&pipe).await?;
        }
        Ok(())
    }

    /// Forgets every account snapshot this deployment keeps in Redis (the `=s` and `=r`
    /// fields of the status hashes, and the hashes of earlier releases, `acct:`), so no
    /// view trusts one until the user's next booking writes it again: after MySQL was
    /// restored from a backup the snapshots may be ahead of it. Fences stay. Returns the
    /// status hashes and legacy hashes seen.
    pub async fn forget_snapshots(&self) -> redis::RedisResult<(u64, u64)> {
        let statuses = self.scan(&format!("{}{{*}}:st:*", self.prefix)).await?;
        self.per_key(&statuses, |pipe, key| {
            pipe.hdel(key, &["=s", "=r"]).ignore();
        })
        .await?;
        let legacy = self.legacy_snapshot_keys().await?;
        self.unlink(&legacy).await?;
        Ok((statuses.len() as u64, legacy.len() as u64))
    }

    /// Every snapshot hash of earlier releases (`acct:`, [`Redis::legacy_snapshot_key`]).
    async fn legacy_snapshot_keys(&self) -> redis::RedisResult<Vec<String>> {
        self.scan(&format!("{}{{*}}:acct:*", self.prefix)).await
    }

    /// The users that still have a snapshot hash of earlier releases (`acct:`).
    pub async fn legacy_snapshot_users(&self) -> redis::RedisResult<Vec<UserId>> {
        let keys = self.legacy_snapshot_keys().await?;
        Ok(keys
            .iter()
            .filter_map(|k| k.rsplit_once(":acct:")?.1.parse::<i64>().ok())
            .filter_map(|id| UserId::parse(id).ok())
            .collect())
    }

    /// The keys matching `pattern` (SCAN, on every master of a cluster), sorted.
    async fn scan(&self, pattern: &str) -> redis::RedisResult<Vec<String>> {
        let mut keys: Vec<String> = Vec::new();
        match self.conn() {
            RedisConn::Single(mut conn) => {
                let mut cursor = 0u64;
                loop {
                    let (next, batch): (u64, Vec<String>) = redis::cmd("SCAN")
                        .arg(cursor)
                        .arg("MATCH")
                        .arg(pattern)
                        .arg("COUNT")
                        .arg(1000)
                        .query_async(&mut conn)
                        .await?;
                    keys.extend(batch);
                    cursor = next;
                    if cursor == 0 {
                        break;
                    }
                }
            }
            RedisConn::Cluster(mut conn) => {
                use redis::cluster_routing::{Route, RoutingInfo, SingleNodeRoutingInfo, SlotAddr};
                // One slot of each master, to route SCAN there.
                // Each range: start, end, the master, then its replicas.
                let ranges: Vec<Vec<redis::Value>> = redis::cmd("CLUSTER")
                    .arg("SLOTS")
                    .query_async(&mut conn)
                    .await?;
                for range in ranges {
                    let Some(first) = range.first() else {
                        continue;
                    };
                    let first: u16 = redis::from_redis_value(first)?;
                    let route = RoutingInfo::SingleNode(SingleNodeRoutingInfo::SpecificNode(
                        Route::new(first, SlotAddr::Master),
                    ));
                    let mut cursor = 0u64;
                    loop {
                        let mut scan = redis::cmd("SCAN");
                        scan.arg(cursor)
                            .arg("MATCH")
                            .arg(pattern)
                            .arg("COUNT")
                            .arg(1000);
                        let reply = conn.route_command(&scan, route.clone()).await?;
                        let (next, batch): (u64, Vec<String>) = redis::from_redis_value(&reply)?;
                        keys.extend(batch);
                        cursor = next;
                        if cursor == 0 {
                            break;
                        }
                    }
                }
            }
        }
        keys.sort();
        keys.dedup();
        Ok(keys)
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    pub fn partition_of(&self, user: UserId) -> u32 {
        user.partition(self.partitions)
    }

    pub fn tokens_key(&self, user: UserId) -> String {
        format!(
            "{}{{{}}}:tok:{}",
            self.prefix,
            self.partition_of(user),
            user
        )
    }
    pub fn status_key(&self, user: UserId) -> String {
        format!("{}{{{}}}:st:{}", self.prefix, self.partition_of(user), user)
    }
    /// Where earlier releases kept a user's account snapshot and fences; this one keeps
    /// them in the status hash, mirrors fences here and empties it (see mark.lua).
    pub fn legacy_snapshot_key(&self, user: UserId) -> String {
        format!(
            "{}{{{}}}:acct:{}",
            self.prefix,
            self.partition_of(user),
            user
        )
    }
    pub fn counters_key(&self, partition: u32, activity: &str) -> String {
        format!("{}{{{}}}:cnt:{}", self.prefix, partition, activity)
    }
    pub fn stream_key(&self, partition: u32) -> String {
        format!("{}{{{}}}:settle", self.prefix, partition)
    }
    /// When the current life of the Redis data holding the partition began (`rid`,
    /// `since` ms), as of the first script that found none of the current identity (a
    /// snapshot's mark, a one-win claim, an instance starting): a flush, a restart or a
    /// failover starts another (see `tokens/mark.lua`, `issue/claim_wins.lua`). A fact about the Redis data, not
    /// about this deployment's keys, so it has no key prefix (the hash tag keeps it in
    /// the partition's slot): a deployment that starts on a Redis that has long been
    /// running is not in a new life.
    pub fn life_key(&self, partition: u32) -> String {
        format!("rpw:{{{partition}}}:life")
    }
    pub fn settled_index_key(&self, partition: u32) -> String {
        format!("{}{{{}}}:settled", self.prefix, partition)
    }
    /// Budget sub-stock `index` of generation `gen` of `activity` (or coupon template),
    /// where the generation's placement puts it.
    pub fn sub_stock_key(
        &self,
        activity: &str,
        gen: i64,
        index: u32,
        placement: StockPlacement,
    ) -> String {
        match placement.partition_of(index) {
            None => format!("{}:bud:{{{}.{}.{}}}", self.prefix, activity, gen, index),
            Some(partition) => format!(
                "{}{{{}}}:bud:{}.{}.{}",
                self.prefix, partition, activity, gen, index
            ),
        }
    }
    pub fn parked_key(&self, partition: u32) -> String {
        format!("{}{{{}}}:parked", self.prefix, partition)
    }
    /// The scenes a user won, for scenes giving one win per user (field
    /// `{activity}/{scene}`, value the winning out_trade_no).
    pub fn wins_key(&self, user: UserId) -> String {
        format!(
            "{}{{{}}}:wins:{}",
            self.prefix,
            self.partition_of(user),
            user
        )
    }
    /// A user's requests reaching issuing in one second (`second`: ms / 1000).
    pub fn burst_key(&self, user: UserId, second: i64) -> String {
        format!(
            "{}{{{}}}:burst:{}:{}",
            self.prefix,
            self.partition_of(user),
            user,
            second
        )
    }
    /// Flagged users (see `issue::guards`), all in one slot.
    pub fn flagged_keys(&self) -> FlaggedKeys {
        let key = |name: &str| format!("{}{{guards}}:{name}", self.prefix);
        FlaggedKeys {
            set: key("flagged"),
            why: key("flagged:why"),
            whole: key("flagged:whole"),
            restoring: key("flagged:restoring"),
        }
    }
    /// A group red packet's cache (see `packets`): its own hash tag, so every operation
    /// on one packet runs in one slot.
    pub fn packet_key(&self, packet: &str) -> String {
        format!("{}{{pk:{}}}:packet", self.prefix, packet)
    }
    pub fn markers_key(&self, partition: u32) -> String {
        format!("{}{{{}}}:markers", self.prefix, partition)
    }
    pub fn stats_key(&self, activity: &str) -> String {
        format!("{}:stats:{}", self.prefix, activity)
    }
    pub fn switches_key(&self) -> String {
        format!("{}:switches", self.prefix)
    }
    /// The fleet's counter of a rate limit for one second.
    pub fn limit_key(&self, scope: &str, second: i64) -> String {
        format!("{}:rl:{}:{}", self.prefix, scope, second)
    }
    pub fn lock_key(&self, job: &str) -> String {
        format!("{}:lock:{}", self.prefix, job)
    }

    /// Creates the settlement consumer group on every partition stream (idempotent).
    pub async fn ensure_groups(&self) -> anyhow::Result<()> {
        let mut conn = self.conn();
        for p in 0..self.partitions {
            ensure_group(&mut conn, &self.stream_key(p)).await?;
        }
        Ok(())
    }

    pub async fn ping(&self) -> redis::RedisResult<()> {
        let mut conn = self.conn();
        redis::cmd("PING").query_async::<String>(&mut conn).await?;
        Ok(())
    }
}

pub async fn ensure_group(conn: &mut RedisConn, stream: &str) -> anyhow::Result<()> {
    let created: redis::RedisResult<String> = redis::cmd("XGROUP")
        .arg("CREATE")
        .arg(stream)
        .arg(SETTLE_GROUP)
        .arg("0")
        .arg("MKSTREAM")
        .query_async(conn)
        .await;
    match created {
        Ok(_) => Ok(()),
        Err(err) if err.code() == Some("BUSYGROUP") => Ok(()),
        Err(err) => Err(err).context("creating the settlement consumer group"),
    }
}

pub fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

/// The UTC hour an instant falls in, as the counters name it: `YYYYMMDDHH`.
pub fn hour_of(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .unwrap_or_default()
        .format("%Y%m%d%H")
        .to_string()
}

/// The keys of the flagged users.
pub struct FlaggedKeys {
    /// A sorted set: user id, scored by when last flagged (ms).
    pub set: String,
    /// User id → the last flag's reason.
    pub why: String,
    /// The identity of the Redis data the set was last restored in from MySQL.
    pub whole: String,
    /// The token of the restore under way (a flush takes it away mid-restore).
    pub restoring: String,
}

#[cfg(test)]
mod tests {
    use super::identity_of;

    #[test]
    fn the_identity_is_read_from_info_as_the_scripts_read_it() {
        let info = "# Server\r\nredis_version:7.0.15\r\nrun_id:df0a232ce6\r\ntcp_port:6379\r\n\r\n\
                    # Replication\r\nrole:master\r\nmaster_replid:ad785d861b\r\nmaster_replid2:0000\r\n";
        assert_eq!(identity_of(info), "df0a232ce6:ad785d861b");
        // `master_replid2` is not `master_replid`, whichever comes first.
        let info = "# Replication\r\nmaster_replid2:0000\r\nmaster_replid:ab12\r\n";
        assert_eq!(identity_of(info), ":ab12");
        assert_eq!(identity_of(""), ":");
    }
}
