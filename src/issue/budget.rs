//! An activity's budget, split into N sub-stocks in Redis keys that hash to different
//! cluster slots, so a burst on one activity spreads over N keys instead of one hot key.
//!
//! MySQL holds the total budget. Sub-stock `i` is funded to its share of that total
//! (`total / N`, the remainder spread over the first sub-stocks); funding is idempotent,
//! so it can be repeated after a crash or by every instance. Money taken from a
//! sub-stock is `funded - avail`.
//!
//! Invariant: the sum of every sub-stock's `avail` never exceeds the funded total and no
//! `avail` is ever negative (take.lua takes only what is there).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use rand::seq::SliceRandom;
use redis::Script;

use crate::store::{evalsha, Redis};

/// Awards per take_many.lua call at most, on one sub-stock: large enough that a batch of
/// 1,000 costs a handful of calls, small enough that a burst still spreads over the
/// sub-stocks.
pub const TAKE_CHUNK: usize = 64;

pub struct Budget {
    sub_stocks: u32,
    recheck: Duration,
    take: Script,
    take_many: Script,
    fund: Script,
    /// Per activity, per sub-stock: skipped until this instant (seen empty before).
    exhausted: Mutex<HashMap<String, Vec<Option<Instant>>>>,
}

/// What a take got, per sub-stock, so it can be given back exactly.
#[derive(Debug, Default, Clone)]
pub struct Taken {
    pub parts: Vec<(u32, i64)>,
}

impl Taken {
    pub fn total(&self) -> i64 {
        self.parts.iter().map(|(_, c)| c).sum()
    }
}

#[derive(Debug, Clone, Copy, Default)]
pub struct BudgetFigures {
    pub funded_cents: i64,
    pub remaining_cents: i64,
    pub taken_cents: i64,
    pub min_sub_stock_cents: i64,
}

impl Budget {
    pub fn new(sub_stocks: u32, recheck: Duration) -> Self {
        Self {
            sub_stocks,
            recheck,
            take: Script::new(include_str!("take.lua")),
            take_many: Script::new(include_str!("take_many.lua")),
            fund: Script::new(include_str!("fund.lua")),
            exhausted: Mutex::new(HashMap::new()),
        }
    }

    pub fn scripts(&self) -> [&Script; 3] {
        [&self.take, &self.take_many, &self.fund]
    }

    /// Sub-stock `i`'s share of `total`.
    pub fn share(&self, total: i64, i: u32) -> i64 {
        let n = i64::from(self.sub_stocks);
        total / n + i64::from(i64::from(i) < total % n)
    }

    /// Funds every sub-stock up to its share of `total` (idempotent). The sub-stocks this
    /// instance saw empty are tried again afterwards, also when another instance funded
    /// the new total first (nothing added here).
    pub async fn fund(&self, redis: &Redis, activity: &str, total: i64) -> redis::RedisResult<i64> {
        let mut pipe = redis::pipe();
        for i in 0..self.sub_stocks {
            let key = redis.sub_stock_key(activity, i);
            let mut cmd = evalsha(&self.fund, &[&key]);
            cmd.arg(self.share(total, i));
            pipe.add_command(cmd);
        }
        let added: Vec<i64> = crate::store::query_scripted(redis, &pipe, &self.scripts()).await?;
        self.forget_exhausted(activity);
        Ok(added.iter().sum())
    }

    /// Gives money back into the sub-stocks, spread evenly: a leak repair.
    pub async fn give_back_spread(
        &self,
        redis: &Redis,
        activity: &str,
        cents: i64,
    ) -> redis::RedisResult<()> {
        if cents <= 0 {
            return Ok(());
        }
        let mut pipe = redis::pipe();
        for i in 0..self.sub_stocks {
            let share = self.share(cents, i);
            if share > 0 {
                pipe.cmd("HINCRBY")
                    .arg(redis.sub_stock_key(activity, i))
                    .arg("avail")
                    .arg(share)
                    .ignore();
            }
        }
        let mut conn = redis.conn();
        pipe.query_async::<()>(&mut conn).await?;
        self.forget_exhausted(activity);
        Ok(())
    }

