//! Moving a bucket of users between MySQL shards, safely:
//!
//! 1. **Pause.** The map marks the bucket moving, and the source shard pauses it
//!    (`bucket_owner.owned = 2`: readable, not writable). That update waits for every transaction holding the
//!    bucket's shared lock (every ledger transaction takes one, see
//!    `Ledger::own_buckets`) and keeps new ones out: bookings and withdrawals of the
//!    bucket's users are answered "moving, retry" until the move ends.
//! 2. **Copy** the bucket's accounts, ledger rows, withdrawals, coupons, and the red
//!    packets its users sent (with their shares) to the target, in one transaction (rows a crashed earlier attempt left there are replaced).
//! 3. **Verify** counts, sums and a checksum of every row on both sides; a mismatch
//!    gives the bucket back to the source and stops.
//! 4. **Switch**: the target owns the bucket, the source gives it up (`owned = 0`:
//!    views there refuse it and read the map again), then the map sends it to the
//!    target.
//! 5. **Remove** the old rows; only then does the map say the move is over.
//!
//! A crash anywhere leaves the bucket paused or switched, never owned twice: the map
//! remembers where the move was going (`moving_to`), a second command can only finish
//! it there, and finishing clears the bucket from every other shard. One mover per
//! bucket: a named MySQL lock, checked again before every change of ownership.

use serde::Serialize;
use sqlx::{MySql, MySqlPool, QueryBuilder, Transaction};

use crate::packets::PACKET_COLUMNS;
use crate::store::{Db, BUCKETS};

/// `bucket_owner.owned`: the shard holds the bucket and takes its transactions...
pub const OWNED: i8 = 1;
/// ...holds it while it is copied away: views read it, nothing writes it...
pub const PAUSED: i8 = 2;
/// ...or does not hold it (any more, or yet).
pub const GONE: i8 = 0;

/// What a move did.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Moved {
    pub bucket: u16,
    pub from: u16,
    pub to: u16,
    pub accounts: i64,
    pub ledger_rows: i64,
    pub withdrawals: i64,
    pub coupons: i64,
    pub packets: i64,
    pub balance_cents: i64,
}

/// A bucket's rows on one shard, summed and checksummed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
struct Figures {
    accounts: i64,
    balance: i64,
    income: i64,
    withdrawn: i64,
    ledger: i64,
    ledger_cents: i64,
    ledger_sum: i64,
    withdrawals: i64,
    withdrawal_cents: i64,
    withdrawal_sum: i64,
    coupons: i64,
    coupon_sum: i64,
    packets: i64,
    packet_sum: i64,
    packet_shares: i64,
    packet_share_sum: i64,
}

/// Moves `bucket` to shard `to` (see the module comment).
pub async fn reshard(db: &Db, bucket: u16, to: usize) -> anyhow::Result<Moved> {
    anyhow::ensure!(bucket < BUCKETS, "bucket must be 0..{BUCKETS}");
    anyhow::ensure!(
        to < db.shards().len(),
        "shard {to} is not configured ({} shard(s): mysql.url and mysql.shard_urls)",
        db.shards().len()
    );
    let mut lock = db.main().acquire().await?;
    let name = format!("rpw-reshard-{bucket}");
    let got: Option<i64> = sqlx::query_scalar("SELECT GET_LOCK(?, 30)")
        .bind(&name)
        .fetch_one(&mut *lock)
        .await?;
    anyhow::ensure!(got == Some(1), "another move of bucket {bucket} is running");
    let mut mover = Mover {
        db,
        bucket,
        lock,
        name,
    };
    let result = mover.run(to as u16).await;
    let _ = sqlx::query("SELECT RELEASE_LOCK(?)")
        .bind(&mover.name)
        .execute(&mut *mover.lock)
        .await;
    db.refresh_map().await?;
    result
}

/// One move, holding the bucket's named lock on its own connection.
struct Mover<'a> {
    db: &'a Db,
    bucket: u16,
    lock: sqlx::pool::PoolConnection<MySql>,
    name: String,
}

