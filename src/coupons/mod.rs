//! Coupon awards: templates with stock, coupons minted as signed tokens and booked by
//! the accounting worker, the user's list, redemption by merchants, expiry on time.
//!
//! - **Stock** is budgeted exactly like cash: a template owns a row in `activities` of
//!   kind `coupon` whose budget is its stock in units and whose cap is one unit, so its
//!   stock is granted to Redis sub-stocks from MySQL, polled at random, skipped when
//!   seen empty, and frozen in doubt when Redis loses it, by the budget code itself
//!   (`budget`). A coupon takes one unit.
//! - **A coupon** is an award token with `CouponTerms` and no cash. It is stored with
//!   the cash tokens (idempotent by out_trade_no), counted under its template, and
//!   booked by the worker as a ledger row of kind `coupon` (one unit) plus a `coupons`
//!   row holding its state, on the user's shard. Cash views never see it.
//! - **State**: `active`, then `used` (redeemed once, by one merchant request) or
//!   `expired` (the expiry job; a coupon past its validity counts as expired in every
//!   view and is refused at redemption even before the job reaches it).

mod redeem;
mod templates;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use serde::Serialize;
use sqlx::{MySql, QueryBuilder, Row, Transaction};

use crate::activity::ActivityCache;
use crate::budget::Budget;
use crate::domain::UserId;
use crate::error::Result;
use crate::ledger::{Ledger, LedgerError};
use crate::store::{Db, Redis};
use crate::tokens::{AwardEntry, Tokens};

pub use redeem::{Redeem, Redeemed};
pub use templates::{load as load_templates, NewTemplate, StockGauge, Template, TemplateFigures};

/// At most this many coupons are listed per user (the newest first).
pub const LIST_LIMIT: usize = 500;

/// Rows the expiry job changes per statement.
const EXPIRE_BATCH: i64 = 5_000;

/// The coupons capability. Cheap to clone.
#[derive(Clone)]
pub struct Coupons {
    db: Arc<Db>,
    redis: Arc<Redis>,
    tokens: Tokens,
    ledger: Ledger,
    budget: Arc<Budget>,
    cache: Arc<ActivityCache>,
}

/// A coupon's state as views show it: `active`, `used` or `expired`.
pub fn state_at(stored: &str, valid_until_ms: i64, now_ms: i64) -> &'static str {
    match stored {
        "used" => "used",
        "expired" => "expired",
        _ if now_ms >= valid_until_ms => "expired",
        _ => "active",
    }
}

/// One coupon of a user.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct CouponItem {
    pub out_trade_no: String,
    pub template_id: String,
    pub name: String,
    pub face_value_cents: i64,
    pub min_spend_cents: i64,
    pub valid_from_ms: i64,
    pub valid_until_ms: i64,
    pub issued_at_ms: i64,
    /// active, used or expired.
    pub state: &'static str,
    /// False while the coupon waits to be booked (it is in the user's list at once).
    pub booked: bool,
    pub used_at_ms: Option<i64>,
}

/// A user's coupons, the newest first, with counts per state.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct CouponList {
    pub user_id: i64,
    pub coupons: Vec<CouponItem>,
    pub active: usize,
    pub used: usize,
    pub expired: usize,
}

/// Books coupon entries inside a booking transaction (after their ledger rows were
/// inserted, so each is new): one `coupons` row each, its terms from its template
/// (templates never change; the token was minted from the same terms).
pub async fn book_in_tx(
    tx: &mut Transaction<'_, MySql>,
    db: &Db,
    entries: &[&AwardEntry],
) -> Result<(), LedgerError> {
    if entries.is_empty() {
        return Ok(());
    }
    let ids: HashSet<&str> = entries.iter().map(|e| e.activity_id.as_str()).collect();
    let templates = templates::load(db.main(), Some(&ids.into_iter().collect::<Vec<_>>())).await?;
    let by_id: HashMap<&str, &Template> = templates.iter().map(|t| (t.id.as_str(), t)).collect();
    let now = crate::store::now_ms();
    let mut insert = QueryBuilder::<MySql>::new(
        "INSERT INTO coupons (out_trade_no, user_id, template_id, face_value_cents, min_spend_cents, valid_from_ms, valid_until_ms, issued_at_ms, state, expired_at_ms) ",
    );
    let mut rows = Vec::with_capacity(entries.len());
    for e in entries {
        let template = by_id.get(e.activity_id.as_str()).ok_or_else(|| {
            LedgerError::Unbookable(format!(
                "coupon `{}` names no template `{}`",
                e.out_trade_no, e.activity_id
            ))
        })?;
        rows.push((*e, template.terms_at(e.at_ms, false)));
    }
    insert.push_values(&rows, |mut b, (e, terms)| {
        let expired = now >= terms.valid_until_ms;
        b.push_bind(&e.out_trade_no)
            .push_bind(e.user.get())
            .push_bind(&terms.template_id)
            .push_bind(terms.face_value_cents)
            .push_bind(terms.min_spend_cents)
            .push_bind(terms.valid_from_ms)
            .push_bind(terms.valid_until_ms)
            .push_bind(e.at_ms)
            .push_bind(if expired { "expired" } else { "active" })
            .push_bind(expired.then_some(now));
    });
    insert.build().execute(&mut **tx).await?;
    crate::metrics::coupons_booked(entries.len());
    Ok(())
}

