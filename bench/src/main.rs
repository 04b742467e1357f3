//! rpw-bench: measures the burst, the drain, the withdraw and the view of a running
//! redpacket-wallet against the synchronous design it replaces. Run by scripts/bench.sh,
//! which starts the services and the server and passes the settings in the environment.
//!
//! The server runs with its worker off, so awards pile up as a backlog; this program
//! drains it with the project's own worker (in-process, same Redis and MySQL) at a
//! configured rate and unbounded, and ends with a conservation check through the
//! service's own accounts and reconciliation.
//!
//! Layout: `main.rs` (the command line and the order of the run), `bench.rs` (what the
//! scenarios share), `scenarios/` (one file each), `load.rs` (the one load loop),
//! `report.rs` (the typed summary and the targets table), `plot.rs`, `api.rs` (the HTTP
//! API) and `product.rs` (the only file that uses the service's library).

mod api;
mod bench;
mod cpu;
mod load;
mod plot;
mod product;
mod report;
mod scenarios;

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::bail;
use clap::Parser;

use crate::api::Api;
use crate::bench::{Bench, Plan, Sampler};
use crate::product::Product;
use crate::report::{round2, Drain, Summary};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(about = "Benchmark of a running redpacket-wallet")]
struct Args {
    /// Short runs (the whole bench in under three minutes).
    #[arg(long)]
    quick: bool,
    /// Writes the summary as JSON.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Draws issued, booked and backlog over time (.png or .svg).
    #[arg(long)]
    plot: Option<PathBuf>,
    /// The server under test.
    #[arg(long, env = "RPW_BENCH_URL", default_value = "http://127.0.0.1:8090")]
    url: String,
    /// A MySQL URL for the synchronous baseline (a separate, empty database).
    #[arg(long, env = "RPW_BENCH_BASELINE_MYSQL_URL")]
    baseline_mysql_url: String,
    /// Keep the bench's databases and Redis keys (they are removed by default).
    #[arg(long)]
    keep: bool,
    /// The configured booking rate of the bounded drain.
    #[arg(long, default_value_t = 2000)]
    drain_tps: u32,
    /// Shadow traffic: every request carries `X-RPW-Shadow: 1` and the bench reads and
    /// drains the instance's shadow data, so a running instance is loaded without
    /// touching its real balances, budgets, reports or metrics. Its shadow data is left
    /// to expire.
    #[arg(long)]
    shadow: bool,
    /// Speaks HTTP/2 without TLS (h2c, prior knowledge) to the server: every request of
    /// the bench goes as a stream over shared connections instead of one HTTP/1.1
    /// connection per request in flight.
    #[arg(long)]
    h2c: bool,
    /// The server's tokio worker threads, as `scripts/bench.sh --server-threads N` started
    /// it (`TOKIO_WORKER_THREADS`); unset, one per core. Reported, not applied here.
    #[arg(long, env = "RPW_BENCH_SERVER_THREADS")]
    server_threads: Option<usize>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let product = Product::connect(args.shadow).await?;
    let api = Api::new(
        args.url.clone(),
        product.admin_key(),
        product.caller_key()?,
        args.shadow,
        args.h2c,
    )?;
    let bench = Arc::new(Bench::new(Plan::new(args.quick), product, api));

    let result = run(&bench, &args).await;
    bench.finish_progress();
    if !args.keep && !args.shadow {
        if let Err(err) = bench.product.remove_data(&args.baseline_mysql_url).await {
            eprintln!("cleaning up the bench data failed: {err:#}");
        }
    }
    result
}

/// Every scenario, the table, the JSON and the plot; fails when conservation fails.
async fn run(bench: &Arc<Bench>, args: &Args) -> anyhow::Result<()> {
    scenarios::create_activity(bench).await?;
    bench.stage("history: one booked award per viewed user");
    scenarios::views::history(bench).await?;
    let sampler = Sampler::start(bench.clone());

    bench.stage("ceiling: Ed25519 signing");
    let ceiling = scenarios::signing::run(bench)?;
    // The baseline runs first, on an idle MariaDB: the most favourable moment for it.
    bench.stage("sync_baseline: one transaction per award");
    let sync_baseline = scenarios::baseline::run(bench, &args.baseline_mysql_url).await?;
    bench.stage("http_floor: GET /healthz");
    let http_floor = scenarios::floor::run(bench).await?;
    let procs = cpu::Procs::from_env();
    let mut cpu_us = std::collections::BTreeMap::new();
    bench.stage("rain_single: POST /v1/awards");
    let before = procs.snapshot();
    let rain_single = scenarios::rain::run(bench).await?;
    cpu_us.insert(
        "rain_single".to_string(),
        cpu::per_item(&before, &procs.snapshot(), rain_single.awards),
    );
    bench.stage("rain_batch: POST /v1/awards:batch");
    let before = procs.snapshot();
    let rain_batch = scenarios::batch::run(bench).await?;
    cpu_us.insert(
        "rain_batch".to_string(),
        cpu::per_item(&before, &procs.snapshot(), rain_batch.awards),
    );
    bench.stage("withdraw: forced settlement during the backlog");
    let issued = scenarios::withdraw::issue(bench).await?;
    let before = procs.snapshot();
    let withdrawals = scenarios::withdraw::run(bench, issued).await?;
    cpu_us.insert(
        "withdraw".to_string(),
        cpu::per_item(&before, &procs.snapshot(), bench.plan.withdraw_users as u64),
    );
    bench.stage("view: GET /v1/wallet during the backlog");
    let before = procs.snapshot();
    let view = scenarios::views::run(bench).await?;
    cpu_us.insert(
        "view".to_string(),
        cpu::per_item(&before, &procs.snapshot(), view.requests),
    );
    let backlog_at_start = bench.sample().await?.backlog;
    bench.stage(&format!("drain at {} tps", args.drain_tps));
    let bounded = scenarios::drain::run(bench, args.drain_tps, bench.plan.drain, false).await?;
    bench.stage("drain unbounded");
    let before = procs.snapshot();
    let redis_before = bench.product.redis_usage().await?;
    let unbounded = scenarios::drain::run(bench, 0, bench.plan.unbounded_cap, true).await?;
    let drain_redis = bench
        .product
        .redis_usage()
        .await?
        .since(&redis_before, unbounded.booked.max(0) as u64);
    cpu_us.insert(
        "drain_unbounded".to_string(),
        cpu::per_item(&before, &procs.snapshot(), unbounded.booked.max(0) as u64),
    );
    bench.stage("conservation check");
    let conservation = scenarios::conservation::run(bench, &withdrawals).await?;
    sampler.stop().await;

    let summary = Summary {
        quick: args.quick,
        protocol: if args.h2c { "h2c" } else { "http1.1" }.to_string(),
        server_threads: args.server_threads,
        ceiling,
        http_floor,
        sync_baseline,
        rain_single,
        rain_batch,
        withdraw: withdrawals.figures,
        view,
        drain: Drain {
            configured_tps: args.drain_tps,
            measured_tps: round2(bounded.tps()),
            unbounded_tps: round2(unbounded.tps()),
            backlog_at_start,
            redis: drain_redis,
        },
        conservation,
        cpu_us_per_item: cpu_us,
    };
    bench.finish_progress();
    summary.print();
    if let Some(path) = &args.json {
        summary.write_json(path)?;
    }
    if let Some(path) = &args.plot {
        plot::draw(path, &bench.samples())?;
    }
    if !summary.conservation.ok {
        bail!(
            "conservation check failed: {:?}",
            summary.conservation.problems
        );
    }
    Ok(())
}
