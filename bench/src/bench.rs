//! What every scenario shares: the plan, the service (HTTP and in-process), fresh user
//! ids, the progress line and the issued/booked/backlog samples behind the plot.

use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};
use tokio::task::JoinHandle;

use crate::api::Api;
use crate::plot::Sample;
use crate::product::Product;

/// The activity every award of the run goes to.
pub const ACTIVITY: &str = "bench";

/// How long and how hard each scenario runs.
pub struct Plan {
    pub rain: Duration,
    pub baseline: Duration,
    pub view: Duration,
    pub drain: Duration,
    /// The unbounded drain stops when the backlog is empty, or after this long.
    pub unbounded_cap: Duration,
    pub withdraw_users: i64,
    pub concurrency_single: usize,
    pub concurrency_batch: usize,
    pub batch_size: usize,
}

impl Plan {
    pub fn new(quick: bool) -> Self {
        if quick {
            Self {
                rain: Duration::from_secs(8),
                baseline: Duration::from_secs(6),
                view: Duration::from_secs(6),
                drain: Duration::from_secs(8),
                unbounded_cap: Duration::from_secs(60),
                withdraw_users: 200,
                concurrency_single: 48,
                concurrency_batch: 4,
                batch_size: 1000,
            }
        } else {
            Self {
                rain: Duration::from_secs(30),
                baseline: Duration::from_secs(20),
                view: Duration::from_secs(20),
                drain: Duration::from_secs(20),
                unbounded_cap: Duration::from_secs(240),
                withdraw_users: 500,
                concurrency_single: 48,
                concurrency_batch: 4,
                batch_size: 1000,
            }
        }
    }
}

/// The scenarios in the order `main` runs them: the progress bar's length.
const STAGES: u64 = 10;

pub struct Bench {
    pub plan: Plan,
    pub product: Product,
    pub api: Api,
    next_user: AtomicI64,
    started: Instant,
    /// The wall clock at the start: the first hour to reconcile.
    pub started_ms: i64,
    samples: Mutex<Vec<Sample>>,
    progress: ProgressBar,
}

impl Bench {
    pub fn new(plan: Plan, product: Product, api: Api) -> Self {
        let progress = ProgressBar::new(STAGES);
        progress.set_style(
            ProgressStyle::with_template(
                "{spinner} [{elapsed_precise}] {bar:20} {pos}/{len} {msg}",
            )
            .expect("static template"),
        );
        progress.enable_steady_tick(Duration::from_millis(200));
        Self {
            plan,
            product,
            api,
            next_user: AtomicI64::new(1),
            started: Instant::now(),
            started_ms: Product::now_ms(),
            samples: Mutex::new(Vec::new()),
            progress,
        }
    }

    /// The first of `n` user ids no award of this run has used yet.
    pub fn take_users(&self, n: i64) -> i64 {
        self.next_user.fetch_add(n, Ordering::Relaxed)
    }

    /// Issued, booked and backlog now.
    pub async fn sample(&self) -> anyhow::Result<Sample> {
        let (issued, booked) = self.product.issued_and_settled(ACTIVITY).await?;
        Ok(Sample {
            issued,
            booked,
            backlog: self.product.backlog().await?,
            t_s: self.started.elapsed().as_secs_f64(),
        })
    }

    /// Every sample taken so far, oldest first.
    pub fn samples(&self) -> Vec<Sample> {
        self.samples.lock().expect("samples").clone()
    }

    /// Announces the next scenario on the progress line (or the log without a terminal).
    pub fn stage(&self, name: &str) {
        let line = format!("[{:>6.1}s] {name}", self.started.elapsed().as_secs_f64());
        // A hidden bar (no terminal) prints nothing, so the log gets the line instead.
        if self.progress.is_hidden() {
            eprintln!("{line}");
        } else {
            self.progress.println(line);
        }
        self.progress.set_message(name.to_string());
        self.progress.inc(1);
    }

    pub fn finish_progress(&self) {
        self.progress.finish_and_clear();
    }
}

/// Samples issued, booked and backlog every 250 ms until stopped.
pub struct Sampler {
    on: Arc<AtomicBool>,
    task: JoinHandle<()>,
}

impl Sampler {
    pub fn start(bench: Arc<Bench>) -> Self {
        let on = Arc::new(AtomicBool::new(true));
        let task = {
            let on = on.clone();
            tokio::spawn(async move {
                while on.load(Ordering::Relaxed) {
                    if let Ok(s) = bench.sample().await {
                        bench.samples.lock().expect("samples").push(s);
                    }
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
            })
        };
        Self { on, task }
    }

    pub async fn stop(self) {
        self.on.store(false, Ordering::Relaxed);
        let _ = self.task.await;
    }
}
