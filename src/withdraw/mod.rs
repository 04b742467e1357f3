//! Withdrawals: forced settlement, then debit, in one MySQL transaction; and the payout
//! channel's verdict. This module owns the `withdrawals` rows ([`repo`]); the money
//! moves through the ledger.
//!
//! Invariants: a balance never goes negative (checked under the account lock, and by
//! the table's CHECK constraint); a `(user, request_id)` debits at most once (its unique
//! key, met under the account lock); the user's pending tokens are booked under the
//! ledger's unique key on `out_trade_no`, as the worker books them, so a token raced by
//! both is credited once.

mod repo;

use std::sync::Arc;

use serde::Serialize;

use crate::domain::{Cents, RequestId, UserId, WithdrawalStatus};
use crate::error::{Error, Result};
use crate::events::{self, EventType, NewEvent};
use crate::ledger::{is_duplicate, Account, ChangeEnd, Ledger, LedgerError, MoveOut, MovedOut};
use crate::store::{now_ms, Db};
use crate::tokens::{AwardEntry, Tokens};

#[derive(Debug, Clone, Serialize, PartialEq, utoipa::ToSchema)]
pub struct Withdrawal {
    pub withdrawal_id: String,
    pub user_id: i64,
    pub request_id: String,
    pub amount_cents: i64,
    /// submitted, paid or failed.
    #[schema(value_type = String)]
    pub status: WithdrawalStatus,
    /// Pending tokens booked first.
    pub forced_settled_count: i64,
    pub balance_cents: i64,
    pub created_at: chrono::DateTime<chrono::Utc>,
}

/// A withdrawal as answered: newly created, or the one a repeated request made before.
pub enum Outcome {
    Created(Withdrawal),
    Existing(Withdrawal),
}

/// The withdrawal capability. Cheap to clone.
#[derive(Clone)]
pub struct Withdrawals {
    db: Arc<Db>,
    ledger: Ledger,
    tokens: Tokens,
}

/// Transaction attempts at most when InnoDB rolls one back (deadlock, lock wait).
const MAX_TX_ATTEMPTS: u32 = 6;

/// What a committed withdrawal leaves for Redis: the account and the tokens to mark.
type Committed = (Account, Vec<AwardEntry>);

fn new_withdrawal_id() -> String {
    format!("wd{:011x}{:08x}", now_ms(), rand::random::<u32>())
}

fn check_same(existing: Withdrawal, amount: Cents) -> Result<Outcome> {
    if existing.amount_cents == amount.get() {
        Ok(Outcome::Existing(existing))
    } else {
        Err(Error::IdempotencyConflict(format!(
            "request_id `{}` was used for {} cents",
            existing.request_id, existing.amount_cents
        )))
    }
}

impl Withdrawals {
    pub fn new(db: Arc<Db>, ledger: Ledger, tokens: Tokens) -> Self {
        Self { db, ledger, tokens }
    }

    /// Books the user's pending tokens and debits `amount`, or changes nothing.
    pub async fn withdraw(
        &self,
        user: UserId,
        request_id: &RequestId,
        amount: Cents,
    ) -> Result<Outcome> {
        // Views go to MySQL while the debit may be committed and its snapshot not yet
        // written (see `tokens::Fence`).
        let fence = self.tokens.fence(user).await?;
        // A deadlock with a booker of the same user (see `ledger`'s module comment) or
        // a lock-wait timeout fails the transaction, which is dropped and retried, a
        // bounded number of times.
        let mut attempt = 0;
        let (created, (account, to_mark)) = loop {
            attempt += 1;
            match self.withdraw_tx(user, request_id, amount).await {
                Ok(Ok((Outcome::Created(w), Some(committed)))) => break (w, committed),
                Ok(result) => {
                    self.ledger
                        .end_fence(user, fence, ChangeEnd::RolledBack)
                        .await;
                    return result.map(|(outcome, _)| outcome);
                }
                Err(err) if attempt < MAX_TX_ATTEMPTS && err.is_retryable() => {
                    crate::metrics::tx_retry("withdraw");
                    let jitter = rand::random::<u64>() % 10;
                    tokio::time::sleep(std::time::Duration::from_millis((5 << attempt) + jitter))
                        .await;
                }
                Err(err) => {
                    self.ledger.end_fence(user, fence, ChangeEnd::InDoubt).await;
                    return Err(err.into());
                }
            }
        };
        // Redis catches up after the commit: the force-settled tokens and the snapshot.
        self.ledger
            .end_fence(user, fence, ChangeEnd::Committed(account, to_mark))
            .await;
        Ok(Outcome::Created(created))
    }

