//! The one place a service [`Error`] becomes an HTTP answer: its status, the JSON
//! envelope of API.md and `Retry-After`. A 500 is logged here, once, with its chain;
//! an outage (503) was logged where it was recognised (`error.rs`); client errors are
//! not logged.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use crate::error::Error;

#[derive(Serialize)]
struct Envelope<'a> {
    error: Body<'a>,
}

#[derive(Serialize)]
struct Body<'a> {
    code: &'a str,
    message: String,
}

pub fn status(err: &Error) -> StatusCode {
    match err {
        Error::InvalidRequest(_) => StatusCode::BAD_REQUEST,
        Error::Unauthorized => StatusCode::UNAUTHORIZED,
        Error::Forbidden(_) => StatusCode::FORBIDDEN,
        Error::NotFound(_) => StatusCode::NOT_FOUND,
        Error::IdempotencyConflict(_)
        | Error::BudgetExhausted
        | Error::InsufficientBalance
        | Error::AlreadyWon(_)
        | Error::PacketFinished
        | Error::PacketExpired
        | Error::CouponUsed
        | Error::CouponExpired(_) => StatusCode::CONFLICT,
        Error::ActivityClosed(_) | Error::AmountOverCap(_) | Error::BelowMinSpend(_) => {
            StatusCode::UNPROCESSABLE_ENTITY
        }
        Error::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
        Error::PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
        Error::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
        Error::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

/// Logs a fault once, with its chain (a batch logs its items' faults this way too).
pub fn log(err: &Error) {
    if let Error::Internal(cause) = err {
        tracing::error!(error.chain = format!("{cause:#}"), "request failed");
    }
}

/// The envelope body of `err`, as JSON.
pub fn envelope(err: &Error) -> serde_json::Value {
    serde_json::to_value(Envelope {
        error: Body {
            code: err.code(),
            message: err.public_message(),
        },
    })
    .unwrap_or_default()
}

impl IntoResponse for Error {
    fn into_response(self) -> Response {
        log(&self);
        let mut body = envelope(&self);
        if let Some(id) = super::request_id::current() {
            body["error"]["request_id"] = serde_json::Value::String(id);
        }
        let mut response = (status(&self), axum::Json(body)).into_response();
        match self {
            Error::RateLimited { retry_after_secs } => {
                response.headers_mut().insert(
                    header::RETRY_AFTER,
                    HeaderValue::from(retry_after_secs.max(1)),
                );
            }
            // The body is refused unread, so the server drops the connection after this
            // answer; saying so keeps a client from sending its next request down it.
            Error::PayloadTooLarge => {
                response
                    .headers_mut()
                    .insert(header::CONNECTION, HeaderValue::from_static("close"));
            }
            _ => {}
        }
        response
    }
}
