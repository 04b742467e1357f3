//! The `withdrawals` rows.

use sqlx::{MySql, Row};

use super::Withdrawal;
use crate::domain::{RequestId, UserId, WithdrawalStatus};

const COLUMNS: &str =
    "id, user_id, request_id, amount_cents, status, forced_settled_count, balance_after_cents, created_at";

fn from_row(row: &sqlx::mysql::MySqlRow) -> Result<Withdrawal, sqlx::Error> {
    let status: String = row.try_get(4)?;
    Ok(Withdrawal {
        withdrawal_id: row.try_get(0)?,
        user_id: row.try_get(1)?,
        request_id: String::from_utf8_lossy(&row.try_get::<Vec<u8>, _>(2)?).into_owned(),
        amount_cents: row.try_get(3)?,
        status: status
            .parse::<WithdrawalStatus>()
            .map_err(|e| sqlx::Error::Decode(Box::new(e)))?,
        forced_settled_count: i64::from(row.try_get::<i32, _>(5)?),
        balance_cents: row.try_get(6)?,
        created_at: row.try_get::<chrono::NaiveDateTime, _>(7)?.and_utc(),
    })
}

pub async fn find_by_request<'e, E: sqlx::Executor<'e, Database = MySql>>(
    executor: E,
    user: UserId,
    request_id: &RequestId,
) -> Result<Option<Withdrawal>, sqlx::Error> {
    sqlx::query(&format!(
        "SELECT {COLUMNS} FROM withdrawals WHERE user_id = ? AND request_id = ?"
    ))
    .bind(user.get())
    .bind(request_id.as_str().as_bytes())
    .fetch_optional(executor)
    .await?
    .as_ref()
    .map(from_row)
    .transpose()
}

pub async fn find_by_id<'e, E: sqlx::Executor<'e, Database = MySql>>(
    executor: E,
    id: &str,
) -> Result<Option<Withdrawal>, sqlx::Error> {
    by_id(executor, id, "").await
}

/// [`find_by_id`], locking the row for the transaction.
pub async fn lock_by_id<'e, E: sqlx::Executor<'e, Database = MySql>>(
    executor: E,
    id: &str,
) -> Result<Option<Withdrawal>, sqlx::Error> {
    by_id(executor, id, " FOR UPDATE").await
}

async fn by_id<'e, E: sqlx::Executor<'e, Database = MySql>>(
    executor: E,
    id: &str,
    lock: &str,
) -> Result<Option<Withdrawal>, sqlx::Error> {
    sqlx::query(&format!(
        "SELECT {COLUMNS} FROM withdrawals WHERE id = ?{lock}"
    ))
    .bind(id)
    .fetch_optional(executor)
    .await?
    .as_ref()
    .map(from_row)
    .transpose()
}

pub async fn insert<'e, E: sqlx::Executor<'e, Database = MySql>>(
    executor: E,
    w: &Withdrawal,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO withdrawals (id, user_id, request_id, amount_cents, status, forced_settled_count, balance_after_cents, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
    )
    .bind(&w.withdrawal_id)
    .bind(w.user_id)
    .bind(w.request_id.as_bytes())
    .bind(w.amount_cents)
    .bind(w.status.as_str())
    .bind(w.forced_settled_count as i32)
    .bind(w.balance_cents)
    .bind(w.created_at.naive_utc())
    .execute(executor)
    .await?;
    Ok(())
}

pub async fn set_status<'e, E: sqlx::Executor<'e, Database = MySql>>(
    executor: E,
    id: &str,
    status: WithdrawalStatus,
) -> Result<(), sqlx::Error> {
    sqlx::query("UPDATE withdrawals SET status = ? WHERE id = ?")
        .bind(status.as_str())
        .bind(id)
        .execute(executor)
        .await?;
    Ok(())
}