    /// One attempt at the withdrawal transaction. Business outcomes are `Ok(..)`; the
    /// outer `Err` is a database error (the transaction rolled back). On success the
    /// account as committed comes back, for the Redis snapshot, with the tokens to mark.
    ///
    /// Eight round trips when it goes through, in the common case: `BEGIN`, the ledger's
    /// four (bucket check, lock, rows, account; see [`Ledger::settle_and_move_out`]), the
    /// withdrawal, its event, `COMMIT`. The request id is checked by the
    /// unique key on `(user_id, request_id)`, under the account lock: a twin that got the
    /// lock first has committed when this insert meets its row.
    async fn withdraw_tx(
        &self,
        user: UserId,
        request_id: &RequestId,
        amount: Cents,
    ) -> Result<Result<(Outcome, Option<Committed>)>, LedgerError> {
        let mut tx = self.db.for_user(user).begin().await?;
        let id = new_withdrawal_id();
        let at = now_ms();
        let out = MoveOut {
            amount,
            kind: "withdraw",
            out_trade_no: &format!("wd_{id}"),
            at_ms: at,
        };
        // Books every token of the user pending in Redis (read after the lock, so none
        // booked by a concurrent booker is missed) and debits, or writes nothing.
        let moved = match self.ledger.settle_and_move_out(&mut tx, user, &out).await? {
            MovedOut::Done(moved) => moved,
            MovedOut::Insufficient => {
                // A repeat of a withdrawal the balance covered then is answered with it.
                let existing = repo::find_by_request(&mut *tx, user, request_id).await?;
                tx.rollback().await?;
                return Ok(match existing {
                    Some(existing) => check_same(existing, amount).map(|o| (o, None)),
                    None => Err(Error::InsufficientBalance),
                });
            }
        };
        let account = moved.account;
        let created = Withdrawal {
            withdrawal_id: id,
            user_id: user.get(),
            request_id: request_id.to_string(),
            amount_cents: amount.get(),
            status: WithdrawalStatus::Submitted,
            forced_settled_count: moved.newly_booked as i64,
            balance_cents: account.balance_cents,
            created_at: chrono::DateTime::from_timestamp_millis(at).unwrap_or_default(),
        };
        match repo::insert(&mut *tx, &created).await {
            Ok(()) => {}
            Err(err) if is_duplicate(&err) => {
                // A twin committed first: rolling back undoes this attempt's forced
                // booking too; the twin's booking stands.
                tx.rollback().await?;
                let existing = repo::find_by_request(self.db.for_user(user), user, request_id)
                    .await?
                    .ok_or(sqlx::Error::RowNotFound)?;
                return Ok(check_same(existing, amount).map(|o| (o, None)));
            }
            Err(err) => return Err(err.into()),
        }
        // The payout channel's cue to pay, written with the debit or not at all.
        let data = event_data(&created);
        events::record(
            &mut tx,
            &NewEvent::withdrawal(
                EventType::WithdrawalSubmitted,
                &created.withdrawal_id,
                &data,
            ),
        )
        .await?;
        tx.commit().await?;
        Ok(Ok((
            Outcome::Created(created),
            Some((account, moved.to_mark)),
        )))
    }

    /// The withdrawal `id` and the shard holding it.
    pub async fn find(&self, id: &str) -> Result<Option<(usize, Withdrawal)>> {
        for (i, pool) in self.db.shards().iter().enumerate() {
            if let Some(w) = repo::find_by_id(pool, id).await? {
                return Ok(Some((i, w)));
            }
        }
        Ok(None)
    }

