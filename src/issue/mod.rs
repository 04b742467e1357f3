//! Issuance: awards become signed tokens, idempotently and never over budget.
//!
//! For every award, in this order:
//! 1. validate against the in-process activity cache (no MySQL on this path);
//! 2. idempotency before budget: a token already stored under the out_trade_no is
//!    returned as it is (a replay), even when the budget has run out since;
//! 3. take the amount from the activity's budget sub-stocks;
//! 4. mint and sign the token;
//! 5. store it with store.lua: token, status, hourly counters and a settlement stream
//!    entry, atomically in the user's partition.
//!
//! A crash between 3 and 5 can only leak budget (reconciliation shows and repairs it);
//! a token is never minted twice because step 5 refuses a second token for one
//! out_trade_no, and a loser of that race gives its budget back.
//!
//! The batch endpoint and the single one run the same code: every step is one
//! pipelined Redis round trip for the whole batch.

pub mod budget;
pub mod coalesce;
pub mod http;
pub mod stats;

use std::collections::HashMap;

use redis::Script;

use crate::domain::{
    parse_rain_id, ActivityId, AwardType, Cents, OutTradeNo, SceneId, Stage, UserId,
};
use crate::error::ApiError;
use crate::pb;
use crate::startup::App;
use crate::store::{hour_of, now_ms, Redis};
use crate::token::{self, SignedAward};

pub use budget::Budget;

/// An award request as the caller sent it (JSON or protobuf).
#[derive(Debug, Clone, serde::Deserialize)]
pub struct AwardRequest {
    pub user_id: i64,
    #[serde(default)]
    pub app_id: u32,
    pub activity_id: String,
    pub scene_id: String,
    #[serde(default)]
    pub rain_id: i64,
    pub award_type: String,
    pub amount_cents: i64,
    /// Optional: when present it must be the activity's stage.
    #[serde(default)]
    pub stage: Option<String>,
    #[serde(default)]
    pub open_time_ms: Option<i64>,
}

impl From<pb::AwardRequest> for AwardRequest {
    fn from(r: pb::AwardRequest) -> Self {
        Self {
            user_id: r.user_id,
            app_id: r.app_id,
            activity_id: r.activity_id,
            scene_id: r.scene_id,
            rain_id: r.rain_id,
            award_type: r.award_type,
            amount_cents: r.amount_cents,
            stage: (!r.stage.is_empty()).then_some(r.stage),
            open_time_ms: (r.open_time_ms != 0).then_some(r.open_time_ms),
        }
    }
}

/// A successful award: the token bytes, and whether this was a replay.
#[derive(Debug, Clone, PartialEq)]
pub struct Issued {
    pub out_trade_no: String,
    pub token: Vec<u8>,
    pub replayed: bool,
}

/// A request that passed validation: every field parsed, the activity open.
#[derive(Debug, Clone)]
pub struct ValidAward {
    pub user: UserId,
    pub out_trade_no: OutTradeNo,
    pub activity_id: String,
    pub amount: Cents,
    /// The token as it would be minted now (signature and key id not yet set).
    pub draft: pb::RedPacketToken,
}

/// A token on its way to store.lua: its place in the caller's list, its user, the
/// token and its encoded bytes.
type ToStore<'a> = (usize, UserId, &'a pb::RedPacketToken, &'a [u8]);

/// Tokens stored per store.lua call at most, so one call never holds Redis for long.
pub const STORE_CHUNK: usize = 128;

pub struct Issuer {
    store: Script,
}

impl Default for Issuer {
    fn default() -> Self {
        Self {
            store: Script::new(include_str!("store.lua")),
        }
    }
}

/// The fields that make two awards "the same award". The open time is the client's
/// moment and may differ between a request and its retry.
fn same_award(a: &pb::RedPacketToken, b: &pb::RedPacketToken) -> bool {
    a.app_id == b.app_id
        && a.user_id == b.user_id
        && a.activity_id == b.activity_id
        && a.scene_id == b.scene_id
        && a.amount_cents == b.amount_cents
        && a.rain_id == b.rain_id
        && a.award_type == b.award_type
        && a.stage == b.stage
        && a.out_trade_no == b.out_trade_no
}

