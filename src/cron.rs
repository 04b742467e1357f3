//! Scheduled jobs (tokio-cron-scheduler), each run by one instance per tick.
//!
//! | job | default schedule | work |
//! |---|---|---|
//! | `settle` | every 10 s | reclaim stuck stream entries, book stragglers in every partition; drain ended activities and mark them drained |
//! | `reconcile_hourly` | minute 5 of every hour | reconcile the previous hour (h+1) |
//! | `reconcile_live` | every minute | reconcile the current hour |
//! | `housekeeping` | every 10 min | trim settled tokens older than the retention from Redis |
//!
//! A job takes a Redis lock (SET NX PX with an owner token, released only by its owner)
//! and records the tick it ran for, so with several instances each tick runs once.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use redis::AsyncCommands;
use tokio_cron_scheduler::{Job, JobScheduler};

use crate::settle::worker::{Outcome, Worker, WorkerOptions};
use crate::startup::App;
use crate::store::{hour_of, now_ms};

const RELEASE: &str = r"
-- KEYS[1]: the lock; ARGV[1]: the owner token. Deletes the lock only if still ours.
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0";

/// Runs `job` for `tick` (unix seconds) unless another instance holds the job's lock or
/// already ran this tick. Returns whether it ran.
pub async fn run_guarded<F, Fut>(app: &App, job: &str, tick: i64, work: F) -> anyhow::Result<bool>
where
    F: FnOnce() -> Fut,
    Fut: Future<Output = anyhow::Result<()>>,
{
    let lock = app.redis.lock_key(job);
    let done = format!("{lock}:done");
    let owner = format!("{}-{}", app.instance_id, rand::random::<u64>());
    let mut conn = app.redis.conn();
    let acquired: Option<String> = redis::cmd("SET")
        .arg(&lock)
        .arg(&owner)
        .arg("NX")
        .arg("PX")
        .arg(app.settings.cron.lock_ttl_ms)
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
    let _: i64 = redis::Script::new(RELEASE)
        .key(&lock)
        .arg(&owner)
        .invoke_async(&mut conn)
        .await?;
    Ok(ran)
}

/// Books whatever is left in every partition, reclaiming entries of dead consumers.
/// It draws from the instance's booking bucket, like the worker. Bounded: at most
/// `max_batches` batches per partition, and it stops at `deadline` (the scheduled sweep
/// passes half its lock's lifetime, so it never outlives the lock). A failing partition
/// is logged and skipped; the others are still swept. Returns tokens newly booked.
pub async fn settle_all(app: &Arc<App>, max_batches: usize) -> anyhow::Result<usize> {
    settle_until(app, max_batches, None).await
}

pub async fn settle_until(
    app: &Arc<App>,
    max_batches: usize,
    deadline: Option<tokio::time::Instant>,
) -> anyhow::Result<usize> {
    let settings = &app.settings.settle;
    let mut worker = Worker::new(
        app.clone(),
        WorkerOptions {
            consumer: format!("{}-sweep", app.instance_id),
            batch_size: settings.batch_size,
            claim_idle: Duration::from_millis(settings.claim_idle_ms),
            stop_after_commit: false,
        },
        app.booking_limiter.clone(),
    );
    let mut booked = 0;
    let mut failed = 0;
    for p in 0..app.redis.partitions() {
        for _ in 0..max_batches {
            if deadline.is_some_and(|d| tokio::time::Instant::now() >= d) {
                return Ok(booked);
            }
            match worker.try_execute_batch(p).await {
                Ok(Outcome::Booked { newly_booked, .. }) => booked += newly_booked,
                Ok(_) => break,
                Err(err) => {
                    failed += 1;
                    crate::metrics::booking_failure(p);
                    tracing::warn!(
                        partition = p,
                        error = format!("{err:#}"),
                        "sweep: booking batch failed; going on with the next partition"
                    );
                    break;
                }
            }
        }
    }
    if failed > 0 {
        tracing::warn!(
            failed_partitions = failed,
            booked,
            "sweep done with failures"
        );
    }
    Ok(booked)
}

/// After an activity's end: once every issued token is booked, records it as drained.
pub async fn mark_drained(app: &App) -> anyhow::Result<Vec<String>> {
    let mut drained = Vec::new();
    let now = chrono::Utc::now();
    for cached in app.activities.all() {
        let a = &cached.activity;
        if a.ends_at > now {
            continue;
        }
        let issued = crate::reconcile::issued_totals(&app.redis, &a.id).await?;
        let booked = crate::reconcile::booked_totals(&app.db, &a.id, None).await?;
        if issued == booked {
            let changed = sqlx::query("UPDATE activities SET drained_at = CURRENT_TIMESTAMP(3) WHERE id = ? AND drained_at IS NULL")
                .bind(&a.id)
                .execute(app.db.main())
                .await?
                .rows_affected();
            if changed > 0 {
                tracing::info!(
                    activity = a.id,
                    tokens = booked.count,
                    cents = booked.cents,
                    "activity drained"
                );
                drained.push(a.id.clone());
            }
        }
    }
    Ok(drained)
}