impl Mover<'_> {
    /// Fencing: every step that changes ownership first checks the named lock is still
    /// this mover's (a dropped connection loses it, and another mover may have started).
    async fn still_ours(&mut self) -> anyhow::Result<()> {
        let ours: Option<i64> = sqlx::query_scalar("SELECT IS_USED_LOCK(?) = CONNECTION_ID()")
            .bind(&self.name)
            .fetch_one(&mut *self.lock)
            .await?;
        anyhow::ensure!(
            ours == Some(1),
            "lost the lock of bucket {}'s move; run the command again to finish it",
            self.bucket
        );
        Ok(())
    }

    async fn run(&mut self, to: u16) -> anyhow::Result<Moved> {
        let (db, bucket) = (self.db, self.bucket);
        let main = db.main();
        let (from, moving, moving_to): (u16, i8, Option<u16>) =
            sqlx::query_as("SELECT shard, moving, moving_to FROM shard_map WHERE bucket = ?")
                .bind(bucket)
                .fetch_one(main)
                .await?;
        if moving != 0 {
            // A move cut short is finished where it was going, never turned elsewhere.
            let going = moving_to.unwrap_or(from);
            anyhow::ensure!(
                going == to,
                "bucket {bucket} is being moved to shard {going}: finish that move first (reshard --bucket {bucket} --to {going})"
            );
        }
        let nothing = Moved {
            bucket,
            from,
            to,
            accounts: 0,
            ledger_rows: 0,
            withdrawals: 0,
            coupons: 0,
            packets: 0,
            balance_cents: 0,
        };
        if from == to {
            if moving != 0 {
                // Switched before a crash: only the clean-up is left.
                self.finish(to).await?;
            }
            return Ok(nothing);
        }
        let source = db.shard(usize::from(from));
        let target = db.shard(usize::from(to));
        if moving == 0 {
            // Packets of this bucket anywhere but its shard were left by a move that did
            // not carry packets yet: the copy and the clean-up would delete them.
            for (i, pool) in db.shards().iter().enumerate() {
                if i == usize::from(from) {
                    continue;
                }
                let stray: i64 =
                    sqlx::query_scalar("SELECT COUNT(*) FROM packets WHERE sender_id % 1024 = ?")
                        .bind(bucket)
                        .fetch_one(pool)
                        .await?;
                anyhow::ensure!(
                    stray == 0,
                    "bucket {bucket}: {stray} red packet(s) of its senders are on shard {i}, not on its shard {from}; move them there by hand first (nothing moved)"
                );
            }
        }
        // 1. Pause.
        sqlx::query("UPDATE shard_map SET moving = 1, moving_to = ? WHERE bucket = ?")
            .bind(to)
            .bind(bucket)
            .execute(main)
            .await?;
        self.still_ours().await?;
        set_owned(source, bucket, PAUSED).await?;
        // 2. Copy.
        copy(source, target, bucket).await?;
        // 3. Verify.
        let (before, after) = (
            figures(source, bucket).await?,
            figures(target, bucket).await?,
        );
        if before != after {
            self.still_ours().await?;
            clear(target, bucket).await?;
            set_owned(target, bucket, GONE).await?;
            set_owned(source, bucket, OWNED).await?;
            sqlx::query("UPDATE shard_map SET moving = 0, moving_to = NULL WHERE bucket = ?")
                .bind(bucket)
                .execute(main)
                .await?;
            anyhow::bail!(
                "bucket {bucket}: the copy on shard {to} does not match shard {from} ({after:?} against {before:?}); nothing moved"
            );
        }
        // 4. Switch: the target owns it, the source no longer (views there now refuse it
        // and read the map again), then the map sends it to the target.
        self.still_ours().await?;
        set_owned(target, bucket, OWNED).await?;
        set_owned(source, bucket, GONE).await?;
        sqlx::query(
            "UPDATE shard_map SET shard = ?, moved_at = CURRENT_TIMESTAMP(3) WHERE bucket = ?",
        )
        .bind(to)
        .bind(bucket)
        .execute(main)
        .await?;
        // 5. Remove.
        self.finish(to).await?;
        tracing::info!(
            bucket,
            from,
            to,
            accounts = before.accounts,
            ledger_rows = before.ledger,
            "bucket moved"
        );
        Ok(Moved {
            accounts: before.accounts,
            ledger_rows: before.ledger,
            withdrawals: before.withdrawals,
            coupons: before.coupons,
            packets: before.packets,
            balance_cents: before.balance,
            ..nothing
        })
    }

    /// Every shard but `owner` gives the bucket up and loses its rows; then the move ends.
    async fn finish(&mut self, owner: u16) -> anyhow::Result<()> {
        self.still_ours().await?;
        for (i, pool) in self.db.shards().iter().enumerate() {
            if i == usize::from(owner) {
                continue;
            }
            set_owned(pool, self.bucket, GONE).await?;
            clear(pool, self.bucket).await?;
        }
        sqlx::query("UPDATE shard_map SET moving = 0, moving_to = NULL WHERE bucket = ?")
            .bind(self.bucket)
            .execute(self.db.main())
            .await?;
        Ok(())
    }
}

