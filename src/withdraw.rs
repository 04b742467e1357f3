//! Withdrawals: forced settlement, then debit, in one MySQL transaction.
//!
//! Invariants: a balance never goes negative (checked under the account lock, and by
//! the table's CHECK constraint); a `(user, request_id)` debits at most once (checked
//! under the account lock, and by a unique key); the user's pending tokens are booked
//! with the worker's own booking code, so a token raced by both is credited once.

use std::time::Instant;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use sqlx::{MySql, Row};

use crate::domain::{Cents, UserId};
use crate::error::{ApiError, ApiResult};
use crate::http::{Caller, JsonBody, User};
use crate::settle::{book_in_tx, lock_accounts, Account, BookError};
use crate::startup::{App, AppState};
use crate::store::now_ms;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/v1/withdrawals", post(create))
        .route("/v1/withdrawals/{id}", get(show))
        .route("/v1/withdrawals/{id}/result", post(result))
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Withdrawal {
    pub withdrawal_id: String,
    pub user_id: i64,
    pub request_id: String,
    pub amount_cents: i64,
    pub status: String,
    pub forced_settled_count: i64,
    pub balance_cents: i64,
    pub created_at: chrono::DateTime<chrono::Utc>,
}

#[derive(Debug, Deserialize)]
pub struct WithdrawRequest {
    pub request_id: String,
    pub amount_cents: i64,
}

const COLUMNS: &str =
    "id, user_id, request_id, amount_cents, status, forced_settled_count, balance_after_cents, created_at";

fn from_row(row: &sqlx::mysql::MySqlRow) -> Result<Withdrawal, sqlx::Error> {
    Ok(Withdrawal {
        withdrawal_id: row.try_get(0)?,
        user_id: row.try_get(1)?,
        request_id: String::from_utf8_lossy(&row.try_get::<Vec<u8>, _>(2)?).into_owned(),
        amount_cents: row.try_get(3)?,
        status: row.try_get(4)?,
        forced_settled_count: i64::from(row.try_get::<i32, _>(5)?),
        balance_cents: row.try_get(6)?,
        created_at: row.try_get::<chrono::NaiveDateTime, _>(7)?.and_utc(),
    })
}

async fn find_by_request<'e, E: sqlx::Executor<'e, Database = MySql>>(
    executor: E,
    user: UserId,
    request_id: &str,
) -> Result<Option<Withdrawal>, sqlx::Error> {
    sqlx::query(&format!(
        "SELECT {COLUMNS} FROM withdrawals WHERE user_id = ? AND request_id = ?"
    ))
    .bind(user.get())
    .bind(request_id.as_bytes())
    .fetch_optional(executor)
    .await?
    .as_ref()
    .map(from_row)
    .transpose()
}

fn check_same(existing: Withdrawal, amount: i64) -> ApiResult<(StatusCode, Withdrawal)> {
    if existing.amount_cents == amount {
        Ok((StatusCode::OK, existing))
    } else {
        Err(ApiError::IdempotencyConflict(format!(
            "request_id `{}` was used for {} cents",
            existing.request_id, existing.amount_cents
        )))
    }
}

fn new_withdrawal_id() -> String {
    format!("wd{:011x}{:08x}", now_ms(), rand::random::<u32>())
}

/// Books the user's pending tokens and debits `amount`, or changes nothing.
pub async fn withdraw(
    app: &App,
    user: UserId,
    request_id: &str,
    amount: Cents,
) -> ApiResult<(StatusCode, Withdrawal)> {
    let pool = app.db.for_user(user);
    // Concurrent first bookings of one user can deadlock in InnoDB (creating the account
    // row); such a transaction rolled back whole, so it is retried, a bounded number of times.
    let mut attempt = 0;
    let (status, created, account, to_mark) = loop {
        attempt += 1;
        match withdraw_tx(app, pool, user, request_id, amount).await {
            Ok(Ok((status, created, Some((account, to_mark))))) => {
                break (status, created, account, to_mark)
            }
            Ok(Ok((status, existing, None))) => return Ok((status, existing)),
            Ok(Err(err)) => return Err(err),
            Err(err) if attempt < MAX_TX_ATTEMPTS && err.is_retryable() => {
                crate::metrics::tx_retry("withdraw");
                let jitter = rand::random::<u64>() % 10;
                tokio::time::sleep(std::time::Duration::from_millis((5 << attempt) + jitter)).await;
            }
            Err(BookError::Sql(err)) => return Err(err.into()),
            Err(BookError::Redis(err)) => return Err(err.into()),
        }
    };
    // Redis catches up after the commit. If this fails the worker marks the tokens when
    // it reaches their stream entries; nothing is credited twice either way.
    if let Err(err) = app.marker.mark(&app.redis, &to_mark, &[account]).await {
        tracing::warn!(error = %err, user = user.get(), "marking force-settled tokens failed; the worker will");
    }
    Ok((status, created))
}

