//! An activity's budget: granted by MySQL in chunks, spent from Redis sub-stocks.
//!
//! MySQL is the budget's source of truth (DESIGN.md, "What Redis may lose"). Redis only
//! ever holds *grants*: chunks moved from the activity's ungranted budget by a MySQL
//! transaction (`granted + chunk <= budget`) and applied to one sub-stock exactly once
//! (grant.lua records the grant id). The sub-stocks of an activity belong to a
//! *generation*; awards take from the live one only, and a generation ends in one of
//! two ways:
//!
//! - **drained** (leak repair, a changed `issue.sub_stocks`): every sub-stock is drained
//!   for good and what it still held goes back to the ungranted budget, exactly. Once
//!   the awards in flight at that moment had time to store their tokens, the generation's
//!   leak (taken, never a token) is known exactly and returned too.
//! - **lost**: a sub-stock that a Redis flush, a restart or a failover may have rewound
//!   (missing, or initialised by another Redis process: scripts compare `run_id`) makes
//!   the whole generation *in doubt*. Its grants are never applied again; issuance goes on
//!   from a new generation funded from the ungranted budget. Reconciliation releases the
//!   part the ledger and the synced client copies prove unspent.
//!
//! Invariant: issued ≤ granted ≤ budget, whatever Redis forgets. Every change of the
//! durable figures (grant, drain, leak, release) runs in a MySQL transaction that locks
//! the activity row; repair, release and re-layout also hold a per-activity lock, so they
//! are serialized and a second run finds nothing.

use std::collections::{HashMap, HashSet};
use std::sync::{Mutex, RwLock};
use std::time::{Duration, Instant};

use anyhow::Context;
use rand::seq::SliceRandom;
use rand::Rng;
use redis::Script;
use sqlx::{MySql, Row, Transaction};

use crate::ledger::Ledger;
use crate::store::{evalsha, query_scripted, Db, Redis, StockPlacement};
use crate::tokens::Tokens;

mod generations;
mod grant;
mod repair;
mod take;

/// Awards per take_many.lua call at most, on one sub-stock: large enough that a batch of
/// 1,000 costs a handful of calls, small enough that a burst still spreads over the
/// sub-stocks (and sums stay exact in Lua, see take_many.lua).
pub const TAKE_CHUNK: usize = 64;

/// How long a repair, release or re-layout waits for another one of the same activity.
const LOCK_WAIT_SECS: i64 = 30;

/// One generation of an activity's sub-stocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Gen {
    pub gen: i64,
    pub sub_stocks: u32,
    pub placement: StockPlacement,
}

impl Gen {
    /// A generation as `budget_generations` records it.
    pub fn of_row(gen: i64, sub_stocks: i32, stock_partitions: i32) -> Self {
        Self {
            gen,
            sub_stocks: sub_stocks.max(1) as u32,
            placement: StockPlacement::recorded(stock_partitions),
        }
    }

    /// The key of this generation's sub-stock `index`.
    pub fn stock_key(&self, redis: &Redis, activity: &str, index: u32) -> String {
        redis.sub_stock_key(activity, self.gen, index, self.placement)
    }

    /// The sub-stocks a store call of `partition` can take from in its own slot: on a
    /// cluster only those placed in that partition (none for a spread generation); on one
    /// node every one.
    pub fn takes_in(&self, redis: &Redis, partition: u32, index: u32) -> bool {
        !redis.is_cluster() || self.placement.partition_of(index) == Some(partition)
    }
}

/// What a take got, per sub-stock of one generation, so it can be given back exactly.
#[derive(Debug, Clone)]
pub struct Taken {
    /// The generation taken from (its sub-stocks' keys, to give back to).
    pub gen: Gen,
    pub parts: Vec<(u32, i64)>,
}

impl Taken {
    pub fn total(&self) -> i64 {
        self.parts.iter().map(|(_, c)| c).sum()
    }
}