/// Waits (as an exclusive lock) for the bucket's running transactions on that shard.
async fn set_owned(pool: &MySqlPool, bucket: u16, owned: i8) -> sqlx::Result<()> {
    sqlx::query(
        "INSERT INTO bucket_owner (bucket, owned) VALUES (?, ?) ON DUPLICATE KEY UPDATE owned = VALUES(owned)",
    )
    .bind(bucket)
    .bind(owned)
    .execute(pool)
    .await?;
    Ok(())
}

type AccountRow = (i64, i64, i64, i64, i64, chrono::NaiveDateTime);
type LedgerRow = (
    i64,
    Vec<u8>,
    String,
    i64,
    Option<Vec<u8>>,
    Option<Vec<u8>>,
    i64,
    chrono::NaiveDateTime,
    i64,
    Option<Vec<u8>>,
);
type WithdrawalRow = (
    String,
    i64,
    Vec<u8>,
    i64,
    String,
    i32,
    i64,
    chrono::NaiveDateTime,
);

/// A `coupons` row, every column (text columns as bytes: their collation is the
/// target's).
type CouponRow = (
    Vec<u8>,
    i64,
    Vec<u8>,
    i64,
    i64,
    i64,
    i64,
    i64,
    Vec<u8>,
    Option<Vec<u8>>,
    Option<Vec<u8>>,
    Option<i64>,
    Option<i64>,
    Option<i64>,
);

const COUPON_COLUMNS: &str = "out_trade_no, user_id, template_id, face_value_cents, min_spend_cents, valid_from_ms, valid_until_ms, issued_at_ms, state, used_by, used_request_id, used_order_cents, used_at_ms, expired_at_ms";

/// A `packets` row, every column (text as bytes).
type PacketRow = (
    Vec<u8>,
    i64,
    Vec<u8>,
    i64,
    i32,
    Vec<u8>,
    i32,
    i64,
    i64,
    Vec<u8>,
    i64,
    i64,
    Option<i64>,
);

/// A `packet_shares` row, every column.
type ShareRow = (Vec<u8>, i64, i32, i64, i64, Vec<u8>);

const SHARE_COLUMNS: &str = "packet_id, user_id, seq, amount_cents, opened_at_ms, token";

/// The tables holding a bucket's rows, each `user_id`-keyed.
const TABLES: [&str; 4] = ["ledger_entries", "withdrawals", "coupons", "accounts"];

/// The bucket's packets are those its users sent (`sender_id`); their shares (opened by
/// anyone) live beside them. Shares go first: they are found through their packet.
const PACKET_DELETES: [&str; 2] = [
    "DELETE s FROM packet_shares s JOIN packets p ON p.id = s.packet_id WHERE p.sender_id % 1024 = ?",
    "DELETE FROM packets WHERE sender_id % 1024 = ?",
];

/// Rows per insert statement.
const CHUNK: usize = 500;

