//! Configuration: built-in defaults, then an optional TOML file, then `RPW_SECTION__KEY`
//! environment variables (`RPW_HTTP__ADDR=127.0.0.1:9000` sets `http.addr`).
//!
//! Secrets are wrapped in [`Secret`], whose `Debug` never shows the value, so printing the
//! settings (which `serve` does at start) cannot leak them.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

#[derive(Clone, Deserialize, PartialEq, Eq)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_empty() {
            f.write_str("\"\"")
        } else {
            f.write_str("\"***\"")
        }
    }
}

#[derive(Clone, Debug, Deserialize)]
pub struct Settings {
    pub http: HttpSettings,
    pub redis: RedisSettings,
    pub mysql: MysqlSettings,
    pub auth: AuthSettings,
    pub keys: KeySettings,
    pub issue: IssueSettings,
    pub settle: SettleSettings,
    pub wallet: WalletSettings,
    pub cron: CronSettings,
    pub shadow: ShadowSettings,
    pub webhooks: WebhookSettings,
    pub packets: PacketSettings,
}

/// Group red packets (see `packets`).
#[derive(Clone, Debug, Deserialize)]
pub struct PacketSettings {
    /// A packet's unclaimed remainder goes back to its sender this long after sending.
    pub refund_after_secs: u64,
    /// The most shares one packet may be split into.
    pub max_shares: u32,
    /// The largest packet, in cents.
    pub max_total_cents: i64,
    /// Opens of one packet running at once, per instance (more wait their turn).
    pub open_concurrency: usize,
}

/// Events to webhooks (API.md, "Events"; see `events`).
#[derive(Clone, Debug, Deserialize)]
pub struct WebhookSettings {
    /// Off: this instance does not dispatch (events are still written; another
    /// instance, or this one later, delivers them).
    pub dispatch: bool,
    /// How often the dispatcher looks for due deliveries when the last look found none.
    pub poll_ms: u64,
    /// Deliveries in flight at once, per instance.
    pub concurrency: usize,
    /// One delivery attempt's time limit.
    pub timeout_ms: u64,
    /// The wait after the first failed attempt; it doubles per attempt up to
    /// `retry_max_ms`.
    pub retry_base_ms: u64,
    pub retry_max_ms: u64,
    /// A delivery still failing this long after its event is given up (at least a day).
    pub give_up_after_secs: u64,
    /// How long an instance holds a delivery it is sending before another may.
    pub lease_ms: u64,
    /// `budget.low` is sent when an activity's remaining budget falls below this
    /// fraction of its budget.
    pub budget_low_fraction: f64,
}

/// Shadow traffic (`X-RPW-Shadow: 1`, see `shadow`).
#[derive(Clone, Debug, Deserialize)]
pub struct ShadowSettings {
    /// Off: shadow requests are refused (503 `unavailable`).
    pub enabled: bool,
    /// The shadow ledger's database; empty: the main database's name with `_shadow`, on
    /// the same server (created when missing).
    pub mysql_url: Secret,
    /// Shadow data is dropped once no shadow request came for this long.
    pub expire_after_secs: u64,
    /// How often an instance checks whether shadow data has expired.
    pub purge_check_ms: u64,
}

#[derive(Clone, Debug, Deserialize)]
pub struct HttpSettings {
    pub addr: SocketAddr,
    pub body_limit_bytes: usize,
    pub request_timeout_ms: u64,
    pub shutdown_timeout_ms: u64,
}

#[derive(Clone, Debug, Deserialize)]
pub struct RedisSettings {
    pub url: Secret,
    /// Seed nodes of a Redis Cluster; when given, the service runs on the cluster and
    /// `url` is not used.
    pub cluster_urls: Vec<Secret>,
    /// How often a cluster command is retried on MOVED, TRYAGAIN or a failing node
    /// (a failover in progress) before it fails.
    pub cluster_retries: u32,
    /// Every key the service writes starts with this, so several deployments (or tests)
    /// can share one Redis without seeing each other.
    pub key_prefix: String,
    /// P: a user's keys live in partition `user_id mod P`.
    pub partitions: u32,
    /// Multiplexed connections, shared by every request of the instance (one by default:
    /// everything in flight goes as one pipeline, fewer system calls in Redis).
    pub connections: usize,
    pub command_timeout_ms: u64,
}

