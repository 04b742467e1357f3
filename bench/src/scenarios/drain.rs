//! Draining the backlog with the service's own settlement worker (in-process, on the
//! same Redis and MySQL), once at a configured rate and once unbounded. This observes the
//! worker rather than sending requests, so it does not go through `load::run`.

use std::time::{Duration, Instant};

use crate::bench::Bench;

/// Tokens booked and the seconds it took.
pub struct Drained {
    pub booked: i64,
    pub secs: f64,
}

impl Drained {
    pub fn tps(&self) -> f64 {
        self.booked as f64 / self.secs
    }
}

/// Drains at `max_tps` (0: unbounded) for at most `window`, or until the backlog is
/// empty when `until_empty`. The tokens booked are the worker's own count of the rows
/// its commits inserted; the backlog is read from the streams (XLEN), so the drain is
/// watched without a query on the database it loads.
pub async fn run(
    bench: &Bench,
    max_tps: u32,
    window: Duration,
    until_empty: bool,
) -> anyhow::Result<Drained> {
    let worker = bench.product.drain_worker(max_tps).await?;
    let before = worker.booked();
    let started = Instant::now();
    let running = worker.start();
    loop {
        tokio::time::sleep(Duration::from_millis(100)).await;
        if started.elapsed() >= window {
            break;
        }
        if until_empty && bench.product.backlog().await? == 0 {
            break;
        }
    }
    let secs = started.elapsed().as_secs_f64();
    let after = worker.booked();
    running.stop().await;
    Ok(Drained {
        booked: (after - before) as i64,
        secs,
    })
}
