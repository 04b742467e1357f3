//! The ledger: the one writer of `ledger_entries` and `accounts`, in MySQL.
//!
//! - [`Ledger::book`] / [`Ledger::book_in_tx`]: awards into the ledger, crediting
//!   accounts (the worker, the sweep, forced settlement before a withdrawal).
//! - [`Ledger::settle_and_move_out`]: a withdrawal or a red packet sent, with the
//!   forced settlement of the user's pending tokens; [`Ledger::reverse`] and
//!   [`Ledger::move_back`]: money given back.
//! - [`read`]: what views, reconciliation and the issuing path read back.
//!
//! Invariant (no double credit): a token's amount enters a balance only together with
//! the insert of its ledger row, and `ledger_entries.out_trade_no` is unique. Account
//! rows are locked in user id order, which serialises bookers of the same user: first,
//! where the change depends on what the user holds (a debit, a forced settlement, a
//! batch with a token booked before); after the ledger rows, in the same statement that
//! credits them, where the batch is new (a row booked meanwhile fails its insert on the
//! unique key, and the batch takes the locking path).
//!
//! Deadlocks are possible and harmless: a new batch holds its ledger rows' key locks
//! before its accounts', a locking path the accounts' first, and InnoDB also takes gap
//! locks on inserts. InnoDB picks a victim and rolls it back whole (1213); a lock-wait
//! timeout (1205) undoes only the statement, so every caller drops the transaction on
//! either ([`LedgerError::is_retryable`]): withdrawals and packet operations run it
//! again at once, the worker and the sweep leave the tokens pending for their next
//! pass, a reversal or a redemption answers 503 to its caller, who retries.
//!
//! Accounts are read back with `INSERT … RETURNING` on MariaDB 10.5+, and with a
//! `SELECT … FOR UPDATE` after the insert on MySQL 8 ([`Db::returning`]).
//!
//! Invariant (exact Redis-only view): an account snapshot written to Redis never
//! includes a token still marked pending there. The users' token statuses are read
//! *after* their account rows are locked, when every earlier booker of theirs has
//! committed; whatever of those is in the ledger is marked settled together with the
//! snapshot (mark.lua), so snapshot + pending counts each token once. A change that is
//! not booking pending tokens (a debit, a reversal) puts a fence up before its transaction
//! and lifts it with its snapshot ([`crate::tokens::Fence`]); while it is up, views read
//! MySQL.

mod book;
pub mod read;

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;

use sqlx::{MySql, QueryBuilder, Row, Transaction};

use crate::domain::{Cents, UserId};
use crate::error::Error;
use crate::store::{bucket_of, Db};
use crate::tokens::{AwardEntry, Fence, Snapshot, Tokens};

pub use crate::tokens::Totals;
pub use read::{AccountRow, FlowRow};

/// The ledger over every MySQL shard. Cheap to clone.
#[derive(Clone)]
pub struct Ledger {
    db: Arc<Db>,
    tokens: Tokens,
}

/// An account row as locked and updated inside a transaction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Account {
    pub user: UserId,
    pub balance_cents: i64,
    pub total_income_cents: i64,
    pub withdrawn_cents: i64,
    pub version: i64,
}

impl Account {
    /// Credits `cents` of awards to the balance and the income (not the version).
    fn credit(&mut self, cents: i64) -> Result<(), LedgerError> {
        let overflow = LedgerError::Overflow("credit overflows a 64-bit balance");
        self.balance_cents = self.balance_cents.checked_add(cents).ok_or(overflow)?;
        self.total_income_cents = self
            .total_income_cents
            .checked_add(cents)
            .ok_or(LedgerError::Overflow("income overflows"))?;
        Ok(())
    }

    /// Moves `amount` from the balance to the withdrawn total (not the version); never
    /// below zero.
    fn move_out(&mut self, amount: Cents) -> Result<(), LedgerError> {
        self.balance_cents = self
            .balance_cents
            .checked_sub(amount.get())
            .filter(|b| *b >= 0)
            .ok_or(LedgerError::Overflow(
                "a debit never makes a balance negative",
            ))?;
        self.withdrawn_cents = self
            .withdrawn_cents
            .checked_add(amount.get())
            .ok_or(LedgerError::Overflow("withdrawn total overflows"))?;
        Ok(())
    }

