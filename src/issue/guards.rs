//! Seckill guards (the seckill seed), in front of the budget: an operator-managed
//! **blacklist** of users and callers, and per scene ([`SceneGuards`]) an **open time**
//! before which awards are refused and the user flagged, **burst** flagging (a user's
//! requests reaching issuing more than once within one second), refusing **flagged**
//! users, and **one win per user** across rains. They compose with admission (random
//! fraction, then rate limits), which runs first; a replay of an award already issued
//! passes them (it changes nothing).
//!
//! Costs: the blacklist is a process-local copy of MySQL's table, refreshed with the
//! activity cache (and at once on this instance when an operator changes it); the open
//! time is a comparison; the Redis guards are one pipelined round trip per batch, and
//! only for scenes that turn them on.
//!
//! What Redis may lose of them (DESIGN.md) comes back from MySQL:
//! - **Flags** are written to Redis, which the award path reads, and to MySQL's
//!   `flagged_users` shortly after (a background writer, in batches). The flagged set
//!   carries a marker naming the identity of the Redis data it was restored in; a check
//!   that finds the marker gone or of another identity (a flush, a restart, a failover)
//!   restores the set from MySQL before it answers. A flag made less than a moment
//!   before a loss, not yet in MySQL, can be lost with it.
//! - **One-win claims** are made in Redis with the time the partition's current Redis
//!   life began. The award's own claim (made now, or held by a twin request) in a
//!   scene whose activity opened before that may stand where a lost claim stood, so it
//!   is checked against the ledger (the user's booked awards of the scene, cash or
//!   coupon, by out_trade_no prefix): a booked win refuses it, and the claim is set to
//!   the booked win so the next check needs no ledger. A win whose
//!   token was neither booked nor synced back by its client before the loss is known
//!   nowhere: that user can win the scene once more (the budget stays bounded); so can
//!   one whose token a worker had read from the stream before the loss and books only
//!   after this check read the ledger.
//!   A check that fails (MySQL down, buckets that keep moving) gives its claims back
//!   and answers 503.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, RwLock};

use serde::Serialize;
use sqlx::Row;

use crate::activity::SceneGuards;
use crate::domain::UserId;
use crate::error::{Error, Result};
use crate::ledger::Ledger;
use crate::store::{query_scripted, Db, FlaggedKeys, Redis};

/// Why a user was flagged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FlagReason {
    /// An award asked for before the scene's open time.
    Early,
    /// More than one request within one second.
    Burst,
}

impl FlagReason {
    pub fn as_str(self) -> &'static str {
        match self {
            FlagReason::Early => "early",
            FlagReason::Burst => "burst",
        }
    }
}

/// How far apart Redis's clock (which times a partition's life) and the instances'
/// (which time an activity's opening) may be: a life that began up to this long
/// before the activity opened is still treated as younger than it (the claims are
/// checked against the ledger when in doubt).
const CLOCK_SKEW_MS: i64 = 5_000;
/// Flags waiting for the MySQL writer; past it a flag is kept in Redis only.
const FLAG_QUEUE: usize = 16_384;
/// Flags per MySQL statement.
const FLAG_BATCH: usize = 500;

/// The operators' blacklist, as this instance holds it.
#[derive(Debug, Default)]
struct Blacklist {
    users: HashSet<i64>,
    callers: HashSet<String>,
}

/// One blacklist entry.
#[derive(Debug, Clone, Serialize, PartialEq, utoipa::ToSchema)]
pub struct BlacklistEntry {
    /// user or caller.
    pub kind: String,
    pub value: String,
    pub reason: String,
}

/// A flagged user.
#[derive(Debug, Clone, Serialize, PartialEq, utoipa::ToSchema)]
pub struct Flagged {
    pub user_id: i64,
    /// early or burst: the last reason.
    pub reason: String,
    pub flagged_at_ms: i64,
}

/// An award the Redis guards look at.
/// How a scene is named in a user's one-win claims: `{activity}/{scene}` (scene ids are
/// unique within an activity only).
pub fn win_scene(activity: &str, scene: &str) -> String {
    format!("{activity}/{scene}")
}

pub struct Guarded<'a> {
    pub user: UserId,
    pub guards: &'a SceneGuards,
    /// [`win_scene`].
    pub scene: String,
    pub out_trade_no: &'a str,
    /// When the scene's activity opened (ms): claims made before the current Redis life
    /// began may have been lost.
    pub opened_at_ms: i64,
}

