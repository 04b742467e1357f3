//! Redis Cluster: a failover in the middle of a burst, on a cluster of the test's own
//! (three masters with one replica each, started here and killed for real).

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::helpers::*;

/// Three masters and three replicas on loopback, with a short node timeout so a killed
/// master is replaced within seconds.
pub struct PrivateCluster {
    children: Vec<Option<std::process::Child>>,
    pub ports: Vec<u16>,
    dir: PathBuf,
}

/// A port whose cluster bus port (+10000) is free too.
fn cluster_port(taken: &[u16]) -> u16 {
    loop {
        let port = 20_000 + (rand::random::<u16>() % 25_000);
        if taken.contains(&port) {
            continue;
        }
        let free = |p: u16| std::net::TcpListener::bind(("127.0.0.1", p)).is_ok();
        if free(port) && free(port + 10_000) {
            return port;
        }
    }
}

fn redis_cli(port: u16, args: &[&str]) -> String {
    let out = std::process::Command::new("redis-cli")
        .arg("-p")
        .arg(port.to_string())
        .args(args)
        .output()
        .expect("redis-cli is installed with redis-server");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

impl PrivateCluster {
    pub fn start() -> Self {
        let dir = std::env::temp_dir().join(format!("rpw-cluster-{:08x}", rand::random::<u32>()));
        let mut ports = Vec::new();
        for _ in 0..6 {
            let p = cluster_port(&ports);
            ports.push(p);
        }
        let mut children = Vec::new();
        for port in &ports {
            let node_dir = dir.join(port.to_string());
            std::fs::create_dir_all(&node_dir).unwrap();
            let child = std::process::Command::new("redis-server")
                .args([
                    "--port",
                    &port.to_string(),
                    "--bind",
                    "127.0.0.1",
                    "--save",
                    "",
                ])
                .args(["--appendonly", "yes", "--appendfsync", "everysec"])
                .args(["--cluster-enabled", "yes", "--cluster-node-timeout", "1000"])
                .args(["--cluster-replica-validity-factor", "0"])
                .arg("--dir")
                .arg(&node_dir)
                .stdout(std::process::Stdio::null())
                .spawn()
                .expect("redis-server is installed by scripts/services.sh");
            children.push(Some(child));
        }
        for port in &ports {
            for _ in 0..100 {
                if redis_cli(*port, &["PING"]).contains("PONG") {
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        let nodes: Vec<String> = ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
        let created = std::process::Command::new("redis-cli")
            .args(["--cluster", "create"])
            .args(&nodes)
            .args(["--cluster-replicas", "1", "--cluster-yes"])
            .output()
            .unwrap();
        assert!(created.status.success(), "{created:?}");
        let cluster = Self {
            children,
            ports,
            dir,
        };
        cluster.wait_ok(Duration::from_secs(30));
        cluster.wait_replicas(Duration::from_secs(30));
        cluster
    }

    /// Waits until every replica has finished its first sync with its master.
    pub fn wait_replicas(&self, within: Duration) {
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            let synced = self.alive().all(|(_, p)| {
                let info = redis_cli(p, &["INFO", "replication"]);
                info.contains("role:master") || info.contains("master_link_status:up")
            });
            if synced && self.masters().len() == 3 {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("the replicas did not sync within {within:?}");
    }

    pub fn urls(&self) -> String {
        self.ports
            .iter()
            .map(|p| format!("redis://127.0.0.1:{p}"))
            .collect::<Vec<_>>()
            .join(",")
    }

    fn alive(&self) -> impl Iterator<Item = (usize, u16)> + '_ {
        self.ports
            .iter()
            .enumerate()
            .filter(|(i, _)| self.children[*i].is_some())
            .map(|(i, p)| (i, *p))
    }

    /// Waits until every live node says the cluster is ok.
    pub fn wait_ok(&self, within: Duration) {
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if self
                .alive()
                .all(|(_, p)| redis_cli(p, &["CLUSTER", "INFO"]).contains("cluster_state:ok"))
            {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("the cluster did not become ok within {within:?}");
    }

    /// The ports of the live masters.
    pub fn masters(&self) -> Vec<u16> {
        self.alive()
            .filter(|(_, p)| redis_cli(*p, &["ROLE"]).starts_with("master"))
            .map(|(_, p)| p)
            .collect()
    }

    /// The port of the replica of the master on `port`.
    pub fn replica_of(&self, port: u16) -> u16 {
        let id = redis_cli(port, &["CLUSTER", "MYID"]).trim().to_string();
        let nodes = redis_cli(port, &["CLUSTER", "NODES"]);
        let line = nodes
            .lines()
            .find(|l| l.contains("slave") && l.contains(&id))
            .expect("the master has a replica");
        let addr = line.split_whitespace().nth(1).unwrap();
        addr.split(['@', ':']).nth(1).unwrap().parse().unwrap()
    }

    /// `kill -9` of the node on `port`.
    pub fn kill(&mut self, port: u16) {
        let i = self.ports.iter().position(|p| *p == port).unwrap();
        if let Some(mut child) = self.children[i].take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for PrivateCluster {
    fn drop(&mut self) {
        for i in 0..self.ports.len() {
            if let Some(mut child) = self.children[i].take() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// What the burst's clients hold: per user, the tokens they were given, with amounts.
type Held = Arc<Mutex<HashMap<i64, Vec<(String, i64)>>>>;

/// Posts batches of fresh awards until `stop`, noting when a batch had an award
/// accepted; returns (accepted, refused).
async fn burst(
    t: Arc<TestApp>,
    worker: i64,
    held: Held,
    stop: Arc<AtomicBool>,
    accepted_at: Arc<Mutex<Vec<Instant>>>,
) -> (usize, usize) {
    let (mut ok, mut refused) = (0, 0);
    let mut rain = 0;
    while !stop.load(Ordering::Relaxed) {
        rain += 1;
        let awards: Vec<Value> = (0..20)
            .map(|k| award(1 + worker * 1_000 + k, rain, 1 + (k + rain) % 50))
            .collect();
        let (status, body) = t
            .post("/v1/awards:batch", CALLER, &json!({ "awards": awards }))
            .await;
        if status != 200 {
            refused += awards.len();
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        }
        let mut any = false;
        for (a, r) in awards.iter().zip(body["results"].as_array().unwrap()) {
            match r["token"].as_str() {
                Some(token) => {
                    any = true;
                    ok += 1;
                    held.lock()
                        .unwrap()
                        .entry(a["user_id"].as_i64().unwrap())
                        .or_default()
                        .push((token.to_string(), a["amount_cents"].as_i64().unwrap()));
                }
                None => refused += 1,
            }
        }
        if any {
            accepted_at.lock().unwrap().push(Instant::now());
        }
    }
    (ok, refused)
}

/// Item 4 of the scale-out issue: a master is killed mid-burst; its replica takes over;
/// issuing goes on after the failover window; what the failover lost is restored by
/// the clients' sync; nothing is over-issued and every token a client holds is booked
/// exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_master_killed_mid_burst_fails_over_and_no_money_is_lost_or_minted() {
    let mut cluster = PrivateCluster::start();
    let t = Arc::new(
        spawn_app_with(Options {
            cluster_urls: Some(cluster.urls()),
            ..Default::default()
        })
        .await,
    );
    let budget = 5_000_000;
    t.open_activity("cny2027", budget, 100).await;

    let held: Held = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let accepted_at: Arc<Mutex<Vec<Instant>>> = Arc::default();
    let tasks: Vec<_> = (0..4)
        .map(|w| {
            tokio::spawn(burst(
                t.clone(),
                w,
                held.clone(),
                stop.clone(),
                accepted_at.clone(),
            ))
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    let before_kill = held.lock().unwrap().values().map(Vec::len).sum::<usize>();
    assert!(before_kill > 0, "the burst issued nothing before the kill");

    // The victim's replica loses its replication link and cannot get it back (it now
    // authenticates with a password its master does not have), so the writes of the
    // last moment before the kill never reach it: the failover loses them for real.
    let victim = cluster
        .masters()
        .into_iter()
        .max_by_key(|p| {
            redis_cli(*p, &["DBSIZE"])
                .trim()
                .parse::<u64>()
                .unwrap_or(0)
        })
        .unwrap();
    let replica = cluster.replica_of(victim);
    redis_cli(
        replica,
        &["CONFIG", "SET", "masterauth", "not-the-password"],
    );
    redis_cli(replica, &["CLIENT", "KILL", "TYPE", "master"]);
    tokio::time::sleep(Duration::from_millis(600)).await;
    let killed_at = Instant::now();
    cluster.kill(victim);
    // The failover is over when three masters serve every slot again.
    let deadline = Instant::now() + Duration::from_secs(30);
    while cluster.masters().len() < 3 {
        assert!(
            Instant::now() < deadline,
            "no replica took over within 30 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    cluster.wait_ok(Duration::from_secs(30));
    let failover = killed_at.elapsed();
    // The service issues again after the failover window.
    let deadline = Instant::now() + Duration::from_secs(30);
    let resumed = loop {
        let after: Vec<Instant> = accepted_at
            .lock()
            .unwrap()
            .iter()
            .filter(|at| **at > killed_at + failover)
            .copied()
            .collect();
        if after.len() >= 3 {
            break after[0] - killed_at;
        }
        assert!(
            Instant::now() < deadline,
            "no award issued within 30 s after the failover"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);
    let mut refused = 0;
    for task in tasks {
        refused += task.await.unwrap().1;
    }
    println!(
        "failover: master {victim} killed; a replica took over after {failover:?}; issuing resumed {resumed:?} after the kill; {refused} awards refused meanwhile"
    );

    // Every client syncs what it holds; then everything is booked.
    let held = held.lock().unwrap().clone();
    let lists: HashMap<i64, Vec<String>> = held
        .iter()
        .map(|(u, tokens)| (*u, tokens.iter().map(|(t, _)| t.clone()).collect()))
        .collect();
    let restored = sync_all(&t, &lists).await;
    t.drain().await;

    let rows: Vec<(String, i64, i64)> = sqlx::query_as(
        "SELECT CAST(out_trade_no AS CHAR), amount_cents, user_id FROM ledger_entries WHERE kind = 'award'",
    )
    .fetch_all(t.app.db.main())
    .await
    .unwrap();
    let booked: HashSet<&str> = rows.iter().map(|r| r.0.as_str()).collect();
    assert_eq!(booked.len(), rows.len(), "an award booked twice");
    let booked_cents: i64 = rows.iter().map(|r| r.1).sum();
    assert!(
        booked_cents <= budget,
        "over-issued: {booked_cents} > {budget}"
    );
    let mut held_count = 0;
    for (user, tokens) in &held {
        let mut cents = 0;
        for (token, amount) in tokens {
            let otn = token_otn(token);
            assert!(
                booked.contains(otn.as_str()),
                "a token user {user} holds was lost: {otn}"
            );
            cents += amount;
            held_count += 1;
        }
        // The wallet shows exactly what the ledger holds for the user, all booked.
        let wallet = t.wallet(*user).await;
        let ledger: i64 = rows.iter().filter(|r| r.2 == *user).map(|r| r.1).sum();
        assert_eq!(wallet["balance_cents"], ledger, "{wallet}");
        assert_eq!(wallet["pending_count"], 0, "{wallet}");
        assert!(
            ledger >= cents,
            "user {user}: ledger {ledger} < held {cents}"
        );
    }
    let (_, view) = t.get("/v1/admin/activities/cny2027", Some(ADMIN)).await;
    let taken = view["budget_taken_cents"].as_i64().unwrap();
    assert!(taken <= budget, "{view}");
    assert!(
        restored > 0,
        "the failover lost nothing: the test did not test sync"
    );
    println!(
        "failover: {held_count} tokens held by clients, {} booked ({booked_cents} cents), {restored} restored by sync; in doubt {} cents",
        rows.len(),
        view["budget_in_doubt_cents"]
    );
    Arc::try_unwrap(t)
        .ok()
        .expect("no task holds the app")
        .stop()
        .await;
}