    pub fn forget_exhausted(&self, activity: &str) {
        self.exhausted
            .lock()
            .expect("exhausted map poisoned")
            .remove(activity);
    }

    /// Sub-stocks not recently seen empty. Expired marks count as not exhausted: the
    /// sub-stock is tried again (budget may have been added or given back).
    fn available(&self, activity: &str) -> Vec<u32> {
        let now = Instant::now();
        let map = self.exhausted.lock().expect("exhausted map poisoned");
        match map.get(activity) {
            None => (0..self.sub_stocks).collect(),
            Some(marks) => (0..self.sub_stocks)
                .filter(|&i| marks[i as usize].is_none_or(|until| until <= now))
                .collect(),
        }
    }

    fn candidates(&self, activity: &str) -> Vec<u32> {
        let mut order = self.available(activity);
        order.shuffle(&mut rand::rng());
        order
    }

    fn mark_exhausted(&self, activity: &str, i: u32) {
        let mut map = self.exhausted.lock().expect("exhausted map poisoned");
        if !map.contains_key(activity) {
            map.insert(activity.to_string(), vec![None; self.sub_stocks as usize]);
        }
        if let Some(marks) = map.get_mut(activity) {
            marks[i as usize] = Some(Instant::now() + self.recheck);
        }
    }

    /// First takes for many awards in a single pipelined round trip: per activity, the
    /// awards go in chunks of [`TAKE_CHUNK`], each chunk to one random sub-stock not seen
    /// empty, which covers what it can in one take_many.lua call. `awards` are (award
    /// index, activity, amount); returns the awards covered. The others go through
    /// [`Budget::take`].
    pub async fn take_batched(
        &self,
        redis: &Redis,
        awards: &[(usize, &str, i64)],
    ) -> redis::RedisResult<Vec<(usize, Taken)>> {
        let mut by_activity: HashMap<&str, Vec<(usize, i64)>> = HashMap::new();
        for &(k, activity, amount) in awards {
            by_activity.entry(activity).or_default().push((k, amount));
        }
        let mut pipe = redis::pipe();
        // Per call: the activity, the sub-stock, and the (award index, amount) it covers.
        type Call<'a> = (&'a str, u32, &'a [(usize, i64)]);
        let mut calls: Vec<Call> = Vec::new();
        for (activity, group) in &by_activity {
            let mut stocks = self.candidates(activity).into_iter().cycle();
            for chunk in group.chunks(TAKE_CHUNK) {
                let Some(i) = stocks.next() else { break };
                let mut cmd = evalsha(&self.take_many, &[&redis.sub_stock_key(activity, i)]);
                for &(_, amount) in chunk {
                    cmd.arg(amount);
                }
                pipe.add_command(cmd);
                calls.push((activity, i, chunk));
            }
        }
        if calls.is_empty() {
            return Ok(Vec::new());
        }
        let answers: Vec<Vec<i64>> =
            crate::store::query_scripted(redis, &pipe, &self.scripts()).await?;
        let mut covered = Vec::with_capacity(awards.len());
        for ((activity, i, chunk), answer) in calls.into_iter().zip(answers) {
            if answer.len() != chunk.len() + 1 {
                return Err(redis::RedisError::from((
                    redis::ErrorKind::TypeError,
                    "take_many.lua answered the wrong number of awards",
                )));
            }
            if answer[0] == 0 {
                self.mark_exhausted(activity, i);
            }
            for (&(k, amount), &taken) in chunk.iter().zip(&answer[1..]) {
                if taken == 1 {
                    covered.push((
                        k,
                        Taken {
                            parts: vec![(i, amount)],
                        },
                    ));
                }
            }
        }
        Ok(covered)
    }

