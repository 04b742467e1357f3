//! The wiring: connects Redis and MySQL, builds every capability with what it uses,
//! and runs them ([`run`]: HTTP server, accounting worker, cron, background refreshes).
//! Only this module and the HTTP edge see all the capabilities.

mod run;

pub use run::{shutdown_signal, RunOptions, Running};

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use metrics_exporter_prometheus::PrometheusHandle;

use crate::activity::{Activities, ActivityCache};
use crate::budget::{Budget, BudgetSettings};
use crate::config::Settings;
use crate::http::auth::AuthKeys;
use crate::issue::admission::FleetLimits;
use crate::issue::coalesce::Coalescer;
use crate::issue::{Admission, Issuer, StatsCounter};
use crate::keys::{KeyRing, Keys};
use crate::ledger::Ledger;
use crate::ops::cron::{JobLock, Jobs};
use crate::ops::reconcile::Reconciler;
use crate::settle::Settler;
use crate::store::{load_scripts, Db, Redis, StockPlacement};
use crate::switches::Switches;
use crate::tokens::Tokens;
use crate::wallet::Wallet;
use crate::withdraw::Withdrawals;

/// The assembled application: shared connections and every capability.
pub struct App {
    pub settings: Settings,
    pub redis: Arc<Redis>,
    pub db: Arc<Db>,
    pub keys: Arc<Keys>,
    pub tokens: Tokens,
    pub ledger: Ledger,
    pub budget: Arc<Budget>,
    pub activities: Activities,
    pub issuer: Arc<Issuer>,
    /// Single awards go through here, to be issued in batches under load.
    pub coalescer: Coalescer,
    pub wallet: Wallet,
    pub withdrawals: Withdrawals,
    pub packets: crate::packets::Packets,
    pub coupons: crate::coupons::Coupons,
    pub guards: Arc<crate::issue::guards::Guards>,
    /// Webhook subscriptions, and the dispatcher that delivers their events.
    pub webhooks: crate::events::Subscriptions,
    pub dispatcher: crate::events::Dispatcher,
    pub settler: Settler,
    pub reconciler: Reconciler,
    pub jobs: Jobs,
    pub switches: Arc<Switches>,
    pub stats: Arc<StatsCounter>,
    pub auth: AuthKeys,
    pub metrics: PrometheusHandle,
    /// Names this process in consumer groups and locks.
    pub instance_id: String,
    /// Where shadow traffic (`X-RPW-Shadow: 1`) goes, when `shadow.enabled`.
    pub shadow: Option<crate::shadow::Shadow>,
}

impl App {
    /// Connects and builds everything. MySQL is connected lazily; with `migrate` the
    /// schema is brought up to date first.
    pub async fn build(settings: Settings, migrate: bool) -> anyhow::Result<Arc<Self>> {
        let shadow = if settings.shadow.enabled {
            match crate::shadow::Shadow::build(&settings).await {
                Ok(shadow) => Some(shadow),
                Err(err) => {
                    tracing::warn!(
                        error = format!("{err:#}"),
                        "shadow traffic unavailable: its app could not be built"
                    );
                    None
                }
            }
        } else {
            None
        };
        Self::build_one(settings, migrate, shadow).await
    }