async fn copy(source: &MySqlPool, target: &MySqlPool, bucket: u16) -> anyhow::Result<()> {
    let accounts: Vec<AccountRow> = sqlx::query_as(
        "SELECT user_id, balance_cents, total_income_cents, withdrawn_cents, version, created_at FROM accounts WHERE user_id % 1024 = ?",
    )
    .bind(bucket)
    .fetch_all(source)
    .await?;
    let ledger: Vec<LedgerRow> = sqlx::query_as(
        "SELECT user_id, out_trade_no, kind, amount_cents, activity_id, scene_id, at_ms, booked_at, budget_gen, token FROM ledger_entries WHERE user_id % 1024 = ?",
    )
    .bind(bucket)
    .fetch_all(source)
    .await?;
    let withdrawals: Vec<WithdrawalRow> = sqlx::query_as(
        "SELECT id, user_id, request_id, amount_cents, status, forced_settled_count, balance_after_cents, created_at FROM withdrawals WHERE user_id % 1024 = ?",
    )
    .bind(bucket)
    .fetch_all(source)
    .await?;
    let coupons: Vec<CouponRow> = sqlx::query_as(&format!(
        "SELECT {COUPON_COLUMNS} FROM coupons WHERE user_id % 1024 = ?"
    ))
    .bind(bucket)
    .fetch_all(source)
    .await?;
    let packets: Vec<PacketRow> = sqlx::query_as(&format!(
        "SELECT {PACKET_COLUMNS} FROM packets WHERE sender_id % 1024 = ?"
    ))
    .bind(bucket)
    .fetch_all(source)
    .await?;
    let shares: Vec<ShareRow> = sqlx::query_as(&format!(
        "SELECT {} FROM packet_shares s JOIN packets p ON p.id = s.packet_id WHERE p.sender_id % 1024 = ?",
        SHARE_COLUMNS
            .split(", ")
            .map(|c| format!("s.{c}"))
            .collect::<Vec<_>>()
            .join(", ")
    ))
    .bind(bucket)
    .fetch_all(source)
    .await?;
    let mut tx = target.begin().await?;
    sqlx::query(
        "INSERT INTO bucket_owner (bucket, owned) VALUES (?, 0) ON DUPLICATE KEY UPDATE owned = 0",
    )
    .bind(bucket)
    .execute(&mut *tx)
    .await?;
    delete_rows(&mut tx, bucket).await?;
    for chunk in packets.chunks(CHUNK) {
        let mut q = QueryBuilder::<MySql>::new(format!("INSERT INTO packets ({PACKET_COLUMNS}) "));
        q.push_values(chunk, |mut b, r| {
            b.push_bind(&r.0)
                .push_bind(r.1)
                .push_bind(&r.2)
                .push_bind(r.3)
                .push_bind(r.4)
                .push_bind(&r.5)
                .push_bind(r.6)
                .push_bind(r.7)
                .push_bind(r.8)
                .push_bind(&r.9)
                .push_bind(r.10)
                .push_bind(r.11)
                .push_bind(r.12);
        });
        q.build().execute(&mut *tx).await?;
    }
    for chunk in shares.chunks(CHUNK) {
        let mut q =
            QueryBuilder::<MySql>::new(format!("INSERT INTO packet_shares ({SHARE_COLUMNS}) "));
        q.push_values(chunk, |mut b, r| {
            b.push_bind(&r.0)
                .push_bind(r.1)
                .push_bind(r.2)
                .push_bind(r.3)
                .push_bind(r.4)
                .push_bind(&r.5);
        });
        q.build().execute(&mut *tx).await?;
    }
    for chunk in coupons.chunks(CHUNK) {
        let mut q = QueryBuilder::<MySql>::new(format!("INSERT INTO coupons ({COUPON_COLUMNS}) "));
        q.push_values(chunk, |mut b, r| {
            b.push_bind(&r.0)
                .push_bind(r.1)
                .push_bind(&r.2)
                .push_bind(r.3)
                .push_bind(r.4)
                .push_bind(r.5)
                .push_bind(r.6)
                .push_bind(r.7)
                .push_bind(&r.8)
                .push_bind(&r.9)
                .push_bind(&r.10)
                .push_bind(r.11)
                .push_bind(r.12)
                .push_bind(r.13);
        });
        q.build().execute(&mut *tx).await?;
    }
    for chunk in accounts.chunks(CHUNK) {
        let mut q = QueryBuilder::<MySql>::new(
            "INSERT INTO accounts (user_id, balance_cents, total_income_cents, withdrawn_cents, version, created_at) ",
        );
        q.push_values(chunk, |mut b, r| {
            b.push_bind(r.0)
                .push_bind(r.1)
                .push_bind(r.2)
                .push_bind(r.3)
                .push_bind(r.4)
                .push_bind(r.5);
        });
        q.build().execute(&mut *tx).await?;
    }
    for chunk in ledger.chunks(CHUNK) {
        let mut q = QueryBuilder::<MySql>::new(
            "INSERT INTO ledger_entries (user_id, out_trade_no, kind, amount_cents, activity_id, scene_id, at_ms, booked_at, budget_gen, token) ",
        );
        q.push_values(chunk, |mut b, r| {
            b.push_bind(r.0)
                .push_bind(&r.1)
                .push_bind(&r.2)
                .push_bind(r.3)
                .push_bind(&r.4)
                .push_bind(&r.5)
                .push_bind(r.6)
                .push_bind(r.7)
                .push_bind(r.8)
                .push_bind(&r.9);
        });
        q.build().execute(&mut *tx).await?;
    }
    for chunk in withdrawals.chunks(CHUNK) {
        let mut q = QueryBuilder::<MySql>::new(
            "INSERT INTO withdrawals (id, user_id, request_id, amount_cents, status, forced_settled_count, balance_after_cents, created_at) ",
        );
        q.push_values(chunk, |mut b, r| {
            b.push_bind(&r.0)
                .push_bind(r.1)
                .push_bind(&r.2)
                .push_bind(r.3)
                .push_bind(&r.4)
                .push_bind(r.5)
                .push_bind(r.6)
                .push_bind(r.7);
        });
        q.build().execute(&mut *tx).await?;
    }
    tx.commit().await?;
    Ok(())
}

