//! What the rest of the service reads back from the ledger: an account with the
//! booked subset of a user's pending tokens (the exact view), flow rows, the signed
//! token of a booked award, and per-activity totals (reconciliation, budget release).

use std::collections::{BTreeMap, HashSet};

use sqlx::{MySql, QueryBuilder, Row};

use super::{text, text_opt, Ledger, LedgerError};
use crate::domain::UserId;
use crate::store::bucket_of;
use crate::tokens::Totals;

/// How long a scan over every shard waits for moves to end: 50 × 100 ms.
const STABLE_ATTEMPTS: usize = 50;

/// A user's account as the view reads it, with which of the asked out_trade_nos the
/// ledger holds, from one statement (so one consistent read).
#[derive(Debug, Default)]
pub struct AccountRow {
    pub balance_cents: i64,
    pub total_income_cents: i64,
    pub withdrawn_cents: i64,
    pub booked: HashSet<String>,
}

/// One ledger row as the flow list shows it.
#[derive(Debug, Clone)]
pub struct FlowRow {
    pub out_trade_no: String,
    pub kind: String,
    pub amount_cents: i64,
    pub activity_id: Option<String>,
    pub scene_id: Option<String>,
    pub at_ms: i64,
}

impl Ledger {
    /// The account of `user` and which of `candidates` the ledger holds, in one
    /// statement. No account row means nothing of this user is booked yet (booking
    /// creates the row in the same transaction as the ledger rows).
    pub async fn account_with(
        &self,
        user: UserId,
        candidates: &[&str],
    ) -> Result<AccountRow, LedgerError> {
        match self.account_once(user, candidates).await {
            // The map was stale or the bucket is moving: read it again, try once more.
            Err(LedgerError::Moved(_)) => self.account_once(user, candidates).await,
            other => other,
        }
    }

    async fn account_once(
        &self,
        user: UserId,
        candidates: &[&str],
    ) -> Result<AccountRow, LedgerError> {
        // One statement, so one consistent read, that also says whether this shard
        // owns the user's bucket (a shard that moved it away may have deleted its rows).
        let mut q = QueryBuilder::<MySql>::new(
            "SELECT a.balance_cents, a.total_income_cents, a.withdrawn_cents, ",
        );
        if candidates.is_empty() {
            q.push("NULL");
        } else {
            // out_trade_no never holds a comma; group_concat_max_len is raised per
            // connection (store.rs) so the list cannot be cut short.
            q.push("(SELECT GROUP_CONCAT(out_trade_no SEPARATOR ',') FROM ledger_entries WHERE out_trade_no IN (");
            let mut list = q.separated(", ");
            for c in candidates {
                list.push_bind(*c);
            }
            q.push("))");
        }
        q.push(", (SELECT owned FROM bucket_owner WHERE bucket = ")
            .push_bind(bucket_of(user))
            .push(") FROM (SELECT 1) AS one LEFT JOIN accounts a ON a.user_id = ")
            .push_bind(user.get());
        let row = q.build().fetch_one(self.db.for_user(user)).await?;
        // Owned, or paused for a move (its rows are all still here).
        if !matches!(row.try_get::<Option<i8>, _>(4)?, Some(1 | 2)) {
            let _ = self.db.refresh_map().await;
            return Err(LedgerError::Moved(bucket_of(user)));
        }
        // No account row means nothing of this user is booked yet.
        let mut account = AccountRow {
            balance_cents: row.try_get::<Option<i64>, _>(0)?.unwrap_or(0),
            total_income_cents: row.try_get::<Option<i64>, _>(1)?.unwrap_or(0),
            withdrawn_cents: row.try_get::<Option<i64>, _>(2)?.unwrap_or(0),
            booked: HashSet::new(),
        };
        if let Some(list) = text_opt(&row, 3)? {
            account.booked.extend(list.split(',').map(str::to_string));
        }
        Ok(account)
    }

    /// Up to `limit` rows of `user`, newest first by (time, out_trade_no), strictly
    /// before `cursor` when given.
    pub async fn flows(
        &self,
        user: UserId,
        limit: u32,
        cursor: Option<&(i64, String)>,
    ) -> Result<Vec<FlowRow>, LedgerError> {
        match self.flows_once(user, limit, cursor).await {
            Err(LedgerError::Moved(_)) => self.flows_once(user, limit, cursor).await,
            other => other,
        }
    }

    async fn flows_once(
        &self,
        user: UserId,
        limit: u32,
        cursor: Option<&(i64, String)>,
    ) -> Result<Vec<FlowRow>, LedgerError> {
        // One snapshot for the ownership check and the rows.
        let mut tx = self.db.for_user(user).begin().await?;
        let owned: Option<i8> =
            sqlx::query_scalar("SELECT owned FROM bucket_owner WHERE bucket = ?")
                .bind(bucket_of(user))
                .fetch_optional(&mut *tx)
                .await?;
        if !matches!(owned, Some(1 | 2)) {
            let _ = self.db.refresh_map().await;
            return Err(LedgerError::Moved(bucket_of(user)));
        }
        let mut q = QueryBuilder::<MySql>::new(
            "SELECT out_trade_no, kind, amount_cents, activity_id, scene_id, at_ms FROM ledger_entries WHERE kind <> 'coupon' AND user_id = ",
        );
        q.push_bind(user.get());
        if let Some((at, otn)) = cursor {
            q.push(" AND (at_ms < ")
                .push_bind(*at)
                .push(" OR (at_ms = ")
                .push_bind(*at);
            q.push(" AND out_trade_no < ")
                .push_bind(otn.clone())
                .push("))");
        }
        q.push(" ORDER BY at_ms DESC, out_trade_no DESC LIMIT ")
            .push_bind(i64::from(limit));
        let rows = q.build().fetch_all(&mut *tx).await?;
        tx.commit().await?;
        let flows = rows
            .iter()
            .map(|row| {
                Ok(FlowRow {
                    out_trade_no: text(row, 0)?,
                    kind: row.try_get(1)?,
                    amount_cents: row.try_get(2)?,
                    activity_id: text_opt(row, 3)?,
                    scene_id: text_opt(row, 4)?,
                    at_ms: row.try_get(5)?,
                })
            })
            .collect::<Result<_, sqlx::Error>>()?;
        Ok(flows)
    }

