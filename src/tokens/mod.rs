//! The Redis token record of a user, and its only owner: the signed token bytes
//! (`P{p}:tok:{user}`), the accounting status beside them (`P{p}:st:{user}`), which also
//! holds the account snapshot written with each settle mark (fields starting with `=`,
//! see mark.lua), and the settlement stream entry each stored token gets.
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
pub use store::{StockAfter, TakenAndStored, ToStore, STORE_CHUNK};
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
    /// Instances of earlier releases may run: their snapshot hash (`acct:`) is kept and
    /// read too (`wallet.snapshot_compat`, mark.lua).
    snapshot_compat: bool,
}

struct Scripts {
    store: Script,
    mark: Script,
    greet: Script,
}

/// What Redis holds of one user's record, read atomically: the pending tokens
/// and the last account snapshot (`v`, `b`, `i`, `w`, the identity `rid` of the Redis data
/// it was written in, shortened by [`short_identity`], `age`, how long into that Redis
/// life it was written, and `f:<id>` per open [`Fence`]; see [`snapshot_fields`]).
pub struct RedisRecord {
    pub pending: Vec<AwardEntry>,
    pub snapshot: HashMap<String, String>,
    /// The identity of the Redis data when this was read.
    pub identity: String,
    /// The user still has a snapshot hash of the layout of earlier releases (`acct:`):
    /// an instance of one may have changed the account without this snapshot knowing.
    pub legacy: bool,
}

/// What the view's transaction answers: the status hash, the legacy snapshot hash (whole
/// in compat mode, otherwise whether it exists), and the text of `INFO server
/// replication` (the data's identity).
type ViewReply = (Vec<(String, String)>, redis::Value, String);

/// The identity of the Redis data as a snapshot holds it (mark.lua's `short`): the first
/// 24 characters of the run id and of the replication id, so the field stays short enough
/// for Redis's compact hash encoding. `None` for anything but `<40>:<40>` characters.
pub fn short_identity(identity: &str) -> Option<String> {
    let (run_id, replid) = identity.split_once(':')?;
    (run_id.len() == 40 && replid.len() == 40 && identity.is_ascii())
        .then(|| format!("{}:{}", &run_id[..24], &replid[..24]))
}

/// The snapshot of a status hash (mark.lua): `=s` (`version|balance|income|withdrawn`)
/// as `v`, `b`, `i`, `w`; `=r` (`identity|age`) as `rid` and `age`; each fence `=f:<id>`
/// as `f:<id>`. A malformed `=s` or `=r` gives nothing of itself, so nothing is trusted.
fn snapshot_fields(statuses: &[(String, String)]) -> HashMap<String, String> {
    let mut snapshot = HashMap::new();
    for (name, value) in statuses {
        match name.as_str() {
            "=s" => {
                let parts: Vec<&str> = value.split('|').collect();
                let numbers = parts.iter().all(|p| p.parse::<i64>().is_ok());
                if let ([v, b, i, w], true) = (&parts[..], numbers) {
                    for (k, part) in [("v", v), ("b", b), ("i", i), ("w", w)] {
                        snapshot.insert(k.to_string(), part.to_string());
                    }
                }
            }
            "=r" => {
                if let Some((rid, age)) = value.split_once('|') {
                    snapshot.insert("rid".to_string(), rid.to_string());
                    snapshot.insert("age".to_string(), age.to_string());
                }
            }
            _ => {
                if let Some(fence) = name.strip_prefix("=f:") {
                    snapshot.insert(format!("f:{fence}"), value.clone());
                }
            }
        }
    }
    snapshot
}

/// The newer of a status hash's snapshot (as [`snapshot_fields`] reads it) and a legacy
/// snapshot hash (`acct:`, written by earlier releases and in compat mode), with the
/// fences of both. The legacy one is read as this release's: its identity shortened, and
/// trusted only when written with `wr` (as earlier releases required), its age `wt - rs`.
fn newer_snapshot(
    mut snapshot: HashMap<String, String>,
    legacy: &HashMap<String, String>,
) -> HashMap<String, String> {
    let version =
        |s: &HashMap<String, String>| s.get("v").and_then(|v| v.parse::<i64>().ok()).unwrap_or(-1);
    let fences: Vec<(String, String)> = legacy
        .iter()
        .filter(|(k, _)| k.starts_with("f:"))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    if version(legacy) > version(&snapshot) {
        let number = |k: &str| legacy.get(k).and_then(|v| v.parse::<i64>().ok());
        let rid = match (legacy.get("rid"), legacy.get("wr")) {
            (Some(rid), Some(wr)) if rid == wr => short_identity(rid),
            _ => None,
        };
        let age = match (number("rs"), number("wt")) {
            (Some(since), Some(written)) => Some(written - since),
            _ => None,
        };
        snapshot.retain(|k, _| k.starts_with("f:"));
        for k in ["v", "b", "i", "w"] {
            if let Some(value) = legacy.get(k) {
                snapshot.insert(k.to_string(), value.clone());
            }
        }
        snapshot.extend(rid.map(|rid| ("rid".to_string(), rid)));
        snapshot.extend(age.map(|age| ("age".to_string(), age.to_string())));
    }
    snapshot.extend(fences);
    snapshot
}

