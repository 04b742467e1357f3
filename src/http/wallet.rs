//! `GET /v1/wallet`, `GET /v1/wallet/flows` and `POST /v1/wallet/tokens:sync`.

use std::time::Instant;

use axum::body::Bytes;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use utoipa_axum::{router::OpenApiRouter, routes};

use super::openapi as doc;
use serde::Deserialize;

use super::wire::{check_list_len, decode_body, reply, Bounded, Format, Wire};
use super::{AppState, User};
use crate::error::{Error, Result};
use crate::pb;
use crate::token::{self, TokenError};
use crate::wallet::{decode_cursor, FlowsPage, SyncResult, WalletView};

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(wallet))
        .routes(routes!(flows))
        .routes(routes!(sync))
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

#[utoipa::path(get, path = "/v1/wallet", tag = "wallet", security(("user" = [])),
    responses((status = 200, description = "The balance: booked + pending, every cent at once", body = WalletView), doc::UserErrors))]
async fn wallet(
    State(app): State<AppState>,
    User(user): User,
    headers: HeaderMap,
) -> Result<Response> {
    let started = Instant::now();
    let view = app.wallet.view(user).await?;
    crate::metrics::view_latency(started.elapsed().as_secs_f64(), "wallet");
    Ok(reply(Format::of_response(&headers), StatusCode::OK, &view))
}

#[derive(Debug, Deserialize)]
struct FlowsQuery {
    limit: Option<u32>,
    cursor: Option<String>,
}

#[utoipa::path(get, path = "/v1/wallet/flows", tag = "wallet", security(("user" = [])),
    params(("limit" = Option<u32>, Query, description = "Items per page (default 20, at most wallet.flows_max_limit)"),
        ("cursor" = Option<String>, Query, description = "next_cursor of the previous page")),
    responses((status = 200, description = "Awards, withdrawals and reversals, newest first; pending awards marked", body = FlowsPage), doc::UserErrors))]
async fn flows(
    State(app): State<AppState>,
    User(user): User,
    headers: HeaderMap,
    Query(query): Query<FlowsQuery>,
) -> Result<Response> {
    let started = Instant::now();
    let max = app.settings.wallet.flows_max_limit;
    let limit = query.limit.unwrap_or(20);
    if limit == 0 || limit > max {
        return Err(Error::InvalidRequest(format!("limit must be 1..={max}")));
    }
    let cursor = match query.cursor.as_deref() {
        None | Some("") => None,
        Some(c) => {
            Some(decode_cursor(c).ok_or_else(|| Error::InvalidRequest("bad cursor".into()))?)
        }
    };
    let page = app.wallet.flows(user, limit, cursor).await?;
    crate::metrics::view_latency(started.elapsed().as_secs_f64(), "flows");
    Ok(reply(Format::of_response(&headers), StatusCode::OK, &page))
}

#[derive(Debug, Deserialize)]
struct SyncBody {
    tokens: Bounded<String>,
}

/// Tokens as raw bytes, whichever format they came in.
struct SyncTokens(Vec<std::result::Result<Vec<u8>, TokenError>>);

impl<'de> Deserialize<'de> for SyncTokens {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
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

#[utoipa::path(post, path = "/v1/wallet/tokens:sync", tag = "wallet", security(("user" = [])),
    request_body(description = "JSON, or protobuf (application/x-protobuf, proto/redpacket.proto)", content = doc::SyncRequest),
    responses((status = 200, description = "What the client's tokens restored", body = SyncResult), doc::UserErrors))]
async fn sync(
    State(app): State<AppState>,
    User(user): User,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response> {
    if app.switches.sync_off() {
        return Err(Error::Unavailable("client sync is switched off".into()));
    }
    let max = app.settings.wallet.sync_max;
    check_list_len(&headers, &body, 1, max)?;
    let SyncTokens(tokens) = decode_body::<SyncTokens, pb::SyncRequest>(&headers, &body)?;
    if tokens.len() > max {
        return Err(Error::InvalidRequest(format!(
            "at most {max} tokens per sync"
        )));
    }
    let result = app.wallet.sync(user, tokens).await?;
    Ok(reply(
        Format::of_response(&headers),
        StatusCode::OK,
        &result,
    ))
}
