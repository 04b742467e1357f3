//! Coupon templates: what a coupon is worth, how long it lasts, how many there are;
//! their stock figures for operators, and the cached remaining share a fallback reads.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use sqlx::{MySqlPool, Row};

use super::Coupons;
use crate::activity::Created;
use crate::budget::Budget;
use crate::domain::{ActivityId, MAX_CENTS};
use crate::error::{Error, Result};
use crate::pb;
use crate::store::{Db, Redis};

const DAY_MS: i64 = 86_400_000;

/// Coupons of one template at most (its stock).
pub const MAX_STOCK: i64 = 1_000_000_000_000;

/// A coupon template. Never changed once created: a coupon's terms are those of its
/// template at its issue time.
#[derive(Debug, Clone, PartialEq, Serialize, utoipa::ToSchema)]
pub struct Template {
    pub id: String,
    pub name: String,
    pub face_value_cents: i64,
    pub min_spend_cents: i64,
    /// A fixed window (both set), or `valid_days` from issue.
    pub valid_from_ms: Option<i64>,
    pub valid_until_ms: Option<i64>,
    pub valid_days: Option<u32>,
    /// Coupons there are to hand out, in all.
    pub stock: i64,
}

impl Template {
    /// The terms of a coupon of this template issued at `issued_at_ms`.
    pub fn terms_at(&self, issued_at_ms: i64, fallback: bool) -> pb::CouponTerms {
        let (from, until) = match (self.valid_from_ms, self.valid_until_ms, self.valid_days) {
            (Some(from), Some(until), _) => (from, until),
            (_, _, days) => (
                issued_at_ms,
                issued_at_ms.saturating_add(i64::from(days.unwrap_or(0)) * DAY_MS),
            ),
        };
        pb::CouponTerms {
            template_id: self.id.clone(),
            face_value_cents: self.face_value_cents,
            min_spend_cents: self.min_spend_cents,
            valid_from_ms: from,
            valid_until_ms: until,
            fallback,
        }
    }

    /// Whether a coupon issued at `now_ms` could still be used at some point.
    pub fn issuable_at(&self, now_ms: i64) -> bool {
        self.valid_until_ms.is_none_or(|until| now_ms < until)
    }
}

/// A template to create.
#[derive(Debug, Clone, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewTemplate {
    /// 1-32 of [a-z0-9-]; shares its namespace with activity ids.
    pub id: String,
    pub name: String,
    pub face_value_cents: i64,
    #[serde(default)]
    pub min_spend_cents: i64,
    /// A fixed window: both, ms since the epoch (from inclusive, until exclusive)...
    #[serde(default)]
    pub valid_from_ms: Option<i64>,
    #[serde(default)]
    pub valid_until_ms: Option<i64>,
    /// ... or this many days from each coupon's issue (1-3650).
    #[serde(default)]
    pub valid_days: Option<u32>,
    /// 1 to 10^12 coupons.
    pub stock: i64,
}

fn parse_new(body: NewTemplate) -> Result<Template> {
    let id = ActivityId::parse(&body.id)?;
    let name = body.name.trim();
    if name.is_empty() || name.len() > 128 {
        return Err(Error::InvalidRequest(
            "name must be 1-128 characters".into(),
        ));
    }
    if !(1..=MAX_CENTS).contains(&body.face_value_cents) {
        return Err(Error::InvalidRequest(format!(
            "face_value_cents must be 1..={MAX_CENTS}"
        )));
    }
    if !(0..=MAX_CENTS).contains(&body.min_spend_cents) {
        return Err(Error::InvalidRequest(format!(
            "min_spend_cents must be 0..={MAX_CENTS}"
        )));
    }
    if !(1..=MAX_STOCK).contains(&body.stock) {
        return Err(Error::InvalidRequest(format!(
            "stock must be 1..={MAX_STOCK}"
        )));
    }
    match (body.valid_from_ms, body.valid_until_ms, body.valid_days) {
        (Some(from), Some(until), None) if from >= 0 && until > from => {}
        (None, None, Some(days)) if (1..=3650).contains(&days) => {}
        _ => {
            return Err(Error::InvalidRequest(
                "give either valid_from_ms and valid_until_ms (until after from), or valid_days (1-3650)"
                    .into(),
            ))
        }
    }
    Ok(Template {
        id: id.as_str().to_string(),
        name: name.to_string(),
        face_value_cents: body.face_value_cents,
        min_spend_cents: body.min_spend_cents,
        valid_from_ms: body.valid_from_ms,
        valid_until_ms: body.valid_until_ms,
        valid_days: body.valid_days,
        stock: body.stock,
    })
}

fn from_row(row: &sqlx::mysql::MySqlRow) -> Result<Template, sqlx::Error> {
    Ok(Template {
        id: crate::ledger::text(row, 0)?,
        name: crate::ledger::text(row, 1)?,
        face_value_cents: row.try_get(2)?,
        min_spend_cents: row.try_get(3)?,
        valid_from_ms: row.try_get(4)?,
        valid_until_ms: row.try_get(5)?,
        valid_days: row.try_get::<Option<i32>, _>(6)?.map(|d| d.max(0) as u32),
        stock: row.try_get(7)?,
    })
}

