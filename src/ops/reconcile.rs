//! Reconciliation: per activity and hour, issued (the counters store.lua writes with
//! every token) against booked (the ledger) against settled (the marks written after
//! each commit), and budget taken against issued (leaks). Reports go to MySQL.
//!
//! Red packets are reconciled as the activity `packets`: the shares opened in the hour
//! stand for the budget taken (each share is minted as one token), and the packets'
//! own money is checked against the ledger (see [`Reconciler::measure_packets`]).
//!
//! A mismatch must survive a second look a moment later before it is reported, so a
//! batch caught between its commit and its Redis mark is not called a mismatch.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, NaiveDateTime, TimeZone, Utc};
use serde::Serialize;
use sqlx::Row;

use crate::activity::ActivityCache;
use crate::budget::{Budget, Release, Repair};
use crate::error::{Error, Result};
use crate::events::{self, EventType, NewEvent};
use crate::ledger::Ledger;
use crate::packets::{self, PACKETS_ACTIVITY};
use crate::store::{now_ms, Db, Redis};
use crate::tokens::{Counters, Tokens, Totals};

/// The reconciliation capability, with the operators' budget repairs. Cheap to clone.
#[derive(Clone)]
pub struct Reconciler {
    pub redis: Arc<Redis>,
    pub db: Arc<Db>,
    pub tokens: Tokens,
    pub ledger: Ledger,
    pub budget: Arc<Budget>,
    pub activities: Arc<ActivityCache>,
    /// `budget.low` is written when the remaining budget falls below this fraction.
    pub budget_low_fraction: f64,
}

/// A packet still open this long after it expired is reported: the refund job (every
/// minute, 500 packets a run) should have given its remainder back.
pub const PACKET_REFUND_OVERDUE_MS: i64 = 15 * 60_000;

/// A share's token is stored just after its share row commits; a share without its
/// token is reported only once its hour has been over this long.
pub const SHARE_STORE_GRACE_MS: i64 = 60_000;

