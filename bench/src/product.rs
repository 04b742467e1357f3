//! The bench's one door into the redpacket-wallet library. Every other file of the bench
//! talks to the service over HTTP (`api.rs`) or through this adapter, so when the
//! library's modules move, only this file needs re-pointing.
//!
//! What still needs the library, and why the HTTP API cannot do it:
//! - the service's own settings (credentials, Redis prefix, MySQL URL, worker settings);
//! - user JWTs (the secret is the service's);
//! - the signing ceiling (a local measurement of the service's minting code);
//! - the sampler's issued/booked/backlog figures (read beside the server, not through it,
//!   so sampling every 250 ms does not add HTTP load to the server under test);
//! - the synchronous baseline (the service's booking code against a separate database);
//! - the bounded and unbounded drains (the service's settlement worker, in-process);
//! - the reconciliation report (the operator API only lists stored reports);
//! - removing the run's Redis keys and databases.

use std::sync::Arc;

use anyhow::{anyhow, Context};
use redpacket_wallet::app::App;
use redpacket_wallet::config::{Secret, Settings};
use redpacket_wallet::domain::UserId;
use redpacket_wallet::keys::KeyRing;
use redpacket_wallet::store::{Db, Redis};
use serde::Serialize;
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// The wire types (proto/), part of the stable contract.
pub use redpacket_wallet::pb;

/// The service as the bench reaches it in-process: the same settings, Redis and MySQL.
pub struct Product {
    app: Arc<App>,
}

impl Product {
    /// Loads the settings as the server does (config files, then `RPW_*` variables) and
    /// connects to its Redis and MySQL; with `shadow`, to the data of its shadow traffic
    /// instead (its own key prefix and database), never to the real data.
    pub async fn connect(shadow: bool) -> anyhow::Result<Self> {
        let mut settings = Settings::load(None)?;
        if shadow {
            settings = redpacket_wallet::shadow::settings(&settings)?;
        }
        settings.shadow.enabled = false;
        let app = App::build(settings, false).await?;
        Ok(Self { app })
    }

    /// The operator credential (`Authorization: Bearer` on `/v1/admin/*`).
    pub fn admin_key(&self) -> String {
        self.app.settings.auth.admin_key.expose().to_string()
    }

    /// The first configured caller's key (`/v1/awards*`).
    pub fn caller_key(&self) -> anyhow::Result<String> {
        self.app
            .settings
            .caller_keys()
            .first()
            .map(|(_, key)| key.expose().to_string())
            .context("RPW_AUTH__CALLER_KEYS must name a caller")
    }

    /// A user JWT (`/v1/wallet*`, `/v1/withdrawals`) valid for `ttl_secs`.
    pub fn user_jwt(&self, user: i64, ttl_secs: u64) -> anyhow::Result<String> {
        let user = UserId::parse(user).map_err(|e| anyhow!(e.0))?;
        self.app.auth.issue_user_jwt(user, ttl_secs)
    }

    /// The service's active signing key, to measure how fast it mints.
    pub fn signer(&self) -> Signer {
        Signer {
            ring: self.app.keys.current(),
        }
    }

    /// Tokens issued for `activity` and tokens of it booked and marked settled, from the
    /// counters issuance and marking write with every token: one round trip to Redis.
    /// (The bench once counted the ledger's award rows here; that full scan of a
    /// growing table, every 100 ms, was most of MariaDB's work during the drain.)
    pub async fn issued_and_settled(&self, activity: &str) -> anyhow::Result<(i64, i64)> {
        let counters = self.app.tokens.counters(activity).await?;
        let settled = counters.hours.values().map(|h| h.settled.count).sum();
        Ok((counters.issued().count, settled))
    }

    /// Settlement entries waiting in the streams, over every partition.
    pub async fn backlog(&self) -> anyhow::Result<i64> {
        let redis = &self.app.redis;
        let mut pipe = redis::pipe();
        for p in 0..redis.partitions() {
            pipe.xlen(redis.stream_key(p));
        }
        let lens: Vec<i64> = redis.query(&pipe).await?;
        Ok(lens.iter().sum())
    }

