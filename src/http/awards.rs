//! `POST /v1/awards`, `POST /v1/awards:batch` and `GET /v1/activities/{id}/stats`.

use std::time::Instant;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use utoipa_axum::{router::OpenApiRouter, routes};

use super::openapi as doc;
use serde::{Deserialize, Serialize};

use super::wire::{check_list_len, decode_body, reply, Bounded, Format, Wire};
use super::{AppState, Caller};
use crate::error::{Error, Result};
use crate::issue::{AwardRequest, Issued};
use crate::pb;
use crate::token;

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(award))
        .routes(routes!(award_batch))
        .routes(routes!(stats))
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct AwardBody {
    /// `{user_id}_{activity_id}_{scene_id}_{rain_id}_{award_type}_{stage}`.
    pub out_trade_no: String,
    /// base64url SignedToken; empty when only a greeting was handed out.
    pub token: String,
    /// `pending` (a token, waiting to be booked), or `greeting` (a coupon scene's
    /// fallback handed out no token).
    pub status: &'static str,
    pub replayed: bool,
    /// Coupon scenes: `template` when the fallback template was handed out, `greeting`
    /// when only its greeting was.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fallback: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub greeting: Option<String>,
}

fn status_of(i: &Issued) -> &'static str {
    if i.token.is_empty() {
        "greeting"
    } else {
        "pending"
    }
}

impl From<&Issued> for AwardBody {
    fn from(i: &Issued) -> Self {
        Self {
            out_trade_no: i.out_trade_no.clone(),
            token: token::to_base64(&i.token),
            status: status_of(i),
            replayed: i.replayed,
            fallback: i.fallback,
            greeting: i.greeting.clone(),
        }
    }
}

fn award_pb(i: &Issued) -> pb::AwardResponse {
    pb::AwardResponse {
        out_trade_no: i.out_trade_no.clone(),
        token: i.token.clone(),
        status: status_of(i).into(),
        replayed: i.replayed,
        fallback: i.fallback.unwrap_or_default().into(),
        greeting: i.greeting.clone().unwrap_or_default(),
    }
}

struct SingleReply(Issued);

impl Serialize for SingleReply {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        AwardBody::from(&self.0).serialize(s)
    }
}

impl Wire for SingleReply {
    type Pb = pb::AwardResponse;
    fn to_pb(&self) -> pb::AwardResponse {
        award_pb(&self.0)
    }
}

#[utoipa::path(post, path = "/v1/awards", tag = "upstream", security(("caller" = [])),
    request_body(description = "JSON, or protobuf (application/x-protobuf, proto/redpacket.proto)", content = AwardRequest),
    responses((status = 201, description = "Issued: the signed token, pending booking", body = AwardBody),
        (status = 200, description = "The same award again: the same body, byte-identical token, replayed true", body = AwardBody),
        doc::AwardErrors))]
async fn award(
    State(app): State<AppState>,
    Caller(caller): Caller,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response> {
    let started = Instant::now();
    let request: AwardRequest = decode_body::<AwardRequest, pb::AwardRequest>(&headers, &body)?;
    let result = app.coalescer.issue(caller, request).await;
    crate::metrics::award_latency(started.elapsed().as_secs_f64(), "single");
    let issued = result?;
    let status = if issued.replayed {
        StatusCode::OK
    } else {
        StatusCode::CREATED
    };
    Ok(reply(
        Format::of_response(&headers),
        status,
        &SingleReply(issued),
    ))
}

#[derive(Debug, Deserialize)]
struct BatchRequest {
    awards: Bounded<AwardRequest>,
}

impl From<pb::AwardBatchRequest> for BatchRequest {
    fn from(r: pb::AwardBatchRequest) -> Self {
        Self {
            awards: Bounded(r.awards.into_iter().map(Into::into).collect()),
        }
    }
}

#[derive(Serialize)]
#[serde(untagged)]
enum BatchItem {
    Ok(AwardBody),
    Err { error: ErrorItem },
}

#[derive(Serialize)]
struct ErrorItem {
    code: &'static str,
    message: String,
}

struct BatchReply(Vec<Result<Issued>>);

impl Serialize for BatchReply {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        #[derive(Serialize)]
        struct Body {
            results: Vec<BatchItem>,
        }
        Body {
            results: self
                .0
                .iter()
                .map(|r| match r {
                    Ok(i) => BatchItem::Ok(AwardBody::from(i)),
                    Err(e) => BatchItem::Err {
                        error: ErrorItem {
                            code: e.code(),
                            message: e.public_message(),
                        },
                    },
                })
                .collect(),
        }
        .serialize(s)
    }
}

impl Wire for BatchReply {
    type Pb = pb::AwardBatchResponse;
    fn to_pb(&self) -> pb::AwardBatchResponse {
        pb::AwardBatchResponse {
            results: self
                .0
                .iter()
                .map(|r| pb::AwardResult {
                    result: Some(match r {
                        Ok(i) => pb::award_result::Result::Ok(award_pb(i)),
                        Err(e) => pb::award_result::Result::Error(pb::ErrorBody {
                            code: e.code().to_string(),
                            message: e.public_message(),
                        }),
                    }),
                })
                .collect(),
        }
    }
}

#[utoipa::path(post, path = "/v1/awards:batch", tag = "upstream", security(("caller" = [])),
    request_body(description = "JSON, or protobuf (application/x-protobuf, proto/redpacket.proto)", content = doc::AwardBatchRequest),
    responses((status = 200, description = "One result per award, in request order; one bad item does not fail the others", body = doc::AwardBatchResponse),
        doc::BatchErrors))]
async fn award_batch(
    State(app): State<AppState>,
    Caller(caller): Caller,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response> {
    let started = Instant::now();
    let max = app.settings.issue.batch_max;
    check_list_len(&headers, &body, 1, max)?;
    let request: BatchRequest =
        decode_body::<BatchRequest, pb::AwardBatchRequest>(&headers, &body)?;
    let Bounded(awards) = request.awards;
    if awards.is_empty() || awards.len() > max {
        return Err(Error::InvalidRequest(format!(
            "a batch holds 1 to {max} awards, this one {}",
            awards.len()
        )));
    }
    let results = app.issuer.issue(&caller, awards).await;
    for r in &results {
        r.as_ref().err().map(super::error::log);
    }
    crate::metrics::award_latency(started.elapsed().as_secs_f64(), "batch");
    Ok(reply(
        Format::of_response(&headers),
        StatusCode::OK,
        &BatchReply(results),
    ))
}

#[derive(Serialize, utoipa::ToSchema)]
struct StatsBody {
    activity_id: String,
    issued_cents: i64,
    issued_count: i64,
}

#[utoipa::path(get, path = "/v1/activities/{id}/stats", tag = "anyone",
    params(("id" = String, Path, description = "The activity id")),
    responses((status = 200, description = "Issued totals, at most about a second stale", body = StatsBody), doc::PublicErrors))]
async fn stats(State(app): State<AppState>, Path(id): Path<String>) -> Response {
    if app.activities.cache().get(&id).is_none() {
        return Error::NotFound(format!("no activity `{id}`")).into_response();
    }
    let (count, cents) = app.stats.totals(&id);
    Json(StatsBody {
        activity_id: id,
        issued_cents: cents,
        issued_count: count,
    })
    .into_response()
}
