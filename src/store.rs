//! Connections to Redis and MySQL, and where every Redis key lives.
//!
//! Redis layout (`P` = key prefix, `p` = partition = `user_id mod partitions`). Every key
//! of one user sits in the hash tag `{p}`, so one Lua script can touch the user's tokens,
//! the partition's counters and the partition's stream atomically, also on a cluster:
//!
//! | key | type | holds |
//! |---|---|---|
//! | `P{p}:tok:{user}` | hash | out_trade_no → encoded SignedToken |
//! | `P{p}:st:{user}` | hash | out_trade_no → `p\|amount\|at_ms\|activity\|scene` (`s…` once settled) |
//! | `P{p}:acct:{user}` | hash | last booked account snapshot (v, b, i, w), for degraded views |
//! | `P{p}:cnt:{activity}` | hash | per-hour issuance counters `{hour}:n`, `{hour}:c`, settled `{hour}:sn`, `{hour}:sc` |
//! | `P{p}:settle` | stream | one entry per token to book |
//! | `P{p}:settled` | zset | `user\|out_trade_no` by settle time, for trimming |
//! | `P:bud:{activity.gen.i}` | hash | budget sub-stock i of a generation: `avail`, `funded`, `rid`, grant ids (each in its own slot) |
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
use sqlx::mysql::{MySqlConnectOptions, MySqlPoolOptions};
use sqlx::MySqlPool;

