//! The run's summary: typed figures per scenario (written by `--json`), the targets
//! table printed at the end, and the conservation verdict.

use std::fmt;
use std::path::Path;

use std::collections::BTreeMap;

use serde::Serialize;

use crate::product::Reconciliation;

/// Rates and latencies are reported to two decimals.
pub fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

/// Everything a run measured. Field names are the JSON's.
#[derive(Debug, Serialize)]
pub struct Summary {
    pub quick: bool,
    /// How the bench spoke to the server: `http1.1` or `h2c`.
    pub protocol: String,
    /// The server's tokio worker threads when set (`--server-threads`); `null`: one per
    /// core, the default.
    pub server_threads: Option<usize>,
    pub ceiling: Ceiling,
    pub sync_baseline: SyncBaseline,
    pub http_floor: HttpFloor,
    pub rain_single: RainSingle,
    pub rain_batch: RainBatch,
    pub withdraw: Withdraw,
    pub view: View,
    pub drain: Drain,
    pub conservation: Conservation,
    /// Per scenario, µs of CPU per item (award issued, token booked, view answered) of
    /// each process under test (`RPW_BENCH_PIDS`; `bench` is the load clients and the
    /// in-process drain worker).
    pub cpu_us_per_item: BTreeMap<String, BTreeMap<String, f64>>,
}

/// The physical ceiling: Ed25519 signatures per second on one core.
#[derive(Debug, Serialize)]
pub struct Ceiling {
    pub cores: usize,
    pub sign_per_s_per_core: f64,
}

/// One MySQL transaction per award, with the service's booking code.
#[derive(Debug, Serialize)]
pub struct SyncBaseline {
    pub awards_per_s: f64,
    pub errors: u64,
}

/// `POST /v1/awards`, one award per request.
#[derive(Debug, Serialize)]
pub struct RainSingle {
    pub awards: u64,
    pub awards_per_s: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub errors: u64,
    pub redis: RedisCost,
}

/// Redis work per accepted award during a scenario, from `INFO commandstats` and
/// `INFO cpu` of the masters before and after it: command time (µs), commands, and the
/// masters' CPU time (µs, networking included).
#[derive(Debug, Clone, Default, Serialize)]
pub struct RedisCost {
    /// The commands that took the most command time, per item, most first (at most 8).
    pub commands: Vec<CommandCost>,
    pub usec_per_award: f64,
    pub commands_per_award: f64,
    pub cpu_usec_per_award: f64,
    pub net_in_bytes_per_award: f64,
    pub net_out_bytes_per_award: f64,
}

/// One Redis command's share of a scenario, per item (`INFO commandstats`).
#[derive(Debug, Clone, Default, Serialize)]
pub struct CommandCost {
    pub name: String,
    pub calls_per_item: f64,
    pub usec_per_item: f64,
}

/// `POST /v1/awards:batch`; the latency is per request.
#[derive(Debug, Serialize)]
pub struct RainBatch {
    pub awards: u64,
    /// HTTP body bytes per award, request and answer (protobuf).
    pub request_bytes_per_award: f64,
    pub answer_bytes_per_award: f64,
    pub awards_per_s: f64,
    pub p99_ms: f64,
    pub errors: u64,
    pub redis: RedisCost,
}

/// `POST /v1/withdrawals` by users holding pending tokens (forced settlement).
#[derive(Debug, Serialize)]
pub struct Withdraw {
    pub pending_per_user: i64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    /// The first wave: the withdrawals that start together on a server that has not
    /// withdrawn yet (cold connections and statements).
    pub first_wave_p50_ms: f64,
    pub first_wave_max_ms: f64,
    /// The p99 of the withdrawals after the first wave.
    pub after_first_wave_p99_ms: f64,
}

/// `GET /healthz`: the HTTP floor, with the single rain's client and concurrency.
#[derive(Debug, Serialize)]
pub struct HttpFloor {
    pub requests_per_s: f64,
    pub p99_ms: f64,
    pub errors: u64,
}

