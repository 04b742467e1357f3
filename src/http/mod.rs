//! The HTTP edge: all axum code lives here. One file per capability, each exposing
//! `router()`; errors become the JSON envelope of API.md in one place ([`error`]).
//!
//! Handlers stay thin: parse into domain types, call the capability, turn the result
//! into a response.

pub mod admin;
pub mod auth;
pub mod awards;
pub mod error;
pub mod public;
pub mod wallet;
pub mod wire;
pub mod withdrawals;

use std::sync::Arc;
use std::time::Duration;

use axum::extract::DefaultBodyLimit;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Router;
use tower_http::timeout::TimeoutLayer;
use tower_http::trace::TraceLayer;

use crate::app::App;
use crate::error::Error;

pub use auth::{Caller, Operator, User};
pub use wire::{
    check_list_len, decode_body, parse_json, reply, Bounded, Format, JsonBody, Wire, LIST_MAX,
    PROTOBUF,
};

/// What handlers see: the assembled application.
pub type AppState = Arc<App>;

/// The whole HTTP surface, one router per capability.
pub fn router(app: Arc<App>) -> Router {
    let settings = &app.settings.http;
    Router::new()
        .merge(public::router())
        .merge(awards::router())
        .merge(wallet::router())
        .merge(withdrawals::router())
        .merge(admin::router())
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(settings.body_limit_bytes))
        .layer(TimeoutLayer::with_status_code(
            StatusCode::SERVICE_UNAVAILABLE,
            Duration::from_millis(settings.request_timeout_ms),
        ))
        .layer(axum::middleware::map_response(envelope_errors))
        .layer(TraceLayer::new_for_http())
        .with_state(app)
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
        StatusCode::PAYLOAD_TOO_LARGE => Error::PayloadTooLarge,
        StatusCode::NOT_FOUND => Error::NotFound("no such route".into()),
        StatusCode::UNAUTHORIZED => Error::Unauthorized,
        StatusCode::FORBIDDEN => Error::Forbidden(text),
        StatusCode::REQUEST_TIMEOUT
        | StatusCode::SERVICE_UNAVAILABLE
        | StatusCode::GATEWAY_TIMEOUT => {
            Error::Unavailable("the request took too long or a dependency is down".into())
        }
        s if s.is_server_error() => Error::Internal(anyhow::anyhow!("{s}: {text}")),
        _ if text.is_empty() => Error::InvalidRequest(
            status
                .canonical_reason()
                .unwrap_or("bad request")
                .to_string(),
        ),
        _ => Error::InvalidRequest(text),
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
pub async fn not_found() -> Error {
    Error::NotFound("no such route".into())
}