impl Coupons {
    pub fn new(
        db: Arc<Db>,
        redis: Arc<Redis>,
        tokens: Tokens,
        ledger: Ledger,
        budget: Arc<Budget>,
        cache: Arc<ActivityCache>,
    ) -> Self {
        Self {
            db,
            redis,
            tokens,
            ledger,
            budget,
            cache,
        }
    }

    /// The user's coupons: those booked (MySQL) and those still waiting to be booked
    /// (Redis), each once. Redis is read first: a coupon booked in between is then in
    /// the MySQL read.
    pub async fn list(&self, user: UserId, now_ms: i64) -> Result<CouponList> {
        let waiting: Vec<AwardEntry> = self
            .tokens
            .coupon_statuses_of(user)
            .await?
            .into_iter()
            .filter(|s| s.pending)
            .map(|s| s.entry)
            .collect();
        let rows = sqlx::query(
            "SELECT out_trade_no, template_id, face_value_cents, min_spend_cents, valid_from_ms, valid_until_ms, issued_at_ms, state, used_at_ms FROM coupons WHERE user_id = ? ORDER BY issued_at_ms DESC LIMIT ?",
        )
        .bind(user.get())
        .bind(LIST_LIMIT as i64)
        .fetch_all(self.db.for_user(user))
        .await?;
        let templates = self.cache.templates();
        let name_of = |id: &str| {
            templates
                .get(id)
                .map(|t| t.name.clone())
                .unwrap_or_default()
        };
        let mut coupons = Vec::with_capacity(rows.len() + waiting.len());
        let mut seen = HashSet::new();
        for row in rows {
            let out_trade_no: String = crate::ledger::text(&row, 0)?;
            let template_id: String = crate::ledger::text(&row, 1)?;
            let valid_until_ms: i64 = row.try_get(5)?;
            let stored: String = crate::ledger::text(&row, 7)?;
            seen.insert(out_trade_no.clone());
            coupons.push(CouponItem {
                name: name_of(&template_id),
                out_trade_no,
                template_id,
                face_value_cents: row.try_get(2)?,
                min_spend_cents: row.try_get(3)?,
                valid_from_ms: row.try_get(4)?,
                valid_until_ms,
                issued_at_ms: row.try_get(6)?,
                state: state_at(&stored, valid_until_ms, now_ms),
                booked: true,
                used_at_ms: row.try_get(8)?,
            });
        }
        for e in waiting {
            if seen.contains(&e.out_trade_no) {
                continue;
            }
            let Some(template) = templates.get(&e.activity_id) else {
                tracing::warn!(
                    template = e.activity_id,
                    "a waiting coupon names a template not in the cache"
                );
                continue;
            };
            let terms = template.terms_at(e.at_ms, false);
            coupons.push(CouponItem {
                out_trade_no: e.out_trade_no,
                template_id: terms.template_id,
                name: template.name.clone(),
                face_value_cents: terms.face_value_cents,
                min_spend_cents: terms.min_spend_cents,
                valid_from_ms: terms.valid_from_ms,
                valid_until_ms: terms.valid_until_ms,
                issued_at_ms: e.at_ms,
                state: state_at("active", terms.valid_until_ms, now_ms),
                booked: false,
                used_at_ms: None,
            });
        }
        coupons.sort_by(|a, b| {
            (b.issued_at_ms, &b.out_trade_no).cmp(&(a.issued_at_ms, &a.out_trade_no))
        });
        coupons.truncate(LIST_LIMIT);
        let count = |s: &str| coupons.iter().filter(|c| c.state == s).count();
        Ok(CouponList {
            user_id: user.get(),
            active: count("active"),
            used: count("used"),
            expired: count("expired"),
            coupons,
        })
    }

    /// The expiry job: every active coupon whose validity ended by `now_ms` becomes
    /// `expired`, on every shard, in bounded statements. Returns how many changed.
    pub async fn expire_due(&self, now_ms: i64) -> Result<u64> {
        let mut expired = 0;
        for pool in self.db.shards() {
            loop {
                // Only buckets this shard owns, read with their shared lock: a bucket
                // being moved is left alone (its copy is checked row by row), and the
                // move waits for this statement.
                let changed = sqlx::query(
                    "UPDATE coupons SET state = 'expired', expired_at_ms = ? WHERE state = 'active' AND valid_until_ms <= ? AND user_id % 1024 IN (SELECT bucket FROM bucket_owner WHERE owned = 1) LIMIT ?",
                )
                .bind(now_ms)
                .bind(now_ms)
                .bind(EXPIRE_BATCH)
                .execute(pool)
                .await?
                .rows_affected();
                expired += changed;
                if changed < EXPIRE_BATCH as u64 {
                    break;
                }
            }
        }
        crate::metrics::coupons_expired(expired);
        Ok(expired)
    }
}
