//! Storing tokens: store.lua, one call per [`STORE_CHUNK`] tokens (and on a cluster per
//! partition, whose keys share a slot), all in one pipeline; the same calls can also
//! take the tokens' money from budget sub-stocks (on a cluster, only from those placed
//! in the call's partition).

use std::collections::HashMap;

use super::Tokens;
use crate::domain::UserId;
use crate::pb;
use crate::store::{key_slot, query_scripted};
use crate::tokens::counters::{CountedIn, CounterGroups};
use crate::tokens::status::{pending_status, stream_line, AwardEntry};

/// Whose budget a token spent and how much of it: its activity and cents, or for a
/// coupon its template and one unit of stock.
pub fn stock_of(token: &pb::RedPacketToken) -> (&str, i64) {
    match &token.coupon {
        Some(terms) => (terms.template_id.as_str(), 1),
        None => (token.activity_id.as_str(), token.amount_cents),
    }
}

/// What a freshly minted token is, as its status value and stream line say it: its
/// stock's owner (activity, or template for a coupon) and amount.
fn entry_of(user: UserId, token: &pb::RedPacketToken) -> AwardEntry {
    let (owner, amount_cents) = stock_of(token);
    AwardEntry {
        user,
        out_trade_no: token.out_trade_no.clone(),
        amount_cents,
        activity_id: owner.to_string(),
        scene_id: token.scene_id.clone(),
        at_ms: token.issued_at_ms,
        stream_id: None,
        budget_gen: token.budget_gen,
        coupon: token.coupon.is_some(),
    }
}

/// Tokens stored per store.lua call at most, so one call never holds Redis for long.
pub const STORE_CHUNK: usize = 128;

/// A token on its way to store.lua: its place in the caller's list, its user, the
/// token and its encoded bytes.
pub type ToStore<'a> = (usize, UserId, &'a pb::RedPacketToken, &'a [u8]);

/// What store.lua did with a token that takes its money as it is stored
/// ([`Tokens::take_and_store`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TakenAndStored {
    /// Stored now, its money taken from its sub-stock.
    Stored,
    /// Nothing taken: this is what the token hash already holds under its out_trade_no
    /// (a concurrent duplicate's token, the trim marker, a greeting marker).
    Held(Vec<u8>),
    /// Neither stored nor taken: its sub-stock does not cover it.
    Short,
    /// Neither stored nor taken: its sub-stock cannot be spent (its state code, see
    /// budget/stock.lua).
    Unspendable(i64),
}

/// A sub-stock a [`Tokens::take_and_store`] call took from, after the call: its
/// generation's owner (activity, or template) and number, its index, its state (see
/// budget/stock.lua) and what it holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StockAfter {
    pub owner: String,
    pub gen: i64,
    pub index: u32,
    pub state: i64,
    pub avail_cents: i64,
}

/// A sub-stock of one call: (owner, generation), its index and its key. Its place in the
/// call's list, from 1, is its place among the call's sub-stock keys.
type CallStock<'a> = ((&'a str, i64), u32, String);