    /// The snapshot the Redis-only view reads after this account's commit.
    pub fn snapshot(&self) -> Snapshot {
        self.snapshot_lifting(None)
    }

    /// [`Account::snapshot`] that lifts `fence` once stored.
    pub fn snapshot_lifting(&self, fence: Option<Fence>) -> Snapshot {
        Snapshot {
            user: self.user,
            version: self.version,
            balance_cents: self.balance_cents,
            total_income_cents: self.total_income_cents,
            withdrawn_cents: self.withdrawn_cents,
            lifts: fence.map(|f| f.0),
        }
    }
}

/// How a fenced change to an account ended ([`Ledger::end_fence`]).
pub enum ChangeEnd {
    /// Committed: the account as committed, and the tokens to mark with its snapshot.
    Committed(Account, Vec<AwardEntry>),
    /// Rolled back: nothing changed.
    RolledBack,
    /// Unknown (an error after the transaction began, perhaps a lost answer to COMMIT):
    /// the account as it is now, read under its lock, lifts the fence.
    InDoubt,
}

/// A move of money out of an account (a withdrawal, a red packet sent) and its ledger
/// row ([`Ledger::settle_and_move_out`]).
pub struct MoveOut<'a> {
    pub amount: Cents,
    /// The row's kind: `withdraw`, `packet_send`.
    pub kind: &'a str,
    /// The row's unique key (`wd_{id}`, `ps_{id}`).
    pub out_trade_no: &'a str,
    pub at_ms: i64,
}

/// A forced settlement and move out, done in the transaction ([`MovedOut::Done`]).
#[derive(Debug)]
pub struct Moved {
    /// The account as it will be committed.
    pub account: Account,
    /// How many pending tokens this transaction booked (the others were in the ledger).
    pub newly_booked: usize,
    /// The tokens to mark settled with the account's snapshot after the commit.
    pub to_mark: Vec<AwardEntry>,
}

/// How [`Ledger::settle_and_move_out`] ended.
pub enum MovedOut {
    /// Booked and moved out in the transaction.
    Done(Moved),
    /// The balance, with every pending token booked, is short of the amount; nothing was
    /// written.
    Insufficient,
}

#[derive(Debug, Default)]
pub struct Booked {
    /// Entries whose ledger row this transaction inserted.
    pub newly_booked: Vec<AwardEntry>,
    /// The accounts touched, as they will be after commit.
    pub accounts: Vec<Account>,
    /// Every token to mark settled after the commit: the entries given (booked now or
    /// before), a forced settlement's pending tokens, and the locked users' other pending
    /// tokens the ledger already holds.
    pub to_mark: Vec<AwardEntry>,
}

impl Booked {
    pub fn snapshots(&self) -> Vec<Snapshot> {
        self.accounts.iter().map(Account::snapshot).collect()
    }
}

/// A ledger failure: the transaction rolled back (MySQL) or could not read the users'
/// tokens (Redis).
#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    #[error("mysql: {0}")]
    Sql(#[from] sqlx::Error),
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("{0}")]
    Overflow(&'static str),
    /// An entry that can never be booked as it is (a coupon naming no template).
    #[error("{0}")]
    Unbookable(String),
    /// The shard does not own the user's bucket (being moved, or moved away and this
    /// instance's map is stale; the map has been read again).
    #[error("bucket {0} is not on this shard (moving, or moved)")]
    Moved(u16),
}

impl LedgerError {
    /// A deadlock (the transaction was rolled back) or a lock-wait timeout (the statement
    /// was): the caller drops the transaction and may run it again.
    pub fn is_retryable(&self) -> bool {
        matches!(self, LedgerError::Sql(err) if is_retryable(err))
    }

    /// The data itself cannot be booked (too long, out of range, not allowed): trying
    /// again cannot help.
    pub fn is_data_error(&self) -> bool {
        match self {
            LedgerError::Sql(err) => is_data_error(err),
            LedgerError::Overflow(_) | LedgerError::Unbookable(_) => true,
            LedgerError::Redis(_) | LedgerError::Moved(_) => false,
        }
    }
}

