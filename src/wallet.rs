//! The user's wallet: exact balances merged from the ledger and pending tokens, the flow
//! list, and client sync (the client's copy of its tokens restores the server's).
//!
//! Exactness (DESIGN.md "View"): read the user's token statuses from Redis first, then in
//! ONE MySQL statement the account row and which of the not-yet-settled tokens the
//! ledger already holds. A token reaches the ledger only after it is in Redis, and is
//! marked settled only after the commit, so in this order no token is counted twice
//! (it is either pending-and-not-in-ledger or in the booked balance) and none is dropped.

use std::collections::{HashMap, HashSet};
use std::time::Instant;

use axum::body::Bytes;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use axum::routing::{get, post};
use axum::Router;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use base64::Engine;
use serde::{Deserialize, Serialize};
use sqlx::{MySql, QueryBuilder, Row};

use crate::domain::{OutTradeNo, UserId};
use crate::error::{ApiError, ApiResult};
use crate::http::{decode_body, reply, Format, User, Wire};
use crate::pb;
use crate::settle::AwardEntry;
use crate::startup::{App, AppState};
use crate::token::{self, TokenError};

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/v1/wallet", get(wallet))
        .route("/v1/wallet/flows", get(flows))
        .route("/v1/wallet/tokens:sync", post(sync))
}

async fn pending_candidates(app: &App, user: UserId) -> ApiResult<Vec<AwardEntry>> {
    Ok(crate::tokens::pending_of(&app.redis, user).await?)
}

fn overflow() -> ApiError {
    ApiError::Internal(anyhow::anyhow!("wallet sums overflow"))
}

#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq, Default)]
pub struct WalletView {
    pub user_id: i64,
    pub balance_cents: i64,
    pub booked_cents: i64,
    pub pending_cents: i64,
    pub pending_count: i64,
    pub total_income_cents: i64,
    pub withdrawn_cents: i64,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub degraded: bool,
}

impl Wire for WalletView {
    type Pb = pb::WalletResponse;
    fn to_pb(&self) -> pb::WalletResponse {
        pb::WalletResponse {
            user_id: self.user_id,
            balance_cents: self.balance_cents,
            booked_cents: self.booked_cents,
            pending_cents: self.pending_cents,
            pending_count: self.pending_count,
            total_income_cents: self.total_income_cents,
            withdrawn_cents: self.withdrawn_cents,
            degraded: self.degraded,
        }
    }
}

/// The exact merge (see the module comment).
pub async fn wallet_view(app: &App, user: UserId) -> ApiResult<WalletView> {
    let candidates = pending_candidates(app, user).await?;
    // One statement, so one consistent read: the account row and, in a subquery, which
    // candidates the ledger holds. No account row means nothing of this user is booked
    // yet (booking creates the row in the same transaction as the ledger rows).
    let mut q =
        QueryBuilder::<MySql>::new("SELECT balance_cents, total_income_cents, withdrawn_cents, ");
    if candidates.is_empty() {
        q.push("NULL");
    } else {
        // out_trade_no never holds a comma; group_concat_max_len is raised per connection
        // (store.rs) so the list cannot be cut short.
        q.push("(SELECT GROUP_CONCAT(out_trade_no SEPARATOR ',') FROM ledger_entries WHERE out_trade_no IN (");
        let mut list = q.separated(", ");
        for c in &candidates {
            list.push_bind(&c.out_trade_no);
        }
        q.push("))");
    }
    q.push(" FROM accounts WHERE user_id = ")
        .push_bind(user.get());
    let row = match q.build().fetch_optional(app.db.for_user(user)).await {
        Ok(row) => row,
        Err(err) if app.switches.views_fallback() => {
            tracing::warn!(error = %err, "mysql unavailable; serving the wallet from redis");
            crate::metrics::dependency_error("mysql");
            return degraded_view(app, user).await;
        }
        Err(err) => return Err(err.into()),
    };
    let mut view = WalletView {
        user_id: user.get(),
        ..Default::default()
    };
    let mut booked: HashSet<String> = HashSet::new();
    if let Some(row) = row {
        view.booked_cents = row.try_get(0).map_err(ApiError::from)?;
        view.total_income_cents = row.try_get(1).map_err(ApiError::from)?;
        view.withdrawn_cents = row.try_get(2).map_err(ApiError::from)?;
        if let Some(list) = crate::settle::text_opt(&row, 3).map_err(ApiError::from)? {
            booked.extend(list.split(',').map(str::to_string));
        }
    }
    add_pending(
        &mut view,
        candidates
            .iter()
            .filter(|c| !booked.contains(&c.out_trade_no))
            .map(|c| c.amount_cents),
    )?;
    Ok(view)
}

