//! Building the application: connections, keys, caches, background tasks and the router.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use axum::extract::DefaultBodyLimit;
use axum::Router;
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tower_http::timeout::TimeoutLayer;
use tower_http::trace::TraceLayer;

use crate::activity::ActivityCache;
use crate::admission::Admission;
use crate::config::Settings;
use crate::http::auth::AuthKeys;
use crate::issue::budget::BudgetSettings;
use crate::issue::stats::StatsCounter;
use crate::issue::{Budget, Issuer};
use crate::keys::{KeyRing, Keys};
use crate::settle::Marker;
use crate::store::{load_scripts, Db, Redis};
use crate::switches::Switches;

/// Everything a request or a background task needs; shared as `Arc<App>`.
pub struct App {
    pub settings: Settings,
    pub redis: Redis,
    pub db: Db,
    pub keys: Keys,
    pub activities: ActivityCache,
    pub budget: Budget,
    pub issuer: Issuer,
    /// Single awards go through here, to be issued in batches under load.
    pub coalescer: crate::issue::coalesce::Coalescer,
    pub marker: Marker,
    /// The booking bound of this instance (`settle.max_tps`): the worker and the cron
    /// sweep draw from this one bucket. `None` when unbounded.
    pub booking_limiter: Option<Arc<governor::DefaultDirectRateLimiter>>,
    pub stats: StatsCounter,
    pub switches: Switches,
    pub admission: Admission,
    pub auth: AuthKeys,
    pub metrics: PrometheusHandle,
    /// Names this process in consumer groups and locks.
    pub instance_id: String,
}

pub type AppState = Arc<App>;

impl App {
    /// Connects and loads everything. MySQL is connected lazily; with `migrate` the
    /// schema is brought up to date first.
    pub async fn build(settings: Settings, migrate: bool) -> anyhow::Result<Arc<Self>> {
        let metrics = crate::metrics::install();
        let redis = Redis::connect(&settings.redis).await?;
        let db = Db::connect_lazy(&settings.mysql)?;
        if migrate {
            db.migrate().await?;
        }
        let keys = match load_shared_keys(&db, &settings).await {
            Ok(ring) => ring,
            Err(err) => {
                tracing::warn!(error = format!("{err:#}"), "could not sync signing keys with mysql; using the keys directory alone until the next key refresh");
                KeyRing::load(&settings.keys.dir, &[])?
            }
        };
        if keys.active_key_id().is_none() {
            tracing::warn!(dir = %settings.keys.dir.display(), "no active signing key: awards will fail until `keys generate` is run");
        }
        let auth = AuthKeys::new(
            &settings.auth,
            settings.caller_keys(),
            settings.wallet.jwt_leeway_secs,
        );
        let app = Arc::new_cyclic(|weak| App {
            coalescer: crate::issue::coalesce::Coalescer::start(
                weak.clone(),
                settings.issue.coalesce_max_batch,
                settings.issue.coalesce_in_flight,
            ),
            budget: Budget::new(BudgetSettings {
                sub_stocks: settings.issue.sub_stocks,
                recheck: Duration::from_millis(settings.issue.exhausted_recheck_ms),
                grant_slices: settings.issue.grant_slices,
                in_flight_grace: Duration::from_millis(settings.issue.in_flight_grace_ms),
                in_doubt_grace: Duration::from_millis(settings.issue.in_doubt_grace_ms),
            }),
            booking_limiter: crate::settle::worker::rate_limiter(
                settings.settle.max_tps,
                settings.settle.batch_size,
            ),
            admission: Admission::new(settings.issue.caller_per_s),
            issuer: Issuer::default(),
            marker: Marker::default(),
            stats: StatsCounter::default(),
            switches: Switches::default(),
            activities: ActivityCache::default(),
            instance_id: format!(
                "{}-{}-{:06x}",
                hostname(),
                std::process::id(),
                rand::random::<u32>() & 0xff_ffff
            ),
            settings,
            redis,
            db,
            keys: Keys::new(keys),
            auth,
            metrics,
        });
        app.load_scripts().await?;
        app.redis.ensure_groups().await?;
        app.switches.refresh(&app.redis).await?;
        // MySQL may be down at start: the instance still comes up (readiness says so)
        // and the background refresh fills the cache once MySQL answers.
        if let Err(err) = app.refresh_activities().await {
            tracing::warn!(
                error = format!("{err:#}"),
                "activity cache not loaded at start; will retry"
            );
        }
        // A changed `issue.sub_stocks` moves each activity's budget into the new layout.
        for cached in app.activities.all() {
            if let Err(err) = app
                .budget
                .relayout(&app.redis, &app.db, &cached.activity.id)
                .await
            {
                tracing::warn!(
                    activity = cached.activity.id,
                    error = format!("{err:#}"),
                    "budget re-layout failed; will use the current layout"
                );
            }
        }
        Ok(app)
    }

