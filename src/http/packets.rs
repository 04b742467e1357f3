//! Group red packets (see `packets`): `POST /v1/packets` (send),
//! `POST /v1/packets/{id}/grab`, `POST /v1/packets/{id}/open`, `GET /v1/packets/{id}`.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::{Deserialize, Serialize};
use utoipa_axum::{router::OpenApiRouter, routes};

use super::openapi as doc;
use super::wire::JsonBody;
use super::{AppState, User};
use crate::domain::{Cents, RequestId};
use crate::error::Result;
use crate::packets::{Grab, OpenOutcome, Opened, Packet, PacketDetail, Sent};

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(send))
        .routes(routes!(detail))
        .routes(routes!(grab))
        .routes(routes!(open))
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
pub struct SendRequest {
    /// Client-chosen, 1-64 characters: the same id again is the same packet.
    pub request_id: String,
    pub total_cents: i64,
    /// How many people may open it (1..=packets.max_shares); every share gets a cent.
    pub shares: i64,
    /// Up to 100 characters.
    #[serde(default)]
    pub greeting: String,
}

/// A packet sent, with the sender's balance after the debit (on the first answer).
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct SentPacket {
    #[serde(flatten)]
    pub packet: Packet,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub balance_cents: Option<i64>,
}

#[utoipa::path(post, path = "/v1/packets", tag = "packets", security(("user" = [])),
    request_body = SendRequest,
    responses((status = 201, description = "Sent: the sender's pending tokens booked first, then the total debited into the packet", body = SentPacket),
        (status = 200, description = "The same request_id again: the same packet", body = SentPacket),
        doc::PacketSendErrors))]
async fn send(
    State(app): State<AppState>,
    User(user): User,
    JsonBody(body): JsonBody<SendRequest>,
) -> Result<Response> {
    let request_id = RequestId::parse(&body.request_id)?;
    let total = Cents::positive(body.total_cents, "total_cents")?;
    let sent = app
        .packets
        .send(user, &request_id, total, body.shares, &body.greeting)
        .await?;
    Ok(match sent {
        Sent::Created(packet, balance) => (
            StatusCode::CREATED,
            Json(SentPacket {
                packet,
                balance_cents: Some(balance),
            }),
        )
            .into_response(),
        Sent::Existing(packet) => (
            StatusCode::OK,
            Json(SentPacket {
                packet,
                balance_cents: None,
            }),
        )
            .into_response(),
    })
}

#[utoipa::path(get, path = "/v1/packets/{id}", tag = "packets", security(("user" = [])),
    params(("id" = String, Path, description = "The packet id")),
    responses((status = 200, description = "The packet and who got what; once nothing more can be opened, the largest share is marked best_luck", body = PacketDetail), doc::UserErrors))]
async fn detail(
    State(app): State<AppState>,
    User(_user): User,
    Path(id): Path<String>,
) -> Result<Json<PacketDetail>> {
    Ok(Json(app.packets.detail(&id).await?))
}

/// What the grab step says.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct GrabAnswer {
    pub packet_id: String,
    /// eligible (go on to open), finished, already_opened or expired.
    pub status: Grab,
}

#[utoipa::path(post, path = "/v1/packets/{id}/grab", tag = "packets", security(("user" = [])),
    params(("id" = String, Path, description = "The packet id")),
    responses((status = 200, description = "From the cache alone: whether opening may give a share", body = GrabAnswer), doc::UserErrors))]
async fn grab(
    State(app): State<AppState>,
    User(user): User,
    Path(id): Path<String>,
) -> Result<Json<GrabAnswer>> {
    let status = app.packets.grab(user, &id).await?;
    Ok(Json(GrabAnswer {
        packet_id: id,
        status,
    }))
}

#[utoipa::path(post, path = "/v1/packets/{id}/open", tag = "packets", security(("user" = [])),
    params(("id" = String, Path, description = "The packet id")),
    responses((status = 201, description = "A share opened now: its amount and its signed award token, pending in the wallet at once", body = Opened),
        (status = 200, description = "This user's share from before, and the same token", body = Opened),
        doc::PacketOpenErrors))]
async fn open(
    State(app): State<AppState>,
    User(user): User,
    Path(id): Path<String>,
) -> Result<Response> {
    Ok(match app.packets.open(user, &id).await? {
        OpenOutcome::Created(opened) => (StatusCode::CREATED, Json(opened)).into_response(),
        OpenOutcome::Existing(opened) => (StatusCode::OK, Json(opened)).into_response(),
    })
}