struct Scripts {
    claim_wins: redis::Script,
    flagged: redis::Script,
    set_whole: redis::Script,
    restore_flags: redis::Script,
}

pub struct Guards {
    redis: Arc<Redis>,
    db: Arc<Db>,
    ledger: Ledger,
    list: RwLock<Arc<Blacklist>>,
    scripts: Scripts,
    /// To the MySQL writer of flags.
    durable: tokio::sync::mpsc::Sender<(i64, FlagReason, i64)>,
    /// One restore of the flagged set at a time on this instance.
    restoring: tokio::sync::Mutex<()>,
    /// Held by a refresh of the blacklist from its read to its store, so a refresh that
    /// read before a change never stores after one that read it.
    refreshing: tokio::sync::Mutex<()>,
}

impl Guards {
    /// Starts the writer that keeps flags in MySQL (it ends with the last handle).
    pub fn new(redis: Arc<Redis>, db: Arc<Db>, ledger: Ledger) -> Self {
        let (durable, queue) = tokio::sync::mpsc::channel(FLAG_QUEUE);
        crate::shadow::spawn(keep_flags(db.clone(), queue));
        Self {
            redis,
            db,
            ledger,
            list: RwLock::default(),
            scripts: Scripts {
                claim_wins: crate::store::script_with_identity(include_str!("claim_wins.lua")),
                flagged: crate::store::script_with_identity(include_str!("flagged.lua")),
                // KEYS: the marker, the restore's token; ARGV: the identity the
                // restore began under, its token. A flush or a change of identity
                // during the restore leaves the set not whole.
                set_whole: crate::store::script_with_identity(
                    "if run_id() == ARGV[1] and redis.call('GET', KEYS[2]) == ARGV[2] then \
                     redis.call('SET', KEYS[1], ARGV[1]) redis.call('DEL', KEYS[2]) \
                     return 1 end return 0",
                ),
                // KEYS: the flagged set, the reasons; ARGV: (user, at ms, reason) per
                // flag. A flag's time and reason go in only where its time is later
                // than what the set holds (a flag made since the loss stays whole).
                restore_flags: crate::store::script(
                    "for i = 1, #ARGV, 3 do \
                     if redis.call('ZADD', KEYS[1], 'GT', 'CH', ARGV[i + 1], ARGV[i]) == 1 then \
                     redis.call('HSET', KEYS[2], ARGV[i], ARGV[i + 2]) end end return 0",
                ),
            },
            durable,
            restoring: tokio::sync::Mutex::new(()),
            refreshing: tokio::sync::Mutex::new(()),
        }
    }

    pub fn scripts(&self) -> [&redis::Script; 4] {
        [
            &self.scripts.claim_wins,
            &self.scripts.flagged,
            &self.scripts.set_whole,
            &self.scripts.restore_flags,
        ]
    }

    /// Begins the Redis life of every partition that has none of the current identity
    /// (see `claim_wins.lua`), so that on a Redis where nothing was lost, activities
    /// created from now on opened after it and their claims need no ledger check.
    pub async fn begin_lives(&self) -> Result<()> {
        let mut pipe = redis::pipe();
        for p in 0..self.redis.partitions() {
            let life = self.redis.life_key(p);
            pipe.add_command(crate::store::evalsha(&self.scripts.claim_wins, &[&life]));
        }
        query_scripted::<redis::Value>(&self.redis, &pipe, &self.scripts()).await?;
        Ok(())
    }

    /// Reads the blacklist from MySQL into this instance.
    pub async fn refresh(&self) -> Result<()> {
        let _one_at_a_time = self.refreshing.lock().await;
        let rows = sqlx::query("SELECT kind, value FROM blacklist")
            .fetch_all(self.db.main())
            .await?;
        let mut list = Blacklist::default();
        for row in &rows {
            let kind = crate::ledger::text(row, 0)?;
            let value = crate::ledger::text(row, 1)?;
            match kind.as_str() {
                "user" => {
                    if let Ok(id) = value.parse() {
                        list.users.insert(id);
                    }
                }
                _ => {
                    list.callers.insert(value);
                }
            }
        }
        *self.list.write().expect("blacklist lock poisoned") = Arc::new(list);
        Ok(())
    }

