//! Taking: awards take their amounts from the live generation's sub-stocks (batched
//! first, then walking the sub-stocks, then a shared grant), and give back what a lost
//! race or a failed mint did not spend.

use super::*;

impl Budget {
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
                let mut cmd = evalsha(&self.take_many, &[&gen.stock_key(redis, activity, i)]);
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
                            gen,
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

    /// What a store that took its tokens' money found in a sub-stock after it (read in
    /// a call that started at `read_at`): an empty one is skipped for a while, as a
    /// take's is; a drained or lost one is handled as a take handles it (the live
    /// generation reloaded, a lost one closed in doubt), so the takes that follow go to
    /// the generation that is live now.
    pub async fn note_sub_stock(
        &self,
        redis: &Redis,
        db: &Db,
        after: &crate::tokens::StockAfter,
        read_at: Instant,
    ) -> anyhow::Result<()> {
        let Some(gen) = self.live_gen(&after.owner).filter(|g| g.gen == after.gen) else {
            return Ok(());
        };
        match StockState::seen(after.state, &after.owner, gen.gen, after.index) {
            StockState::Spendable => {
                if after.avail_cents <= 0 {
                    self.mark_exhausted(&after.owner, gen, after.index, read_at);
                }
            }
            state => {
                self.on_unspendable(redis, db, &after.owner, gen, state)
                    .await?;
            }
        }
        Ok(())
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
    pub(super) async fn walk_live(
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

    pub(super) async fn walk(
        &self,
        redis: &Redis,
        activity: &str,
        gen: Gen,
        amount: i64,
    ) -> anyhow::Result<Walk> {
        let mut seen_some = Vec::new();
        for i in self.candidates(activity, gen) {
            let key = gen.stock_key(redis, activity, i);
            let read_at = Instant::now();
            let (state, taken, avail) = self.take_one(redis, &key, amount, "all").await?;
            let state = StockState::seen(state, activity, gen.gen, i);
            if state != StockState::Spendable {
                return Ok(Walk::Unspendable(state));
            }
            if taken == amount {
                if avail == 0 {
                    self.mark_exhausted(activity, gen, i, read_at);
                }
                return Ok(Walk::Taken(Taken {
                    gen,
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
            gen,
            parts: Vec::new(),
        };
        let mut need = amount;
        for &i in &seen_some {
            let key = gen.stock_key(redis, activity, i);
            let read_at = Instant::now();
            let (state, taken, avail) = self.take_one(redis, &key, need, "upto").await?;
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

    pub(super) async fn take_one(
        &self,
        redis: &Redis,
        key: &str,
        amount: i64,
        mode: &str,
    ) -> redis::RedisResult<(i64, i64, i64)> {
        let mut pipe = redis::pipe();
        pipe.add_command(evalsha(&self.take, &[key]).arg(amount).arg(mode).clone());
        let (answer,): ((i64, i64, i64),) = query_scripted(redis, &pipe, &self.scripts()).await?;
        Ok(answer)
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
                &[&taken.gen.stock_key(redis, activity, *i)],
            );
            // A fresh id per part: a call sent again gives the cents back once.
            cmd.arg(*cents).arg(rand::random::<u64>());
            pipe.add_command(cmd);
        }
        let _: Vec<i64> = query_scripted(redis, &pipe, &self.scripts()).await?;
        self.forget_exhausted_gen(activity, taken.gen.gen);
        Ok(())
    }
}

/// Where a walk over the sub-stocks ended.
pub(super) enum Walk {
    Taken(Taken),
    Short,
    Unspendable(StockState),
}
