//! The shared issued counter behind `GET /v1/activities/{id}/stats`.
//!
//! Each instance adds locally (atomics, no I/O on the award path), flushes its deltas to
//! one Redis hash per activity every second and reads the totals back at the same time.
//! The endpoint answers from memory: at most about a second stale, and no per-request
//! MySQL read or hot-key access.

use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, RwLock};

use crate::store::Redis;

#[derive(Default)]
struct Local {
    count: AtomicI64,
    cents: AtomicI64,
}

#[derive(Default)]
pub struct StatsCounter {
    local: RwLock<HashMap<String, Arc<Local>>>,
    totals: RwLock<HashMap<String, (i64, i64)>>,
}

impl StatsCounter {
    pub fn add(&self, activity: &str, count: i64, cents: i64) {
        let existing = self
            .local
            .read()
            .expect("stats lock")
            .get(activity)
            .cloned();
        let entry = match existing {
            Some(entry) => entry,
            None => self
                .local
                .write()
                .expect("stats lock")
                .entry(activity.to_string())
                .or_default()
                .clone(),
        };
        entry.count.fetch_add(count, Ordering::Relaxed);
        entry.cents.fetch_add(cents, Ordering::Relaxed);
    }

    /// (count, cents) as of the last read-back.
    pub fn totals(&self, activity: &str) -> (i64, i64) {
        self.totals
            .read()
            .expect("stats lock")
            .get(activity)
            .copied()
            .unwrap_or((0, 0))
    }

    /// Flushes local deltas to Redis and reads back the totals of `activities`.
    pub async fn flush(&self, redis: &Redis, activities: &[String]) -> redis::RedisResult<()> {
        let deltas: Vec<(String, i64, i64)> = self
            .local
            .read()
            .expect("stats lock")
            .iter()
            .map(|(k, v)| {
                (
                    k.clone(),
                    v.count.swap(0, Ordering::Relaxed),
                    v.cents.swap(0, Ordering::Relaxed),
                )
            })
            .filter(|(_, n, _)| *n != 0)
            .collect();
        let mut pipe = redis::pipe();
        for (activity, n, c) in &deltas {
            let key = redis.stats_key(activity);
            pipe.cmd("HINCRBY").arg(&key).arg("n").arg(*n).ignore();
            pipe.cmd("HINCRBY").arg(&key).arg("c").arg(*c).ignore();
        }
        for activity in activities {
            pipe.cmd("HMGET")
                .arg(redis.stats_key(activity))
                .arg("n")
                .arg("c");
        }
        let mut conn = redis.conn();
        let read: redis::RedisResult<Vec<(Option<i64>, Option<i64>)>> =
            pipe.query_async(&mut conn).await;
        let read = match read {
            Ok(read) => read,
            Err(err) => {
                // Put the deltas back so a Redis outage loses no count. If Redis applied
                // them before failing they count twice here: this is a display figure;
                // reconciliation reads the per-partition counters written with each token.
                for (activity, n, c) in deltas {
                    self.add(&activity, n, c);
                }
                return Err(err);
            }
        };
        let mut totals = self.totals.write().expect("stats lock");
        for (activity, (n, c)) in activities.iter().zip(read) {
            totals.insert(activity.clone(), (n.unwrap_or(0), c.unwrap_or(0)));
        }
        Ok(())
    }
}