/// `GET /v1/wallet` during the backlog.
#[derive(Debug, Serialize)]
pub struct View {
    pub requests: u64,
    pub requests_per_s: f64,
    pub p99_ms: f64,
    /// The share of views the server answered from Redis alone (its
    /// `rpw_wallet_views_total` counters); `null` when its metrics are not its own
    /// (shadow traffic counts no metrics).
    pub from_redis: Option<f64>,
}

/// The settlement worker draining the backlog, bounded then unbounded.
#[derive(Debug, Serialize)]
pub struct Drain {
    pub configured_tps: u32,
    pub measured_tps: f64,
    pub unbounded_tps: f64,
    pub backlog_at_start: i64,
    /// Redis work per token booked by the unbounded drain.
    pub redis: RedisCost,
}

/// Money conserved, as the service's operator API, wallets and reconciliation say.
#[derive(Debug, Serialize)]
pub struct Conservation {
    pub ok: bool,
    pub issued_cents: i64,
    pub booked_cents: i64,
    pub pending_cents: i64,
    pub withdrawn_cents: i64,
    pub issued_count: i64,
    pub booked_count: i64,
    /// Settlement entries left in the streams.
    pub backlog: i64,
    pub budget_taken_cents: i64,
    pub leak_cents: i64,
    /// Wallets of the withdraw scenario's users checked one by one.
    pub wallets_checked: usize,
    /// The service's reconciliation of every hour the run touched.
    pub reconciliation: Vec<Reconciliation>,
    pub problems: Vec<String>,
}

/// One line of the table.
#[derive(Debug, Serialize)]
pub struct Row {
    pub scenario: &'static str,
    pub rate_per_s: Option<f64>,
    pub p50_ms: Option<f64>,
    pub p99_ms: Option<f64>,
    pub errors: Option<u64>,
    pub targets: Vec<Target>,
    pub note: Option<String>,
}

/// A figure against the target the design set for it.
#[derive(Debug, Serialize)]
pub struct Target {
    /// What the value is: `x ceiling`, `ms p99`, ...
    pub measure: &'static str,
    pub value: f64,
    pub bound: Bound,
    pub met: bool,
    #[serde(skip)]
    decimals: usize,
}

#[derive(Debug, Clone, Copy, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Bound {
    AtLeast(f64),
    AtMost(f64),
    /// Within plus or minus this much of zero.
    Within(f64),
    /// No target: the figure is reported (a ratio to the floor or the ceiling).
    Report,
}

impl Target {
    fn new(measure: &'static str, value: f64, bound: Bound, decimals: usize) -> Self {
        let met = match bound {
            Bound::AtLeast(b) => value >= b,
            Bound::AtMost(b) => value <= b,
            Bound::Within(b) => value.abs() <= b,
            Bound::Report => true,
        };
        Self {
            measure,
            value: round2(value),
            bound,
            met,
            decimals,
        }
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let verdict = if self.met { "met" } else { "MISSED" };
        let (d, v, m) = (self.decimals, self.value, self.measure);
        match self.bound {
            Bound::AtLeast(b) => write!(f, "{v:.d$} {m} (target >= {b}) {verdict}"),
            Bound::AtMost(b) => write!(f, "{v:.d$} {m} (target <= {b}) {verdict}"),
            Bound::Within(b) => write!(f, "{v:+.d$} {m} (target within ±{b}) {verdict}"),
            Bound::Report => write!(f, "{v:.d$} {m}"),
        }
    }
}

fn row(scenario: &'static str) -> Row {
    Row {
        scenario,
        rate_per_s: None,
        p50_ms: None,
        p99_ms: None,
        errors: None,
        targets: Vec::new(),
        note: None,
    }
}

