//! Issuance: awards become signed tokens, idempotently and never over budget.
//!
//! For every award, in this order:
//! 1. validate against the in-process activity cache (no MySQL on this path);
//! 2. idempotency before budget: a token already stored under the out_trade_no is
//!    returned as it is (a replay), even when the budget has run out since;
//! 3. take the amount from the activity's budget sub-stocks;
//! 4. mint the batch's tokens, signed together (one signature over their Merkle root);
//! 5. store it with the token record's store (`tokens`): token, status, hourly counters
//!    and a settlement stream entry, atomically in the user's partition.
//!
//! A crash between 3 and 5 can only leak budget (reconciliation shows and repairs it);
//! a token is never minted twice because step 5 refuses a second token for one
//! out_trade_no, and a loser of that race gives its budget back.
//!
//! Plain cash awards (no coupon, no guard kept in Redis) take a direct path first: minted
//! with their activity's live generation, then taken and stored by one script, so steps
//! 2, 3 and 5 are one round trip and one existence check per award, and a take never
//! exists without its token. What the direct path could not cover (a sub-stock short or
//! unspendable) goes the steps above. On a cluster the direct path needs the
//! generation's sub-stocks placed in the partitions (`issue.sub_stocks_in_partitions`):
//! otherwise a user's keys and a sub-stock are in different slots and every award goes
//! the steps.
//!
//! The batch endpoint and the single one run the same code: every step is one
//! pipelined Redis round trip for the whole batch.

pub mod admission;
pub mod coalesce;
mod direct;
pub mod guards;
pub mod stats;
mod validate;

use std::collections::HashMap;
use std::sync::Arc;

use crate::activity::ActivityCache;
use crate::budget::{self, Budget};
use crate::domain::UserId;
use crate::error::{Error, Result};
use crate::keys::Keys;
use crate::ledger::Ledger;
use crate::metrics;
use crate::store::{now_ms, Db, Redis};
use crate::switches::Switches;
use crate::token::{self, SignedAward};
use crate::tokens::{Tokens, GREETING, TRIMMED};

pub use admission::{Admission, SharedLimit};
pub use stats::StatsCounter;
pub use validate::{
    same_award, validate, AwardRequest, CouponPlan, Fallback, FallbackTo, ValidAward,
};

/// A successful award: the token bytes, and whether this was a replay.
#[derive(Debug, Clone, PartialEq)]
pub struct Issued {
    pub out_trade_no: String,
    /// Empty when a coupon scene's fallback handed out only a greeting.
    pub token: Vec<u8>,
    pub replayed: bool,
    /// A coupon scene's fallback: `template` or `greeting`.
    pub fallback: Option<&'static str>,
    pub greeting: Option<String>,
}

impl Issued {
    fn token(out_trade_no: &str, token: Vec<u8>, replayed: bool, fallback: bool) -> Self {
        Self {
            out_trade_no: out_trade_no.to_string(),
            token,
            replayed,
            fallback: fallback.then_some("template"),
            greeting: None,
        }
    }
}

/// Which stock an award takes from: its activity's budget, or for a coupon the one
/// unit of its template's stock (the scene's template, or the fallback template).
#[derive(Debug, Clone)]
struct Stock {
    owner: String,
    amount: i64,
    /// A coupon's template and whether it is the scene's fallback.
    coupon: Option<(Arc<crate::coupons::Template>, bool)>,
}

impl Stock {
    fn of(v: &ValidAward) -> Self {
        match &v.coupon {
            Some(plan) => Self {
                owner: plan.template.id.clone(),
                amount: 1,
                coupon: Some((plan.template.clone(), false)),
            },
            None => Self {
                owner: v.activity_id.clone(),
                amount: v.amount.get(),
                coupon: None,
            },
        }
    }

    fn fallback_to(template: &Arc<crate::coupons::Template>) -> Self {
        Self {
            owner: template.id.clone(),
            amount: 1,
            coupon: Some((template.clone(), true)),
        }
    }

    fn is_fallback(&self) -> bool {
        self.coupon.as_ref().is_some_and(|(_, f)| *f)
    }
}

