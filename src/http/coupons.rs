//! Coupons (see `coupons`): `GET /v1/wallet/coupons` (the user's list),
//! `POST /v1/coupons:redeem` (a merchant uses one), and the operators' templates at
//! `/v1/admin/coupon-templates`.

use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::Json;
use serde::{Deserialize, Serialize};
use utoipa_axum::{router::OpenApiRouter, routes};

use super::openapi as doc;
use super::wire::JsonBody;
use super::{AppState, Caller, Operator, User};
use crate::coupons::{CouponList, NewTemplate, Redeem, Redeemed, TemplateFigures};
use crate::error::{Error, Result};
use crate::store::now_ms;

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(list))
        .routes(routes!(redeem))
        .routes(routes!(templates, create_template))
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
struct ListQuery {
    /// Only coupons in this state: active, used or expired.
    state: Option<String>,
}

#[utoipa::path(get, path = "/v1/wallet/coupons", tag = "wallet", security(("user" = [])),
    params(ListQuery),
    responses((status = 200, description = "The user's coupons, newest first (at most 500), with counts per state; a coupon not booked yet is listed at once, with booked false", body = CouponList), doc::UserErrors))]
async fn list(
    State(app): State<AppState>,
    User(user): User,
    Query(query): Query<ListQuery>,
) -> Result<Json<CouponList>> {
    let state = match query.state.as_deref() {
        None | Some("") => None,
        Some(s @ ("active" | "used" | "expired")) => Some(s.to_string()),
        Some(other) => {
            return Err(Error::InvalidRequest(format!(
                "state must be active, used or expired, not `{other}`"
            )))
        }
    };
    let mut list = app.coupons.list(user, now_ms()).await?;
    if let Some(state) = state {
        list.coupons.retain(|c| c.state == state);
    }
    Ok(Json(list))
}

#[utoipa::path(post, path = "/v1/coupons:redeem", tag = "upstream", security(("caller" = [])),
    request_body = Redeem,
    responses((status = 200, description = "Used now, or (replayed true) by an earlier request with this request_id", body = Redeemed),
        doc::RedeemErrors))]
async fn redeem(
    State(app): State<AppState>,
    Caller(caller): Caller,
    JsonBody(body): JsonBody<Redeem>,
) -> Result<Json<Redeemed>> {
    Ok(Json(app.coupons.redeem(&caller, &body, now_ms()).await?))
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct TemplateList {
    pub templates: Vec<TemplateFigures>,
}

#[utoipa::path(get, path = "/v1/admin/coupon-templates", tag = "operators", security(("operator" = [])),
    responses((status = 200, description = "Every template with its stock (remaining, taken, in doubt) and coupons (issued, booked, active, used, expired), and whether they are conserved", body = TemplateList), doc::OperatorErrors))]
async fn templates(State(app): State<AppState>, _op: Operator) -> Result<Json<TemplateList>> {
    Ok(Json(TemplateList {
        templates: app.coupons.templates(now_ms()).await?,
    }))
}

#[utoipa::path(post, path = "/v1/admin/coupon-templates", tag = "operators", security(("operator" = [])),
    request_body = NewTemplate,
    responses((status = 201, description = "Created, with its stock", body = crate::coupons::Template),
        (status = 200, description = "The same template again", body = crate::coupons::Template),
        (status = 409, description = "idempotency_conflict: the id is taken (another template, or an activity)", body = doc::ErrorEnvelope),
        doc::OperatorErrors))]
async fn create_template(
    State(app): State<AppState>,
    _op: Operator,
    JsonBody(body): JsonBody<NewTemplate>,
) -> Result<(StatusCode, Json<crate::coupons::Template>)> {
    Ok(super::created(app.coupons.create_template(body).await?))
}