    /// The payout channel's verdict. `paid` is final; `failed` gives the money back with
    /// a reversal entry. Repeating a verdict changes nothing; changing one is refused.
    pub async fn settle_payout(&self, id: &str, verdict: WithdrawalStatus) -> Result<Withdrawal> {
        if verdict == WithdrawalStatus::Submitted {
            return Err(Error::InvalidRequest(
                "status must be paid or failed".into(),
            ));
        }
        let (shard, _) = self
            .find(id)
            .await?
            .ok_or_else(|| Error::NotFound(format!("no withdrawal `{id}`")))?;
        let mut tx = self.db.shard(shard).begin().await?;
        let current = repo::lock_by_id(&mut *tx, id)
            .await?
            .ok_or_else(|| Error::NotFound(format!("no withdrawal `{id}`")))?;
        let owner = UserId::parse(current.user_id)?;
        // The withdrawal row moves with its user's bucket: no verdict lands on a shard
        // that is handing the bucket over.
        self.ledger.own_buckets(&mut tx, &[owner]).await?;
        if current.status == verdict {
            tx.rollback().await?;
            return Ok(current);
        }
        if current.status != WithdrawalStatus::Submitted {
            tx.rollback().await?;
            return Err(Error::IdempotencyConflict(format!(
                "withdrawal `{id}` is already {}",
                current.status.as_str()
            )));
        }
        if verdict == WithdrawalStatus::Paid {
            let settled = record_verdict(&mut tx, current, verdict).await?;
            tx.commit().await?;
            return Ok(settled);
        }
        // A reversal changes the account: the same fence as a withdrawal's debit. The
        // transaction read so far is given up, so that the fence is up before it begins.
        tx.rollback().await?;
        let fence = self.tokens.fence(owner).await?;
        let (end, result) = match self.reverse_tx(shard, id, owner).await {
            Ok(Ok((settled, Some((account, to_mark))))) => {
                (ChangeEnd::Committed(account, to_mark), Ok(settled))
            }
            // Rolled back: the twin verdict landed first, or a conflict.
            Ok(result) => (ChangeEnd::RolledBack, result.map(|(settled, _)| settled)),
            Err(err) => (ChangeEnd::InDoubt, Err(err.into())),
        };
        self.ledger.end_fence(owner, fence, end).await;
        result
    }

    /// The reversal of a failed withdrawal, checked again under the locks: the
    /// withdrawal is still `submitted` (a concurrent verdict may have landed since).
    async fn reverse_tx(
        &self,
        shard: usize,
        id: &str,
        user: UserId,
    ) -> Result<Result<(Withdrawal, Option<Committed>)>, LedgerError> {
        let verdict = WithdrawalStatus::Failed;
        let mut tx = self.db.shard(shard).begin().await?;
        let Some(current) = repo::lock_by_id(&mut *tx, id).await? else {
            return Ok(Err(Error::NotFound(format!("no withdrawal `{id}`"))));
        };
        self.ledger.own_buckets(&mut tx, &[user]).await?;
        if current.status != WithdrawalStatus::Submitted {
            tx.rollback().await?;
            return Ok(if current.status == verdict {
                Ok((current, None))
            } else {
                Err(Error::IdempotencyConflict(format!(
                    "withdrawal `{id}` is already {}",
                    current.status.as_str()
                )))
            });
        }
        let amount = match Cents::positive(current.amount_cents, "amount_cents") {
            Ok(amount) => amount,
            Err(err) => return Ok(Err(err.into())),
        };
        let mut accounts = self.ledger.lock_accounts(&mut tx, &[user]).await?;
        // The snapshot written after the commit includes every token booked so far;
        // those still pending in Redis are marked with it (see `ledger`), so the
        // Redis-only view never counts one twice.
        let to_mark = self.ledger.booked_pending(&mut tx, user).await?;
        let account = accounts.get_mut(&user).ok_or(sqlx::Error::RowNotFound)?;
        Ledger::reverse(&mut tx, account, amount, id, now_ms()).await?;
        let settled = record_verdict(&mut tx, current, verdict).await?;
        tx.commit().await?;
        Ok(Ok((settled, Some((*account, to_mark)))))
    }
}

/// Writes the payout channel's final verdict on `current` and its event, in `tx`.
async fn record_verdict(
    tx: &mut sqlx::Transaction<'_, sqlx::MySql>,
    current: Withdrawal,
    verdict: WithdrawalStatus,
) -> Result<Withdrawal, LedgerError> {
    repo::set_status(&mut **tx, &current.withdrawal_id, verdict).await?;
    let settled = Withdrawal {
        status: verdict,
        ..current
    };
    let kind = if verdict == WithdrawalStatus::Paid {
        EventType::WithdrawalPaid
    } else {
        EventType::WithdrawalFailed
    };
    let data = event_data(&settled);
    events::record(
        tx,
        &NewEvent::withdrawal(kind, &settled.withdrawal_id, &data),
    )
    .await?;
    Ok(settled)
}

/// What a withdrawal event carries: the withdrawal as the API shows it.
fn event_data(w: &Withdrawal) -> serde_json::Value {
    serde_json::json!({
        "withdrawal_id": w.withdrawal_id,
        "user_id": w.user_id,
        "request_id": w.request_id,
        "amount_cents": w.amount_cents,
        "status": w.status.as_str(),
        "created_at": w.created_at,
    })
}
