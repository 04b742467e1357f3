//! Grants: chunks of the ungranted budget moved from MySQL to one sub-stock, exactly
//! once, and refills that keep the live sub-stocks funded.

use super::*;

/// How many of a generation's latest grants [`Budget::apply_recent`] applies again: more
/// than can be in flight at once (one refill grants at most one per sub-stock).
const RECENT_GRANTS: i64 = 256;

impl Budget {
    /// Grants to sub-stocks of a live, ready generation: each `(sub_stock, extra)` gets
    /// `extra` plus one chunk, as far as the ungranted budget goes. Returns the grants
    /// made: (sub-stock, grant id, cents).
    pub(super) async fn grant_tx(
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
                .arg(gen.stock_key(redis, activity, i))
                .arg("avail");
        }
        let avails: Vec<Option<i64>> = redis.query(&pipe).await?;
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

    /// Applies the generation's latest grants again: those already applied are no-ops
    /// (grant.lua records each grant id), those still on their way land now.
    pub(super) async fn apply_recent(
        &self,
        redis: &Redis,
        db: &Db,
        activity: &str,
        gen: Gen,
    ) -> anyhow::Result<()> {
        let rows: Vec<(i32, i64, i64)> = sqlx::query_as(
            "SELECT sub_stock, id, cents FROM budget_grants WHERE activity_id = ? AND gen = ? ORDER BY id DESC LIMIT ?",
        )
        .bind(activity)
        .bind(gen.gen)
        .bind(RECENT_GRANTS)
        .fetch_all(db.main())
        .await?;
        let grants: Vec<(u32, i64, i64)> = rows
            .into_iter()
            .filter(|(stock, ..)| *stock >= 0 && (*stock as u32) < gen.sub_stocks)
            .map(|(stock, id, cents)| (stock as u32, id, cents))
            .collect();
        self.apply(redis, db, activity, gen, &grants).await
    }

    /// Applies grants; a sub-stock found lost closes the generation.
    pub(super) async fn apply(
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
            let mut cmd = evalsha(&self.grant, &[&gen.stock_key(redis, activity, *stock)]);
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

    pub(super) fn forget_exhausted_gen(&self, activity: &str, gen: i64) {
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
    pub(super) async fn grant_and_take(
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
                    // Nothing is left to grant, yet grants made by others (a refill,
                    // another instance) may be committed and not applied yet: their
                    // money is on its way to a sub-stock. Apply them here (a grant
                    // applies once), so the walk that follows sees it.
                    self.apply_recent(redis, db, activity, gen).await?;
                    self.mark_fully_granted(activity);
                }
                // Fully granted, or the generation changed: reload and try once more.
                self.reload(redis, db, activity).await?;
                continue;
            };
            let mut cmd = evalsha(&self.grant, &[&gen.stock_key(redis, activity, stock)]);
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
                            gen,
                            parts: vec![(stock, amount)],
                        },
                    )
                })
                .collect());
        }
        Ok(Vec::new())
    }
}