/// Templates from MySQL: those of `ids`, or every one.
pub async fn load(pool: &MySqlPool, ids: Option<&[&str]>) -> Result<Vec<Template>, sqlx::Error> {
    let mut q = sqlx::QueryBuilder::<sqlx::MySql>::new(
        "SELECT id, name, face_value_cents, min_spend_cents, valid_from_ms, valid_until_ms, valid_days, stock FROM coupon_templates",
    );
    if let Some(ids) = ids {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        q.push(" WHERE id IN (");
        let mut list = q.separated(", ");
        for id in ids {
            list.push_bind(*id);
        }
        q.push(")");
    }
    q.push(" ORDER BY id");
    q.build()
        .fetch_all(pool)
        .await?
        .iter()
        .map(from_row)
        .collect()
}

/// A template's stock and coupons, for operators. Conserved when the stock splits
/// exactly into what was taken, what remains and what Redis lost (in doubt), no more
/// coupons were minted than taken, and every booked coupon is in exactly one state.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct TemplateFigures {
    #[serde(flatten)]
    pub template: Template,
    /// Coupons minted (the issuance counters).
    pub issued: i64,
    /// Units that may still be handed out.
    pub remaining: i64,
    /// Units taken from the stock (minted, or leaked by a crash before minting).
    pub taken: i64,
    /// Units Redis lost, frozen until reconciliation releases them.
    pub in_doubt: i64,
    pub booked: i64,
    pub active: i64,
    pub used: i64,
    pub expired: i64,
    pub conserved: bool,
}

impl Coupons {
    /// Creates a template with its stock; an identical repeat answers the existing one,
    /// a different one (or an activity of that id) is a conflict.
    pub async fn create_template(&self, body: NewTemplate) -> Result<Created<Template>> {
        let template = parse_new(body)?;
        if !insert(&self.db, &self.budget, &template).await? {
            let existing = load(self.db.main(), Some(&[template.id.as_str()])).await?;
            return match existing.into_iter().next() {
                Some(t) if t == template => Ok(Created::Existing(t)),
                Some(_) => Err(Error::IdempotencyConflict(format!(
                    "template `{}` exists with other fields",
                    template.id
                ))),
                None => Err(Error::IdempotencyConflict(format!(
                    "`{}` is the id of an activity",
                    template.id
                ))),
            };
        }
        self.cache
            .refresh(self.db.main())
            .await
            .map_err(Error::Internal)?;
        self.budget
            .refresh_live(&self.redis, &self.db)
            .await
            .map_err(Error::Internal)?;
        Ok(Created::New(template))
    }

    /// Every template with its figures. Each shard's booked coupons and their states are
    /// read in one snapshot (a booking writes both in one transaction), then the issuance
    /// counters, then the stock: each figure is read after the ones it must not exceed.
    pub async fn templates(&self, now_ms: i64) -> Result<Vec<TemplateFigures>> {
        let templates = load(self.db.main(), None).await?;
        let mut booked_states = self
            .ledger
            .stable(|| booked_coupons(&self.db, &templates, now_ms))
            .await?;
        let mut out = Vec::with_capacity(templates.len());
        for template in templates {
            let [booked, active, used, expired] =
                booked_states.remove(&template.id).unwrap_or_default();
            let issued = self.tokens.issued_totals(&template.id).await?.cents;
            let stock = self
                .budget
                .figures(&self.redis, &self.db, &template.id)
                .await
                .map_err(Error::Internal)?;
            let conserved = stock.taken_cents + stock.remaining_cents + stock.in_doubt_cents
                == template.stock
                && issued <= stock.taken_cents + stock.in_doubt_cents
                && booked <= issued
                && active + used + expired == booked;
            out.push(TemplateFigures {
                issued,
                remaining: stock.remaining_cents,
                taken: stock.taken_cents,
                in_doubt: stock.in_doubt_cents,
                booked,
                active,
                used,
                expired,
                conserved,
                template,
            });
        }
        Ok(out)
    }
}

