//! The Redis token record of a user, and its only owner: the signed token bytes
//! (`P{p}:tok:{user}`), the accounting status beside them (`P{p}:st:{user}`), the account
//! snapshot written with each settle mark (`P{p}:acct:{user}`), and the settlement stream
//! entry each stored token gets.
//!
//! - [`Tokens::store`] (store.lua) writes a fresh token: bytes, status, counters and a
//!   stream entry, atomically (in the user's partition on a cluster; a call may span
//!   partitions on one node). Issuance and client sync use it.
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
use crate::store::{query_scripted, Redis};

pub use counters::{ActivityCounters, Counters, Totals};
pub use mark::Snapshot;
pub use status::{AwardEntry, StatusEntry};
pub use store::{ToStore, STORE_CHUNK};
pub use trim::TrimSettings;

/// What the token hash holds for a settled token trimmed from Redis. Never a prefix
/// of an encoded SignedToken (those start with field 1's tag, 0x0a).
pub const TRIMMED: &[u8] = b"~";

/// What the token hash holds for an award answered with only a greeting (no token): a
/// retry gets the greeting again. Like [`TRIMMED`], never a prefix of a SignedToken.
pub const GREETING: &[u8] = b"~g";

/// The token record's reader and writer. Cheap to clone.
#[derive(Clone)]
pub struct Tokens {
    redis: Arc<Redis>,
    scripts: Arc<Scripts>,
}

struct Scripts {
    store: Script,
    mark: Script,
    greet: Script,
}

/// What Redis holds of one user's record, read atomically: the pending tokens
/// and the last account snapshot (`v`, `b`, `i`, `w`, the identity `rid` of the Redis data
/// it was written in, and a field `f:<id>` per open [`Fence`]).
pub struct RedisRecord {
    pub pending: Vec<AwardEntry>,
    pub snapshot: HashMap<String, String>,
    /// The identity of the Redis data when this was read.
    pub identity: String,
}

/// What the view's transaction answers: the status hash, the snapshot hash, and the
/// text of `INFO server replication` (the data's identity).
type ViewReply = (Vec<(String, String)>, HashMap<String, String>, String);

/// The booked figures of an account as a snapshot holds them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Booked {
    pub balance_cents: i64,
    pub total_income_cents: i64,
    pub withdrawn_cents: i64,
}

impl RedisRecord {
    /// The snapshot's figures, whether or not they can be trusted (the degraded view).
    pub fn snapshot_figures(&self) -> Booked {
        let field = |k: &str| {
            self.snapshot
                .get(k)
                .and_then(|v| v.parse().ok())
                .unwrap_or(0)
        };
        Booked {
            balance_cents: field("b"),
            total_income_cents: field("i"),
            withdrawn_cents: field("w"),
        }
    }

    /// The booked figures when the snapshot provably equals the ledger's account minus
    /// the pending tokens read with it (DESIGN.md "View"): it exists, was written in this
    /// very Redis data (a flush, a restart or a failover since would have rewound the
    /// tokens beside it), by this release's mark.lua (`wr`), at least `quiet_ms` into
    /// that Redis life (a loss also takes fences away: a change committed before it whose
    /// own snapshot had not come yet could be hidden by one written early in the new
    /// life; by then it has come), and no change other than booking this user's pending
    /// tokens is under way (no fence). `None`: only MySQL can say.
    pub fn exact_booked(&self, quiet_ms: i64) -> Option<Booked> {
        let written_here = self.snapshot.get("rid") == Some(&self.identity)
            && self.snapshot.get("wr") == Some(&self.identity);
        let number = |k: &str| self.snapshot.get(k).and_then(|v| v.parse::<i64>().ok());
        let late_in_life = matches!(
            (number("rs"), number("wt")),
            (Some(since), Some(written)) if written - since >= quiet_ms
        );
        let fenced = self.snapshot.keys().any(|k| k.starts_with("f:"));
        (written_here && late_in_life && !fenced && self.snapshot.contains_key("v"))
            .then(|| self.snapshot_figures())
    }
}

/// An announcement, in the user's snapshot hash, that a change other than booking their
/// pending tokens (a withdrawal's debit, a reversal) may commit to their account: views
/// go to MySQL until the snapshot written after that commit lifts it
/// ([`Snapshot::lifts`]), or until the change is given up ([`Tokens::unfence`]). A fence
/// left by a crash keeps that user's views on MySQL: exact, only slower.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fence(pub String);

fn with_identity(body: &str) -> Script {
    crate::store::script(&format!("{}\n{}", crate::store::IDENTITY_LUA, body))
}

impl Tokens {
    pub fn new(redis: Arc<Redis>) -> Self {
        Self {
            redis,
            scripts: Arc::new(Scripts {
                store: crate::store::script(include_str!("store.lua")),
                mark: with_identity(include_str!("mark.lua")),
                greet: crate::store::script(include_str!("greet.lua")),
            }),
        }
    }

    pub fn scripts(&self) -> [&Script; 3] {
        [&self.scripts.store, &self.scripts.mark, &self.scripts.greet]
    }

