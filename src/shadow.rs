//! Shadow traffic (API.md, "Shadow traffic"): a request with `X-RPW-Shadow: 1` is load-test
//! traffic. It runs the same code, through a second, complete instance of the service
//! (the *shadow app*) built beside the real one, whose data lives apart:
//! - Redis keys under `{redis.key_prefix}shadow:` (same servers, other keys);
//! - MySQL in its own database (`shadow.mysql_url`; by default the main database's
//!   name with `_shadow`, on the same server), migrated like the real one;
//! - no metric series: every metric call made for shadow work is dropped ([`active`]).
//!
//! Shadow data expires: every shadow request refreshes a marker key that lives
//! `shadow.expire_after_secs`; once it has lapsed (no shadow traffic for that long), the
//! next purge check drops every shadow Redis key and empties the shadow tables.
//!
//! The shadow app runs its own accounting worker when the real one does; its cron jobs
//! are not run.

use std::future::Future;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;

use anyhow::Context;
use sqlx::Connection;

use crate::app::App;
use crate::config::{Secret, Settings};
use crate::store::{now_ms, Redis};

/// The shadow app beside a real one, and the expiry of its data.
pub struct Shadow {
    pub app: Arc<App>,
    pub expiry: Arc<Expiry>,
}

impl Shadow {
    /// Builds the shadow app for `real` settings: its database created and migrated,
    /// everything it starts marked as shadow work.
    pub async fn build(real: &Settings) -> anyhow::Result<Self> {
        let settings = settings(real)?;
        ensure_database(real, &settings).await?;
        let expiry = Arc::new(Expiry::new(settings.shadow.expire_after_secs));
        let app = scope(App::build_one(settings, true, None))
            .await
            .context("building the shadow app")?;
        Ok(Self { app, expiry })
    }

    /// Starts the shadow app's background refreshes, its accounting worker (when
    /// `worker`) and the purge check, as shadow work, until `shutdown` flips.
    pub async fn start(
        &self,
        worker: bool,
        shutdown: watch::Receiver<bool>,
    ) -> Vec<JoinHandle<()>> {
        scope(async {
            let mut tasks = vec![self.app.spawn_background(shutdown.clone())];
            if worker && self.app.settings.settle.enabled {
                tasks.extend(crate::settle::worker::spawn(&self.app.settler, shutdown.clone()));
            }
            let app = self.app.clone();
            let expiry = self.expiry.clone();
            let mut stop = shutdown.clone();
            let every = Duration::from_millis(app.settings.shadow.purge_check_ms.max(1_000));
            tasks.push(spawn(async move {
                loop {
                    tokio::select! {
                        _ = stop.changed() => break,
                        _ = tokio::time::sleep(every) => {
                            if let Err(err) = expiry.purge_if_expired(&app).await {
                                tracing::warn!(error = format!("{err:#}"), "shadow purge failed; will retry");
                            }
                        }
                    }
                }
            }));
            tasks
        })
        .await
    }
}

tokio::task_local! {
    static SHADOW: ();
}

/// The request header that marks shadow traffic, and the value that does.
pub const HEADER: &str = "x-rpw-shadow";

/// Whether the running task does shadow work (its metrics are dropped).
pub fn active() -> bool {
    SHADOW.try_with(|_| ()).is_ok()
}

/// Runs `fut` as shadow work.
pub async fn scope<F: Future>(fut: F) -> F::Output {
    SHADOW.scope((), fut).await
}

/// `tokio::spawn`, keeping the spawning task's shadow mark: work a shadow request or
/// the shadow app starts stays shadow work.
pub fn spawn<F>(fut: F) -> tokio::task::JoinHandle<F::Output>
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    if active() {
        tokio::spawn(SHADOW.scope((), fut))
    } else {
        tokio::spawn(fut)
    }
}