impl Summary {
    /// The table: one row per scenario with its targets.
    /// The targets of README "Benchmark"; every rate is also given as a ratio to the
    /// HTTP floor and to the 2-core signing ceiling of the same run.
    pub fn rows(&self) -> Vec<Row> {
        use Bound::{AtLeast, AtMost, Report, Within};
        let ceiling = self.ceiling.cores as f64 * self.ceiling.sign_per_s_per_core;
        let baseline = self.sync_baseline.awards_per_s.max(1e-9);
        let (single, batch, drain) = (&self.rain_single, &self.rain_batch, &self.drain);
        let floor = self.http_floor.requests_per_s.max(1e-9);
        let drift_percent =
            (drain.measured_tps / f64::from(drain.configured_tps.max(1)) - 1.0) * 100.0;
        vec![
            Row {
                rate_per_s: Some(single.awards_per_s),
                p50_ms: Some(single.p50_ms),
                p99_ms: Some(single.p99_ms),
                errors: Some(single.errors),
                targets: vec![
                    Target::new("x http_floor", single.awards_per_s / floor, AtLeast(0.3), 2),
                    Target::new("ms p99", single.p99_ms, AtMost(20.0), 2),
                    Target::new("x ceiling", single.awards_per_s / ceiling, Report, 2),
                    Target::new("x baseline", single.awards_per_s / baseline, Report, 1),
                ],
                ..row("rain_single")
            },
            Row {
                rate_per_s: Some(batch.awards_per_s),
                p99_ms: Some(batch.p99_ms),
                errors: Some(batch.errors),
                targets: vec![
                    Target::new("x ceiling", batch.awards_per_s / ceiling, AtLeast(1.0), 2),
                    Target::new(
                        "x baseline",
                        batch.awards_per_s / baseline,
                        AtLeast(20.0),
                        1,
                    ),
                    Target::new("x http_floor", batch.awards_per_s / floor, Report, 2),
                ],
                ..row("rain_batch")
            },
            Row {
                rate_per_s: Some(self.sync_baseline.awards_per_s),
                errors: Some(self.sync_baseline.errors),
                targets: vec![
                    Target::new("x ceiling", baseline / ceiling, Report, 3),
                    Target::new("x http_floor", baseline / floor, Report, 3),
                ],
                ..row("sync_baseline")
            },
            Row {
                rate_per_s: Some(drain.measured_tps),
                targets: vec![Target::new(
                    "% off configured",
                    drift_percent,
                    Within(5.0),
                    1,
                )],
                note: Some(format!(
                    "configured {}, backlog at start {}",
                    drain.configured_tps, drain.backlog_at_start
                )),
                ..row("drain (bounded)")
            },
            Row {
                rate_per_s: Some(drain.unbounded_tps),
                targets: vec![
                    Target::new(
                        "x baseline",
                        drain.unbounded_tps / baseline,
                        AtLeast(10.0),
                        1,
                    ),
                    Target::new("x ceiling", drain.unbounded_tps / ceiling, Report, 2),
                    Target::new("x http_floor", drain.unbounded_tps / floor, Report, 2),
                ],
                ..row("drain (unbound)")
            },
            Row {
                p50_ms: Some(self.withdraw.p50_ms),
                p99_ms: Some(self.withdraw.p99_ms),
                targets: vec![Target::new("ms p99", self.withdraw.p99_ms, AtMost(50.0), 2)],
                note: Some(format!(
                    "{} pending tokens each; the first wave p50 {} ms, max {} ms; p99 after it {} ms",
                    self.withdraw.pending_per_user,
                    self.withdraw.first_wave_p50_ms,
                    self.withdraw.first_wave_max_ms,
                    self.withdraw.after_first_wave_p99_ms
                )),
                ..row("withdraw")
            },
            Row {
                rate_per_s: Some(self.view.requests_per_s),
                p99_ms: Some(self.view.p99_ms),
                targets: vec![
                    Target::new(
                        "x http_floor",
                        self.view.requests_per_s / floor,
                        AtLeast(0.4),
                        2,
                    ),
                    Target::new("ms p99", self.view.p99_ms, AtMost(20.0), 2),
                    Target::new("x ceiling", self.view.requests_per_s / ceiling, Report, 2),
                ],
                note: self
                    .view
                    .from_redis
                    .map(|share| format!("{:.0} % from redis alone", share * 100.0)),
                ..row("view")
            },
            Row {
                rate_per_s: Some(self.http_floor.requests_per_s),
                p99_ms: Some(self.http_floor.p99_ms),
                errors: Some(self.http_floor.errors),
                targets: vec![Target::new("x ceiling", floor / ceiling, Report, 2)],
                note: Some("GET /healthz, the rain's client and concurrency".into()),
                ..row("http_floor")
            },
            Row {
                rate_per_s: Some(self.ceiling.sign_per_s_per_core),
                note: Some("signatures/s/core".into()),
                ..row("ceiling")
            },
        ]
    }