/// Trims settled tokens older than the retention from Redis; the ledger keeps them (with
/// the signed token) and the views read them from there. A trimmed token leaves a
/// one-byte marker under its out_trade_no, so a late retry of the award is answered
/// from the ledger instead of minting it again; markers go once their activity ended
/// more than `wallet.retry_grace_secs` ago. Returns how many tokens were trimmed.
pub async fn housekeeping(app: &App) -> anyhow::Result<usize> {
    let now = now_ms();
    let cutoff = now - (app.settings.wallet.settled_retention_secs as i64) * 1000;
    let grace_ms = (app.settings.wallet.retry_grace_secs as i64) * 1000;
    let batch = app.settings.cron.housekeeping_batch;
    let mut trimmed = 0;
    let mut conn = app.redis.conn();
    for p in 0..app.redis.partitions() {
        let index = app.redis.settled_index_key(p);
        let markers = app.redis.markers_key(p);
        loop {
            let members: Vec<String> = conn
                .zrangebyscore_limit(&index, "-inf", cutoff, 0, batch as isize)
                .await?;
            if members.is_empty() {
                break;
            }
            let mut pipe = redis::pipe();
            for m in &members {
                let Some((user, otn)) = parse_member(m) else {
                    continue;
                };
                // The marker lives while the activity accepts awards, plus the grace.
                let ends_ms = crate::domain::OutTradeNo::activity_of(otn)
                    .and_then(|a| app.activities.get(a))
                    .map(|c| c.activity.ends_at.timestamp_millis())
                    .unwrap_or(now);
                pipe.hset(app.redis.tokens_key(user), otn, crate::tokens::TRIMMED)
                    .ignore();
                pipe.hdel(app.redis.status_key(user), otn).ignore();
                pipe.zadd(&markers, m, ends_ms.max(now) + grace_ms).ignore();
            }
            pipe.zrem(&index, &members).ignore();
            pipe.query_async::<()>(&mut conn).await?;
            trimmed += members.len();
            if members.len() < batch {
                break;
            }
        }
        loop {
            let expired: Vec<String> = conn
                .zrangebyscore_limit(&markers, "-inf", now, 0, batch as isize)
                .await?;
            if expired.is_empty() {
                break;
            }
            let mut pipe = redis::pipe();
            for m in &expired {
                if let Some((user, otn)) = parse_member(m) {
                    pipe.hdel(app.redis.tokens_key(user), otn).ignore();
                }
            }
            pipe.zrem(&markers, &expired).ignore();
            pipe.query_async::<()>(&mut conn).await?;
            if expired.len() < batch {
                break;
            }
        }
    }
    Ok(trimmed)
}

/// `user|out_trade_no`, as the settled index and the marker index hold them.
fn parse_member(member: &str) -> Option<(crate::domain::UserId, &str)> {
    let (user, otn) = member.split_once('|')?;
    let user = crate::domain::UserId::parse(user.parse().ok()?).ok()?;
    Some((user, otn))
}

fn tick_now() -> i64 {
    chrono::Utc::now().timestamp()
}

/// A cron job that runs `work` under [`run_guarded`], so one instance runs each tick.
pub fn guarded_job<F, Fut>(
    app: Arc<App>,
    name: &'static str,
    schedule: &str,
    work: F,
) -> anyhow::Result<Job>
where
    F: Fn(Arc<App>) -> Fut + Send + Sync + Clone + 'static,
    Fut: Future<Output = anyhow::Result<()>> + Send + 'static,
{
    Job::new_async(schedule, move |_id, _lock| {
        let app = app.clone();
        let work = work.clone();
        Box::pin(async move {
            let tick = tick_now();
            let result = run_guarded(&app, name, tick, || work(app.clone())).await;
            if let Err(err) = result {
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

/// Registers every job with a non-empty schedule and starts the scheduler.
pub async fn start(app: Arc<App>) -> anyhow::Result<JobScheduler> {
    let scheduler = JobScheduler::new().await?;
    let cron = app.settings.cron.clone();
    let jobs: [(&'static str, String); 4] = [
        ("settle", cron.settle),
        ("reconcile_hourly", cron.reconcile_hourly),
        ("reconcile_live", cron.reconcile_live),
        ("housekeeping", cron.housekeeping),
    ];
    for (name, schedule) in jobs {
        if schedule.trim().is_empty() {
            tracing::info!(job = name, "cron job disabled (empty schedule)");
            continue;
        }
        let job = guarded_job(app.clone(), name, &schedule, move |app| run_job(app, name))?;
        scheduler.add(job).await?;
    }
    scheduler.start().await?;
    Ok(scheduler)
}

async fn run_job(app: Arc<App>, name: &'static str) -> anyhow::Result<()> {
    match name {
        "settle" => {
            let deadline = tokio::time::Instant::now()
                + Duration::from_millis(app.settings.cron.lock_ttl_ms / 2);
            let booked = settle_until(&app, 1_000, Some(deadline)).await?;
            let drained = mark_drained(&app).await?;
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
            let reports = crate::reconcile::reconcile_hour(&app, &hour, kind)
                .await
                .map_err(api)?;
            tracing::info!(
                job = name,
                hour,
                reports = reports.len(),
                "reconciliation done"
            );
        }
        "housekeeping" => {
            let trimmed = housekeeping(&app).await?;
            tracing::info!(job = name, trimmed, "housekeeping done");
        }
        other => anyhow::bail!("unknown job {other}"),
    }
    Ok(())
}

fn api(err: crate::error::ApiError) -> anyhow::Error {
    match err {
        crate::error::ApiError::Internal(e) => e,
        other => anyhow::anyhow!("{}: {}", other.code(), other.public_message()),
    }
}