/// A ledger failure as the service answers it: a database or Redis fault as such (an
/// outage or not), a moving bucket as an outage to retry.
impl From<LedgerError> for Error {
    fn from(err: crate::ledger::LedgerError) -> Self {
        match err {
            LedgerError::Sql(e) => e.into(),
            LedgerError::Redis(e) => e.into(),
            LedgerError::Overflow(what) => Error::internal(what),
            LedgerError::Unbookable(what) => Error::internal(what),
            LedgerError::Moved(bucket) => Error::Unavailable(format!(
                "this user's ledger is moving between database shards (bucket {bucket}); retry in a moment"
            )),
        }
    }
}

/// A deadlock (1213, the transaction rolled back) or a lock-wait timeout (1205, the
/// statement undone): the transaction is to be dropped, and may be run again.
pub fn is_retryable(err: &sqlx::Error) -> bool {
    err.as_database_error()
        .and_then(|e| e.try_downcast_ref::<sqlx::mysql::MySqlDatabaseError>())
        .is_some_and(|e| matches!(e.number(), 1213 | 1205))
}

/// Data exceptions and constraint failures other than a duplicate key.
fn is_data_error(err: &sqlx::Error) -> bool {
    err.as_database_error()
        .and_then(|e| e.code())
        .is_some_and(|state| {
            state.starts_with("22") || (state.starts_with("23") && state != "23000")
        })
        || err
            .as_database_error()
            .and_then(|e| e.try_downcast_ref::<sqlx::mysql::MySqlDatabaseError>())
            .is_some_and(|e| matches!(e.number(), 1048 | 1264 | 1366 | 1406 | 3819))
}

/// A duplicate key: the row is there already.
pub(crate) fn is_duplicate(err: &sqlx::Error) -> bool {
    err.as_database_error()
        .and_then(|e| e.try_downcast_ref::<sqlx::mysql::MySqlDatabaseError>())
        .is_some_and(|e| e.number() == 1062)
}

/// The columns an account is read with, in the order [`read_accounts`] takes them.
const ACCOUNT_COLUMNS: &str =
    "user_id, balance_cents, total_income_cents, withdrawn_cents, version";

/// The account rows of `users` (sorted, distinct), each as `ACCOUNT_COLUMNS`: every one
/// of them, or an error (a statement that should have created the row did not).
fn read_accounts(
    rows: &[sqlx::mysql::MySqlRow],
    users: &[UserId],
) -> Result<BTreeMap<UserId, Account>, LedgerError> {
    let mut accounts = BTreeMap::new();
    for row in rows {
        let user = UserId::parse(row.try_get(0)?).map_err(|e| sqlx::Error::Decode(Box::new(e)))?;
        let account = Account {
            user,
            balance_cents: row.try_get(1)?,
            total_income_cents: row.try_get(2)?,
            withdrawn_cents: row.try_get(3)?,
            version: row.try_get(4)?,
        };
        accounts.insert(user, account);
    }
    if accounts.len() != users.len() || users.iter().any(|u| !accounts.contains_key(u)) {
        return Err(LedgerError::Sql(sqlx::Error::Protocol(format!(
            "{} account rows read back for {} users",
            accounts.len(),
            users.len()
        ))));
    }
    Ok(accounts)
}

/// Runs `upsert` (an `INSERT INTO accounts … ON DUPLICATE KEY UPDATE …` of every one of
/// `users`, sorted and distinct) in `tx` and reads the rows back as it left them, locked:
/// by `RETURNING` where the shard's server has it, by a `SELECT … FOR UPDATE` after it on
/// MySQL 8 ([`Db::returning`]). `tx` is on `shard` (as [`Ledger::own_buckets`] read it).
async fn upsert_accounts(
    db: &Db,
    shard: usize,
    tx: &mut Transaction<'_, MySql>,
    mut upsert: QueryBuilder<'_, MySql>,
    users: &[UserId],
) -> Result<BTreeMap<UserId, Account>, LedgerError> {
    if !db.returning(shard, tx).await? {
        upsert.build().execute(&mut **tx).await?;
        return select_accounts(tx, users).await;
    }
    upsert.push(format!(" RETURNING {ACCOUNT_COLUMNS}"));
    let rows = upsert.build().fetch_all(&mut **tx).await?;
    read_accounts(&rows, users)
}

