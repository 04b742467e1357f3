//! The wiring: connects Redis and MySQL, builds every capability with what it uses,
//! and runs them (HTTP server, accounting worker, cron, background refreshes). Only this
//! module and the HTTP edge see all the capabilities.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::activity::{Activities, ActivityCache};
use crate::config::Settings;
use crate::http::auth::AuthKeys;
use crate::issue::budget::{Budget, BudgetSettings};
use crate::issue::coalesce::Coalescer;
use crate::issue::{Admission, Issuer, StatsCounter};
use crate::keys::{KeyRing, Keys};
use crate::ledger::Ledger;
use crate::ops::cron::{JobLock, Jobs};
use crate::ops::reconcile::Reconciler;
use crate::ops::switches::Switches;
use crate::settle::Settler;
use crate::store::{load_scripts, Db, Redis};
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
    pub settler: Settler,
    pub reconciler: Reconciler,
    pub jobs: Jobs,
    pub switches: Arc<Switches>,
    pub stats: Arc<StatsCounter>,
    pub auth: AuthKeys,
    pub metrics: PrometheusHandle,
    /// Names this process in consumer groups and locks.
    pub instance_id: String,
}

impl App {
    /// Connects and builds everything. MySQL is connected lazily; with `migrate` the
    /// schema is brought up to date first.
    pub async fn build(settings: Settings, migrate: bool) -> anyhow::Result<Arc<Self>> {
        let metrics = crate::metrics::install();
        let redis = Arc::new(Redis::connect(&settings.redis).await?);
        let db = Arc::new(Db::connect_lazy(&settings.mysql)?);
        if migrate {
            db.migrate().await?;
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
        let tokens = Tokens::new(redis.clone());
        let ledger = Ledger::new(db.clone(), tokens.clone());
        let issue = &settings.issue;
        let budget = Arc::new(Budget::new(
            BudgetSettings {
                sub_stocks: issue.sub_stocks,
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
        let issuer = Arc::new(Issuer {
            redis: redis.clone(),
            db: db.clone(),
            tokens: tokens.clone(),
            ledger: ledger.clone(),
            budget: budget.clone(),
            keys: keys.clone(),
            activities: cache.clone(),
            switches: switches.clone(),
            admission: Admission::new(issue.caller_per_s),
            stats: stats.clone(),
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
        };
        let withdrawals = Withdrawals::new(db.clone(), ledger.clone(), tokens.clone());
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
        };
        let reconciler = Reconciler {
            redis: redis.clone(),
            db: db.clone(),
            tokens: tokens.clone(),
            ledger: ledger.clone(),
            budget: budget.clone(),
            activities: cache.clone(),
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
            settler,
            reconciler,
            jobs,
            switches,
            stats,
            auth,
            metrics,
            instance_id,
        });
        app.load_scripts().await?;
        app.redis.ensure_groups().await?;
        app.switches.refresh(&app.redis).await?;
        // MySQL may be down at start: the instance still comes up (readiness says so)
        // and the background refresh fills the cache once MySQL answers.
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
        if let Ok(lengths) = pipe.query_async::<Vec<u64>>(&mut self.redis.conn()).await {
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

    fn activity_ids(&self) -> Vec<String> {
        self.activities
            .cache()
            .all()
            .iter()
            .map(|a| a.activity.id.clone())
            .collect()
    }

    /// Cache refresh, stats flush, switch polling and key reloads, until `shutdown`
    /// flips.
    pub fn spawn_background(
        self: &Arc<Self>,
        mut shutdown: watch::Receiver<bool>,
    ) -> JoinHandle<()> {
        let app = self.clone();
        tokio::spawn(async move {
            let every = |ms: u64| {
                let mut tick = tokio::time::interval(Duration::from_millis(ms));
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                tick
            };
            let mut cache_tick = every(app.settings.issue.cache_refresh_ms);
            let mut stats_tick = every(app.settings.issue.stats_flush_ms);
            // A zero period turns key reloads off (the branch below is then disabled).
            let reload_keys = app.settings.keys.refresh_ms > 0;
            let keys_every = Duration::from_millis(app.settings.keys.refresh_ms.max(1));
            let mut keys_tick =
                tokio::time::interval_at(tokio::time::Instant::now() + keys_every, keys_every);
            keys_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = shutdown.changed() => break,
                    _ = cache_tick.tick() => {
                        if let Err(err) = app.activities.refresh().await {
                            tracing::warn!(error = format!("{err:#}"), "activity cache refresh failed; serving the last snapshot");
                        }
                        if let Err(err) = app.switches.refresh(&app.redis).await {
                            tracing::warn!(error = %err, "switch refresh failed; keeping the last state");
                        }
                    }
                    _ = keys_tick.tick(), if reload_keys => {
                        if let Err(err) = app.refresh_keys().await {
                            tracing::warn!(error = format!("{err:#}"), "signing key refresh failed; keeping the current keys");
                        }
                    }
                    _ = stats_tick.tick() => {
                        if let Err(err) = app.stats.flush(&app.redis, &app.activity_ids()).await {
                            tracing::warn!(error = %err, "stats flush failed; will retry");
                        }
                    }
                }
            }
            let _ = app.stats.flush(&app.redis, &app.activity_ids()).await;
        })
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

/// A running instance: HTTP server, background tasks and (optionally) the worker.
pub struct Running {
    pub addr: SocketAddr,
    pub app: Arc<App>,
    shutdown: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
    scheduler: Option<tokio_cron_scheduler::JobScheduler>,
}

#[derive(Debug, Clone, Copy)]
pub struct RunOptions {
    pub http: bool,
    pub worker: bool,
    pub cron: bool,
}

impl Running {
    pub async fn start(app: Arc<App>, options: RunOptions) -> anyhow::Result<Self> {
        let (shutdown, rx) = watch::channel(false);
        let mut tasks = vec![app.spawn_background(rx.clone())];
        let mut addr = app.settings.http.addr;
        if options.http {
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("binding http.addr {addr}"))?;
            addr = listener.local_addr()?;
            let router = crate::http::router(app.clone());
            let mut stop = rx.clone();
            let mut stop_deadline = rx.clone();
            let grace = Duration::from_millis(app.settings.http.shutdown_timeout_ms);
            tasks.push(tokio::spawn(async move {
                let server = axum::serve(listener, router).with_graceful_shutdown(async move {
                    let _ = stop.changed().await;
                });
                // In-flight requests get `grace` to finish; then the server is dropped.
                tokio::select! {
                    result = server => if let Err(err) = result { tracing::error!(error = %err, "http server failed") },
                    _ = async move {
                        let _ = stop_deadline.changed().await;
                        tokio::time::sleep(grace).await;
                    } => tracing::warn!("in-flight requests outlived the shutdown timeout"),
                }
            }));
        }
        if options.worker && app.settings.settle.enabled {
            tasks.extend(crate::settle::worker::spawn(&app.settler, rx.clone()));
        }
        let scheduler = if options.cron {
            Some(app.jobs.start().await?)
        } else {
            None
        };
        Ok(Self {
            addr,
            app,
            shutdown,
            tasks,
            scheduler,
        })
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Signals every task to stop and waits for them (bounded by the shutdown timeout).
    pub async fn stop(mut self) {
        let _ = self.shutdown.send(true);
        if let Some(mut scheduler) = self.scheduler.take() {
            let _ = scheduler.shutdown().await;
        }
        let grace = Duration::from_millis(self.app.settings.http.shutdown_timeout_ms);
        for task in self.tasks.drain(..) {
            if tokio::time::timeout(grace, task).await.is_err() {
                tracing::warn!("a task did not stop within the shutdown timeout");
            }
        }
    }
}

/// Resolves on SIGTERM or Ctrl-C.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}
