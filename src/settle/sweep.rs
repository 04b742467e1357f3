//! The sweep: books whatever is left in every partition, reclaiming entries of dead
//! consumers. The cron `settle` job and `redpacket-wallet settle --all` run it.

use std::time::Duration;

use super::worker::{Outcome, Worker, WorkerOptions};
use super::Settler;

/// Sweeps every partition (see [`settle_until`]) without a deadline.
pub async fn settle_all(settler: &Settler, max_batches: usize) -> anyhow::Result<usize> {
    settle_until(settler, max_batches, None, &mut |_, _| {}).await
}

/// Draws from the instance's booking bucket, like the worker. Bounded: at most
/// `max_batches` batches per partition, and it stops at `deadline` (the scheduled sweep
/// passes half its lock's lifetime, so it never outlives the lock). A failing partition
/// is logged and skipped; the others are still swept. Returns tokens newly booked.
/// `progress` hears (partition, tokens booked so far) after each batch and partition.
pub async fn settle_until(
    settler: &Settler,
    max_batches: usize,
    deadline: Option<tokio::time::Instant>,
    progress: &mut (dyn FnMut(u32, usize) + Send),
) -> anyhow::Result<usize> {
    let settings = &settler.settings;
    let mut worker = Worker::new(
        settler.clone(),
        WorkerOptions {
            consumer: format!("{}-sweep", settler.instance_id),
            batch_size: settings.batch_size,
            claim_idle: Duration::from_millis(settings.claim_idle_ms),
            stop_after_commit: false,
        },
    );
    let mut booked = 0;
    let mut failed = 0;
    for p in 0..settler.redis.partitions() {
        for _ in 0..max_batches {
            if deadline.is_some_and(|d| tokio::time::Instant::now() >= d) {
                return Ok(booked);
            }
            match worker.try_execute_batch(p).await {
                Ok(Outcome::Booked { newly_booked, .. }) => {
                    booked += newly_booked;
                    progress(p, booked);
                }
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
        progress(p, booked);
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