/// The issuing capability: what it reads and writes, handed over by the wiring.
pub struct Issuer {
    pub redis: Arc<Redis>,
    pub db: Arc<Db>,
    pub tokens: Tokens,
    pub ledger: Ledger,
    pub budget: Arc<Budget>,
    pub keys: Arc<Keys>,
    pub activities: Arc<ActivityCache>,
    pub switches: Arc<Switches>,
    pub admission: Admission,
    pub guards: Arc<guards::Guards>,
    pub stats: Arc<StatsCounter>,
    /// Coupon templates' remaining shares, for scene fallbacks.
    pub stock_gauge: Arc<crate::coupons::StockGauge>,
    /// How long after its activity ends a greeting answer is still replayed (ms), as
    /// trimmed tokens' markers are (`wallet.retry_grace_secs`).
    pub retry_grace_ms: i64,
    /// Plain cash awards take the direct path (`issue.one_step`; on a cluster, for
    /// generations placed in the partitions).
    pub one_step: bool,
}

/// What Redis holds under an award's out_trade_no, answered: the token itself, or, once
/// trimmed, the signed token the ledger row keeps (the only MySQL read of the issuing
/// path, and only for such a late retry).
async fn resolve_held(ledger: &Ledger, held: Vec<u8>, award: &ValidAward) -> Result<Issued> {
    if held == GREETING {
        return replay_greeting(award);
    }
    if held != TRIMMED {
        return replay_or_conflict(held, award);
    }
    match ledger
        .token_of(award.user, award.out_trade_no.as_str())
        .await?
    {
        Some(Some(token)) => replay_or_conflict(token, award),
        _ => Err(Error::IdempotencyConflict(format!(
            "out_trade_no `{}` was issued and settled before; its token is no longer available",
            award.out_trade_no
        ))),
    }
}

/// The greeting an award was answered with before, again: the scene's greeting (the
/// out_trade_no names the scene; a scene's fallback never changes).
fn replay_greeting(award: &ValidAward) -> Result<Issued> {
    let greeting = match award.coupon.as_ref().and_then(|p| p.fallback.as_ref()) {
        Some(Fallback {
            to: FallbackTo::Greeting(text),
            ..
        }) => text.clone(),
        _ => {
            return Err(Error::IdempotencyConflict(format!(
                "out_trade_no `{}` was answered with a greeting, not this award",
                award.out_trade_no
            )))
        }
    };
    Ok(Issued {
        out_trade_no: award.out_trade_no.to_string(),
        token: Vec::new(),
        replayed: true,
        fallback: Some("greeting"),
        greeting: Some(greeting),
    })
}

/// Compares a stored token with a request for the same out_trade_no.
fn replay_or_conflict(stored: Vec<u8>, award: &ValidAward) -> Result<Issued> {
    let token = token::decode_trusted(&stored)
        .map_err(|e| Error::Internal(anyhow::anyhow!("stored token unreadable: {e}")))?;
    if same_award(&token, &award.draft) {
        let fallback = token.coupon.as_ref().is_some_and(|c| c.fallback);
        Ok(Issued::token(
            award.out_trade_no.as_str(),
            stored,
            true,
            fallback,
        ))
    } else {
        Err(Error::IdempotencyConflict(format!(
            "out_trade_no `{}` was issued with other fields",
            award.out_trade_no
        )))
    }
}

impl Issuer {
    /// Issues a batch of awards; results come back in request order and one failing item
    /// does not fail the others.
    pub async fn issue(&self, caller: &str, requests: Vec<AwardRequest>) -> Vec<Result<Issued>> {
        self.issue_at(caller, requests, now_ms()).await
    }