    /// Commands and command time so far over the Redis masters (`INFO commandstats`;
    /// on a cluster, every master's).
    pub async fn redis_usage(&self) -> anyhow::Result<RedisUsage> {
        let mut conn = self.app.redis.conn();
        let info: redis::Value = redis::cmd("INFO")
            .arg("replication")
            .arg("cpu")
            .arg("stats")
            .arg("commandstats")
            .query_async(&mut conn)
            .await?;
        let texts: Vec<String> = match info {
            redis::Value::Map(nodes) => nodes
                .into_iter()
                .filter_map(|(_, v)| redis::from_owned_redis_value::<String>(v).ok())
                .collect(),
            other => vec![redis::from_owned_redis_value::<String>(other)?],
        };
        let mut usage = RedisUsage::default();
        for text in texts.iter().filter(|t| t.contains("role:master")) {
            for line in text.lines() {
                if let Some((name, value)) = line.trim().split_once(':') {
                    match name {
                        "used_cpu_sys" | "used_cpu_user" => {
                            usage.cpu_usec += (value.parse::<f64>().unwrap_or(0.0) * 1e6) as u64
                        }
                        "total_net_input_bytes" => usage.net_in += value.parse().unwrap_or(0),
                        "total_net_output_bytes" => usage.net_out += value.parse().unwrap_or(0),
                        _ => {}
                    }
                }
            }
            for line in text.lines().filter(|l| l.starts_with("cmdstat_")) {
                let field = |name: &str| -> u64 {
                    line.split([':', ','])
                        .find_map(|kv| kv.strip_prefix(name))
                        .and_then(|v| v.trim().parse().ok())
                        .unwrap_or(0)
                };
                let (calls, usec) = (field("calls="), field("usec="));
                usage.calls += calls;
                usage.usec += usec;
                if let Some(name) = line
                    .strip_prefix("cmdstat_")
                    .and_then(|l| l.split(':').next())
                {
                    let slot = usage.by_command.entry(name.to_string()).or_default();
                    slot.0 += calls;
                    slot.1 += usec;
                }
            }
        }
        Ok(usage)
    }

    /// A settlement worker on this Redis and MySQL, built but not started, booking at
    /// most `max_tps` tokens a second (0: unbounded).
    pub async fn drain_worker(&self, max_tps: u32) -> anyhow::Result<DrainWorker> {
        let mut settings = self.app.settings.clone();
        settings.settle.max_tps = max_tps;
        settings.settle.enabled = true;
        Ok(DrainWorker {
            app: App::build(settings, false).await?,
        })
    }

    /// The booking code against `mysql_url` (a separate, empty database, migrated here)
    /// and a Redis prefix of its own, for the synchronous baseline.
    pub async fn sync_ledger(&self, mysql_url: &str) -> anyhow::Result<SyncLedger> {
        let mut mysql = self.app.settings.mysql.clone();
        mysql.url = Secret::new(mysql_url.to_string());
        mysql.shard_urls.clear();
        let db = Db::connect_lazy(&mysql)?;
        db.migrate().await?;
        // Every bucket of the one shard is owned there (the ledger refuses others).
        db.load_map().await?;
        // Booking reads the users' pending tokens in Redis; the baseline's users have none.
        let mut redis_settings = self.app.settings.redis.clone();
        redis_settings.key_prefix = format!("{}-baseline", redis_settings.key_prefix);
        let redis = Redis::connect(&redis_settings).await?;
        let tokens = redpacket_wallet::tokens::Tokens::new(Arc::new(redis));
        Ok(SyncLedger {
            ledger: redpacket_wallet::ledger::Ledger::new(Arc::new(db), tokens),
        })
    }

    /// The service's reconciliation of `activity` for one hour (`YYYYMMDDHH`, UTC): the
    /// report is stored as the cron's are, with kind `bench`.
    pub async fn reconcile(&self, activity: &str, hour: &str) -> anyhow::Result<Reconciliation> {
        let report = self
            .app
            .reconciler
            .reconcile(activity, hour, "bench")
            .await
            .map_err(|e| anyhow!("reconciling {activity} {hour}: {}: {e}", e.code()))?;
        Ok(Reconciliation {
            hour: hour.to_string(),
            ok: report.ok,
            problems: report.problems,
            issued_cents: report.issued.cents,
            booked_cents: report.booked.cents,
            pending_cents: report.pending.cents,
            budget_taken_cents: report.budget_taken_cents,
            leak_cents: report.leak_cents,
        })
    }

    /// The hours (as the service's counters name them) from `from_ms` to `to_ms`.
    pub fn hours(from_ms: i64, to_ms: i64) -> Vec<String> {
        const HOUR_MS: i64 = 3_600_000;
        let mut hours: Vec<String> = Vec::new();
        let mut at = from_ms;
        loop {
            let hour = redpacket_wallet::store::hour_of(at);
            if hours.last() != Some(&hour) {
                hours.push(hour);
            }
            if at >= to_ms {
                return hours;
            }
            at = (at + HOUR_MS).min(to_ms);
        }
    }

    /// Wall-clock milliseconds, as the service stamps tokens.
    pub fn now_ms() -> i64 {
        redpacket_wallet::store::now_ms()
    }

    /// Removes the run's Redis keys (the baseline's prefix included) and drops both
    /// databases: a bench run leaves nothing behind.
    pub async fn remove_data(&self, baseline_mysql_url: &str) -> anyhow::Result<()> {
        self.app.redis.delete_prefixed().await?;
        use sqlx::migrate::MigrateDatabase;
        self.app.db.main().close().await;
        sqlx::MySql::drop_database(self.app.settings.mysql.url.expose()).await?;
        sqlx::MySql::drop_database(baseline_mysql_url).await?;
        Ok(())
    }
}