/// Validates one request against the cached activity settings.
pub fn validate(app: &App, req: &AwardRequest, now_ms: i64) -> Result<ValidAward, ApiError> {
    let user = UserId::parse(req.user_id)?;
    let amount = Cents::positive(req.amount_cents, "amount_cents")?;
    let rain_id = parse_rain_id(req.rain_id)?;
    let activity_id = ActivityId::parse(&req.activity_id)?;
    let scene_id = SceneId::parse(&req.scene_id)?;
    let award_type = AwardType::parse(&req.award_type)?;
    let requested_stage: Option<Stage> = req.stage.as_deref().map(str::parse).transpose()?;
    let cached = app
        .activities
        .get(activity_id.as_str())
        .ok_or_else(|| ApiError::NotFound(format!("no activity `{activity_id}`")))?;
    let scene = cached.scenes.get(scene_id.as_str()).ok_or_else(|| {
        ApiError::NotFound(format!("no scene `{scene_id}` in activity `{activity_id}`"))
    })?;
    if scene.award_type != award_type.as_str() {
        return Err(ApiError::InvalidRequest(format!(
            "scene `{scene_id}` awards `{}`, not `{award_type}`",
            scene.award_type
        )));
    }
    let activity = &cached.activity;
    let now = chrono::DateTime::from_timestamp_millis(now_ms).unwrap_or_default();
    if !activity.is_open_at(now) {
        return Err(ApiError::ActivityClosed(format!(
            "activity `{activity_id}` is open from {} to {}",
            activity.starts_at.to_rfc3339(),
            activity.ends_at.to_rfc3339()
        )));
    }
    if let Some(stage) = requested_stage {
        if stage != activity.stage {
            return Err(ApiError::ActivityClosed(format!(
                "activity `{activity_id}` runs in stage {}, not {}",
                activity.stage.as_str(),
                stage.as_str()
            )));
        }
    }
    if amount.0 > activity.max_award_cents {
        return Err(ApiError::AmountOverCap(format!(
            "amount_cents {} is above the cap of {}",
            amount.0, activity.max_award_cents
        )));
    }
    let out_trade_no = OutTradeNo::compose(
        user,
        &activity_id,
        &scene_id,
        rain_id,
        &award_type,
        activity.stage,
    );
    let draft = pb::RedPacketToken {
        app_id: req.app_id,
        user_id: user.get(),
        activity_id: activity_id.as_str().to_string(),
        scene_id: scene_id.as_str().to_string(),
        amount_cents: amount.0,
        out_trade_no: out_trade_no.as_str().to_string(),
        open_time_ms: req.open_time_ms.unwrap_or(now_ms),
        rain_id,
        status: pb::TokenStatus::Pending as i32,
        award_type: award_type.as_str().to_string(),
        stage: activity.stage.to_pb() as i32,
        key_id: String::new(),
        issued_at_ms: now_ms,
        budget_gen: 0,
    };
    Ok(ValidAward {
        user,
        out_trade_no,
        activity_id: activity_id.as_str().to_string(),
        amount,
        draft,
    })
}

/// What Redis holds under an award's out_trade_no, answered: the token itself, or, once
/// trimmed, the signed token the ledger row keeps (the only MySQL read of the issuing
/// path, and only for such a late retry).
async fn resolve_held(app: &App, held: Vec<u8>, award: &ValidAward) -> Result<Issued, ApiError> {
    if held != crate::tokens::TRIMMED {
        return replay_or_conflict(held, award);
    }
    let row: Option<(Option<Vec<u8>>,)> =
        sqlx::query_as("SELECT token FROM ledger_entries WHERE out_trade_no = ?")
            .bind(award.out_trade_no.as_str())
            .fetch_optional(app.db.for_user(award.user))
            .await?;
    match row {
        Some((Some(token),)) => replay_or_conflict(token, award),
        _ => Err(ApiError::IdempotencyConflict(format!(
            "out_trade_no `{}` was issued and settled before; its token is no longer available",
            award.out_trade_no
        ))),
    }
}

