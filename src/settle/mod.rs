//! Booking: writing tokens into the MySQL ledger and crediting accounts.
//!
//! [`book_in_tx`] is the one booking routine; the worker, forced settlement before a
//! withdrawal, the cron sweep and the synchronous baseline of the benchmark all call it.
//!
//! Invariant (no double credit): a token's amount enters a balance only together with
//! the insert of its ledger row, and `ledger_entries.out_trade_no` is unique. Account
//! rows are locked first (in user id order, so two bookers cannot deadlock on them),
//! which serialises bookers of the same user; the unique key backs that up.
//!
//! Invariant (exact Redis-only view): an account snapshot written to Redis never
//! includes a token still marked pending there. The users' token statuses are read
//! *after* their account rows are locked, when every earlier booker of theirs has
//! committed; whatever of those is in the ledger is marked settled together with the
//! snapshot (mark.lua), so the degraded view (snapshot + pending) counts each token once.

pub mod worker;

use std::collections::{BTreeMap, HashSet};

use redis::Script;
use sqlx::{MySql, QueryBuilder, Row, Transaction};

use crate::domain::UserId;
use crate::store::{evalsha, hour_of, now_ms, Redis, SETTLE_GROUP};
use crate::tokens::TRIMMED;

/// One award to book.
#[derive(Debug, Clone, PartialEq)]
pub struct AwardEntry {
    pub user: UserId,
    pub out_trade_no: String,
    pub amount_cents: i64,
    pub activity_id: String,
    pub scene_id: String,
    /// The token's issue time; the ledger orders flows by it.
    pub at_ms: i64,
    /// The settlement stream entry this came from, if any.
    pub stream_id: Option<String>,
    /// The budget generation its money was taken from.
    pub budget_gen: i64,
}

/// An account row as locked and updated inside a booking transaction.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Account {
    pub user_id: i64,
    pub balance_cents: i64,
    pub total_income_cents: i64,
    pub withdrawn_cents: i64,
    pub version: i64,
}

#[derive(Debug, Default)]
pub struct Booked {
    /// Entries whose ledger row this transaction inserted.
    pub newly_booked: Vec<AwardEntry>,
    /// The accounts touched, as they will be after commit.
    pub accounts: Vec<Account>,
    /// Every token to mark settled after the commit: the entries given (booked now or
    /// before), the forced user's pending tokens, and the locked users' other pending
    /// tokens the ledger already holds.
    pub to_mark: Vec<AwardEntry>,
}

/// A booking failure: the transaction rolled back (MySQL) or could not read the
/// users' tokens (Redis).
#[derive(Debug, thiserror::Error)]
pub enum BookError {
    #[error("mysql: {0}")]
    Sql(#[from] sqlx::Error),
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
}

impl BookError {
    /// Deadlocks and lock-wait timeouts roll the whole transaction back; it may be retried.
    pub fn is_retryable(&self) -> bool {
        matches!(self, BookError::Sql(err) if is_retryable(err))
    }