/// The hour `YYYYMMDDHH` as a [start, end) window in ms.
pub fn hour_window(hour: &str) -> Option<(i64, i64)> {
    let start = NaiveDateTime::parse_from_str(&format!("{hour}0000"), "%Y%m%d%H%M%S").ok()?;
    let start = Utc.from_utc_datetime(&start).timestamp_millis();
    Some((start, start + 3_600_000))
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Report {
    pub activity_id: String,
    pub hour_start: DateTime<Utc>,
    pub kind: String,
    pub issued: Totals,
    pub booked: Totals,
    pub settled: Totals,
    pub pending: Totals,
    pub budget_taken_cents: i64,
    pub leak_cents: i64,
    pub ok: bool,
    pub problems: Vec<String>,
}

impl Report {
    /// The report of `activity`'s hour starting at `start` (ms): the hour's counters
    /// against `booked`, with the budget taken and the leak, ok when `problems` is empty.
    fn new(
        activity: &str,
        start: i64,
        kind: &str,
        counters: &Counters,
        booked: Totals,
        (budget_taken_cents, leak_cents): (i64, i64),
        problems: Vec<String>,
    ) -> Self {
        Self {
            activity_id: activity.to_string(),
            hour_start: DateTime::from_timestamp_millis(start).unwrap_or_default(),
            kind: kind.to_string(),
            issued: counters.issued,
            booked,
            settled: counters.settled,
            pending: Totals {
                count: counters.issued.count - booked.count,
                cents: counters.issued.cents - booked.cents,
            },
            budget_taken_cents,
            leak_cents,
            ok: problems.is_empty(),
            problems,
        }
    }
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct StoredReport {
    pub id: i64,
    pub activity_id: String,
    pub hour_start: DateTime<Utc>,
    pub kind: String,
    pub issued_count: i64,
    pub issued_cents: i64,
    pub booked_count: i64,
    pub booked_cents: i64,
    pub settled_count: i64,
    pub settled_cents: i64,
    pub pending_count: i64,
    pub pending_cents: i64,
    pub budget_taken_cents: i64,
    pub leak_cents: i64,
    pub ok: bool,
    /// The problems found, `; `-separated (empty when ok).
    pub problems: String,
    pub created_at: DateTime<Utc>,
}

/// What the ledger's awards of an hour (`booked`) say against the hour's Redis
/// counters: never more than was issued, and exactly what was marked settled.
fn booking_problems(booked: Totals, counters: &Counters) -> Vec<String> {
    let mut problems = Vec::new();
    if booked.count > counters.issued.count || booked.cents > counters.issued.cents {
        problems.push(format!(
            "ledger holds more than was issued: booked {} cents in {} rows, issued {} cents in {} tokens",
            booked.cents, booked.count, counters.issued.cents, counters.issued.count
        ));
    }
    if booked != counters.settled {
        problems.push(format!(
            "ledger and settle marks disagree: ledger {} cents in {} rows, marked settled {} cents in {} tokens",
            booked.cents, booked.count, counters.settled.cents, counters.settled.count
        ));
    }
    problems
}

impl Reconciler {
    async fn measure(&self, activity: &str, hour: &str, kind: &str) -> Result<Report> {
        let (start, end) = hour_window(hour)
            .ok_or_else(|| Error::InvalidRequest("hour must be YYYYMMDDHH".into()))?;
        if activity == PACKETS_ACTIVITY {
            return self.measure_packets(hour, (start, end), kind).await;
        }
        let all = self.tokens.counters(activity).await?;
        let counters = all.hours.get(hour).copied().unwrap_or_default();
        let booked = self.ledger.totals(activity, Some((start, end))).await?;
        let budget = self
            .budget
            .figures(&self.redis, &self.db, activity)
            .await
            .map_err(Error::Internal)?;
        let leak = self
            .open_leak(activity, &all.gens, budget.available_cents)
            .await?;
        let mut problems = booking_problems(booked, &counters);
        if leak < 0 {
            problems.push(format!("more issued than budget taken, by {} cents", -leak));
        } else if leak > 0 {
            problems.push(format!("budget leak: {leak} cents taken but never issued"));
        }
        if budget.in_doubt_cents > 0 {
            problems.push(format!(
                "budget in doubt: {} cents granted before Redis lost data; release-in-doubt returns what was never spent",
                budget.in_doubt_cents
            ));
        }
        Ok(Report::new(
            activity,
            start,
            kind,
            &counters,
            booked,
            (budget.taken_cents, leak),
            problems,
        ))
    }

    /// The red packets of an hour: the shares opened (MySQL) stand for budget taken,
    /// their tokens are issued, booked and marked like any award's; the packets sent in
    /// the hour carry their debits; the packets refunded in it (however late after
    /// they expired) carry their refund rows; every refund row of the hour gave back exactly its
    /// packet's total less its shares, and no send or refund row lacks its packet; no
    /// packet waits for its refund longer than [`PACKET_REFUND_OVERDUE_MS`].
    ///
    /// The Redis counters are read first: a token is counted after its share row
    /// commits, so a share read later is never missing for a counted token. A share whose
    /// token is not counted yet may be on its way (stored just after its commit): that
    /// is judged only once the hour has been over for [`SHARE_STORE_GRACE_MS`].
    async fn measure_packets(&self, hour: &str, window: (i64, i64), kind: &str) -> Result<Report> {
        let (start, end) = window;
        let now = now_ms();
        let counters = self
            .tokens
            .counters(PACKETS_ACTIVITY)
            .await?
            .hours
            .get(hour)
            .copied()
            .unwrap_or_default();
        let booked = self.ledger.totals(PACKETS_ACTIVITY, Some(window)).await?;
        let figures = packets::hour_figures(
            &self.ledger,
            &self.db,
            window,
            now - PACKET_REFUND_OVERDUE_MS,
        )
        .await?;
        let mut problems = booking_problems(booked, &counters);
        let closed = end <= now - SHARE_STORE_GRACE_MS;
        let mut leak = figures.shares.cents - counters.issued.cents;
        if leak > 0 && !closed {
            leak = 0;
        }
        if leak > 0 {
            problems.push(format!(
                "shares without their tokens: {leak} cents opened in shares whose tokens Redis does not count (the refund job stores missing ones again)"
            ));
        } else if leak < 0 {
            problems.push(format!(
                "share tokens issued without a share: {} cents",
                -leak
            ));
        }
        if figures.sent_debited_cents != figures.sent.cents {
            problems.push(format!(
                "packets sent without their debit: {} packets of {} cents, debited {} cents",
                figures.sent.count, figures.sent.cents, figures.sent_debited_cents
            ));
        }
        if figures.refunded_booked_cents != figures.refunded.cents {
            problems.push(format!(
                "packets refunded without their refund row: {} packets record {} cents refunded, the ledger gave back {} cents",
                figures.refunded.count, figures.refunded.cents, figures.refunded_booked_cents
            ));
        }
        if figures.inexact_refunds > 0 {
            problems.push(format!(
                "refunds that are not the unopened remainder: {} refund rows",
                figures.inexact_refunds
            ));
        }
        if figures.stray_rows > 0 {
            problems.push(format!(
                "send or refund rows whose packet is missing or records another amount: {}",
                figures.stray_rows
            ));
        }
        if figures.overdue > 0 {
            problems.push(format!(
                "refunds overdue: {} packets still open more than {} minutes after they expired",
                figures.overdue,
                PACKET_REFUND_OVERDUE_MS / 60_000
            ));
        }
        Ok(Report::new(
            PACKETS_ACTIVITY,
            start,
            kind,
            &counters,
            booked,
            (figures.shares.cents, leak),
            problems,
        ))
    }

    /// Taken but not issued, over the generations still open to spending or awaiting their
    /// leak settlement (the live one's figure includes awards in flight, which is why a
    /// mismatch needs a second look).
    async fn open_leak(
        &self,
        activity: &str,
        gens: &BTreeMap<i64, Counters>,
        live_available: i64,
    ) -> Result<i64> {
        let open: Vec<(i64, i64, i64, String)> = sqlx::query_as(
            "SELECT gen, granted_cents, returned_cents, state FROM budget_generations WHERE activity_id = ? AND state IN ('live', 'closed')",
        )
        .bind(activity)
        .fetch_all(self.db.main())
        .await?;
        let mut leak = 0;
        for (gen, granted, returned, state) in open {
            // Only the live generation's sub-stocks still hold budget; a closed one was drained.
            let available = if state == "live" { live_available } else { 0 };
            let issued = gens.get(&gen).map(|c| c.issued.cents).unwrap_or(0);
            leak += granted - returned - available - issued;
        }
        Ok(leak)
    }

    /// Reconciles one activity and hour, stores the report and returns it.
    pub async fn reconcile(&self, activity: &str, hour: &str, kind: &str) -> Result<Report> {
        let mut report = self.measure(activity, hour, kind).await?;
        if !report.ok {
            tokio::time::sleep(Duration::from_millis(500)).await;
            let second = self.measure(activity, hour, kind).await?;
            // Keep only problems seen both times.
            report = Report {
                problems: second
                    .problems
                    .iter()
                    .filter(|p| {
                        report
                            .problems
                            .iter()
                            .any(|q| q.split(':').next() == p.split(':').next())
                    })
                    .cloned()
                    .collect(),
                ..second
            };
            report.ok = report.problems.is_empty();
        }
        if !report.ok {
            crate::metrics::reconciliation_mismatch(activity);
            tracing::error!(activity, hour, problems = ?report.problems, "reconciliation mismatch");
        }
        // The report, and for a mismatch its event, are written together.
        let mut tx = self.db.main().begin().await?;
        let report_id = sqlx::query(
            "INSERT INTO reconciliation_reports (activity_id, hour_start, kind, issued_count, issued_cents, booked_count, booked_cents, settled_count, settled_cents, pending_count, pending_cents, budget_taken_cents, leak_cents, ok, problems) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        )
        .bind(activity)
        .bind(report.hour_start.naive_utc())
        .bind(kind)
        .bind(report.issued.count)
        .bind(report.issued.cents)
        .bind(report.booked.count)
        .bind(report.booked.cents)
        .bind(report.settled.count)
        .bind(report.settled.cents)
        .bind(report.pending.count)
        .bind(report.pending.cents)
        .bind(report.budget_taken_cents)
        .bind(report.leak_cents)
        .bind(report.ok)
        .bind(report.problems.join("; "))
        .execute(&mut *tx)
        .await?
        .last_insert_id();
        if !report.ok {
            let data = serde_json::json!({
                "report_id": report_id,
                "activity_id": activity,
                "hour_start": report.hour_start,
                "kind": kind,
                "problems": report.problems,
                "issued_cents": report.issued.cents,
                "booked_cents": report.booked.cents,
                "settled_cents": report.settled.cents,
                "leak_cents": report.leak_cents,
            });
            events::record(
                &mut tx,
                &NewEvent {
                    kind: EventType::ReconciliationMismatch,
                    order_key: format!("activity:{activity}"),
                    dedupe_key: None,
                    data: &data,
                },
            )
            .await?;
        }
        tx.commit().await?;
        Ok(report)
    }

    /// Reconciles `hour` for every activity whose window overlaps it, and for red
    /// packets when any share token was issued, share opened, packet sent or refunded in it.
    pub async fn reconcile_hour(&self, hour: &str, kind: &str) -> Result<Vec<Report>> {
        let mut reports = Vec::new();
        for activity in self.activities_in_hour(hour)? {
            reports.push(self.reconcile(&activity, hour, kind).await?);
        }
        if self.packets_in_hour(hour).await? {
            reports.push(self.reconcile(PACKETS_ACTIVITY, hour, kind).await?);
        }
        Ok(reports)
    }

    /// Whether `hour` saw any red packet money move (or counted a share token).
    async fn packets_in_hour(&self, hour: &str) -> Result<bool> {
        let (start, end) = hour_window(hour)
            .ok_or_else(|| Error::InvalidRequest("hour must be YYYYMMDDHH".into()))?;
        let counted = self
            .tokens
            .counters(PACKETS_ACTIVITY)
            .await?
            .hours
            .contains_key(hour);
        Ok(counted
            || !packets::hour_figures(&self.ledger, &self.db, (start, end), 0)
                .await?
                .is_empty())
    }

    /// The activities whose window overlaps `hour` (or ended less than an hour before it).
    pub fn activities_in_hour(&self, hour: &str) -> Result<Vec<String>> {
        let (start, end) = hour_window(hour)
            .ok_or_else(|| Error::InvalidRequest("hour must be YYYYMMDDHH".into()))?;
        Ok(self
            .activities
            .all()
            .iter()
            .map(|c| &c.activity)
            .filter(|a| {
                a.starts_at.timestamp_millis() < end
                    && a.ends_at.timestamp_millis() + 3_600_000 > start
            })
            .map(|a| a.id.to_string())
            .collect())
    }

    /// The latest stored reports, newest first; of one activity when given.
    pub async fn reports(&self, activity: Option<&str>, limit: u32) -> Result<Vec<StoredReport>> {
        let rows = sqlx::query(
            "SELECT id, activity_id, hour_start, kind, issued_count, issued_cents, booked_count, booked_cents, settled_count, settled_cents, pending_count, pending_cents, budget_taken_cents, leak_cents, ok, problems, created_at FROM reconciliation_reports WHERE (? IS NULL OR activity_id = ?) ORDER BY id DESC LIMIT ?",
        )
        .bind(activity)
        .bind(activity)
        .bind(limit)
        .fetch_all(self.db.main())
        .await?;
        let reports = rows
            .iter()
            .map(|r| -> Result<StoredReport, sqlx::Error> {
                Ok(StoredReport {
                    id: r.try_get(0)?,
                    activity_id: r.try_get(1)?,
                    hour_start: r.try_get::<NaiveDateTime, _>(2)?.and_utc(),
                    kind: r.try_get(3)?,
                    issued_count: r.try_get(4)?,
                    issued_cents: r.try_get(5)?,
                    booked_count: r.try_get(6)?,
                    booked_cents: r.try_get(7)?,
                    settled_count: r.try_get(8)?,
                    settled_cents: r.try_get(9)?,
                    pending_count: r.try_get(10)?,
                    pending_cents: r.try_get(11)?,
                    budget_taken_cents: r.try_get(12)?,
                    leak_cents: r.try_get(13)?,
                    ok: r.try_get(14)?,
                    problems: r.try_get(15)?,
                    created_at: r.try_get::<NaiveDateTime, _>(16)?.and_utc(),
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(reports)
    }

    /// Writes `budget.low` for each open activity whose remaining budget is below
    /// `budget_low_fraction` of its budget: once per activity and budget (adding budget
    /// and falling low again writes another).
    pub async fn check_budget_low(&self) -> anyhow::Result<Vec<String>> {
        let mut low = Vec::new();
        if self.budget_low_fraction <= 0.0 {
            return Ok(low);
        }
        let now = Utc::now();
        let templates = self.activities.templates();
        for cached in self.activities.all() {
            let a = &cached.activity;
            // A coupon template's stock is not a budget of cents (its figures are on
            // `GET /v1/admin/coupon-templates`).
            if a.ends_at <= now || a.starts_at > now || templates.contains_key(a.id.as_str()) {
                continue;
            }
            let figures = self
                .budget
                .figures(&self.redis, &self.db, a.id.as_str())
                .await?;
            let budget = a.budget_cents.get();
            if (figures.remaining_cents as f64) >= budget as f64 * self.budget_low_fraction {
                continue;
            }
            let data = serde_json::json!({
                "activity_id": a.id,
                "budget_cents": budget,
                "remaining_cents": figures.remaining_cents,
                "threshold_fraction": self.budget_low_fraction,
            });
            let mut conn = self.db.main().acquire().await?;
            let written = events::record(
                &mut conn,
                &NewEvent {
                    kind: EventType::BudgetLow,
                    order_key: format!("activity:{}", a.id),
                    dedupe_key: Some(format!("budget.low:{}:{budget}", a.id)),
                    data: &data,
                },
            )
            .await?;
            if written {
                tracing::warn!(activity = %a.id, remaining_cents = figures.remaining_cents, budget, "budget low");
                low.push(a.id.to_string());
            }
        }
        Ok(low)
    }

    /// After an activity's end: once every issued token is booked, records it as
    /// drained.
    pub async fn mark_drained(&self) -> anyhow::Result<Vec<String>> {
        let mut drained = Vec::new();
        let now = Utc::now();
        for cached in self.activities.all() {
            let a = &cached.activity;
            if a.ends_at > now {
                continue;
            }
            let issued = self.tokens.issued_totals(a.id.as_str()).await?;
            let booked = self.ledger.totals(a.id.as_str(), None).await?;
            if issued == booked {
                let mut tx = self.db.main().begin().await?;
                let changed = sqlx::query("UPDATE activities SET drained_at = CURRENT_TIMESTAMP(3) WHERE id = ? AND drained_at IS NULL")
                    .bind(a.id.as_str())
                    .execute(&mut *tx)
                    .await?
                    .rows_affected();
                if changed > 0 {
                    let data = serde_json::json!({
                        "activity_id": a.id,
                        "booked_count": booked.count,
                        "booked_cents": booked.cents,
                    });
                    events::record(
                        &mut tx,
                        &NewEvent {
                            kind: EventType::ActivityDrained,
                            order_key: format!("activity:{}", a.id),
                            dedupe_key: Some(format!("activity.drained:{}", a.id)),
                            data: &data,
                        },
                    )
                    .await?;
                }
                tx.commit().await?;
                if changed > 0 {
                    tracing::info!(
                        activity = %a.id,
                        tokens = booked.count,
                        cents = booked.cents,
                        "activity drained"
                    );
                    drained.push(a.id.to_string());
                }
            }
        }
        Ok(drained)
    }

    fn known(&self, activity: &str) -> Result<()> {
        self.activities
            .get(activity)
            .map(|_| ())
            .ok_or_else(|| Error::NotFound(format!("no activity `{activity}`")))
    }

    /// Returns budget taken but provably never a token (see [`Budget::repair`]).
    pub async fn repair_leak(&self, activity: &str) -> Result<Repair> {
        self.known(activity)?;
        self.budget
            .repair(&self.redis, &self.db, activity)
            .await
            .map_err(Error::Internal)
    }

    /// Releases in-doubt budget proven unspent (see [`Budget::release_in_doubt`]).
    pub async fn release_in_doubt(&self, activity: &str) -> Result<Release> {
        self.known(activity)?;
        self.budget
            .release_in_doubt(&self.redis, &self.db, activity)
            .await
            .map_err(Error::Internal)
    }

    /// Settlement entries the worker could not book (see `settle::worker`), per
    /// partition, oldest first: what an operator fixes by hand. The tokens stay pending
    /// in Redis.
    pub async fn parked(&self, limit: usize) -> Result<Vec<serde_json::Value>> {
        let mut pipe = redis::pipe();
        for p in 0..self.redis.partitions() {
            pipe.cmd("XRANGE")
                .arg(self.redis.parked_key(p))
                .arg("-")
                .arg("+")
                .arg("COUNT")
                .arg(limit);
        }
        let replies: Vec<redis::streams::StreamRangeReply> = self.redis.query(&pipe).await?;
        let mut entries = Vec::new();
        for (p, reply) in replies.into_iter().enumerate() {
            for id in reply.ids {
                let fields: BTreeMap<String, String> = id
                    .map
                    .iter()
                    .filter_map(|(k, v)| {
                        redis::from_redis_value::<String>(v)
                            .ok()
                            .map(|v| (k.clone(), v))
                    })
                    .collect();
                entries.push(serde_json::json!({"partition": p, "id": id.id, "fields": fields}));
                if entries.len() >= limit {
                    return Ok(entries);
                }
            }
        }
        Ok(entries)
    }
}
