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

use crate::store::{evalsha, query_scripted, Db, Redis};

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
}

/// What a take got, per sub-stock of one generation, so it can be given back exactly.
#[derive(Debug, Default, Clone)]
pub struct Taken {
    pub gen: i64,
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
    fn of(code: i64) -> Self {
        match code {
            0 => StockState::Spendable,
            1 => StockState::Drained,
            _ => StockState::Lost,
        }
    }

    /// [`StockState::of`], logging which sub-stock was found lost and how.
    fn seen(code: i64, activity: &str, gen: i64, stock: u32) -> Self {
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

fn script(body: &str) -> Script {
    Script::new(&format!("{}\n{}", include_str!("stock.lua"), body))
}

impl Budget {
    pub fn new(settings: BudgetSettings) -> Self {
        Self {
            settings,
            take: script(include_str!("take.lua")),
            take_many: script(include_str!("take_many.lua")),
            grant: script(include_str!("grant.lua")),
            init: script(include_str!("init.lua")),
            drain: script(include_str!("drain.lua")),
            give_back: script(include_str!("give_back.lua")),
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

    fn set_live(&self, activity: &str, gen: Option<Gen>) {
        let mut map = self.live.write().expect("live map poisoned");
        match gen {
            Some(g) => map.insert(activity.to_string(), g),
            None => map.remove(activity),
        };
    }

    /// One grant: `max(per-award cap, budget / (sub_stocks * grant_slices))`.
    fn chunk(&self, budget: i64, cap: i64, gen: Gen) -> i64 {
        cap.max(budget / i64::from(gen.sub_stocks * self.settings.grant_slices.max(1)))
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

    fn is_fully_granted(&self, activity: &str) -> bool {
        self.fully_granted
            .lock()
            .expect("fully granted map poisoned")
            .get(activity)
            .is_some_and(|until| *until > Instant::now())
    }

    fn mark_fully_granted(&self, activity: &str) {
        self.fully_granted
            .lock()
            .expect("fully granted map poisoned")
            .insert(activity.to_string(), Instant::now() + self.settings.recheck);
    }

    /// Sub-stocks not recently seen empty, in a random order.
    fn candidates(&self, activity: &str, gen: Gen) -> Vec<u32> {
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

    fn note_refunded(&self, activity: &str) {
        self.refunded_at
            .lock()
            .expect("refunded map poisoned")
            .insert(activity.to_string(), Instant::now());
    }

    /// Marks sub-stock `i` as seen empty by a read that started at `read_at`, unless
    /// money came to the activity's sub-stocks since (the read is stale).
    fn mark_exhausted(&self, activity: &str, gen: Gen, i: u32, read_at: Instant) {
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

    // ---- generations ---------------------------------------------------------------

    /// Reloads every activity's live generation from MySQL, initialising those not
    /// ready yet.
    pub async fn refresh_live(&self, redis: &Redis, db: &Db) -> anyhow::Result<()> {
        let rows = sqlx::query(
            "SELECT activity_id, gen, sub_stocks, ready FROM budget_generations WHERE state = 'live'",
        )
        .fetch_all(db.main())
        .await?;
        let mut fresh = HashMap::with_capacity(rows.len());
        for row in rows {
            let activity: String = row.try_get(0)?;
            let gen = Gen {
                gen: row.try_get(1)?,
                sub_stocks: row.try_get::<i32, _>(2)?.max(1) as u32,
            };
            if !row.try_get::<bool, _>(3)? {
                if let Err(err) = self.make_ready(redis, db, &activity, gen).await {
                    tracing::warn!(
                        activity,
                        gen = gen.gen,
                        error = format!("{err:#}"),
                        "initialising a budget generation failed; will retry"
                    );
                    continue;
                }
            }
            fresh.insert(activity, gen);
        }
        *self.live.write().expect("live map poisoned") = fresh;
        Ok(())
    }

    /// Reloads one activity's live generation (after a take met a drained or lost one).
    async fn reload(&self, redis: &Redis, db: &Db, activity: &str) -> anyhow::Result<Option<Gen>> {
        let row = sqlx::query(
            "SELECT gen, sub_stocks, ready FROM budget_generations WHERE activity_id = ? AND state = 'live'",
        )
        .bind(activity)
        .fetch_optional(db.main())
        .await?;
        let Some(row) = row else {
            self.set_live(activity, None);
            return Ok(None);
        };
        let gen = Gen {
            gen: row.try_get(0)?,
            sub_stocks: row.try_get::<i32, _>(1)?.max(1) as u32,
        };
        if !row.try_get::<bool, _>(2)? {
            self.make_ready(redis, db, activity, gen).await?;
        }
        self.set_live(activity, Some(gen));
        Ok(Some(gen))
    }

    /// Initialises every sub-stock of a generation no grant has gone to yet, then marks
    /// it ready. Repeatable: a crash in between leaves a generation that is initialised
    /// again.
    async fn make_ready(
        &self,
        redis: &Redis,
        db: &Db,
        activity: &str,
        gen: Gen,
    ) -> anyhow::Result<()> {
        let mut pipe = redis::pipe();
        for i in 0..gen.sub_stocks {
            pipe.add_command(evalsha(
                &self.init,
                &[&redis.sub_stock_key(activity, gen.gen, i)],
            ));
        }
        let _: Vec<i64> = query_scripted(redis, &pipe, &self.scripts()).await?;
        sqlx::query("UPDATE budget_generations SET ready = TRUE WHERE activity_id = ? AND gen = ? AND state = 'live'")
            .bind(activity)
            .bind(gen.gen)
            .execute(db.main())
            .await?;
        Ok(())
    }

    /// Inserts the first generation of a new activity (inside its creation transaction).
    pub async fn open_first(
        &self,
        tx: &mut Transaction<'_, MySql>,
        activity: &str,
    ) -> Result<(), sqlx::Error> {
        sqlx::query("INSERT INTO budget_generations (activity_id, gen, sub_stocks, state) VALUES (?, 1, ?, 'live')")
            .bind(activity)
            .bind(self.settings.sub_stocks as i32)
            .execute(&mut **tx)
            .await?;
        Ok(())
    }

    /// A take met a sub-stock that is drained or lost. Lost: the generation is closed
    /// (its drainable sub-stocks drained, the rest frozen in doubt) and a new one opened.
    /// Either way the live generation is reloaded.
    async fn on_unspendable(
        &self,
        redis: &Redis,
        db: &Db,
        activity: &str,
        gen: Gen,
        state: StockState,
    ) -> anyhow::Result<Option<Gen>> {
        if state == StockState::Lost {
            tracing::error!(activity, gen = gen.gen, "a budget sub-stock was lost or rewound with Redis; its generation is frozen in doubt");
            crate::metrics::budget_generation_lost(activity);
            let _queue = self.maintenance.lock().await;
            let lock = ActivityLock::take(db, activity).await?;
            let result = self.close_live(redis, db, activity, Some(gen.gen)).await;
            lock.release().await;
            result?;
        }
        self.forget_exhausted(activity);
        self.reload(redis, db, activity).await
    }

    /// Closes the live generation (when it is `expect`, if given): opens the next one,
    /// then drains the closed one. Returns the cents drained back. Call under the
    /// activity lock.
    async fn close_live(
        &self,
        redis: &Redis,
        db: &Db,
        activity: &str,
        expect: Option<i64>,
    ) -> anyhow::Result<i64> {
        let mut tx = db.main().begin().await?;
        lock_activity(&mut tx, activity).await?;
        let live: Option<(i64,)> = sqlx::query_as(
            "SELECT gen FROM budget_generations WHERE activity_id = ? AND state = 'live' FOR UPDATE",
        )
        .bind(activity)
        .fetch_optional(&mut *tx)
        .await?;
        let Some((gen,)) = live else {
            tx.rollback().await?;
            return Ok(0);
        };
        if expect.is_some_and(|e| e != gen) {
            tx.rollback().await?;
            return Ok(0);
        }
        sqlx::query("UPDATE budget_generations SET state = 'closing', closed_at = CURRENT_TIMESTAMP(3) WHERE activity_id = ? AND gen = ?")
            .bind(activity)
            .bind(gen)
            .execute(&mut *tx)
            .await?;
        sqlx::query("INSERT INTO budget_generations (activity_id, gen, sub_stocks, state) VALUES (?, ?, ?, 'live')")
            .bind(activity)
            .bind(gen + 1)
            .bind(self.settings.sub_stocks as i32)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        let drained = self.finish_closing(redis, db, activity).await?;
        self.forget_exhausted(activity);
        self.reload(redis, db, activity).await?;
        Ok(drained)
    }

    /// Drains every generation left `closing` (by the call before, or a crash): what
    /// their sub-stocks held and the grants never applied go back to the ungranted
    /// budget; a generation with a lost sub-stock becomes in doubt. Call under the
    /// activity lock. Returns the cents given back.
    async fn finish_closing(&self, redis: &Redis, db: &Db, activity: &str) -> anyhow::Result<i64> {
        let closing: Vec<(i64, i32)> = sqlx::query_as(
            "SELECT gen, sub_stocks FROM budget_generations WHERE activity_id = ? AND state = 'closing' ORDER BY gen",
        )
        .bind(activity)
        .fetch_all(db.main())
        .await?;
        let mut returned_all = 0;
        for (gen, sub_stocks) in closing {
            let mut pipe = redis::pipe();
            for i in 0..sub_stocks.max(0) as u32 {
                pipe.add_command(evalsha(
                    &self.drain,
                    &[&redis.sub_stock_key(activity, gen, i)],
                ));
            }
            let answers: Vec<Vec<i64>> = query_scripted(redis, &pipe, &self.scripts()).await?;
            let mut lost = false;
            let mut returned = 0_i64;
            let mut applied: HashMap<u32, HashSet<i64>> = HashMap::new();
            let mut lost_stocks: HashSet<u32> = HashSet::new();
            for (i, answer) in answers.iter().enumerate() {
                let state = answer.first().copied().unwrap_or(3);
                if state != 0 {
                    lost = true;
                    lost_stocks.insert(i as u32);
                    continue;
                }
                returned = returned
                    .checked_add(answer.get(1).copied().unwrap_or(0))
                    .context("drained cents overflow")?;
                applied.insert(i as u32, answer.iter().skip(2).copied().collect());
            }
            let grants: Vec<(i64, i32, i64)> = sqlx::query_as(
                "SELECT id, sub_stock, cents FROM budget_grants WHERE activity_id = ? AND gen = ?",
            )
            .bind(activity)
            .bind(gen)
            .fetch_all(db.main())
            .await?;
            for (id, stock, cents) in grants {
                let stock = stock as u32;
                if lost_stocks.contains(&stock) {
                    continue;
                }
                if !applied.get(&stock).is_some_and(|ids| ids.contains(&id)) {
                    returned += cents;
                }
            }
            let mut tx = db.main().begin().await?;
            lock_activity(&mut tx, activity).await?;
            let (granted,): (i64,) = sqlx::query_as(
                "SELECT granted_cents FROM budget_generations WHERE activity_id = ? AND gen = ? AND state = 'closing' FOR UPDATE",
            )
            .bind(activity)
            .bind(gen)
            .fetch_one(&mut *tx)
            .await?;
            // What was drained or never applied cannot exceed what was granted.
            let returned = returned.min(granted);
            let state = if lost { "in_doubt" } else { "closed" };
            // The in-flight grace counts from the drain, not from the closing decision:
            // until the drain, the sub-stocks could still be spent.
            sqlx::query("UPDATE budget_generations SET state = ?, returned_cents = ?, closed_at = CURRENT_TIMESTAMP(3) WHERE activity_id = ? AND gen = ?")
                .bind(state)
                .bind(returned)
                .bind(activity)
                .bind(gen)
                .execute(&mut *tx)
                .await?;
            let in_doubt = if lost { granted - returned } else { 0 };
            sqlx::query("UPDATE activities SET granted_cents = granted_cents - ?, in_doubt_cents = in_doubt_cents + ? WHERE id = ?")
                .bind(returned)
                .bind(in_doubt)
                .bind(activity)
                .execute(&mut *tx)
                .await?;
            tx.commit().await?;
            tracing::info!(
                activity,
                gen,
                returned_cents = returned,
                in_doubt_cents = in_doubt,
                "budget generation drained"
            );
            returned_all += returned;
        }
        Ok(returned_all)
    }

    /// Closes the live generation when its layout differs from `issue.sub_stocks`, so a
    /// changed setting moves the budget into the new layout instead of creating any.
    pub async fn relayout(&self, redis: &Redis, db: &Db, activity: &str) -> anyhow::Result<()> {
        let Some(gen) = self.live_gen(activity) else {
            return Ok(());
        };
        if gen.sub_stocks == self.settings.sub_stocks {
            return Ok(());
        }
        let _queue = self.maintenance.lock().await;
        let lock = ActivityLock::take(db, activity).await?;
        let result = self.close_live(redis, db, activity, Some(gen.gen)).await;
        lock.release().await;
        let drained = result?;
        tracing::info!(
            activity,
            from = gen.sub_stocks,
            to = self.settings.sub_stocks,
            drained_cents = drained,
            "budget moved to a new sub-stock layout"
        );
        Ok(())
    }

    // ---- grants --------------------------------------------------------------------

    /// Grants to sub-stocks of a live, ready generation: each `(sub_stock, extra)` gets
    /// `extra` plus one chunk, as far as the ungranted budget goes. Returns the grants
    /// made: (sub-stock, grant id, cents).
    async fn grant_tx(
        &self,
        db: &Db,
        activity: &str,
        gen: Gen,
        wants: &[(u32, i64)],
    ) -> anyhow::Result<(Vec<(u32, i64, i64)>, bool)> {
        let mut tx = db.main().begin().await?;
        let (budget, granted, cap) = lock_activity(&mut tx, activity).await?;
        let live: Option<(bool,)> = sqlx::query_as(
            "SELECT ready FROM budget_generations WHERE activity_id = ? AND gen = ? AND state = 'live'",
        )
        .bind(activity)
        .bind(gen.gen)
        .fetch_optional(&mut *tx)
        .await?;
        if live != Some((true,)) {
            tx.rollback().await?;
            return Ok((Vec::new(), false));
        }
        let chunk = self.chunk(budget, cap, gen);
        let mut ungranted = budget - granted;
        let mut made = Vec::new();
        let mut total = 0;
        for &(stock, extra) in wants {
            let cents = extra.saturating_add(chunk).min(ungranted);
            if cents <= 0 {
                break;
            }
            let id = sqlx::query("INSERT INTO budget_grants (activity_id, gen, sub_stock, cents) VALUES (?, ?, ?, ?)")
                .bind(activity)
                .bind(gen.gen)
                .bind(stock as i32)
                .bind(cents)
                .execute(&mut *tx)
                .await?
                .last_insert_id() as i64;
            ungranted -= cents;
            total += cents;
            made.push((stock, id, cents));
        }
        if total > 0 {
            sqlx::query("UPDATE budget_generations SET granted_cents = granted_cents + ? WHERE activity_id = ? AND gen = ?")
                .bind(total)
                .bind(activity)
                .bind(gen.gen)
                .execute(&mut *tx)
                .await?;
            sqlx::query("UPDATE activities SET granted_cents = granted_cents + ? WHERE id = ?")
                .bind(total)
                .bind(activity)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        debug_assert!(
            granted + total <= budget,
            "granted never exceeds the budget"
        );
        // Whether nothing is left to grant. The caller marks the activity fully
        // granted only once its grants are applied: until then an award must not be
        // refused while this money is on its way to a sub-stock.
        Ok((made, ungranted <= 0))
    }

    /// Keeps the live generation funded: every sub-stock under half a chunk gets a new
    /// chunk (one MySQL transaction for all of them). Runs with the cache refresh.
    pub async fn refill(
        &self,
        redis: &Redis,
        db: &Db,
        activity: &str,
        budget: i64,
        cap: i64,
    ) -> anyhow::Result<()> {
        let Some(gen) = self.live_gen(activity) else {
            return Ok(());
        };
        if self.is_fully_granted(activity) {
            return Ok(());
        }
        let chunk = self.chunk(budget, cap, gen);
        let low = (chunk / 2).max(1);
        let mut pipe = redis::pipe();
        for i in 0..gen.sub_stocks {
            pipe.cmd("HGET")
                .arg(redis.sub_stock_key(activity, gen.gen, i))
                .arg("avail");
        }
        let mut conn = redis.conn();
        let avails: Vec<Option<i64>> = pipe.query_async(&mut conn).await?;
        let wants: Vec<(u32, i64)> = avails
            .iter()
            .enumerate()
            .filter(|(_, a)| a.unwrap_or(0) < low)
            .map(|(i, _)| (i as u32, 0))
            .collect();
        if wants.is_empty() {
            return Ok(());
        }
        let (grants, fully) = self.grant_tx(db, activity, gen, &wants).await?;
        self.apply(redis, db, activity, gen, &grants).await?;
        if fully {
            self.mark_fully_granted(activity);
        }
        Ok(())
    }

    /// Applies grants; a sub-stock found lost closes the generation.
    async fn apply(
        &self,
        redis: &Redis,
        db: &Db,
        activity: &str,
        gen: Gen,
        grants: &[(u32, i64, i64)],
    ) -> anyhow::Result<()> {
        if grants.is_empty() {
            return Ok(());
        }
        let mut pipe = redis::pipe();
        for (stock, id, cents) in grants {
            let mut cmd = evalsha(
                &self.grant,
                &[&redis.sub_stock_key(activity, gen.gen, *stock)],
            );
            cmd.arg(id).arg(cents);
            pipe.add_command(cmd);
        }
        let answers: Vec<Vec<i64>> = query_scripted(redis, &pipe, &self.scripts()).await?;
        let worst = answers
            .iter()
            .zip(grants)
            .map(|(a, (stock, ..))| {
                StockState::seen(a.first().copied().unwrap_or(3), activity, gen.gen, *stock)
            })
            .find(|s| *s != StockState::Spendable);
        match worst {
            Some(state) => {
                self.on_unspendable(redis, db, activity, gen, state).await?;
            }
            None => self.forget_exhausted_gen(activity, gen.gen),
        }
        Ok(())
    }

    fn forget_exhausted_gen(&self, activity: &str, gen: i64) {
        self.note_refunded(activity);
        self.exhausted
            .lock()
            .expect("exhausted map poisoned")
            .remove(&(activity.to_string(), gen));
    }

    /// Grants enough for `awards` (index, amount) plus a chunk to one sub-stock and takes
    /// their amounts from it in the same script, in order while it covers them. The
    /// path of an award no sub-stock covered: never taken while the budget is fully
    /// granted.
    async fn grant_and_take(
        &self,
        redis: &Redis,
        db: &Db,
        activity: &str,
        awards: &[(usize, i64)],
    ) -> anyhow::Result<Vec<(usize, Taken)>> {
        for _ in 0..2 {
            if self.is_fully_granted(activity) {
                return Ok(Vec::new());
            }
            let gen = match self.live_gen(activity) {
                Some(g) => g,
                None => match self.reload(redis, db, activity).await? {
                    Some(g) => g,
                    None => return Ok(Vec::new()),
                },
            };
            let stock = rand::rng().random_range(0..gen.sub_stocks);
            let need = awards
                .iter()
                .try_fold(0_i64, |acc, (_, a)| acc.checked_add(*a))
                .context("award amounts overflow")?;
            let (grants, fully) = self.grant_tx(db, activity, gen, &[(stock, need)]).await?;
            let Some(&(_, id, cents)) = grants.first() else {
                if fully {
                    self.mark_fully_granted(activity);
                }
                // Fully granted, or the generation changed: reload and try once more.
                self.reload(redis, db, activity).await?;
                continue;
            };
            let mut cmd = evalsha(
                &self.grant,
                &[&redis.sub_stock_key(activity, gen.gen, stock)],
            );
            cmd.arg(id).arg(cents);
            for (_, amount) in awards {
                cmd.arg(*amount);
            }
            let mut pipe = redis::pipe();
            pipe.add_command(cmd);
            let answers: Vec<Vec<i64>> = query_scripted(redis, &pipe, &self.scripts()).await?;
            let answer = answers.into_iter().next().unwrap_or_default();
            let state = StockState::seen(
                answer.first().copied().unwrap_or(3),
                activity,
                gen.gen,
                stock,
            );
            if state != StockState::Spendable {
                self.on_unspendable(redis, db, activity, gen, state).await?;
                continue;
            }
            self.forget_exhausted_gen(activity, gen.gen);
            if fully {
                self.mark_fully_granted(activity);
            }
            return Ok(awards
                .iter()
                .zip(answer.iter().skip(2))
                .filter(|(_, taken)| **taken == 1)
                .map(|(&(k, amount), _)| {
                    (
                        k,
                        Taken {
                            gen: gen.gen,
                            parts: vec![(stock, amount)],
                        },
                    )
                })
                .collect());
        }
        Ok(Vec::new())
    }

    // ---- taking --------------------------------------------------------------------

    /// First takes for many awards in a single pipelined round trip: per activity, the
    /// awards go in chunks of [`TAKE_CHUNK`], each chunk to one random sub-stock of the
    /// live generation not seen empty. `awards` are (award index, activity, amount);
    /// returns the awards covered. The others go through [`Budget::take`].
    pub async fn take_batched(
        &self,
        redis: &Redis,
        db: &Db,
        awards: &[(usize, &str, i64)],
    ) -> anyhow::Result<Vec<(usize, Taken)>> {
        let mut by_activity: HashMap<&str, Vec<(usize, i64)>> = HashMap::new();
        for &(k, activity, amount) in awards {
            by_activity.entry(activity).or_default().push((k, amount));
        }
        let mut pipe = redis::pipe();
        type Call<'a> = (&'a str, Gen, u32, &'a [(usize, i64)]);
        let mut calls: Vec<Call> = Vec::new();
        for (activity, group) in &by_activity {
            let Some(gen) = self.live_gen(activity) else {
                continue;
            };
            let mut stocks = self.candidates(activity, gen).into_iter().cycle();
            for chunk in group.chunks(TAKE_CHUNK) {
                let Some(i) = stocks.next() else { break };
                let mut cmd = evalsha(
                    &self.take_many,
                    &[&redis.sub_stock_key(activity, gen.gen, i)],
                );
                for &(_, amount) in chunk {
                    cmd.arg(amount);
                }
                pipe.add_command(cmd);
                calls.push((activity, gen, i, chunk));
            }
        }
        if calls.is_empty() {
            return Ok(Vec::new());
        }
        let read_at = Instant::now();
        let answers: Vec<Vec<i64>> = query_scripted(redis, &pipe, &self.scripts()).await?;
        let mut covered = Vec::with_capacity(awards.len());
        let mut unspendable: HashMap<&str, (Gen, StockState)> = HashMap::new();
        for ((activity, gen, i, chunk), answer) in calls.into_iter().zip(answers) {
            if answer.len() < 2 {
                anyhow::bail!("take_many.lua answered too little");
            }
            let state = StockState::seen(answer[0], activity, gen.gen, i);
            if state != StockState::Spendable {
                let entry = unspendable.entry(activity).or_insert((gen, state));
                if state == StockState::Lost {
                    entry.1 = state;
                }
                continue;
            }
            if answer.len() != chunk.len() + 2 {
                anyhow::bail!("take_many.lua answered the wrong number of awards");
            }
            if answer[1] == 0 {
                self.mark_exhausted(activity, gen, i, read_at);
            }
            for (&(k, amount), &taken) in chunk.iter().zip(&answer[2..]) {
                if taken == 1 {
                    covered.push((
                        k,
                        Taken {
                            gen: gen.gen,
                            parts: vec![(i, amount)],
                        },
                    ));
                }
            }
        }
        for (activity, (gen, state)) in unspendable {
            self.on_unspendable(redis, db, activity, gen, state).await?;
        }
        Ok(covered)
    }

    /// Takes `amount` from the activity's budget, or nothing.
    ///
    /// Sub-stocks of the live generation are visited in a random order, skipping those
    /// recently seen empty. When no single sub-stock covers the amount but together they
    /// might (the last cents are spread thin), a second pass takes what each has. When
    /// that falls short too, every partial take is given back and a grant is asked for.
    pub async fn take(
        &self,
        redis: &Redis,
        db: &Db,
        activity: &str,
        amount: i64,
    ) -> anyhow::Result<Option<Taken>> {
        debug_assert!(amount > 0);
        let mut got = self.take_each(redis, db, &[(0, activity, amount)]).await?;
        Ok(got.pop().map(|(_, t)| t))
    }

    /// Like [`Budget::take`] for awards the batched take did not cover: each walks the
    /// sub-stocks; those still uncovered share one grant per activity.
    pub async fn take_each(
        &self,
        redis: &Redis,
        db: &Db,
        awards: &[(usize, &str, i64)],
    ) -> anyhow::Result<Vec<(usize, Taken)>> {
        let mut covered = Vec::with_capacity(awards.len());
        let mut short: HashMap<&str, Vec<(usize, i64)>> = HashMap::new();
        for &(k, activity, amount) in awards {
            match self.walk_live(redis, db, activity, amount).await? {
                Some(t) => covered.push((k, t)),
                None => short.entry(activity).or_default().push((k, amount)),
            }
        }
        for (activity, group) in short {
            for chunk in group.chunks(TAKE_CHUNK) {
                let granted = self.grant_and_take(redis, db, activity, chunk).await?;
                let done: HashSet<usize> = granted.iter().map(|(k, _)| *k).collect();
                covered.extend(granted);
                // No grant covered these (the budget is fully granted, or another
                // instance's grant landed meanwhile): what the sub-stocks hold now is
                // tried once more before the award is refused.
                for &(k, amount) in chunk.iter().filter(|(k, _)| !done.contains(k)) {
                    if let Some(t) = self.walk_live(redis, db, activity, amount).await? {
                        covered.push((k, t));
                    }
                }
            }
        }
        Ok(covered)
    }

    /// Walks the live generation's sub-stocks for `amount`; a drained or lost
    /// generation met on the way is handled and the walk tried once on the next.
    async fn walk_live(
        &self,
        redis: &Redis,
        db: &Db,
        activity: &str,
        amount: i64,
    ) -> anyhow::Result<Option<Taken>> {
        for _ in 0..2 {
            let Some(gen) = self.live_gen(activity) else {
                break;
            };
            match self.walk(redis, activity, gen, amount).await? {
                Walk::Taken(t) => return Ok(Some(t)),
                Walk::Short => break,
                Walk::Unspendable(state) => {
                    self.on_unspendable(redis, db, activity, gen, state).await?;
                }
            }
        }
        Ok(None)
    }

    async fn walk(
        &self,
        redis: &Redis,
        activity: &str,
        gen: Gen,
        amount: i64,
    ) -> anyhow::Result<Walk> {
        let mut conn = redis.conn();
        let mut seen_some = Vec::new();
        for i in self.candidates(activity, gen) {
            let key = redis.sub_stock_key(activity, gen.gen, i);
            let read_at = Instant::now();
            let (state, taken, avail) = self.take_one(&mut conn, &key, amount, "all").await?;
            let state = StockState::seen(state, activity, gen.gen, i);
            if state != StockState::Spendable {
                return Ok(Walk::Unspendable(state));
            }
            if taken == amount {
                if avail == 0 {
                    self.mark_exhausted(activity, gen, i, read_at);
                }
                return Ok(Walk::Taken(Taken {
                    gen: gen.gen,
                    parts: vec![(i, taken)],
                }));
            }
            if avail == 0 {
                self.mark_exhausted(activity, gen, i, read_at);
            } else {
                seen_some.push(i);
            }
        }
        if seen_some.is_empty() {
            return Ok(Walk::Short);
        }
        // Second pass: gather the award from several thin sub-stocks.
        let mut got = Taken {
            gen: gen.gen,
            parts: Vec::new(),
        };
        let mut need = amount;
        for &i in &seen_some {
            let key = redis.sub_stock_key(activity, gen.gen, i);
            let read_at = Instant::now();
            let (state, taken, avail) = self.take_one(&mut conn, &key, need, "upto").await?;
            let state = StockState::seen(state, activity, gen.gen, i);
            if state != StockState::Spendable {
                self.give_back(redis, activity, &got).await?;
                return Ok(Walk::Unspendable(state));
            }
            if avail == 0 {
                self.mark_exhausted(activity, gen, i, read_at);
            }
            if taken > 0 {
                got.parts.push((i, taken));
                need -= taken;
            }
            if need == 0 {
                return Ok(Walk::Taken(got));
            }
        }
        self.give_back(redis, activity, &got).await?;
        Ok(Walk::Short)
    }

    async fn take_one(
        &self,
        conn: &mut redis::aio::ConnectionManager,
        key: &str,
        amount: i64,
        mode: &str,
    ) -> redis::RedisResult<(i64, i64, i64)> {
        let (state, taken, avail): (i64, i64, i64) = self
            .take
            .key(key)
            .arg(amount)
            .arg(mode)
            .invoke_async(conn)
            .await?;
        Ok((state, taken, avail))
    }

    /// Returns what `taken` took, to sub-stocks that may still be spent. What a drained
    /// or lost sub-stock refuses stays taken: the generation's accounting finds it.
    pub async fn give_back(
        &self,
        redis: &Redis,
        activity: &str,
        taken: &Taken,
    ) -> redis::RedisResult<()> {
        if taken.parts.is_empty() {
            return Ok(());
        }
        let mut pipe = redis::pipe();
        for (i, cents) in &taken.parts {
            let mut cmd = evalsha(
                &self.give_back,
                &[&redis.sub_stock_key(activity, taken.gen, *i)],
            );
            cmd.arg(*cents);
            pipe.add_command(cmd);
        }
        let _: Vec<i64> = query_scripted(redis, &pipe, &self.scripts()).await?;
        self.forget_exhausted_gen(activity, taken.gen);
        Ok(())
    }

    // ---- figures, repair, release ----------------------------------------------------

    pub async fn figures(
        &self,
        redis: &Redis,
        db: &Db,
        activity: &str,
    ) -> anyhow::Result<BudgetFigures> {
        let row: Option<(i64, i64, i64)> = sqlx::query_as(
            "SELECT budget_cents, granted_cents, in_doubt_cents FROM activities WHERE id = ?",
        )
        .bind(activity)
        .fetch_optional(db.main())
        .await?;
        let Some((budget, granted, in_doubt)) = row else {
            return Ok(BudgetFigures::default());
        };
        let live: Option<(i64, i32)> = sqlx::query_as(
            "SELECT gen, sub_stocks FROM budget_generations WHERE activity_id = ? AND state = 'live'",
        )
        .bind(activity)
        .fetch_optional(db.main())
        .await?;
        let mut available = 0_i64;
        if let Some((gen, sub_stocks)) = live {
            let mut pipe = redis::pipe();
            for i in 0..sub_stocks.max(0) as u32 {
                pipe.cmd("HGET")
                    .arg(redis.sub_stock_key(activity, gen, i))
                    .arg("avail");
            }
            let mut conn = redis.conn();
            let avails: Vec<Option<i64>> = pipe.query_async(&mut conn).await?;
            for a in avails.into_iter().flatten() {
                available = available
                    .checked_add(a)
                    .context("available cents overflow")?;
            }
        }
        let ungranted = budget - granted;
        Ok(BudgetFigures {
            budget_cents: budget,
            granted_cents: granted,
            in_doubt_cents: in_doubt,
            ungranted_cents: ungranted,
            available_cents: available,
            remaining_cents: ungranted + available,
            taken_cents: granted - in_doubt - available,
        })
    }

    /// Returns budget taken but provably never a token (a crash between take and
    /// store). Exact and safe at any time: it drains the live generation (awards go on
    /// from the next one), and settles a drained generation's leak only once awards in
    /// flight at its drain had `issue.in_flight_grace_ms` to store their tokens, from the
    /// issued counters and the ledger. Serialized per activity; a second run finds
    /// nothing.
    pub async fn repair(&self, redis: &Redis, db: &Db, activity: &str) -> anyhow::Result<Repair> {
        let _queue = self.maintenance.lock().await;
        let lock = ActivityLock::take(db, activity).await?;
        let result = self.repair_locked(redis, db, activity).await;
        lock.release().await;
        if result.is_ok() {
            self.forget_exhausted(activity);
        }
        result
    }

    async fn repair_locked(
        &self,
        redis: &Redis,
        db: &Db,
        activity: &str,
    ) -> anyhow::Result<Repair> {
        let mut out = Repair {
            drained_cents: self.finish_closing(redis, db, activity).await?,
            ..Default::default()
        };
        let live_granted: Option<(i64,)> = sqlx::query_as(
            "SELECT granted_cents FROM budget_generations WHERE activity_id = ? AND state = 'live'",
        )
        .bind(activity)
        .fetch_optional(db.main())
        .await?;
        if live_granted.is_some_and(|(g,)| g > 0) {
            out.drained_cents += self.close_live(redis, db, activity, None).await?;
        }
        let grace_ms = self.settings.in_flight_grace.as_millis() as i64;
        let closed: Vec<(i64, i64, i64, bool, i32)> = sqlx::query_as(
            "SELECT gen, granted_cents, returned_cents, closed_at <= CURRENT_TIMESTAMP(3) - INTERVAL ? MICROSECOND, sub_stocks FROM budget_generations WHERE activity_id = ? AND state = 'closed' ORDER BY gen",
        )
        .bind(grace_ms * 1000)
        .bind(activity)
        .fetch_all(db.main())
        .await?;
        if closed.is_empty() {
            return Ok(out);
        }
        let counters = crate::reconcile::gen_counters(redis, activity).await?;
        let booked = crate::reconcile::booked_by_gen(db, activity).await?;
        for (gen, granted, returned, settled_enough, sub_stocks) in closed {
            if !settled_enough {
                out.settling_generations += 1;
                continue;
            }
            // The issued counters are only trusted if the Redis data they live in is the
            // one the generation was drained in: its drained sub-stocks must still be
            // there, under the same identity. Otherwise the generation is in doubt.
            if !self
                .drained_intact(redis, activity, gen, sub_stocks.max(0) as u32)
                .await?
            {
                self.mark_in_doubt(db, activity, gen).await?;
                continue;
            }
            let pending = counters
                .get(&gen)
                .map(|c| (c.issued.cents - c.settled.cents).max(0))
                .unwrap_or(0);
            let issued = counters
                .get(&gen)
                .map(|c| c.issued.cents)
                .unwrap_or(0)
                .max(booked.get(&gen).map(|t| t.cents).unwrap_or(0) + pending);
            let taken = granted - returned;
            let leak = (taken - issued).max(0);
            if issued > taken {
                tracing::error!(
                    activity,
                    gen,
                    issued_cents = issued,
                    taken_cents = taken,
                    "more issued than taken in a budget generation"
                );
            }
            let mut tx = db.main().begin().await?;
            lock_activity(&mut tx, activity).await?;
            let changed = sqlx::query("UPDATE budget_generations SET state = 'settled', leak_cents = ? WHERE activity_id = ? AND gen = ? AND state = 'closed'")
                .bind(leak)
                .bind(activity)
                .bind(gen)
                .execute(&mut *tx)
                .await?
                .rows_affected();
            if changed == 1 && leak > 0 {
                sqlx::query("UPDATE activities SET granted_cents = granted_cents - ? WHERE id = ?")
                    .bind(leak)
                    .bind(activity)
                    .execute(&mut *tx)
                    .await?;
                out.repaired_cents += leak;
                tracing::warn!(activity, gen, leak_cents = leak, "budget leak repaired");
            }
            tx.commit().await?;
        }
        Ok(out)
    }

    /// Whether every drained sub-stock of a closed generation is still in Redis under
    /// the identity it was drained in (not flushed, restarted, failed over since).
    async fn drained_intact(
        &self,
        redis: &Redis,
        activity: &str,
        gen: i64,
        sub_stocks: u32,
    ) -> anyhow::Result<bool> {
        let mut pipe = redis::pipe();
        for i in 0..sub_stocks {
            // drain.lua on a drained sub-stock changes nothing and answers 0 only when it
            // is still there under the identity it was drained in.
            pipe.add_command(evalsha(
                &self.drain,
                &[&redis.sub_stock_key(activity, gen, i)],
            ));
        }
        let answers: Vec<Vec<i64>> = query_scripted(redis, &pipe, &self.scripts()).await?;
        Ok(answers.iter().all(|a| a.first() == Some(&0)))
    }

    /// Moves a drained generation whose Redis data was lost since to `in_doubt`.
    async fn mark_in_doubt(&self, db: &Db, activity: &str, gen: i64) -> anyhow::Result<()> {
        let mut tx = db.main().begin().await?;
        lock_activity(&mut tx, activity).await?;
        let row: Option<(i64, i64)> = sqlx::query_as(
            "SELECT granted_cents, returned_cents FROM budget_generations WHERE activity_id = ? AND gen = ? AND state = 'closed' FOR UPDATE",
        )
        .bind(activity)
        .bind(gen)
        .fetch_optional(&mut *tx)
        .await?;
        if let Some((granted, returned)) = row {
            sqlx::query("UPDATE budget_generations SET state = 'in_doubt', closed_at = CURRENT_TIMESTAMP(3) WHERE activity_id = ? AND gen = ?")
                .bind(activity)
                .bind(gen)
                .execute(&mut *tx)
                .await?;
            sqlx::query("UPDATE activities SET in_doubt_cents = in_doubt_cents + ? WHERE id = ?")
                .bind(granted - returned)
                .bind(activity)
                .execute(&mut *tx)
                .await?;
            tracing::error!(activity, gen, in_doubt_cents = granted - returned, "Redis lost data of a drained budget generation; its leak cannot be known, it is in doubt");
            crate::metrics::budget_generation_lost(activity);
        }
        tx.commit().await?;
        Ok(())
    }

    /// Releases the part of lost (in-doubt) generations that is provably unspent: their
    /// grants less what the ledger booked from them and what synced tokens of theirs
    /// still wait to be booked. Only generations lost longer ago than
    /// `issue.in_doubt_grace_ms`, so clients had time to sync. Serialized per activity;
    /// a second run finds nothing.
    pub async fn release_in_doubt(
        &self,
        redis: &Redis,
        db: &Db,
        activity: &str,
    ) -> anyhow::Result<Release> {
        let lock = ActivityLock::take(db, activity).await?;
        let result = self.release_locked(redis, db, activity).await;
        lock.release().await;
        if result.is_ok() {
            self.forget_exhausted(activity);
        }
        result
    }

    async fn release_locked(
        &self,
        redis: &Redis,
        db: &Db,
        activity: &str,
    ) -> anyhow::Result<Release> {
        let grace_ms = self.settings.in_doubt_grace.as_millis() as i64;
        let lost: Vec<(i64, i64, i64, bool)> = sqlx::query_as(
            "SELECT gen, granted_cents, returned_cents, closed_at <= CURRENT_TIMESTAMP(3) - INTERVAL ? MICROSECOND FROM budget_generations WHERE activity_id = ? AND state = 'in_doubt' ORDER BY gen",
        )
        .bind(grace_ms * 1000)
        .bind(activity)
        .fetch_all(db.main())
        .await?;
        let mut out = Release::default();
        if lost.is_empty() {
            return Ok(out);
        }
        let counters = crate::reconcile::gen_counters(redis, activity).await?;
        let booked = crate::reconcile::booked_by_gen(db, activity).await?;
        for (gen, granted, returned, old_enough) in lost {
            if !old_enough {
                out.waiting_generations += 1;
                continue;
            }
            // Generation 0 holds the budget of activities created before grants: its
            // tokens carry no generation counters, so it is released only once the
            // activity drained (every token it issued booked).
            if gen == 0 {
                let drained: Option<(bool,)> =
                    sqlx::query_as("SELECT drained_at IS NOT NULL FROM activities WHERE id = ?")
                        .bind(activity)
                        .fetch_optional(db.main())
                        .await?;
                if drained != Some((true,)) {
                    out.waiting_generations += 1;
                    continue;
                }
            }
            let amount = granted - returned;
            let pending = counters
                .get(&gen)
                .map(|c| (c.issued.cents - c.settled.cents).max(0))
                .unwrap_or(0);
            let used = booked.get(&gen).map(|t| t.cents).unwrap_or(0) + pending;
            let release = (amount - used).max(0);
            let mut tx = db.main().begin().await?;
            lock_activity(&mut tx, activity).await?;
            let changed = sqlx::query("UPDATE budget_generations SET state = 'resolved', released_cents = ? WHERE activity_id = ? AND gen = ? AND state = 'in_doubt'")
                .bind(release)
                .bind(activity)
                .bind(gen)
                .execute(&mut *tx)
                .await?
                .rows_affected();
            if changed == 1 {
                sqlx::query("UPDATE activities SET granted_cents = granted_cents - ?, in_doubt_cents = in_doubt_cents - ? WHERE id = ?")
                    .bind(release)
                    .bind(amount)
                    .bind(activity)
                    .execute(&mut *tx)
                    .await?;
                out.released_cents += release;
                out.resolved_generations += 1;
                tracing::warn!(
                    activity,
                    gen,
                    in_doubt_cents = amount,
                    used_cents = used,
                    released_cents = release,
                    "in-doubt budget resolved"
                );
            }
            tx.commit().await?;
        }
        Ok(out)
    }
}

enum Walk {
    Taken(Taken),
    Short,
    Unspendable(StockState),
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
    async fn take(db: &Db, activity: &str) -> anyhow::Result<Self> {
        let mut conn = db.main().acquire().await?;
        let name = format!("rpw-budget-{activity}");
        let got: Option<i64> = sqlx::query_scalar("SELECT GET_LOCK(?, ?)")
            .bind(&name)
            .bind(LOCK_WAIT_SECS)
            .fetch_one(&mut *conn)
            .await?;
        if got != Some(1) {
            anyhow::bail!("activity `{activity}` is busy with another budget repair");
        }
        Ok(Self {
            conn: Some(conn),
            name,
        })
    }

    async fn release(mut self) {
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