/// Reads the account rows of `users` (sorted, distinct) in `tx`, locked: the second
/// statement where the server has no `INSERT … RETURNING` (MySQL 8).
async fn select_accounts(
    tx: &mut Transaction<'_, MySql>,
    users: &[UserId],
) -> Result<BTreeMap<UserId, Account>, LedgerError> {
    let mut q = QueryBuilder::<MySql>::new(format!(
        "SELECT {ACCOUNT_COLUMNS} FROM accounts WHERE user_id IN ("
    ));
    let mut list = q.separated(", ");
    for u in users {
        list.push_bind(u.get());
    }
    q.push(") ORDER BY user_id FOR UPDATE");
    let rows = q.build().fetch_all(&mut **tx).await?;
    read_accounts(&rows, users)
}

/// A text column under a binary collation (the ledger's keys), which the driver hands
/// over as bytes.
pub fn text(row: &sqlx::mysql::MySqlRow, index: usize) -> Result<String, sqlx::Error> {
    let bytes: Vec<u8> = row.try_get(index)?;
    String::from_utf8(bytes).map_err(|e| sqlx::Error::Decode(Box::new(e)))
}

/// [`text`] of a nullable column.
pub fn text_opt(row: &sqlx::mysql::MySqlRow, index: usize) -> Result<Option<String>, sqlx::Error> {
    let bytes: Option<Vec<u8>> = row.try_get(index)?;
    bytes
        .map(|b| String::from_utf8(b).map_err(|e| sqlx::Error::Decode(Box::new(e))))
        .transpose()
}

impl Ledger {
    pub fn new(db: Arc<Db>, tokens: Tokens) -> Self {
        Self { db, tokens }
    }

    pub fn db(&self) -> &Db {
        &self.db
    }

    /// Checks, under a shared lock held to the end of `tx`, that this shard owns the
    /// buckets of `users`: a move of one of them waits for this transaction, and starts
    /// after it; a bucket not owned here is refused (and the map read again). Returns
    /// the index of the shard `tx` is on, as its database names itself
    /// (`shard_identity`), whatever this instance's map says; `None` for no users.
    pub async fn own_buckets(
        &self,
        tx: &mut Transaction<'_, MySql>,
        users: &[UserId],
    ) -> Result<Option<usize>, LedgerError> {
        let mut buckets: Vec<u16> = users.iter().map(|u| bucket_of(*u)).collect();
        buckets.sort_unstable();
        buckets.dedup();
        if buckets.is_empty() {
            return Ok(None);
        }
        let mut q = QueryBuilder::<MySql>::new(
            "SELECT b.bucket, s.shard FROM bucket_owner b JOIN shard_identity s ON s.id = 1 \
             WHERE b.owned = 1 AND b.bucket IN (",
        );
        let mut list = q.separated(", ");
        for b in &buckets {
            list.push_bind(*b);
        }
        q.push(") LOCK IN SHARE MODE");
        let rows = q.build().fetch_all(&mut **tx).await?;
        let mut owned: Vec<u16> = Vec::with_capacity(rows.len());
        let mut shard: Option<u16> = None;
        for row in &rows {
            owned.push(row.try_get(0)?);
            shard = Some(row.try_get(1)?);
        }
        if let Some(missing) = buckets.iter().find(|b| !owned.contains(b)) {
            if let Err(err) = self.db.refresh_map().await {
                tracing::warn!(
                    error = format!("{err:#}"),
                    "reading the shard map again failed"
                );
            }
            return Err(LedgerError::Moved(*missing));
        }
        Ok(shard.map(usize::from))
    }

    /// Creates (if needed), locks and reads the account rows of `users`, in user id
    /// order, in one statement, after checking this shard owns their buckets
    /// ([`Ledger::own_buckets`]).
    pub async fn lock_accounts(
        &self,
        tx: &mut Transaction<'_, MySql>,
        users: &[UserId],
    ) -> Result<BTreeMap<UserId, Account>, LedgerError> {
        Ok(self.lock_accounts_on(tx, users).await?.1)
    }

