//! The Redis token record of a user, and its only owner: the signed token bytes
//! (`P{p}:tok:{user}`), the accounting status beside them (`P{p}:st:{user}`), the account
//! snapshot written with each settle mark (`P{p}:acct:{user}`), and the settlement stream
//! entry each stored token gets.
//!
//! - [`Tokens::store`] (store.lua) writes a fresh token: bytes, status, counters and a
//!   stream entry, atomically in the user's partition. Issuance and client sync use it.
//! - [`Tokens::mark`] (mark.lua) flips booked tokens to settled after the MySQL commit.
//! - [`Tokens::trim`] replaces settled tokens past the retention by [`TRIMMED`], a
//!   marker that keeps the award's idempotency (the ledger row holds the signed token)
//!   until the activity's retry grace has passed.
//! - [`status`] holds the codecs of the status value and the stream entry.

pub mod counters;
mod mark;
pub mod status;
mod store;
mod trim;

use std::collections::HashMap;
use std::sync::Arc;

use redis::Script;

use crate::domain::UserId;
use crate::store::Redis;

pub use counters::{ActivityCounters, Counters, Totals};
pub use mark::Snapshot;
pub use status::{AwardEntry, StatusEntry};
pub use store::{ToStore, STORE_CHUNK};
pub use trim::TrimSettings;

/// What the token hash holds for a settled token trimmed from Redis. Never a prefix
/// of an encoded SignedToken (those start with field 1's tag, 0x0a).
pub const TRIMMED: &[u8] = b"~";

/// The token record's reader and writer. Cheap to clone.
#[derive(Clone)]
pub struct Tokens {
    redis: Arc<Redis>,
    scripts: Arc<Scripts>,
}

struct Scripts {
    store: Script,
    mark: Script,
}

/// What Redis holds of one user's record for the degraded view: the pending tokens and
/// the last account snapshot (`v`, `b`, `i`, `w`).
pub struct RedisRecord {
    pub pending: Vec<AwardEntry>,
    pub snapshot: HashMap<String, i64>,
}

impl Tokens {
    pub fn new(redis: Arc<Redis>) -> Self {
        Self {
            redis,
            scripts: Arc::new(Scripts {
                store: crate::store::script(include_str!("store.lua")),
                mark: crate::store::script(include_str!("mark.lua")),
            }),
        }
    }

    pub fn scripts(&self) -> [&Script; 2] {
        [&self.scripts.store, &self.scripts.mark]
    }

    pub fn redis(&self) -> &Redis {
        &self.redis
    }

    /// What the token hash holds under each `(user, out_trade_no)`, in one round trip
    /// (`None`: nothing; [`TRIMMED`]: settled and trimmed).
    pub async fn held(&self, keys: &[(UserId, &str)]) -> redis::RedisResult<Vec<Option<Vec<u8>>>> {
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        let mut pipe = redis::pipe();
        for (user, otn) in keys {
            pipe.hget(self.redis.tokens_key(*user), *otn);
        }
        self.redis.query(&pipe).await
    }

    /// The token bytes Redis holds for `entries`, in order (`None`: not held).
    pub async fn token_bytes(
        &self,
        entries: &[AwardEntry],
    ) -> redis::RedisResult<Vec<Option<Vec<u8>>>> {
        let keys: Vec<(UserId, &str)> = entries
            .iter()
            .map(|e| (e.user, e.out_trade_no.as_str()))
            .collect();
        self.held(&keys).await
    }

    /// Every status entry of `user`.
    pub async fn statuses_of(&self, user: UserId) -> redis::RedisResult<Vec<StatusEntry>> {
        let statuses: Vec<(String, String)> =
            redis::AsyncCommands::hgetall(&mut self.redis.conn(), self.redis.status_key(user))
                .await?;
        Ok(statuses
            .iter()
            .filter_map(|(otn, v)| status::parse_status(user, otn, v))
            .collect())
    }

    /// The pending tokens of `user`.
    pub async fn pending_of(&self, user: UserId) -> redis::RedisResult<Vec<AwardEntry>> {
        Ok(self
            .statuses_of(user)
            .await?
            .into_iter()
            .filter(|s| s.pending)
            .map(|s| s.entry)
            .collect())
    }

    /// The pending tokens of several users, in one round trip.
    pub async fn pending_of_users(&self, users: &[UserId]) -> redis::RedisResult<Vec<AwardEntry>> {
        if users.is_empty() {
            return Ok(Vec::new());
        }
        let mut pipe = redis::pipe();
        for user in users {
            pipe.hgetall(self.redis.status_key(*user));
        }
        let maps: Vec<Vec<(String, String)>> = self.redis.query(&pipe).await?;
        let mut out = Vec::new();
        for (user, statuses) in users.iter().zip(&maps) {
            out.extend(status::pending_in(*user, statuses));
        }
        Ok(out)
    }

    /// The user's pending tokens and account snapshot, read together (one atomic
    /// pipeline), for the Redis-only view.
    pub async fn redis_record(&self, user: UserId) -> redis::RedisResult<RedisRecord> {
        let (statuses, snapshot): (Vec<(String, String)>, HashMap<String, i64>) = redis::pipe()
            .atomic()
            .hgetall(self.redis.status_key(user))
            .hgetall(self.redis.snapshot_key(user))
            .query_async(&mut self.redis.conn())
            .await?;
        Ok(RedisRecord {
            pending: status::pending_in(user, &statuses).collect(),
            snapshot,
        })
    }
}
