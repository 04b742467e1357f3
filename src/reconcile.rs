//! Reconciliation: per activity and hour, issued (the counters store.lua writes with
//! every token) against booked (the ledger) against settled (the marks written after
//! each commit), and budget taken against issued (leaks). Reports go to MySQL.
//!
//! A mismatch must survive a second look a moment later before it is reported, so a
//! batch caught between its commit and its Redis mark is not called a mismatch.

use std::collections::BTreeMap;
use std::time::Duration;

use axum::extract::{Path, Query, State};
use axum::Json;
use chrono::{DateTime, NaiveDateTime, TimeZone, Utc};
use serde::{Deserialize, Serialize};
use sqlx::Row;

use crate::error::{ApiError, ApiResult};
use crate::http::Operator;
use crate::startup::{App, AppState};
use crate::store::{Db, Redis};

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Totals {
    pub count: i64,
    pub cents: i64,
}

/// Per hour (`YYYYMMDDHH`): issued and settled totals, summed over partitions.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HourCounters {
    pub issued: Totals,
    pub settled: Totals,
}

pub async fn hour_counters(
    redis: &Redis,
    activity: &str,
) -> redis::RedisResult<BTreeMap<String, HourCounters>> {
    Ok(counters(redis, activity).await?.0)
}

/// Per budget generation: issued and settled totals, summed over partitions (the
/// `g{gen}:n|c|sn|sc` fields store.lua and mark.lua write beside the hourly ones).
pub async fn gen_counters(
    redis: &Redis,
    activity: &str,
) -> redis::RedisResult<BTreeMap<i64, HourCounters>> {
    Ok(counters(redis, activity).await?.1)
}

/// Every counter of `activity` over the partitions, in one round trip: per hour
/// (`YYYYMMDDHH:…`) and per budget generation (`g{gen}:…`).
async fn counters(
    redis: &Redis,
    activity: &str,
) -> redis::RedisResult<(BTreeMap<String, HourCounters>, BTreeMap<i64, HourCounters>)> {
    let mut pipe = redis::pipe();
    for p in 0..redis.partitions() {
        pipe.hgetall(redis.counters_key(p, activity));
    }
    let mut conn = redis.conn();
    let maps: Vec<BTreeMap<String, i64>> = pipe.query_async(&mut conn).await?;
    let mut hours: BTreeMap<String, HourCounters> = BTreeMap::new();
    let mut gens: BTreeMap<i64, HourCounters> = BTreeMap::new();
    for map in maps {
        for (field, value) in map {
            let Some((when, what)) = field.split_once(':') else {
                continue;
            };
            let counter = match when.strip_prefix('g') {
                Some(gen) => match gen.parse::<i64>() {
                    Ok(gen) => gens.entry(gen).or_default(),
                    Err(_) => continue,
                },
                None => hours.entry(when.to_string()).or_default(),
            };
            match what {
                "n" => counter.issued.count += value,
                "c" => counter.issued.cents += value,
                "sn" => counter.settled.count += value,
                "sc" => counter.settled.cents += value,
                _ => {}
            }
        }
    }
    Ok((hours, gens))
}

