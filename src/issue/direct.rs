//! The one-step issue path (`issue.one_step`): plain cash awards minted first, then taken
//! and stored by one store.lua call per chunk. On a single Redis node any call takes from
//! any sub-stock; on a cluster only an activity whose live generation is placed in the
//! partitions (`issue.sub_stocks_in_partitions`) goes this way, each call taking from a
//! sub-stock in its own partition's slot.

use std::collections::{HashMap, HashSet};

use super::{resolve_held, Issued, Issuer, ValidAward};
use crate::budget;
use crate::error::{Error, Result};
use crate::token;
use crate::tokens::TakenAndStored;

/// What the direct awards of one activity take from: its live generation, the
/// generation's sub-stocks not seen empty lately (never none), in a random order, and
/// how many store calls took from them so far.
struct Spendable {
    gen: budget::Gen,
    order: Vec<u32>,
    calls: usize,
}

const DIRECT: &str = "only awards of an activity with a spendable sub-stock go direct";

impl Issuer {
    /// Plain cash awards (no coupon, no guard kept in Redis) of an activity with a live
    /// generation (on a cluster, one placed in the partitions) go in one step: minted
    /// first, then taken and stored by one script call per
    /// [`crate::tokens::STORE_CHUNK`] tokens (on a cluster, per partition)
    /// ([`Tokens::take_and_store`]), whose store doubles as the idempotency check: a
    /// token already held under the out_trade_no takes nothing and is answered as a
    /// replay or a conflict. Awards whose sub-stock did not cover them, or could not be
    /// spent from, are left unanswered in `out` for the stepwise path (their tokens were
    /// never stored nor shown, and the stepwise path mints again).
    pub(super) async fn issue_direct(
        &self,
        awards: &[(usize, ValidAward)],
        out: &mut [Option<Result<Issued>>],
    ) {
        if !self.one_step {
            return;
        }
        let cluster = self.redis.is_cluster();
        // Per activity: what its awards take from (`None`: no live generation, or no
        // sub-stock of it spendable).
        let mut stocks: HashMap<&str, Option<Spendable>> = HashMap::new();
        let mut direct: Vec<usize> = Vec::with_capacity(awards.len());
        for (k, (_, v)) in awards.iter().enumerate() {
            if v.coupon.is_some() || v.guards.in_redis() {
                continue;
            }
            let activity = v.activity_id.as_str();
            let spendable = stocks.entry(activity).or_insert_with(|| {
                let gen = self
                    .budget
                    .live_gen(activity)
                    .filter(|gen| !cluster || gen.placement.in_partitions())?;
                let order = self.budget.candidates(activity, gen);
                (!order.is_empty()).then_some(Spendable {
                    gen,
                    order,
                    calls: 0,
                })
            });
            if spendable.is_some() {
                direct.push(k);
            }
        }
        if direct.is_empty() {
            return;
        }
        let spendable = |activity: &str| stocks[activity].as_ref().expect(DIRECT);
        let drafts = direct
            .iter()
            .map(|&k| {
                let v = &awards[k].1;
                let mut draft = v.draft.clone();
                draft.budget_gen = spendable(&v.activity_id).gen.gen;
                draft
            })
            .collect();
        let minted = match token::mint_all(&self.keys.current(), drafts) {
            Ok(minted) => minted,
            Err(err) => {
                // The stepwise path mints again and answers its own failure.
                tracing::warn!(error = %err, "minting failed on the direct path");
                return;
            }
        };
        let read_at = std::time::Instant::now();
        // Each call takes from the next of the activity's spendable sub-stocks it can
        // reach (on a cluster, those in its partition's slot; none: its awards go the
        // steps).
        let redis = &self.redis;
        let pick = |activity: &str, _gen: i64, partition: u32| {
            let s = stocks
                .get_mut(activity)
                .and_then(Option::as_mut)
                .expect(DIRECT);
            let gen = s.gen;
            let reachable: Vec<u32> = s
                .order
                .iter()
                .copied()
                .filter(|&i| gen.takes_in(redis, partition, i))
                .collect();
            if reachable.is_empty() {
                return None;
            }
            s.calls += 1;
            let index = reachable[(s.calls - 1) % reachable.len()];
            Some((index, gen.stock_key(redis, activity, index)))
        };
        let stored = self
            .tokens
            .take_and_store(
                direct
                    .iter()
                    .zip(&minted)
                    .map(|(&k, a)| (awards[k].1.user, &a.token, a.bytes.as_slice())),
                pick,
            )
            .await;
        let (outcomes, after) = match stored {
            Ok(stored) => stored,
            Err(err) => {
                // The calls may or may not have run; each took and stored atomically, so
                // a retry of the award is a replay or a fresh award, never a second one.
                let err = Error::from(err);
                for &k in &direct {
                    out[k] = Some(Err(err.duplicate()));
                }
                return;
            }
        };
        // An empty sub-stock is skipped for a while; a drained or lost one reloads the
        // live generation (once per activity) before the stepwise path takes.
        let mut handled: HashSet<&str> = HashSet::new();
        for s in &after {
            if s.state != 0 && !handled.insert(s.owner.as_str()) {
                continue;
            }
            if let Err(err) = self
                .budget
                .note_sub_stock(&self.redis, &self.db, s, read_at)
                .await
            {
                tracing::warn!(
                    error = format!("{err:#}"),
                    activity = s.owner,
                    "handling an unspendable sub-stock failed"
                );
            }
        }
        for ((&k, award), outcome) in direct.iter().zip(minted).zip(outcomes) {
            let v = &awards[k].1;
            out[k] = match outcome {
                TakenAndStored::Stored => Some(Ok(Issued::token(
                    v.out_trade_no.as_str(),
                    award.bytes,
                    false,
                    false,
                ))),
                TakenAndStored::Held(bytes) => Some(resolve_held(&self.ledger, bytes, v).await),
                TakenAndStored::Short | TakenAndStored::Unspendable(_) => None,
            };
        }
    }
}
