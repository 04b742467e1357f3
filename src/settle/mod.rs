//! Settlement: the accounting worker drains the partition streams into the ledger at a
//! bounded rate ([`worker`]), and the sweep books whatever the worker left behind
//! ([`sweep`]). Booking itself is the ledger's (`ledger::Ledger::book`); marking the
//! tokens settled afterwards is the token record's (`tokens::Tokens::mark`).

pub mod sweep;
pub mod worker;

use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};

use crate::config::SettleSettings;
use crate::ledger::Ledger;
use crate::store::Redis;
use crate::switches::Switches;
use crate::tokens::Tokens;

pub use sweep::{settle_all, settle_until};
pub use worker::{Outcome, Worker, WorkerOptions};

/// What booking needs, shared by the worker tasks and the sweep of one instance.
/// Cheap to clone.
#[derive(Clone)]
pub struct Settler {
    pub redis: Arc<Redis>,
    pub ledger: Ledger,
    pub tokens: Tokens,
    pub switches: Arc<Switches>,
    /// The booking bound of this instance (`settle.max_tps`): the worker and the sweep
    /// draw from this one bucket. `None` when unbounded.
    pub limiter: Option<Arc<DefaultDirectRateLimiter>>,
    pub settings: SettleSettings,
    /// Names this process's consumers in the settlement group.
    pub instance_id: String,
    /// Tokens this instance has booked since it started (the worker and the sweep; not
    /// the forced settlement of a withdrawal, which is not bounded by `max_tps`).
    pub booked: Arc<AtomicU64>,
}

impl Settler {
    /// Counts `tokens` newly booked by this instance's worker or sweep.
    pub(crate) fn count_booked(&self, tokens: usize) {
        crate::metrics::booked(tokens as u64);
        self.booked.fetch_add(tokens as u64, Ordering::Relaxed);
    }

    /// Tokens this instance's worker and sweep have booked since it started.
    pub fn booked_total(&self) -> u64 {
        self.booked.load(Ordering::Relaxed)
    }
}

/// A token bucket of `max_tps` permits per second shared by an instance's tasks;
/// `None` when unbounded.
pub fn rate_limiter(max_tps: u32, batch_size: usize) -> Option<Arc<DefaultDirectRateLimiter>> {
    let rate = NonZeroU32::new(max_tps)?;
    // The burst is one batch (or one second, if smaller), so the measured rate follows
    // the configured one within a batch.
    let burst = NonZeroU32::new((batch_size as u32).min(max_tps).max(1)).expect("positive");
    Some(Arc::new(RateLimiter::direct(
        Quota::per_second(rate).allow_burst(burst),
    )))
}