/// Compares a stored token with a request for the same out_trade_no.
fn replay_or_conflict(stored: Vec<u8>, award: &ValidAward) -> Result<Issued, ApiError> {
    let token = token::decode_trusted(&stored)
        .map_err(|e| ApiError::Internal(anyhow::anyhow!("stored token unreadable: {e}")))?;
    if same_award(&token, &award.draft) {
        Ok(Issued {
            out_trade_no: award.out_trade_no.to_string(),
            token: stored,
            replayed: true,
        })
    } else {
        Err(ApiError::IdempotencyConflict(format!(
            "out_trade_no `{}` was issued with other fields",
            award.out_trade_no
        )))
    }
}

impl Issuer {
    pub fn scripts(&self) -> [&Script; 1] {
        [&self.store]
    }

    /// Issues a batch of awards; results come back in request order and one failing item
    /// does not fail the others.
    pub async fn issue(
        &self,
        app: &App,
        caller: &str,
        requests: Vec<AwardRequest>,
    ) -> Vec<Result<Issued, ApiError>> {
        self.issue_at(app, caller, requests, now_ms()).await
    }

    /// [`Issuer::issue`] at a given moment (ms since the epoch), which becomes the
    /// tokens' issue time.
    pub async fn issue_at(
        &self,
        app: &App,
        caller: &str,
        requests: Vec<AwardRequest>,
        now: i64,
    ) -> Vec<Result<Issued, ApiError>> {
        let mut results: Vec<Option<Result<Issued, ApiError>>> =
            (0..requests.len()).map(|_| None).collect();
        let mut valid: Vec<(usize, ValidAward)> = Vec::with_capacity(requests.len());
        for (i, req) in requests.iter().enumerate() {
            if app.switches.issue_off() {
                results[i] = Some(Err(ApiError::Unavailable("issuing is switched off".into())));
                continue;
            }
            match validate(app, req, now).and_then(|v| {
                app.admission
                    .admit(app, caller, &req.activity_id, &req.scene_id)?;
                Ok(v)
            }) {
                Ok(v) => valid.push((i, v)),
                Err(err) => results[i] = Some(Err(err)),
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
            let outcomes = self.issue_unique(app, &unique).await;
            for ((i, v), outcome) in unique.iter().zip(outcomes) {
                if let Ok(issued) = &outcome {
                    if !issued.replayed {
                        app.stats.add(&v.activity_id, 1, v.amount.0);
                    }
                }
                results[*i] = Some(outcome);
            }
        }
        for (i, first, v) in duplicates {
            results[i] = Some(match &results[first] {
                Some(Ok(issued)) => replay_or_conflict(issued.token.clone(), &v),
                Some(Err(err)) => Err(clone_error(err)),
                None => Err(ApiError::Internal(anyhow::anyhow!(
                    "duplicate without a first result"
                ))),
            });
        }
        let out: Vec<Result<Issued, ApiError>> = results
            .into_iter()
            .map(|r| {
                r.unwrap_or_else(|| {
                    Err(ApiError::Internal(anyhow::anyhow!(
                        "award left without a result"
                    )))
                })
            })
            .collect();
        for r in &out {
            crate::metrics::award_outcome(match r {
                Ok(i) if i.replayed => "replayed",
                Ok(_) => "issued",
                Err(e) => e.code(),
            });
        }
        out
    }

    async fn issue_unique(
        &self,
        app: &App,
        awards: &[(usize, ValidAward)],
    ) -> Vec<Result<Issued, ApiError>> {
        let redis = &app.redis;
        let mut out: Vec<Option<Result<Issued, ApiError>>> =
            (0..awards.len()).map(|_| None).collect();

        // Step 2: idempotency, one pipelined HGET per award.
        let mut pipe = redis::pipe();
        for (_, v) in awards {
            pipe.cmd("HGET")
                .arg(redis.tokens_key(v.user))
                .arg(v.out_trade_no.as_str());
        }
        let mut conn = redis.conn();
        let existing: Vec<Option<Vec<u8>>> = match pipe.query_async(&mut conn).await {
            Ok(existing) => existing,
            Err(err) => {
                return awards
                    .iter()
                    .map(|_| Err(ApiError::from(clone_redis(&err))))
                    .collect()
            }
        };
        let mut fresh: Vec<usize> = Vec::with_capacity(awards.len());
        for (k, stored) in existing.into_iter().enumerate() {
            match stored {
                Some(bytes) => out[k] = Some(resolve_held(app, bytes, &awards[k].1).await),
                None => fresh.push(k),
            }
        }

        // Step 3: budget. The awards' first takes go in one pipelined round trip, a few
        // awards per call on random sub-stocks; awards it did not cover walk the
        // sub-stocks, and those still uncovered share a grant (budget moved from MySQL).
        let mut taken: HashMap<usize, budget::Taken> = HashMap::with_capacity(fresh.len());
        let firsts: Vec<(usize, &str, i64)> = fresh
            .iter()
            .map(|&k| (k, awards[k].1.activity_id.as_str(), awards[k].1.amount.0))
            .collect();
        match app.budget.take_batched(redis, &app.db, &firsts).await {
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
            match app.budget.take_each(redis, &app.db, &rest).await {
                Ok(got) => taken.extend(got),
                Err(err) => {
                    tracing::warn!(error = format!("{err:#}"), "budget take failed");
                    for (k, ..) in &rest {
                        if !taken.contains_key(k) {
                            out[*k] = Some(Err(ApiError::Unavailable("budget unavailable".into())));
                        }
                    }
                }
            }
            for (k, ..) in &rest {
                if !taken.contains_key(k) && out[*k].is_none() {
                    out[*k] = Some(Err(ApiError::BudgetExhausted));
                }
            }
        }

        // Step 4: mint, recording the budget generation the money came from.
        let mut minted: Vec<(usize, SignedAward)> = Vec::with_capacity(taken.len());
        let keys = app.keys.current();
        for &k in &fresh {
            let Some(t) = taken.get(&k) else {
                continue;
            };
            let mut draft = awards[k].1.draft.clone();
            draft.budget_gen = t.gen;
            match token::mint(&keys, draft) {
                Ok(award) => minted.push((k, award)),
                Err(err) => {
                    // Nothing was stored: the budget goes back at once.
                    if let Some(t) = taken.remove(&k) {
                        let _ = app
                            .budget
                            .give_back(redis, &awards[k].1.activity_id, &t)
                            .await;
                    }
                    out[k] = Some(Err(ApiError::Unavailable(err.to_string())));
                }
            }
        }

        // Step 5: store, one pipelined script call per token.
        if !minted.is_empty() {
            let stored = self
                .store_all(
                    redis,
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
                        out[k] = Some(match winner {
                            // Another request stored first. Its bytes may equal ours
                            // (signatures are deterministic and the same award minted in
                            // the same millisecond is the same token), yet it is still a
                            // replay: no call runs twice (see `query_scripted`), so the
                            // token held is never our own.
                            Some(bytes) => {
                                if let Some(t) = taken.remove(&k) {
                                    give_back.push((v.activity_id.clone(), t));
                                }
                                resolve_held(app, bytes, v).await
                            }
                            None => Ok(Issued {
                                out_trade_no: v.out_trade_no.to_string(),
                                token: award.bytes,
                                replayed: false,
                            }),
                        });
                    }
                    for (activity, t) in give_back {
                        if let Err(err) = app.budget.give_back(redis, &activity, &t).await {
                            tracing::error!(error = %err, activity, cents = t.total(), "giving back a lost race's budget failed; reconciliation will show the leak");
                        }
                    }
                }
                Err(err) => {
                    // The store may or may not have run. Giving the budget back could mint
                    // money twice, keeping it can only leak: keep it.
                    for (k, _) in minted {
                        out[k] = Some(Err(ApiError::from(clone_redis(&err))));
                    }
                }
            }
        }
        out.into_iter()
            .map(|r| {
                r.unwrap_or_else(|| {
                    Err(ApiError::Internal(anyhow::anyhow!(
                        "award left without a result"
                    )))
                })
            })
            .collect()
    }

    /// Runs store.lua for every token in one pipeline, one call per partition (and per
    /// [`STORE_CHUNK`] tokens): `None` where the token was stored now, the token already
    /// held under its out_trade_no otherwise, in the order given.
    async fn store_all<'a>(
        &self,
        redis: &Redis,
        tokens: impl Iterator<Item = (UserId, &'a pb::RedPacketToken, &'a [u8])>,
    ) -> redis::RedisResult<Vec<Option<Vec<u8>>>> {
        let mut by_partition: HashMap<u32, Vec<ToStore<'_>>> = HashMap::new();
        let mut count = 0;
        for (i, (user, token, bytes)) in tokens.enumerate() {
            by_partition
                .entry(redis.partition_of(user))
                .or_default()
                .push((i, user, token, bytes));
            count = i + 1;
        }
        let mut pipe = redis::pipe();
        let mut order: Vec<&[ToStore<'_>]> = Vec::new();
        for (partition, group) in &by_partition {
            for chunk in group.chunks(STORE_CHUNK) {
                pipe.add_command(self.store_cmd(redis, *partition, chunk));
                order.push(chunk);
            }
        }
        let answers: Vec<Vec<Option<Vec<u8>>>> =
            crate::store::query_scripted(redis, &pipe, &self.scripts()).await?;
        let mut out: Vec<Option<Vec<u8>>> = vec![None; count];
        for (chunk, answer) in order.into_iter().zip(answers) {
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

    /// The store.lua call for tokens of one partition.
    fn store_cmd(&self, redis: &Redis, partition: u32, tokens: &[ToStore<'_>]) -> redis::Cmd {
        let mut keys: Vec<String> = Vec::with_capacity(2 + 2 * tokens.len());
        keys.push(redis.stream_key(partition));
        for (_, user, ..) in tokens {
            keys.push(redis.tokens_key(*user));
            keys.push(redis.status_key(*user));
        }
        let mut counters_at: HashMap<&str, usize> = HashMap::new();
        for (_, _, token, _) in tokens {
            let next = keys.len() + 1;
            counters_at.entry(&token.activity_id).or_insert_with(|| {
                keys.push(redis.counters_key(partition, &token.activity_id));
                next
            });
        }
        let mut cmd = redis::cmd("EVALSHA");
        cmd.arg(self.store.get_hash()).arg(keys.len()).arg(&keys);
        cmd.arg(tokens.len());
        for (_, _, token, bytes) in tokens {
            cmd.arg(&token.out_trade_no)
                .arg(*bytes)
                .arg(hour_of(token.issued_at_ms))
                .arg(token.amount_cents)
                .arg(token.user_id)
                .arg(&token.activity_id)
                .arg(&token.scene_id)
                .arg(token.issued_at_ms)
                .arg(counters_at[token.activity_id.as_str()])
                .arg(token.budget_gen);
        }
        cmd
    }

    /// Runs store.lua for tokens verified elsewhere (client sync); returns which were
    /// stored now (true) or already held (false).
    pub async fn restore(
        &self,
        redis: &Redis,
        tokens: &[(UserId, pb::RedPacketToken, Vec<u8>)],
    ) -> redis::RedisResult<Vec<bool>> {
        let result = self
            .store_all(redis, tokens.iter().map(|(u, t, b)| (*u, t, b.as_slice())))
            .await?;
        // `None`: stored now. A token already there (even these very bytes) was known.
        Ok(result.iter().map(Option::is_none).collect())
    }
}

fn clone_redis(err: &redis::RedisError) -> redis::RedisError {
    redis::RedisError::from((redis::ErrorKind::IoError, "redis error", err.to_string()))
}

/// Errors are not `Clone` (they may carry an `anyhow` chain); batch duplicates get the
/// same code and message.
fn clone_error(err: &ApiError) -> ApiError {
    match err {
        ApiError::InvalidRequest(m) => ApiError::InvalidRequest(m.clone()),
        ApiError::NotFound(m) => ApiError::NotFound(m.clone()),
        ApiError::IdempotencyConflict(m) => ApiError::IdempotencyConflict(m.clone()),
        ApiError::BudgetExhausted => ApiError::BudgetExhausted,
        ApiError::ActivityClosed(m) => ApiError::ActivityClosed(m.clone()),
        ApiError::AmountOverCap(m) => ApiError::AmountOverCap(m.clone()),
        ApiError::RateLimited { retry_after_secs } => ApiError::RateLimited {
            retry_after_secs: *retry_after_secs,
        },
        ApiError::Unavailable(m) => ApiError::Unavailable(m.clone()),
        other => ApiError::Unavailable(other.public_message()),
    }
}