/// The budget's durable figures, with what the live generation's sub-stocks hold.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct BudgetFigures {
    pub budget_cents: i64,
    /// Moved to Redis and not given back (spent, spendable, or in doubt).
    pub granted_cents: i64,
    /// Granted, then lost with Redis: frozen until reconciliation releases it.
    pub in_doubt_cents: i64,
    /// Only MySQL holds it: `budget - granted`.
    pub ungranted_cents: i64,
    /// What the live generation's sub-stocks hold now.
    pub available_cents: i64,
    /// What may still be issued: `ungranted + available`.
    pub remaining_cents: i64,
    /// Taken for awards (or leaked): `granted - in_doubt - available`, less what a
    /// generation being drained still holds.
    pub taken_cents: i64,
}

/// What a leak repair did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct Repair {
    /// Taken but provably never a token: back in the ungranted budget now.
    pub repaired_cents: i64,
    /// Unspent budget of the generation(s) drained now: back in the ungranted budget.
    pub drained_cents: i64,
    /// Drained generations whose awards may still be in flight: a later repair (after
    /// `issue.in_flight_grace_ms`) settles their leak.
    pub settling_generations: i64,
}

/// What an in-doubt release did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct Release {
    /// Lost generations' budget that the ledger and the synced tokens prove unspent.
    pub released_cents: i64,
    pub resolved_generations: i64,
    /// Lost generations still inside `issue.in_doubt_grace_ms` (clients may still sync).
    pub waiting_generations: i64,
}

/// Why a sub-stock script did not spend (see stock.lua).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum StockState {
    Spendable,
    Drained,
    Lost,
}

impl StockState {
    pub(super) fn of(code: i64) -> Self {
        match code {
            0 => StockState::Spendable,
            1 => StockState::Drained,
            _ => StockState::Lost,
        }
    }

    /// [`StockState::of`], logging which sub-stock was found lost and how.
    pub(super) fn seen(code: i64, activity: &str, gen: i64, stock: u32) -> Self {
        let state = Self::of(code);
        if state == StockState::Lost {
            tracing::error!(
                activity,
                gen,
                stock,
                how = if code == 3 {
                    "missing"
                } else {
                    "another Redis identity"
                },
                "budget sub-stock lost"
            );
        }
        state
    }
}

/// Per sub-stock of one generation: skipped until this instant (seen empty).
type SkipMarks = Vec<Option<Instant>>;

pub struct BudgetSettings {
    /// Sub-stocks of every new generation.
    pub sub_stocks: u32,
    /// Where a new generation's sub-stocks live.
    pub placement: StockPlacement,
    /// How long a sub-stock seen empty (or an activity seen fully granted) is skipped.
    pub recheck: Duration,
    /// A grant is `max(per-award cap, budget / (sub_stocks * grant_slices))`.
    pub grant_slices: u32,
    /// A drained generation's leak is settled only after awards in flight at the drain
    /// had this long to store their tokens.
    pub in_flight_grace: Duration,
    /// A lost generation is released only after clients had this long to sync.
    pub in_doubt_grace: Duration,
}

pub struct Budget {
    settings: BudgetSettings,
    /// The issuance counters (what each generation issued).
    tokens: Tokens,
    /// What each generation booked.
    ledger: Ledger,
    take: Script,
    take_many: Script,
    grant: Script,
    init: Script,
    drain: Script,
    give_back: Script,
    /// Per activity: its live generation.
    live: RwLock<HashMap<String, Gen>>,
    /// Per activity and generation, per sub-stock: skipped until this instant.
    exhausted: Mutex<HashMap<(String, i64), SkipMarks>>,
    /// Per activity: when its sub-stocks last got money (a grant applied, cents given
    /// back, marks forgotten). A sub-stock read empty before that instant is not marked
    /// exhausted: the read is older than the money.
    refunded_at: Mutex<HashMap<String, Instant>>,
    /// Activities whose whole budget was granted when last asked: no grant is asked for
    /// again until this instant.
    fully_granted: Mutex<HashMap<String, Instant>>,
    /// Repairs, releases and re-layouts of this instance queue here before they ask
    /// MySQL for the activity lock, so waiters never hold pool connections.
    maintenance: tokio::sync::Mutex<()>,
}