/// The settings of the shadow app: the real ones with its own key prefix and database,
/// one shard, no shadow of its own.
pub fn settings(real: &Settings) -> anyhow::Result<Settings> {
    let mut s = real.clone();
    s.redis.key_prefix = format!("{}shadow:", real.redis.key_prefix);
    let url = database_url(real)?;
    let real_urls = std::iter::once(&real.mysql.url).chain(&real.mysql.shard_urls);
    if real_urls
        .map(|u| database_of(u.expose()))
        .any(|d| d == database_of(&url))
    {
        anyhow::bail!("shadow.mysql_url names a real database: shadow data must live apart");
    }
    s.mysql.url = Secret::new(url);
    s.mysql.shard_urls = Vec::new();
    s.mysql.max_connections = real.mysql.max_connections.min(8);
    s.mysql.min_connections = 0;
    s.shadow.enabled = false;
    Ok(s)
}

/// The server and database a MySQL URL names (`host:port/name`, lowercase), without
/// credentials or options.
fn database_of(url: &str) -> String {
    let base = url.split('?').next().unwrap_or(url);
    let rest = base.split_once("://").map_or(base, |(_, r)| r);
    let at_host = rest.rsplit_once('@').map_or(rest, |(_, h)| h);
    at_host.to_ascii_lowercase()
}

/// `shadow.mysql_url`, or the main database's URL with `_shadow` after its name.
fn database_url(real: &Settings) -> anyhow::Result<String> {
    let configured = real.shadow.mysql_url.expose();
    if !configured.is_empty() {
        return Ok(configured.to_string());
    }
    let main = real.mysql.url.expose();
    let (base, query) = main.split_once('?').unwrap_or((main, ""));
    let slash = base
        .rfind('/')
        .filter(|i| *i >= "mysql://".len())
        .context("mysql.url names no database")?;
    if slash + 1 == base.len() {
        anyhow::bail!("mysql.url names no database");
    }
    let mut url = format!("{base}_shadow");
    if !query.is_empty() {
        url = format!("{url}?{query}");
    }
    Ok(url)
}

