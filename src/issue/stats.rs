//! The shared issued counter behind `GET /v1/activities/{id}/stats`.
//!
//! Each instance adds locally (atomics, no I/O on the award path) and, every second,
//! writes its own running totals into one Redis hash per activity (fields `{instance}:n`
//! and `{instance}:c`) and reads back the sum over every instance. Writing totals rather
//! than increments makes a flush safe to repeat: a flush that Redis applied but whose
//! answer was lost is simply written again, never counted twice. The endpoint answers
//! from memory: at most about a second stale, and no per-request MySQL read or hot-key
//! access.

use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, RwLock};

use crate::store::Redis;

#[derive(Default)]
struct Local {
    count: AtomicI64,
    cents: AtomicI64,
}

pub struct StatsCounter {
    /// This process's name in the shared hashes.
    instance: String,
    local: RwLock<HashMap<String, Arc<Local>>>,
    totals: RwLock<HashMap<String, (i64, i64)>>,
}

impl Default for StatsCounter {
    fn default() -> Self {
        Self {
            instance: format!("{:016x}", rand::random::<u64>()),
            local: RwLock::default(),
            totals: RwLock::default(),
        }
    }
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

    /// (count, cents) over every instance, as of the last read-back.
    pub fn totals(&self, activity: &str) -> (i64, i64) {
        self.totals
            .read()
            .expect("stats lock")
            .get(activity)
            .copied()
            .unwrap_or((0, 0))
    }

    /// Writes this instance's totals (every activity it issued for: a few small writes a
    /// second) and reads back the totals of `activities`.
    pub async fn flush(&self, redis: &Redis, activities: &[String]) -> redis::RedisResult<()> {
        let mine: Vec<(String, i64, i64)> = self
            .local
            .read()
            .expect("stats lock")
            .iter()
            .map(|(k, v)| {
                (
                    k.clone(),
                    v.count.load(Ordering::Relaxed),
                    v.cents.load(Ordering::Relaxed),
                )
            })
            .collect();
        let mut pipe = redis::pipe();
        for (activity, n, c) in &mine {
            pipe.hset_multiple(
                redis.stats_key(activity),
                &[
                    (format!("{}:n", self.instance), *n),
                    (format!("{}:c", self.instance), *c),
                ],
            );
        }
        for activity in activities {
            pipe.hgetall(redis.stats_key(activity));
        }
        // One answer per command: the writes' first, then the reads.
        let answers: Vec<redis::Value> = redis.query(&pipe).await?;
        let read = answers
            .into_iter()
            .skip(mine.len())
            .map(redis::from_owned_redis_value::<HashMap<String, i64>>)
            .collect::<redis::RedisResult<Vec<_>>>()?;
        let mut totals = self.totals.write().expect("stats lock");
        for (activity, fields) in activities.iter().zip(read) {
            let sum = |suffix: &str| -> i64 {
                fields
                    .iter()
                    .filter(|(field, _)| field.ends_with(suffix))
                    .map(|(_, v)| v)
                    .sum()
            };
            totals.insert(activity.clone(), (sum(":n"), sum(":c")));
        }
        Ok(())
    }
}