/// The shared head of every sub-stock script: what a sub-stock's state is and how
/// amounts are taken from it. Token stores that take budget prepend it too.
const STOCK_LUA: &str = include_str!("stock.lua");

/// A script working on sub-stocks: the Redis identity and [`STOCK_LUA`] before `body`.
pub fn stock_script(body: &str) -> Script {
    crate::store::script_with_identity(&format!("{STOCK_LUA}\n{body}"))
}

impl Budget {
    pub fn new(settings: BudgetSettings, tokens: Tokens, ledger: Ledger) -> Self {
        Self {
            settings,
            tokens,
            ledger,
            take: stock_script(include_str!("take.lua")),
            take_many: stock_script(include_str!("take_many.lua")),
            grant: stock_script(include_str!("grant.lua")),
            init: stock_script(include_str!("init.lua")),
            drain: stock_script(include_str!("drain.lua")),
            give_back: stock_script(include_str!("give_back.lua")),
            live: RwLock::new(HashMap::new()),
            exhausted: Mutex::new(HashMap::new()),
            refunded_at: Mutex::new(HashMap::new()),
            fully_granted: Mutex::new(HashMap::new()),
            maintenance: tokio::sync::Mutex::new(()),
        }
    }

    pub fn scripts(&self) -> [&Script; 6] {
        [
            &self.take,
            &self.take_many,
            &self.grant,
            &self.init,
            &self.drain,
            &self.give_back,
        ]
    }

    pub fn live_gen(&self, activity: &str) -> Option<Gen> {
        self.live
            .read()
            .expect("live map poisoned")
            .get(activity)
            .copied()
    }

    pub(super) fn set_live(&self, activity: &str, gen: Option<Gen>) {
        let mut map = self.live.write().expect("live map poisoned");
        match gen {
            Some(g) => map.insert(activity.to_string(), g),
            None => map.remove(activity),
        };
    }

    /// One grant: `max(per-award cap, budget / (sub_stocks * grant_slices))`.
    pub(super) fn chunk(&self, budget: i64, cap: i64, gen: Gen) -> i64 {
        grant_chunk(budget, cap, gen.sub_stocks, self.settings.grant_slices)
    }

    pub fn forget_exhausted(&self, activity: &str) {
        self.note_refunded(activity);
        self.exhausted
            .lock()
            .expect("exhausted map poisoned")
            .retain(|(a, _), _| a != activity);
        self.fully_granted
            .lock()
            .expect("fully granted map poisoned")
            .remove(activity);
    }

    pub(super) fn is_fully_granted(&self, activity: &str) -> bool {
        self.fully_granted
            .lock()
            .expect("fully granted map poisoned")
            .get(activity)
            .is_some_and(|until| *until > Instant::now())
    }

    pub(super) fn mark_fully_granted(&self, activity: &str) {
        self.fully_granted
            .lock()
            .expect("fully granted map poisoned")
            .insert(activity.to_string(), Instant::now() + self.settings.recheck);
    }

    /// Sub-stocks not recently seen empty, in a random order.
    pub(crate) fn candidates(&self, activity: &str, gen: Gen) -> Vec<u32> {
        let now = Instant::now();
        let mut order: Vec<u32> = {
            let map = self.exhausted.lock().expect("exhausted map poisoned");
            match map.get(&(activity.to_string(), gen.gen)) {
                None => (0..gen.sub_stocks).collect(),
                Some(marks) => (0..gen.sub_stocks)
                    .filter(|&i| marks[i as usize].is_none_or(|until| until <= now))
                    .collect(),
            }
        };
        order.shuffle(&mut rand::rng());
        order
    }

