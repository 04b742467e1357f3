//! The OpenAPI 3.1 description served at `/openapi.json`. Routes are registered with
//! their `#[utoipa::path]` description in one call (`utoipa_axum::routes!`), so no route
//! is served undescribed; the bodies are the schemas below, which mirror the JSON the
//! handlers write (a test checks real answers against them, field by field).

#![allow(dead_code)] // the schema types exist to be described, not built

use std::collections::BTreeMap;

use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::openapi::{ContentBuilder, RefOr, Response, ResponseBuilder};
use utoipa::{IntoResponses, Modify, OpenApi, ToSchema};

#[derive(OpenApi)]
#[openapi(
    info(
        title = "redpacket-wallet",
        description = "Red-packet token wallet: signed award tokens, bounded-rate booking, exact merged views. Money is integer cents in fields ending `_cents`; times are RFC 3339. Endpoints taking protobuf (`application/x-protobuf`) use the messages of proto/redpacket.proto.",
        license(name = "MIT")
    ),
    modifiers(&Security),
    tags(
        (name = "operators", description = "`Authorization: Bearer <admin key>`"),
        (name = "upstream", description = "`Authorization: Bearer <caller API key>`"),
        (name = "wallet", description = "`Authorization: Bearer <user JWT>` (HS256, `sub` = user id)"),
        (name = "payout", description = "A caller named in `auth.payout_callers`"),
        (name = "anyone", description = "No credential"),
        (name = "pages", description = "Browser pages served by the service")
    )
)]
pub struct ApiDoc;

struct Security;

impl Modify for Security {
    fn modify(&self, api: &mut utoipa::openapi::OpenApi) {
        let components = api.components.get_or_insert_with(Default::default);
        for (name, format) in [
            ("operator", "admin key"),
            ("caller", "caller API key"),
            ("user", "JWT"),
        ] {
            components.add_security_scheme(
                name,
                SecurityScheme::Http(
                    HttpBuilder::new()
                        .scheme(HttpAuthScheme::Bearer)
                        .bearer_format(format)
                        .build(),
                ),
            );
        }
    }
}

/// `{"error": {"code", "message", "request_id"}}`: every error answer.
#[derive(ToSchema)]
pub struct ErrorEnvelope {
    pub error: ErrorBody,
}

#[derive(ToSchema)]
pub struct ErrorBody {
    /// The stable code: invalid_request, unauthorized, forbidden, not_found,
    /// idempotency_conflict, budget_exhausted, insufficient_balance, activity_closed,
    /// amount_over_cap, payload_too_large, rate_limited, unavailable, internal.
    pub code: String,
    pub message: String,
    /// The request's `x-request-id`.
    pub request_id: Option<String>,
}

/// The error answers a route may give, each with the envelope.
fn errors(codes: &[(u16, &str)]) -> BTreeMap<String, RefOr<Response>> {
    codes
        .iter()
        .map(|(status, what)| {
            let response = ResponseBuilder::new()
                .description(*what)
                .content(
                    "application/json",
                    ContentBuilder::new()
                        .schema(Some(RefOr::Ref(utoipa::openapi::Ref::from_schema_name(
                            "ErrorEnvelope",
                        ))))
                        .build(),
                )
                .build();
            (status.to_string(), RefOr::T(response))
        })
        .collect()
}

const BAD: (u16, &str) = (
    400,
    "invalid_request: a malformed body or query, a field out of range",
);
const UNAUTH: (u16, &str) = (
    401,
    "unauthorized: missing or wrong credential, expired JWT",
);
const NOT_FOUND: (u16, &str) = (404, "not_found");
const TOO_LARGE: (u16, &str) = (413, "payload_too_large");
const DOWN: (u16, &str) = (
    503,
    "unavailable: a dependency is down, or a switch turned this off",
);

/// Errors of an operator route.
pub struct OperatorErrors;
impl IntoResponses for OperatorErrors {
    fn responses() -> BTreeMap<String, RefOr<Response>> {
        errors(&[BAD, UNAUTH, NOT_FOUND, TOO_LARGE, DOWN])
    }
}

/// Errors of issuing an award.
pub struct AwardErrors;
impl IntoResponses for AwardErrors {
    fn responses() -> BTreeMap<String, RefOr<Response>> {
        errors(&[
            BAD,
            UNAUTH,
            NOT_FOUND,
            (
                409,
                "idempotency_conflict (same award, different content), budget_exhausted or already_won (the scene gives one win per user)",
            ),
            TOO_LARGE,
            (
                422,
                "activity_closed (outside the window, wrong stage, a coupon template no longer valid) or amount_over_cap",
            ),
            (403, "forbidden: the user or the caller is blacklisted, or the user is flagged where the scene refuses flagged users"),
            (429, "rate_limited; Retry-After says when to retry"),
            DOWN,
        ])
    }
}

/// Errors of a batch of awards (items fail one by one, in `results`).
pub struct BatchErrors;
impl IntoResponses for BatchErrors {
    fn responses() -> BTreeMap<String, RefOr<Response>> {
        errors(&[
            BAD,
            UNAUTH,
            TOO_LARGE,
            (429, "rate_limited; Retry-After says when to retry"),
            DOWN,
        ])
    }
}

/// Errors of a user's route.
pub struct UserErrors;
impl IntoResponses for UserErrors {
    fn responses() -> BTreeMap<String, RefOr<Response>> {
        errors(&[
            BAD,
            UNAUTH,
            (403, "forbidden: another user's resource"),
            NOT_FOUND,
            TOO_LARGE,
            DOWN,
        ])
    }
}