    /// The guards that need no round trip: the blacklist and the scene's open time
    /// (`Some(flag)`: the user is to be flagged for it).
    pub fn check_local(
        &self,
        caller: &str,
        user: UserId,
        guards: &SceneGuards,
        now_ms: i64,
    ) -> std::result::Result<(), (Error, Option<FlagReason>)> {
        let list = self.list.read().expect("blacklist lock poisoned").clone();
        if list.callers.contains(caller) {
            crate::metrics::guard_refusal("blacklist");
            return Err((
                Error::Forbidden(format!("caller `{caller}` is blacklisted")),
                None,
            ));
        }
        if list.users.contains(&user.get()) {
            crate::metrics::guard_refusal("blacklist");
            return Err((
                Error::Forbidden(format!("user {user} is blacklisted")),
                None,
            ));
        }
        if let Some(opens) = guards.opens_at {
            if now_ms < opens.timestamp_millis() {
                crate::metrics::guard_refusal("early");
                return Err((
                    Error::ActivityClosed(format!("the scene opens at {}", opens.to_rfc3339())),
                    Some(FlagReason::Early),
                ));
            }
        }
        Ok(())
    }

    /// Flags users: in Redis at once, queued for MySQL (best effort: a failure is logged).
    pub async fn flag(&self, users: &[(UserId, FlagReason)], now_ms: i64) {
        if users.is_empty() {
            return;
        }
        let keys = self.redis.flagged_keys();
        let mut pipe = redis::pipe();
        for (user, reason) in users {
            crate::metrics::user_flagged(reason.as_str());
            pipe.zadd(&keys.set, user.get(), now_ms).ignore();
            pipe.hset(&keys.why, user.get(), reason.as_str()).ignore();
            if self
                .durable
                .try_send((user.get(), *reason, now_ms))
                .is_err()
            {
                tracing::warn!(
                    user = user.get(),
                    "flag writer queue full: flag kept in Redis only"
                );
            }
        }
        if let Err(err) = self.redis.query::<()>(&pipe).await {
            tracing::warn!(error = %err, "flagging users failed");
        }
    }

    /// Restores the flagged set from MySQL unless it is whole. What Redis holds is
    /// written to MySQL first (flags of an earlier release, or ones the writer dropped),
    /// then MySQL's flags go into Redis: a later time wins, and the reason with it. The
    /// marker is set only if the data kept its identity and was not flushed (the
    /// restore's token is still there) through the restore.
    async fn restore_flags(&self) -> Result<()> {
        let _one = self.restoring.lock().await;
        let keys = self.redis.flagged_keys();
        let (whole, rid, _) = self.read_flagged(&[]).await?;
        if whole {
            return Ok(());
        }
        // The token stands for "no flush since this restore began": restores that run
        // at once (on several instances) share it, and only a flush takes it away.
        let mut pipe = redis::pipe();
        pipe.cmd("SET")
            .arg(&keys.restoring)
            .arg(format!("{:016x}", rand::random::<u64>()))
            .arg("NX")
            .arg("PX")
            .arg(600_000);
        pipe.get(&keys.restoring);
        pipe.zrange_withscores(&keys.set, 0, -1).hgetall(&keys.why);
        // Every command of a pipeline answers here (see `query_scripted`).
        type Held = (redis::Value, String, Vec<(i64, i64)>, HashMap<i64, String>);
        let (_, token, held, reasons): Held = self.redis.query(&pipe).await?;
        // A flag without its reason (written half before a loss) is not worth a row
        // that could hide a real reason.
        let mut held: Vec<(i64, String, i64)> = held
            .into_iter()
            .filter_map(|(user, at)| Some((user, reasons.get(&user)?.clone(), at)))
            .collect();
        held.sort_unstable();
        for chunk in held.chunks(FLAG_BATCH) {
            upsert_flags(&self.db, chunk).await?;
        }
        let rows: Vec<(i64, String, i64)> =
            sqlx::query_as("SELECT user_id, reason, flagged_at_ms FROM flagged_users")
                .fetch_all(self.db.main())
                .await?;
        for chunk in rows.chunks(FLAG_BATCH) {
            let mut pipe = redis::pipe();
            let mut cmd =
                crate::store::evalsha(&self.scripts.restore_flags, &[&keys.set, &keys.why]);
            for (user, reason, at) in chunk {
                cmd.arg(*user).arg(*at).arg(reason);
            }
            pipe.add_command(cmd).ignore();
            query_scripted::<()>(&self.redis, &pipe, &self.scripts()).await?;
        }
        let mut pipe = redis::pipe();
        pipe.add_command(crate::store::evalsha(
            &self.scripts.set_whole,
            &[&keys.whole, &keys.restoring],
        ))
        .arg(&rid)
        .arg(&token)
        .ignore();
        query_scripted::<()>(&self.redis, &pipe, &self.scripts()).await?;
        tracing::info!(flagged = rows.len(), "flagged users restored from MySQL");
        Ok(())
    }