    /// [`Issuer::issue`] at a given moment (ms since the epoch), which becomes the
    /// tokens' issue time.
    pub async fn issue_at(
        &self,
        caller: &str,
        requests: Vec<AwardRequest>,
        now: i64,
    ) -> Vec<Result<Issued>> {
        let mut results: Vec<Option<Result<Issued>>> = (0..requests.len()).map(|_| None).collect();
        let mut checked: Vec<(usize, ValidAward)> = Vec::with_capacity(requests.len());
        let mut shared: Vec<Vec<SharedLimit>> = Vec::with_capacity(requests.len());
        let mut flags = Vec::new();
        for (i, req) in requests.iter().enumerate() {
            if self.switches.issue_off() {
                results[i] = Some(Err(Error::Unavailable("issuing is switched off".into())));
                continue;
            }
            let admitted = validate(&self.activities, req, now).and_then(|v| {
                let cached = self.activities.get(&req.activity_id);
                let limits = self.admission.admit_local(
                    cached.as_deref(),
                    caller,
                    &req.activity_id,
                    &req.scene_id,
                )?;
                if let Err((err, flag)) = self.guards.check_local(caller, v.user, &v.guards, now) {
                    flags.extend(flag.map(|f| (v.user, f)));
                    return Err(err);
                }
                Ok((v, limits))
            });
            match admitted {
                Ok((v, limits)) => {
                    checked.push((i, v));
                    shared.push(limits);
                }
                Err(err) => results[i] = Some(Err(err)),
            }
        }
        self.guards.flag(&flags, now).await;
        // The fleet-wide limits: one Redis round trip for the batch.
        let mut valid: Vec<(usize, ValidAward)> = Vec::with_capacity(checked.len());
        match self.admission.admit_shared(&shared).await {
            Ok(admitted) => {
                for ((i, v), ok) in checked.into_iter().zip(admitted) {
                    if ok {
                        valid.push((i, v));
                    } else {
                        results[i] = Some(Err(Error::RateLimited {
                            retry_after_secs: 1,
                        }));
                    }
                }
            }
            Err(err) => {
                for (i, _) in checked {
                    results[i] = Some(Err(err.duplicate()));
                }
            }
        }
        // The same out_trade_no twice in one batch: the first is issued, later ones are
        // answered from its result (a replay, or a conflict when fields differ).
        let mut first_of: HashMap<String, usize> = HashMap::new();
        let mut duplicates: Vec<(usize, usize, ValidAward)> = Vec::new();
        let mut unique: Vec<(usize, ValidAward)> = Vec::with_capacity(valid.len());
        for (i, v) in valid {
            match first_of.get(v.out_trade_no.as_str()) {
                Some(&first) => duplicates.push((i, first, v)),
                None => {
                    first_of.insert(v.out_trade_no.to_string(), i);
                    unique.push((i, v));
                }
            }
        }
        if !unique.is_empty() {
            let outcomes = self.issue_unique(&unique, now).await;
            for ((i, v), outcome) in unique.iter().zip(outcomes) {
                if let Ok(issued) = &outcome {
                    if !issued.replayed {
                        self.stats.add(&v.activity_id, 1, v.cash_cents());
                    }
                }
                results[*i] = Some(outcome);
            }
        }
        for (i, first, v) in duplicates {
            results[i] = Some(match &results[first] {
                Some(Ok(issued)) => replay_or_conflict(issued.token.clone(), &v),
                Some(Err(err)) => Err(err.duplicate()),
                None => Err(Error::internal("duplicate without a first result")),
            });
        }
        let out: Vec<Result<Issued>> = results
            .into_iter()
            .map(|r| r.unwrap_or_else(|| Err(Error::internal("award left without a result"))))
            .collect();
        for r in &out {
            metrics::award_outcome(match r {
                Ok(i) if i.replayed => "replayed",
                Ok(_) => "issued",
                Err(e) => e.code(),
            });
        }
        out
    }

    /// The fallback of a coupon award: a coupon of the fallback template, or (as the
    /// `Err` side) the answer that hands out only the greeting.
    fn fall_back(&self, v: &ValidAward, f: &Fallback) -> std::result::Result<Stock, Issued> {
        match &f.to {
            FallbackTo::Template(t) => {
                metrics::coupon_fallback("template");
                Ok(Stock::fallback_to(t))
            }
            FallbackTo::Greeting(text) => {
                metrics::coupon_fallback("greeting");
                Err(Issued {
                    out_trade_no: v.out_trade_no.to_string(),
                    token: Vec::new(),
                    replayed: false,
                    fallback: Some("greeting"),
                    greeting: Some(text.clone()),
                })
            }
        }
    }