#[derive(Clone, Debug, Deserialize)]
pub struct MysqlSettings {
    pub url: Secret,
    /// Further databases the ledger is sharded over by user id (`user_id mod n`, the
    /// first shard being `url`). Empty: one database holds everything.
    pub shard_urls: Vec<Secret>,
    pub max_connections: u32,
    /// Connections kept open per shard even when idle, so a burst after a quiet spell
    /// (withdrawals after a rain) does not start by connecting.
    pub min_connections: u32,
    pub acquire_timeout_ms: u64,
    pub migrate_on_start: bool,
}

#[derive(Clone, Debug, Deserialize)]
pub struct AuthSettings {
    pub admin_key: Secret,
    /// `name:key` pairs.
    pub caller_keys: Vec<Secret>,
    /// Callers (by name) allowed to post payout results (the payout channel); empty:
    /// nobody.
    pub payout_callers: Vec<String>,
    pub jwt_secret: Secret,
}

#[derive(Clone, Debug, Deserialize)]
pub struct KeySettings {
    pub dir: PathBuf,
    /// How often a running instance reloads its keys (directory and retirements shared
    /// through MySQL); 0 turns reloads off.
    pub refresh_ms: u64,
}

#[derive(Clone, Debug, Deserialize)]
pub struct IssueSettings {
    /// N: each activity's budget is split over this many Redis keys.
    pub sub_stocks: u32,
    /// New budget generations place sub-stock i in partition `i mod partitions` (their
    /// number rounded up to a multiple of the partitions), so that on a Redis Cluster
    /// one store call takes an award's money and stores its token. Instances of
    /// releases before this setting read such a generation as lost: turn it on once
    /// none runs.
    pub sub_stocks_in_partitions: bool,
    pub batch_max: usize,
    /// How long a sub-stock seen empty is skipped before it is tried again.
    pub exhausted_recheck_ms: u64,
    pub cache_refresh_ms: u64,
    pub stats_flush_ms: u64,
    /// Awards per second admitted per caller, for the whole fleet; 0 means no limit.
    pub caller_per_s: u32,
    /// Rate limits (per caller, per scene) up to this many per second are counted
    /// precisely in Redis for the whole fleet; higher ones are split per instance.
    pub shared_limit_max_per_s: u32,
    /// How many instances serve awards: a limit split per instance is
    /// `limit / fleet_instances` on each.
    pub fleet_instances: u32,
    /// Concurrent single awards are issued together: at most this many per batch...
    pub coalesce_max_batch: usize,
    /// ...and at most this many such batches in flight at once...
    pub coalesce_in_flight: usize,
    /// ...while at most this many single awards wait for a batch (then callers wait
    /// for room, within the request timeout).
    pub coalesce_queue: usize,
    /// A grant moves `max(per-award cap, budget / (sub_stocks * grant_slices))` cents
    /// from MySQL to one sub-stock.
    pub grant_slices: u32,
    /// A drained budget generation's leak is settled only after this long (awards in
    /// flight at the drain store their tokens within the request timeout).
    pub in_flight_grace_ms: u64,
    /// Budget in doubt after a Redis loss is released only after this long, so clients
    /// had time to sync the tokens they hold.
    pub in_doubt_grace_ms: u64,
    /// Plain cash awards are taken and stored by one script call
    /// (`issue::Issuer::issue_direct`; on a cluster only with
    /// `sub_stocks_in_partitions`); false sends every award through the steps.
    pub one_step: bool,
}

impl IssueSettings {
    /// Sub-stocks of a new budget generation: `sub_stocks`, rounded up to a multiple of
    /// `partitions` when they are placed in the partitions (every partition gets one).
    pub fn stocks_per_generation(&self, partitions: u32) -> u32 {
        if self.sub_stocks_in_partitions {
            self.sub_stocks.div_ceil(partitions.max(1)) * partitions.max(1)
        } else {
            self.sub_stocks
        }
    }
}

#[derive(Clone, Debug, Deserialize)]
pub struct SettleSettings {
    /// Whether `serve` runs the accounting worker too.
    pub enabled: bool,
    /// Tokens booked per second by one instance; 0 means unbounded.
    pub max_tps: u32,
    pub batch_size: usize,
    /// Worker tasks per instance; partitions are dealt out among them.
    pub concurrency: usize,
    pub idle_sleep_ms: u64,
    /// Entries idle this long in another consumer's pending list are taken over.
    pub claim_idle_ms: u64,
    pub retry_base_ms: u64,
    pub retry_max_ms: u64,
    /// The sweep (cron `settle` and `redpacket-wallet settle --all`) books at most this
    /// many batches per partition per run.
    pub sweep_max_batches: usize,
    /// Fault injection for the chaos harness: after a batch's commit and before its
    /// Redis mark, the process aborts with this probability (per mille). 0 in service.
    pub crash_after_commit_permille: u32,
}

