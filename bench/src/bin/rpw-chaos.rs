//! rpw-chaos: seeded fault schedules under bursty load, against real processes, and a
//! checker that proves conservation to the cent (in the spirit of TigerBeetle's VOPR and
//! Jepsen's bank test).
//!
//! It starts a Redis (AOF `everysec`) and a MariaDB of its own (scripts/services.sh on
//! their own ports and data directories under `.data/chaos`), runs `serve` (and
//! `worker`) processes of the release binary, drives upstream callers, users and the
//! payout channel against them while it kills, stalls and flushes what the scenario's
//! seeded schedule says, heals everything, lets clients sync and the backlog drain, and
//! checks every invariant of DESIGN.md against what each client was told.
//!
//! `scripts/chaos.sh` builds and runs it; see `--help`.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Parser;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};

const ADMIN: &str = "chaos-admin-key-0001";
const CALLER: &str = "chaos-caller-key-0001";
const PAYOUT: &str = "chaos-payout-key-0001";
const JWT_SECRET: &str = "chaos-jwt-secret-0001";
const ACTIVITY: &str = "chaos";
const PARTITIONS: u32 = 8;

#[derive(Parser, Debug)]
#[command(
    about = "Seeded crash, loss and outage schedules under bursty load, with a report to the cent"
)]
struct Args {
    /// Every scenario once, with a short load (the CI run).
    #[arg(long)]
    quick: bool,
    /// The first seed (default: from the clock).
    #[arg(long)]
    seed: Option<u64>,
    /// How many seeds per scenario.
    #[arg(long, default_value_t = 1)]
    seeds: u64,
    /// Only this scenario.
    #[arg(long)]
    scenario: Option<String>,
    /// Also write the results as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
    /// The service binary.
    #[arg(long, default_value = "target/release/redpacket-wallet")]
    bin: PathBuf,
    /// Where the harness keeps its servers' data.
    #[arg(long, default_value = ".data/chaos")]
    data: PathBuf,
    /// Redis and MariaDB ports of the harness's own servers.
    #[arg(long, default_value_t = 6390)]
    redis_port: u16,
    #[arg(long, default_value_t = 3310)]
    mysql_port: u16,
    /// Run the service on this Redis Cluster (seed node URLs, comma-separated) instead
    /// of the harness's own Redis. The scenarios that crash or flush the harness's
    /// Redis (redis-crash, redis-loss) are left out.
    #[arg(long, env = "RPW_CHAOS_CLUSTER_URLS")]
    cluster: Option<String>,
    /// Shard the ledger over this many databases (the service's shard map spreads the
    /// users' buckets over them); the checks read them all.
    #[arg(long, default_value_t = 1)]
    shards: usize,
}

/// The scenarios that kill or flush the harness's own single Redis.
const OWN_REDIS: &[&str] = &["redis-crash", "redis-loss"];

/// One kind of fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    /// kill -9 of a `serve` instance, restarted a moment later.
    KillServe,
    /// kill -9 of the worker process mid-batch, restarted.
    KillWorker,
    /// kill -9 of Redis, restarted from its AOF.
    RedisCrash,
    /// Redis loses everything (kill -9, data removed, restarted empty).
    RedisLoss,
    /// kill -9 of MariaDB, restarted.
    MysqlKill,
    /// SIGSTOP of MariaDB for a few seconds.
    MysqlStall,
    /// Every instance restarted with another sub-stock layout: 16 sub-stocks each in a
    /// slot of its own, or 24 (rounded up to the partitions) placed in the partitions.
    Relayout,
    /// The same award twenty times at once; the same withdrawal request five times.
    DuplicateStorm,
}

/// The relayout fault's two layouts: 16 sub-stocks spread, 24 placed in the partitions.
fn placed(sub_stocks: u32) -> bool {
    sub_stocks == 24
}

struct Scenario {
    name: &'static str,
    what: &'static str,
    instances: usize,
    /// A separate `worker` process that aborts between commit and ack now and then.
    crashing_worker: bool,
    faults: &'static [(Fault, usize)],
}

const SCENARIOS: &[Scenario] = &[
    Scenario {
        name: "serve-kill",
        what: "kill -9 of serve instances at random points; two instances, one killed",
        instances: 2,
        crashing_worker: false,
        faults: &[(Fault::KillServe, 3)],
    },
    Scenario {
        name: "worker-kill",
        what: "a worker process aborting between commit and ack, and kill -9 mid-batch",
        instances: 1,
        crashing_worker: true,
        faults: &[(Fault::KillWorker, 3)],
    },
    Scenario {
        name: "redis-crash",
        what: "Redis kill -9 and restart from its AOF (everysec)",
        instances: 2,
        crashing_worker: false,
        faults: &[(Fault::RedisCrash, 2)],
    },
    Scenario {
        name: "redis-loss",
        what: "Redis loses everything; clients sync what they hold",
        instances: 2,
        crashing_worker: false,
        faults: &[(Fault::RedisLoss, 1)],
    },
    Scenario {
        name: "mysql-kill",
        what: "MariaDB kill -9 mid-drain and mid-withdrawal, restarted",
        instances: 1,
        crashing_worker: false,
        faults: &[(Fault::MysqlKill, 2)],
    },
    Scenario {
        name: "mysql-stall",
        what: "MariaDB stopped (SIGSTOP) for seconds",
        instances: 1,
        crashing_worker: false,
        faults: &[(Fault::MysqlStall, 2)],
    },
    Scenario {
        name: "relayout",
        what: "restart with a changed issue.sub_stocks and sub_stocks_in_partitions",
        instances: 1,
        crashing_worker: false,
        faults: &[(Fault::Relayout, 2)],
    },
    Scenario {
        name: "duplicate-storm",
        what:
            "duplicate-award storms, concurrent withdrawals with one request id, and a serve kill",
        instances: 2,
        crashing_worker: false,
        faults: &[(Fault::DuplicateStorm, 6), (Fault::KillServe, 1)],
    },
];

/// A process of the harness: a `serve` instance or the worker.
struct Proc {
    name: String,
    args: Vec<String>,
    env: Vec<(String, String)>,
    port: Option<u16>,
    child: Option<Child>,
    log: PathBuf,
}