    /// Records the awards answered with only a greeting under their out_trade_no, so a
    /// retry is answered the same even once stock came back; an award whose token was
    /// stored first is answered with that token instead. A greeting carries no value:
    /// when Redis cannot record it, it is answered all the same.
    async fn record_greetings(
        &self,
        awards: &[(usize, ValidAward)],
        out: &mut [Option<Result<Issued>>],
    ) {
        let at: Vec<usize> = (0..awards.len())
            .filter(|&k| matches!(&out[k], Some(Ok(i)) if i.token.is_empty() && !i.replayed))
            .collect();
        if at.is_empty() {
            return;
        }
        let greetings: Vec<(UserId, &str, i64)> = at
            .iter()
            .map(|&k| {
                let v = &awards[k].1;
                let ends_ms = self
                    .activities
                    .get(&v.activity_id)
                    .map(|a| a.activity.ends_at.timestamp_millis())
                    .unwrap_or_else(crate::store::now_ms);
                (
                    v.user,
                    v.out_trade_no.as_str(),
                    ends_ms.saturating_add(self.retry_grace_ms),
                )
            })
            .collect();
        match self.tokens.record_greetings(&greetings).await {
            Ok(held) => {
                for (&k, held) in at.iter().zip(held) {
                    if let Some(bytes) = held {
                        out[k] = Some(resolve_held(&self.ledger, bytes, &awards[k].1).await);
                    }
                }
            }
            Err(err) => {
                tracing::warn!(error = %err, "recording greeting answers failed; a retry may get another answer")
            }
        }
    }

    /// Takes each award's stock: batched first takes, then walks and grants for the
    /// rest. Awards nothing covered are answered `budget_exhausted` (or `unavailable`
    /// when the budget could not be read) in `out`.
    async fn take(
        &self,
        at: &[usize],
        stocks: &HashMap<usize, Stock>,
        out: &mut [Option<Result<Issued>>],
    ) -> HashMap<usize, budget::Taken> {
        let (redis, db) = (&self.redis, &self.db);
        let mut taken: HashMap<usize, budget::Taken> = HashMap::with_capacity(at.len());
        let firsts: Vec<(usize, &str, i64)> = at
            .iter()
            .map(|&k| (k, stocks[&k].owner.as_str(), stocks[&k].amount))
            .collect();
        match self.budget.take_batched(redis, db, &firsts).await {
            Ok(got) => taken.extend(got),
            Err(err) => {
                tracing::warn!(
                    error = format!("{err:#}"),
                    "batched budget take failed; taking one by one"
                )
            }
        }
        let rest: Vec<(usize, &str, i64)> = firsts
            .iter()
            .filter(|(k, ..)| !taken.contains_key(k))
            .copied()
            .collect();
        if !rest.is_empty() {
            match self.budget.take_each(redis, db, &rest).await {
                Ok(got) => taken.extend(got),
                Err(err) => {
                    tracing::warn!(error = format!("{err:#}"), "budget take failed");
                    for (k, ..) in &rest {
                        if !taken.contains_key(k) {
                            out[*k] = Some(Err(Error::Unavailable("budget unavailable".into())));
                        }
                    }
                }
            }
            for (k, ..) in &rest {
                if !taken.contains_key(k) && out[*k].is_none() {
                    out[*k] = Some(Err(Error::BudgetExhausted));
                }
            }
        }
        taken
    }