/// The merge both views share: pending tokens added to the booked figures, in checked
/// arithmetic (`balance = booked + pending`; income counts pending awards too).
fn add_pending(view: &mut WalletView, pending: impl Iterator<Item = i64>) -> ApiResult<()> {
    for cents in pending {
        view.pending_cents = view.pending_cents.checked_add(cents).ok_or_else(overflow)?;
        view.pending_count += 1;
    }
    view.balance_cents = view
        .booked_cents
        .checked_add(view.pending_cents)
        .ok_or_else(overflow)?;
    view.total_income_cents = view
        .total_income_cents
        .checked_add(view.pending_cents)
        .ok_or_else(overflow)?;
    Ok(())
}

/// Redis only: the account snapshot written with each settle mark, plus tokens still
/// pending in Redis. Both are written by one script, and a snapshot never includes a
/// token still pending (see `settle`), so this view counts every token once as of
/// Redis; it is marked degraded because it cannot see ledger changes Redis has not
/// heard of.
pub async fn degraded_view(app: &App, user: UserId) -> ApiResult<WalletView> {
    let mut conn = app.redis.conn();
    let (statuses, snapshot): (Vec<(String, String)>, HashMap<String, i64>) = redis::pipe()
        .atomic()
        .hgetall(app.redis.status_key(user))
        .hgetall(app.redis.snapshot_key(user))
        .query_async(&mut conn)
        .await?;
    let mut view = WalletView {
        user_id: user.get(),
        booked_cents: snapshot.get("b").copied().unwrap_or(0),
        total_income_cents: snapshot.get("i").copied().unwrap_or(0),
        withdrawn_cents: snapshot.get("w").copied().unwrap_or(0),
        degraded: true,
        ..Default::default()
    };
    add_pending(
        &mut view,
        statuses
            .iter()
            .filter_map(|(o, v)| crate::tokens::parse_status(user, o, v))
            .filter(|s| s.pending)
            .map(|s| s.entry.amount_cents),
    )?;
    Ok(view)
}

