//! CPU time of the processes under test (the server, Redis, MariaDB and the bench
//! itself, which runs the load clients and the in-process drain worker), from
//! `/proc/<pid>/stat`, so each scenario can say what one award, booking or view costs
//! each of them.

use std::collections::BTreeMap;

/// Named processes: `RPW_BENCH_PIDS="server=12,redis=34+35,mysql=56"` (`+` joins the
/// processes of one name, such as a cluster's nodes); the bench is added as `bench`.
#[derive(Debug, Clone, Default)]
pub struct Procs(Vec<(String, Vec<u32>)>);

/// CPU seconds per name at one moment.
pub type Snapshot = BTreeMap<String, f64>;

/// Clock ticks per second of `/proc/<pid>/stat` (USER_HZ, 100 on Linux).
const TICKS: f64 = 100.0;

impl Procs {
    pub fn from_env() -> Self {
        let mut procs: Vec<(String, Vec<u32>)> = std::env::var("RPW_BENCH_PIDS")
            .unwrap_or_default()
            .split(',')
            .filter_map(|item| {
                let (name, pids) = item.split_once('=')?;
                let pids: Vec<u32> = pids
                    .split('+')
                    .filter_map(|p| p.trim().parse().ok())
                    .collect();
                (!pids.is_empty()).then(|| (name.trim().to_string(), pids))
            })
            .collect();
        procs.push(("bench".into(), vec![std::process::id()]));
        Self(procs)
    }

    pub fn snapshot(&self) -> Snapshot {
        self.0
            .iter()
            .map(|(name, pids)| (name.clone(), pids.iter().map(|p| cpu_seconds(*p)).sum()))
            .collect()
    }
}

/// utime + stime of a process, in seconds (0 when it cannot be read).
fn cpu_seconds(pid: u32) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    // The command name (field 2) may hold spaces: count fields after its closing ')'.
    let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else {
        return 0.0;
    };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // Fields 14 and 15 of the whole line are the 12th and 13th after the name.
    let tick = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (tick(11) + tick(12)) / TICKS
}

/// Microseconds of CPU per item of each process between two snapshots.
pub fn per_item(before: &Snapshot, after: &Snapshot, items: u64) -> BTreeMap<String, f64> {
    let n = items.max(1) as f64;
    after
        .iter()
        .map(|(name, secs)| {
            let used = secs - before.get(name).copied().unwrap_or(0.0);
            (name.clone(), (used * 1e6 / n * 10.0).round() / 10.0)
        })
        .collect()
}
