//! The one error type every handler returns, with the stable codes of API.md.
//!
//! Rule: library code returns typed errors where a caller must tell cases apart and
//! `anyhow::Error` for "a dependency failed"; both become an [`ApiError`] at the HTTP edge.
//! A 5xx never shows its cause to the client; it is logged once, here, with its chain.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    InvalidRequest(String),
    #[error("missing or wrong credential")]
    Unauthorized,
    #[error("{0}")]
    Forbidden(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    IdempotencyConflict(String),
    #[error("the activity budget cannot cover the award")]
    BudgetExhausted,
    #[error("the balance cannot cover the withdrawal")]
    InsufficientBalance,
    #[error("{0}")]
    ActivityClosed(String),
    #[error("{0}")]
    AmountOverCap(String),
    #[error("the request body is over the configured limit")]
    PayloadTooLarge,
    #[error("rate limited")]
    RateLimited { retry_after_secs: u64 },
    #[error("{0}")]
    Unavailable(String),
    #[error(transparent)]
    Internal(#[from] anyhow::Error),
}

#[derive(Serialize)]
struct Envelope<'a> {
    error: Body<'a>,
}

#[derive(Serialize)]
struct Body<'a> {
    code: &'a str,
    message: String,
}

impl ApiError {
    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::InvalidRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::Unauthorized => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden(_) => StatusCode::FORBIDDEN,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::IdempotencyConflict(_)
            | ApiError::BudgetExhausted
            | ApiError::InsufficientBalance => StatusCode::CONFLICT,
            ApiError::ActivityClosed(_) | ApiError::AmountOverCap(_) => {
                StatusCode::UNPROCESSABLE_ENTITY
            }
            ApiError::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
            ApiError::PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The stable, machine-readable code of API.md.
    pub fn code(&self) -> &'static str {
        match self {
            ApiError::InvalidRequest(_) => "invalid_request",
            ApiError::Unauthorized => "unauthorized",
            ApiError::Forbidden(_) => "forbidden",
            ApiError::NotFound(_) => "not_found",
            ApiError::IdempotencyConflict(_) => "idempotency_conflict",
            ApiError::BudgetExhausted => "budget_exhausted",
            ApiError::InsufficientBalance => "insufficient_balance",
            ApiError::ActivityClosed(_) => "activity_closed",
            ApiError::AmountOverCap(_) => "amount_over_cap",
            ApiError::RateLimited { .. } => "rate_limited",
            ApiError::PayloadTooLarge => "payload_too_large",
            ApiError::Unavailable(_) => "unavailable",
            ApiError::Internal(_) => "internal",
        }
    }

    /// The message shown to the client: internal causes are hidden.
    pub fn public_message(&self) -> String {
        match self {
            ApiError::Internal(_) => "internal error".to_string(),
            other => other.to_string(),
        }
    }

    /// Logs a server-side failure once, with its chain. Client errors are not logged.
    pub fn log(&self) {
        if let ApiError::Internal(err) = self {
            tracing::error!(error.chain = format!("{err:#}"), "request failed");
        }
    }
}

impl From<crate::domain::Invalid> for ApiError {
    fn from(err: crate::domain::Invalid) -> Self {
        ApiError::InvalidRequest(err.0)
    }
}

impl From<sqlx::Error> for ApiError {
    fn from(err: sqlx::Error) -> Self {
        crate::metrics::dependency_error("mysql");
        tracing::warn!(error = %err, "mysql error");
        ApiError::Unavailable(format!("database unavailable: {}", short_kind(&err)))
    }
}

impl From<redis::RedisError> for ApiError {
    fn from(err: redis::RedisError) -> Self {
        crate::metrics::dependency_error("redis");
        tracing::warn!(error = %err, "redis error");
        ApiError::Unavailable("redis unavailable".to_string())
    }
}

fn short_kind(err: &sqlx::Error) -> &'static str {
    match err {
        sqlx::Error::PoolTimedOut => "pool timed out",
        sqlx::Error::Io(_) => "connection failed",
        sqlx::Error::Database(_) => "database error",
        _ => "error",
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        self.log();
        if let ApiError::Unavailable(msg) = &self {
            tracing::warn!(error.message = %msg, "request answered unavailable");
        }
        let body = Envelope {
            error: Body {
                code: self.code(),
                message: self.public_message(),
            },
        };
        let mut response = (self.status(), axum::Json(body)).into_response();
        if let ApiError::RateLimited { retry_after_secs } = self {
            response.headers_mut().insert(
                header::RETRY_AFTER,
                HeaderValue::from(retry_after_secs.max(1)),
            );
        }
        response
    }
}

pub type ApiResult<T> = Result<T, ApiError>;
