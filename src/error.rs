//! The service's error: every capability returns it, with the stable codes of API.md.
//! The HTTP edge maps it to a status and the JSON envelope in one place
//! (`http::error`); nothing here knows about HTTP.
//!
//! Dependency failures are split by what they mean for the caller: an outage (Redis or
//! MySQL unreachable, timing out, failing over, refusing writes while loading) is
//! [`Error::Unavailable`], worth a retry; any other fault (a script error, an
//! unreadable row, a broken invariant) is [`Error::Internal`].

#[derive(Debug, thiserror::Error)]
pub enum Error {
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
    /// The scene gives one win per user, and this user won it already.
    #[error("{0}")]
    AlreadyWon(String),
    /// Every share of the red packet is opened.
    #[error("every share of this red packet has been opened")]
    PacketFinished,
    /// The red packet's time is over (its remainder goes back to the sender).
    #[error("this red packet has expired")]
    PacketExpired,
    /// The coupon was used by another redemption.
    #[error("this coupon has been used")]
    CouponUsed,
    /// The coupon's validity is over (or has not begun).
    #[error("{0}")]
    CouponExpired(String),
    /// The order does not reach the coupon's minimum spend.
    #[error("{0}")]
    BelowMinSpend(String),
    #[error("rate limited")]
    RateLimited { retry_after_secs: u64 },
    #[error("{0}")]
    Unavailable(String),
    #[error(transparent)]
    Internal(#[from] anyhow::Error),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// The stable, machine-readable code of API.md.
    pub fn code(&self) -> &'static str {
        match self {
            Error::InvalidRequest(_) => "invalid_request",
            Error::Unauthorized => "unauthorized",
            Error::Forbidden(_) => "forbidden",
            Error::NotFound(_) => "not_found",
            Error::IdempotencyConflict(_) => "idempotency_conflict",
            Error::BudgetExhausted => "budget_exhausted",
            Error::InsufficientBalance => "insufficient_balance",
            Error::ActivityClosed(_) => "activity_closed",
            Error::AmountOverCap(_) => "amount_over_cap",
            Error::RateLimited { .. } => "rate_limited",
            Error::PayloadTooLarge => "payload_too_large",
            Error::AlreadyWon(_) => "already_won",
            Error::PacketFinished => "packet_finished",
            Error::PacketExpired => "packet_expired",
            Error::CouponUsed => "coupon_used",
            Error::CouponExpired(_) => "coupon_expired",
            Error::BelowMinSpend(_) => "below_min_spend",
            Error::Unavailable(_) => "unavailable",
            Error::Internal(_) => "internal",
        }
    }

    /// The message shown to the client: internal causes are hidden.
    pub fn public_message(&self) -> String {
        match self {
            Error::Internal(_) => "internal error".to_string(),
            other => other.to_string(),
        }
    }

    /// The same code and message, for answering a batch duplicate with its first's
    /// error (errors are not `Clone`: they may carry an `anyhow` chain).
    pub fn duplicate(&self) -> Error {
        match self {
            Error::InvalidRequest(m) => Error::InvalidRequest(m.clone()),
            Error::Unauthorized => Error::Unauthorized,
            Error::Forbidden(m) => Error::Forbidden(m.clone()),
            Error::NotFound(m) => Error::NotFound(m.clone()),
            Error::IdempotencyConflict(m) => Error::IdempotencyConflict(m.clone()),
            Error::BudgetExhausted => Error::BudgetExhausted,
            Error::InsufficientBalance => Error::InsufficientBalance,
            Error::ActivityClosed(m) => Error::ActivityClosed(m.clone()),
            Error::AmountOverCap(m) => Error::AmountOverCap(m.clone()),
            Error::PayloadTooLarge => Error::PayloadTooLarge,
            Error::AlreadyWon(m) => Error::AlreadyWon(m.clone()),
            Error::PacketFinished => Error::PacketFinished,
            Error::PacketExpired => Error::PacketExpired,
            Error::CouponUsed => Error::CouponUsed,
            Error::CouponExpired(m) => Error::CouponExpired(m.clone()),
            Error::BelowMinSpend(m) => Error::BelowMinSpend(m.clone()),
            Error::RateLimited { retry_after_secs } => Error::RateLimited {
                retry_after_secs: *retry_after_secs,
            },
            Error::Unavailable(m) => Error::Unavailable(m.clone()),
            Error::Internal(e) => Error::Internal(anyhow::anyhow!("{e:#}")),
        }
    }

    pub fn internal(msg: impl std::fmt::Display) -> Error {
        Error::Internal(anyhow::anyhow!("{msg}"))
    }
}

impl From<crate::domain::Invalid> for Error {
    fn from(err: crate::domain::Invalid) -> Self {
        Error::InvalidRequest(err.0)
    }
}

/// MySQL unreachable, timing out, out of connections or shutting down; a deadlock or
/// lock-wait timeout (the transaction rolled back whole, a retry may pass).
pub fn is_mysql_outage(err: &sqlx::Error) -> bool {
    match err {
        sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::WorkerCrashed => true,
        sqlx::Error::Database(db) => db
            .try_downcast_ref::<sqlx::mysql::MySqlDatabaseError>()
            .is_some_and(|e| matches!(e.number(), 1040 | 1053 | 1205 | 1213 | 2006 | 2013)),
        _ => false,
    }
}

/// Redis unreachable, timing out, loading, failing over or read-only.
pub fn is_redis_outage(err: &redis::RedisError) -> bool {
    err.is_io_error()
        || err.is_timeout()
        || err.is_connection_dropped()
        || err.is_connection_refusal()
        || matches!(
            err.kind(),
            redis::ErrorKind::BusyLoadingError
                | redis::ErrorKind::TryAgain
                | redis::ErrorKind::ClusterDown
                | redis::ErrorKind::MasterDown
                | redis::ErrorKind::ReadOnly
        )
        || matches!(
            err.code(),
            Some("OOM" | "LOADING" | "MASTERDOWN" | "READONLY")
        )
}

impl From<sqlx::Error> for Error {
    fn from(err: sqlx::Error) -> Self {
        crate::metrics::dependency_error("mysql");
        if is_mysql_outage(&err) {
            // The one log line of an outage answer (the edge logs only 500s).
            tracing::warn!(error = %err, "mysql unavailable");
            Error::Unavailable("database unavailable".into())
        } else {
            Error::Internal(anyhow::Error::new(err).context("mysql"))
        }
    }
}

impl From<redis::RedisError> for Error {
    fn from(err: redis::RedisError) -> Self {
        crate::metrics::dependency_error("redis");
        if is_redis_outage(&err) {
            tracing::warn!(error = %err, "redis unavailable");
            Error::Unavailable("redis unavailable".into())
        } else {
            Error::Internal(anyhow::Error::new(err).context("redis"))
        }
    }
}
