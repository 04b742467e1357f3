//! `POST /v1/withdrawals`, `GET /v1/withdrawals/{id}` and the payout channel's
//! `POST /v1/withdrawals/{id}/result`.

use std::time::Instant;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use utoipa_axum::{router::OpenApiRouter, routes};

use super::openapi as doc;
use serde::Deserialize;

use super::wire::JsonBody;
use super::{AppState, Caller, User};
use crate::domain::{Cents, RequestId, WithdrawalStatus};
use crate::error::{Error, Result};
use crate::withdraw::{Outcome, Withdrawal};

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(create))
        .routes(routes!(show))
        .routes(routes!(result))
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
pub struct WithdrawRequest {
    /// Client-chosen, 1-64 characters: the same id again is the same withdrawal.
    pub request_id: String,
    pub amount_cents: i64,
}

#[utoipa::path(post, path = "/v1/withdrawals", tag = "wallet", security(("user" = [])),
    request_body = WithdrawRequest,
    responses((status = 201, description = "Submitted: pending tokens booked first, then the debit", body = Withdrawal),
        (status = 200, description = "The same request_id again: the same withdrawal", body = Withdrawal),
        doc::WithdrawErrors))]
async fn create(
    State(app): State<AppState>,
    User(user): User,
    JsonBody(body): JsonBody<WithdrawRequest>,
) -> Result<Response> {
    let started = Instant::now();
    let request_id = RequestId::parse(&body.request_id)?;
    let amount = Cents::positive(body.amount_cents, "amount_cents")?;
    let outcome = app.withdrawals.withdraw(user, &request_id, amount).await?;
    crate::metrics::withdraw_latency(started.elapsed().as_secs_f64());
    Ok(match outcome {
        Outcome::Created(w) => (StatusCode::CREATED, Json(w)).into_response(),
        Outcome::Existing(w) => (StatusCode::OK, Json(w)).into_response(),
    })
}

#[utoipa::path(get, path = "/v1/withdrawals/{id}", tag = "wallet", security(("user" = [])),
    params(("id" = String, Path, description = "The withdrawal id")),
    responses((status = 200, description = "The withdrawal (own only)", body = Withdrawal), doc::UserErrors))]
async fn show(
    State(app): State<AppState>,
    User(user): User,
    Path(id): Path<String>,
) -> Result<Json<Withdrawal>> {
    match app.withdrawals.find(&id).await? {
        Some((_, w)) if w.user_id == user.get() => Ok(Json(w)),
        Some(_) => Err(Error::Forbidden(
            "this withdrawal belongs to another user".into(),
        )),
        None => Err(Error::NotFound(format!("no withdrawal `{id}`"))),
    }
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
struct PayoutResult {
    /// paid or failed.
    status: String,
}

#[utoipa::path(post, path = "/v1/withdrawals/{id}/result", tag = "payout", security(("caller" = [])),
    params(("id" = String, Path, description = "The withdrawal id")),
    request_body = PayoutResult,
    responses((status = 200, description = "The withdrawal with its final status; failed gives the money back (a reversal)", body = Withdrawal), doc::PayoutErrors))]
async fn result(
    State(app): State<AppState>,
    Caller(caller): Caller,
    Path(id): Path<String>,
    JsonBody(body): JsonBody<PayoutResult>,
) -> Result<Json<Withdrawal>> {
    // Only the payout channel may post results; with no caller named, nobody may.
    if !app.settings.auth.payout_callers.contains(&caller) {
        return Err(Error::Forbidden(format!(
            "caller `{caller}` may not post payout results"
        )));
    }
    let verdict = WithdrawalStatus::parse_verdict(&body.status)?;
    Ok(Json(app.withdrawals.settle_payout(&id, verdict).await?))
}