    pub async fn load_scripts(&self) -> anyhow::Result<()> {
        let mut conn = self.redis.conn();
        let mut scripts: Vec<&redis::Script> = self.budget.scripts().to_vec();
        scripts.extend(self.issuer.scripts());
        scripts.push(self.marker.script());
        load_scripts(&mut conn, &scripts)
            .await
            .context("loading redis scripts")
    }

    /// Reloads the activity cache and the live budget generations, and keeps the
    /// sub-stocks of activities not ended yet funded by grants. One activity failing to
    /// refill does not keep the others from it.
    pub async fn refresh_activities(&self) -> anyhow::Result<()> {
        self.activities.refresh(self.db.main()).await?;
        self.budget.refresh_live(&self.redis, &self.db).await?;
        let now = chrono::Utc::now();
        for cached in self.activities.all() {
            let a = &cached.activity;
            if a.ends_at <= now {
                continue;
            }
            if let Err(err) = self
                .budget
                .refill(
                    &self.redis,
                    &self.db,
                    &a.id,
                    a.budget_cents,
                    a.max_award_cents,
                )
                .await
            {
                tracing::warn!(
                    activity = a.id,
                    error = format!("{err:#}"),
                    "budget refill failed; will retry"
                );
            }
        }
        Ok(())
    }

    /// Refreshes gauges that are read on demand (the settlement backlog).
    pub async fn update_gauges(&self) {
        let mut pipe = redis::pipe();
        for p in 0..self.redis.partitions() {
            pipe.xlen(self.redis.stream_key(p));
        }
        let mut conn = self.redis.conn();
        if let Ok(lengths) = pipe.query_async::<Vec<u64>>(&mut conn).await {
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

    /// Cache refresh, stats flush, switch polling and key reloads, until `shutdown`
    /// flips.
    pub fn spawn_background(
        self: &Arc<Self>,
        mut shutdown: watch::Receiver<bool>,
    ) -> JoinHandle<()> {
        let app = self.clone();
        tokio::spawn(async move {
            let mut cache_tick =
                tokio::time::interval(Duration::from_millis(app.settings.issue.cache_refresh_ms));
            let mut stats_tick =
                tokio::time::interval(Duration::from_millis(app.settings.issue.stats_flush_ms));
            // A zero period turns key reloads off (the branch below is then disabled).
            let reload_keys = app.settings.keys.refresh_ms > 0;
            let keys_every = Duration::from_millis(app.settings.keys.refresh_ms.max(1));
            let mut keys_tick =
                tokio::time::interval_at(tokio::time::Instant::now() + keys_every, keys_every);
            cache_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            stats_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            keys_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = shutdown.changed() => break,
                    _ = cache_tick.tick() => {
                        if let Err(err) = app.refresh_activities().await {
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
                        let ids: Vec<String> = app.activities.all().iter().map(|a| a.activity.id.clone()).collect();
                        if let Err(err) = app.stats.flush(&app.redis, &ids).await {
                            tracing::warn!(error = %err, "stats flush failed; will retry");
                        }
                    }
                }
            }
            let ids: Vec<String> = app
                .activities
                .all()
                .iter()
                .map(|a| a.activity.id.clone())
                .collect();
            let _ = app.stats.flush(&app.redis, &ids).await;
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

/// The whole HTTP surface, one router per capability.
pub fn router(app: Arc<App>) -> Router {
    let settings = &app.settings.http;
    Router::new()
        .merge(crate::http::router())
        .merge(crate::activity::router())
        .merge(crate::issue::http::router())
        .merge(crate::wallet::router())
        .merge(crate::withdraw::router())
        .merge(crate::switches::router())
        .route(
            "/v1/admin/reconciliation",
            axum::routing::get(crate::reconcile::list_handler),
        )
        .route(
            "/v1/admin/parked",
            axum::routing::get(crate::reconcile::parked_handler),
        )
        .fallback(crate::http::not_found)
        .layer(DefaultBodyLimit::max(settings.body_limit_bytes))
        .layer(TimeoutLayer::with_status_code(
            axum::http::StatusCode::SERVICE_UNAVAILABLE,
            Duration::from_millis(settings.request_timeout_ms),
        ))
        .layer(axum::middleware::map_response(crate::http::envelope_errors))
        .layer(TraceLayer::new_for_http())
        .with_state(app)
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
            let router = router(app.clone());
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
            tasks.extend(crate::settle::worker::spawn(app.clone(), rx.clone()));
        }
        let scheduler = if options.cron {
            Some(crate::cron::start(app.clone()).await?)
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
