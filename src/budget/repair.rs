//! Figures, leak repair and the release of in-doubt budget: what the ledger, the
//! issuance counters and the synced client copies prove about a generation.

use super::*;

impl Budget {
    /// The budget's figures, from MySQL (budget, granted, in doubt) and the live
    /// sub-stocks (available). A grant landing between the two reads would tear them
    /// (its cents counted as both ungranted and available), so they are read until two
    /// readings in a row agree.
    pub async fn figures(
        &self,
        redis: &Redis,
        db: &Db,
        activity: &str,
    ) -> anyhow::Result<BudgetFigures> {
        let mut last = self.figures_once(redis, db, activity).await?;
        for _ in 0..10 {
            let again = self.figures_once(redis, db, activity).await?;
            if again == last {
                return Ok(again);
            }
            last = again;
        }
        Ok(last)
    }

    async fn figures_once(
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
        let live: Option<(i64, i32, i32)> = sqlx::query_as(
            "SELECT gen, sub_stocks, stock_partitions FROM budget_generations WHERE activity_id = ? AND state = 'live'",
        )
        .bind(activity)
        .fetch_optional(db.main())
        .await?;
        let mut available = 0_i64;
        if let Some((gen, sub_stocks, stock_partitions)) = live {
            let gen = Gen::of_row(gen, sub_stocks, stock_partitions);
            let mut pipe = redis::pipe();
            for i in 0..gen.sub_stocks {
                pipe.cmd("HGET")
                    .arg(gen.stock_key(redis, activity, i))
                    .arg("avail");
            }
            let avails: Vec<Option<i64>> = redis.query(&pipe).await?;
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

    pub(super) async fn repair_locked(
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
        type Closed = (i64, i64, i64, bool, i32, i32);
        let closed: Vec<Closed> = sqlx::query_as(
            "SELECT gen, granted_cents, returned_cents, closed_at <= CURRENT_TIMESTAMP(3) - INTERVAL ? MICROSECOND, sub_stocks, stock_partitions FROM budget_generations WHERE activity_id = ? AND state = 'closed' ORDER BY gen",
        )
        .bind(grace_ms * 1000)
        .bind(activity)
        .fetch_all(db.main())
        .await?;
        if closed.is_empty() {
            return Ok(out);
        }
        let counters = self.tokens.counters(activity).await?.gens;
        let booked = self.ledger.totals_by_gen(activity).await?;
        for (gen, granted, returned, settled_enough, sub_stocks, stock_partitions) in closed {
            if !settled_enough {
                out.settling_generations += 1;
                continue;
            }
            // The issued counters are only trusted if the Redis data they live in is the
            // one the generation was drained in: its drained sub-stocks must still be
            // there, under the same identity. Otherwise the generation is in doubt.
            if !self
                .drained_intact(
                    redis,
                    activity,
                    Gen::of_row(gen, sub_stocks, stock_partitions),
                )
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
    pub(super) async fn drained_intact(
        &self,
        redis: &Redis,
        activity: &str,
        gen: Gen,
    ) -> anyhow::Result<bool> {
        let mut pipe = redis::pipe();
        for i in 0..gen.sub_stocks {
            // drain.lua on a drained sub-stock changes nothing and answers 0 only when it
            // is still there under the identity it was drained in.
            pipe.add_command(evalsha(&self.drain, &[&gen.stock_key(redis, activity, i)]));
        }
        let answers: Vec<Vec<i64>> = query_scripted(redis, &pipe, &self.scripts()).await?;
        Ok(answers.iter().all(|a| a.first() == Some(&0)))
    }

    /// Moves a drained generation whose Redis data was lost since to `in_doubt`.
    pub(super) async fn mark_in_doubt(
        &self,
        db: &Db,
        activity: &str,
        gen: i64,
    ) -> anyhow::Result<()> {
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
    /// `issue.in_doubt_grace_ms`, so clients had time to sync. A close cut off before
    /// its drain is finished first, so a generation it finds lost is released too.
    /// Serialized per activity; a second run finds nothing.
    pub async fn release_in_doubt(
        &self,
        redis: &Redis,
        db: &Db,
        activity: &str,
    ) -> anyhow::Result<Release> {
        let _queue = self.maintenance.lock().await;
        let lock = ActivityLock::take(db, activity).await?;
        let result = match self.finish_closing(redis, db, activity).await {
            Ok(_) => self.release_locked(db, activity).await,
            Err(err) => Err(err),
        };
        lock.release().await;
        if result.is_ok() {
            self.forget_exhausted(activity);
        }
        result
    }

    pub(super) async fn release_locked(&self, db: &Db, activity: &str) -> anyhow::Result<Release> {
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
        let counters = self.tokens.counters(activity).await?.gens;
        let booked = self.ledger.totals_by_gen(activity).await?;
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