/// Deletes the bucket's rows from one shard, in one transaction.
async fn clear(pool: &MySqlPool, bucket: u16) -> sqlx::Result<()> {
    let mut tx = pool.begin().await?;
    delete_rows(&mut tx, bucket).await?;
    tx.commit().await
}

/// Deletes every row of the bucket inside `tx` (a copy's target first, a source last).
async fn delete_rows(tx: &mut Transaction<'_, MySql>, bucket: u16) -> sqlx::Result<()> {
    for table in TABLES {
        sqlx::query(&format!("DELETE FROM {table} WHERE user_id % 1024 = ?"))
            .bind(bucket)
            .execute(&mut **tx)
            .await?;
    }
    for delete in PACKET_DELETES {
        sqlx::query(delete).bind(bucket).execute(&mut **tx).await?;
    }
    Ok(())
}

async fn figures(pool: &MySqlPool, bucket: u16) -> sqlx::Result<Figures> {
    let (accounts, balance, income, withdrawn): (i64, i64, i64, i64) = sqlx::query_as(
        "SELECT COUNT(*), CAST(COALESCE(SUM(balance_cents), 0) AS SIGNED), CAST(COALESCE(SUM(total_income_cents), 0) AS SIGNED), CAST(COALESCE(SUM(withdrawn_cents), 0) AS SIGNED) FROM accounts WHERE user_id % 1024 = ?",
    )
    .bind(bucket)
    .fetch_one(pool)
    .await?;
    let (ledger, ledger_cents, ledger_sum): (i64, i64, i64) = sqlx::query_as(
        "SELECT COUNT(*), CAST(COALESCE(SUM(amount_cents), 0) AS SIGNED), CAST(COALESCE(BIT_XOR(CRC32(CONCAT_WS('|', user_id, out_trade_no, kind, amount_cents, at_ms, budget_gen, COALESCE(activity_id, ''), COALESCE(scene_id, ''), COALESCE(HEX(token), '')))), 0) AS SIGNED) FROM ledger_entries WHERE user_id % 1024 = ?",
    )
    .bind(bucket)
    .fetch_one(pool)
    .await?;
    let (withdrawals, withdrawal_cents, withdrawal_sum): (i64, i64, i64) = sqlx::query_as(
        "SELECT COUNT(*), CAST(COALESCE(SUM(amount_cents), 0) AS SIGNED), CAST(COALESCE(BIT_XOR(CRC32(CONCAT_WS('|', id, user_id, HEX(request_id), amount_cents, status, balance_after_cents))), 0) AS SIGNED) FROM withdrawals WHERE user_id % 1024 = ?",
    )
    .bind(bucket)
    .fetch_one(pool)
    .await?;
    let (coupons, coupon_sum) = counted(
        pool,
        bucket,
        "coupons WHERE user_id % 1024 = ?",
        COUPON_COLUMNS,
        "",
    )
    .await?;
    let (packets, packet_sum) = counted(
        pool,
        bucket,
        "packets WHERE sender_id % 1024 = ?",
        PACKET_COLUMNS,
        "",
    )
    .await?;
    let (packet_shares, packet_share_sum) = counted(
        pool,
        bucket,
        "packet_shares s JOIN packets p ON p.id = s.packet_id WHERE p.sender_id % 1024 = ?",
        SHARE_COLUMNS,
        "s.",
    )
    .await?;
    Ok(Figures {
        packets,
        packet_sum,
        packet_shares,
        packet_share_sum,
        coupons,
        coupon_sum,
        accounts,
        balance,
        income,
        withdrawn,
        ledger,
        ledger_cents,
        ledger_sum,
        withdrawals,
        withdrawal_cents,
        withdrawal_sum,
    })
}

/// The bucket's rows of `rows` (a table and its filter on the bucket), counted and
/// checksummed over `columns`.
async fn counted(
    pool: &MySqlPool,
    bucket: u16,
    rows: &str,
    columns: &str,
    prefix: &str,
) -> sqlx::Result<(i64, i64)> {
    sqlx::query_as(&format!(
        "SELECT COUNT(*), {} FROM {rows}",
        checksum(columns, prefix)
    ))
    .bind(bucket)
    .fetch_one(pool)
    .await
}

/// A checksum of every listed column of every row (`prefix`: the table's alias).
fn checksum(columns: &str, prefix: &str) -> String {
    format!(
        "CAST(COALESCE(BIT_XOR(CRC32(CONCAT_WS('|', {}))), 0) AS SIGNED)",
        columns
            .split(", ")
            .map(|c| format!("COALESCE(HEX({prefix}{c}), '')"))
            .collect::<Vec<_>>()
            .join(", ")
    )
}