/// The service's minting code with its active key.
pub struct Signer {
    ring: Arc<KeyRing>,
}

impl Signer {
    /// Signs `token` as issuance does; returns the encoded `SignedToken`.
    pub fn mint(&self, token: pb::RedPacketToken) -> anyhow::Result<Vec<u8>> {
        Ok(redpacket_wallet::token::mint(&self.ring, token)?.bytes)
    }
}

/// A settlement worker ready to start.
pub struct DrainWorker {
    app: Arc<App>,
}

impl DrainWorker {
    /// Tokens this worker has newly booked (rows its commits inserted) so far.
    pub fn booked(&self) -> u64 {
        self.app.settler.booked_total()
    }

    pub fn start(&self) -> RunningDrain {
        let (stop, shutdown) = watch::channel(false);
        let tasks = redpacket_wallet::settle::worker::spawn(&self.app.settler, shutdown);
        RunningDrain { stop, tasks }
    }
}

/// A settlement worker booking the backlog until stopped.
pub struct RunningDrain {
    stop: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
}

impl RunningDrain {
    /// Asks the worker to stop and waits for its tasks (each finishes its batch).
    pub async fn stop(self) {
        let _ = self.stop.send(true);
        for task in self.tasks {
            let _ = task.await;
        }
    }
}

/// The service's booking code on the baseline's own database: one transaction per call.
#[derive(Clone)]
pub struct SyncLedger {
    ledger: redpacket_wallet::ledger::Ledger,
}

impl SyncLedger {
    /// Books `award` under `out_trade_no` in its own transaction (account row + ledger row).
    pub async fn book(&self, award: &pb::AwardRequest, out_trade_no: String) -> anyhow::Result<()> {
        let entry = redpacket_wallet::tokens::AwardEntry {
            user: UserId::parse(award.user_id).map_err(|e| anyhow!(e.0))?,
            out_trade_no,
            amount_cents: award.amount_cents,
            activity_id: award.activity_id.clone(),
            scene_id: award.scene_id.clone(),
            at_ms: redpacket_wallet::store::now_ms(),
            stream_id: None,
            budget_gen: 0,
            coupon: false,
        };
        self.ledger.book(&[entry]).await?;
        Ok(())
    }
}

/// The service's reconciliation report for one activity and hour, as the bench keeps it.
#[derive(Debug, Clone, Serialize)]
pub struct Reconciliation {
    pub hour: String,
    pub ok: bool,
    pub problems: Vec<String>,
    pub issued_cents: i64,
    pub booked_cents: i64,
    pub pending_cents: i64,
    pub budget_taken_cents: i64,
    /// Budget taken but never issued, over the activity's open generations (not per hour).
    pub leak_cents: i64,
}

/// Redis commands and command time (µs) summed over the masters.
#[derive(Debug, Clone, Default)]
pub struct RedisUsage {
    pub calls: u64,
    pub usec: u64,
    /// Per command name: calls and command time (µs). A script's time includes the
    /// commands it calls, which are also counted under their own names.
    pub by_command: std::collections::BTreeMap<String, (u64, u64)>,
    /// The masters' own CPU time (`INFO cpu`: user + system), networking included.
    pub cpu_usec: u64,
    /// Bytes the masters received and sent (`INFO stats`; replication included).
    pub net_in: u64,
    pub net_out: u64,
}

impl RedisUsage {
    /// The work since `before`, per one of `awards`.
    pub fn since(&self, before: &RedisUsage, awards: u64) -> crate::report::RedisCost {
        let n = awards.max(1) as f64;
        let mut commands: Vec<crate::report::CommandCost> = self
            .by_command
            .iter()
            .filter_map(|(name, (calls, usec))| {
                let (c0, u0) = before.by_command.get(name).copied().unwrap_or_default();
                let calls = calls.saturating_sub(c0);
                (calls > 0).then(|| crate::report::CommandCost {
                    name: name.clone(),
                    calls_per_item: crate::report::round2(calls as f64 / n),
                    usec_per_item: crate::report::round2(usec.saturating_sub(u0) as f64 / n),
                })
            })
            .collect();
        commands.sort_by(|a, b| b.usec_per_item.total_cmp(&a.usec_per_item));
        commands.truncate(8);
        crate::report::RedisCost {
            commands,
            usec_per_award: crate::report::round2(self.usec.saturating_sub(before.usec) as f64 / n),
            commands_per_award: crate::report::round2(
                self.calls.saturating_sub(before.calls) as f64 / n,
            ),
            cpu_usec_per_award: crate::report::round2(
                self.cpu_usec.saturating_sub(before.cpu_usec) as f64 / n,
            ),
            net_in_bytes_per_award: (self.net_in.saturating_sub(before.net_in) as f64 / n).round(),
            net_out_bytes_per_award: (self.net_out.saturating_sub(before.net_out) as f64 / n)
                .round(),
        }
    }
}