    async fn issue_unique(&self, awards: &[(usize, ValidAward)], now: i64) -> Vec<Result<Issued>> {
        let (redis, db) = (&self.redis, &self.db);
        let mut out: Vec<Option<Result<Issued>>> = (0..awards.len()).map(|_| None).collect();

        // Step 2 to 5 in one, where the direct path applies (plain cash; on a cluster,
        // sub-stocks placed in the partitions).
        self.issue_direct(awards, &mut out).await;

        // Step 2: idempotency, one pipelined HGET per award left.
        let left: Vec<usize> = (0..awards.len()).filter(|&k| out[k].is_none()).collect();
        if left.is_empty() {
            return out.into_iter().flatten().collect();
        }
        let keys: Vec<(UserId, &str)> = left
            .iter()
            .map(|&k| (awards[k].1.user, awards[k].1.out_trade_no.as_str()))
            .collect();
        let existing = match self.tokens.held(&keys).await {
            Ok(existing) => existing,
            Err(err) => {
                let err = Error::from(err);
                for &k in &left {
                    out[k] = Some(Err(err.duplicate()));
                }
                Vec::new()
            }
        };
        let mut fresh: Vec<usize> = Vec::with_capacity(left.len());
        for (&k, stored) in left.iter().zip(existing) {
            match stored {
                Some(bytes) => out[k] = Some(resolve_held(&self.ledger, bytes, &awards[k].1).await),
                None => fresh.push(k),
            }
        }

        // Step 2b: the seckill guards kept in Redis, for the scenes that turn them on.
        let (guarded_at, guarded): (Vec<usize>, Vec<guards::Guarded<'_>>) = fresh
            .iter()
            .filter(|&&k| awards[k].1.guards.in_redis())
            .map(|&k| {
                let v = &awards[k].1;
                // An activity no longer cached: its claims are checked as if Redis had
                // lost them.
                let opened_at_ms = self
                    .activities
                    .get(&v.draft.activity_id)
                    .map_or(0, |a| a.activity.starts_at.timestamp_millis());
                let guarded = guards::Guarded {
                    user: v.user,
                    guards: &v.guards,
                    scene: guards::win_scene(&v.draft.activity_id, &v.draft.scene_id),
                    out_trade_no: v.out_trade_no.as_str(),
                    opened_at_ms,
                };
                (k, guarded)
            })
            .unzip();
        let mut claims: Vec<(usize, UserId, String)> = Vec::new();
        if !guarded.is_empty() {
            let verdicts = self.guards.check_shared(&guarded, now).await;
            for ((k, g), verdict) in guarded_at.into_iter().zip(guarded).zip(verdicts) {
                match verdict {
                    Ok(()) if g.guards.one_win_per_user => claims.push((k, g.user, g.scene)),
                    Ok(()) => {}
                    Err(err) => out[k] = Some(Err(err)),
                }
            }
            fresh.retain(|k| out[*k].is_none());
        }

        // Step 3: budget. The awards' first takes go in one pipelined round trip, a few
        // awards per call on random sub-stocks; awards it did not cover walk the
        // sub-stocks, and those still uncovered share a grant (budget moved from MySQL).
        // A coupon takes one unit of its template's stock; a coupon scene whose
        // template runs low hands out its fallback instead.
        let mut stocks: HashMap<usize, Stock> = HashMap::with_capacity(fresh.len());
        for &k in &fresh {
            let v = &awards[k].1;
            let mut stock = Stock::of(v);
            if let Some(plan) = &v.coupon {
                if let Some(f) = &plan.fallback {
                    let share = self
                        .stock_gauge
                        .share(&self.budget, redis, db, &plan.template)
                        .await;
                    if share.is_some_and(|s| s < f.under_share) {
                        match self.fall_back(v, f) {
                            Ok(fallback) => stock = fallback,
                            Err(greeting) => {
                                out[k] = Some(Ok(greeting));
                                continue;
                            }
                        }
                    }
                }
            }
            stocks.insert(k, stock);
        }
        fresh.retain(|k| out[*k].is_none());
        let mut taken = self.take(&fresh, &stocks, &mut out).await;
        // Coupons their template could not cover get the scene's fallback, once.
        let mut second: Vec<usize> = Vec::new();
        for &k in &fresh {
            if taken.contains_key(&k) || !matches!(out[k], Some(Err(Error::BudgetExhausted))) {
                continue;
            }
            let v = &awards[k].1;
            let Some(f) = v.coupon.as_ref().and_then(|p| p.fallback.as_ref()) else {
                continue;
            };
            if stocks[&k].is_fallback() {
                continue;
            }
            match self.fall_back(v, f) {
                Ok(fallback) => {
                    stocks.insert(k, fallback);
                    out[k] = None;
                    second.push(k);
                }
                Err(greeting) => out[k] = Some(Ok(greeting)),
            }
        }
        if !second.is_empty() {
            taken.extend(self.take(&second, &stocks, &mut out).await);
        }
        self.record_greetings(awards, &mut out).await;

        // Step 4: mint, recording the budget generation the money came from. Every
        // token of the batch is signed together: one signature over their Merkle root.
        let mut minted: Vec<(usize, SignedAward)> = Vec::with_capacity(taken.len());
        let to_mint: Vec<usize> = fresh
            .iter()
            .copied()
            .filter(|k| taken.contains_key(k))
            .collect();
        let drafts = to_mint
            .iter()
            .map(|&k| {
                let mut draft = awards[k].1.draft.clone();
                draft.budget_gen = taken[&k].gen.gen;
                if let Some((template, fallback)) = &stocks[&k].coupon {
                    draft.coupon = Some(template.terms_at(draft.issued_at_ms, *fallback));
                }
                draft
            })
            .collect();
        match token::mint_all(&self.keys.current(), drafts) {
            Ok(awards) => minted.extend(to_mint.iter().copied().zip(awards)),
            Err(err) => {
                // Nothing was stored: the budget goes back at once.
                for &k in &to_mint {
                    if let Some(t) = taken.remove(&k) {
                        let _ = self.budget.give_back(redis, &stocks[&k].owner, &t).await;
                    }
                    out[k] = Some(Err(Error::Unavailable(err.to_string())));
                }
            }
        }

        // Step 5: store, one pipelined script call per token.
        if !minted.is_empty() {
            let stored = self
                .tokens
                .store(
                    minted
                        .iter()
                        .map(|(k, a)| (awards[*k].1.user, &a.token, a.bytes.as_slice())),
                )
                .await;
            match stored {
                Ok(winners) => {
                    let mut give_back = Vec::new();
                    for ((k, award), winner) in minted.into_iter().zip(winners) {
                        let v = &awards[k].1;
                        // On a cluster the client sends a call again when its answer
                        // was lost (a timeout, a failover): bytes held that equal ours
                        // are our own store. No twin request holds them: every mint has
                        // its own salt (`token::mint_all`), so held bytes that differ
                        // are a twin's, and our take goes back.
                        let winner = winner.filter(|held| *held != award.bytes);
                        out[k] = Some(match winner {
                            // Another request stored first: a replay, or a conflict.
                            Some(bytes) => {
                                if let Some(t) = taken.remove(&k) {
                                    give_back.push((stocks[&k].owner.clone(), t));
                                }
                                resolve_held(&self.ledger, bytes, v).await
                            }
                            None => Ok(Issued::token(
                                v.out_trade_no.as_str(),
                                award.bytes,
                                false,
                                stocks[&k].is_fallback(),
                            )),
                        });
                    }
                    for (owner, t) in give_back {
                        if let Err(err) = self.budget.give_back(redis, &owner, &t).await {
                            tracing::error!(error = %err, owner, amount = t.total(), "giving back a lost race's budget failed; reconciliation will show the leak");
                        }
                    }
                }
                Err(err) => {
                    // The store may or may not have run. Giving the budget back could mint
                    // money twice, keeping it can only leak: keep it.
                    let err = Error::from(err);
                    for (k, _) in minted {
                        out[k] = Some(Err(err.duplicate()));
                    }
                }
            }
        }
        // A one-win claim of an award that was surely not issued goes back. (After an
        // unknown store outcome it stays: the award may exist.)
        let unclaim: Vec<(UserId, String, String)> = claims
            .into_iter()
            .filter(|(k, ..)| matches!(out[*k], Some(Err(Error::BudgetExhausted))))
            .map(|(k, user, scene)| (user, scene, awards[k].1.out_trade_no.to_string()))
            .collect();
        self.guards.release_wins(&unclaim).await;
        out.into_iter()
            .map(|r| r.unwrap_or_else(|| Err(Error::internal("award left without a result"))))
            .collect()
    }
}
