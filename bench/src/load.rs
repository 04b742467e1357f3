//! The one load loop every request scenario drives: `concurrency` workers, each sending
//! the scenario's request after the previous one was answered, until a deadline passes
//! or a given number of requests has been sent.
//!
//! A scenario's request is a closure `|turn| { prepare; async move { send } }`: what it
//! does before returning its future (building and encoding a body, minting a JWT) is not
//! timed; the future, from its first poll to its answer, is.

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// When the workers stop.
#[derive(Debug, Clone, Copy)]
pub enum Until {
    /// No new request once this long has passed since the start.
    Elapsed(Duration),
    /// After this many requests in all (`Turn::seq` runs from 0 to the count).
    Count(u64),
}

/// Which request this is.
#[derive(Debug, Clone, Copy)]
pub struct Turn {
    /// The worker sending it, `0..concurrency`.
    pub worker: usize,
    /// The worker's own request number, from 0.
    pub round: u64,
    /// The request number over all workers, from 0, each taken once.
    pub seq: u64,
}

/// What one request achieved.
#[derive(Debug, Clone, Copy)]
#[must_use]
pub struct Call {
    ok: u64,
    errors: u64,
    /// Whether the latency counts: only answered requests' latencies are kept.
    timed: bool,
    /// Where the latency ends, when the request did more after the answer (decoding).
    answered_at: Option<Instant>,
}

impl Call {
    /// One success; its latency is kept.
    pub fn ok() -> Self {
        Self::items(1, 0)
    }

    /// One failure; its latency is not kept.
    pub fn failed() -> Self {
        Self::failed_items(1)
    }

    /// An answered request carrying many items, `ok` of them accepted; its latency is kept.
    pub fn items(ok: u64, errors: u64) -> Self {
        Self {
            ok,
            errors,
            timed: true,
            answered_at: None,
        }
    }

    /// A request carrying `errors` items that failed as a whole; its latency is not kept.
    pub fn failed_items(errors: u64) -> Self {
        Self {
            ok: 0,
            errors,
            timed: false,
            answered_at: None,
        }
    }

    /// Ends the latency at `at` rather than when the future completes.
    pub fn answered_at(self, at: Instant) -> Self {
        Self {
            answered_at: Some(at),
            ..self
        }
    }
}

/// Latencies in microseconds, sorted.
#[derive(Debug, Default)]
pub struct Latencies(Vec<u64>);

impl Latencies {
    /// Latencies in microseconds, in any order.
    pub fn of(mut us: Vec<u64>) -> Self {
        us.sort_unstable();
        Self(us)
    }

    /// The `q` quantile in milliseconds (nearest rank); 0 when nothing was timed.
    pub fn ms_at(&self, q: f64) -> f64 {
        if self.0.is_empty() {
            return 0.0;
        }
        let i = ((self.0.len() as f64 - 1.0) * q).round() as usize;
        self.0[i] as f64 / 1000.0
    }
}

/// A finished load: successes, errors and latencies over every worker.
#[derive(Debug)]
pub struct Load {
    pub ok: u64,
    pub errors: u64,
    pub latencies: Latencies,
    /// From the start to the last worker's last answer.
    pub elapsed: Duration,
}

impl Load {
    /// Successes per second over the whole load.
    pub fn ok_per_s(&self) -> f64 {
        self.ok as f64 / self.elapsed.as_secs_f64()
    }
}

#[derive(Default)]
struct Tally {
    ok: u64,
    errors: u64,
    latencies_us: Vec<u64>,
}

/// Runs `request` from `concurrency` workers until `until`; see the module doc.
pub async fn run<F, Fut>(concurrency: usize, until: Until, request: F) -> anyhow::Result<Load>
where
    F: Fn(Turn) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Call> + Send + 'static,
{
    anyhow::ensure!(concurrency > 0, "a load needs at least one worker");
    let (deadline, count) = match until {
        Until::Elapsed(window) => (Some(Instant::now() + window), u64::MAX),
        Until::Count(count) => (None, count),
    };
    let started = Instant::now();
    let request = Arc::new(request);
    let next_seq = Arc::new(AtomicU64::new(0));
    let workers: Vec<_> = (0..concurrency)
        .map(|worker| {
            let request = request.clone();
            let next_seq = next_seq.clone();
            tokio::spawn(async move {
                let mut tally = Tally::default();
                for round in 0u64.. {
                    if deadline.is_some_and(|d| Instant::now() >= d) {
                        break;
                    }
                    let seq = next_seq.fetch_add(1, Ordering::Relaxed);
                    if seq >= count {
                        break;
                    }
                    let pending = request(Turn { worker, round, seq });
                    let t0 = Instant::now();
                    let call = pending.await;
                    let end = call.answered_at.unwrap_or_else(Instant::now);
                    tally.ok += call.ok;
                    tally.errors += call.errors;
                    if call.timed {
                        tally
                            .latencies_us
                            .push(end.saturating_duration_since(t0).as_micros() as u64);
                    }
                }
                tally
            })
        })
        .collect();
    let mut total = Tally::default();
    for worker in workers {
        let tally = worker.await?;
        total.ok += tally.ok;
        total.errors += tally.errors;
        total.latencies_us.extend(tally.latencies_us);
    }
    let elapsed = started.elapsed();
    Ok(Load {
        ok: total.ok,
        errors: total.errors,
        latencies: Latencies::of(total.latencies_us),
        elapsed,
    })
}