    /// [`Ledger::lock_accounts`], and the shard `tx` is on (`None` for no users).
    pub(super) async fn lock_accounts_on(
        &self,
        tx: &mut Transaction<'_, MySql>,
        users: &[UserId],
    ) -> Result<(Option<usize>, BTreeMap<UserId, Account>), LedgerError> {
        let Some(shard) = self.own_buckets(tx, users).await? else {
            return Ok((None, BTreeMap::new()));
        };
        let mut users = users.to_vec();
        users.sort_unstable();
        users.dedup();
        // ON DUPLICATE KEY UPDATE takes an exclusive lock on an existing row (INSERT
        // IGNORE would take a shared one, and two bookers of one user holding shared
        // locks would deadlock on the upgrade); the row is read back under that lock.
        let mut insert = QueryBuilder::<MySql>::new("INSERT INTO accounts (user_id) ");
        insert.push_values(&users, |mut b, u| {
            b.push_bind(u.get());
        });
        insert.push(" ON DUPLICATE KEY UPDATE user_id = user_id");
        let accounts = upsert_accounts(&self.db, shard, tx, insert, &users).await?;
        Ok((Some(shard), accounts))
    }

    /// Under `user`'s account lock in `tx`: the tokens to mark with a snapshot of that
    /// account, i.e. those still pending in Redis that the ledger already holds (see
    /// the module comment; read after the lock, when every earlier booker committed).
    pub async fn booked_pending(
        &self,
        tx: &mut Transaction<'_, MySql>,
        user: UserId,
    ) -> Result<Vec<AwardEntry>, LedgerError> {
        let pending = self.tokens.pending_of_users(&[user]).await?;
        let otns: Vec<&str> = pending.iter().map(|e| e.out_trade_no.as_str()).collect();
        let booked = Self::already_booked(&mut **tx, &otns).await?;
        Ok(pending
            .into_iter()
            .filter(|e| booked.contains(&e.out_trade_no))
            .collect())
    }

    /// Takes down `fence` as its change ended (see [`crate::tokens::Fence`]), best
    /// effort: a fence left up only keeps the user's views on MySQL.
    pub async fn end_fence(&self, user: UserId, fence: Fence, end: ChangeEnd) {
        let (result, what) = match end {
            // If this fails, the worker marks the tokens when it reaches their stream
            // entries; nothing is credited twice either way.
            ChangeEnd::Committed(account, to_mark) => (
                self.mark_lifting(&account, &to_mark, Some(fence)).await,
                "writing the account snapshot after a commit",
            ),
            ChangeEnd::RolledBack => (
                self.tokens
                    .unfence(user, &fence)
                    .await
                    .map_err(LedgerError::from),
                "taking a view fence down",
            ),
            ChangeEnd::InDoubt => (
                self.refresh_snapshot(user, fence).await,
                "refreshing the account snapshot",
            ),
        };
        if let Err(err) = result {
            tracing::warn!(error = %err, user = user.get(), "{what} failed; views of this user stay on mysql");
        }
    }

    /// Writes `user`'s snapshot from the account as it is now (read under its lock,
    /// so a transaction that held the lock has ended, committed or not) and lifts
    /// `fence` with it: what a fenced change does when it cannot tell whether its
    /// transaction committed.
    pub async fn refresh_snapshot(&self, user: UserId, fence: Fence) -> Result<(), LedgerError> {
        self.rewrite_snapshot(user, Some(fence)).await
    }

    /// [`Ledger::refresh_snapshot`], lifting `fence` if there is one.
    async fn rewrite_snapshot(
        &self,
        user: UserId,
        fence: Option<Fence>,
    ) -> Result<(), LedgerError> {
        let mut tx = self.db.for_user(user).begin().await?;
        let mut accounts = self.lock_accounts(&mut tx, &[user]).await?;
        let to_mark = self.booked_pending(&mut tx, user).await?;
        tx.commit().await?;
        let account = accounts.remove(&user).ok_or(sqlx::Error::RowNotFound)?;
        self.mark_lifting(&account, &to_mark, fence).await
    }