impl Tokens {
    /// Stores every token: `None` where the token was stored now, what is already held
    /// under its out_trade_no otherwise (a concurrent duplicate won the race, or the
    /// token was trimmed), in the order given.
    pub async fn store<'a>(
        &self,
        tokens: impl Iterator<Item = (UserId, &'a pb::RedPacketToken, &'a [u8])>,
    ) -> redis::RedisResult<Vec<Option<Vec<u8>>>> {
        let (calls, count) = self.calls(tokens);
        let mut pipe = redis::pipe();
        for call in &calls {
            pipe.add_command(self.store_cmd(call, &[]));
        }
        let answers: Vec<Vec<Option<Vec<u8>>>> =
            query_scripted(&self.redis, &pipe, &self.scripts()).await?;
        let mut out: Vec<Option<Vec<u8>>> = vec![None; count];
        for (call, answer) in calls.iter().zip(answers) {
            if answer.len() != call.len() {
                return Err(wrong_answer());
            }
            for (&(i, ..), held) in call.iter().zip(answer) {
                out[i] = held;
            }
        }
        Ok(out)
    }

    /// Takes each token's money from a budget sub-stock of its generation and stores
    /// it, in one store.lua call per [`STORE_CHUNK`] tokens: a token is stored only when
    /// its sub-stock is spendable and covers it, and its money stays taken only when it
    /// is stored, atomically with it. `pick(owner, generation, partition)` chooses the
    /// sub-stock (its index and key) of each call: on a cluster, where a call holds one
    /// partition, it must be in that partition's slot. A token whose owner has none there
    /// (`None`, or a sub-stock in another slot) is left out: nothing is sent for it, and
    /// it is answered [`TakenAndStored::Short`], for the steps.
    /// Returns what became of each token, in the order given, and every sub-stock
    /// taken from as the call left it.
    pub async fn take_and_store<'a>(
        &self,
        tokens: impl Iterator<Item = (UserId, &'a pb::RedPacketToken, &'a [u8])>,
        mut pick: impl FnMut(&str, i64, u32) -> Option<(u32, String)>,
    ) -> redis::RedisResult<(Vec<TakenAndStored>, Vec<StockAfter>)> {
        let redis = &self.redis;
        let (all_calls, count) = self.calls(tokens);
        let mut pipe = redis::pipe();
        let mut calls: Vec<(Vec<ToStore<'_>>, Vec<CallStock<'_>>)> =
            Vec::with_capacity(all_calls.len());
        for call in all_calls {
            let partition = redis.partition_of(call[0].1);
            // On a cluster, the slot every key of the call must be in.
            let slot = redis
                .is_cluster()
                .then(|| key_slot(redis.stream_key(partition).as_bytes()));
            let mut stocks: Vec<CallStock<'_>> = Vec::new();
            let mut without: Vec<(&str, i64)> = Vec::new();
            for (_, _, token, _) in &call {
                let at = (stock_of(token).0, token.budget_gen);
                if stocks.iter().any(|(s, ..)| *s == at) || without.contains(&at) {
                    continue;
                }
                match pick(at.0, at.1, partition) {
                    Some((_, key)) if slot.is_some_and(|s| key_slot(key.as_bytes()) != s) => {
                        tracing::error!(
                            sub_stock = key,
                            partition,
                            "a store call was given a sub-stock in another slot; its awards go the steps"
                        );
                        without.push(at);
                    }
                    Some((index, key)) => stocks.push((at, index, key)),
                    None => without.push(at),
                }
            }
            let call: Vec<ToStore<'_>> = call
                .into_iter()
                .filter(|(_, _, token, _)| {
                    !without.contains(&(stock_of(token).0, token.budget_gen))
                })
                .collect();
            if call.is_empty() {
                continue;
            }
            pipe.add_command(self.store_cmd(&call, &stocks));
            calls.push((call, stocks));
        }
        let mut out = vec![TakenAndStored::Short; count];
        if calls.is_empty() {
            return Ok((out, Vec::new()));
        }
        let answers: Vec<Vec<redis::Value>> =
            query_scripted(&self.redis, &pipe, &self.scripts()).await?;
        let mut after = Vec::new();
        for ((call, stocks), answer) in calls.iter().zip(answers) {
            if answer.len() != call.len() + 2 * stocks.len() {
                return Err(wrong_answer());
            }
            let (tokens, figures) = answer.split_at(call.len());
            for (&(i, ..), value) in call.iter().zip(tokens) {
                out[i] = match value {
                    redis::Value::Nil => TakenAndStored::Stored,
                    redis::Value::Int(0) => TakenAndStored::Short,
                    redis::Value::Int(code) => TakenAndStored::Unspendable(*code),
                    held => TakenAndStored::Held(redis::from_redis_value(held)?),
                };
            }
            for (((owner, gen), index, _), pair) in stocks.iter().zip(figures.chunks(2)) {
                after.push(StockAfter {
                    owner: owner.to_string(),
                    gen: *gen,
                    index: *index,
                    state: redis::from_redis_value(&pair[0])?,
                    avail_cents: redis::from_redis_value(&pair[1])?,
                });
            }
        }
        Ok((out, after))
    }

    /// The store.lua calls for `tokens`, and how many tokens there are. A call holds
    /// whole partitions' tokens, up to STORE_CHUNK (a partition with more is cut): one
    /// stream entry and one set of counter increments per partition and call. On a
    /// cluster a call holds one partition (its keys share a slot); on one node it holds
    /// as many as fit.
    fn calls<'a>(
        &self,
        tokens: impl Iterator<Item = (UserId, &'a pb::RedPacketToken, &'a [u8])>,
    ) -> (Vec<Vec<ToStore<'a>>>, usize) {
        let redis = &self.redis;
        let mut by_partition: HashMap<u32, Vec<ToStore<'_>>> = HashMap::new();
        let mut count = 0;
        for (i, (user, token, bytes)) in tokens.enumerate() {
            by_partition
                .entry(redis.partition_of(user))
                .or_default()
                .push((i, user, token, bytes));
            count = i + 1;
        }
        let mut calls: Vec<Vec<ToStore<'_>>> = Vec::new();
        let mut partitions: Vec<_> = by_partition.into_iter().collect();
        partitions.sort_unstable_by_key(|(p, _)| *p);
        for (_, group) in partitions {
            for piece in group.chunks(STORE_CHUNK) {
                match calls.last_mut() {
                    Some(call)
                        if !redis.is_cluster() && call.len() + piece.len() <= STORE_CHUNK =>
                    {
                        call.extend_from_slice(piece)
                    }
                    _ => calls.push(piece.to_vec()),
                }
            }
        }
        (calls, count)
    }

    /// The store.lua call for `tokens` (of one partition on a cluster), taking each
    /// token's money from the sub-stock `stocks` names for its owner and generation
    /// (none: a plain store).
    fn store_cmd(&self, tokens: &[ToStore<'_>], stocks: &[CallStock<'_>]) -> redis::Cmd {
        let redis = &self.redis;
        let partitions: Vec<u32> = tokens
            .iter()
            .map(|(_, user, ..)| redis.partition_of(*user))
            .collect();
        let mut streams: Vec<u32> = partitions.clone();
        streams.sort_unstable();
        streams.dedup();
        let mut keys: Vec<String> =
            Vec::with_capacity(streams.len() + stocks.len() + 2 * tokens.len() + 1);
        keys.extend(streams.iter().map(|p| redis.stream_key(*p)));
        keys.extend(stocks.iter().map(|(_, _, key)| key.clone()));
        for (_, user, ..) in tokens {
            keys.push(redis.tokens_key(*user));
            keys.push(redis.status_key(*user));
        }
        // Readers sum the counters over every partition, so on one node a call counts
        // all its tokens of an activity in its first partition's hash: four increments
        // per activity and call rather than per partition.
        let counted_in = |partition: u32| {
            if redis.is_cluster() {
                partition
            } else {
                streams[0]
            }
        };
        // What each token is (its stock's owner and amount), and its counter group,
        // summed here (store.lua takes out a token it did not store).
        let entries: Vec<AwardEntry> = tokens
            .iter()
            .map(|(_, user, token, _)| entry_of(*user, token))
            .collect();
        let mut groups = CounterGroups::default();
        let mut placed: Vec<u64> = Vec::with_capacity(tokens.len());
        for (entry, partition) in entries.iter().zip(&partitions) {
            let place = CountedIn {
                partition: counted_in(*partition),
                owner: &entry.activity_id,
                at_ms: entry.at_ms,
                gen: entry.budget_gen,
            };
            let group = groups.add(
                &mut keys,
                place,
                |p, owner| redis.counters_key(p, owner),
                entry.amount_cents,
            );
            let stream = streams.binary_search(partition).unwrap_or_default() + 1;
            // 0: takes nothing (store.lua refuses that in a call that takes).
            let stock = stocks
                .iter()
                .position(|((owner, gen), ..)| {
                    *owner == entry.activity_id && *gen == entry.budget_gen
                })
                .map_or(0, |place| place + 1);
            placed.push(((stock as u64 * 65_536) + stream as u64) * 65_536 + group as u64);
        }
        let mut cmd = redis::cmd("EVALSHA");
        cmd.arg(self.scripts.store.get_hash())
            .arg(keys.len())
            .arg(&keys);
        cmd.arg(tokens.len())
            .arg(streams.len())
            .arg(groups.len())
            .arg(stocks.len());
        for group in groups.iter() {
            cmd.arg(group.key)
                .arg(&group.hour)
                .arg(group.gen_field())
                .arg(group.tokens)
                .arg(group.cents);
        }
        for (((_, _, token, bytes), entry), place) in tokens.iter().zip(&entries).zip(placed) {
            cmd.arg(&token.out_trade_no)
                .arg(*bytes)
                .arg(pending_status(entry))
                .arg(stream_line(entry))
                .arg(place)
                .arg(entry.amount_cents);
        }
        cmd
    }

    /// Stores tokens verified elsewhere (client sync); returns which were stored now
    /// (true) or already held (false).
    pub async fn restore(
        &self,
        tokens: &[(UserId, pb::RedPacketToken, Vec<u8>)],
    ) -> redis::RedisResult<Vec<bool>> {
        let result = self
            .store(tokens.iter().map(|(u, t, b)| (*u, t, b.as_slice())))
            .await?;
        // `None`: stored now. A token already there (even these very bytes) was known.
        Ok(result.iter().map(Option::is_none).collect())
    }
}

fn wrong_answer() -> redis::RedisError {
    redis::RedisError::from((
        redis::ErrorKind::TypeError,
        "store.lua answered the wrong number of values",
    ))
}