/// The booked figures of an account as a snapshot holds them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Booked {
    pub balance_cents: i64,
    pub total_income_cents: i64,
    pub withdrawn_cents: i64,
}

/// The figures of a snapshot's fields (0 for a missing one).
fn figures_of(snapshot: &HashMap<String, String>) -> Booked {
    let field = |k: &str| snapshot.get(k).and_then(|v| v.parse().ok()).unwrap_or(0);
    Booked {
        balance_cents: field("b"),
        total_income_cents: field("i"),
        withdrawn_cents: field("w"),
    }
}

impl RedisRecord {
    /// The snapshot's figures, whether or not they can be trusted (the degraded view).
    pub fn snapshot_figures(&self) -> Booked {
        figures_of(&self.snapshot)
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
        let identity = short_identity(&self.identity)?;
        let written_here = self.snapshot.get("rid") == Some(&identity);
        let late_in_life = self
            .snapshot
            .get("age")
            .and_then(|v| v.parse::<i64>().ok())
            .is_some_and(|age| age >= quiet_ms);
        let fenced = self.snapshot.keys().any(|k| k.starts_with("f:"));
        (written_here && late_in_life && !fenced && !self.legacy && self.snapshot.contains_key("v"))
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

impl Tokens {
    pub fn new(redis: Arc<Redis>) -> Self {
        Self {
            redis,
            scripts: Arc::new(Scripts {
                store: crate::budget::stock_script(include_str!("store.lua")),
                mark: crate::store::script_with_identity(include_str!("mark.lua")),
                greet: crate::store::script(include_str!("greet.lua")),
            }),
            snapshot_compat: false,
        }
    }

    /// Keeps and reads the snapshot hash of earlier releases too, while instances of one
    /// may run (`wallet.snapshot_compat`).
    pub fn with_snapshot_compat(mut self, on: bool) -> Self {
        self.snapshot_compat = on;
        self
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
    /// whose change it announces begins: in the status hash, and in compat mode also in
    /// the legacy snapshot hash, where views of earlier releases look (mark.lua lifts
    /// both).
    pub async fn fence(&self, user: UserId) -> redis::RedisResult<Fence> {
        let id = crate::domain::hex(&rand::random::<[u8; 8]>());
        let now = crate::store::now_ms();
        let mut pipe = redis::pipe();
        pipe.atomic()
            .hset(self.redis.status_key(user), format!("=f:{id}"), now)
            .ignore();
        if self.snapshot_compat {
            pipe.hset(self.redis.legacy_snapshot_key(user), format!("f:{id}"), now)
                .ignore();
        }
        let _: () = pipe.query_async(&mut self.redis.conn()).await?;
        Ok(Fence(id))
    }

    /// Takes a fence down when its change did not happen (the transaction rolled back
    /// or found nothing to do); in both hashes (an instance in compat mode put it in
    /// both).
    pub async fn unfence(&self, user: UserId, fence: &Fence) -> redis::RedisResult<()> {
        let mut pipe = redis::pipe();
        pipe.atomic()
            .hdel(self.redis.status_key(user), format!("=f:{}", fence.0))
            .ignore()
            .hdel(
                self.redis.legacy_snapshot_key(user),
                format!("f:{}", fence.0),
            )
            .ignore();
        pipe.query_async(&mut self.redis.conn()).await
    }

    pub fn redis(&self) -> &Redis {
        &self.redis
    }

    /// What the token hash holds under each `(user, out_trade_no)`, in one round trip
    /// of one `HMGET` per user (`None`: nothing; [`TRIMMED`]: settled and trimmed).
    pub async fn held(&self, keys: &[(UserId, &str)]) -> redis::RedisResult<Vec<Option<Vec<u8>>>> {
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        // Each user's positions in `keys`.
        let mut users: HashMap<UserId, Vec<usize>> = HashMap::new();
        for (at, (user, _)) in keys.iter().enumerate() {
            users.entry(*user).or_default().push(at);
        }
        let mut pipe = redis::pipe();
        for (user, at) in &users {
            let fields: Vec<&str> = at.iter().map(|&i| keys[i].1).collect();
            pipe.cmd("HMGET")
                .arg(self.redis.tokens_key(*user))
                .arg(fields);
        }
        let replies: Vec<Vec<Option<Vec<u8>>>> = self.redis.query(&pipe).await?;
        let mut out: Vec<Option<Vec<u8>>> = vec![None; keys.len()];
        for ((_, at), values) in users.iter().zip(replies) {
            for (&i, value) in at.iter().zip(values) {
                out[i] = value;
            }
        }
        Ok(out)
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
    /// atomically: one MULTI/EXEC of the status hash (which holds the snapshot), whether
    /// a legacy snapshot hash exists, and `INFO server replication` (every key in the
    /// user's slot, and INFO answered by the node that holds it). A transaction rather
    /// than a script: the same atomicity at under half the Redis time (a script pays for
    /// each call it makes and for carrying the replies through Lua).
    pub async fn redis_record(&self, user: UserId) -> redis::RedisResult<RedisRecord> {
        let legacy_key = self.redis.legacy_snapshot_key(user);
        let mut pipe = redis::pipe();
        pipe.atomic().hgetall(self.redis.status_key(user));
        // In compat mode the legacy hash is read whole: the record holds the newer of the
        // two snapshots (an earlier release's mark writes only its own) and the fences
        // of both. Otherwise whether it exists is all a view needs.
        if self.snapshot_compat {
            pipe.hgetall(&legacy_key);
        } else {
            pipe.exists(&legacy_key);
        }
        pipe.cmd("INFO").arg("server").arg("replication");
        let (statuses, legacy, info): ViewReply = pipe.query_async(&mut self.redis.conn()).await?;
        let identity = crate::store::identity_of(&info);
        let snapshot = snapshot_fields(&statuses);
        let (snapshot, legacy) = if self.snapshot_compat {
            let legacy: HashMap<String, String> = redis::from_redis_value(&legacy)?;
            (newer_snapshot(snapshot, &legacy), false)
        } else {
            (snapshot, redis::from_redis_value(&legacy)?)
        };
        Ok(RedisRecord {
            pending: status::pending_in(user, &statuses).collect(),
            snapshot,
            identity,
            legacy,
        })
    }

    /// The figures of the newer of `record`'s snapshot and the legacy one, whether or
    /// not they can be trusted: what the degraded view shows when MySQL cannot answer.
    pub async fn degraded_figures(
        &self,
        user: UserId,
        record: &RedisRecord,
    ) -> redis::RedisResult<Booked> {
        if !record.legacy {
            return Ok(record.snapshot_figures());
        }
        let legacy: HashMap<String, String> = redis::AsyncCommands::hgetall(
            &mut self.redis.conn(),
            self.redis.legacy_snapshot_key(user),
        )
        .await?;
        Ok(figures_of(&newer_snapshot(
            record.snapshot.clone(),
            &legacy,
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_short_identity_is_24_characters_of_each_id() {
        let run_id = "0123456789abcdef0123456789abcdef01234567";
        let replid = "fedcba9876543210fedcba9876543210fedcba98";
        assert_eq!(
            short_identity(&format!("{run_id}:{replid}")).as_deref(),
            Some("0123456789abcdef01234567:fedcba9876543210fedcba98")
        );
        assert_eq!(short_identity(":"), None);
        assert_eq!(short_identity(&format!("{run_id}:")), None);
        assert_eq!(short_identity(run_id), None);
    }

    #[test]
    fn a_status_hash_gives_its_snapshot_fields_without_the_mark() {
        let pair = |k: &str, v: &str| (k.to_string(), v.to_string());
        let statuses = vec![
            pair("7_a_s_0_cash_live", "p|5|1|a|s|1"),
            pair("=s", "3|100|150|50"),
            pair("=r", "abc:def|120000"),
            pair("=f:ab", "9"),
        ];
        let snapshot = snapshot_fields(&statuses);
        let mut names: Vec<&str> = snapshot.keys().map(String::as_str).collect();
        names.sort_unstable();
        assert_eq!(names, ["age", "b", "f:ab", "i", "rid", "v", "w"]);
        assert_eq!(
            (
                &snapshot["v"][..],
                &snapshot["b"][..],
                &snapshot["i"][..],
                &snapshot["w"][..]
            ),
            ("3", "100", "150", "50")
        );
        assert_eq!(
            (&snapshot["rid"][..], &snapshot["age"][..]),
            ("abc:def", "120000")
        );
        assert_eq!(snapshot["f:ab"], "9");
        // A malformed snapshot gives no figures (and so proves nothing).
        let snapshot = snapshot_fields(&[pair("=s", "3|100"), pair("=r", "abc")]);
        assert!(snapshot.is_empty(), "{snapshot:?}");
        let snapshot = snapshot_fields(&[pair("=s", "3|100|x|0")]);
        assert!(snapshot.is_empty(), "{snapshot:?}");
        let user = UserId::parse(7).unwrap();
        assert_eq!(status::pending_in(user, &statuses).count(), 1);
    }
}