    pub(super) fn note_refunded(&self, activity: &str) {
        self.refunded_at
            .lock()
            .expect("refunded map poisoned")
            .insert(activity.to_string(), Instant::now());
    }

    /// Marks sub-stock `i` as seen empty by a read that started at `read_at`, unless
    /// money came to the activity's sub-stocks since (the read is stale).
    pub(super) fn mark_exhausted(&self, activity: &str, gen: Gen, i: u32, read_at: Instant) {
        let stale = self
            .refunded_at
            .lock()
            .expect("refunded map poisoned")
            .get(activity)
            .is_some_and(|at| *at >= read_at);
        if stale {
            return;
        }
        let mut map = self.exhausted.lock().expect("exhausted map poisoned");
        let marks = map
            .entry((activity.to_string(), gen.gen))
            .or_insert_with(|| vec![None; gen.sub_stocks as usize]);
        if let Some(mark) = marks.get_mut(i as usize) {
            *mark = Some(Instant::now() + self.settings.recheck);
        }
    }
}

/// The size of one grant: a slice of the budget per sub-stock
/// (`budget / (sub_stocks * slices)`), never less than the per-award cap so that one
/// grant always covers any single award.
pub fn grant_chunk(budget: i64, cap: i64, sub_stocks: u32, slices: u32) -> i64 {
    let parts = i64::from(sub_stocks.max(1)).saturating_mul(i64::from(slices.max(1)));
    cap.max(budget / parts)
}

/// Locks the activity row for the transaction; returns (budget, granted, cap).
async fn lock_activity(
    tx: &mut Transaction<'_, MySql>,
    activity: &str,
) -> anyhow::Result<(i64, i64, i64)> {
    let row: Option<(i64, i64, i64)> = sqlx::query_as(
        "SELECT budget_cents, granted_cents, max_award_cents FROM activities WHERE id = ? FOR UPDATE",
    )
    .bind(activity)
    .fetch_optional(&mut **tx)
    .await?;
    row.with_context(|| format!("no activity `{activity}`"))
}

/// A MySQL named lock per activity, held on one connection for the length of a repair,
/// release or re-layout (released with the connection if the process dies).
struct ActivityLock {
    conn: Option<sqlx::pool::PoolConnection<MySql>>,
    name: String,
}

impl ActivityLock {
    pub(super) async fn take(db: &Db, activity: &str) -> anyhow::Result<Self> {
        match Self::take_within(db, activity, LOCK_WAIT_SECS).await? {
            Some(lock) => Ok(lock),
            None => anyhow::bail!("activity `{activity}` is busy with another budget repair"),
        }
    }

    /// The lock if it is free now (`None` when another holder has it).
    pub(super) async fn try_take(db: &Db, activity: &str) -> anyhow::Result<Option<Self>> {
        Self::take_within(db, activity, 0).await
    }

    async fn take_within(db: &Db, activity: &str, secs: i64) -> anyhow::Result<Option<Self>> {
        let mut conn = db.main().acquire().await?;
        let name = format!("rpw-budget-{activity}");
        let got: Option<i64> = sqlx::query_scalar("SELECT GET_LOCK(?, ?)")
            .bind(&name)
            .bind(secs)
            .fetch_one(&mut *conn)
            .await?;
        Ok((got == Some(1)).then_some(Self {
            conn: Some(conn),
            name,
        }))
    }

    pub(super) async fn release(mut self) {
        if let Some(mut conn) = self.conn.take() {
            let _ = sqlx::query("SELECT RELEASE_LOCK(?)")
                .bind(&self.name)
                .execute(&mut *conn)
                .await;
        }
    }
}

impl Drop for ActivityLock {
    /// A lock dropped without `release` (its request was cancelled) closes its
    /// connection instead of returning it to the pool, so MySQL releases the lock.
    fn drop(&mut self) {
        if let Some(conn) = self.conn.take() {
            drop(conn.detach());
        }
    }
}

#[cfg(test)]
mod tests;
