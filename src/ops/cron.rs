//! Scheduled jobs (tokio-cron-scheduler), each run by one instance per tick.
//!
//! | job | default schedule | work |
//! |---|---|---|
//! | `settle` | every 10 s | reclaim stuck stream entries, book stragglers in every partition; drain ended activities and mark them drained |
//! | `reconcile_hourly` | minute 5 of every hour | reconcile the previous hour (h+1) |
//! | `reconcile_live` | every minute | reconcile the current hour; write `budget.low` for activities running low |
//! | `housekeeping` | every 10 min | trim settled tokens older than the retention from Redis |
//!
//! A job takes a Redis lock (SET NX PX with an owner token, released only by its owner)
//! and records the tick it ran for, so with several instances each tick runs once.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use redis::AsyncCommands;
use tokio_cron_scheduler::{Job, JobScheduler};

use crate::activity::ActivityCache;
use crate::config::{CronSettings, WalletSettings};
use crate::ops::reconcile::Reconciler;
use crate::settle::{settle_until, Settler};
use crate::store::{hour_of, now_ms, Redis};
use crate::tokens::{Tokens, TrimSettings};

const RELEASE: &str = r"
-- KEYS[1]: the lock; ARGV[1]: the owner token. Deletes the lock only if still ours.
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0";

/// The per-job Redis lock every instance takes before running a tick.
#[derive(Clone)]
pub struct JobLock {
    pub redis: Arc<Redis>,
    pub ttl_ms: u64,
    /// Names this process in lock owners.
    pub instance_id: String,
}

impl JobLock {
    /// Runs `work` for `tick` (unix seconds) unless another instance holds the job's
    /// lock or already ran this tick. Returns whether it ran.
    pub async fn run<F, Fut>(&self, job: &str, tick: i64, work: F) -> anyhow::Result<bool>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = anyhow::Result<()>>,
    {
        let lock = self.redis.lock_key(job);
        let done = format!("{lock}:done");
        let owner = format!("{}-{}", self.instance_id, rand::random::<u64>());
        let mut conn = self.redis.conn();
        let acquired: Option<String> = redis::cmd("SET")
            .arg(&lock)
            .arg(&owner)
            .arg("NX")
            .arg("PX")
            .arg(self.ttl_ms)
            .query_async(&mut conn)
            .await?;
        if acquired.is_none() {
            return Ok(false);
        }
        let last: Option<i64> = conn.get(&done).await?;
        let ran = if last.is_some_and(|l| l >= tick) {
            false
        } else {
            let result = work().await;
            let _: () = conn.set_ex(&done, tick, 86_400).await?;
            if let Err(err) = result {
                tracing::error!(job, error = format!("{err:#}"), "cron job failed");
            }
            true
        };
        let release = crate::store::script(RELEASE);
        let mut pipe = redis::pipe();
        pipe.add_command(
            crate::store::evalsha(&release, &[&lock])
                .arg(&owner)
                .clone(),
        );
        let _: (i64,) = crate::store::query_scripted(&self.redis, &pipe, &[&release]).await?;
        Ok(ran)
    }

    /// A cron job that runs `work` under this lock, so one instance runs each tick;
    /// `work` is given the tick (unix seconds) it runs for.
    pub fn job<F, Fut>(&self, name: &'static str, schedule: &str, work: F) -> anyhow::Result<Job>
    where
        F: Fn(i64) -> Fut + Send + Sync + Clone + 'static,
        Fut: Future<Output = anyhow::Result<()>> + Send + 'static,
    {
        let lock = self.clone();
        Job::new_async(schedule, move |_id, _scheduler| {
            let lock = lock.clone();
            let work = work.clone();
            Box::pin(async move {
                let tick = chrono::Utc::now().timestamp();
                if let Err(err) = lock.run(name, tick, || work(tick)).await {
                    tracing::warn!(
                        job = name,
                        error = format!("{err:#}"),
                        "cron job could not take its lock"
                    );
                }
            })
        })
        .map_err(|e| anyhow::anyhow!("cron.{name}: bad schedule `{schedule}`: {e}"))
    }
}

/// What the scheduled jobs use. Cheap to clone.
#[derive(Clone)]
pub struct Jobs {
    pub lock: JobLock,
    pub settler: Settler,
    pub reconciler: Reconciler,
    pub tokens: Tokens,
    pub activities: Arc<ActivityCache>,
    pub cron: CronSettings,
    pub wallet: WalletSettings,
    pub packets: crate::packets::Packets,
    pub coupons: crate::coupons::Coupons,
}

impl Jobs {
    /// Trims settled tokens older than the retention from Redis (see
    /// [`Tokens::trim`]). Returns how many tokens were trimmed.
    pub async fn housekeeping(&self) -> anyhow::Result<usize> {
        let now = now_ms();
        let settings = TrimSettings {
            settled_before_ms: now - (self.wallet.settled_retention_secs as i64) * 1000,
            now_ms: now,
            grace_ms: (self.wallet.retry_grace_secs as i64) * 1000,
            batch: self.cron.housekeeping_batch,
            max_rounds: self.cron.housekeeping_max_rounds,
        };
        let activities = &self.activities;
        Ok(self
            .tokens
            .trim(settings, |a| {
                activities
                    .get(a)
                    .map(|c| c.activity.ends_at.timestamp_millis())
            })
            .await?)
    }

