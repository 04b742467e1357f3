//! Storing tokens: store.lua, one call per [`STORE_CHUNK`] tokens (and on a cluster per
//! partition, whose keys share a slot), all in one pipeline.

use std::collections::HashMap;

use super::Tokens;
use crate::domain::UserId;
use crate::pb;
use crate::store::query_scripted;
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

impl Tokens {
    /// Stores every token: `None` where the token was stored now, what is already held
    /// under its out_trade_no otherwise (a concurrent duplicate won the race, or the
    /// token was trimmed), in the order given.
    pub async fn store<'a>(
        &self,
        tokens: impl Iterator<Item = (UserId, &'a pb::RedPacketToken, &'a [u8])>,
    ) -> redis::RedisResult<Vec<Option<Vec<u8>>>> {
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
        // A call holds whole partitions' tokens, up to STORE_CHUNK (a partition with more
        // is cut): one stream entry and one set of counter increments per partition and
        // call. On a cluster a call holds one partition (its keys share a slot); on one
        // node it holds as many as fit.
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
        let mut pipe = redis::pipe();
        for call in &calls {
            pipe.add_command(self.store_cmd(call));
        }
        let order = calls.iter().map(Vec::as_slice);
        let answers: Vec<Vec<Option<Vec<u8>>>> =
            query_scripted(redis, &pipe, &self.scripts()).await?;
        let mut out: Vec<Option<Vec<u8>>> = vec![None; count];
        for (chunk, answer) in order.zip(answers) {
            if answer.len() != chunk.len() {
                return Err(redis::RedisError::from((
                    redis::ErrorKind::TypeError,
                    "store.lua answered the wrong number of tokens",
                )));
            }
            for (&(i, ..), held) in chunk.iter().zip(answer) {
                out[i] = held;
            }
        }
        Ok(out)
    }

    /// The store.lua call for `tokens` (of one partition on a cluster).
    fn store_cmd(&self, tokens: &[ToStore<'_>]) -> redis::Cmd {
        let redis = &self.redis;
        let partitions: Vec<u32> = tokens
            .iter()
            .map(|(_, user, ..)| redis.partition_of(*user))
            .collect();
        let mut streams: Vec<u32> = partitions.clone();
        streams.sort_unstable();
        streams.dedup();
        let mut keys: Vec<String> = Vec::with_capacity(streams.len() + 2 * tokens.len() + 1);
        keys.extend(streams.iter().map(|p| redis.stream_key(*p)));
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
        let mut placed: Vec<(usize, usize)> = Vec::with_capacity(tokens.len());
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
            placed.push((stream, group));
        }
        let mut cmd = redis::cmd("EVALSHA");
        cmd.arg(self.scripts.store.get_hash())
            .arg(keys.len())
            .arg(&keys);
        cmd.arg(tokens.len()).arg(streams.len()).arg(groups.len());
        for group in groups.iter() {
            cmd.arg(group.key)
                .arg(&group.hour)
                .arg(group.gen_field())
                .arg(group.tokens)
                .arg(group.cents);
        }
        for (((_, _, token, bytes), entry), (stream, group)) in
            tokens.iter().zip(&entries).zip(placed)
        {
            cmd.arg(&token.out_trade_no)
                .arg(*bytes)
                .arg(pending_status(entry))
                .arg(stream_line(entry))
                .arg(stream * 65_536 + group)
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