/// Creates the shadow database when it is missing (through the main database's
/// connection: the same server, unless `shadow.mysql_url` says otherwise).
pub async fn ensure_database(real: &Settings, shadow: &Settings) -> anyhow::Result<()> {
    let url = shadow.mysql.url.expose();
    let name = url
        .split('?')
        .next()
        .and_then(|base| base.rsplit('/').next())
        .filter(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_'))
        .context("the shadow database name must be [A-Za-z0-9_]+")?;
    let admin_url = if real.shadow.mysql_url.expose().is_empty() {
        real.mysql.url.expose()
    } else {
        url
    };
    let mut conn = sqlx::MySqlConnection::connect(admin_url)
        .await
        .context("connecting to create the shadow database")?;
    sqlx::query(&format!("CREATE DATABASE IF NOT EXISTS `{name}`"))
        .execute(&mut conn)
        .await
        .context("creating the shadow database")?;
    conn.close().await.ok();
    Ok(())
}

/// The tables shadow work writes, emptied by a purge (the schema's own bookkeeping,
/// the shard map and the signing keys stay).
const DATA_TABLES: &[&str] = &[
    "webhook_deliveries",
    "events",
    "webhook_subscriptions",
    "ledger_entries",
    "accounts",
    "withdrawals",
    "coupon_redemption_keys",
    "coupons",
    "coupon_templates",
    "packet_shares",
    "packets",
    "budget_grants",
    "budget_generations",
    "scenes",
    "activities",
    "reconciliation_reports",
    "flagged_users",
];

/// Keeps shadow data alive while shadow traffic comes; drops it once it stopped.
pub struct Expiry {
    expire_after_secs: u64,
    /// When this instance last refreshed the marker (ms), so a burst of shadow requests
    /// costs one Redis write per second, not one per request.
    refreshed_at: AtomicI64,
}

impl Expiry {
    pub fn new(expire_after_secs: u64) -> Self {
        Self {
            expire_after_secs: expire_after_secs.max(1),
            refreshed_at: AtomicI64::new(0),
        }
    }

    fn marker(redis: &Redis) -> String {
        format!("{}alive", redis.prefix())
    }

    /// Called for every shadow request: the marker lives `expire_after_secs` more.
    pub async fn touch(&self, redis: &Redis) {
        let now = now_ms();
        let last = self.refreshed_at.load(Ordering::Relaxed);
        if now - last < 1_000
            || self
                .refreshed_at
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_err()
        {
            return;
        }
        let mut set = redis::pipe();
        set.cmd("SET")
            .arg(Self::marker(redis))
            .arg(now)
            .arg("EX")
            .arg(self.expire_after_secs)
            .ignore();
        if let Err(err) = redis.query::<()>(&set).await {
            tracing::warn!(error = %err, "shadow marker refresh failed");
        }
    }

    /// Drops every shadow key and empties the shadow tables when the marker has lapsed;
    /// returns whether it did.
    pub async fn purge_if_expired(&self, app: &App) -> anyhow::Result<bool> {
        let mut get = redis::pipe();
        get.cmd("GET").arg(Self::marker(&app.redis));
        let (alive,): (Option<String>,) = app.redis.query(&get).await?;
        if alive.is_some() {
            return Ok(false);
        }
        purge(app).await?;
        self.refreshed_at.store(0, Ordering::Relaxed);
        Ok(true)
    }
}

/// Purges the shadow data of the deployment `real` configures if its marker has lapsed:
/// for a deployment none of whose instances runs any more (a running one purges its own).
/// Returns whether it purged; shadow traffic still coming keeps the data.
pub async fn purge_lapsed(real: &Settings) -> anyhow::Result<bool> {
    anyhow::ensure!(
        real.shadow.enabled,
        "shadow traffic is not enabled in this configuration (shadow.enabled): nothing to purge"
    );
    let shadow = Shadow::build(real).await?;
    shadow.expiry.purge_if_expired(&shadow.app).await
}

/// Empties the shadow data tables, then drops every key under the shadow prefix. In
/// that order: the shadow app's budget refresh, finding its sub-stocks gone while the
/// tables still held the activity, would grant a new generation into Redis after the
/// keys were dropped; with the tables empty first, whatever it writes meanwhile goes
/// with the keys.
pub async fn purge(app: &App) -> anyhow::Result<()> {
    for table in DATA_TABLES {
        sqlx::query(&format!("DELETE FROM {table}"))
            .execute(app.db.main())
            .await
            .with_context(|| format!("emptying shadow table {table}"))?;
    }
    let deleted = app.redis.delete_prefixed().await?;
    tracing::info!(redis_keys = deleted, "shadow data purged");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shadow_database_is_the_main_one_with_a_suffix() {
        let mut s = Settings::load_with(None, Vec::new()).unwrap();
        s.mysql.url = Secret::new("mysql://u:p@127.0.0.1:3306/rpw?ssl-mode=disabled");
        let shadow = settings(&s).unwrap();
        assert_eq!(
            shadow.mysql.url.expose(),
            "mysql://u:p@127.0.0.1:3306/rpw_shadow?ssl-mode=disabled"
        );
        assert_eq!(
            shadow.redis.key_prefix,
            format!("{}shadow:", s.redis.key_prefix)
        );
        assert!(!shadow.shadow.enabled);
        s.mysql.url = Secret::new("mysql://u:p@127.0.0.1:3306/");
        assert!(settings(&s).is_err());
        s.shadow.mysql_url = Secret::new("mysql://u:p@10.0.0.9/loadtest");
        assert_eq!(
            settings(&s).unwrap().mysql.url.expose(),
            "mysql://u:p@10.0.0.9/loadtest"
        );
        // Never a real database, main or shard, whatever the credentials or options.
        s.mysql.url = Secret::new("mysql://u:p@127.0.0.1:3306/rpw");
        s.shadow.mysql_url = Secret::new("mysql://other:x@127.0.0.1:3306/RPW?ssl-mode=disabled");
        assert!(settings(&s).is_err());
        s.mysql.shard_urls = vec![Secret::new("mysql://u:p@10.0.0.2:3306/rpw2")];
        s.shadow.mysql_url = Secret::new("mysql://u:p@10.0.0.2:3306/rpw2");
        assert!(settings(&s).is_err());
        s.shadow.mysql_url = Secret::new("mysql://u:p@10.0.0.2:3306/rpw2_shadow");
        assert!(settings(&s).is_ok());
    }
}