/// Errors of a withdrawal.
pub struct WithdrawErrors;
impl IntoResponses for WithdrawErrors {
    fn responses() -> BTreeMap<String, RefOr<Response>> {
        errors(&[
            BAD,
            UNAUTH,
            (
                409,
                "idempotency_conflict (request_id used for another amount) or insufficient_balance",
            ),
            TOO_LARGE,
            DOWN,
        ])
    }
}

/// Errors of sending a red packet.
pub struct PacketSendErrors;
impl IntoResponses for PacketSendErrors {
    fn responses() -> BTreeMap<String, RefOr<Response>> {
        errors(&[
            BAD,
            UNAUTH,
            (
                409,
                "idempotency_conflict (request_id used for another packet) or insufficient_balance",
            ),
            TOO_LARGE,
            (422, "amount_over_cap: more than packets.max_total_cents"),
            DOWN,
        ])
    }
}

/// Errors of opening a red packet.
pub struct PacketOpenErrors;
impl IntoResponses for PacketOpenErrors {
    fn responses() -> BTreeMap<String, RefOr<Response>> {
        errors(&[
            UNAUTH,
            NOT_FOUND,
            (
                409,
                "packet_finished (every share opened) or packet_expired",
            ),
            (
                429,
                "rate_limited: too many opens of this packet wait already",
            ),
            DOWN,
        ])
    }
}

/// Errors of redeeming a coupon.
pub struct RedeemErrors;
impl IntoResponses for RedeemErrors {
    fn responses() -> BTreeMap<String, RefOr<Response>> {
        errors(&[
            BAD,
            UNAUTH,
            (404, "not_found: the user has no such coupon"),
            (
                409,
                "coupon_used (by another request), coupon_expired (outside its validity) or idempotency_conflict (request_id used for another coupon or order)",
            ),
            TOO_LARGE,
            (422, "below_min_spend: order_cents under the coupon's minimum spend"),
            DOWN,
        ])
    }
}

/// Errors of a payout verdict.
pub struct PayoutErrors;
impl IntoResponses for PayoutErrors {
    fn responses() -> BTreeMap<String, RefOr<Response>> {
        errors(&[
            BAD,
            UNAUTH,
            (403, "forbidden: the caller is not a payout channel"),
            NOT_FOUND,
            (
                409,
                "idempotency_conflict: a different final result was posted",
            ),
            DOWN,
        ])
    }
}

/// Errors of a public route.
pub struct PublicErrors;
impl IntoResponses for PublicErrors {
    fn responses() -> BTreeMap<String, RefOr<Response>> {
        errors(&[NOT_FOUND, DOWN])
    }
}

// ---- operators -------------------------------------------------------------------------

#[derive(ToSchema)]
pub struct ActivityList {
    pub activities: Vec<crate::activity::Activity>,
}

#[derive(ToSchema)]
pub struct RepairResult {
    pub activity_id: String,
    pub repaired_cents: i64,
    pub drained_cents: i64,
    pub settling_generations: i64,
}

#[derive(ToSchema)]
pub struct ReleaseResult {
    pub activity_id: String,
    pub released_cents: i64,
    pub resolved_generations: i64,
    pub waiting_generations: i64,
}

#[derive(ToSchema)]
pub struct Reports {
    pub reports: Vec<crate::ops::reconcile::StoredReport>,
}

#[derive(ToSchema)]
pub struct ParkedEntry {
    pub partition: u32,
    pub id: String,
    pub fields: BTreeMap<String, String>,
}

#[derive(ToSchema)]
pub struct Parked {
    pub entries: Vec<ParkedEntry>,
}

#[derive(ToSchema)]
pub struct Switches {
    pub switches: Vec<crate::switches::SwitchView>,
}

#[derive(ToSchema)]
pub struct PartitionBacklog {
    pub partition: u32,
    /// Stream entries not booked yet.
    pub entries: u64,
    pub oldest_age_ms: Option<i64>,
}

#[derive(ToSchema)]
pub struct Backlog {
    pub entries: u64,
    pub partitions: Vec<PartitionBacklog>,
}

#[derive(ToSchema)]
pub struct Booking {
    pub instance_id: String,
    pub worker_enabled: bool,
    pub paused: bool,
    pub max_tps: u32,
    /// Tokens this instance's worker and sweep booked since it started.
    pub booked_tokens: u64,
}

#[derive(ToSchema)]
pub struct Health {
    /// ok or unreachable.
    pub redis: String,
    pub mysql: String,
    pub backlog: Backlog,
    pub booking: Booking,
    pub at: chrono::DateTime<chrono::Utc>,
}

#[derive(ToSchema)]
pub struct Webhooks {
    pub webhooks: Vec<crate::events::Subscription>,
}

#[derive(ToSchema)]
pub struct Deliveries {
    pub deliveries: Vec<crate::events::Delivery>,
}

// ---- upstream ------------------------------------------------------------------------------

#[derive(ToSchema)]
pub struct AwardBatchRequest {
    /// At most 1000.
    pub awards: Vec<crate::issue::AwardRequest>,
}

/// One award's answer in a batch: the award, or its error.
#[derive(ToSchema)]
#[serde(untagged)]
pub enum AwardResult {
    Ok(super::awards::AwardBody),
    Err(ErrorEnvelope),
}

#[derive(ToSchema)]
pub struct AwardBatchResponse {
    /// In request order.
    pub results: Vec<AwardResult>,
}

// ---- wallet ----------------------------------------------------------------------------------

#[derive(ToSchema)]
pub struct SyncRequest {
    /// base64url SignedTokens, at most 1000.
    pub tokens: Vec<String>,
}

// ---- anyone ----------------------------------------------------------------------------------

#[derive(ToSchema)]
pub struct Healthz {
    pub status: String,
}

#[derive(ToSchema)]
pub struct Ready {
    pub ready: bool,
    pub redis: String,
    pub mysql: String,
}