    /// Whether the flagged set is whole, the identity of the Redis data, and whether
    /// each of `users` is flagged (`flagged.lua`).
    async fn read_flagged(&self, users: &[i64]) -> Result<(bool, String, Vec<bool>)> {
        let mut pipe = redis::pipe();
        pipe.add_command(self.flagged_call(users));
        let (reply,): (redis::Value,) = query_scripted(&self.redis, &pipe, &self.scripts()).await?;
        parse_flagged(reply)
    }

    fn flagged_call(&self, users: &[i64]) -> redis::Cmd {
        let keys = self.redis.flagged_keys();
        let mut cmd = crate::store::evalsha(&self.scripts.flagged, &[&keys.set, &keys.whole]);
        for user in users {
            cmd.arg(*user);
        }
        cmd
    }

    /// Whether each of `users` is flagged, from a whole flagged set (restored first if
    /// Redis lost it).
    async fn flagged_whole(&self, users: &[i64]) -> Result<Vec<bool>> {
        let (whole, _, flagged) = self.read_flagged(users).await?;
        if whole {
            return Ok(flagged);
        }
        self.restore_flags().await?;
        let (_, _, flagged) = self.read_flagged(users).await?;
        Ok(flagged)
    }

    /// The guards kept in Redis, for awards not issued before: bursts (flag), flagged
    /// users (refuse, where the scene says so) and one win per user (claimed here for
    /// this out_trade_no; [`Guards::release_wins`] gives a claim back when the award is
    /// not issued after all). One pipelined round trip; more only after Redis lost
    /// guard state (the flagged set restored, new claims checked against the ledger).
    pub async fn check_shared(&self, awards: &[Guarded<'_>], now_ms: i64) -> Vec<Result<()>> {
        let mut made = Vec::new();
        match self.check_shared_in(awards, now_ms, &mut made).await {
            Ok(out) => out,
            Err(err) => {
                // The claims this call made are given back (only where the award still
                // holds no token); a twin request's claim is the twin's to keep.
                self.release_wins(&made).await;
                awards.iter().map(|_| Err(err.duplicate())).collect()
            }
        }
    }

    /// [`Guards::check_shared`]; `made`: the one-win claims this call made, as soon as
    /// Redis answered.
    async fn check_shared_in(
        &self,
        awards: &[Guarded<'_>],
        now_ms: i64,
        made: &mut Vec<(UserId, String, String)>,
    ) -> Result<Vec<Result<()>>> {
        // Every command answers (the pipeline runs per slot on a cluster): `n` counts
        // them all.
        let mut pipe = redis::pipe();
        let mut bursts: Vec<Option<usize>> = Vec::with_capacity(awards.len());
        let mut refusing: Vec<i64> = Vec::new();
        let mut n = 0;
        let mut by_partition: HashMap<u32, Vec<usize>> = HashMap::new();
        for (k, a) in awards.iter().enumerate() {
            let g = a.guards;
            bursts.push(g.flag_bursts.then(|| {
                let key = self.redis.burst_key(a.user, now_ms / 1000);
                pipe.incr(&key, 1).pexpire(&key, 2_000);
                n += 2;
                n - 2
            }));
            if g.refuse_flagged {
                refusing.push(a.user.get());
            }
            if g.one_win_per_user {
                by_partition
                    .entry(self.redis.partition_of(a.user))
                    .or_default()
                    .push(k);
            }
        }
        // One claim call per partition (one identity read for all its awards).
        let mut wins: Vec<Option<(usize, usize)>> = vec![None; awards.len()];
        for (p, ks) in &by_partition {
            let life = self.redis.life_key(*p);
            let mut keys = vec![life];
            keys.extend(ks.iter().map(|&k| self.redis.wins_key(awards[k].user)));
            let keys: Vec<&str> = keys.iter().map(String::as_str).collect();
            let mut cmd = crate::store::evalsha(&self.scripts.claim_wins, &keys);
            for (at, &k) in ks.iter().enumerate() {
                cmd.arg(&awards[k].scene).arg(awards[k].out_trade_no);
                wins[k] = Some((n, at + 1));
            }
            pipe.add_command(cmd);
            n += 1;
        }
        let flagged_at = (!refusing.is_empty()).then(|| {
            pipe.add_command(self.flagged_call(&refusing));
            n
        });
        if pipe.is_empty() {
            return Ok(awards.iter().map(|_| Ok(())).collect());
        }
        let values: Vec<redis::Value> = query_scripted(&self.redis, &pipe, &self.scripts()).await?;
        let int = |i: usize| -> Option<i64> { redis::from_redis_value(&values[i]).ok() };
        // One-win claims: the holder of each scene's claim, and those of this call's
        // awards that a lost claim may have stood before.
        let mut holders: Vec<Option<String>> = vec![None; awards.len()];
        let mut unsure: Vec<usize> = Vec::new();
        let mut replies: HashMap<usize, Vec<Option<String>>> = HashMap::new();
        for (k, (a, win)) in awards.iter().zip(&wins).enumerate() {
            if let Some((i, at)) = *win {
                if let std::collections::hash_map::Entry::Vacant(e) = replies.entry(i) {
                    e.insert(redis::from_redis_value(&values[i])?);
                }
                let reply = &replies[&i];
                let since: i64 = reply
                    .first()
                    .cloned()
                    .flatten()
                    .and_then(|s| s.parse().ok())
                    .unwrap_or(i64::MAX);
                let created = reply.get(2 * at - 1).cloned().flatten().as_deref() == Some("1");
                let holder = reply.get(2 * at).cloned().flatten();
                if created {
                    made.push((a.user, a.scene.clone(), a.out_trade_no.to_string()));
                }
                // The award's own claim, made now or by a twin request still on its
                // way (its token not stored yet): either may stand where a lost one did.
                if holder.as_deref() == Some(a.out_trade_no)
                    && since.saturating_add(CLOCK_SKEW_MS) > a.opened_at_ms
                {
                    unsure.push(k);
                }
                holders[k] = holder;
            }
        }
        let flagged: HashSet<i64> = match flagged_at {
            None => HashSet::new(),
            Some(i) => {
                let (whole, _, answers) = parse_flagged(values[i].clone())?;
                let answers = if whole {
                    answers
                } else {
                    self.flagged_whole(&refusing).await?
                };
                refusing
                    .iter()
                    .zip(answers)
                    .filter_map(|(u, f)| f.then_some(*u))
                    .collect()
            }
        };
        self.check_booked_wins(awards, &unsure, &mut holders)
            .await?;

        let mut flags = Vec::new();
        let mut unclaim = Vec::new();
        let mut out = Vec::with_capacity(awards.len());
        for ((a, burst), holder) in awards.iter().zip(bursts).zip(holders) {
            let bursting = burst.and_then(int).is_some_and(|count| count > 1);
            if bursting {
                flags.push((a.user, FlagReason::Burst));
            }
            let was_flagged = flagged.contains(&a.user.get());
            let claimed = holder.as_deref() == Some(a.out_trade_no);
            if a.guards.refuse_flagged && (was_flagged || bursting) {
                crate::metrics::guard_refusal("flagged");
                if claimed {
                    // Claimed in the same round trip: given back.
                    unclaim.push((a.user, a.scene.clone(), a.out_trade_no.to_string()));
                }
                out.push(Err(Error::Forbidden(format!("user {} is flagged", a.user))));
                continue;
            }
            if a.guards.one_win_per_user && !claimed {
                crate::metrics::guard_refusal("one_win");
                out.push(Err(Error::AlreadyWon(format!(
                    "user {} already won scene {}",
                    a.user, a.scene
                ))));
                continue;
            }
            out.push(Ok(()));
        }
        self.flag(&flags, now_ms).await;
        self.release_wins(&unclaim).await;
        Ok(out)
    }

    /// For the awards at `unsure` (the award's own claim, where a lost one may have
    /// stood before it), looks for a booked win of the same user and scene in the
    /// ledger: one found becomes the claim (in `holders` and in Redis), so the award is
    /// refused.
    async fn check_booked_wins(
        &self,
        awards: &[Guarded<'_>],
        unsure: &[usize],
        holders: &mut [Option<String>],
    ) -> Result<()> {
        if unsure.is_empty() {
            return Ok(());
        }
        // out_trade_no is `{user}_{activity}_{scene}_{rain}_{type}_{stage}`, and no id
        // holds `_`: the prefix names one user's awards of one scene.
        let prefix = |a: &Guarded<'_>| format!("{}_{}_", a.user, a.scene.replacen('/', "_", 1));
        let prefixes: Vec<String> = unsure.iter().map(|&k| prefix(&awards[k])).collect();
        let booked = self.ledger.awards_beginning(&prefixes).await?;
        let mut pipe = redis::pipe();
        for (&k, p) in unsure.iter().zip(&prefixes) {
            let a = &awards[k];
            if let Some(won) = booked
                .iter()
                .find(|otn| otn.starts_with(p.as_str()) && otn.as_str() != a.out_trade_no)
            {
                pipe.hset(self.redis.wins_key(a.user), &a.scene, won)
                    .ignore();
                holders[k] = Some(won.clone());
            }
        }
        crate::metrics::guard_ledger_checks(unsure.len());
        if !pipe.is_empty() {
            if let Err(err) = self.redis.query::<()>(&pipe).await {
                tracing::warn!(error = %err, "setting one-win claims from the ledger failed");
            }
        }
        Ok(())
    }

    /// Gives back one-win claims of awards that were not issued: a claim goes only when
    /// it is this award's and no token of that out_trade_no is held (a twin request of
    /// the same award may have issued it), checked atomically in the user's slot. Best
    /// effort: a claim left behind refuses that user's next win of the scene.
    pub async fn release_wins(&self, claims: &[(UserId, String, String)]) {
        if claims.is_empty() {
            return;
        }
        let mut pipe = redis::pipe();
        for (user, scene, otn) in claims {
            pipe.cmd("EVAL")
                .arg(
                    "if redis.call('HGET', KEYS[1], ARGV[1]) == ARGV[2] \
                     and redis.call('HEXISTS', KEYS[2], ARGV[2]) == 0 then \
                     return redis.call('HDEL', KEYS[1], ARGV[1]) end return 0",
                )
                .arg(2)
                .arg(self.redis.wins_key(*user))
                .arg(self.redis.tokens_key(*user))
                .arg(scene)
                .arg(otn);
        }
        if let Err(err) = self.redis.query::<()>(&pipe).await {
            tracing::warn!(error = %err, "releasing one-win claims failed");
        }
    }

    /// The flagged users, the latest first.
    pub async fn flagged(&self, limit: usize) -> Result<Vec<Flagged>> {
        self.flagged_whole(&[]).await?;
        let FlaggedKeys { set, why, .. } = self.redis.flagged_keys();
        let mut conn = self.redis.conn();
        let users: Vec<(i64, f64)> = redis::cmd("ZREVRANGE")
            .arg(&set)
            .arg(0)
            .arg(limit.saturating_sub(1) as i64)
            .arg("WITHSCORES")
            .query_async(&mut conn)
            .await?;
        let mut out = Vec::with_capacity(users.len());
        for (user, at) in users {
            let reason: Option<String> = redis::AsyncCommands::hget(&mut conn, &why, user).await?;
            out.push(Flagged {
                user_id: user,
                reason: reason.unwrap_or_default(),
                flagged_at_ms: at as i64,
            });
        }
        Ok(out)
    }

    /// Adds or removes a blacklist entry, then reloads this instance's copy (others
    /// see it at their next refresh).
    pub async fn set_blacklisted(
        &self,
        kind: &str,
        value: &str,
        reason: &str,
        on: bool,
    ) -> Result<()> {
        if !matches!(kind, "user" | "caller") {
            return Err(Error::InvalidRequest("kind must be user or caller".into()));
        }
        if kind == "user" {
            UserId::parse(
                value
                    .parse::<i64>()
                    .map_err(|_| Error::InvalidRequest("value must be a user id".into()))?,
            )?;
        }
        if value.is_empty() || value.len() > 64 || !value.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(Error::InvalidRequest(
                "value must be 1-64 visible ASCII characters".into(),
            ));
        }
        if reason.chars().count() > 200 {
            return Err(Error::InvalidRequest(
                "reason must be at most 200 characters".into(),
            ));
        }
        if on {
            sqlx::query("INSERT INTO blacklist (kind, value, reason) VALUES (?, ?, ?) ON DUPLICATE KEY UPDATE reason = VALUES(reason)")
                .bind(kind)
                .bind(value)
                .bind(reason)
                .execute(self.db.main())
                .await?;
        } else {
            sqlx::query("DELETE FROM blacklist WHERE kind = ? AND value = ?")
                .bind(kind)
                .bind(value)
                .execute(self.db.main())
                .await?;
        }
        self.refresh().await
    }

    /// The blacklist as MySQL holds it.
    pub async fn blacklist(&self) -> Result<Vec<BlacklistEntry>> {
        let rows = sqlx::query("SELECT kind, value, reason FROM blacklist ORDER BY kind, value")
            .fetch_all(self.db.main())
            .await?;
        rows.iter()
            .map(|r| {
                Ok(BlacklistEntry {
                    kind: crate::ledger::text(r, 0)?,
                    value: crate::ledger::text(r, 1)?,
                    reason: r.try_get(2)?,
                })
            })
            .collect()
    }
}

/// A `flagged.lua` reply: whether the set is whole, the identity, one answer per user.
fn parse_flagged(reply: redis::Value) -> Result<(bool, String, Vec<bool>)> {
    let values: Vec<redis::Value> = redis::from_owned_redis_value(reply)?;
    let mut it = values.into_iter();
    let whole: i64 = redis::from_owned_redis_value(it.next().unwrap_or(redis::Value::Nil))?;
    let rid: String = redis::from_owned_redis_value(it.next().unwrap_or(redis::Value::Nil))?;
    let users = it
        .map(|v| redis::from_owned_redis_value::<i64>(v).map(|f| f == 1))
        .collect::<redis::RedisResult<Vec<bool>>>()?;
    Ok((whole == 1, rid, users))
}

/// Keeps flags in MySQL's `flagged_users`, in batches of what queued meanwhile (the
/// latest flag of a user wins). A batch MySQL refuses three times is dropped, logged:
/// those flags stay in Redis only (until a restore writes what Redis holds).
async fn keep_flags(db: Arc<Db>, mut queue: tokio::sync::mpsc::Receiver<(i64, FlagReason, i64)>) {
    while let Some(first) = queue.recv().await {
        // Ordered by user: concurrent writers lock rows in the same order.
        let mut batch: BTreeMap<i64, (FlagReason, i64)> = BTreeMap::new();
        let add = |batch: &mut BTreeMap<i64, (FlagReason, i64)>, (user, reason, at)| {
            let e = batch.entry(user).or_insert((reason, at));
            if at >= e.1 {
                *e = (reason, at);
            }
        };
        add(&mut batch, first);
        while batch.len() < FLAG_BATCH {
            match queue.try_recv() {
                Ok(flag) => add(&mut batch, flag),
                Err(_) => break,
            }
        }
        for attempt in 1..=3 {
            let rows: Vec<(i64, String, i64)> = batch
                .iter()
                .map(|(u, (r, at))| (*u, r.as_str().to_string(), *at))
                .collect();
            match upsert_flags(&db, &rows).await {
                Ok(()) => break,
                Err(err) if attempt < 3 => {
                    tracing::warn!(error = %err, "keeping flags in MySQL failed; will retry");
                    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                }
                Err(err) => {
                    tracing::error!(error = %err, flags = batch.len(), "flags not kept in MySQL: in Redis only");
                }
            }
        }
    }
}

/// Writes flags `(user, reason, at ms)`, ordered by user, to `flagged_users`: a later
/// flag replaces an earlier one's reason and time.
async fn upsert_flags(
    db: &Db,
    rows: &[(i64, String, i64)],
) -> std::result::Result<(), sqlx::Error> {
    if rows.is_empty() {
        return Ok(());
    }
    let mut q = sqlx::QueryBuilder::<sqlx::MySql>::new(
        "INSERT INTO flagged_users (user_id, reason, flagged_at_ms) ",
    );
    q.push_values(rows, |mut row, (user, reason, at)| {
        row.push_bind(*user)
            .push_bind(reason.as_str())
            .push_bind(*at);
    });
    // Assignments run left to right: the reason compares against the old time.
    q.push(
        " ON DUPLICATE KEY UPDATE \
         reason = IF(VALUES(flagged_at_ms) >= flagged_at_ms, VALUES(reason), reason), \
         flagged_at_ms = GREATEST(flagged_at_ms, VALUES(flagged_at_ms))",
    );
    q.build().execute(db.main()).await?;
    Ok(())
}
