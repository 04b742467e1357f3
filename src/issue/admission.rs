//! Admission control in front of issuance, the first levels of a flash-sale limiter:
//! per scene an optional random admission fraction, then per scene and per caller a
//! token bucket. A refusal is 429 `rate_limited` with `Retry-After`.
//!
//! Buckets are per instance: with K instances behind a balancer the cluster-wide limit
//! is K times the configured one.

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex};

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};

use crate::activity::CachedActivity;
use crate::error::Error;

/// A scene's bucket, with the rate it was made for (rebuilt when the rate changes).
type SceneBuckets = HashMap<(String, String), (u32, Arc<DefaultDirectRateLimiter>)>;

pub struct Admission {
    caller_per_s: u32,
    callers: Mutex<HashMap<String, Arc<DefaultDirectRateLimiter>>>,
    scenes: Mutex<SceneBuckets>,
}

fn bucket(per_s: NonZeroU32) -> Arc<DefaultDirectRateLimiter> {
    Arc::new(RateLimiter::direct(Quota::per_second(per_s)))
}

fn check(limiter: &DefaultDirectRateLimiter, kind: &'static str) -> Result<(), Error> {
    limiter.check().map_err(|not_until| {
        crate::metrics::rate_limited(kind);
        let wait = not_until.wait_time_from(DefaultClock::default().now());
        Error::RateLimited {
            retry_after_secs: wait.as_secs() + u64::from(wait.subsec_nanos() > 0),
        }
    })
}

impl Admission {
    /// `caller_per_s`: awards per second per caller; 0 means no caller limit.
    pub fn new(caller_per_s: u32) -> Self {
        Self {
            caller_per_s,
            callers: Mutex::new(HashMap::new()),
            scenes: Mutex::new(HashMap::new()),
        }
    }

    pub fn admit(
        &self,
        cached: Option<&CachedActivity>,
        caller: &str,
        activity: &str,
        scene: &str,
    ) -> Result<(), Error> {
        if let Some(cached) = cached {
            if let Some(s) = cached.scenes.get(scene) {
                if let Some(fraction) = s.admission_fraction {
                    if rand::random::<f64>() >= fraction {
                        crate::metrics::rate_limited("admission_fraction");
                        return Err(Error::RateLimited {
                            retry_after_secs: 1,
                        });
                    }
                }
                if let Some(rate) = s.rate_limit_per_s.and_then(NonZeroU32::new) {
                    let limiter = {
                        let mut scenes = self.scenes.lock().expect("scene limiters poisoned");
                        let entry = scenes
                            .entry((activity.to_string(), scene.to_string()))
                            .or_insert_with(|| (rate.get(), bucket(rate)));
                        if entry.0 != rate.get() {
                            *entry = (rate.get(), bucket(rate));
                        }
                        entry.1.clone()
                    };
                    check(&limiter, "scene")?;
                }
            }
        }
        if let Some(rate) = NonZeroU32::new(self.caller_per_s) {
            let limiter = self
                .callers
                .lock()
                .expect("caller limiters poisoned")
                .entry(caller.to_string())
                .or_insert_with(|| bucket(rate))
                .clone();
            check(&limiter, "caller")?;
        }
        Ok(())
    }
}