use crate::config::{MysqlSettings, RedisSettings};
use crate::domain::UserId;

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
    pub fn snapshot_key(&self, user: UserId) -> String {
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
    pub fn settled_index_key(&self, partition: u32) -> String {
        format!("{}{{{}}}:settled", self.prefix, partition)
    }
    pub fn sub_stock_key(&self, activity: &str, gen: i64, index: u32) -> String {
        format!("{}:bud:{{{}.{}.{}}}", self.prefix, activity, gen, index)
    }
    pub fn parked_key(&self, partition: u32) -> String {
        format!("{}{{{}}}:parked", self.prefix, partition)
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

/// Builds an EVALSHA command for `script` so it can sit in a pipeline. A pipeline that
/// fails with NOSCRIPT (Redis restarted or flushed) is retried after [`load_scripts`].
/// Arguments are added by the caller with `.arg(..)`.
pub fn evalsha(script: &redis::Script, keys: &[&str]) -> redis::Cmd {
    let mut cmd = redis::cmd("EVALSHA");
    cmd.arg(script.get_hash()).arg(keys.len()).arg(keys);
    cmd
}

pub async fn load_scripts(
    conn: &mut RedisConn,
    scripts: &[&redis::Script],
) -> redis::RedisResult<()> {
    for script in scripts {
        script.prepare_invoke().load_async(conn).await?;
    }
    Ok(())
}

/// Runs a pipeline of commands (EVALSHA calls of `scripts`, or plain commands). A call
/// answered NOSCRIPT (Redis restarted, failed over or flushed its script cache) did not
/// run: the scripts are loaded and exactly those calls are sent again (a few times at
/// most, should the cache be flushed once more in between), so no call ever runs twice
/// and each answer means what it says.
///
/// On a cluster the pipeline is split into one pipeline per hash slot (each command's
/// first key names its slot), sent concurrently; the answers come back in the order of
/// the commands. Every command must therefore touch one slot only.
pub async fn query_scripted<T: redis::FromRedisValue>(
    redis: &Redis,
    pipe: &redis::Pipeline,
    scripts: &[&redis::Script],
) -> redis::RedisResult<T> {
    if pipe.is_empty() {
        return redis::from_owned_redis_value(redis::Value::Array(Vec::new()));
    }
    let values = if redis.is_cluster() {
        let groups = split_by_slot(pipe);
        if groups.len() == 1 {
            run_scripted(redis.conn(), pipe, scripts).await?
        } else {
            let runs = groups
                .iter()
                .map(|(_, part)| run_scripted(redis.conn(), part, scripts));
            let answers = futures::future::try_join_all(runs).await?;
            let mut values = vec![redis::Value::Nil; pipe.len()];
            for ((indices, _), answer) in groups.iter().zip(answers) {
                for (&i, v) in indices.iter().zip(answer) {
                    values[i] = v;
                }
            }
            values
        }
    } else {
        run_scripted(redis.conn(), pipe, scripts).await?
    };
    redis::from_owned_redis_value(redis::Value::Array(values).extract_error()?)
}

/// The sources of the service's scripts by SHA1, so a call answered NOSCRIPT can be
/// sent again as EVAL (which also caches the script on that node).
static SOURCES: std::sync::OnceLock<std::sync::Mutex<std::collections::HashMap<String, String>>> =
    std::sync::OnceLock::new();

/// A Lua script of the service: a [`redis::Script`] whose source is remembered for
/// the NOSCRIPT fallback of [`query_scripted`].
pub fn script(source: &str) -> redis::Script {
    let script = redis::Script::new(source);
    SOURCES
        .get_or_init(Default::default)
        .lock()
        .expect("script registry poisoned")
        .insert(script.get_hash().to_string(), source.to_string());
    script
}

/// One pipeline on one connection, with the NOSCRIPT retry of [`query_scripted`].
///
/// A single node answers each command apart, so exactly the calls answered NOSCRIPT are
/// sent again after the scripts are loaded. A cluster answers a pipeline whole: one
/// NOSCRIPT fails it all. That happens on a node that has never seen the caller's
/// scripts (a replica promoted by a failover): scripts are always loaded as a set (the
/// caller's `scripts`), so such a node has none of them and no call of the pipeline
/// ran. The set is loaded on the node serving the pipeline's slot and the pipeline is
/// sent again.
async fn run_scripted(
    mut conn: RedisConn,
    pipe: &redis::Pipeline,
    scripts: &[&redis::Script],
) -> redis::RedisResult<Vec<redis::Value>> {
    const ATTEMPTS: usize = 3;
    if let RedisConn::Cluster(cluster) = &mut conn {
        let mut attempt = 1;
        loop {
            match cluster.req_packed_commands(pipe, 0, pipe.len()).await {
                Err(err)
                    if err.kind() == redis::ErrorKind::NoScriptError
                        && attempt < ATTEMPTS
                        && !scripts.is_empty() =>
                {
                    attempt += 1;
                    let slot = pipe
                        .cmd_iter()
                        .find_map(first_key)
                        .map(|k| key_slot(&k))
                        .unwrap_or(0);
                    load_on_slot(cluster, slot, scripts).await?;
                }
                other => return other,
            }
        }
    }
    let mut values = conn.req_packed_commands(pipe, 0, pipe.len()).await?;
    let commands: Vec<&redis::Cmd> = pipe.cmd_iter().collect();
    for _ in 1..ATTEMPTS {
        let not_run: Vec<usize> = values
            .iter()
            .enumerate()
            .filter(|(_, v)| matches!(v, redis::Value::ServerError(e) if e.code() == "NOSCRIPT"))
            .map(|(i, _)| i)
            .collect();
        if not_run.is_empty() || scripts.is_empty() {
            break;
        }
        load_scripts(&mut conn, scripts).await?;
        let mut again = redis::pipe();
        for &i in &not_run {
            again.add_command(commands[i].clone());
        }
        let answers = conn.req_packed_commands(&again, 0, again.len()).await?;
        for (i, answer) in not_run.into_iter().zip(answers) {
            values[i] = answer;
        }
    }
    Ok(values)
}

/// Loads `scripts` on the master serving `slot`.
async fn load_on_slot(
    cluster: &mut ClusterConnection,
    slot: u16,
    scripts: &[&redis::Script],
) -> redis::RedisResult<()> {
    use redis::cluster_routing::{Route, RoutingInfo, SingleNodeRoutingInfo, SlotAddr};
    let sources = SOURCES.get_or_init(Default::default);
    for script in scripts {
        let source = sources
            .lock()
            .expect("script registry poisoned")
            .get(script.get_hash())
            .cloned();
        let Some(source) = source else {
            return Err(redis::RedisError::from((
                redis::ErrorKind::ClientError,
                "a script not made with store::script cannot be loaded on one node",
            )));
        };
        let mut load = redis::cmd("SCRIPT");
        load.arg("LOAD").arg(source);
        let route = RoutingInfo::SingleNode(SingleNodeRoutingInfo::SpecificNode(Route::new(
            slot,
            SlotAddr::Master,
        )));
        cluster.route_command(&load, route).await?;
    }
    Ok(())
}

/// CRC16/XMODEM, the checksum Redis Cluster computes slots with.
fn crc16(bytes: &[u8]) -> u16 {
    let mut crc: u16 = 0;
    for &b in bytes {
        crc ^= u16::from(b) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc
}

/// The cluster slot of a key (its hash tag's, when it has one).
pub fn key_slot(key: &[u8]) -> u16 {
    crc16(slot_tag(key)) % 16_384
}

/// The hash tag a key's slot is computed from: the part between the first `{` and the
/// next `}` when not empty, else the whole key.
pub fn slot_tag(key: &[u8]) -> &[u8] {
    if let Some(open) = key.iter().position(|&b| b == b'{') {
        if let Some(len) = key[open + 1..].iter().position(|&b| b == b'}') {
            if len > 0 {
                return &key[open + 1..open + 1 + len];
            }
        }
    }
    key
}

/// The first key of a command: after the script and key count for EVAL/EVALSHA, the
/// first argument otherwise.
fn first_key(cmd: &redis::Cmd) -> Option<Vec<u8>> {
    let args: Vec<&[u8]> = cmd
        .args_iter()
        .filter_map(|a| match a {
            redis::Arg::Simple(bytes) => Some(bytes),
            redis::Arg::Cursor => None,
        })
        .collect();
    let name = args.first()?.to_ascii_uppercase();
    let at = if name == b"EVALSHA" || name == b"EVAL" {
        3
    } else {
        1
    };
    args.get(at).map(|k| k.to_vec())
}

/// The commands of `pipe` grouped by hash slot tag, in order, each group a pipeline of
/// its own with the indices of its commands.
fn split_by_slot(pipe: &redis::Pipeline) -> Vec<(Vec<usize>, redis::Pipeline)> {
    let mut groups: Vec<(Vec<u8>, Vec<usize>, redis::Pipeline)> = Vec::new();
    for (i, cmd) in pipe.cmd_iter().enumerate() {
        let tag = first_key(cmd)
            .map(|k| slot_tag(&k).to_vec())
            .unwrap_or_default();
        match groups.iter_mut().find(|(t, ..)| *t == tag) {
            Some((_, indices, part)) => {
                indices.push(i);
                part.add_command(cmd.clone());
            }
            None => {
                let mut part = redis::pipe();
                part.add_command(cmd.clone());
                groups.push((tag, vec![i], part));
            }
        }
    }
    groups.into_iter().map(|(_, i, p)| (i, p)).collect()
}

/// The MySQL databases: shard 0 holds activities, scenes, reports and keys, and the
/// ledger of the users it owns; further shards hold only ledger, accounts and withdrawals.
pub struct Db {
    shards: Vec<MySqlPool>,
}

impl Db {
    pub fn connect_lazy(settings: &MysqlSettings) -> anyhow::Result<Self> {
        let mut shards = Vec::with_capacity(1 + settings.shard_urls.len());
        for (i, url) in std::iter::once(&settings.url)
            .chain(settings.shard_urls.iter())
            .enumerate()
        {
            let options: MySqlConnectOptions = url
                .expose()
                .parse()
                .with_context(|| format!("mysql shard {i}: bad URL"))?;
            let options = options
                .charset("utf8mb4")
                .timezone(Some(String::from("+00:00")))
                .statement_cache_capacity(512);
            let pool = MySqlPoolOptions::new()
                .after_connect(|conn, _meta| {
                    Box::pin(async move {
                        // The wallet view lists booked tokens with GROUP_CONCAT; MySQL 8's
                        // default limit (1 KiB) would cut a long list short.
                        sqlx::query("SET SESSION group_concat_max_len = 1048576")
                            .execute(conn)
                            .await?;
                        Ok(())
                    })
                })
                .max_connections(settings.max_connections)
                .min_connections(settings.min_connections)
                .acquire_timeout(Duration::from_millis(settings.acquire_timeout_ms))
                .test_before_acquire(false)
                .connect_lazy_with(options);
            shards.push(pool);
        }
        Ok(Self { shards })
    }

    pub fn main(&self) -> &MySqlPool {
        &self.shards[0]
    }

    pub fn for_user(&self, user: UserId) -> &MySqlPool {
        &self.shards[(user.get() as u64 % self.shards.len() as u64) as usize]
    }

    pub fn shard_index(&self, user: UserId) -> usize {
        (user.get() as u64 % self.shards.len() as u64) as usize
    }

    pub fn shard(&self, index: usize) -> &MySqlPool {
        &self.shards[index]
    }

    pub fn shards(&self) -> &[MySqlPool] {
        &self.shards
    }

    pub async fn migrate(&self) -> anyhow::Result<()> {
        for (i, pool) in self.shards.iter().enumerate() {
            MIGRATOR
                .run(pool)
                .await
                .with_context(|| format!("migrating mysql shard {i}"))?;
        }
        Ok(())
    }

    pub async fn ping(&self) -> Result<(), sqlx::Error> {
        for pool in &self.shards {
            sqlx::query("SELECT 1").execute(pool).await?;
        }
        Ok(())
    }
}

pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slot_tags_follow_the_cluster_rule() {
        assert_eq!(slot_tag(b"rpw{7}:tok:42"), b"7");
        assert_eq!(slot_tag(b"rpw:bud:{cny.1.3}"), b"cny.1.3");
        assert_eq!(slot_tag(b"rpw:switches"), b"rpw:switches");
        assert_eq!(slot_tag(b"a{}b{c}"), b"a{}b{c}");
        assert_eq!(slot_tag(b"a{b"), b"a{b");
    }

    #[test]
    fn slots_are_the_clusters() {
        // The reference values of the Redis Cluster specification and CLUSTER KEYSLOT.
        assert_eq!(crc16(b"123456789"), 0x31c3);
        assert_eq!(key_slot(b"foo"), 12_182);
        assert_eq!(
            key_slot(b"{user1000}.following"),
            key_slot(b"{user1000}.followers")
        );
    }

    #[test]
    fn a_pipeline_splits_by_slot_and_keeps_its_order() {
        let mut pipe = redis::pipe();
        pipe.hget("p{1}:tok:1", "a")
            .hget("p{2}:tok:2", "b")
            .cmd("EVALSHA")
            .arg("sha")
            .arg(1)
            .arg("p{1}:settle")
            .xlen("p{2}:settle")
            .get("p:switches");
        let groups = split_by_slot(&pipe);
        let indices: Vec<Vec<usize>> = groups.iter().map(|(i, _)| i.clone()).collect();
        assert_eq!(indices, vec![vec![0, 2], vec![1, 3], vec![4]]);
        assert_eq!(groups[0].1.len(), 2);
    }
}