    /// Builds one app (the real one with its `shadow`, or the shadow app itself).
    pub(crate) async fn build_one(
        settings: Settings,
        migrate: bool,
        shadow: Option<crate::shadow::Shadow>,
    ) -> anyhow::Result<Arc<Self>> {
        let metrics = crate::metrics::install();
        let redis = Arc::new(Redis::connect(&settings.redis).await?);
        let db = Arc::new(Db::connect_lazy(&settings.mysql)?);
        if migrate {
            db.migrate().await?;
        }
        // With more than one shard the map must be known before any user is routed;
        // with one, every bucket is on it anyway and the map is checked when MySQL
        // answers. A map that disagrees with the configured shards refuses start-up.
        match db.load_map().await {
            Ok(()) => {}
            Err(err) if db.shards().len() > 1 || err.downcast_ref::<sqlx::Error>().is_none() => {
                return Err(err.context("the shard map"))
            }
            Err(err) => tracing::warn!(
                error = format!("{err:#}"),
                "shard map not loaded at start (one shard: every user is on it)"
            ),
        }
        let ring = match load_shared_keys(&db, &settings).await {
            Ok(ring) => ring,
            Err(err) => {
                tracing::warn!(error = format!("{err:#}"), "could not sync signing keys with mysql; using the keys directory alone until the next key refresh");
                KeyRing::load(&settings.keys.dir, &[])?
            }
        };
        if ring.active_key_id().is_none() {
            tracing::warn!(dir = %settings.keys.dir.display(), "no active signing key: awards will fail until `keys generate` is run");
        }
        let keys = Arc::new(Keys::new(ring));
        let auth = AuthKeys::new(
            &settings.auth,
            settings.caller_keys(),
            settings.wallet.jwt_leeway_secs,
        );
        let instance_id = format!(
            "{}-{}-{:06x}",
            hostname(),
            std::process::id(),
            rand::random::<u32>() & 0xff_ffff
        );
        let tokens =
            Tokens::new(redis.clone()).with_snapshot_compat(settings.wallet.snapshot_compat);
        let ledger = Ledger::new(db.clone(), tokens.clone());
        let issue = &settings.issue;
        let budget = Arc::new(Budget::new(
            BudgetSettings {
                sub_stocks: issue.stocks_per_generation(redis.partitions()),
                placement: if issue.sub_stocks_in_partitions {
                    StockPlacement::InPartitions(redis.partitions())
                } else {
                    StockPlacement::Spread
                },
                recheck: Duration::from_millis(issue.exhausted_recheck_ms),
                grant_slices: issue.grant_slices,
                in_flight_grace: Duration::from_millis(issue.in_flight_grace_ms),
                in_doubt_grace: Duration::from_millis(issue.in_doubt_grace_ms),
            },
            tokens.clone(),
            ledger.clone(),
        ));
        let cache = Arc::new(ActivityCache::default());
        let switches = Arc::new(Switches::default());
        let stats = Arc::new(StatsCounter::default());
        let activities = Activities::new(
            db.clone(),
            redis.clone(),
            cache.clone(),
            budget.clone(),
            tokens.clone(),
            ledger.clone(),
        );
        let guards = Arc::new(crate::issue::guards::Guards::new(
            redis.clone(),
            db.clone(),
            ledger.clone(),
        ));
        let issuer = Arc::new(Issuer {
            guards: guards.clone(),
            redis: redis.clone(),
            db: db.clone(),
            tokens: tokens.clone(),
            ledger: ledger.clone(),
            budget: budget.clone(),
            keys: keys.clone(),
            activities: cache.clone(),
            switches: switches.clone(),
            admission: Admission::new(
                FleetLimits {
                    caller_per_s: issue.caller_per_s,
                    shared_max_per_s: issue.shared_limit_max_per_s,
                    instances: issue.fleet_instances,
                },
                redis.clone(),
            ),
            stats: stats.clone(),
            stock_gauge: Arc::new(crate::coupons::StockGauge::new(
                std::time::Duration::from_secs(1),
            )),
            retry_grace_ms: (settings.wallet.retry_grace_secs as i64).saturating_mul(1000),
            one_step: issue.one_step,
        });
        let coalescer = Coalescer::start(
            issuer.clone(),
            issue.coalesce_max_batch,
            issue.coalesce_in_flight,
            issue.coalesce_queue,
        );
        let wallet = Wallet {
            tokens: tokens.clone(),
            ledger: ledger.clone(),
            switches: switches.clone(),
            keys: keys.clone(),
            activities: cache.clone(),
            identity_quiet_ms: i64::try_from(settings.wallet.identity_quiet_ms).unwrap_or(i64::MAX),
        };
        let withdrawals = Withdrawals::new(db.clone(), ledger.clone(), tokens.clone());
        let packets = crate::packets::Packets::new(
            db.clone(),
            redis.clone(),
            ledger.clone(),
            tokens.clone(),
            keys.clone(),
            settings.packets.clone(),
        );
        let coupons = crate::coupons::Coupons::new(
            db.clone(),
            redis.clone(),
            tokens.clone(),
            ledger.clone(),
            budget.clone(),
            cache.clone(),
        );
        let webhooks = crate::events::Subscriptions::new(db.clone());
        let dispatcher = crate::events::Dispatcher::new(db.clone(), settings.webhooks.clone())?;
        let settler = Settler {
            redis: redis.clone(),
            ledger: ledger.clone(),
            tokens: tokens.clone(),
            switches: switches.clone(),
            limiter: crate::settle::rate_limiter(
                settings.settle.max_tps,
                settings.settle.batch_size,
            ),
            settings: settings.settle.clone(),
            instance_id: instance_id.clone(),
            booked: Default::default(),
        };
        let reconciler = Reconciler {
            redis: redis.clone(),
            db: db.clone(),
            tokens: tokens.clone(),
            ledger: ledger.clone(),
            budget: budget.clone(),
            activities: cache.clone(),
            budget_low_fraction: settings.webhooks.budget_low_fraction,
        };
        let jobs = Jobs {
            lock: JobLock {
                redis: redis.clone(),
                ttl_ms: settings.cron.lock_ttl_ms,
                instance_id: instance_id.clone(),
            },
            settler: settler.clone(),
            reconciler: reconciler.clone(),
            tokens: tokens.clone(),
            activities: cache.clone(),
            cron: settings.cron.clone(),
            wallet: settings.wallet.clone(),
            packets: packets.clone(),
            coupons: coupons.clone(),
        };
        let app = Arc::new(App {
            settings,
            redis,
            db,
            keys,
            tokens,
            ledger,
            budget,
            activities,
            issuer,
            coalescer,
            wallet,
            withdrawals,
            packets,
            coupons,
            guards,
            webhooks,
            dispatcher,
            settler,
            reconciler,
            jobs,
            switches,
            stats,
            auth,
            metrics,
            instance_id,
            shadow,
        });
        app.load_scripts().await?;
        app.redis.ensure_groups().await?;
        app.switches.refresh(&app.redis).await?;
        app.guards.begin_lives().await?;
        // MySQL may be down at start: the instance still comes up (readiness says so)
        // and the background refresh fills the cache once MySQL answers.
        if let Err(err) = app.guards.refresh().await {
            tracing::warn!(error = %err, "blacklist not loaded at start; will retry");
        }
        if let Err(err) = app.activities.refresh().await {
            tracing::warn!(
                error = format!("{err:#}"),
                "activity cache not loaded at start; will retry"
            );
        }
        // A changed `issue.sub_stocks` moves each activity's budget into the new layout.
        app.activities.relayout_all().await;
        Ok(app)
    }