    /// The table and the conservation verdict, on standard output.
    pub fn print(&self) {
        let run = if self.quick { "quick" } else { "full" };
        let threads = self
            .server_threads
            .map(|n| format!(", server on {n} worker thread(s)"))
            .unwrap_or_default();
        println!(
            "\nredpacket-wallet benchmark ({run} run, {} cores, {}{threads})",
            self.ceiling.cores, self.protocol
        );
        println!(
            "{:<16} {:>14} {:>9} {:>9}  against target",
            "scenario", "rate /s", "p50 ms", "p99 ms"
        );
        let cell = |v: Option<f64>, d: usize| v.map(|v| format!("{v:.d$}")).unwrap_or_default();
        for r in self.rows() {
            let mut notes: Vec<String> = r.targets.iter().map(|t| t.to_string()).collect();
            notes.extend(r.errors.map(|e| format!("errors {e}")));
            notes.extend(r.note.clone());
            println!(
                "{:<16} {:>14} {:>9} {:>9}  {}",
                r.scenario,
                cell(r.rate_per_s, 0),
                cell(r.p50_ms, 2),
                cell(r.p99_ms, 2),
                notes.join(", ")
            );
        }
        for (name, r) in [
            ("rain_single", &self.rain_single.redis),
            ("rain_batch", &self.rain_batch.redis),
            ("drain_unbounded", &self.drain.redis),
        ] {
            println!(
                "redis per item, {name}: {} µs of master CPU, {} µs of command time, {} commands, {} bytes in, {} bytes out",
                r.cpu_usec_per_award,
                r.usec_per_award,
                r.commands_per_award,
                r.net_in_bytes_per_award,
                r.net_out_bytes_per_award
            );
            let top: Vec<String> = r
                .commands
                .iter()
                .map(|c| format!("{} {}× {} µs", c.name, c.calls_per_item, c.usec_per_item))
                .collect();
            println!("  top commands: {}", top.join(", "));
        }
        for (scenario, procs) in &self.cpu_us_per_item {
            let parts: Vec<String> = procs.iter().map(|(p, us)| format!("{p} {us}")).collect();
            println!("cpu µs per item, {scenario}: {}", parts.join(", "));
        }
        let c = &self.conservation;
        let hours_ok = c.reconciliation.iter().filter(|r| r.ok).count();
        println!(
            "conservation: {} (issued {} = booked {} + pending {} cents; withdrawn {}; budget taken {}; leak {}; backlog {}; reconciliation {}/{} hours ok; {} wallets checked) {:?}",
            if c.ok { "ok" } else { "FAILED" },
            c.issued_cents,
            c.booked_cents,
            c.pending_cents,
            c.withdrawn_cents,
            c.budget_taken_cents,
            c.leak_cents,
            c.backlog,
            hours_ok,
            c.reconciliation.len(),
            c.wallets_checked,
            c.problems
        );
    }

    /// The summary and the table as JSON.
    pub fn write_json(&self, path: &Path) -> anyhow::Result<()> {
        #[derive(Serialize)]
        struct WithTable<'a> {
            #[serde(flatten)]
            summary: &'a Summary,
            table: Vec<Row>,
        }
        let out = WithTable {
            summary: self,
            table: self.rows(),
        };
        std::fs::write(path, serde_json::to_string_pretty(&out)?)?;
        Ok(())
    }
}