/// Awards of `activity` in the ledger per budget generation, over every shard.
pub async fn booked_by_gen(db: &Db, activity: &str) -> Result<BTreeMap<i64, Totals>, sqlx::Error> {
    let mut out: BTreeMap<i64, Totals> = BTreeMap::new();
    for pool in db.shards() {
        let rows: Vec<(i64, i64, i64)> = sqlx::query_as(
            "SELECT budget_gen, COUNT(*), CAST(COALESCE(SUM(amount_cents), 0) AS SIGNED) FROM ledger_entries WHERE activity_id = ? AND kind = 'award' GROUP BY budget_gen",
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

pub async fn issued_totals(redis: &Redis, activity: &str) -> redis::RedisResult<Totals> {
    let hours = hour_counters(redis, activity).await?;
    Ok(hours.values().fold(Totals::default(), |acc, h| Totals {
        count: acc.count + h.issued.count,
        cents: acc.cents + h.issued.cents,
    }))
}

/// Awards of `activity` in the ledger, over every shard; within `[start, end)` ms if given.
pub async fn booked_totals(
    db: &Db,
    activity: &str,
    window: Option<(i64, i64)>,
) -> Result<Totals, sqlx::Error> {
    let mut totals = Totals::default();
    for pool in db.shards() {
        let row = match window {
            Some((start, end)) => sqlx::query(
                "SELECT COUNT(*), CAST(COALESCE(SUM(amount_cents), 0) AS SIGNED) FROM ledger_entries WHERE activity_id = ? AND kind = 'award' AND at_ms >= ? AND at_ms < ?",
            )
            .bind(activity)
            .bind(start)
            .bind(end)
            .fetch_one(pool)
            .await?,
            None => sqlx::query(
                "SELECT COUNT(*), CAST(COALESCE(SUM(amount_cents), 0) AS SIGNED) FROM ledger_entries WHERE activity_id = ? AND kind = 'award'",
            )
            .bind(activity)
            .fetch_one(pool)
            .await?,
        };
        totals.count += row.try_get::<i64, _>(0)?;
        totals.cents += row.try_get::<i64, _>(1)?;
    }
    Ok(totals)
}

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

async fn measure(app: &App, activity: &str, hour: &str, kind: &str) -> ApiResult<Report> {
    let (start, end) = hour_window(hour)
        .ok_or_else(|| ApiError::InvalidRequest("hour must be YYYYMMDDHH".into()))?;
    let (hours, gens) = counters(&app.redis, activity).await?;
    let counters = hours.get(hour).copied().unwrap_or_default();
    let booked = booked_totals(&app.db, activity, Some((start, end))).await?;
    let budget = app
        .budget
        .figures(&app.redis, &app.db, activity)
        .await
        .map_err(ApiError::Internal)?;
    let leak = open_leak(app, activity, &gens, budget.available_cents).await?;
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
    Ok(Report {
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
        budget_taken_cents: budget.taken_cents,
        leak_cents: leak,
        ok: problems.is_empty(),
        problems,
    })
}

/// Taken but not issued, over the generations still open to spending or awaiting their
/// leak settlement (the live one's figure includes awards in flight, which is why a
/// mismatch needs a second look).
async fn open_leak(
    app: &App,
    activity: &str,
    gens: &BTreeMap<i64, HourCounters>,
    live_available: i64,
) -> ApiResult<i64> {
    let open: Vec<(i64, i64, i64, String)> = sqlx::query_as(
        "SELECT gen, granted_cents, returned_cents, state FROM budget_generations WHERE activity_id = ? AND state IN ('live', 'closed')",
    )
    .bind(activity)
    .fetch_all(app.db.main())
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
pub async fn reconcile(app: &App, activity: &str, hour: &str, kind: &str) -> ApiResult<Report> {
    let mut report = measure(app, activity, hour, kind).await?;
    if !report.ok {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let second = measure(app, activity, hour, kind).await?;
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
    sqlx::query(
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
    .execute(app.db.main())
    .await?;
    Ok(report)
}

/// Reconciles `hour` for every activity whose window overlaps it.
pub async fn reconcile_hour(app: &App, hour: &str, kind: &str) -> ApiResult<Vec<Report>> {
    let (start, end) = hour_window(hour)
        .ok_or_else(|| ApiError::InvalidRequest("hour must be YYYYMMDDHH".into()))?;
    let mut reports = Vec::new();
    for cached in app.activities.all() {
        let a = &cached.activity;
        if a.starts_at.timestamp_millis() < end && a.ends_at.timestamp_millis() + 3_600_000 > start
        {
            reports.push(reconcile(app, &a.id, hour, kind).await?);
        }
    }
    Ok(reports)
}

#[derive(Debug, Serialize)]
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
    pub problems: String,
    pub created_at: DateTime<Utc>,
}

#[derive(Deserialize)]
pub struct ReportQuery {
    activity_id: Option<String>,
    limit: Option<u32>,
}

pub async fn list_handler(
    State(app): State<AppState>,
    _op: Operator,
    Query(q): Query<ReportQuery>,
) -> ApiResult<Json<serde_json::Value>> {
    let limit = q.limit.unwrap_or(100).clamp(1, 1000);
    let rows = sqlx::query(
        "SELECT id, activity_id, hour_start, kind, issued_count, issued_cents, booked_count, booked_cents, settled_count, settled_cents, pending_count, pending_cents, budget_taken_cents, leak_cents, ok, problems, created_at FROM reconciliation_reports WHERE (? IS NULL OR activity_id = ?) ORDER BY id DESC LIMIT ?",
    )
    .bind(&q.activity_id)
    .bind(&q.activity_id)
    .bind(limit)
    .fetch_all(app.db.main())
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
    Ok(Json(serde_json::json!({ "reports": reports })))
}

/// Returns budget taken but provably never a token (see [`crate::issue::budget::Budget::repair`]).
pub async fn repair_leak(app: &App, activity: &str) -> ApiResult<crate::issue::budget::Repair> {
    app.activities
        .get(activity)
        .ok_or_else(|| ApiError::NotFound(format!("no activity `{activity}`")))?;
    app.budget
        .repair(&app.redis, &app.db, activity)
        .await
        .map_err(ApiError::Internal)
}

pub async fn repair_leak_handler(
    State(app): State<AppState>,
    _op: Operator,
    Path(id): Path<String>,
) -> ApiResult<Json<serde_json::Value>> {
    let repair = repair_leak(&app, &id).await?;
    Ok(Json(serde_json::json!({
        "activity_id": id,
        "repaired_cents": repair.repaired_cents,
        "drained_cents": repair.drained_cents,
        "settling_generations": repair.settling_generations,
    })))
}

/// Releases in-doubt budget proven unspent (see
/// [`crate::issue::budget::Budget::release_in_doubt`]).
pub async fn release_in_doubt(
    app: &App,
    activity: &str,
) -> ApiResult<crate::issue::budget::Release> {
    app.activities
        .get(activity)
        .ok_or_else(|| ApiError::NotFound(format!("no activity `{activity}`")))?;
    app.budget
        .release_in_doubt(&app.redis, &app.db, activity)
        .await
        .map_err(ApiError::Internal)
}

pub async fn release_in_doubt_handler(
    State(app): State<AppState>,
    _op: Operator,
    Path(id): Path<String>,
) -> ApiResult<Json<serde_json::Value>> {
    let release = release_in_doubt(&app, &id).await?;
    Ok(Json(serde_json::json!({
        "activity_id": id,
        "released_cents": release.released_cents,
        "resolved_generations": release.resolved_generations,
        "waiting_generations": release.waiting_generations,
    })))
}

#[derive(Deserialize)]
pub struct ParkedQuery {
    limit: Option<u32>,
}

/// Settlement entries the worker could not book (see `settle::worker`), per partition,
/// oldest first: what an operator fixes by hand. The tokens stay pending in Redis.
pub async fn parked_handler(
    State(app): State<AppState>,
    _op: Operator,
    Query(q): Query<ParkedQuery>,
) -> ApiResult<Json<serde_json::Value>> {
    let limit = q.limit.unwrap_or(100).clamp(1, 1000) as usize;
    let mut pipe = redis::pipe();
    for p in 0..app.redis.partitions() {
        pipe.cmd("XRANGE")
            .arg(app.redis.parked_key(p))
            .arg("-")
            .arg("+")
            .arg("COUNT")
            .arg(limit);
    }
    let mut conn = app.redis.conn();
    let replies: Vec<redis::streams::StreamRangeReply> = pipe.query_async(&mut conn).await?;
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
                break;
            }
        }
    }
    Ok(Json(serde_json::json!({ "entries": entries })))
}
