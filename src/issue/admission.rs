//! Admission control in front of issuance, the first levels of a flash-sale limiter:
//! per scene an optional random admission fraction, then per scene and per caller a
//! rate limit. A refusal is 429 `rate_limited` with `Retry-After`.
//!
//! The limits hold for the whole fleet of instances, the way the seed does it:
//! - a limit of at most `issue.shared_limit_max_per_s` is counted precisely in Redis,
//!   per second, shared by every instance (one INCRBY per limit and batch);
//! - a higher limit is split: each instance enforces `limit / issue.fleet_instances`
//!   with a token bucket of its own, at no Redis cost (at such rates a count per award
//!   would cost more than the limit protects).

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex};

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};

use crate::activity::CachedActivity;
use crate::error::Error;
use crate::store::{now_ms, Redis};

/// A bucket, with the rate it was made for (rebuilt when the rate changes).
type Buckets = HashMap<String, (u32, Arc<DefaultDirectRateLimiter>)>;

/// How the fleet's limits are kept.
#[derive(Debug, Clone, Copy)]
pub struct FleetLimits {
    /// Awards per second per caller; 0 means no caller limit.
    pub caller_per_s: u32,
    /// Limits up to this are counted in Redis for the whole fleet...
    pub shared_max_per_s: u32,
    /// ...higher ones are split over this many instances.
    pub instances: u32,
}

pub struct Admission {
    limits: FleetLimits,
    redis: Arc<Redis>,
    buckets: Mutex<Buckets>,
}

/// A limit an award must still pass in Redis: its counter key and its rate.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SharedLimit {
    pub scope: String,
    pub per_s: u32,
    pub kind: &'static str,
}

fn refused(kind: &'static str, retry_after_secs: u64) -> Error {
    crate::metrics::rate_limited(kind);
    Error::RateLimited { retry_after_secs }
}

impl Admission {
    pub fn new(limits: FleetLimits, redis: Arc<Redis>) -> Self {
        Self {
            limits,
            redis,
            buckets: Mutex::new(HashMap::new()),
        }
    }

    /// Checks a limit locally (a split one) or returns it to be counted in Redis.
    fn limit(
        &self,
        scope: String,
        per_s: u32,
        kind: &'static str,
        shared: &mut Vec<SharedLimit>,
    ) -> Result<(), Error> {
        if per_s == 0 {
            return Ok(());
        }
        if per_s <= self.limits.shared_max_per_s {
            shared.push(SharedLimit { scope, per_s, kind });
            return Ok(());
        }
        let mine = per_s.div_ceil(self.limits.instances.max(1));
        let Some(rate) = NonZeroU32::new(mine) else {
            return Ok(());
        };
        let limiter = {
            let mut buckets = self.buckets.lock().expect("rate limiters poisoned");
            let entry = buckets
                .entry(scope)
                .or_insert_with(|| (mine, Arc::new(RateLimiter::direct(Quota::per_second(rate)))));
            if entry.0 != mine {
                *entry = (mine, Arc::new(RateLimiter::direct(Quota::per_second(rate))));
            }
            entry.1.clone()
        };
        limiter.check().map_err(|not_until| {
            let wait = not_until.wait_time_from(DefaultClock::default().now());
            refused(kind, wait.as_secs() + u64::from(wait.subsec_nanos() > 0))
        })
    }

    /// The local part of admission: the scene's admission fraction and the split
    /// (per-instance) limits. Returns the shared limits the award must still pass
    /// ([`Admission::admit_shared`]).
    pub fn admit_local(
        &self,
        cached: Option<&CachedActivity>,
        caller: &str,
        activity: &str,
        scene: &str,
    ) -> Result<Vec<SharedLimit>, Error> {
        let mut shared = Vec::new();
        if let Some(s) = cached.and_then(|c| c.scenes.get(scene)) {
            if let Some(fraction) = s.admission_fraction {
                if rand::random::<f64>() >= fraction {
                    return Err(refused("admission_fraction", 1));
                }
            }
            if let Some(rate) = s.rate_limit_per_s {
                self.limit(format!("s:{activity}:{scene}"), rate, "scene", &mut shared)?;
            }
        }
        self.limit(
            format!("c:{caller}"),
            self.limits.caller_per_s,
            "caller",
            &mut shared,
        )?;
        Ok(shared)
    }

    /// Counts each award's shared limits in Redis for the current second, one INCRBY
    /// per limit for the whole batch, and answers per award whether it is admitted. An
    /// award refused by one limit still counted against the others: the fleet admits
    /// at most the limit, never more.
    pub async fn admit_shared(&self, awards: &[Vec<SharedLimit>]) -> Result<Vec<bool>, Error> {
        let mut wanted: HashMap<&SharedLimit, i64> = HashMap::new();
        for limits in awards {
            for l in limits {
                *wanted.entry(l).or_default() += 1;
            }
        }
        if wanted.is_empty() {
            return Ok(vec![true; awards.len()]);
        }
        let second = now_ms() / 1000;
        let order: Vec<(&SharedLimit, i64)> = wanted.into_iter().collect();
        let mut pipe = redis::pipe();
        for (l, n) in &order {
            let key = self.redis.limit_key(&l.scope, second);
            pipe.cmd("INCRBY").arg(&key).arg(*n);
            pipe.cmd("EXPIRE").arg(&key).arg(2);
        }
        let answers: Vec<i64> = self.redis.query(&pipe).await?;
        // What each limit still lets through of this batch: the limit less what was
        // counted before the batch.
        let mut left: HashMap<&SharedLimit, i64> = HashMap::new();
        for (k, (l, n)) in order.iter().enumerate() {
            let count = answers[2 * k];
            left.insert(*l, (i64::from(l.per_s) - (count - n)).clamp(0, *n));
        }
        Ok(awards
            .iter()
            .map(|limits| {
                let mut ok = true;
                for l in limits {
                    let room = left.get_mut(l).expect("counted above");
                    if *room > 0 {
                        *room -= 1;
                    } else {
                        if ok {
                            crate::metrics::rate_limited(l.kind);
                        }
                        ok = false;
                    }
                }
                ok
            })
            .collect())
    }
}