    pub async fn load_scripts(&self) -> anyhow::Result<()> {
        let mut scripts: Vec<&redis::Script> = self.budget.scripts().to_vec();
        scripts.extend(self.tokens.scripts());
        scripts.extend(self.packets.scripts());
        scripts.extend(self.guards.scripts());
        load_scripts(&mut self.redis.conn(), &scripts)
            .await
            .context("loading redis scripts")
    }

    /// Refreshes gauges that are read on demand (the settlement backlog).
    pub async fn update_gauges(&self) {
        let mut pipe = redis::pipe();
        for p in 0..self.redis.partitions() {
            pipe.xlen(self.redis.stream_key(p));
        }
        if let Ok(lengths) = self.redis.query::<Vec<u64>>(&pipe).await {
            for (p, len) in lengths.into_iter().enumerate() {
                crate::metrics::backlog(p as u32, len);
            }
        }
    }

    /// Reloads the key ring from the keys directory and the retirements in MySQL, so a
    /// key retired (or generated) anywhere takes effect here without a restart. When
    /// MySQL cannot be read the current ring stays: a retirement is never forgotten.
    pub async fn refresh_keys(&self) -> anyhow::Result<()> {
        let ring = load_shared_keys(&self.db, &self.settings).await?;
        let active = ring.active_key_id().map(str::to_string);
        if self.keys.replace(ring) {
            tracing::info!(
                active = active.as_deref().unwrap_or("none"),
                "signing keys reloaded"
            );
        }
        Ok(())
    }

    pub(crate) fn activity_ids(&self) -> Vec<String> {
        self.activities
            .cache()
            .all()
            .iter()
            .map(|a| a.activity.id.to_string())
            .collect()
    }
}

fn hostname() -> String {
    std::fs::read_to_string("/etc/hostname")
        .map(|h| h.trim().to_string())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "rpw".into())
}

/// Loads the keys directory with the retirements recorded in MySQL, then publishes its
/// public halves (and the retirements marked in the directory) there, so every instance
/// learns them.
async fn load_shared_keys(db: &Db, settings: &Settings) -> anyhow::Result<KeyRing> {
    let retired: Vec<String> =
        sqlx::query_scalar("SELECT key_id FROM signing_keys WHERE retired_at IS NOT NULL")
            .fetch_all(db.main())
            .await?;
    let ring = KeyRing::load(&settings.keys.dir, &retired)?;
    for key in ring.all() {
        sqlx::query("INSERT IGNORE INTO signing_keys (key_id, alg, public_key, retired_at) VALUES (?, 'Ed25519', ?, IF(?, CURRENT_TIMESTAMP(3), NULL))")
            .bind(&key.key_id)
            .bind(&key.public_key)
            .bind(key.retired)
            .execute(db.main())
            .await?;
        if key.retired {
            sqlx::query("UPDATE signing_keys SET retired_at = COALESCE(retired_at, CURRENT_TIMESTAMP(3)) WHERE key_id = ?")
                .bind(&key.key_id)
                .execute(db.main())
                .await?;
        }
    }
    Ok(ring)
}