async fn wallet(
    State(app): State<AppState>,
    User(user): User,
    headers: HeaderMap,
) -> ApiResult<Response> {
    let started = Instant::now();
    let view = wallet_view(&app, user).await?;
    crate::metrics::view_latency(started.elapsed().as_secs_f64(), "wallet");
    Ok(reply(Format::of_response(&headers), StatusCode::OK, &view))
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct FlowItem {
    pub out_trade_no: String,
    pub kind: String,
    pub amount_cents: i64,
    pub status: &'static str,
    pub activity_id: Option<String>,
    pub scene_id: Option<String>,
    pub at: String,
    #[serde(skip)]
    pub at_ms: i64,
}

#[derive(Debug, Serialize)]
pub struct FlowsPage {
    pub items: Vec<FlowItem>,
    pub next_cursor: Option<String>,
}

impl Wire for FlowsPage {
    type Pb = pb::FlowsResponse;
    fn to_pb(&self) -> pb::FlowsResponse {
        pb::FlowsResponse {
            items: self
                .items
                .iter()
                .map(|i| pb::FlowItem {
                    out_trade_no: i.out_trade_no.clone(),
                    kind: i.kind.clone(),
                    amount_cents: i.amount_cents,
                    status: i.status.to_string(),
                    activity_id: i.activity_id.clone().unwrap_or_default(),
                    scene_id: i.scene_id.clone().unwrap_or_default(),
                    at: i.at.clone(),
                })
                .collect(),
            next_cursor: self.next_cursor.clone().unwrap_or_default(),
        }
    }
}

#[derive(Debug, Deserialize)]
pub struct FlowsQuery {
    pub limit: Option<u32>,
    pub cursor: Option<String>,
}

fn rfc3339(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .unwrap_or_default()
        .to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

pub fn encode_cursor(at_ms: i64, otn: &str) -> String {
    B64.encode(format!("{at_ms}|{otn}"))
}

pub fn decode_cursor(cursor: &str) -> Option<(i64, String)> {
    let text = String::from_utf8(B64.decode(cursor).ok()?).ok()?;
    let (at, otn) = text.split_once('|')?;
    Some((at.parse().ok()?, otn.to_string()))
}

/// Flows are ordered by (time, out_trade_no), newest first, where an award's time is its
/// issue time: booking a pending award does not move it, and new awards land above any
/// cursor, so paging sees every item exactly once.
pub async fn flows_page(
    app: &App,
    user: UserId,
    limit: u32,
    cursor: Option<(i64, String)>,
) -> ApiResult<FlowsPage> {
    let candidates = pending_candidates(app, user).await?;
    let before = |at: i64, otn: &str| match &cursor {
        Some((c_at, c_otn)) => (at, otn) < (*c_at, c_otn.as_str()),
        None => true,
    };
    let mut q = QueryBuilder::<MySql>::new(
        "SELECT out_trade_no, kind, amount_cents, activity_id, scene_id, at_ms FROM ledger_entries WHERE user_id = ",
    );
    q.push_bind(user.get());
    if let Some((at, otn)) = &cursor {
        q.push(" AND (at_ms < ")
            .push_bind(*at)
            .push(" OR (at_ms = ")
            .push_bind(*at);
        q.push(" AND out_trade_no < ")
            .push_bind(otn.clone())
            .push("))");
    }
    q.push(" ORDER BY at_ms DESC, out_trade_no DESC LIMIT ")
        .push_bind(i64::from(limit) + 1);
    let rows = q.build().fetch_all(app.db.for_user(user)).await?;
    let mut items: Vec<FlowItem> = Vec::with_capacity(rows.len() + candidates.len());
    let mut seen: HashSet<String> = HashSet::new();
    for row in rows {
        let at_ms: i64 = row.try_get(5).map_err(ApiError::from)?;
        let otn: String = crate::settle::text(&row, 0).map_err(ApiError::from)?;
        seen.insert(otn.clone());
        items.push(FlowItem {
            out_trade_no: otn,
            kind: row.try_get(1).map_err(ApiError::from)?,
            amount_cents: row.try_get(2).map_err(ApiError::from)?,
            status: "booked",
            activity_id: crate::settle::text_opt(&row, 3).map_err(ApiError::from)?,
            scene_id: crate::settle::text_opt(&row, 4).map_err(ApiError::from)?,
            at: rfc3339(at_ms),
            at_ms,
        });
    }
    for c in candidates {
        if seen.contains(&c.out_trade_no) || !before(c.at_ms, &c.out_trade_no) {
            continue;
        }
        items.push(FlowItem {
            at: rfc3339(c.at_ms),
            at_ms: c.at_ms,
            out_trade_no: c.out_trade_no,
            kind: "award".into(),
            amount_cents: c.amount_cents,
            status: "pending",
            activity_id: Some(c.activity_id),
            scene_id: Some(c.scene_id),
        });
    }
    items.sort_by(|a, b| (b.at_ms, &b.out_trade_no).cmp(&(a.at_ms, &a.out_trade_no)));
    let more = items.len() > limit as usize;
    items.truncate(limit as usize);
    let next_cursor = if more {
        items
            .last()
            .map(|i| encode_cursor(i.at_ms, &i.out_trade_no))
    } else {
        None
    };
    Ok(FlowsPage { items, next_cursor })
}

async fn flows(
    State(app): State<AppState>,
    User(user): User,
    headers: HeaderMap,
    Query(query): Query<FlowsQuery>,
) -> ApiResult<Response> {
    let started = Instant::now();
    let max = app.settings.wallet.flows_max_limit;
    let limit = query.limit.unwrap_or(20);
    if limit == 0 || limit > max {
        return Err(ApiError::InvalidRequest(format!("limit must be 1..={max}")));
    }
    let cursor = match query.cursor.as_deref() {
        None | Some("") => None,
        Some(c) => {
            Some(decode_cursor(c).ok_or_else(|| ApiError::InvalidRequest("bad cursor".into()))?)
        }
    };
    let page = flows_page(&app, user, limit, cursor).await?;
    crate::metrics::view_latency(started.elapsed().as_secs_f64(), "flows");
    Ok(reply(Format::of_response(&headers), StatusCode::OK, &page))
}

#[derive(Debug, Deserialize)]
struct SyncBody {
    tokens: crate::http::Bounded<String>,
}

/// Tokens as raw bytes, whichever format they came in.
struct SyncTokens(Vec<Result<Vec<u8>, TokenError>>);

impl<'de> Deserialize<'de> for SyncTokens {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let body = SyncBody::deserialize(d)?;
        Ok(SyncTokens(
            body.tokens
                .0
                .iter()
                .map(|t| token::from_base64(t))
                .collect(),
        ))
    }
}

impl From<pb::SyncRequest> for SyncTokens {
    fn from(r: pb::SyncRequest) -> Self {
        SyncTokens(r.tokens.into_iter().map(Ok).collect())
    }
}

#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct Rejected {
    pub index: u32,
    pub code: &'static str,
}

#[derive(Debug, Serialize)]
pub struct SyncResult {
    pub restored: u32,
    pub known: u32,
    pub rejected: Vec<Rejected>,
}

impl Wire for SyncResult {
    type Pb = pb::SyncResponse;
    fn to_pb(&self) -> pb::SyncResponse {
        pb::SyncResponse {
            restored: self.restored,
            known: self.known,
            rejected: self
                .rejected
                .iter()
                .map(|r| pb::SyncRejection {
                    index: r.index,
                    code: r.code.to_string(),
                })
                .collect(),
        }
    }
}

