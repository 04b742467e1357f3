//! The HTTP edge: body formats, credentials, and the routes every instance serves
//! whatever its capability (health, readiness, metrics, public keys).
//!
//! Handlers stay thin: parse into domain types, call the capability, turn the result
//! into a response. Errors are always the JSON envelope of API.md.

pub mod auth;

use axum::body::Bytes;
use axum::extract::{FromRequest, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::error::ApiError;
use crate::startup::AppState;

pub use auth::{Caller, Operator, User};

pub const PROTOBUF: &str = "application/x-protobuf";

/// The body format of a request or a response.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Json,
    Protobuf,
}

impl Format {
    pub fn of_request(headers: &HeaderMap) -> Self {
        match headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
        {
            Some(ct) if ct.starts_with(PROTOBUF) => Format::Protobuf,
            _ => Format::Json,
        }
    }

    /// `Accept: application/x-protobuf` asks for protobuf; without an Accept header a
    /// protobuf request gets a protobuf answer.
    pub fn of_response(headers: &HeaderMap) -> Self {
        match headers.get(header::ACCEPT).and_then(|v| v.to_str().ok()) {
            Some(accept) if accept.contains(PROTOBUF) => Format::Protobuf,
            Some(accept) if accept.contains("json") => Format::Json,
            _ => Self::of_request(headers),
        }
    }
}

/// A value with a JSON shape and a protobuf shape.
pub trait Wire: Serialize {
    type Pb: prost::Message;
    fn to_pb(&self) -> Self::Pb;
}

/// Answers `value` in the asked format.
pub fn reply<T: Wire>(format: Format, status: StatusCode, value: &T) -> Response {
    match format {
        Format::Json => (status, Json(value)).into_response(),
        Format::Protobuf => {
            let bytes = prost::Message::encode_to_vec(&value.to_pb());
            (
                status,
                [(header::CONTENT_TYPE, HeaderValue::from_static(PROTOBUF))],
                bytes,
            )
                .into_response()
        }
    }
}

/// Decodes a body that may be JSON (into `J`) or protobuf (into `P`, then `J`).
pub fn decode_body<J, P>(headers: &HeaderMap, body: &[u8]) -> Result<J, ApiError>
where
    J: DeserializeOwned,
    P: prost::Message + Default + Into<J>,
{
    match Format::of_request(headers) {
        Format::Protobuf => P::decode(body)
            .map(Into::into)
            .map_err(|e| ApiError::InvalidRequest(format!("malformed protobuf body: {e}"))),
        Format::Json => parse_json(body),
    }
}

pub fn parse_json<J: DeserializeOwned>(body: &[u8]) -> Result<J, ApiError> {
    serde_json::from_slice(body)
        .map_err(|e| ApiError::InvalidRequest(format!("malformed JSON body: {e}")))
}

/// A JSON body whose rejection is the API's error envelope, not axum's plain text.
pub struct JsonBody<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let bytes = Bytes::from_request(req, state)
            .await
            .map_err(|e| ApiError::InvalidRequest(format!("unreadable body: {e}")))?;
        Ok(JsonBody(parse_json(&bytes)?))
    }
}

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/v1/keys", get(keys))
}

async fn healthz() -> Json<serde_json::Value> {
    Json(serde_json::json!({"status": "ok"}))
}

async fn readyz(State(app): State<AppState>) -> Response {
    let timeout = std::time::Duration::from_secs(2);
    let redis_ok = matches!(
        tokio::time::timeout(timeout, app.redis.ping()).await,
        Ok(Ok(()))
    );
    let mysql_ok = matches!(
        tokio::time::timeout(timeout, app.db.ping()).await,
        Ok(Ok(()))
    );
    let status = if redis_ok && mysql_ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let body = serde_json::json!({
        "ready": redis_ok && mysql_ok,
        "redis": if redis_ok { "ok" } else { "unreachable" },
        "mysql": if mysql_ok { "ok" } else { "unreachable" },
    });
    (status, Json(body)).into_response()
}

async fn metrics(State(app): State<AppState>) -> Response {
    app.update_gauges().await;
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; version=0.0.4"),
        )],
        app.metrics.render(),
    )
        .into_response()
}

#[derive(Serialize)]
struct KeysBody {
    keys: Vec<crate::keys::PublicKey>,
}

async fn keys(State(app): State<AppState>) -> Json<KeysBody> {
    Json(KeysBody {
        keys: app.keys.current().published(),
    })
}