impl Proc {
    fn start(&mut self, bin: &Path) -> anyhow::Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)?;
        let child = Command::new(bin)
            .args(&self.args)
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {}", self.name))?;
        self.child = Some(child);
        Ok(())
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Restarts it when it exited on its own (the worker's injected aborts).
    fn revive(&mut self, bin: &Path) -> anyhow::Result<bool> {
        let exited = match &mut self.child {
            Some(child) => child.try_wait()?.is_some(),
            None => false,
        };
        if exited {
            self.child = None;
            self.start(bin)?;
        }
        Ok(exited)
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The harness's own Redis and MariaDB, through scripts/services.sh.
struct Servers {
    root: PathBuf,
    data: PathBuf,
    redis_port: u16,
    mysql_port: u16,
}

impl Servers {
    fn services(&self, action: &str, which: &str) -> anyhow::Result<()> {
        let out = Command::new("bash")
            .arg(self.root.join("scripts/services.sh"))
            .arg(action)
            .arg(which)
            .env("RPW_REDIS_PORT", self.redis_port.to_string())
            .env("RPW_MYSQL_PORT", self.mysql_port.to_string())
            .env("RPW_DATA_DIR", &self.data)
            .output()?;
        if !out.status.success() {
            bail!(
                "services.sh {action} {which}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(())
    }

    fn pid(&self, which: &str) -> Option<String> {
        let file = match which {
            "redis" => self.data.join("redis/redis.pid"),
            _ => self.data.join("mysql/mariadb.pid"),
        };
        std::fs::read_to_string(file)
            .ok()
            .map(|p| p.trim().to_string())
    }

    fn signal(&self, which: &str, signal: &str) -> anyhow::Result<()> {
        let pid = self
            .pid(which)
            .with_context(|| format!("{which} pid file"))?;
        let status = Command::new("kill").arg(signal).arg(&pid).status()?;
        if !status.success() {
            bail!("kill {signal} {pid} ({which}) failed");
        }
        Ok(())
    }

    fn kill9(&self, which: &str) -> anyhow::Result<()> {
        self.signal(which, "-KILL")?;
        let pid = self.pid(which).unwrap_or_default();
        for _ in 0..100 {
            if !Path::new(&format!("/proc/{pid}")).exists() {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let pidfile = match which {
            "redis" => self.data.join("redis/redis.pid"),
            _ => self.data.join("mysql/mariadb.pid"),
        };
        let _ = std::fs::remove_file(pidfile);
        Ok(())
    }

    fn redis_url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.redis_port)
    }

    fn mysql_url(&self, db: &str) -> String {
        format!("mysql://rpw:rpw@127.0.0.1:{}/{db}", self.mysql_port)
    }
}

/// What every client was told.
#[derive(Default)]
struct Told {
    /// user → out_trade_no → (token, amount)
    tokens: HashMap<i64, BTreeMap<String, (String, i64)>>,
    /// (user, request id) → (withdrawal id, amount)
    withdrawals: BTreeMap<(i64, String), (String, i64)>,
    /// withdrawal id → final payout result the channel was answered for
    payouts: BTreeMap<String, String>,
}

struct Load {
    client: reqwest::Client,
    ports: Mutex<Vec<u16>>,
    told: Mutex<Told>,
    stop: AtomicBool,
    next_rain: AtomicI64,
    next_request: AtomicU64,
    awards_sent: AtomicU64,
    withdrawals_sent: AtomicU64,
    unanswered: AtomicU64,
    /// The paths of requests never answered (the first few).
    unanswered_paths: Mutex<Vec<String>>,
    storm: AtomicBool,
    users: i64,
    max_award: i64,
}

enum Answer {
    Done(u16, Value),
    GaveUp,
}

impl Load {
    fn port(&self, rng: &mut StdRng) -> Option<u16> {
        let ports = self.ports.lock().unwrap();
        if ports.is_empty() {
            return None;
        }
        Some(ports[rng.random_range(0..ports.len())])
    }

    /// Sends until a final answer (2xx or a 4xx other than 429), like a real client
    /// that retries the same idempotent request; gives up after `patience`.
    async fn send(
        &self,
        rng: &mut StdRng,
        method: reqwest::Method,
        path: &str,
        bearer: &str,
        body: Option<&Value>,
        patience: Duration,
    ) -> Answer {
        let started = Instant::now();
        while started.elapsed() < patience {
            let Some(port) = self.port(rng) else {
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            };
            let mut req = self
                .client
                .request(method.clone(), format!("http://127.0.0.1:{port}{path}"))
                .bearer_auth(bearer)
                .timeout(Duration::from_secs(8));
            if let Some(b) = body {
                req = req.json(b);
            }
            if let Ok(resp) = req.send().await {
                let status = resp.status().as_u16();
                if status < 500 && status != 429 {
                    let value = resp.json::<Value>().await.unwrap_or(Value::Null);
                    return Answer::Done(status, value);
                }
            }
            tokio::time::sleep(Duration::from_millis(rng.random_range(20..150))).await;
        }
        self.unanswered.fetch_add(1, Ordering::Relaxed);
        let mut paths = self.unanswered_paths.lock().unwrap();
        if paths.len() < 5 {
            paths.push(format!("{method} {path}"));
        }
        Answer::GaveUp
    }

    fn award(&self, rng: &mut StdRng) -> Value {
        let rain = self.next_rain.fetch_add(1, Ordering::Relaxed);
        json!({"user_id": rng.random_range(1..=self.users), "app_id": 1, "activity_id": ACTIVITY,
               "scene_id": "rain", "rain_id": rain, "award_type": "cash",
               "amount_cents": rng.random_range(1..=self.max_award)})
    }

    fn keep_token(&self, award: &Value, answer: &Value) {
        if let (Some(token), Some(otn)) =
            (answer["token"].as_str(), answer["out_trade_no"].as_str())
        {
            let user = award["user_id"].as_i64().unwrap_or(0);
            let amount = award["amount_cents"].as_i64().unwrap_or(0);
            self.told
                .lock()
                .unwrap()
                .tokens
                .entry(user)
                .or_default()
                .insert(otn.to_string(), (token.to_string(), amount));
        }
    }

    /// An upstream caller: bursts of batches and single awards.
    async fn caller(self: Arc<Self>, seed: u64) {
        let mut rng = StdRng::seed_from_u64(seed);
        while !self.stop.load(Ordering::Relaxed) {
            if self.storm.load(Ordering::Relaxed) && rng.random_bool(0.3) {
                // One award, twenty times at once: one token, nineteen replays.
                let award = self.award(&mut rng);
                let answers = futures::future::join_all((0..20).map(|i| {
                    let this = self.clone();
                    let award = award.clone();
                    async move {
                        let mut rng = StdRng::seed_from_u64(seed ^ (i as u64) << 32);
                        this.send(
                            &mut rng,
                            reqwest::Method::POST,
                            "/v1/awards",
                            CALLER,
                            Some(&award),
                            Duration::from_secs(60),
                        )
                        .await
                    }
                }))
                .await;
                self.awards_sent.fetch_add(1, Ordering::Relaxed);
                let mut tokens = std::collections::HashSet::new();
                for a in answers {
                    if let Answer::Done(status, body) = a {
                        if status == 200 || status == 201 {
                            tokens.insert(body["token"].as_str().unwrap_or("").to_string());
                            self.keep_token(&award, &body);
                        }
                    }
                }
                if tokens.len() > 1 {
                    eprintln!(
                        "VIOLATION: one award answered with {} different tokens: {award}",
                        tokens.len()
                    );
                    self.told.lock().unwrap().tokens.entry(-1).or_default();
                }
                continue;
            }
            if rng.random_bool(0.7) {
                let n = rng.random_range(5..=30);
                let mut awards: Vec<Value> = (0..n).map(|_| self.award(&mut rng)).collect();
                self.awards_sent.fetch_add(n, Ordering::Relaxed);
                // Items answered `unavailable` are sent again, as a caller would.
                for _ in 0..200 {
                    if awards.is_empty() || self.stop.load(Ordering::Relaxed) && awards.is_empty() {
                        break;
                    }
                    let body = json!({ "awards": awards });
                    match self
                        .send(
                            &mut rng,
                            reqwest::Method::POST,
                            "/v1/awards:batch",
                            CALLER,
                            Some(&body),
                            Duration::from_secs(60),
                        )
                        .await
                    {
                        Answer::Done(200, answer) => {
                            let results = answer["results"].as_array().cloned().unwrap_or_default();
                            let mut again = Vec::new();
                            for (award, r) in awards.iter().zip(results) {
                                if r["error"]["code"] == "unavailable"
                                    || r["error"]["code"] == "internal"
                                {
                                    again.push(award.clone());
                                } else {
                                    self.keep_token(award, &r);
                                }
                            }
                            awards = again;
                            if !awards.is_empty() {
                                tokio::time::sleep(Duration::from_millis(100)).await;
                            }
                        }
                        _ => break,
                    }
                }
            } else {
                let award = self.award(&mut rng);
                self.awards_sent.fetch_add(1, Ordering::Relaxed);
                if let Answer::Done(status, body) = self
                    .send(
                        &mut rng,
                        reqwest::Method::POST,
                        "/v1/awards",
                        CALLER,
                        Some(&award),
                        Duration::from_secs(60),
                    )
                    .await
                {
                    if status == 200 || status == 201 {
                        self.keep_token(&award, &body);
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(rng.random_range(40..200))).await;
        }
    }

    fn jwt(user: i64) -> String {
        let claims = json!({"sub": user.to_string(), "exp": chrono::Utc::now().timestamp() + 3600});
        jsonwebtoken::encode(
            &jsonwebtoken::Header::default(),
            &claims,
            &jsonwebtoken::EncodingKey::from_secret(JWT_SECRET.as_bytes()),
        )
        .expect("jwt")
    }

    /// A user: views, withdrawals with request-id retries, syncs.
    async fn user(self: Arc<Self>, seed: u64) {
        let mut rng = StdRng::seed_from_u64(seed);
        while !self.stop.load(Ordering::Relaxed) {
            let user = rng.random_range(1..=self.users);
            let jwt = Self::jwt(user);
            let roll: f64 = rng.random();
            if roll < 0.4 {
                let _ = self
                    .send(
                        &mut rng,
                        reqwest::Method::GET,
                        "/v1/wallet",
                        &jwt,
                        None,
                        Duration::from_secs(60),
                    )
                    .await;
            } else if roll < 0.75 {
                let request_id = format!(
                    "r{}-{}",
                    seed,
                    self.next_request.fetch_add(1, Ordering::Relaxed)
                );
                let body =
                    json!({"request_id": request_id, "amount_cents": rng.random_range(1..=300)});
                let copies = if self.storm.load(Ordering::Relaxed) {
                    5
                } else {
                    1
                };
                self.withdrawals_sent.fetch_add(1, Ordering::Relaxed);
                let answers = futures::future::join_all((0..copies).map(|i| {
                    let this = self.clone();
                    let body = body.clone();
                    let jwt = jwt.clone();
                    async move {
                        let mut rng = StdRng::seed_from_u64(seed ^ (i as u64) << 40);
                        this.send(
                            &mut rng,
                            reqwest::Method::POST,
                            "/v1/withdrawals",
                            &jwt,
                            Some(&body),
                            Duration::from_secs(60),
                        )
                        .await
                    }
                }))
                .await;
                let mut ids = std::collections::HashSet::new();
                for a in answers {
                    if let Answer::Done(status, w) = a {
                        if status == 200 || status == 201 {
                            let id = w["withdrawal_id"].as_str().unwrap_or("").to_string();
                            ids.insert(id.clone());
                            self.told.lock().unwrap().withdrawals.insert(
                                (user, request_id.clone()),
                                (id, body["amount_cents"].as_i64().unwrap_or(0)),
                            );
                        }
                    }
                }
                if ids.len() > 1 {
                    eprintln!(
                        "VIOLATION: one request id answered with {} withdrawals",
                        ids.len()
                    );
                }
            } else {
                let tokens: Vec<String> = self
                    .told
                    .lock()
                    .unwrap()
                    .tokens
                    .get(&user)
                    .map(|m| m.values().map(|(t, _)| t.clone()).collect())
                    .unwrap_or_default();
                if !tokens.is_empty() {
                    let body = json!({ "tokens": tokens });
                    let _ = self
                        .send(
                            &mut rng,
                            reqwest::Method::POST,
                            "/v1/wallet/tokens:sync",
                            &jwt,
                            Some(&body),
                            Duration::from_secs(60),
                        )
                        .await;
                }
            }
            tokio::time::sleep(Duration::from_millis(rng.random_range(10..60))).await;
        }
    }

    /// The payout channel: pays most withdrawals, fails some (their money goes back).
    async fn payout(self: Arc<Self>, seed: u64) {
        let mut rng = StdRng::seed_from_u64(seed);
        loop {
            let stopping = self.stop.load(Ordering::Relaxed);
            let open: Vec<String> = {
                let told = self.told.lock().unwrap();
                told.withdrawals
                    .values()
                    .map(|(id, _)| id.clone())
                    .filter(|id| !told.payouts.contains_key(id))
                    .collect()
            };
            for id in open {
                let result = if rng.random_bool(0.7) {
                    "paid"
                } else {
                    "failed"
                };
                let body = json!({ "status": result });
                if let Answer::Done(200, _) = self
                    .send(
                        &mut rng,
                        reqwest::Method::POST,
                        &format!("/v1/withdrawals/{id}/result"),
                        PAYOUT,
                        Some(&body),
                        Duration::from_secs(60),
                    )
                    .await
                {
                    self.told
                        .lock()
                        .unwrap()
                        .payouts
                        .insert(id, result.to_string());
                }
            }
            if stopping {
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

#[derive(Debug, Default, Clone, serde::Serialize)]
struct Outcome {
    scenario: String,
    seed: u64,
    faults: Vec<String>,
    awards_sent: u64,
    awards_held: u64,
    withdrawals: u64,
    issued_cents: i64,
    booked_cents: i64,
    leaked_cents: i64,
    repaired_cents: i64,
    in_doubt_cents: i64,
    lost_cents: i64,
    doubled_cents: i64,
    violations: Vec<String>,
    ok: bool,
    seconds: f64,
}

struct Run<'a> {
    args: &'a Args,
    servers: &'a Servers,
    bin: PathBuf,
    keys: PathBuf,
    dir: PathBuf,
}

/// The harness's view of the service's Redis: its own node or the cluster.
#[derive(Clone)]
enum Conn {
    Node(redis::aio::MultiplexedConnection),
    Cluster(redis::cluster_async::ClusterConnection),
}

impl redis::aio::ConnectionLike for Conn {
    fn req_packed_command<'a>(
        &'a mut self,
        cmd: &'a redis::Cmd,
    ) -> redis::RedisFuture<'a, redis::Value> {
        match self {
            Conn::Node(c) => c.req_packed_command(cmd),
            Conn::Cluster(c) => c.req_packed_command(cmd),
        }
    }
    fn req_packed_commands<'a>(
        &'a mut self,
        pipe: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> redis::RedisFuture<'a, Vec<redis::Value>> {
        match self {
            Conn::Node(c) => c.req_packed_commands(pipe, offset, count),
            Conn::Cluster(c) => c.req_packed_commands(pipe, offset, count),
        }
    }
    fn get_db(&self) -> i64 {
        0
    }
}

impl Run<'_> {
    /// The run's databases: the main one, its further shards, and the checks' union.
    fn databases(&self, db: &str) -> Vec<String> {
        let mut names = vec![db.to_string()];
        if self.args.shards > 1 {
            names.extend((1..self.args.shards).map(|i| format!("{db}_s{i}")));
            names.push(format!("{db}_all"));
        }
        names
    }

    /// A pool whose `ledger_entries`, `accounts` and `withdrawals` are every shard's
    /// (views over all of them in a database of the checks' own; the main database's
    /// reconciliation reports beside them).
    async fn ledger_view(&self, db: &str) -> anyhow::Result<sqlx::MySqlPool> {
        if self.args.shards <= 1 {
            return Ok(sqlx::MySqlPool::connect(&self.servers.mysql_url(db)).await?);
        }
        let all = format!("{db}_all");
        let admin = sqlx::MySqlPool::connect(&self.servers.mysql_url("rpw")).await?;
        sqlx::query(&format!("CREATE DATABASE IF NOT EXISTS `{all}`"))
            .execute(&admin)
            .await?;
        let shards: Vec<String> = self.databases(db)[..self.args.shards].to_vec();
        for table in ["ledger_entries", "accounts", "withdrawals"] {
            let union = shards
                .iter()
                .map(|s| format!("SELECT * FROM `{s}`.`{table}`"))
                .collect::<Vec<_>>()
                .join(" UNION ALL ");
            sqlx::query(&format!(
                "CREATE OR REPLACE VIEW `{all}`.`{table}` AS {union}"
            ))
            .execute(&admin)
            .await?;
        }
        sqlx::query(&format!(
            "CREATE OR REPLACE VIEW `{all}`.`reconciliation_reports` AS SELECT * FROM `{db}`.`reconciliation_reports`"
        ))
        .execute(&admin)
        .await?;
        admin.close().await;
        Ok(sqlx::MySqlPool::connect(&self.servers.mysql_url(&all)).await?)
    }

    async fn redis_conn(&self) -> anyhow::Result<Conn> {
        Ok(match &self.args.cluster {
            Some(urls) => Conn::Cluster(
                redis::cluster::ClusterClient::new(urls.split(',').collect::<Vec<_>>())?
                    .get_async_connection()
                    .await?,
            ),
            None => Conn::Node(
                redis::Client::open(self.servers.redis_url())?
                    .get_multiplexed_async_connection()
                    .await?,
            ),
        })
    }

    fn instance_env(
        &self,
        db: &str,
        prefix: &str,
        port: Option<u16>,
        sub_stocks: u32,
    ) -> Vec<(String, String)> {
        let mut env: Vec<(String, String)> = vec![
            ("RPW_REDIS__URL", self.servers.redis_url()),
            ("RPW_REDIS__KEY_PREFIX", prefix.to_string()),
            ("RPW_REDIS__PARTITIONS", PARTITIONS.to_string()),
            ("RPW_REDIS__COMMAND_TIMEOUT_MS", "1500".into()),
            // The faults are the real app's; no shadow app (and its database) beside it.
            ("RPW_SHADOW__ENABLED", "false".into()),
            ("RPW_MYSQL__URL", self.servers.mysql_url(db)),
            ("RPW_MYSQL__MIN_CONNECTIONS", "2".into()),
            ("RPW_MYSQL__ACQUIRE_TIMEOUT_MS", "2000".into()),
            ("RPW_AUTH__ADMIN_KEY", ADMIN.into()),
            ("RPW_AUTH__CALLER_KEYS", format!("up:{CALLER},pay:{PAYOUT}")),
            ("RPW_AUTH__PAYOUT_CALLERS", "pay".into()),
            ("RPW_AUTH__JWT_SECRET", JWT_SECRET.into()),
            ("RPW_KEYS__DIR", self.keys.display().to_string()),
            ("RPW_SETTLE__MAX_TPS", "4000".into()),
            ("RPW_SETTLE__CLAIM_IDLE_MS", "2000".into()),
            ("RPW_SETTLE__RETRY_MAX_MS", "1000".into()),
            ("RPW_CRON__SETTLE", "*/2 * * * * *".into()),
            ("RPW_CRON__RECONCILE_LIVE", "".into()),
            ("RPW_CRON__RECONCILE_HOURLY", "".into()),
            ("RPW_CRON__HOUSEKEEPING", "".into()),
            ("RPW_CRON__LOCK_TTL_MS", "10000".into()),
            ("RPW_ISSUE__CACHE_REFRESH_MS", "300".into()),
            ("RPW_ISSUE__SUB_STOCKS", sub_stocks.to_string()),
            (
                "RPW_ISSUE__SUB_STOCKS_IN_PARTITIONS",
                placed(sub_stocks).to_string(),
            ),
            ("RPW_ISSUE__IN_FLIGHT_GRACE_MS", "2000".into()),
            ("RPW_ISSUE__IN_DOUBT_GRACE_MS", "0".into()),
            ("RPW_HTTP__REQUEST_TIMEOUT_MS", "6000".into()),
            ("RPW_HTTP__SHUTDOWN_TIMEOUT_MS", "1000".into()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        if let Some(urls) = &self.args.cluster {
            env.push(("RPW_REDIS__CLUSTER_URLS".into(), urls.clone()));
        }
        if self.args.shards > 1 {
            let urls: Vec<String> = (1..self.args.shards)
                .map(|i| self.servers.mysql_url(&format!("{db}_s{i}")))
                .collect();
            env.push(("RPW_MYSQL__SHARD_URLS".into(), urls.join(",")));
        }
        if let Some(port) = port {
            env.push(("RPW_HTTP__ADDR".into(), format!("127.0.0.1:{port}")));
        }
        env
    }

    async fn wait_ready(client: &reqwest::Client, port: u16) -> anyhow::Result<()> {
        for _ in 0..300 {
            if let Ok(resp) = client
                .get(format!("http://127.0.0.1:{port}/readyz"))
                .send()
                .await
            {
                if resp.status().is_success() {
                    return Ok(());
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        bail!("instance on port {port} never became ready")
    }

    async fn scenario(&self, sc: &Scenario, seed: u64) -> anyhow::Result<Outcome> {
        let started = Instant::now();
        let mut rng = StdRng::seed_from_u64(seed ^ fxhash(sc.name));
        let load_for = if self.args.quick {
            Duration::from_secs(8)
        } else {
            Duration::from_secs(20)
        };
        let db = format!("chaos_{}_{}", sc.name.replace('-', "_"), seed);
        // The harness owns its Redis: each scenario starts from an empty one, under a
        // prefix of its own (an earlier run with the same seed leaves nothing behind).
        let prefix = format!("chaos-{}-{seed}-{:x}", sc.name, rand::random::<u32>());
        if self.args.cluster.is_none() {
            let redis = redis::Client::open(self.servers.redis_url())?;
            let mut conn = redis.get_multiplexed_async_connection().await?;
            let _: () = redis::cmd("FLUSHALL").query_async(&mut conn).await?;
        }
        // A fresh database for the run (and its other shards, created by `migrate`).
        let admin = sqlx::MySqlPool::connect(&self.servers.mysql_url("rpw")).await?;
        for name in self.databases(&db) {
            sqlx::query(&format!("DROP DATABASE IF EXISTS `{name}`"))
                .execute(&admin)
                .await?;
        }
        sqlx::query(&format!("CREATE DATABASE `{db}`"))
            .execute(&admin)
            .await?;
        admin.close().await;
        let migrate = Command::new(&self.bin)
            .arg("migrate")
            .envs(self.instance_env(&db, &prefix, None, 16))
            .output()?;
        if !migrate.status.success() {
            bail!("migrate: {}", String::from_utf8_lossy(&migrate.stderr));
        }

        let mut procs: Vec<Proc> = Vec::new();
        for i in 0..sc.instances {
            let port = free_port();
            let mut env = self.instance_env(&db, &prefix, Some(port), 16);
            if sc.crashing_worker {
                env.push(("RPW_SETTLE__ENABLED".into(), "false".into()));
            }
            procs.push(Proc {
                name: format!("serve-{i}"),
                args: vec!["serve".into(), "--no-migrate".into()],
                env,
                port: Some(port),
                child: None,
                log: self.dir.join(format!("{}-{seed}-serve-{i}.log", sc.name)),
            });
        }
        if sc.crashing_worker {
            let mut env = self.instance_env(&db, &prefix, None, 16);
            env.push((
                "RPW_SETTLE__CRASH_AFTER_COMMIT_PERMILLE".into(),
                "30".into(),
            ));
            procs.push(Proc {
                name: "worker".into(),
                args: vec!["worker".into()],
                env,
                port: None,
                child: None,
                log: self.dir.join(format!("{}-{seed}-worker.log", sc.name)),
            });
        }
        for p in &mut procs {
            p.start(&self.bin)?;
        }
        let client = reqwest::Client::builder()
            .pool_max_idle_per_host(32)
            .build()?;
        for p in &procs {
            if let Some(port) = p.port {
                Self::wait_ready(&client, port).await?;
            }
        }
        let serve_ports: Vec<u16> = procs.iter().filter_map(|p| p.port).collect();

        // The activity: a budget the load runs past, so the last cents are fought over.
        let budget: i64 = if self.args.quick {
            1_000_000
        } else {
            2_500_000
        };
        let now = chrono::Utc::now();
        let body = json!({"id": ACTIVITY, "name": "chaos", "stage": "live",
            "starts_at": (now - chrono::Duration::seconds(60)).to_rfc3339(),
            "ends_at": (now + chrono::Duration::hours(2)).to_rfc3339(),
            "budget_cents": budget, "max_award_cents": 500});
        let base = format!("http://127.0.0.1:{}", serve_ports[0]);
        let r = client
            .post(format!("{base}/v1/admin/activities"))
            .bearer_auth(ADMIN)
            .json(&body)
            .send()
            .await?;
        if r.status().as_u16() != 201 {
            bail!("creating the activity: {}", r.text().await?);
        }
        let r = client
            .post(format!("{base}/v1/admin/activities/{ACTIVITY}/scenes"))
            .bearer_auth(ADMIN)
            .json(&json!({"id": "rain", "name": "rain", "award_type": "cash"}))
            .send()
            .await?;
        if r.status().as_u16() != 201 {
            bail!("creating the scene: {}", r.text().await?);
        }
        tokio::time::sleep(Duration::from_millis(700)).await;

        // The schedule: every fault at a moment the seed chooses.
        let mut schedule: Vec<(Duration, Fault)> = Vec::new();
        for &(fault, count) in sc.faults {
            for _ in 0..count {
                let at = rng.random_range(1_000..load_for.as_millis() as u64 - 1_500);
                schedule.push((Duration::from_millis(at), fault));
            }
        }
        schedule.sort_by_key(|(at, _)| *at);
        let faults: Vec<String> = schedule
            .iter()
            .map(|(at, f)| format!("{:?}@{:.1}s", f, at.as_secs_f64()))
            .collect();

        let load = Arc::new(Load {
            client: client.clone(),
            ports: Mutex::new(serve_ports.clone()),
            told: Mutex::new(Told::default()),
            stop: AtomicBool::new(false),
            next_rain: AtomicI64::new(1),
            next_request: AtomicU64::new(1),
            awards_sent: AtomicU64::new(0),
            withdrawals_sent: AtomicU64::new(0),
            unanswered: AtomicU64::new(0),
            unanswered_paths: Mutex::new(Vec::new()),
            storm: AtomicBool::new(false),
            users: 200,
            max_award: 500,
        });
        let mut tasks = Vec::new();
        for i in 0..6 {
            tasks.push(tokio::spawn(
                load.clone().caller(seed.wrapping_mul(31).wrapping_add(i)),
            ));
        }
        for i in 0..3 {
            tasks.push(tokio::spawn(
                load.clone()
                    .user(seed.wrapping_mul(37).wrapping_add(100 + i)),
            ));
        }
        let payout = tokio::spawn(load.clone().payout(seed.wrapping_mul(41)));

        let load_started = Instant::now();
        let mut sub_stocks = 16;
        for (at, fault) in &schedule {
            while load_started.elapsed() < *at {
                for p in procs.iter_mut() {
                    p.revive(&self.bin)?;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            self.inject(
                *fault,
                &mut procs,
                &load,
                &mut rng,
                &mut sub_stocks,
                &db,
                &prefix,
            )
            .await?;
        }
        while load_started.elapsed() < load_for {
            for p in procs.iter_mut() {
                p.revive(&self.bin)?;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        load.stop.store(true, Ordering::Relaxed);
        load.storm.store(false, Ordering::Relaxed);
        for t in tasks {
            let _ = t.await;
        }
        let _ = payout.await;

        // Heal: every process up (the crashing worker no longer crashes).
        for p in procs.iter_mut() {
            if p.name == "worker" {
                p.kill();
                p.env
                    .retain(|(k, _)| k != "RPW_SETTLE__CRASH_AFTER_COMMIT_PERMILLE");
            }
            if p.child.is_none() {
                p.start(&self.bin)?;
            } else {
                p.revive(&self.bin)?;
            }
        }
        for p in &procs {
            if let Some(port) = p.port {
                Self::wait_ready(&client, port).await?;
            }
        }
        *load.ports.lock().unwrap() = procs.iter().filter_map(|p| p.port).collect();

        let mut outcome = self.check(&load, &db, &prefix, budget, &client).await?;
        outcome.scenario = sc.name.to_string();
        outcome.seed = seed;
        outcome.faults = faults;
        outcome.awards_sent = load.awards_sent.load(Ordering::Relaxed);
        outcome.withdrawals = load.told.lock().unwrap().withdrawals.len() as u64;
        if load.unanswered.load(Ordering::Relaxed) > 0 {
            outcome.violations.push(format!(
                "{} requests were never answered within their patience: {:?}",
                load.unanswered.load(Ordering::Relaxed),
                load.unanswered_paths.lock().unwrap()
            ));
        }
        outcome.ok = outcome.violations.is_empty();
        outcome.seconds = (started.elapsed().as_secs_f64() * 10.0).round() / 10.0;
        for p in procs.iter_mut() {
            p.kill();
        }
        if outcome.ok {
            let admin = sqlx::MySqlPool::connect(&self.servers.mysql_url("rpw")).await?;
            for name in self.databases(&db) {
                sqlx::query(&format!("DROP DATABASE IF EXISTS `{name}`"))
                    .execute(&admin)
                    .await?;
            }
            admin.close().await;
        }
        Ok(outcome)
    }

    #[allow(clippy::too_many_arguments)]
    async fn inject(
        &self,
        fault: Fault,
        procs: &mut [Proc],
        load: &Arc<Load>,
        rng: &mut StdRng,
        sub_stocks: &mut u32,
        _db: &str,
        _prefix: &str,
    ) -> anyhow::Result<()> {
        match fault {
            Fault::KillServe => {
                let serving: Vec<usize> = (0..procs.len())
                    .filter(|&i| procs[i].port.is_some())
                    .collect();
                let i = serving[rng.random_range(0..serving.len())];
                let port = procs[i].port.unwrap_or(0);
                load.ports.lock().unwrap().retain(|p| *p != port);
                procs[i].kill();
                tokio::time::sleep(Duration::from_millis(rng.random_range(200..800))).await;
                procs[i].start(&self.bin)?;
                Self::wait_ready(&load.client, port).await?;
                load.ports.lock().unwrap().push(port);
            }
            Fault::KillWorker => {
                if let Some(p) = procs.iter_mut().find(|p| p.name == "worker") {
                    p.kill();
                    tokio::time::sleep(Duration::from_millis(rng.random_range(100..500))).await;
                    p.start(&self.bin)?;
                }
            }
            Fault::RedisCrash => {
                self.servers.kill9("redis")?;
                tokio::time::sleep(Duration::from_millis(rng.random_range(200..1_000))).await;
                self.servers.services("start", "redis")?;
            }
            Fault::RedisLoss => {
                self.servers.kill9("redis")?;
                let dir = self.servers.data.join("redis");
                for entry in std::fs::read_dir(&dir)? {
                    let path = entry?.path();
                    if path.is_dir() {
                        std::fs::remove_dir_all(&path)?;
                    } else if path.extension().is_some_and(|e| e == "rdb" || e == "aof") {
                        std::fs::remove_file(&path)?;
                    }
                }
                tokio::time::sleep(Duration::from_millis(300)).await;
                self.servers.services("start", "redis")?;
            }
            Fault::MysqlKill => {
                self.servers.kill9("mysql")?;
                tokio::time::sleep(Duration::from_millis(rng.random_range(300..1_200))).await;
                self.servers.services("start", "mysql")?;
            }
            Fault::MysqlStall => {
                self.servers.signal("mysql", "-STOP")?;
                tokio::time::sleep(Duration::from_millis(rng.random_range(1_500..3_000))).await;
                self.servers.signal("mysql", "-CONT")?;
            }
            Fault::Relayout => {
                *sub_stocks = if *sub_stocks == 16 { 24 } else { 16 };
                for p in procs.iter_mut() {
                    p.kill();
                    for (k, v) in p.env.iter_mut() {
                        if k == "RPW_ISSUE__SUB_STOCKS" {
                            *v = sub_stocks.to_string();
                        }
                        if k == "RPW_ISSUE__SUB_STOCKS_IN_PARTITIONS" {
                            *v = placed(*sub_stocks).to_string();
                        }
                    }
                    p.start(&self.bin)?;
                }
                for p in procs.iter() {
                    if let Some(port) = p.port {
                        Self::wait_ready(&load.client, port).await?;
                    }
                }
            }
            Fault::DuplicateStorm => {
                load.storm.store(true, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(rng.random_range(300..800))).await;
                load.storm.store(false, Ordering::Relaxed);
            }
        }
        Ok(())
    }

    /// After the faults: clients sync, the backlog drains, and every invariant is
    /// checked against what the clients were told.
    async fn check(
        &self,
        load: &Arc<Load>,
        db: &str,
        prefix: &str,
        budget: i64,
        client: &reqwest::Client,
    ) -> anyhow::Result<Outcome> {
        let mut out = Outcome::default();
        let mut rng = StdRng::seed_from_u64(7);
        let told_tokens: HashMap<i64, BTreeMap<String, (String, i64)>> =
            load.told.lock().unwrap().tokens.clone();
        if told_tokens.contains_key(&-1) {
            out.violations
                .push("an award was answered with two different tokens".into());
        }
        // 1. Every client syncs what it holds.
        for (user, tokens) in &told_tokens {
            if *user <= 0 {
                continue;
            }
            for chunk in tokens
                .values()
                .map(|(t, _)| t.clone())
                .collect::<Vec<_>>()
                .chunks(500)
            {
                let body = json!({ "tokens": chunk });
                match load
                    .send(
                        &mut rng,
                        reqwest::Method::POST,
                        "/v1/wallet/tokens:sync",
                        &Load::jwt(*user),
                        Some(&body),
                        Duration::from_secs(60),
                    )
                    .await
                {
                    Answer::Done(200, r)
                        if r["rejected"].as_array().is_some_and(|a| a.is_empty()) => {}
                    Answer::Done(status, r) => out
                        .violations
                        .push(format!("user {user}: sync answered {status} {r}")),
                    Answer::GaveUp => out
                        .violations
                        .push(format!("user {user}: sync never answered")),
                }
            }
        }
        // 2. The backlog drains.
        let mut conn = self.redis_conn().await?;
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let mut left = 0i64;
            for p in 0..PARTITIONS {
                let stream = format!("{prefix}{{{p}}}:settle");
                let len: i64 = redis::cmd("XLEN")
                    .arg(&stream)
                    .query_async(&mut conn)
                    .await
                    .unwrap_or(0);
                left += len;
            }
            if left == 0 {
                break;
            }
            if Instant::now() > deadline {
                out.violations
                    .push(format!("the backlog did not drain: {left} entries left"));
                break;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        for p in 0..PARTITIONS {
            let parked: i64 = redis::cmd("XLEN")
                .arg(format!("{prefix}{{{p}}}:parked"))
                .query_async(&mut conn)
                .await
                .unwrap_or(0);
            if parked > 0 {
                out.violations
                    .push(format!("partition {p}: {parked} entries parked"));
            }
        }

        // 3. The ledger against what clients hold (over every shard).
        let pool = self.ledger_view(db).await?;
        let rows: Vec<(i64, String, i64)> = sqlx::query_as(
            "SELECT user_id, CAST(out_trade_no AS CHAR), amount_cents FROM ledger_entries WHERE kind = 'award'",
        )
        .fetch_all(&pool)
        .await?;
        let mut ledger: HashMap<String, (i64, i64)> = HashMap::new();
        for (user, otn, amount) in rows {
            ledger.insert(otn, (user, amount));
        }
        let mut held_total = 0i64;
        for (user, tokens) in &told_tokens {
            for (otn, (_, amount)) in tokens {
                out.awards_held += 1;
                held_total += amount;
                match ledger.get(otn) {
                    Some((u, a)) if u == user && a == amount => {}
                    Some((u, a)) => {
                        out.violations.push(format!(
                            "token {otn} of user {user} ({amount}) booked as user {u}, {a}"
                        ));
                    }
                    None => {
                        out.lost_cents += amount;
                        if out.lost_cents == *amount {
                            out.violations.push(format!(
                                "LOST: user {user} holds {otn} ({amount} cents), not in the ledger"
                            ));
                        }
                    }
                }
            }
        }
        let held: std::collections::HashSet<&String> =
            told_tokens.values().flat_map(|m| m.keys()).collect();
        let mut first_doubled = true;
        for (otn, (user, amount)) in &ledger {
            if !held.contains(otn) {
                out.doubled_cents += amount;
                if first_doubled {
                    first_doubled = false;
                    out.violations.push(format!("DOUBLED: the ledger credits user {user} with {otn} ({amount} cents), an award no client was told of"));
                }
            }
        }
        out.booked_cents = ledger.values().map(|(_, a)| a).sum();
        out.issued_cents = held_total;
        if out.booked_cents > budget {
            out.violations.push(format!(
                "OVER-ISSUE: booked {} > budget {budget}",
                out.booked_cents
            ));
        }

        // 4. Budget conservation from the durable figures. Repair first: it finishes
        // closes a fault cut off and finds drained generations whose Redis data a later
        // fault lost (both in doubt then); then the release of what was in doubt and is
        // proven unspent (the grace is 0 here).
        let base = format!("http://127.0.0.1:{}", load.ports.lock().unwrap()[0]);
        // Leaks (budget taken, never a token: a grant whose answer a MariaDB crash cut
        // off, an award whose process died between take and store) are named by repair:
        // the first drains the generation, the second (after the in-flight grace)
        // returns exactly what never became a token.
        for round in 0..2 {
            if round == 1 {
                tokio::time::sleep(Duration::from_millis(2_200)).await;
            }
            let r = client
                .post(format!("{base}/v1/admin/activities/{ACTIVITY}/repair-leak"))
                .bearer_auth(ADMIN)
                .json(&json!({}))
                .send()
                .await?;
            let body: Value = r.json().await.unwrap_or(Value::Null);
            out.repaired_cents += body["repaired_cents"].as_i64().unwrap_or(0);
        }
        let release = client
            .post(format!(
                "{base}/v1/admin/activities/{ACTIVITY}/release-in-doubt"
            ))
            .bearer_auth(ADMIN)
            .json(&json!({}))
            .send()
            .await?;
        if !release.status().is_success() {
            out.violations
                .push(format!("release-in-doubt answered {}", release.status()));
        }
        let view: Value = client
            .get(format!("{base}/v1/admin/activities/{ACTIVITY}"))
            .bearer_auth(ADMIN)
            .send()
            .await?
            .json()
            .await?;
        let remaining = view["budget_remaining_cents"].as_i64().unwrap_or(0);
        out.in_doubt_cents = view["budget_in_doubt_cents"].as_i64().unwrap_or(0);
        if out.in_doubt_cents != 0 {
            // In doubt includes what its generations issued (and the ledger booked): the
            // figures below would count that twice.
            out.violations.push(format!(
                "IN DOUBT LEFT: {} cents still in doubt after repair and release",
                out.in_doubt_cents
            ));
        }
        out.leaked_cents = budget - remaining - out.in_doubt_cents - out.booked_cents;
        if out.leaked_cents != 0 {
            out.violations.push(format!(
                "STRANDED: {} cents are neither remaining, in doubt, nor booked after repair",
                out.leaked_cents
            ));
        }
        if out.leaked_cents < 0 {
            out.violations.push(format!(
                "OVER-ISSUE: budget {budget} < remaining {remaining} + in doubt {} + booked {}",
                out.in_doubt_cents, out.booked_cents
            ));
        }

        // 5. Balances: never negative, each the sum of its ledger rows, views exact.
        let accounts: Vec<(i64, i64)> =
            sqlx::query_as("SELECT user_id, balance_cents FROM accounts")
                .fetch_all(&pool)
                .await?;
        let sums: Vec<(i64, i64)> = sqlx::query_as("SELECT user_id, CAST(SUM(amount_cents) AS SIGNED) FROM ledger_entries WHERE kind <> 'coupon' GROUP BY user_id").fetch_all(&pool).await?;
        let sums: HashMap<i64, i64> = sums.into_iter().collect();
        for (user, balance) in &accounts {
            if *balance < 0 {
                out.violations
                    .push(format!("user {user}: negative balance {balance}"));
            }
            if sums.get(user).copied().unwrap_or(0) != *balance {
                out.violations.push(format!(
                    "user {user}: balance {balance} != ledger sum {:?}",
                    sums.get(user)
                ));
            }
        }
        for user in told_tokens.keys().filter(|u| **u > 0).take(50) {
            if let Answer::Done(200, w) = load
                .send(
                    &mut rng,
                    reqwest::Method::GET,
                    "/v1/wallet",
                    &Load::jwt(*user),
                    None,
                    Duration::from_secs(20),
                )
                .await
            {
                let balance = accounts
                    .iter()
                    .find(|(u, _)| u == user)
                    .map(|(_, b)| *b)
                    .unwrap_or(0);
                if w["pending_cents"] != 0 || w["balance_cents"] != balance {
                    out.violations.push(format!(
                        "user {user}: view {w} after the drain, ledger balance {balance}"
                    ));
                }
            }
        }

        // 6. Withdrawals: each request id debited once, results as told.
        let (told_withdrawals, told_payouts) = {
            let told = load.told.lock().unwrap();
            (told.withdrawals.clone(), told.payouts.clone())
        };
        let rows: Vec<(String, i64, Vec<u8>, i64, String)> =
            sqlx::query_as("SELECT id, user_id, request_id, amount_cents, status FROM withdrawals")
                .fetch_all(&pool)
                .await?;
        let stored: HashMap<(i64, String), (String, i64, String)> = rows
            .into_iter()
            .map(|(id, u, r, a, s)| ((u, String::from_utf8_lossy(&r).into_owned()), (id, a, s)))
            .collect();
        for ((user, request), (id, amount)) in &told_withdrawals {
            match stored.get(&(*user, request.clone())) {
                Some((sid, samount, status)) if sid == id && samount == amount => {
                    if let Some(result) = told_payouts.get(id) {
                        if result != status {
                            out.violations
                                .push(format!("withdrawal {id}: told {result}, stored {status}"));
                        }
                    }
                }
                other => out.violations.push(format!(
                    "withdrawal {request} of user {user}: told {id}/{amount}, stored {other:?}"
                )),
            }
        }
        let debits: Vec<(String, i64)> = sqlx::query_as(
            "SELECT CAST(out_trade_no AS CHAR), COUNT(*) FROM ledger_entries WHERE kind IN ('withdraw', 'reversal') GROUP BY out_trade_no HAVING COUNT(*) > 1",
        )
        .fetch_all(&pool)
        .await?;
        for (otn, n) in debits {
            out.violations
                .push(format!("{otn} is in the ledger {n} times"));
        }
        let (withdrawals, debit_rows): (i64, i64) = sqlx::query_as(
            "SELECT (SELECT COUNT(*) FROM withdrawals), (SELECT COUNT(*) FROM ledger_entries WHERE kind = 'withdraw')",
        )
        .fetch_one(&pool)
        .await?;
        if withdrawals != debit_rows {
            out.violations
                .push(format!("{withdrawals} withdrawals but {debit_rows} debits"));
        }

        // 7. The stored reconciliation report agrees with the ledger.
        let hour = chrono::Utc::now().format("%Y%m%d%H").to_string();
        let rec = Command::new(&self.bin)
            .args(["reconcile", "--activity", ACTIVITY, "--hour", &hour])
            .envs(self.instance_env(db, prefix, None, 16))
            .output()?;
        match serde_json::from_slice::<Value>(&rec.stdout) {
            Ok(report) => {
                let start =
                    chrono::NaiveDateTime::parse_from_str(&format!("{hour}0000"), "%Y%m%d%H%M%S")?
                        .and_utc()
                        .timestamp_millis();
                let (in_hour,): (i64,) = sqlx::query_as("SELECT CAST(COALESCE(SUM(amount_cents), 0) AS SIGNED) FROM ledger_entries WHERE kind = 'award' AND at_ms >= ? AND at_ms < ?")
                    .bind(start)
                    .bind(start + 3_600_000)
                    .fetch_one(&pool)
                    .await?;
                if report["booked"]["cents"] != in_hour {
                    out.violations.push(format!(
                        "reconciliation booked {} but the ledger holds {in_hour} for {hour}",
                        report["booked"]["cents"]
                    ));
                }
                let stored: (i64,) = sqlx::query_as(
                    "SELECT booked_cents FROM reconciliation_reports ORDER BY id DESC LIMIT 1",
                )
                .fetch_one(&pool)
                .await?;
                if stored.0 != in_hour {
                    out.violations.push(format!(
                        "stored report says booked {} but the ledger holds {in_hour}",
                        stored.0
                    ));
                }
            }
            Err(_) => out.violations.push(format!(
                "reconcile printed no report: {}",
                String::from_utf8_lossy(&rec.stderr)
            )),
        }
        pool.close().await;
        Ok(out)
    }
}

fn fxhash(s: &str) -> u64 {
    s.bytes().fold(0xcbf29ce484222325_u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100000001b3)
    })
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or(0)
}

fn table(outcomes: &[Outcome]) -> String {
    let mut s = String::from(
        "| scenario | seed | faults | awards sent / held | withdrawals | issued ¢ | booked ¢ | leaks repaired ¢ | unaccounted ¢ | lost ¢ | doubled ¢ | result | s |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|\n",
    );
    for o in outcomes {
        s.push_str(&format!(
            "| {} | {} | {} | {} / {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |\n",
            o.scenario,
            o.seed,
            o.faults.len(),
            o.awards_sent,
            o.awards_held,
            o.withdrawals,
            o.issued_cents,
            o.booked_cents,
            o.repaired_cents,
            o.leaked_cents,
            o.lost_cents,
            o.doubled_cents,
            if o.ok { "ok" } else { "FAIL" },
            o.seconds
        ));
    }
    s
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let root = std::env::current_dir()?;
    let data = root.join(&args.data);
    std::fs::create_dir_all(&data)?;
    let servers = Servers {
        root: root.clone(),
        data: data.clone(),
        redis_port: args.redis_port,
        mysql_port: args.mysql_port,
    };
    servers.services("start", "redis")?;
    servers.services("start", "mysql")?;
    let bin = root.join(&args.bin);
    let keys = data.join("keys");
    if !keys.exists() {
        let out = Command::new(&bin)
            .args(["keys", "generate"])
            .env("RPW_KEYS__DIR", &keys)
            .output()?;
        if !out.status.success() {
            bail!("keys generate: {}", String::from_utf8_lossy(&out.stderr));
        }
    }
    let dir = data.join("logs");
    std::fs::create_dir_all(&dir)?;
    let run = Run {
        args: &args,
        servers: &servers,
        bin,
        keys,
        dir,
    };
    let first_seed = args
        .seed
        .unwrap_or_else(|| chrono::Utc::now().timestamp() as u64);
    let scenarios: Vec<&Scenario> = SCENARIOS
        .iter()
        .filter(|s| args.scenario.as_deref().is_none_or(|n| n == s.name))
        .filter(|s| args.cluster.is_none() || !OWN_REDIS.contains(&s.name))
        .collect();
    if scenarios.is_empty() {
        bail!(
            "no scenario named {:?}; there are: {}",
            args.scenario,
            SCENARIOS
                .iter()
                .map(|s| s.name)
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    let mut outcomes = Vec::new();
    for sc in scenarios {
        for k in 0..args.seeds {
            let seed = first_seed + k;
            eprintln!("[chaos] {} (seed {seed}): {}", sc.name, sc.what);
            let outcome = match run.scenario(sc, seed).await {
                Ok(o) => o,
                Err(err) => Outcome {
                    scenario: sc.name.to_string(),
                    seed,
                    violations: vec![format!("harness error: {err:#}")],
                    ..Default::default()
                },
            };
            if !outcome.ok {
                eprintln!(
                    "[chaos] FAIL {} seed {seed}; faults {:?}",
                    sc.name, outcome.faults
                );
                for v in outcome.violations.iter().take(10) {
                    eprintln!("[chaos]   {v}");
                }
            }
            outcomes.push(outcome);
        }
    }
    let _ = servers.services("stop", "all");
    println!("{}", table(&outcomes));
    if let Some(path) = &args.json {
        std::fs::write(
            path,
            serde_json::to_string_pretty(&json!({ "runs": outcomes }))?,
        )?;
    }
    if outcomes.iter().all(|o| o.ok) {
        Ok(())
    } else {
        std::process::exit(1)
    }
}