    async fn run(&self, name: &'static str) -> anyhow::Result<()> {
        match name {
            "settle" => {
                let deadline =
                    tokio::time::Instant::now() + Duration::from_millis(self.cron.lock_ttl_ms / 2);
                let max = self.settler.settings.sweep_max_batches;
                let booked =
                    settle_until(&self.settler, max, Some(deadline), &mut |_, _| {}).await?;
                let drained = self.reconciler.mark_drained().await?;
                tracing::info!(
                    job = name,
                    booked,
                    drained = drained.len(),
                    "batch settlement done"
                );
            }
            "reconcile_hourly" | "reconcile_live" => {
                // h+1 looks back at the hour that just ended; live looks at the current one.
                let (at_ms, kind) = if name == "reconcile_hourly" {
                    (now_ms() - 3_600_000, "hourly")
                } else {
                    (now_ms(), "live")
                };
                let hour = hour_of(at_ms);
                let reports = self
                    .reconciler
                    .reconcile_hour(&hour, kind)
                    .await
                    .map_err(|e| anyhow::anyhow!("{}: {e:#}", e.code()))?;
                tracing::info!(
                    job = name,
                    hour,
                    reports = reports.len(),
                    "reconciliation done"
                );
                if name == "reconcile_live" {
                    self.reconciler.check_budget_low().await?;
                }
            }
            "housekeeping" => {
                let trimmed = self.housekeeping().await?;
                tracing::info!(job = name, trimmed, "housekeeping done");
            }
            "packet_refunds" => {
                let now = now_ms();
                let refunded = self
                    .packets
                    .refund_due(now)
                    .await
                    .map_err(|e| anyhow::anyhow!("{}: {e:#}", e.code()))?;
                // Shares opened in the last hour (and not in the last half minute, whose
                // opens may still be storing them) whose token neither Redis nor the
                // ledger holds.
                let restored = self
                    .packets
                    .restore_shares(now - 3_600_000, now - 30_000)
                    .await
                    .map_err(|e| anyhow::anyhow!("{}: {e:#}", e.code()))?;
                tracing::info!(job = name, refunded, restored, "red packet refunds done");
            }
            "coupon_expiry" => {
                let expired = self
                    .coupons
                    .expire_due(now_ms())
                    .await
                    .map_err(|e| anyhow::anyhow!("{}: {e:#}", e.code()))?;
                tracing::info!(job = name, expired, "coupon expiry done");
            }
            other => anyhow::bail!("unknown job {other}"),
        }
        Ok(())
    }

    /// Registers every job with a non-empty schedule and starts the scheduler.
    pub async fn start(&self) -> anyhow::Result<JobScheduler> {
        let scheduler = JobScheduler::new().await?;
        let jobs: [(&'static str, &String); 6] = [
            ("settle", &self.cron.settle),
            ("reconcile_hourly", &self.cron.reconcile_hourly),
            ("reconcile_live", &self.cron.reconcile_live),
            ("housekeeping", &self.cron.housekeeping),
            ("packet_refunds", &self.cron.packet_refunds),
            ("coupon_expiry", &self.cron.coupon_expiry),
        ];
        for (name, schedule) in jobs {
            if schedule.trim().is_empty() {
                tracing::info!(job = name, "cron job disabled (empty schedule)");
                continue;
            }
            let me = self.clone();
            let job = self.lock.job(name, schedule, move |_tick| {
                let me = me.clone();
                async move { me.run(name).await }
            })?;
            scheduler.add(job).await?;
        }
        scheduler.start().await?;
        Ok(scheduler)
    }
}
