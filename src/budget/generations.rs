//! Generations: loading the live one, opening the first, closing one (drained or in
//! doubt) and starting the next, and moving to a changed sub-stock layout.

use super::*;

impl Budget {
    /// Reloads every activity's live generation from MySQL, initialising those not
    /// ready yet.
    pub async fn refresh_live(&self, redis: &Redis, db: &Db) -> anyhow::Result<()> {
        let rows = sqlx::query(
            "SELECT activity_id, gen, sub_stocks, ready, stock_partitions FROM budget_generations WHERE state = 'live'",
        )
        .fetch_all(db.main())
        .await?;
        let mut fresh = HashMap::with_capacity(rows.len());
        for row in rows {
            let activity: String = row.try_get(0)?;
            let gen = Gen::of_row(row.try_get(1)?, row.try_get(2)?, row.try_get(4)?);
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
    pub(super) async fn reload(
        &self,
        redis: &Redis,
        db: &Db,
        activity: &str,
    ) -> anyhow::Result<Option<Gen>> {
        let row = sqlx::query(
            "SELECT gen, sub_stocks, ready, stock_partitions FROM budget_generations WHERE activity_id = ? AND state = 'live'",
        )
        .bind(activity)
        .fetch_optional(db.main())
        .await?;
        let Some(row) = row else {
            self.set_live(activity, None);
            return Ok(None);
        };
        let gen = Gen::of_row(row.try_get(0)?, row.try_get(1)?, row.try_get(3)?);
        if !row.try_get::<bool, _>(2)? {
            self.make_ready(redis, db, activity, gen).await?;
        }
        self.set_live(activity, Some(gen));
        Ok(Some(gen))
    }

    /// Initialises every sub-stock of a generation no grant has gone to yet, then marks
    /// it ready. Repeatable: a crash in between leaves a generation that is initialised
    /// again.
    pub(super) async fn make_ready(
        &self,
        redis: &Redis,
        db: &Db,
        activity: &str,
        gen: Gen,
    ) -> anyhow::Result<()> {
        let mut pipe = redis::pipe();
        for i in 0..gen.sub_stocks {
            pipe.add_command(evalsha(&self.init, &[&gen.stock_key(redis, activity, i)]));
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
        sqlx::query("INSERT INTO budget_generations (activity_id, gen, sub_stocks, stock_partitions, state) VALUES (?, 1, ?, ?, 'live')")
            .bind(activity)
            .bind(self.settings.sub_stocks as i32)
            .bind(self.settings.placement.to_record())
            .execute(&mut **tx)
            .await?;
        Ok(())
    }

    /// A take met a sub-stock that is drained or lost. Lost: the generation is closed
    /// (its drainable sub-stocks drained, the rest frozen in doubt) and a new one opened.
    /// Either way the live generation is reloaded.
    pub(super) async fn on_unspendable(
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
    pub(super) async fn close_live(
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
        sqlx::query("INSERT INTO budget_generations (activity_id, gen, sub_stocks, stock_partitions, state) VALUES (?, ?, ?, ?, 'live')")
            .bind(activity)
            .bind(gen + 1)
            .bind(self.settings.sub_stocks as i32)
            .bind(self.settings.placement.to_record())
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
    pub(super) async fn finish_closing(
        &self,
        redis: &Redis,
        db: &Db,
        activity: &str,
    ) -> anyhow::Result<i64> {
        let closing: Vec<(i64, i32, i32)> = sqlx::query_as(
            "SELECT gen, sub_stocks, stock_partitions FROM budget_generations WHERE activity_id = ? AND state = 'closing' ORDER BY gen",
        )
        .bind(activity)
        .fetch_all(db.main())
        .await?;
        let mut returned_all = 0;
        for (gen, sub_stocks, stock_partitions) in closing {
            let layout = Gen::of_row(gen, sub_stocks, stock_partitions);
            let mut pipe = redis::pipe();
            for i in 0..layout.sub_stocks {
                pipe.add_command(evalsha(
                    &self.drain,
                    &[&layout.stock_key(redis, activity, i)],
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

    /// Finishes the closes cut off before their drain (a process died after committing
    /// the close, or Redis failed the drain) once they are older than `min_age`: until
    /// then what their generation was granted counts as taken, neither remaining nor in
    /// doubt. Runs with the periodic refresh, never waiting for a lock; one activity
    /// failing does not stop the others. Returns how many activities it finished.
    pub async fn finish_cut_off_closes(
        &self,
        redis: &Redis,
        db: &Db,
        min_age: std::time::Duration,
    ) -> anyhow::Result<usize> {
        let activities: Vec<(String,)> = sqlx::query_as(
            "SELECT DISTINCT activity_id FROM budget_generations WHERE state = 'closing' AND closed_at <= CURRENT_TIMESTAMP(3) - INTERVAL ? MICROSECOND",
        )
        .bind(min_age.as_micros() as i64)
        .fetch_all(db.main())
        .await?;
        let mut finished = 0;
        for (activity,) in activities {
            // Never waits: a busy activity (another instance finishing it, a repair) is
            // left to the next refresh.
            let Ok(_queue) = self.maintenance.try_lock() else {
                break;
            };
            let result = match ActivityLock::try_take(db, &activity).await {
                Ok(Some(lock)) => {
                    let result = self.finish_closing(redis, db, &activity).await;
                    lock.release().await;
                    result
                }
                Ok(None) => continue,
                Err(err) => Err(err),
            };
            match result {
                Ok(returned) => {
                    finished += 1;
                    tracing::warn!(
                        activity,
                        returned_cents = returned,
                        "a budget close cut off before its drain was finished"
                    );
                }
                Err(err) => tracing::warn!(
                    activity,
                    error = format!("{err:#}"),
                    "finishing a cut-off budget close failed; will retry"
                ),
            }
            self.forget_exhausted(&activity);
        }
        Ok(finished)
    }

    /// Closes the live generation when its layout differs from the settings
    /// (`issue.sub_stocks`, `issue.sub_stocks_in_partitions`), so a changed setting moves
    /// the budget into the new layout instead of creating any.
    pub async fn relayout(&self, redis: &Redis, db: &Db, activity: &str) -> anyhow::Result<()> {
        let Some(gen) = self.live_gen(activity) else {
            return Ok(());
        };
        if gen.sub_stocks == self.settings.sub_stocks && gen.placement == self.settings.placement {
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
            stock_partitions = self.settings.placement.to_record(),
            drained_cents = drained,
            "budget moved to a new sub-stock layout"
        );
        Ok(())
    }
}
