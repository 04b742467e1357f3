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

/// Refuses a protobuf body whose top-level repeated field `field` holds more than `max`
/// items, by walking the wire format without decoding it: a refusal costs no more
/// memory than the body itself (a million empty items would otherwise become a million
/// decoded structs).
pub fn check_list_len(
    headers: &HeaderMap,
    body: &[u8],
    field: u32,
    max: usize,
) -> Result<(), ApiError> {
    if Format::of_request(headers) != Format::Protobuf {
        return Ok(());
    }
    let malformed = || ApiError::InvalidRequest("malformed protobuf body".into());
    let mut buf = body;
    let mut count = 0usize;
    while !buf.is_empty() {
        let key = prost::encoding::decode_varint(&mut buf).map_err(|_| malformed())?;
        let wire = key & 7;
        if key >> 3 == u64::from(field) {
            count += 1;
            if count > max {
                return Err(ApiError::InvalidRequest(format!(
                    "at most {max} items per request"
                )));
            }
        }
        match wire {
            0 => {
                prost::encoding::decode_varint(&mut buf).map_err(|_| malformed())?;
            }
            1 | 5 => {
                let n = if wire == 1 { 8 } else { 4 };
                buf = buf.get(n..).ok_or_else(malformed)?;
            }
            2 => {
                let len = prost::encoding::decode_varint(&mut buf).map_err(|_| malformed())?;
                let len = usize::try_from(len).map_err(|_| malformed())?;
                buf = buf.get(len..).ok_or_else(malformed)?;
            }
            _ => return Err(malformed()),
        }
    }
    Ok(())
}

/// The most items any list in a request body may hold while it is decoded (the
/// configured limits, `issue.batch_max` and `wallet.sync_max`, are at most this).
pub const LIST_MAX: usize = 10_000;

/// A JSON list refused while it is decoded once it holds more than [`LIST_MAX`] items.
#[derive(Debug)]
pub struct Bounded<T>(pub Vec<T>);

impl<'de, T: serde::Deserialize<'de>> serde::Deserialize<'de> for Bounded<T> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visit<T>(std::marker::PhantomData<T>);
        impl<'de, T: serde::Deserialize<'de>> serde::de::Visitor<'de> for Visit<T> {
            type Value = Bounded<T>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                write!(f, "a list of at most {LIST_MAX} items")
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<Self::Value, A::Error> {
                let mut out = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(1024));
                while let Some(item) = seq.next_element()? {
                    if out.len() == LIST_MAX {
                        return Err(serde::de::Error::custom(format!(
                            "at most {LIST_MAX} items per request"
                        )));
                    }
                    out.push(item);
                }
                Ok(Bounded(out))
            }
        }
        d.deserialize_seq(Visit(std::marker::PhantomData))
    }
}

/// Gives every error response the API's envelope: those produced below the handlers
/// (a rejected query string, an over-long body, a timeout, an unknown method) arrive as
/// plain text and are rewritten here with the stable code for their status.
pub async fn envelope_errors(response: Response) -> Response {
    let status = response.status();
    if !(status.is_client_error() || status.is_server_error()) {
        return response;
    }
    let is_json = response
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| ct.starts_with("application/json"));
    if is_json {
        return response;
    }
    let (parts, body) = response.into_parts();
    let text = axum::body::to_bytes(body, 4096)
        .await
        .map(|b| String::from_utf8_lossy(&b).trim().to_string())
        .unwrap_or_default();
    let error = match status {
        StatusCode::PAYLOAD_TOO_LARGE => ApiError::PayloadTooLarge,
        StatusCode::NOT_FOUND => ApiError::NotFound("no such route".into()),
        StatusCode::UNAUTHORIZED => ApiError::Unauthorized,
        StatusCode::FORBIDDEN => ApiError::Forbidden(text),
        StatusCode::REQUEST_TIMEOUT
        | StatusCode::SERVICE_UNAVAILABLE
        | StatusCode::GATEWAY_TIMEOUT => {
            ApiError::Unavailable("the request took too long or a dependency is down".into())
        }
        s if s.is_server_error() => ApiError::Internal(anyhow::anyhow!("{s}: {text}")),
        _ if text.is_empty() => ApiError::InvalidRequest(
            status
                .canonical_reason()
                .unwrap_or("bad request")
                .to_string(),
        ),
        _ => ApiError::InvalidRequest(text),
    };
    let mut rewritten = error.into_response();
    *rewritten.status_mut() = status;
    for (name, value) in parts.headers.iter() {
        if name == header::RETRY_AFTER || name == header::ALLOW {
            rewritten.headers_mut().insert(name.clone(), value.clone());
        }
    }
    rewritten
}

/// Unknown routes: 404 with the envelope.
pub async fn not_found() -> ApiError {
    ApiError::NotFound("no such route".into())
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
        let bytes = Bytes::from_request(req, state).await.map_err(|e| {
            if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::PayloadTooLarge
            } else {
                ApiError::InvalidRequest(format!("unreadable body: {e}"))
            }
        })?;
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