const MAX_TX_ATTEMPTS: u32 = 6;

type Committed = (Account, Vec<crate::settle::AwardEntry>);

/// One attempt at the withdrawal transaction. Business outcomes are `Ok(..)`; the outer
/// `Err` is a database error (the transaction rolled back). On success the account as
/// committed comes back, for the Redis snapshot, with the tokens to mark settled.
async fn withdraw_tx(
    app: &App,
    pool: &sqlx::MySqlPool,
    user: UserId,
    request_id: &str,
    amount: Cents,
) -> Result<ApiResult<(StatusCode, Withdrawal, Option<Committed>)>, BookError> {
    let mut tx = pool.begin().await?;
    // Booking locks the account row, then books every token of the user pending in
    // Redis (read after the lock, so none booked by a concurrent booker is missed).
    let booked = book_in_tx(&mut tx, &app.redis, &[], Some(user)).await?;
    let mut account: Account = match booked.accounts.iter().find(|a| a.user_id == user.get()) {
        Some(account) => *account,
        None => lock_accounts(&mut tx, &[user.get()])
            .await?
            .remove(&user.get())
            .ok_or(sqlx::Error::RowNotFound)?,
    };
    // Checked under the account lock: a concurrent twin has committed by now. Rolling
    // back also undoes this attempt's forced booking; the twin's booking stands. (The
    // unique key on (user_id, request_id) backs this check up.)
    if let Some(existing) = find_by_request(&mut *tx, user, request_id).await? {
        tx.rollback().await?;
        return Ok(check_same(existing, amount.0).map(|(s, w)| (s, w, None)));
    }
    if account.balance_cents < amount.0 {
        // Rolling back undoes the forced booking too: an error changes nothing.
        tx.rollback().await?;
        return Ok(Err(ApiError::InsufficientBalance));
    }
    let id = new_withdrawal_id();
    let at = now_ms();
    let created_at = chrono::DateTime::from_timestamp_millis(at).unwrap_or_default();
    sqlx::query(
        "UPDATE accounts SET balance_cents = balance_cents - ?, withdrawn_cents = withdrawn_cents + ?, version = version + 1 WHERE user_id = ?",
    )
    .bind(amount.0)
    .bind(amount.0)
    .bind(user.get())
    .execute(&mut *tx)
    .await?;
    sqlx::query(
        "INSERT INTO ledger_entries (user_id, out_trade_no, kind, amount_cents, at_ms) VALUES (?, ?, 'withdraw', ?, ?)",
    )
    .bind(user.get())
    .bind(format!("wd_{id}"))
    .bind(-amount.0)
    .bind(at)
    .execute(&mut *tx)
    .await?;
    account.balance_cents -= amount.0;
    account.withdrawn_cents += amount.0;
    account.version += 1;
    debug_assert!(
        account.balance_cents >= 0,
        "a withdrawal never makes a balance negative"
    );
    sqlx::query(
        "INSERT INTO withdrawals (id, user_id, request_id, amount_cents, status, forced_settled_count, balance_after_cents, created_at) VALUES (?, ?, ?, ?, 'submitted', ?, ?, ?)",
    )
    .bind(&id)
    .bind(user.get())
    .bind(request_id.as_bytes())
    .bind(amount.0)
    .bind(booked.newly_booked.len() as i32)
    .bind(account.balance_cents)
    .bind(created_at.naive_utc())
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    let created = Withdrawal {
        withdrawal_id: id,
        user_id: user.get(),
        request_id: request_id.to_string(),
        amount_cents: amount.0,
        status: "submitted".into(),
        forced_settled_count: booked.newly_booked.len() as i64,
        balance_cents: account.balance_cents,
        created_at,
    };
    Ok(Ok((
        StatusCode::CREATED,
        created,
        Some((account, booked.to_mark)),
    )))
}

async fn create(
    State(app): State<AppState>,
    User(user): User,
    JsonBody(body): JsonBody<WithdrawRequest>,
) -> ApiResult<Response> {
    let started = Instant::now();
    let request_id = body.request_id.trim();
    if request_id.is_empty()
        || request_id.len() > 64
        || request_id.len() != body.request_id.len()
        || !request_id.chars().all(|c| c.is_ascii_graphic())
    {
        return Err(ApiError::InvalidRequest(
            "request_id must be 1-64 printable characters without spaces".into(),
        ));
    }
    let amount = Cents::positive(body.amount_cents, "amount_cents")?;
    let (status, w) = withdraw(&app, user, request_id, amount).await?;
    crate::metrics::withdraw_latency(started.elapsed().as_secs_f64());
    Ok((status, Json(w)).into_response())
}