/// Checks one client token: signature, key, owner, activity and stage.
fn check_client_token(
    app: &App,
    user: UserId,
    bytes: &[u8],
) -> Result<pb::RedPacketToken, &'static str> {
    let token = token::verify(&app.keys.current(), bytes).map_err(|_| "invalid_request")?;
    if token.user_id != user.get() {
        return Err("forbidden");
    }
    let cached = app.activities.get(&token.activity_id).ok_or("not_found")?;
    if cached.activity.stage.to_pb() as i32 != token.stage {
        return Err("invalid_request");
    }
    let expected = (|| {
        Some(OutTradeNo::compose(
            user,
            &crate::domain::ActivityId::parse(&token.activity_id).ok()?,
            &crate::domain::SceneId::parse(&token.scene_id).ok()?,
            token.rain_id,
            &crate::domain::AwardType::parse(&token.award_type).ok()?,
            cached.activity.stage,
        ))
    })();
    if expected.as_ref().map(OutTradeNo::as_str) != Some(token.out_trade_no.as_str())
        || token.amount_cents <= 0
    {
        return Err("invalid_request");
    }
    Ok(token)
}

/// Restores the tokens the server lost and the ledger does not know, as pending.
pub async fn sync_tokens(
    app: &App,
    user: UserId,
    tokens: Vec<Result<Vec<u8>, TokenError>>,
) -> ApiResult<SyncResult> {
    let mut result = SyncResult {
        restored: 0,
        known: 0,
        rejected: Vec::new(),
    };
    let mut valid: Vec<(pb::RedPacketToken, Vec<u8>)> = Vec::new();
    let mut seen = HashSet::new();
    for (i, t) in tokens.into_iter().enumerate() {
        let checked = t
            .map_err(|_| "invalid_request")
            .and_then(|bytes| check_client_token(app, user, &bytes).map(|tok| (tok, bytes)));
        match checked {
            Ok((tok, bytes)) => {
                if seen.insert(tok.out_trade_no.clone()) {
                    valid.push((tok, bytes));
                } else {
                    result.known += 1;
                }
            }
            Err(code) => result.rejected.push(Rejected {
                index: i as u32,
                code,
            }),
        }
    }
    if valid.is_empty() {
        return Ok(result);
    }
    let mut conn = app.redis.conn();
    let otns: Vec<&str> = valid.iter().map(|(t, _)| t.out_trade_no.as_str()).collect();
    let held: Vec<Option<Vec<u8>>> = redis::cmd("HMGET")
        .arg(app.redis.tokens_key(user))
        .arg(&otns)
        .query_async(&mut conn)
        .await?;
    let missing: Vec<usize> = held
        .iter()
        .enumerate()
        .filter(|(_, h)| h.is_none())
        .map(|(i, _)| i)
        .collect();
    result.known += (valid.len() - missing.len()) as u32;
    let missing_otns: Vec<&str> = missing.iter().map(|&i| otns[i]).collect();
    let in_ledger = crate::settle::already_booked(app.db.for_user(user), &missing_otns).await?;
    let to_restore: Vec<(UserId, pb::RedPacketToken, Vec<u8>)> = missing
        .iter()
        .filter(|&&i| !in_ledger.contains(otns[i]))
        .map(|&i| (user, valid[i].0.clone(), valid[i].1.clone()))
        .collect();
    result.known += (missing.len() - to_restore.len()) as u32;
    // The ledger's unique key still decides: a restored token that was booked in the
    // meantime is booked as a no-op by the worker.
    let stored = app.issuer.restore(&app.redis, &to_restore).await?;
    for now_stored in stored {
        if now_stored {
            result.restored += 1;
        } else {
            result.known += 1;
        }
    }
    Ok(result)
}

async fn sync(
    State(app): State<AppState>,
    User(user): User,
    headers: HeaderMap,
    body: Bytes,
) -> ApiResult<Response> {
    if app.switches.sync_off() {
        return Err(ApiError::Unavailable("client sync is switched off".into()));
    }
    let max = app.settings.wallet.sync_max;
    crate::http::check_list_len(&headers, &body, 1, max)?;
    let SyncTokens(tokens) = decode_body::<SyncTokens, pb::SyncRequest>(&headers, &body)?;
    if tokens.len() > max {
        return Err(ApiError::InvalidRequest(format!(
            "at most {max} tokens per sync"
        )));
    }
    let result = sync_tokens(&app, user, tokens).await?;
    Ok(reply(
        Format::of_response(&headers),
        StatusCode::OK,
        &result,
    ))
}