    /// Which of `user`'s `out_trade_nos` the ledger holds.
    pub async fn booked_of(
        &self,
        user: UserId,
        out_trade_nos: &[&str],
    ) -> Result<HashSet<String>, sqlx::Error> {
        Self::already_booked(self.db.for_user(user), out_trade_nos).await
    }

    /// The ledger row of an award: `None` when the ledger has no such award, `Some(None)`
    /// when it has the award but not its signed token.
    pub async fn token_of(
        &self,
        user: UserId,
        out_trade_no: &str,
    ) -> Result<Option<Option<Vec<u8>>>, sqlx::Error> {
        let row: Option<(Option<Vec<u8>>,)> =
            sqlx::query_as("SELECT token FROM ledger_entries WHERE out_trade_no = ?")
                .bind(out_trade_no)
                .fetch_optional(self.db.for_user(user))
                .await?;
        Ok(row.map(|(t,)| t))
    }

    /// The out_trade_nos of booked awards (cash and coupons: each has its ledger row)
    /// that begin with one of `prefixes` (plain text: `_` and `%` are escaped here), over
    /// every shard. One statement per shard; each prefix is a range of the unique
    /// out_trade_no key.
    pub async fn awards_beginning(&self, prefixes: &[String]) -> Result<Vec<String>, sqlx::Error> {
        if prefixes.is_empty() {
            return Ok(Vec::new());
        }
        let patterns: Vec<String> = prefixes
            .iter()
            .map(|p| {
                let escaped = p
                    .replace('\\', "\\\\")
                    .replace('%', "\\%")
                    .replace('_', "\\_");
                format!("{escaped}%")
            })
            .collect();
        self.stable(|| async {
            let mut out = Vec::new();
            for shard in self.db.shards() {
                let mut q =
                    QueryBuilder::<MySql>::new("SELECT out_trade_no FROM ledger_entries WHERE ");
                let mut any = q.separated(" OR ");
                for pattern in &patterns {
                    any.push("out_trade_no LIKE ")
                        .push_bind_unseparated(pattern);
                }
                let rows = q.build().fetch_all(shard).await?;
                for row in &rows {
                    out.push(text(row, 0)?);
                }
            }
            Ok(out)
        })
        .await
    }

    /// Runs a scan over every shard again until no bucket moved during it (a moving
    /// bucket's rows may be counted twice or not at all). One shard: at once.
    pub(crate) async fn stable<T, F, Fut>(&self, scan: F) -> Result<T, sqlx::Error>
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = Result<T, sqlx::Error>>,
    {
        if self.db.shards().len() == 1 {
            return scan().await;
        }
        for _ in 0..STABLE_ATTEMPTS {
            let before = self.db.moves().await?;
            if before.0 == 0 {
                let out = scan().await?;
                if self.db.moves().await? == before {
                    return Ok(out);
                }
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        // An outage to callers (503: try again), like any wait on a moving bucket.
        Err(sqlx::Error::Io(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            "ledger scan: buckets kept moving between shards; try again",
        )))
    }

    /// Awards of `activity` in the ledger, over every shard; within `[start, end)` ms if
    /// given.
    pub async fn totals(
        &self,
        activity: &str,
        window: Option<(i64, i64)>,
    ) -> Result<Totals, sqlx::Error> {
        self.stable(|| self.totals_once(activity, window)).await
    }

    async fn totals_once(
        &self,
        activity: &str,
        window: Option<(i64, i64)>,
    ) -> Result<Totals, sqlx::Error> {
        let (start, end) = window.unwrap_or((i64::MIN, i64::MAX));
        let mut totals = Totals::default();
        for pool in self.db.shards() {
            let row = sqlx::query(
                "SELECT COUNT(*), CAST(COALESCE(SUM(amount_cents), 0) AS SIGNED) FROM ledger_entries WHERE activity_id = ? AND kind IN ('award', 'coupon') AND at_ms >= ? AND at_ms < ?",
            )
            .bind(activity)
            .bind(start)
            .bind(end)
            .fetch_one(pool)
            .await?;
            totals.count += row.try_get::<i64, _>(0)?;
            totals.cents += row.try_get::<i64, _>(1)?;
        }
        Ok(totals)
    }

    /// Awards of `activity` in the ledger per budget generation, over every shard.
    pub async fn totals_by_gen(
        &self,
        activity: &str,
    ) -> Result<BTreeMap<i64, Totals>, sqlx::Error> {
        let mut out: BTreeMap<i64, Totals> = BTreeMap::new();
        for pool in self.db.shards() {
            let rows: Vec<(i64, i64, i64)> = sqlx::query_as(
                "SELECT budget_gen, COUNT(*), CAST(COALESCE(SUM(amount_cents), 0) AS SIGNED) FROM ledger_entries WHERE activity_id = ? AND kind IN ('award', 'coupon') GROUP BY budget_gen",
            )
            .bind(activity)
            .fetch_all(pool)
            .await?;
            for (gen, count, cents) in rows {
                let t = out.entry(gen).or_default();
                t.count += count;
                t.cents += cents;
            }
        }
        Ok(out)
    }
}