async fn find_by_id(app: &App, id: &str) -> ApiResult<Option<(usize, Withdrawal)>> {
    for (i, pool) in app.db.shards().iter().enumerate() {
        let row = sqlx::query(&format!("SELECT {COLUMNS} FROM withdrawals WHERE id = ?"))
            .bind(id)
            .fetch_optional(pool)
            .await?;
        if let Some(row) = row {
            return Ok(Some((i, from_row(&row)?)));
        }
    }
    Ok(None)
}

async fn show(
    State(app): State<AppState>,
    User(user): User,
    Path(id): Path<String>,
) -> ApiResult<Json<Withdrawal>> {
    match find_by_id(&app, &id).await? {
        Some((_, w)) if w.user_id == user.get() => Ok(Json(w)),
        Some(_) => Err(ApiError::Forbidden(
            "this withdrawal belongs to another user".into(),
        )),
        None => Err(ApiError::NotFound(format!("no withdrawal `{id}`"))),
    }
}

#[derive(Debug, Deserialize)]
struct PayoutResult {
    status: String,
}

/// The payout channel's verdict. `paid` is final; `failed` gives the money back with a
/// reversal entry. Repeating a verdict changes nothing; changing one is refused.
pub async fn settle_payout(app: &App, id: &str, status: &str) -> ApiResult<Withdrawal> {
    if status != "paid" && status != "failed" {
        return Err(ApiError::InvalidRequest(
            "status must be paid or failed".into(),
        ));
    }
    let (shard, _) = find_by_id(app, id)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("no withdrawal `{id}`")))?;
    let pool = app.db.shard(shard);
    let mut tx = pool.begin().await?;
    let row = sqlx::query(&format!(
        "SELECT {COLUMNS} FROM withdrawals WHERE id = ? FOR UPDATE"
    ))
    .bind(id)
    .fetch_one(&mut *tx)
    .await?;
    let current = from_row(&row)?;
    if current.status == status {
        tx.rollback().await?;
        return Ok(current);
    }
    if current.status != "submitted" {
        tx.rollback().await?;
        return Err(ApiError::IdempotencyConflict(format!(
            "withdrawal `{id}` is already {}",
            current.status
        )));
    }
    let mut snapshot = None;
    let mut to_mark = Vec::new();
    if status == "failed" {
        let user = UserId::parse(current.user_id)?;
        let mut accounts = lock_accounts(&mut tx, &[user.get()]).await?;
        // The snapshot written after the commit includes every token booked so far;
        // those still pending in Redis are marked with it (see `settle`), so the
        // Redis-only view never counts one twice.
        let pending = crate::tokens::pending_of_users(&app.redis, &[user.get()]).await?;
        let otns: Vec<&str> = pending.iter().map(|e| e.out_trade_no.as_str()).collect();
        let booked = crate::settle::already_booked(&mut *tx, &otns).await?;
        to_mark = pending
            .into_iter()
            .filter(|e| booked.contains(&e.out_trade_no))
            .collect();
        sqlx::query(
            "UPDATE accounts SET balance_cents = balance_cents + ?, withdrawn_cents = withdrawn_cents - ?, version = version + 1 WHERE user_id = ?",
        )
        .bind(current.amount_cents)
        .bind(current.amount_cents)
        .bind(user.get())
        .execute(&mut *tx)
        .await?;
        sqlx::query(
            "INSERT INTO ledger_entries (user_id, out_trade_no, kind, amount_cents, at_ms) VALUES (?, ?, 'reversal', ?, ?)",
        )
        .bind(user.get())
        .bind(format!("rv_{id}"))
        .bind(current.amount_cents)
        .bind(now_ms())
        .execute(&mut *tx)
        .await?;
        if let Some(a) = accounts.get_mut(&user.get()) {
            a.balance_cents += current.amount_cents;
            a.withdrawn_cents -= current.amount_cents;
            a.version += 1;
            snapshot = Some(*a);
        }
    }
    sqlx::query("UPDATE withdrawals SET status = ? WHERE id = ?")
        .bind(status)
        .bind(id)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    if let Some(account) = snapshot {
        if let Err(err) = app.marker.mark(&app.redis, &to_mark, &[account]).await {
            tracing::warn!(error = %err, "updating the account snapshot after a reversal failed");
        }
    }
    Ok(Withdrawal {
        status: status.to_string(),
        ..current
    })
}

async fn result(
    State(app): State<AppState>,
    Caller(caller): Caller,
    Path(id): Path<String>,
    JsonBody(body): JsonBody<PayoutResult>,
) -> ApiResult<Json<Withdrawal>> {
    // Only the payout channel may post results; with no caller named, nobody may.
    let allowed = &app.settings.auth.payout_callers;
    if !allowed.contains(&caller) {
        return Err(ApiError::Forbidden(format!(
            "caller `{caller}` may not post payout results"
        )));
    }
    Ok(Json(settle_payout(&app, &id, &body.status).await?))
}
