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

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use anyhow::Context;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use sqlx::mysql::{MySqlConnectOptions, MySqlPoolOptions};
use sqlx::MySqlPool;

use crate::config::{MysqlSettings, RedisSettings};
use crate::domain::UserId;

pub const SETTLE_GROUP: &str = "settle";

pub struct Redis {
    conns: Vec<ConnectionManager>,
    next: AtomicUsize,
    prefix: String,
    partitions: u32,
}

impl Redis {
    pub async fn connect(settings: &RedisSettings) -> anyhow::Result<Self> {
        let client = redis::Client::open(settings.url.expose()).context("redis.url")?;
        let timeout = Duration::from_millis(settings.command_timeout_ms);
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
            conns.push(conn);
        }
        Ok(Self {
            conns,
            next: AtomicUsize::new(0),
            prefix: settings.key_prefix.clone(),
            partitions: settings.partitions,
        })
    }

    /// A multiplexed connection; calls are spread over the configured number.
    pub fn conn(&self) -> ConnectionManager {
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.conns.len();
        self.conns[i].clone()
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

pub async fn ensure_group(conn: &mut ConnectionManager, stream: &str) -> anyhow::Result<()> {
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
    conn: &mut ConnectionManager,
    scripts: &[&redis::Script],
) -> redis::RedisResult<()> {
    for script in scripts {
        script.prepare_invoke().load_async(conn).await?;
    }
    Ok(())
}

/// Runs a pipeline of EVALSHA calls. A call answered NOSCRIPT (Redis restarted or
/// flushed its script cache) did not run: the scripts are loaded and exactly those calls
/// are sent again (a few times at most, should the cache be flushed once more in
/// between), so no call ever runs twice and each answer means what it says.
pub async fn query_scripted<T: redis::FromRedisValue>(
    redis: &Redis,
    pipe: &redis::Pipeline,
    scripts: &[&redis::Script],
) -> redis::RedisResult<T> {
    use redis::aio::ConnectionLike;
    const ATTEMPTS: usize = 3;
    if pipe.is_empty() {
        return redis::from_owned_redis_value(redis::Value::Array(Vec::new()));
    }
    let mut conn = redis.conn();
    let mut values = conn.req_packed_commands(pipe, 0, pipe.len()).await?;
    let commands: Vec<&redis::Cmd> = pipe.cmd_iter().collect();
    for _ in 1..ATTEMPTS {
        let not_run: Vec<usize> = values
            .iter()
            .enumerate()
            .filter(|(_, v)| matches!(v, redis::Value::ServerError(e) if e.code() == "NOSCRIPT"))
            .map(|(i, _)| i)
            .collect();
        if not_run.is_empty() {
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
    redis::from_owned_redis_value(redis::Value::Array(values).extract_error()?)
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