    /// Moves the snapshots still kept in the hash of earlier releases (`acct:`) into their
    /// users' status hashes, for a fleet that runs only this release
    /// (`wallet.snapshot_compat` off): each account is read under its lock and its
    /// snapshot written, and mark.lua drops the old hash (one holding a fence is left to
    /// the release that put it up). Those users' views come back to Redis without waiting
    /// for their next booking. Returns how many hashes were moved and how many are left.
    pub async fn move_legacy_snapshots(&self) -> Result<(u64, u64), LedgerError> {
        let redis = self.tokens.redis();
        let users = redis.legacy_snapshot_users().await?;
        for &user in &users {
            if let Err(err) = self.rewrite_snapshot(user, None).await {
                tracing::warn!(error = %err, user = user.get(), "moving an account snapshot failed");
            }
        }
        let left = redis.legacy_snapshot_users().await?.len() as u64;
        Ok(((users.len() as u64).saturating_sub(left), left))
    }

    /// Marks `to_mark` settled with `account`'s snapshot, which lifts `fence` if any.
    async fn mark_lifting(
        &self,
        account: &Account,
        to_mark: &[AwardEntry],
        fence: Option<Fence>,
    ) -> Result<(), LedgerError> {
        let snapshot = account.snapshot_lifting(fence);
        self.tokens.mark(to_mark, &[snapshot], &[]).await?;
        Ok(())
    }

    /// Which of `out_trade_nos` the ledger already holds.
    pub async fn already_booked<'e, E>(
        executor: E,
        out_trade_nos: &[&str],
    ) -> Result<HashSet<String>, sqlx::Error>
    where
        E: sqlx::Executor<'e, Database = MySql>,
    {
        if out_trade_nos.is_empty() {
            return Ok(HashSet::new());
        }
        let mut q = QueryBuilder::<MySql>::new(
            "SELECT out_trade_no FROM ledger_entries WHERE out_trade_no IN (",
        );
        let mut list = q.separated(", ");
        for otn in out_trade_nos {
            list.push_bind(*otn);
        }
        q.push(")");
        let rows = q.build().fetch_all(executor).await?;
        rows.iter().map(|r| text(r, 0)).collect()
    }

    /// Gives a failed withdrawal's money back to a locked account, with a `reversal`
    /// ledger row (`rv_{id}`).
    pub async fn reverse(
        tx: &mut Transaction<'_, MySql>,
        account: &mut Account,
        amount: Cents,
        withdrawal_id: &str,
        at_ms: i64,
    ) -> Result<(), LedgerError> {
        let row = format!("rv_{withdrawal_id}");
        Self::move_back(tx, account, amount, "reversal", &row, at_ms).await
    }

    /// Gives back money a [`Ledger::settle_and_move_out`] took (a failed withdrawal, a red
    /// packet's unclaimed remainder), with a ledger row of `kind` under the unique
    /// `out_trade_no`: a second give-back of the same row is refused by the ledger's
    /// unique key.
    pub async fn move_back(
        tx: &mut Transaction<'_, MySql>,
        account: &mut Account,
        amount: Cents,
        kind: &str,
        out_trade_no: &str,
        at_ms: i64,
    ) -> Result<(), LedgerError> {
        let cents = amount.get();
        let balance = account
            .balance_cents
            .checked_add(cents)
            .ok_or(LedgerError::Overflow("balance overflows"))?;
        write_withdrawal_row(tx, account.user, cents, kind, out_trade_no, at_ms).await?;
        account.balance_cents = balance;
        account.withdrawn_cents -= cents;
        account.version += 1;
        Ok(())
    }
}

/// Moves `delta` cents between a locked account's balance and its withdrawn total (a
/// debit is negative, a reversal positive) and writes the ledger row that says so.
async fn write_withdrawal_row(
    tx: &mut Transaction<'_, MySql>,
    user: UserId,
    delta: i64,
    kind: &str,
    out_trade_no: &str,
    at_ms: i64,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE accounts SET balance_cents = balance_cents + ?, withdrawn_cents = withdrawn_cents - ?, version = version + 1 WHERE user_id = ?",
    )
    .bind(delta)
    .bind(delta)
    .bind(user.get())
    .execute(&mut **tx)
    .await?;
    sqlx::query(
        "INSERT INTO ledger_entries (user_id, out_trade_no, kind, amount_cents, at_ms) VALUES (?, ?, ?, ?, ?)",
    )
    .bind(user.get())
    .bind(out_trade_no)
    .bind(kind)
    .bind(delta)
    .bind(at_ms)
    .execute(&mut **tx)
    .await?;
    Ok(())
}