/// Per template, over every shard: booked coupons (ledger rows) and how many of them are
/// active, used and expired, each shard read in one repeatable-read snapshot.
async fn booked_coupons(
    db: &Db,
    templates: &[Template],
    now_ms: i64,
) -> Result<HashMap<String, [i64; 4]>, sqlx::Error> {
    let mut out: HashMap<String, [i64; 4]> = HashMap::new();
    if templates.is_empty() {
        return Ok(out);
    }
    let booked_sql = format!(
        "SELECT activity_id, CAST(COALESCE(SUM(amount_cents), 0) AS SIGNED) FROM ledger_entries WHERE activity_id IN ({}) AND kind = 'coupon' GROUP BY activity_id",
        vec!["?"; templates.len()].join(", ")
    );
    for pool in db.shards() {
        // The server's default is READ COMMITTED (a snapshot per statement): this one
        // transaction reads both tables in one snapshot.
        let mut conn = pool.acquire().await?;
        // Not returned to the pool: should anything fail before the commit, the setting
        // would apply to another request's next transaction.
        conn.close_on_drop();
        sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
            .execute(&mut *conn)
            .await?;
        let mut tx = sqlx::Connection::begin(&mut *conn).await?;
        let mut booked = sqlx::query_as::<_, (Vec<u8>, i64)>(&booked_sql);
        for t in templates {
            booked = booked.bind(&t.id);
        }
        let booked = booked.fetch_all(&mut *tx).await?;
        let states: Vec<(String, String, i64)> = sqlx::query_as(
            "SELECT template_id, CASE WHEN state = 'active' AND valid_until_ms <= ? THEN 'expired' ELSE state END AS s, COUNT(*) FROM coupons GROUP BY template_id, s",
        )
        .bind(now_ms)
        .fetch_all(&mut *tx)
        .await?;
        tx.commit().await?;
        for (template, n) in booked {
            out.entry(String::from_utf8_lossy(&template).into_owned())
                .or_default()[0] += n;
        }
        for (template, state, n) in states {
            let slot = out.entry(template).or_default();
            match state.as_str() {
                "active" => slot[1] += n,
                "used" => slot[2] += n,
                _ => slot[3] += n,
            }
        }
    }
    Ok(out)
}

/// Inserts the template and its stock (an `activities` row of kind `coupon` with its
/// first budget generation) in one transaction; false when the id is taken.
async fn insert(db: &Db, budget: &Budget, t: &Template) -> Result<bool> {
    let mut tx = db.main().begin().await?;
    let inserted = sqlx::query(
        "INSERT IGNORE INTO activities (id, name, stage, starts_at, ends_at, budget_cents, max_award_cents, kind) VALUES (?, ?, 'live', CURRENT_TIMESTAMP(3), '9999-12-31 00:00:00', ?, 1, 'coupon')",
    )
    .bind(&t.id)
    .bind(&t.name)
    .bind(t.stock)
    .execute(&mut *tx)
    .await?
    .rows_affected()
        == 1;
    if !inserted {
        return Ok(false);
    }
    sqlx::query(
        "INSERT INTO coupon_templates (id, name, face_value_cents, min_spend_cents, valid_from_ms, valid_until_ms, valid_days, stock) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
    )
    .bind(&t.id)
    .bind(&t.name)
    .bind(t.face_value_cents)
    .bind(t.min_spend_cents)
    .bind(t.valid_from_ms)
    .bind(t.valid_until_ms)
    .bind(t.valid_days.map(|d| d as i32))
    .bind(t.stock)
    .execute(&mut *tx)
    .await?;
    budget.open_first(&mut tx, &t.id).await?;
    tx.commit().await?;
    Ok(true)
}

/// Per template, the share of its stock that remains, read at most once per
/// `max_age` per instance (a fallback decision needs no exact figure, and a burst must
/// not read MySQL per award). One caller refreshes; the others use the last figure.
pub struct StockGauge {
    max_age: Duration,
    shares: Mutex<HashMap<String, (Instant, f64)>>,
    refreshing: tokio::sync::Mutex<()>,
}

impl StockGauge {
    pub fn new(max_age: Duration) -> Self {
        Self {
            max_age,
            shares: Mutex::new(HashMap::new()),
            refreshing: tokio::sync::Mutex::new(()),
        }
    }

    fn cached(&self, template: &str) -> Option<(Instant, f64)> {
        self.shares
            .lock()
            .expect("stock gauge poisoned")
            .get(template)
            .copied()
    }

    /// The remaining share of `template`'s stock (0.0-1.0), `None` when it could not
    /// be read yet.
    pub async fn share(
        &self,
        budget: &Budget,
        redis: &Redis,
        db: &Db,
        template: &Template,
    ) -> Option<f64> {
        let cached = self.cached(&template.id);
        if cached.is_some_and(|(at, _)| at.elapsed() < self.max_age) {
            return cached.map(|(_, s)| s);
        }
        let Ok(_one) = self.refreshing.try_lock() else {
            return cached.map(|(_, s)| s);
        };
        match budget.figures(redis, db, &template.id).await {
            Ok(f) => {
                let share = f.remaining_cents as f64 / template.stock.max(1) as f64;
                self.shares
                    .lock()
                    .expect("stock gauge poisoned")
                    .insert(template.id.clone(), (Instant::now(), share));
                Some(share)
            }
            Err(err) => {
                tracing::warn!(
                    template = template.id,
                    error = format!("{err:#}"),
                    "reading a coupon stock failed"
                );
                cached.map(|(_, s)| s)
            }
        }
    }
}