    /// Takes `amount` from the activity's budget, or nothing.
    ///
    /// Sub-stocks are visited in a random order, skipping those recently seen empty. When
    /// no single sub-stock covers the amount but together they might (the last cents are
    /// spread thin), a second pass takes what each has; if even that falls short, every
    /// partial take is given back and the result is `None`.
    pub async fn take(
        &self,
        redis: &Redis,
        activity: &str,
        amount: i64,
    ) -> redis::RedisResult<Option<Taken>> {
        debug_assert!(amount > 0);
        let mut conn = redis.conn();
        let order = self.candidates(activity);
        let mut seen_some = Vec::new();
        for &i in &order {
            let key = redis.sub_stock_key(activity, i);
            let (taken, avail): (i64, i64) = self.take_one(&mut conn, &key, amount, "all").await?;
            if taken == amount {
                if avail == 0 {
                    self.mark_exhausted(activity, i);
                }
                return Ok(Some(Taken {
                    parts: vec![(i, taken)],
                }));
            }
            if avail == 0 {
                self.mark_exhausted(activity, i);
            } else {
                seen_some.push(i);
            }
        }
        if seen_some.is_empty() {
            return Ok(None);
        }
        // Second pass: gather the award from several thin sub-stocks.
        let mut got = Taken::default();
        let mut need = amount;
        for &i in &seen_some {
            let key = redis.sub_stock_key(activity, i);
            let (taken, avail): (i64, i64) = self.take_one(&mut conn, &key, need, "upto").await?;
            if avail == 0 {
                self.mark_exhausted(activity, i);
            }
            if taken > 0 {
                got.parts.push((i, taken));
                need -= taken;
            }
            if need == 0 {
                return Ok(Some(got));
            }
        }
        self.give_back(redis, activity, &got).await?;
        Ok(None)
    }

    async fn take_one(
        &self,
        conn: &mut redis::aio::ConnectionManager,
        key: &str,
        amount: i64,
        mode: &str,
    ) -> redis::RedisResult<(i64, i64)> {
        self.take
            .key(key)
            .arg(amount)
            .arg(mode)
            .invoke_async(conn)
            .await
    }

    /// Returns exactly what `taken` took.
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
            pipe.cmd("HINCRBY")
                .arg(redis.sub_stock_key(activity, *i))
                .arg("avail")
                .arg(*cents)
                .ignore();
        }
        let mut conn = redis.conn();
        pipe.query_async::<()>(&mut conn).await?;
        self.forget_exhausted(activity);
        Ok(())
    }

    pub async fn figures(
        &self,
        redis: &Redis,
        activity: &str,
    ) -> redis::RedisResult<BudgetFigures> {
        let mut pipe = redis::pipe();
        for i in 0..self.sub_stocks {
            pipe.cmd("HMGET")
                .arg(redis.sub_stock_key(activity, i))
                .arg("avail")
                .arg("funded");
        }
        let mut conn = redis.conn();
        let rows: Vec<(Option<i64>, Option<i64>)> = pipe.query_async(&mut conn).await?;
        let mut figures = BudgetFigures {
            min_sub_stock_cents: i64::MAX,
            ..Default::default()
        };
        for (avail, funded) in rows {
            let (avail, funded) = (avail.unwrap_or(0), funded.unwrap_or(0));
            figures.remaining_cents += avail;
            figures.funded_cents += funded;
            figures.taken_cents += funded - avail;
            figures.min_sub_stock_cents = figures.min_sub_stock_cents.min(avail);
        }
        Ok(figures)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_add_up_to_the_total_and_never_shrink() {
        let budget = Budget::new(16, Duration::from_secs(1));
        for total in [1_i64, 15, 16, 17, 137, 1_000_003] {
            let sum: i64 = (0..16).map(|i| budget.share(total, i)).sum();
            assert_eq!(sum, total);
            for i in 0..16 {
                assert!(budget.share(total + 1, i) >= budget.share(total, i));
            }
        }
    }
}
