//! rpw-bench: measures the burst, the drain, the withdraw and the view of a running
//! redpacket-wallet against the synchronous design it replaces. Run by scripts/bench.sh,
//! which starts the services and the server and passes the settings in the environment.
//!
//! The server runs with its worker off, so awards pile up as a backlog; this program
//! drains it with the project's own worker (in-process, same Redis and MySQL) at a
//! configured rate and unbounded, and ends with a conservation check.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Parser;
use indicatif::{ProgressBar, ProgressStyle};
use prost::Message;
use redpacket_wallet::app::App;
use redpacket_wallet::config::Settings;
use redpacket_wallet::domain::UserId;
use redpacket_wallet::pb;
use redpacket_wallet::store::Db;
use redpacket_wallet::tokens::AwardEntry;
use serde_json::{json, Value};
use tokio::sync::watch;

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
}

const ACTIVITY: &str = "bench";

struct Plan {
    rain: Duration,
    baseline: Duration,
    view: Duration,
    drain: Duration,
    unbounded_cap: Duration,
    withdraw_users: i64,
    concurrency_single: usize,
    concurrency_batch: usize,
    batch_size: usize,
}

impl Plan {
    fn new(quick: bool) -> Self {
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

/// Latencies in microseconds.
#[derive(Default)]
struct Latencies(Vec<u64>);

impl Latencies {
    fn ms_at(&mut self, q: f64) -> f64 {
        if self.0.is_empty() {
            return 0.0;
        }
        self.0.sort_unstable();
        let i = ((self.0.len() as f64 - 1.0) * q).round() as usize;
        self.0[i] as f64 / 1000.0
    }
}

/// Waits for load tasks that each return (successes, errors, latencies in µs).
async fn gather(
    tasks: Vec<tokio::task::JoinHandle<(u64, u64, Vec<u64>)>>,
) -> anyhow::Result<(u64, u64, Latencies)> {
    let (mut ok, mut errors, mut lat) = (0, 0, Latencies::default());
    for t in tasks {
        let (o, e, l) = t.await?;
        ok += o;
        errors += e;
        lat.0.extend(l);
    }
    Ok((ok, errors, lat))
}

#[derive(Clone, Copy)]
struct Sample {
    t_s: f64,
    issued: i64,
    booked: i64,
    backlog: i64,
}

struct Bench {
    args: Args,
    plan: Plan,
    app: Arc<App>,
    settings: Settings,
    http: reqwest::Client,
    admin: String,
    caller: String,
    next_user: AtomicI64,
    started: Instant,
    samples: Mutex<Vec<Sample>>,
    progress: ProgressBar,
}

fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

impl Bench {
    async fn admin_post(&self, path: &str, body: Value) -> anyhow::Result<Value> {
        let resp = self
            .http
            .post(format!("{}{path}", self.args.url))
            .bearer_auth(&self.admin)
            .json(&body)
            .send()
            .await?;
        let status = resp.status();
        let body: Value = resp.json().await.unwrap_or(Value::Null);
        if !status.is_success() {
            bail!("{path}: {status} {body}");
        }
        Ok(body)
    }

    fn award(&self, user: i64, rain: i64) -> pb::AwardRequest {
        pb::AwardRequest {
            user_id: user,
            app_id: 1,
            activity_id: ACTIVITY.into(),
            scene_id: "rain".into(),
            rain_id: rain,
            award_type: "cash".into(),
            amount_cents: 1 + user % 88,
            ..Default::default()
        }
    }

    async fn post_pb(&self, path: &str, body: Vec<u8>) -> anyhow::Result<(u16, bytes::Bytes)> {
        let resp = self
            .http
            .post(format!("{}{path}", self.args.url))
            .bearer_auth(&self.caller)
            .header("content-type", "application/x-protobuf")
            .header("accept", "application/x-protobuf")
            .body(body)
            .send()
            .await?;
        let status = resp.status().as_u16();
        Ok((status, resp.bytes().await?))
    }

    async fn sample(&self) -> anyhow::Result<Sample> {
        let issued = self.app.tokens.issued_totals(ACTIVITY).await?;
        let booked: (i64,) =
            sqlx::query_as("SELECT COUNT(*) FROM ledger_entries WHERE kind = 'award'")
                .fetch_one(self.app.db.main())
                .await?;
        let mut pipe = redis::pipe();
        for p in 0..self.app.redis.partitions() {
            pipe.xlen(self.app.redis.stream_key(p));
        }
        let mut conn = self.app.redis.conn();
        let lens: Vec<i64> = pipe.query_async(&mut conn).await?;
        Ok(Sample {
            t_s: self.started.elapsed().as_secs_f64(),
            issued: issued.count,
            booked: booked.0,
            backlog: lens.iter().sum(),
        })
    }

    fn stage(&self, name: &str) {
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

    /// The physical ceiling: Ed25519 signatures per second on one core.
    fn ceiling(&self) -> (usize, f64) {
        let cores = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1);
        let draft = self.award(1, 1);
        let token = pb::RedPacketToken {
            user_id: draft.user_id,
            activity_id: draft.activity_id,
            amount_cents: draft.amount_cents,
            out_trade_no: "1_rain_1_cash_live".into(),
            ..Default::default()
        };
        let keys = self.app.keys.current();
        let started = Instant::now();
        let mut n = 0u64;
        while started.elapsed() < Duration::from_secs(1) {
            for i in 0..100 {
                let mut t = token.clone();
                t.issued_at_ms = i;
                std::hint::black_box(redpacket_wallet::token::mint(&keys, t).expect("active key"));
            }
            n += 100;
        }
        (cores, n as f64 / started.elapsed().as_secs_f64())
    }

    async fn rain_single(self: &Arc<Self>) -> anyhow::Result<Value> {
        let deadline = Instant::now() + self.plan.rain;
        let started = Instant::now();
        let mut tasks = Vec::new();
        for _ in 0..self.plan.concurrency_single {
            let b = self.clone();
            tasks.push(tokio::spawn(async move {
                let (mut ok, mut errors, mut lat) = (0u64, 0u64, Vec::new());
                while Instant::now() < deadline {
                    let user = b.next_user.fetch_add(1, Ordering::Relaxed);
                    let body = b.award(user, 1).encode_to_vec();
                    let t0 = Instant::now();
                    match b.post_pb("/v1/awards", body).await {
                        Ok((201, _)) => {
                            ok += 1;
                            lat.push(t0.elapsed().as_micros() as u64);
                        }
                        _ => errors += 1,
                    }
                }
                (ok, errors, lat)
            }));
        }
        let (ok, errors, mut lat) = gather(tasks).await?;
        let elapsed = started.elapsed().as_secs_f64();
        Ok(json!({
            "awards_per_s": round2(ok as f64 / elapsed),
            "p50_ms": round2(lat.ms_at(0.50)),
            "p99_ms": round2(lat.ms_at(0.99)),
            "errors": errors,
        }))
    }

    async fn rain_batch(self: &Arc<Self>) -> anyhow::Result<Value> {
        let deadline = Instant::now() + self.plan.rain;
        let started = Instant::now();
        let mut tasks = Vec::new();
        for _ in 0..self.plan.concurrency_batch {
            let b = self.clone();
            tasks.push(tokio::spawn(async move {
                let (mut ok, mut errors, mut lat) = (0u64, 0u64, Vec::new());
                while Instant::now() < deadline {
                    let first = b
                        .next_user
                        .fetch_add(b.plan.batch_size as i64, Ordering::Relaxed);
                    let batch = pb::AwardBatchRequest {
                        awards: (0..b.plan.batch_size as i64)
                            .map(|i| b.award(first + i, 2))
                            .collect(),
                    };
                    let t0 = Instant::now();
                    match b.post_pb("/v1/awards:batch", batch.encode_to_vec()).await {
                        Ok((200, bytes)) => {
                            lat.push(t0.elapsed().as_micros() as u64);
                            let resp = pb::AwardBatchResponse::decode(bytes).unwrap_or_default();
                            for r in resp.results {
                                match r.result {
                                    Some(pb::award_result::Result::Ok(_)) => ok += 1,
                                    _ => errors += 1,
                                }
                            }
                        }
                        _ => errors += b.plan.batch_size as u64,
                    }
                }
                (ok, errors, lat)
            }));
        }
        let (ok, errors, mut lat) = gather(tasks).await?;
        let elapsed = started.elapsed().as_secs_f64();
        Ok(json!({
            "awards_per_s": round2(ok as f64 / elapsed),
            "p99_ms": round2(lat.ms_at(0.99)),
            "errors": errors,
        }))
    }

    /// The classic design: every award booked into MySQL in its own transaction
    /// (account row + ledger row) with the project's own booking code.
    async fn sync_baseline(self: &Arc<Self>) -> anyhow::Result<Value> {
        let mut mysql = self.settings.mysql.clone();
        mysql.url = redpacket_wallet::config::Secret::new(self.args.baseline_mysql_url.clone());
        mysql.shard_urls.clear();
        let db = Arc::new(Db::connect_lazy(&mysql)?);
        db.migrate().await?;
        // Booking reads the users' pending tokens in Redis; the baseline's users have none.
        let mut redis_settings = self.settings.redis.clone();
        redis_settings.key_prefix = format!("{}-baseline", redis_settings.key_prefix);
        let redis = Arc::new(redpacket_wallet::store::Redis::connect(&redis_settings).await?);
        let ledger = redpacket_wallet::ledger::Ledger::new(
            db.clone(),
            redpacket_wallet::tokens::Tokens::new(redis.clone()),
        );
        let deadline = Instant::now() + self.plan.baseline;
        let started = Instant::now();
        let counter = Arc::new(AtomicI64::new(1));
        let mut tasks = Vec::new();
        for _ in 0..self.plan.concurrency_single {
            let ledger = ledger.clone();
            let counter = counter.clone();
            tasks.push(tokio::spawn(async move {
                let mut ok = 0u64;
                while Instant::now() < deadline {
                    let user = counter.fetch_add(1, Ordering::Relaxed);
                    let entry = AwardEntry {
                        user: UserId::parse(user).expect("positive"),
                        out_trade_no: format!("{user}_{ACTIVITY}_rain_1_cash_live"),
                        amount_cents: 1 + user % 88,
                        activity_id: ACTIVITY.into(),
                        scene_id: "rain".into(),
                        at_ms: redpacket_wallet::store::now_ms(),
                        stream_id: None,
                        budget_gen: 0,
                    };
                    if ledger.book(&[entry]).await.is_ok() {
                        ok += 1;
                    }
                }
                ok
            }));
        }
        let mut ok = 0;
        for t in tasks {
            ok += t.await?;
        }
        Ok(json!({ "awards_per_s": round2(ok as f64 / started.elapsed().as_secs_f64()) }))
    }

    async fn withdraw(self: &Arc<Self>) -> anyhow::Result<Value> {
        const PER_USER: i64 = 50;
        let first = self
            .next_user
            .fetch_add(self.plan.withdraw_users, Ordering::Relaxed);
        let users: Vec<i64> = (first..first + self.plan.withdraw_users).collect();
        let awards: Vec<pb::AwardRequest> = users
            .iter()
            .flat_map(|&u| (0..PER_USER).map(move |r| (u, 100 + r)))
            .map(|(u, r)| self.award(u, r))
            .collect();
        for chunk in awards.chunks(1000) {
            let body = pb::AwardBatchRequest {
                awards: chunk.to_vec(),
            }
            .encode_to_vec();
            let (status, _) = self.post_pb("/v1/awards:batch", body).await?;
            if status != 200 {
                bail!("issuing the withdraw scenario's tokens: {status}");
            }
        }
        let queue = Arc::new(Mutex::new(users));
        let mut tasks = Vec::new();
        for _ in 0..16 {
            let b = self.clone();
            let queue = queue.clone();
            tasks.push(tokio::spawn(async move {
                let mut lat = Vec::new();
                let mut errors = 0u64;
                loop {
                    let Some(user) = queue.lock().expect("queue").pop() else {
                        break;
                    };
                    let jwt = b
                        .app
                        .auth
                        .issue_user_jwt(UserId::parse(user).expect("positive"), 600)
                        .expect("jwt secret");
                    let t0 = Instant::now();
                    let resp = b
                        .http
                        .post(format!("{}/v1/withdrawals", b.args.url))
                        .bearer_auth(jwt)
                        .json(&json!({"request_id": format!("bench-{user}"), "amount_cents": 10}))
                        .send()
                        .await;
                    match resp {
                        Ok(r) if r.status().as_u16() == 201 => {
                            lat.push(t0.elapsed().as_micros() as u64)
                        }
                        _ => errors += 1,
                    }
                }
                (lat.len() as u64, errors, lat)
            }));
        }
        let (_, errors, mut lat) = gather(tasks).await?;
        if errors > 0 {
            bail!("{errors} withdrawals failed");
        }
        Ok(json!({
            "pending_per_user": PER_USER,
            "p50_ms": round2(lat.ms_at(0.50)),
            "p99_ms": round2(lat.ms_at(0.99)),
        }))
    }

    async fn view(self: &Arc<Self>) -> anyhow::Result<Value> {
        // Users from the single-award rain, who hold pending tokens.
        let jwts: Arc<Vec<String>> = Arc::new(
            (1..=2_000)
                .map(|u| {
                    self.app
                        .auth
                        .issue_user_jwt(UserId::parse(u).expect("positive"), 600)
                        .expect("jwt")
                })
                .collect(),
        );
        let deadline = Instant::now() + self.plan.view;
        let started = Instant::now();
        let mut tasks = Vec::new();
        for k in 0..self.plan.concurrency_single {
            let b = self.clone();
            let jwts = jwts.clone();
            tasks.push(tokio::spawn(async move {
                let (mut lat, mut errors, mut i) = (Vec::new(), 0u64, k);
                while Instant::now() < deadline {
                    let jwt = &jwts[i % jwts.len()];
                    i += 7;
                    let t0 = Instant::now();
                    let resp = b
                        .http
                        .get(format!("{}/v1/wallet", b.args.url))
                        .bearer_auth(jwt)
                        .header("accept", "application/x-protobuf")
                        .send()
                        .await;
                    match resp {
                        Ok(r) if r.status().is_success() => {
                            let _ = r.bytes().await;
                            lat.push(t0.elapsed().as_micros() as u64);
                        }
                        _ => errors += 1,
                    }
                }
                (lat.len() as u64, errors, lat)
            }));
        }
        let (n, errors, mut lat) = gather(tasks).await?;
        if errors > 0 {
            bail!("{errors} wallet views failed");
        }
        Ok(json!({
            "requests_per_s": round2(n as f64 / started.elapsed().as_secs_f64()),
            "p99_ms": round2(lat.ms_at(0.99)),
        }))
    }

    /// Drains with the project's worker at `max_tps` (0: unbounded) for at most `window`,
    /// or until the backlog is empty. Returns (tokens booked, seconds).
    async fn drain(
        &self,
        max_tps: u32,
        window: Duration,
        until_empty: bool,
    ) -> anyhow::Result<(i64, f64)> {
        let mut settings = self.settings.clone();
        settings.settle.max_tps = max_tps;
        settings.settle.enabled = true;
        let worker_app = App::build(settings, false).await?;
        let before = self.sample().await?.booked;
        let (tx, rx) = watch::channel(false);
        let started = Instant::now();
        let tasks = redpacket_wallet::settle::worker::spawn(&worker_app.settler, rx);
        loop {
            tokio::time::sleep(Duration::from_millis(100)).await;
            if started.elapsed() >= window {
                break;
            }
            if until_empty && self.sample().await?.backlog == 0 {
                break;
            }
        }
        let elapsed = started.elapsed().as_secs_f64();
        let after = self.sample().await?.booked;
        let _ = tx.send(true);
        for t in tasks {
            let _ = t.await;
        }
        Ok((after - before, elapsed))
    }

    async fn conservation(&self) -> anyhow::Result<Value> {
        let (status, view) = {
            let resp = self
                .http
                .get(format!("{}/v1/admin/activities/{ACTIVITY}", self.args.url))
                .bearer_auth(&self.admin)
                .send()
                .await?;
            (resp.status().as_u16(), resp.json::<Value>().await?)
        };
        if status != 200 {
            bail!("operator API: {status} {view}");
        }
        let pool = self.app.db.main();
        let (ledger_count, ledger_distinct, ledger_cents): (i64, i64, i64) = sqlx::query_as(
            "SELECT COUNT(*), COUNT(DISTINCT out_trade_no), CAST(COALESCE(SUM(amount_cents), 0) AS SIGNED) FROM ledger_entries WHERE kind = 'award'",
        )
        .fetch_one(pool)
        .await?;
        let (withdrawn_rows,): (i64,) = sqlx::query_as(
            "SELECT CAST(COALESCE(SUM(amount_cents), 0) AS SIGNED) FROM withdrawals",
        )
        .fetch_one(pool)
        .await?;
        let (withdrawn_ledger,): (i64,) = sqlx::query_as(
            "SELECT CAST(COALESCE(-SUM(amount_cents), 0) AS SIGNED) FROM ledger_entries WHERE kind = 'withdraw'",
        )
        .fetch_one(pool)
        .await?;
        let (balances, withdrawn_accounts): (i64, i64) = sqlx::query_as(
            "SELECT CAST(COALESCE(SUM(balance_cents), 0) AS SIGNED), CAST(COALESCE(SUM(withdrawn_cents), 0) AS SIGNED) FROM accounts",
        )
        .fetch_one(pool)
        .await?;
        let sample = self.sample().await?;
        let issued_cents = view["issued_cents"].as_i64().unwrap_or(-1);
        let issued_count = view["issued_count"].as_i64().unwrap_or(-1);
        let booked_cents = view["booked_cents"].as_i64().unwrap_or(-1);
        let pending_cents = view["pending_cents"].as_i64().unwrap_or(-1);
        let mut problems = Vec::new();
        if issued_cents != booked_cents + pending_cents {
            problems.push("issued != booked + pending".to_string());
        }
        if sample.backlog != 0 || pending_cents != 0 {
            problems.push(format!(
                "backlog {} entries, {pending_cents} cents pending after the drain",
                sample.backlog
            ));
        }
        if ledger_cents != booked_cents || ledger_count != issued_count {
            problems.push(format!("ledger {ledger_count} rows / {ledger_cents} cents vs issued {issued_count} / booked {booked_cents}"));
        }
        if ledger_count != ledger_distinct {
            problems.push("a token was booked twice".into());
        }
        if withdrawn_rows != withdrawn_ledger || withdrawn_rows != withdrawn_accounts {
            problems.push(format!(
                "withdrawn: withdrawals {withdrawn_rows}, ledger {withdrawn_ledger}, accounts {withdrawn_accounts}"
            ));
        }
        if balances != ledger_cents - withdrawn_rows {
            problems.push(format!(
                "balances {balances} != booked {ledger_cents} - withdrawn {withdrawn_rows}"
            ));
        }
        Ok(json!({
            "ok": problems.is_empty(),
            "issued_cents": issued_cents,
            "booked_cents": booked_cents,
            "pending_cents": pending_cents,
            "withdrawn_cents": withdrawn_rows,
            "problems": problems,
        }))
    }
}

fn plot(path: &PathBuf, samples: &[Sample]) -> anyhow::Result<()> {
    use plotters::prelude::*;
    let font = std::fs::read("/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf").context(
        "the plot needs DejaVuSans (Debian fonts-dejavu-core; scripts/bench.sh installs it)",
    )?;
    plotters::style::register_font(
        "sans-serif",
        FontStyle::Normal,
        Box::leak(font.into_boxed_slice()),
    )
    .map_err(|_| anyhow::anyhow!("font not usable"))?;
    let t_max = samples.last().map(|s| s.t_s).unwrap_or(1.0).max(1.0);
    let y_max = samples
        .iter()
        .map(|s| s.issued.max(s.booked).max(s.backlog))
        .max()
        .unwrap_or(1)
        .max(1) as f64
        * 1.05;
    fn draw<DB: DrawingBackend>(
        root: DrawingArea<DB, plotters::coord::Shift>,
        samples: &[Sample],
        t_max: f64,
        y_max: f64,
    ) -> anyhow::Result<()> {
        root.fill(&WHITE).map_err(|e| anyhow::anyhow!("{e:?}"))?;
        let mut chart = ChartBuilder::on(&root)
            .caption(
                "redpacket-wallet: issued, booked and backlog (tokens)",
                ("sans-serif", 22),
            )
            .margin(15)
            .x_label_area_size(40)
            .y_label_area_size(80)
            .build_cartesian_2d(0f64..t_max, 0f64..y_max)
            .map_err(|e| anyhow::anyhow!("{e:?}"))?;
        chart
            .configure_mesh()
            .x_desc("seconds since the bench started")
            .y_desc("tokens")
            .draw()
            .map_err(|e| anyhow::anyhow!("{e:?}"))?;
        type Series = (&'static str, RGBColor, fn(&Sample) -> i64);
        let series: [Series; 3] = [
            ("issued", BLUE, |s| s.issued),
            ("booked", GREEN, |s| s.booked),
            ("backlog", RED, |s| s.backlog),
        ];
        for (name, color, f) in series {
            chart
                .draw_series(LineSeries::new(
                    samples.iter().map(|s| (s.t_s, f(s) as f64)),
                    color.stroke_width(2),
                ))
                .map_err(|e| anyhow::anyhow!("{e:?}"))?
                .label(name)
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
                });
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .position(SeriesLabelPosition::UpperLeft)
            .draw()
            .map_err(|e| anyhow::anyhow!("{e:?}"))?;
        root.present().map_err(|e| anyhow::anyhow!("{e:?}"))?;
        Ok(())
    }
    if path.extension().and_then(|e| e.to_str()) == Some("svg") {
        draw(
            SVGBackend::new(path, (1000, 600)).into_drawing_area(),
            samples,
            t_max,
            y_max,
        )
    } else {
        draw(
            BitMapBackend::new(path, (1000, 600)).into_drawing_area(),
            samples,
            t_max,
            y_max,
        )
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let settings = Settings::load(None)?;
    let app = App::build(settings.clone(), false).await?;
    let progress = ProgressBar::new(10);
    progress.set_style(
        ProgressStyle::with_template("{spinner} [{elapsed_precise}] {bar:20} {pos}/{len} {msg}")
            .expect("static template"),
    );
    progress.enable_steady_tick(Duration::from_millis(200));
    let bench = Arc::new(Bench {
        plan: Plan::new(args.quick),
        admin: settings.auth.admin_key.expose().to_string(),
        caller: settings
            .caller_keys()
            .first()
            .map(|(_, k)| k.expose().to_string())
            .context("RPW_AUTH__CALLER_KEYS must name a caller")?,
        args,
        app,
        settings,
        http: reqwest::Client::builder()
            .pool_max_idle_per_host(256)
            .build()?,
        next_user: AtomicI64::new(1),
        started: Instant::now(),
        samples: Mutex::new(Vec::new()),
        progress,
    });

    let result = run(&bench).await;
    bench.progress.finish_and_clear();
    if !bench.args.keep {
        if let Err(err) = cleanup(&bench).await {
            eprintln!("cleaning up the bench data failed: {err:#}");
        }
    }
    result
}

/// Every scenario, the table, the JSON and the plot; fails when conservation fails.
async fn run(bench: &Arc<Bench>) -> anyhow::Result<()> {
    let now = chrono::Utc::now();
    bench
        .admin_post(
            "/v1/admin/activities",
            json!({"id": ACTIVITY, "name": "Benchmark rain", "stage": "live",
                   "starts_at": (now - chrono::Duration::minutes(1)).to_rfc3339(),
                   "ends_at": (now + chrono::Duration::hours(2)).to_rfc3339(),
                   "budget_cents": 1_000_000_000_000i64, "max_award_cents": 100}),
        )
        .await?;
    bench
        .admin_post(
            &format!("/v1/admin/activities/{ACTIVITY}/scenes"),
            json!({"id": "rain", "name": "Rain", "award_type": "cash"}),
        )
        .await?;
    // Let every instance's activity cache see the new activity.
    tokio::time::sleep(Duration::from_millis(1_500)).await;

    let sampling = Arc::new(AtomicBool::new(true));
    let sampler = {
        let b = bench.clone();
        let on = sampling.clone();
        tokio::spawn(async move {
            while on.load(Ordering::Relaxed) {
                if let Ok(s) = b.sample().await {
                    b.samples.lock().expect("samples").push(s);
                }
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        })
    };

    bench.stage("ceiling: Ed25519 signing");
    let (cores, sign_per_s) = bench.ceiling();
    // The baseline runs first, on an idle MariaDB: the most favourable moment for it.
    bench.stage("sync_baseline: one transaction per award");
    let sync_baseline = bench.sync_baseline().await?;
    bench.stage("rain_single: POST /v1/awards");
    let rain_single = bench.rain_single().await?;
    bench.stage("rain_batch: POST /v1/awards:batch");
    let rain_batch = bench.rain_batch().await?;
    bench.stage("withdraw: forced settlement during the backlog");
    let withdraw = bench.withdraw().await?;
    bench.stage("view: GET /v1/wallet during the backlog");
    let view = bench.view().await?;
    let backlog_before_drain = bench.sample().await?.backlog;
    bench.stage(&format!("drain at {} tps", bench.args.drain_tps));
    let (n, secs) = bench
        .drain(bench.args.drain_tps, bench.plan.drain, false)
        .await?;
    let measured_tps = n as f64 / secs;
    bench.stage("drain unbounded");
    let (n, secs) = bench.drain(0, bench.plan.unbounded_cap, true).await?;
    let unbounded_tps = n as f64 / secs;
    bench.stage("conservation check");
    let conservation = bench.conservation().await?;
    sampling.store(false, Ordering::Relaxed);
    let _ = sampler.await;

    let summary = json!({
        "rain_single": rain_single,
        "rain_batch": rain_batch,
        "sync_baseline": sync_baseline,
        "drain": {
            "configured_tps": bench.args.drain_tps,
            "measured_tps": round2(measured_tps),
            "unbounded_tps": round2(unbounded_tps),
        },
        "withdraw": withdraw,
        "view": view,
        "conservation": {
            "ok": conservation["ok"],
            "issued_cents": conservation["issued_cents"],
            "booked_cents": conservation["booked_cents"],
            "pending_cents": conservation["pending_cents"],
            "withdrawn_cents": conservation["withdrawn_cents"],
        },
        "ceiling": { "cores": cores, "sign_per_s_per_core": round2(sign_per_s) },
    });

    bench.progress.finish_and_clear();
    let ceiling = cores as f64 * sign_per_s;
    let baseline = summary["sync_baseline"]["awards_per_s"]
        .as_f64()
        .unwrap_or(0.0)
        .max(1e-9);
    let f = |v: &Value| v.as_f64().unwrap_or(0.0);
    println!(
        "\nredpacket-wallet benchmark ({} run, {} cores)",
        if bench.args.quick { "quick" } else { "full" },
        cores
    );
    println!(
        "{:<16} {:>14} {:>9} {:>9}  against target",
        "scenario", "rate /s", "p50 ms", "p99 ms"
    );
    println!(
        "{:<16} {:>14.0} {:>9.2} {:>9.2}  {:.2} x ceiling (target 0.25), {:.1} x baseline (target 3), errors {}",
        "rain_single",
        f(&summary["rain_single"]["awards_per_s"]),
        f(&summary["rain_single"]["p50_ms"]),
        f(&summary["rain_single"]["p99_ms"]),
        f(&summary["rain_single"]["awards_per_s"]) / ceiling,
        f(&summary["rain_single"]["awards_per_s"]) / baseline,
        summary["rain_single"]["errors"]
    );
    println!(
        "{:<16} {:>14.0} {:>9} {:>9.2}  {:.2} x ceiling (target 0.5), {:.1} x baseline (target 6), errors {}",
        "rain_batch",
        f(&summary["rain_batch"]["awards_per_s"]),
        "",
        f(&summary["rain_batch"]["p99_ms"]),
        f(&summary["rain_batch"]["awards_per_s"]) / ceiling,
        f(&summary["rain_batch"]["awards_per_s"]) / baseline,
        summary["rain_batch"]["errors"]
    );
    println!(
        "{:<16} {:>14.0} {:>9} {:>9}",
        "sync_baseline", baseline, "", ""
    );
    println!(
        "{:<16} {:>14.0} {:>9} {:>9}  configured {} ({:+.1}%), backlog at start {}",
        "drain (bounded)",
        measured_tps,
        "",
        "",
        bench.args.drain_tps,
        (measured_tps / f64::from(bench.args.drain_tps) - 1.0) * 100.0,
        backlog_before_drain
    );
    println!(
        "{:<16} {:>14.0} {:>9} {:>9}  {:.1} x baseline (target 4)",
        "drain (unbound)",
        unbounded_tps,
        "",
        "",
        unbounded_tps / baseline
    );
    println!(
        "{:<16} {:>14} {:>9.2} {:>9.2}  50 pending tokens each (target p99 <= 50)",
        "withdraw",
        "",
        f(&summary["withdraw"]["p50_ms"]),
        f(&summary["withdraw"]["p99_ms"])
    );
    println!(
        "{:<16} {:>14.0} {:>9} {:>9.2}  (target 8000/s, p99 <= 20)",
        "view",
        f(&summary["view"]["requests_per_s"]),
        "",
        f(&summary["view"]["p99_ms"])
    );
    println!("{:<16} {:>14.0}  signatures/s/core", "ceiling", sign_per_s);
    println!(
        "conservation: {} (issued {} = booked {} + pending {}; withdrawn {}) {}",
        if conservation["ok"] == true {
            "ok"
        } else {
            "FAILED"
        },
        conservation["issued_cents"],
        conservation["booked_cents"],
        conservation["pending_cents"],
        conservation["withdrawn_cents"],
        conservation["problems"]
    );

    if let Some(path) = &bench.args.json {
        std::fs::write(path, serde_json::to_string_pretty(&summary)?)?;
    }
    if let Some(path) = &bench.args.plot {
        let samples = bench.samples.lock().expect("samples").clone();
        plot(path, &samples)?;
    }
    if conservation["ok"] != true {
        bail!("conservation check failed: {}", conservation["problems"]);
    }
    Ok(())
}

/// Removes the run's Redis keys and both databases: a bench run leaves nothing behind.
async fn cleanup(bench: &Bench) -> anyhow::Result<()> {
    let mut conn = bench.app.redis.conn();
    let pattern = format!("{}*", bench.app.redis.prefix());
    let mut cursor: u64 = 0;
    loop {
        let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(&pattern)
            .arg("COUNT")
            .arg(1000)
            .query_async(&mut conn)
            .await?;
        if !keys.is_empty() {
            redis::cmd("UNLINK")
                .arg(&keys)
                .query_async::<()>(&mut conn)
                .await?;
        }
        if next == 0 {
            break;
        }
        cursor = next;
    }
    use sqlx::migrate::MigrateDatabase;
    bench.app.db.main().close().await;
    sqlx::MySql::drop_database(bench.settings.mysql.url.expose()).await?;
    sqlx::MySql::drop_database(&bench.args.baseline_mysql_url).await?;
    Ok(())
}