    /// The data itself cannot be booked (too long, out of range, not allowed): trying
    /// again cannot help.
    pub fn is_data_error(&self) -> bool {
        let BookError::Sql(err) = self else {
            return false;
        };
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
}

/// Deadlocks and lock-wait timeouts roll the whole transaction back; it may be retried.
pub fn is_retryable(err: &sqlx::Error) -> bool {
    err.as_database_error()
        .and_then(|e| e.try_downcast_ref::<sqlx::mysql::MySqlDatabaseError>())
        .is_some_and(|e| matches!(e.number(), 1213 | 1205))
}

/// Creates (if needed) and locks the account rows of `users`, in user id order.
pub async fn lock_accounts(
    tx: &mut Transaction<'_, MySql>,
    users: &[i64],
) -> Result<BTreeMap<i64, Account>, sqlx::Error> {
    let mut accounts = BTreeMap::new();
    if users.is_empty() {
        return Ok(accounts);
    }
    // ON DUPLICATE KEY UPDATE takes an exclusive lock on an existing row, where INSERT
    // IGNORE would take a shared one that the FOR UPDATE below must then upgrade: two
    // bookers of one user holding shared locks would deadlock on that upgrade.
    let mut insert = QueryBuilder::<MySql>::new("INSERT INTO accounts (user_id) ");
    insert.push_values(users, |mut b, u| {
        b.push_bind(*u);
    });
    insert.push(" ON DUPLICATE KEY UPDATE user_id = user_id");
    insert.build().execute(&mut **tx).await?;
    let mut select = QueryBuilder::<MySql>::new(
        "SELECT user_id, balance_cents, total_income_cents, withdrawn_cents, version FROM accounts WHERE user_id IN (",
    );
    let mut list = select.separated(", ");
    for u in users {
        list.push_bind(*u);
    }
    select.push(") ORDER BY user_id FOR UPDATE");
    for row in select.build().fetch_all(&mut **tx).await? {
        let account = Account {
            user_id: row.try_get(0)?,
            balance_cents: row.try_get(1)?,
            total_income_cents: row.try_get(2)?,
            withdrawn_cents: row.try_get(3)?,
            version: row.try_get(4)?,
        };
        accounts.insert(account.user_id, account);
    }
    Ok(accounts)
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

/// Books `entries` inside `tx`: inserts the ledger rows the ledger does not hold yet and
/// credits each account by exactly what was inserted for it. With `force`, that user's
/// pending tokens (read after the lock) are booked too: a withdrawal's forced settlement.
pub async fn book_in_tx(
    tx: &mut Transaction<'_, MySql>,
    redis: &Redis,
    entries: &[AwardEntry],
    force: Option<UserId>,
) -> Result<Booked, BookError> {
    let mut users: Vec<i64> = entries.iter().map(|e| e.user.get()).collect();
    users.extend(force.map(UserId::get));
    users.sort_unstable();
    users.dedup();
    if users.is_empty() {
        return Ok(Booked::default());
    }
    let mut accounts = lock_accounts(tx, &users).await?;

    // After the locks: every earlier booker of these users has committed.
    let pending = crate::tokens::pending_of_users(redis, &users).await?;
    let mut all: Vec<AwardEntry> = entries.to_vec();
    let mut in_all: HashSet<String> = all.iter().map(|e| e.out_trade_no.clone()).collect();
    let mut extras: Vec<AwardEntry> = Vec::new();
    for candidate in pending {
        if in_all.contains(&candidate.out_trade_no) {
            continue;
        }
        if Some(candidate.user) == force {
            in_all.insert(candidate.out_trade_no.clone());
            all.push(candidate);
        } else {
            extras.push(candidate);
        }
    }
    let otns: Vec<&str> = all
        .iter()
        .chain(&extras)
        .map(|e| e.out_trade_no.as_str())
        .collect();
    let mut known = already_booked(&mut **tx, &otns).await?;
    let mut to_mark: Vec<AwardEntry> = extras
        .into_iter()
        .filter(|e| known.contains(&e.out_trade_no))
        .collect();
    let mut newly: Vec<AwardEntry> = Vec::new();
    for e in &all {
        // `insert` also drops a second copy of one token inside the same batch.
        if known.insert(e.out_trade_no.clone()) {
            newly.push(e.clone());
        }
    }
    if !newly.is_empty() {
        let tokens = crate::tokens::token_bytes(redis, &newly).await?;
        let mut insert = QueryBuilder::<MySql>::new(
            "INSERT INTO ledger_entries (user_id, out_trade_no, kind, amount_cents, activity_id, scene_id, at_ms, budget_gen, token) ",
        );
        insert.push_values(newly.iter().zip(&tokens), |mut b, (e, token)| {
            b.push_bind(e.user.get())
                .push_bind(&e.out_trade_no)
                .push_bind("award")
                .push_bind(e.amount_cents)
                .push_bind(&e.activity_id)
                .push_bind(&e.scene_id)
                .push_bind(e.at_ms)
                .push_bind(e.budget_gen)
                .push_bind(token.as_deref().filter(|t| *t != TRIMMED));
        });
        insert.build().execute(&mut **tx).await?;

        let mut credit: BTreeMap<i64, i64> = BTreeMap::new();
        for e in &newly {
            debug_assert!(e.amount_cents > 0, "awards are positive");
            let c = credit.entry(e.user.get()).or_default();
            *c = c
                .checked_add(e.amount_cents)
                .ok_or_else(|| sqlx::Error::Protocol("credit overflows a 64-bit balance".into()))?;
        }
        let mut update = QueryBuilder::<MySql>::new(
            "INSERT INTO accounts (user_id, balance_cents, total_income_cents) ",
        );
        update.push_values(&credit, |mut b, (user, cents)| {
            b.push_bind(*user).push_bind(*cents).push_bind(*cents);
        });
        update.push(
            " ON DUPLICATE KEY UPDATE balance_cents = balance_cents + VALUES(balance_cents), \
             total_income_cents = total_income_cents + VALUES(total_income_cents), version = version + 1",
        );
        update.build().execute(&mut **tx).await?;
        for (user, cents) in credit {
            if let Some(a) = accounts.get_mut(&user) {
                a.balance_cents += cents;
                a.total_income_cents += cents;
                a.version += 1;
            }
        }
    }
    to_mark.extend(all);
    Ok(Booked {
        newly_booked: newly,
        accounts: accounts.into_values().collect(),
        to_mark,
    })
}

/// Books `entries` in one transaction per MySQL shard.
pub async fn book(
    db: &crate::store::Db,
    redis: &Redis,
    entries: &[AwardEntry],
) -> Result<Booked, BookError> {
    let mut by_shard: BTreeMap<usize, Vec<AwardEntry>> = BTreeMap::new();
    for e in entries {
        by_shard
            .entry(db.shard_index(e.user))
            .or_default()
            .push(e.clone());
    }
    let mut all = Booked::default();
    for (shard, part) in by_shard {
        let mut tx = db.shard(shard).begin().await?;
        let booked = book_in_tx(&mut tx, redis, &part, None).await?;
        tx.commit().await?;
        all.newly_booked.extend(booked.newly_booked);
        all.accounts.extend(booked.accounts);
        all.to_mark.extend(booked.to_mark);
    }
    Ok(all)
}

/// After a commit: marks the tokens settled in Redis, acknowledges and deletes their
/// stream entries, and stores the account snapshots, one script call per partition.
pub struct Marker {
    script: Script,
}

impl Default for Marker {
    fn default() -> Self {
        Self {
            script: Script::new(include_str!("mark.lua")),
        }
    }
}

impl Marker {
    pub fn script(&self) -> &Script {
        &self.script
    }

    pub async fn mark(
        &self,
        redis: &Redis,
        entries: &[AwardEntry],
        accounts: &[Account],
    ) -> redis::RedisResult<u64> {
        let mut by_partition: BTreeMap<u32, (Vec<&AwardEntry>, Vec<&Account>)> = BTreeMap::new();
        for e in entries {
            by_partition
                .entry(redis.partition_of(e.user))
                .or_default()
                .0
                .push(e);
        }
        for a in accounts {
            if let Ok(user) = UserId::parse(a.user_id) {
                by_partition
                    .entry(redis.partition_of(user))
                    .or_default()
                    .1
                    .push(a);
            }
        }
        let now = now_ms();
        let mut pipe = redis::pipe();
        for (p, (es, accs)) in &by_partition {
            let mut keys: Vec<String> = vec![redis.settled_index_key(*p), redis.stream_key(*p)];
            let mut args: Vec<String> = vec![
                now.to_string(),
                SETTLE_GROUP.to_string(),
                es.len().to_string(),
                accs.len().to_string(),
            ];
            for e in es {
                keys.push(redis.status_key(e.user));
                keys.push(redis.counters_key(*p, &e.activity_id));
                args.push(e.out_trade_no.clone());
                args.push(hour_of(e.at_ms));
                args.push(e.amount_cents.to_string());
                args.push(e.user.to_string());
                args.push(e.stream_id.clone().unwrap_or_default());
                args.push(e.budget_gen.to_string());
            }
            for a in accs {
                keys.push(redis.snapshot_key(UserId::parse(a.user_id).expect("filtered above")));
                args.push(a.version.to_string());
                args.push(a.balance_cents.to_string());
                args.push(a.total_income_cents.to_string());
                args.push(a.withdrawn_cents.to_string());
            }
            let key_refs: Vec<&str> = keys.iter().map(String::as_str).collect();
            let mut cmd = evalsha(&self.script, &key_refs);
            cmd.arg(&args);
            pipe.add_command(cmd);
        }
        if by_partition.is_empty() {
            return Ok(0);
        }
        let changed: Vec<u64> = crate::store::query_scripted(redis, &pipe, &[&self.script]).await?;
        Ok(changed.iter().sum())
    }
}
