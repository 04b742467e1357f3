//! `spawn_app()`: a fresh MySQL database, a fresh Redis key prefix, a fresh keys
//! directory and a server on a port-0 listener, per test, so tests run in parallel
//! against the real Redis and MariaDB that scripts/services.sh starts.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

use redpacket_wallet::app::{App, RunOptions, Running};
use redpacket_wallet::config::Settings;
use redpacket_wallet::domain::UserId;
use redpacket_wallet::settle::worker::{Outcome, Worker, WorkerOptions};
use serde_json::{json, Value};

pub const ADMIN: &str = "test-admin-key-0001";
pub const CALLER: &str = "test-caller-key-0001";
pub const JWT_SECRET: &str = "test-jwt-secret-0001";

pub fn redis_url() -> String {
    std::env::var("RPW_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

/// Seed nodes of a Redis Cluster to run against, when the suite runs on one.
pub fn cluster_urls() -> Option<String> {
    std::env::var("RPW_TEST_REDIS_CLUSTER_URLS")
        .ok()
        .filter(|u| !u.is_empty())
}

pub fn mysql_base_url() -> String {
    std::env::var("RPW_TEST_MYSQL_URL")
        .unwrap_or_else(|_| "mysql://rpw:rpw@127.0.0.1:3306/rpw".into())
}

/// The server URL with the database name replaced.
pub fn mysql_url_for(db: &str) -> String {
    let base = mysql_base_url();
    let cut = base.rfind('/').expect("mysql url has a path");
    format!("{}/{}", &base[..cut], db)
}

pub struct TestApp {
    pub running: Option<Running>,
    pub app: Arc<App>,
    pub url: String,
    pub client: reqwest::Client,
    pub db_name: String,
    pub keys_dir: PathBuf,
    pub prefix: String,
    /// What the instance was started with, so [`TestApp::restart`] can start it again.
    env: Vec<(String, String)>,
    redis_url: Option<String>,
    worker: bool,
    cron: bool,
}

#[derive(Default)]
pub struct Options {
    pub env: Vec<(String, String)>,
    pub worker: bool,
    /// A prepared keys directory; a fresh one with one key when `None`.
    pub keys_dir: Option<PathBuf>,
    /// Another MySQL (a test-owned server); a fresh database on the shared one when `None`.
    pub mysql_url: Option<String>,
    /// Another Redis (a test-owned server).
    pub redis_url: Option<String>,
    /// A Redis Cluster of the test's own (seed node URLs, comma-separated).
    pub cluster_urls: Option<String>,
    /// Start without applying migrations (for a MySQL that is not there).
    pub skip_migrations: bool,
    /// Run the cron scheduler too.
    pub cron: bool,
}

pub async fn create_database() -> String {
    let name = format!("rpw_t_{:016x}", rand::random::<u64>());
    let pool = sqlx::MySqlPool::connect(&mysql_base_url())
        .await
        .expect("connect to mysql (run scripts/services.sh)");
    sqlx::query(&format!("CREATE DATABASE `{name}`"))
        .execute(&pool)
        .await
        .unwrap();
    pool.close().await;
    name
}

pub fn test_settings(
    db_name: &str,
    prefix: &str,
    keys_dir: &std::path::Path,
    extra: &[(String, String)],
) -> Settings {
    let mut env: Vec<(String, String)> = vec![
        ("RPW_HTTP__ADDR", "127.0.0.1:0".to_string()),
        ("RPW_HTTP__SHUTDOWN_TIMEOUT_MS", "2000".to_string()),
        ("RPW_REDIS__URL", redis_url()),
        ("RPW_REDIS__KEY_PREFIX", prefix.to_string()),
        ("RPW_REDIS__PARTITIONS", "4".to_string()),
        ("RPW_REDIS__CONNECTIONS", "2".to_string()),
        ("RPW_MYSQL__URL", mysql_url_for(db_name)),
        ("RPW_MYSQL__MAX_CONNECTIONS", "16".to_string()),
        ("RPW_AUTH__ADMIN_KEY", ADMIN.to_string()),
        ("RPW_AUTH__CALLER_KEYS", format!("upstream:{CALLER}")),
        // The test caller plays the payout channel too, unless a test says otherwise.
        ("RPW_AUTH__PAYOUT_CALLERS", "upstream".to_string()),
        ("RPW_AUTH__JWT_SECRET", JWT_SECRET.to_string()),
        ("RPW_KEYS__DIR", keys_dir.display().to_string()),
        ("RPW_SETTLE__MAX_TPS", "0".to_string()),
        ("RPW_SETTLE__CLAIM_IDLE_MS", "60000".to_string()),
        ("RPW_ISSUE__CACHE_REFRESH_MS", "200".to_string()),
        ("RPW_ISSUE__STATS_FLUSH_MS", "200".to_string()),
        // A shadow app (its own database) is built only where a test asks for it.
        ("RPW_SHADOW__ENABLED", "false".to_string()),
        // Tests restart and flush Redis servers of their own every few seconds; the quiet
        // period after a Redis loss is set by the tests of it.
        ("RPW_WALLET__IDENTITY_QUIET_MS", "0".to_string()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    // The cluster pass of scripts/test.sh runs the suite on a Redis Cluster.
    if let Some(urls) = cluster_urls() {
        env.push(("RPW_REDIS__CLUSTER_URLS".into(), urls));
    }
    env.extend(extra.iter().cloned());
    Settings::load_with(None, env).expect("test settings")
}

pub fn temp_keys_dir() -> PathBuf {
    let dir = std::env::temp_dir().join(format!("rpw-test-keys-{:016x}", rand::random::<u64>()));
    redpacket_wallet::keys::generate(&dir).unwrap();
    dir
}

pub async fn spawn_app() -> TestApp {
    spawn_app_with(Options::default()).await
}

static TRACING: std::sync::Once = std::sync::Once::new();

/// Logs go to the test output when RUST_LOG is set.
pub fn init_tracing() {
    TRACING.call_once(|| {
        if let Ok(filter) = std::env::var("RUST_LOG") {
            let _ = tracing_subscriber::fmt()
                .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
                .with_test_writer()
                .try_init();
        }
    });
}

/// An instance whose ledger is sharded over two databases: a fresh one of its own and
/// a second fresh one.
pub async fn spawn_two_shards() -> TestApp {
    let second = create_database().await;
    spawn_app_with(Options {
        env: vec![("RPW_MYSQL__SHARD_URLS".into(), mysql_url_for(&second))],
        ..Default::default()
    })
    .await
}

/// An instance on a Redis of the test's own (to flush, kill or restart it).
pub async fn spawn_on(redis: &PrivateRedis) -> TestApp {
    spawn_app_with(Options {
        redis_url: Some(redis.url()),
        ..Default::default()
    })
    .await
}

pub async fn spawn_app_with(options: Options) -> TestApp {
    init_tracing();
    let db_name = match options.mysql_url {
        Some(_) => "rpw".to_string(),
        None => create_database().await,
    };
    let prefix = format!("t{:012x}", rand::random::<u64>() & 0xffff_ffff_ffff);
    let keys_dir = options.keys_dir.clone().unwrap_or_else(temp_keys_dir);
    let mut settings = test_settings(&db_name, &prefix, &keys_dir, &options.env);
    if let Some(url) = &options.mysql_url {
        settings.mysql.url = redpacket_wallet::config::Secret::new(url.clone());
    }
    if let Some(url) = &options.redis_url {
        // A Redis of the test's own (to flush or kill it) is a single node.
        settings.redis.cluster_urls.clear();
        settings.redis.url = redpacket_wallet::config::Secret::new(url.clone());
    }
    if let Some(urls) = &options.cluster_urls {
        settings.redis.cluster_urls = urls
            .split(',')
            .map(|u| redpacket_wallet::config::Secret::new(u.to_string()))
            .collect();
    }
    let app = App::build(settings, !options.skip_migrations)
        .await
        .expect("app builds");
    let running = Running::start(
        app.clone(),
        RunOptions {
            http: true,
            worker: options.worker,
            cron: options.cron,
        },
    )
    .await
    .expect("app starts");
    let url = running.url();
    TestApp {
        running: Some(running),
        app,
        url,
        client: reqwest::Client::builder()
            .pool_max_idle_per_host(64)
            .build()
            .unwrap(),
        db_name,
        keys_dir,
        prefix,
        env: options.env,
        redis_url: options.redis_url,
        worker: options.worker,
        cron: options.cron,
    }
}

impl TestApp {
    /// Stops this instance and starts it again on the same database, Redis, key prefix
    /// and keys, with `extra` settings on top of the first ones (a restart with a
    /// changed configuration).
    pub async fn restart(&mut self, extra: &[(&str, &str)]) {
        if let Some(r) = self.running.take() {
            r.stop().await;
        }
        self.env
            .extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        let mut settings = test_settings(&self.db_name, &self.prefix, &self.keys_dir, &self.env);
        if let Some(url) = &self.redis_url {
            settings.redis.cluster_urls.clear();
            settings.redis.url = redpacket_wallet::config::Secret::new(url.clone());
        }
        let app = App::build(settings, true).await.expect("app builds again");
        let running = Running::start(
            app.clone(),
            RunOptions {
                http: true,
                worker: self.worker,
                cron: self.cron,
            },
        )
        .await
        .expect("app starts again");
        self.url = running.url();
        self.app = app;
        self.running = Some(running);
    }

    /// Stops the server and removes what the test created (its database, its keys).
    pub async fn stop(mut self) {
        if let Some(r) = self.running.take() {
            r.stop().await;
        }
        // The test's databases: its own, its shadow, and the further shards it was given.
        let shards = self
            .env
            .iter()
            .filter(|(k, _)| k == "RPW_MYSQL__SHARD_URLS")
            .flat_map(|(_, urls)| urls.split(','))
            .filter_map(|url| url.rsplit('/').next())
            .map(str::to_string);
        let mut dbs = vec![self.db_name.clone(), format!("{}_shadow", self.db_name)];
        dbs.extend(shards);
        for db in dbs.iter().filter(|db| db.starts_with("rpw_t_")) {
            let _ = sqlx::query(&format!("DROP DATABASE IF EXISTS `{db}`"))
                .execute(self.app.db.main())
                .await;
        }
        let _ = std::fs::remove_dir_all(&self.keys_dir);
        let mut conn = self.app.redis.conn();
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg(format!("{}*", self.prefix))
            .query_async(&mut conn)
            .await
            .unwrap_or_default();
        if !keys.is_empty() {
            let _: redis::RedisResult<()> =
                redis::cmd("DEL").arg(&keys).query_async(&mut conn).await;
        }
    }

    pub fn jwt(&self, user: i64) -> String {
        self.app
            .auth
            .issue_user_jwt(UserId::parse(user).unwrap(), 3600)
            .unwrap()
    }

    pub async fn send(
        &self,
        method: reqwest::Method,
        path: &str,
        bearer: &str,
        body: &Value,
    ) -> (u16, Value) {
        let resp = self
            .client
            .request(method, format!("{}{}", self.url, path))
            .bearer_auth(bearer)
            .json(body)
            .send()
            .await
            .expect("request sent");
        let status = resp.status().as_u16();
        (status, resp.json::<Value>().await.unwrap_or(Value::Null))
    }

    pub async fn post(&self, path: &str, bearer: &str, body: &Value) -> (u16, Value) {
        self.send(reqwest::Method::POST, path, bearer, body).await
    }

    pub async fn put(&self, path: &str, bearer: &str, body: &Value) -> (u16, Value) {
        self.send(reqwest::Method::PUT, path, bearer, body).await
    }

    pub async fn get(&self, path: &str, bearer: Option<&str>) -> (u16, Value) {
        let mut req = self.client.get(format!("{}{}", self.url, path));
        if let Some(b) = bearer {
            req = req.bearer_auth(b);
        }
        let resp = req.send().await.expect("request sent");
        let status = resp.status().as_u16();
        (status, resp.json::<Value>().await.unwrap_or(Value::Null))
    }

    /// Creates an open activity (started a minute ago, ends in an hour) with one scene
    /// `rain` awarding `cash`.
    pub async fn open_activity(&self, id: &str, budget_cents: i64, max_award_cents: i64) {
        self.activity_with_window(id, "live", budget_cents, max_award_cents, -60, 3600)
            .await;
        self.scene(id, "rain", "cash").await;
    }

    pub async fn activity_with_window(
        &self,
        id: &str,
        stage: &str,
        budget: i64,
        cap: i64,
        start_offset_s: i64,
        end_offset_s: i64,
    ) {
        let now = chrono::Utc::now();
        let (status, body) = self
            .post(
                "/v1/admin/activities",
                ADMIN,
                &json!({
                    "id": id, "name": "New Year rain", "stage": stage,
                    "starts_at": (now + chrono::Duration::seconds(start_offset_s)).to_rfc3339(),
                    "ends_at": (now + chrono::Duration::seconds(end_offset_s)).to_rfc3339(),
                    "budget_cents": budget, "max_award_cents": cap
                }),
            )
            .await;
        assert_eq!(status, 201, "{body}");
    }

    pub async fn scene(&self, activity: &str, scene: &str, award_type: &str) {
        let (status, body) = self
            .post(
                &format!("/v1/admin/activities/{activity}/scenes"),
                ADMIN,
                &json!({"id": scene, "name": "Cash rain", "award_type": award_type}),
            )
            .await;
        assert_eq!(status, 201, "{body}");
    }

    pub async fn wallet(&self, user: i64) -> Value {
        let (status, body) = self.get("/v1/wallet", Some(&self.jwt(user))).await;
        assert_eq!(status, 200, "{body}");
        body
    }

    pub fn worker(&self, consumer: &str) -> Worker {
        Worker::new(
            self.app.settler.clone(),
            WorkerOptions {
                consumer: consumer.to_string(),
                batch_size: 200,
                claim_idle: std::time::Duration::from_millis(60_000),
                stop_after_commit: false,
            },
        )
    }

    /// Sets the `booking_paused` switch through the operator API (this instance's
    /// worker sees it at once).
    pub async fn pause_booking(&self, on: bool) {
        let (status, body) = self
            .put(
                "/v1/admin/switches/booking_paused",
                ADMIN,
                &serde_json::json!({ "on": on }),
            )
            .await;
        assert_eq!(status, 200, "{body}");
    }

    /// Books everything pending with a fresh worker, until every partition is empty.
    pub async fn drain(&self) -> usize {
        let mut worker = self.worker("drain");
        let mut booked = 0;
        for p in 0..self.app.redis.partitions() {
            while let Outcome::Booked { newly_booked, .. } =
                worker.try_execute_batch(p).await.expect("batch")
            {
                booked += newly_booked;
            }
        }
        booked
    }

    /// The `GET /metrics` page.
    pub async fn metrics_text(&self) -> String {
        self.client
            .get(format!("{}/metrics", self.url))
            .send()
            .await
            .expect("request sent")
            .text()
            .await
            .expect("a text body")
    }

    /// Every Redis key under this test's prefix, with a dump of its value; but the
    /// shared stats counters, which a background flush writes every 200 ms for awards
    /// issued earlier (a snapshot around one request would otherwise see a flush that
    /// lands between its two readings).
    pub async fn redis_snapshot(&self) -> Vec<(String, Vec<u8>)> {
        let mut conn = self.app.redis.conn();
        let mut keys: Vec<String> = redis::cmd("KEYS")
            .arg(format!("{}*", self.prefix))
            .query_async(&mut conn)
            .await
            .unwrap();
        keys.retain(|k| !k.contains(":stats:"));
        keys.sort();
        let mut out = Vec::new();
        for k in keys {
            let dump: Option<Vec<u8>> = redis::cmd("DUMP")
                .arg(&k)
                .query_async(&mut conn)
                .await
                .unwrap();
            out.push((k, dump.unwrap_or_default()));
        }
        out
    }

    /// The budget figures of `activity`, as the operator API computes them.
    pub async fn budget_figures(&self, activity: &str) -> redpacket_wallet::budget::BudgetFigures {
        self.app
            .budget
            .figures(&self.app.redis, &self.app.db, activity)
            .await
            .unwrap()
    }

    pub async fn sql_i64(&self, sql: &str) -> i64 {
        let row: (i64,) = sqlx::query_as(sql)
            .fetch_one(self.app.db.main())
            .await
            .unwrap();
        row.0
    }
}

/// A Redis server owned by one test, so the test can kill it for real.
pub struct PrivateRedis {
    child: Option<std::process::Child>,
    pub port: u16,
    dir: PathBuf,
    aof: bool,
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl PrivateRedis {
    /// A Redis without persistence.
    pub fn start() -> Self {
        Self::start_with(false)
    }

    /// A Redis with the shipped persistence (AOF, `appendfsync everysec`), so a
    /// `kill -9` and [`PrivateRedis::restart`] come back from its AOF, missing up to
    /// the last second.
    pub fn start_with_aof() -> Self {
        Self::start_with(true)
    }

    fn start_with(aof: bool) -> Self {
        let port = free_port();
        let dir =
            std::env::temp_dir().join(format!("rpw-redis-{port}-{:08x}", rand::random::<u32>()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut redis = Self {
            child: None,
            port,
            dir,
            aof,
        };
        redis.spawn();
        redis
    }

    fn spawn(&mut self) {
        let child = std::process::Command::new("redis-server")
            .args([
                "--port",
                &self.port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                if self.aof { "yes" } else { "no" },
                "--appendfsync",
                "everysec",
            ])
            .arg("--dir")
            .arg(&self.dir)
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("redis-server is installed by scripts/services.sh");
        for _ in 0..100 {
            if std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        self.child = Some(child);
    }

    /// `kill -9`, then a new process on the same port and data directory.
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }

    /// Loses everything this Redis holds, for real.
    pub async fn flushall(&self) {
        let client = redis::Client::open(self.url()).unwrap();
        let mut conn = client.get_multiplexed_async_connection().await.unwrap();
        let _: () = redis::cmd("FLUSHALL").query_async(&mut conn).await.unwrap();
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for PrivateRedis {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A MariaDB instance owned by one test (started by scripts/services.sh on its own port
/// and data directory), so the test can stop it for real and start it again.
pub struct PrivateMariadb {
    pub port: u16,
    data_dir: PathBuf,
}

impl PrivateMariadb {
    fn services(&self, action: &str) {
        let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("scripts/services.sh");
        let out = std::process::Command::new("bash")
            .arg(script)
            .arg(action)
            .arg("mysql")
            .env("RPW_MYSQL_PORT", self.port.to_string())
            .env("RPW_DATA_DIR", &self.data_dir)
            .output()
            .expect("run scripts/services.sh");
        assert!(
            out.status.success(),
            "services.sh {action} mysql failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    pub fn start() -> Self {
        let port = free_port();
        let data_dir =
            std::env::temp_dir().join(format!("rpw-mariadb-{port}-{:08x}", rand::random::<u32>()));
        let db = Self { port, data_dir };
        db.services("start");
        db
    }

    pub fn url(&self) -> String {
        format!("mysql://rpw:rpw@127.0.0.1:{}/rpw", self.port)
    }

    pub fn stop(&self) {
        self.services("stop");
    }

    pub fn restart(&self) {
        self.services("start");
    }
}

impl Drop for PrivateMariadb {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.data_dir);
    }
}

/// An award for the test activity `cny2027` (scene `rain`, cash).
pub fn award(user: i64, rain: i64, amount: i64) -> Value {
    json!({"user_id": user, "app_id": 1, "activity_id": "cny2027", "scene_id": "rain",
           "rain_id": rain, "award_type": "cash", "amount_cents": amount})
}

/// Issues `awards` through the batch endpoint, 1,000 per request; every one must be
/// issued. Returns the results in request order.
pub async fn issue_all(t: &TestApp, awards: Vec<Value>) -> Vec<Value> {
    let mut out = Vec::with_capacity(awards.len());
    for chunk in awards.chunks(1000) {
        let (status, body) = t
            .post("/v1/awards:batch", CALLER, &json!({"awards": chunk}))
            .await;
        assert_eq!(status, 200, "{body}");
        for r in body["results"].as_array().unwrap() {
            assert!(r["error"].is_null(), "{r}");
            out.push(r.clone());
        }
    }
    out
}

/// Every client sends the tokens it holds to `tokens:sync`; none may be rejected.
/// Returns how many the server restored.
pub async fn sync_all(t: &TestApp, held: &HashMap<i64, Vec<String>>) -> i64 {
    let mut restored = 0;
    for (user, tokens) in held {
        let (status, body) = t
            .post(
                "/v1/wallet/tokens:sync",
                &t.jwt(*user),
                &json!({ "tokens": tokens }),
            )
            .await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["rejected"], json!([]), "{body}");
        restored += body["restored"].as_i64().unwrap();
    }
    restored
}

/// The out_trade_no inside a token as the API returns it (base64).
pub fn token_otn(token: &str) -> String {
    use base64::Engine;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(token)
        .unwrap();
    redpacket_wallet::token::decode_trusted(&bytes)
        .unwrap()
        .out_trade_no
}

/// The current hour, once it is not within 30 s of its end (the test's figures then
/// fall in it).
pub async fn an_hour_to_work_in() -> String {
    let into_hour = redpacket_wallet::store::now_ms() % 3_600_000;
    if into_hour > 3_600_000 - 30_000 {
        tokio::time::sleep(std::time::Duration::from_millis(
            (3_600_000 - into_hour + 100) as u64,
        ))
        .await;
    }
    redpacket_wallet::store::hour_of(redpacket_wallet::store::now_ms())
}
