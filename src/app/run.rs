//! Running the application: the HTTP server, the accounting worker, the cron jobs and
//! the background refreshes, until shutdown.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use axum::serve::ListenerExt;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::App;

impl App {
    /// Cache refresh, stats flush, switch polling and key reloads, until `shutdown`
    /// flips.
    pub fn spawn_background(
        self: &Arc<Self>,
        mut shutdown: watch::Receiver<bool>,
    ) -> JoinHandle<()> {
        let app = self.clone();
        crate::shadow::spawn(async move {
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
                        if let Err(err) = app.guards.refresh().await {
                            tracing::warn!(error = %err, "blacklist refresh failed; keeping the last copy");
                        }
                        if let Err(err) = app.activities.refresh().await {
                            tracing::warn!(error = format!("{err:#}"), "activity cache refresh failed; serving the last snapshot");
                        }
                        if let Err(err) = app.switches.refresh(&app.redis).await {
                            tracing::warn!(error = %err, "switch refresh failed; keeping the last state");
                        }
                        let map = if !app.db.map_loaded() {
                            app.db.load_map().await
                        } else if app.db.shards().len() > 1 {
                            app.db.refresh_map().await
                        } else {
                            Ok(())
                        };
                        if let Err(err) = map {
                            tracing::warn!(error = format!("{err:#}"), "shard map refresh failed; keeping the last map");
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
                // Responses are small and written whole: Nagle's delay would only hold them back.
                let listener = listener.tap_io(|tcp| {
                    if let Err(err) = tcp.set_nodelay(true) {
                        tracing::warn!(error = %err, "could not set TCP_NODELAY");
                    }
                });
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
        // Events are delivered by every instance that serves or books (one at a time per
        // delivery); not for shadow traffic, whose events stay in its own database.
        if app.settings.webhooks.dispatch && (options.http || options.worker) {
            tasks.push(app.dispatcher.clone().spawn(rx.clone()));
        }
        if let Some(shadow) = &app.shadow {
            tasks.extend(shadow.start(options.worker, rx.clone()).await);
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