#[derive(Clone, Debug, Deserialize)]
pub struct WalletSettings {
    pub sync_max: usize,
    pub flows_max_limit: u32,
    /// Settled tokens older than this are trimmed from Redis; the ledger keeps them.
    pub settled_retention_secs: u64,
    /// A trimmed token leaves a marker that answers retries; it goes this long after
    /// its activity ended.
    pub retry_grace_secs: u64,
    pub jwt_leeway_secs: u64,
    /// After Redis loses data (a flush, a restart, a failover), snapshots written in the
    /// new life are trusted by views only once it is this old: longer than any fenced
    /// change (a withdrawal, a reversal, a packet) takes from its fence to its snapshot.
    pub identity_quiet_ms: u64,
    /// Instances of a release that keeps account snapshots in their own hash (`acct:`)
    /// may run beside this one (a rolling upgrade): snapshots and fences are kept there
    /// too, and views read both (mark.lua). Off once every instance runs this release.
    pub snapshot_compat: bool,
}

#[derive(Clone, Debug, Deserialize)]
pub struct CronSettings {
    /// Six-field cron expressions (seconds first). An empty string disables the job.
    pub settle: String,
    pub reconcile_hourly: String,
    pub reconcile_live: String,
    pub housekeeping: String,
    /// Refunds of red packets past their time.
    pub packet_refunds: String,
    /// Coupons past their validity become `expired`.
    pub coupon_expiry: String,
    pub lock_ttl_ms: u64,
    /// Housekeeping trims this many tokens per round trip...
    pub housekeeping_batch: usize,
    /// ...and at most this many round trips per partition per run.
    pub housekeeping_max_rounds: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("configuration: {0}")]
    Load(#[from] config::ConfigError),
    #[error("configuration key `{key}`: {reason}")]
    Invalid { key: &'static str, reason: String },
}

const DEFAULTS: &str = include_str!("defaults.toml");

impl Settings {
    /// Loads defaults, then `file` (when given; it must exist), then the environment.
    pub fn load(file: Option<&Path>) -> Result<Self, ConfigError> {
        Self::load_with(file, std::env::vars())
    }

    /// As [`Settings::load`], with the environment given explicitly (tests use this).
    pub fn load_with(
        file: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, ConfigError> {
        let env: std::collections::HashMap<String, String> = env
            .into_iter()
            .filter(|(k, _)| k.starts_with("RPW_") && k.contains("__"))
            .collect();
        let mut builder = config::Config::builder()
            .add_source(config::File::from_str(DEFAULTS, config::FileFormat::Toml));
        if let Some(path) = file {
            builder = builder.add_source(config::File::from(path).required(true));
        }
        let settings: Settings = builder
            .add_source(
                config::Environment::with_prefix("RPW")
                    .prefix_separator("_")
                    .separator("__")
                    .list_separator(",")
                    .with_list_parse_key("auth.caller_keys")
                    .with_list_parse_key("auth.payout_callers")
                    .with_list_parse_key("mysql.shard_urls")
                    .with_list_parse_key("redis.cluster_urls")
                    .try_parsing(true)
                    .source(Some(env)),
            )
            .build()?
            .try_deserialize()?;
        settings.validate()?;
        Ok(settings)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        fn invalid(key: &'static str, reason: impl Into<String>) -> ConfigError {
            ConfigError::Invalid {
                key,
                reason: reason.into(),
            }
        }
        if self.redis.partitions == 0 || self.redis.partitions > 4096 {
            return Err(invalid("redis.partitions", "must be 1..=4096"));
        }
        if self.redis.key_prefix.is_empty() || self.redis.key_prefix.contains(['{', '}', ' ']) {
            return Err(invalid(
                "redis.key_prefix",
                "must be non-empty, without braces or spaces",
            ));
        }
        if self.redis.connections == 0 || self.redis.connections > 64 {
            return Err(invalid("redis.connections", "must be 1..=64"));
        }
        if self.issue.sub_stocks == 0 || self.issue.sub_stocks > 1024 {
            return Err(invalid("issue.sub_stocks", "must be 1..=1024"));
        }
        if self.issue.stocks_per_generation(self.redis.partitions) > 1024 {
            return Err(invalid(
                "issue.sub_stocks_in_partitions",
                "places a sub-stock in every partition: needs redis.partitions <= 1024",
            ));
        }
        if self.issue.batch_max == 0 || self.issue.batch_max > 10_000 {
            return Err(invalid("issue.batch_max", "must be 1..=10000"));
        }
        if self.settle.batch_size == 0 || self.settle.batch_size > 5_000 {
            return Err(invalid("settle.batch_size", "must be 1..=5000"));
        }
        if self.settle.concurrency == 0 || self.settle.concurrency > 256 {
            return Err(invalid("settle.concurrency", "must be 1..=256"));
        }
        if self.settle.retry_base_ms == 0 || self.settle.retry_max_ms < self.settle.retry_base_ms {
            return Err(invalid(
                "settle.retry_max_ms",
                "must be at least settle.retry_base_ms, which must be positive",
            ));
        }
        if self.wallet.sync_max == 0 || self.wallet.sync_max > 10_000 {
            return Err(invalid("wallet.sync_max", "must be 1..=10000"));
        }
        if self.wallet.flows_max_limit == 0 {
            return Err(invalid("wallet.flows_max_limit", "must be positive"));
        }
        if self.http.body_limit_bytes < 1024 {
            return Err(invalid("http.body_limit_bytes", "must be at least 1024"));
        }
        if self.mysql.max_connections == 0 {
            return Err(invalid("mysql.max_connections", "must be positive"));
        }
        let callers: Vec<String> = self.caller_keys().into_iter().map(|(n, _)| n).collect();
        if let Some(unknown) = self
            .auth
            .payout_callers
            .iter()
            .find(|name| !name.is_empty() && !callers.contains(name))
        {
            return Err(invalid(
                "auth.payout_callers",
                format!("`{unknown}` is not a caller named in auth.caller_keys"),
            ));
        }
        if self.webhooks.concurrency == 0 || self.webhooks.concurrency > 1024 {
            return Err(invalid("webhooks.concurrency", "must be 1..=1024"));
        }
        if self.webhooks.retry_base_ms == 0
            || self.webhooks.retry_max_ms < self.webhooks.retry_base_ms
        {
            return Err(invalid(
                "webhooks.retry_max_ms",
                "must be at least webhooks.retry_base_ms, which must be positive",
            ));
        }
        if self.webhooks.timeout_ms == 0 || self.webhooks.lease_ms <= self.webhooks.timeout_ms {
            return Err(invalid(
                "webhooks.lease_ms",
                "must be longer than webhooks.timeout_ms, which must be positive",
            ));
        }
        if self.packets.max_shares == 0 || self.packets.max_shares > 10_000 {
            return Err(invalid("packets.max_shares", "must be 1..=10000"));
        }
        if self.packets.max_total_cents < 1 {
            return Err(invalid("packets.max_total_cents", "must be positive"));
        }
        if self.packets.open_concurrency == 0 {
            return Err(invalid("packets.open_concurrency", "must be positive"));
        }
        if !(0.0..1.0).contains(&self.webhooks.budget_low_fraction) {
            return Err(invalid("webhooks.budget_low_fraction", "must be in [0, 1)"));
        }
        if self.issue.coalesce_max_batch == 0 {
            return Err(invalid("issue.coalesce_max_batch", "must be positive"));
        }
        if self.issue.coalesce_in_flight == 0 {
            return Err(invalid("issue.coalesce_in_flight", "must be positive"));
        }
        for (key, value) in [
            ("issue.coalesce_queue", self.issue.coalesce_queue),
            ("settle.sweep_max_batches", self.settle.sweep_max_batches),
            ("cron.housekeeping_batch", self.cron.housekeeping_batch),
            (
                "cron.housekeeping_max_rounds",
                self.cron.housekeeping_max_rounds,
            ),
        ] {
            if value == 0 {
                return Err(invalid(key, "must be positive"));
            }
        }
        if self.mysql.min_connections > self.mysql.max_connections {
            return Err(invalid(
                "mysql.min_connections",
                "must not exceed mysql.max_connections",
            ));
        }
        for key in &self.auth.caller_keys {
            match key.expose().split_once(':') {
                Some((name, k)) if !name.is_empty() && k.len() >= 8 => {}
                _ => {
                    return Err(invalid(
                        "auth.caller_keys",
                        "each entry must be name:key with a key of at least 8 characters",
                    ))
                }
            }
        }
        Ok(())
    }

    /// The caller keys as (name, key) pairs; validated at load.
    pub fn caller_keys(&self) -> Vec<(String, Secret)> {
        self.auth
            .caller_keys
            .iter()
            .filter_map(|entry| {
                let (name, key) = entry.expose().split_once(':')?;
                Some((name.to_string(), Secret::new(key)))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests;