    /// Takes down the greeting markers of `(user, out_trade_no)` (only where the token
    /// hash still holds one), so a client's real token for them can be restored: a
    /// greeting recorded after Redis lost that token must not hide it.
    pub async fn forget_greetings(&self, keys: &[(UserId, &str)]) -> redis::RedisResult<()> {
        if keys.is_empty() {
            return Ok(());
        }
        let mut pipe = redis::pipe();
        for (user, otn) in keys {
            pipe.cmd("EVAL")
                .arg(
                    "if redis.call('HGET', KEYS[1], ARGV[1]) == ARGV[2] then \
                     return redis.call('HDEL', KEYS[1], ARGV[1]) end return 0",
                )
                .arg(1)
                .arg(self.redis.tokens_key(*user))
                .arg(*otn)
                .arg(GREETING)
                .ignore();
        }
        self.redis.query(&pipe).await
    }

    /// Records awards answered with only a greeting, `(user, out_trade_no, marker kept
    /// until ms)`, in one round trip. Per award: `None` when recorded now, or what the
    /// token hash already holds (a token stored first, or the greeting before).
    pub async fn record_greetings(
        &self,
        greetings: &[(UserId, &str, i64)],
    ) -> redis::RedisResult<Vec<Option<Vec<u8>>>> {
        if greetings.is_empty() {
            return Ok(Vec::new());
        }
        let mut pipe = redis::pipe();
        for (user, otn, until_ms) in greetings {
            let tokens = self.redis.tokens_key(*user);
            let markers = self.redis.markers_key(self.redis.partition_of(*user));
            let mut cmd = crate::store::evalsha(&self.scripts.greet, &[&tokens, &markers]);
            cmd.arg(*otn)
                .arg(GREETING)
                .arg(status::index_member(*user, otn))
                .arg(*until_ms);
            pipe.add_command(cmd);
        }
        query_scripted(&self.redis, &pipe, &self.scripts()).await
    }

    /// Puts up a fence on `user`'s snapshot (see [`Fence`]), before the transaction
    /// whose change it announces begins.
    pub async fn fence(&self, user: UserId) -> redis::RedisResult<Fence> {
        let id = crate::domain::hex(&rand::random::<[u8; 8]>());
        let _: () = redis::AsyncCommands::hset(
            &mut self.redis.conn(),
            self.redis.snapshot_key(user),
            format!("f:{id}"),
            crate::store::now_ms(),
        )
        .await?;
        Ok(Fence(id))
    }

    /// Takes a fence down when its change did not happen (the transaction rolled back
    /// or found nothing to do).
    pub async fn unfence(&self, user: UserId, fence: &Fence) -> redis::RedisResult<()> {
        redis::AsyncCommands::hdel(
            &mut self.redis.conn(),
            self.redis.snapshot_key(user),
            format!("f:{}", fence.0),
        )
        .await
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

    /// Every cash status entry of `user`.
    pub async fn statuses_of(&self, user: UserId) -> redis::RedisResult<Vec<StatusEntry>> {
        self.parsed_statuses(user, status::parse_status).await
    }

    /// Every coupon status entry of `user`.
    pub async fn coupon_statuses_of(&self, user: UserId) -> redis::RedisResult<Vec<StatusEntry>> {
        self.parsed_statuses(user, status::parse_coupon_status)
            .await
    }

    /// The coupon `otn` of `user` as its status says, if Redis holds it.
    pub async fn coupon_status(
        &self,
        user: UserId,
        otn: &str,
    ) -> redis::RedisResult<Option<StatusEntry>> {
        let value: Option<String> =
            redis::AsyncCommands::hget(&mut self.redis.conn(), self.redis.status_key(user), otn)
                .await?;
        Ok(value.and_then(|v| status::parse_coupon_status(user, otn, &v)))
    }

    async fn parsed_statuses(
        &self,
        user: UserId,
        parse: fn(UserId, &str, &str) -> Option<StatusEntry>,
    ) -> redis::RedisResult<Vec<StatusEntry>> {
        let statuses: Vec<(String, String)> =
            redis::AsyncCommands::hgetall(&mut self.redis.conn(), self.redis.status_key(user))
                .await?;
        Ok(statuses
            .iter()
            .filter_map(|(otn, v)| parse(user, otn, v))
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

    /// Claims the one-win wins `(activity/scene, out_trade_no)` of `user` where no claim
    /// is held (the guards' claim hash, see `issue::guards`).
    pub async fn claim_wins(
        &self,
        user: UserId,
        wins: &[(String, &str)],
    ) -> redis::RedisResult<()> {
        if wins.is_empty() {
            return Ok(());
        }
        let key = self.redis.wins_key(user);
        let mut pipe = redis::pipe();
        for (scene, otn) in wins {
            pipe.hset_nx(&key, scene, *otn);
        }
        self.redis.query::<()>(&pipe).await
    }

    /// The user's tokens, account snapshot and the identity of the Redis data, read
    /// atomically: one MULTI/EXEC of the two hashes and `INFO server replication`
    /// (every key in the user's slot, and INFO answered by the node that holds it). A
    /// transaction rather than a script: the same atomicity at under half the Redis time
    /// (a script pays for each call it makes and for carrying the replies through Lua).
    pub async fn redis_record(&self, user: UserId) -> redis::RedisResult<RedisRecord> {
        let mut pipe = redis::pipe();
        pipe.atomic()
            .hgetall(self.redis.status_key(user))
            .hgetall(self.redis.snapshot_key(user))
            .cmd("INFO")
            .arg("server")
            .arg("replication");
        let (statuses, snapshot, info): ViewReply =
            pipe.query_async(&mut self.redis.conn()).await?;
        let identity = crate::store::identity_of(&info);
        Ok(RedisRecord {
            pending: status::pending_in(user, &statuses).collect(),
            snapshot,
            identity,
        })
    }
}
