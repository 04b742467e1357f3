//! The operator API under `/v1/admin`: activities, scenes and budgets, leak repair and
//! in-doubt release, reconciliation reports, parked settlement entries and the
//! degradation switches.

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::Json;
use utoipa_axum::{router::OpenApiRouter, routes};

use super::openapi as doc;
use serde::Deserialize;
use serde_json::{json, Value};

use super::wire::JsonBody;
use super::{AppState, Operator};
use crate::activity::{Activity, ActivityView, NewActivity, NewScene, Scene};
use crate::domain::{ActivityId, Cents};
use crate::error::{Error, Result};

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(create_activity, list_activities))
        .routes(routes!(health))
        .routes(routes!(create_webhook, list_webhooks))
        .routes(routes!(delete_webhook))
        .routes(routes!(webhook_deliveries))
        .routes(routes!(get_activity))
        .routes(routes!(add_budget))
        .routes(routes!(create_scene))
        .routes(routes!(repair_leak))
        .routes(routes!(release_in_doubt))
        .routes(routes!(reports))
        .routes(routes!(parked))
        .routes(routes!(switches))
        .routes(routes!(set_switch))
        .routes(routes!(blacklist, set_blacklist))
        .routes(routes!(flagged))
        .routes(routes!(packet_totals))
}

#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
struct BlacklistAnswer {
    entries: Vec<crate::issue::guards::BlacklistEntry>,
}

#[utoipa::path(get, path = "/v1/admin/blacklist", security(("operator" = [])), tag = "operators",
    responses((status = 200, description = "Blacklisted users and callers: their awards are refused (403 forbidden)", body = BlacklistAnswer), doc::OperatorErrors))]
async fn blacklist(State(app): State<AppState>, _op: Operator) -> Result<Json<BlacklistAnswer>> {
    Ok(Json(BlacklistAnswer {
        entries: app.guards.blacklist().await?,
    }))
}

#[derive(Debug, serde::Deserialize, utoipa::ToSchema)]
struct SetBlacklist {
    /// user or caller.
    kind: String,
    /// A user id, or a caller name.
    value: String,
    /// On the list (true) or off it (false).
    on: bool,
    #[serde(default)]
    reason: String,
}

#[utoipa::path(put, path = "/v1/admin/blacklist", security(("operator" = [])), tag = "operators",
    request_body = SetBlacklist,
    responses((status = 200, description = "The blacklist after the change (this instance at once, the others within a cache refresh)", body = BlacklistAnswer), doc::OperatorErrors))]
async fn set_blacklist(
    State(app): State<AppState>,
    _op: Operator,
    JsonBody(body): JsonBody<SetBlacklist>,
) -> Result<Json<BlacklistAnswer>> {
    app.guards
        .set_blacklisted(&body.kind, &body.value, &body.reason, body.on)
        .await?;
    Ok(Json(BlacklistAnswer {
        entries: app.guards.blacklist().await?,
    }))
}

#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
struct FlaggedAnswer {
    users: Vec<crate::issue::guards::Flagged>,
}

#[derive(Debug, serde::Deserialize, utoipa::IntoParams)]
struct FlaggedQuery {
    /// At most this many (default 100, at most 1000).
    limit: Option<usize>,
}

#[utoipa::path(get, path = "/v1/admin/flagged", security(("operator" = [])), tag = "operators",
    params(FlaggedQuery),
    responses((status = 200, description = "Users the seckill guards flagged, the latest first", body = FlaggedAnswer), doc::OperatorErrors))]
async fn flagged(
    State(app): State<AppState>,
    _op: Operator,
    axum::extract::Query(q): axum::extract::Query<FlaggedQuery>,
) -> Result<Json<FlaggedAnswer>> {
    let limit = q.limit.unwrap_or(100).clamp(1, 1000);
    Ok(Json(FlaggedAnswer {
        users: app.guards.flagged(limit).await?,
    }))
}

#[utoipa::path(get, path = "/v1/admin/packets", security(("operator" = [])), tag = "operators",
    responses((status = 200, description = "Every red packet's money summed: sent = opened + refunded + open remainder", body = crate::packets::PacketTotals), doc::OperatorErrors))]
async fn packet_totals(
    State(app): State<AppState>,
    _op: Operator,
) -> Result<Json<crate::packets::PacketTotals>> {
    Ok(Json(app.packets.totals().await?))
}

/// An activity id from the path: one that cannot exist is not found.
fn activity_id(id: &str) -> Result<ActivityId> {
    ActivityId::parse(id).map_err(|_| Error::NotFound(format!("no activity `{id}`")))
}

#[utoipa::path(post, path = "/v1/admin/activities", security(("operator" = [])), tag = "operators",
    request_body = crate::activity::NewActivity,
    responses((status = 201, description = "Created", body = Activity),
        (status = 200, description = "An identical activity existed", body = Activity),
        (status = 409, description = "idempotency_conflict: the id exists with other settings", body = doc::ErrorEnvelope),
        doc::OperatorErrors))]
async fn create_activity(
    State(app): State<AppState>,
    _op: Operator,
    JsonBody(body): JsonBody<NewActivity>,
) -> Result<(StatusCode, Json<Activity>)> {
    Ok(super::created(app.activities.create(body).await?))
}

#[derive(Deserialize)]
struct ListQuery {
    limit: Option<u32>,
}

#[utoipa::path(get, path = "/v1/admin/activities", security(("operator" = [])), tag = "operators",
    params(("limit" = Option<u32>, Query, description = "At most this many (1-1000, default 200)")),
    responses((status = 200, description = "Every activity, the latest to start first", body = doc::ActivityList), doc::OperatorErrors))]
async fn list_activities(
    State(app): State<AppState>,
    _op: Operator,
    Query(q): Query<ListQuery>,
) -> Result<Json<Value>> {
    let limit = q.limit.unwrap_or(200).clamp(1, 1000);
    Ok(Json(
        json!({ "activities": app.activities.list(limit).await? }),
    ))
}

/// What an operator watches: the dependencies, the backlog of each partition stream
/// (entries, and the age of the oldest), and this instance's booking against its bound.
#[utoipa::path(get, path = "/v1/admin/health", security(("operator" = [])), tag = "operators",
    responses((status = 200, description = "Dependencies, backlog per partition, this instance's booking", body = doc::Health), doc::OperatorErrors))]
async fn health(State(app): State<AppState>, _op: Operator) -> Json<Value> {
    let (redis_ok, mysql_ok) = super::public::reachable(&app).await;
    let partitions = if redis_ok {
        backlog(&app).await.unwrap_or_else(|err| {
            tracing::warn!(error = %err, "backlog read failed");
            Vec::new()
        })
    } else {
        Vec::new()
    };
    let paused = app.switches.booking_paused();
    let settle = &app.settings.settle;
    Json(json!({
        "redis": if redis_ok { "ok" } else { "unreachable" },
        "mysql": if mysql_ok { "ok" } else { "unreachable" },
        "backlog": {
            "entries": partitions.iter().map(|p| p["entries"].as_u64().unwrap_or(0)).sum::<u64>(),
            "partitions": partitions,
        },
        "booking": {
            "instance_id": app.settler.instance_id,
            "worker_enabled": settle.enabled,
            "paused": paused,
            "max_tps": settle.max_tps,
            "booked_tokens": app.settler.booked_total(),
        },
        "at": chrono::Utc::now(),
    }))
}

/// Each partition stream's length and the age of its oldest entry (stream ids begin
/// with their creation time in milliseconds).
async fn backlog(app: &crate::app::App) -> redis::RedisResult<Vec<Value>> {
    let mut pipe = redis::pipe();
    for p in 0..app.redis.partitions() {
        let key = app.redis.stream_key(p);
        pipe.xlen(&key).xrange_count(&key, "-", "+", 1);
    }
    let replies: Vec<redis::Value> = app.redis.query(&pipe).await?;
    let now_ms = chrono::Utc::now().timestamp_millis();
    let mut out = Vec::with_capacity(replies.len() / 2);
    for (p, pair) in replies.chunks(2).enumerate() {
        let entries: u64 = redis::from_redis_value(&pair[0])?;
        let oldest: redis::streams::StreamRangeReply = redis::from_redis_value(&pair[1])?;
        let oldest_age_ms = oldest.ids.first().and_then(|e| {
            let ms: i64 = e.id.split('-').next()?.parse().ok()?;
            Some((now_ms - ms).max(0))
        });
        out.push(json!({ "partition": p, "entries": entries, "oldest_age_ms": oldest_age_ms }));
    }
    Ok(out)
}

#[utoipa::path(get, path = "/v1/admin/activities/{id}", security(("operator" = [])), tag = "operators", params(("id" = String, Path, description = "The activity id")),
    responses((status = 200, description = "The activity with its live figures", body = ActivityView), doc::OperatorErrors))]
async fn get_activity(
    State(app): State<AppState>,
    _op: Operator,
    Path(id): Path<String>,
) -> Result<Json<ActivityView>> {
    let id = activity_id(&id)?;
    Ok(Json(app.activities.view(id.as_str()).await?))
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
struct BudgetDelta {
    delta_cents: i64,
}

#[utoipa::path(post, path = "/v1/admin/activities/{id}/budget", security(("operator" = [])), tag = "operators", params(("id" = String, Path, description = "The activity id")),
    request_body = BudgetDelta,
    responses((status = 200, description = "The activity with its new budget", body = ActivityView), doc::OperatorErrors))]
async fn add_budget(
    State(app): State<AppState>,
    _op: Operator,
    Path(id): Path<String>,
    JsonBody(body): JsonBody<BudgetDelta>,
) -> Result<Json<ActivityView>> {
    let delta = Cents::positive(body.delta_cents, "delta_cents")?;
    let id = activity_id(&id)?;
    Ok(Json(app.activities.add_budget(&id, delta).await?))
}

#[utoipa::path(post, path = "/v1/admin/activities/{id}/scenes", security(("operator" = [])), tag = "operators", params(("id" = String, Path, description = "The activity id")),
    request_body = crate::activity::NewScene,
    responses((status = 201, description = "Created", body = Scene),
        (status = 409, description = "idempotency_conflict: the scene exists with other settings", body = doc::ErrorEnvelope),
        doc::OperatorErrors))]
async fn create_scene(
    State(app): State<AppState>,
    _op: Operator,
    Path(id): Path<String>,
    JsonBody(body): JsonBody<NewScene>,
) -> Result<(StatusCode, Json<Scene>)> {
    let id = activity_id(&id)?;
    Ok((
        StatusCode::CREATED,
        Json(app.activities.create_scene(&id, body).await?),
    ))
}

#[utoipa::path(post, path = "/v1/admin/activities/{id}/repair-leak", security(("operator" = [])), tag = "operators", params(("id" = String, Path, description = "The activity id")),
    responses((status = 200, description = "Budget taken but provably never a token, returned", body = doc::RepairResult), doc::OperatorErrors))]
async fn repair_leak(
    State(app): State<AppState>,
    _op: Operator,
    Path(id): Path<String>,
) -> Result<Json<Value>> {
    let repair = app.reconciler.repair_leak(&id).await?;
    Ok(Json(json!({
        "activity_id": id,
        "repaired_cents": repair.repaired_cents,
        "drained_cents": repair.drained_cents,
        "settling_generations": repair.settling_generations,
    })))
}

#[utoipa::path(post, path = "/v1/admin/activities/{id}/release-in-doubt", security(("operator" = [])), tag = "operators", params(("id" = String, Path, description = "The activity id")),
    responses((status = 200, description = "In-doubt budget proven unspent, released", body = doc::ReleaseResult), doc::OperatorErrors))]
async fn release_in_doubt(
    State(app): State<AppState>,
    _op: Operator,
    Path(id): Path<String>,
) -> Result<Json<Value>> {
    let release = app.reconciler.release_in_doubt(&id).await?;
    Ok(Json(json!({
        "activity_id": id,
        "released_cents": release.released_cents,
        "resolved_generations": release.resolved_generations,
        "waiting_generations": release.waiting_generations,
    })))
}

#[derive(Deserialize)]
struct ReportQuery {
    activity_id: Option<String>,
    limit: Option<u32>,
}

#[utoipa::path(get, path = "/v1/admin/reconciliation", security(("operator" = [])), tag = "operators",
    params(("activity_id" = Option<String>, Query, description = "Only this activity's"),
        ("limit" = Option<u32>, Query, description = "At most this many (1-1000, default 100)")),
    responses((status = 200, description = "Stored reports, newest first", body = doc::Reports), doc::OperatorErrors))]
async fn reports(
    State(app): State<AppState>,
    _op: Operator,
    Query(q): Query<ReportQuery>,
) -> Result<Json<Value>> {
    let limit = q.limit.unwrap_or(100).clamp(1, 1000);
    let reports = app
        .reconciler
        .reports(q.activity_id.as_deref(), limit)
        .await?;
    Ok(Json(json!({ "reports": reports })))
}

#[derive(Deserialize)]
struct ParkedQuery {
    limit: Option<u32>,
}

#[utoipa::path(get, path = "/v1/admin/parked", security(("operator" = [])), tag = "operators",
    params(("limit" = Option<u32>, Query, description = "At most this many (1-1000, default 100)")),
    responses((status = 200, description = "Settlement entries the ledger refused, per partition", body = doc::Parked), doc::OperatorErrors))]
async fn parked(
    State(app): State<AppState>,
    _op: Operator,
    Query(q): Query<ParkedQuery>,
) -> Result<Json<Value>> {
    let limit = q.limit.unwrap_or(100).clamp(1, 1000) as usize;
    Ok(Json(
        json!({ "entries": app.reconciler.parked(limit).await? }),
    ))
}

#[utoipa::path(get, path = "/v1/admin/switches", security(("operator" = [])), tag = "operators",
    responses((status = 200, description = "Every switch, its state and effect", body = doc::Switches), doc::OperatorErrors))]
async fn switches(State(app): State<AppState>, _op: Operator) -> Json<Value> {
    Json(json!({ "switches": app.switches.list() }))
}

#[derive(Deserialize, utoipa::ToSchema)]
struct SetSwitch {
    on: bool,
}

#[utoipa::path(put, path = "/v1/admin/switches/{name}", security(("operator" = [])), tag = "operators",
    params(("name" = String, Path, description = "issue_off, booking_paused, views_fallback, ...")),
    request_body = SetSwitch,
    responses((status = 200, description = "Every switch after the change", body = doc::Switches), doc::OperatorErrors))]
async fn set_switch(
    State(app): State<AppState>,
    _op: Operator,
    Path(name): Path<String>,
    JsonBody(body): JsonBody<SetSwitch>,
) -> Result<Json<Value>> {
    app.switches.set(&app.redis, &name, body.on).await?;
    Ok(Json(json!({ "switches": app.switches.list() })))
}

/// A webhook id from the path: one that cannot exist is not found.
fn webhook_id(id: &str) -> Result<i64> {
    id.parse::<i64>()
        .ok()
        .filter(|n| *n > 0)
        .ok_or_else(|| Error::NotFound(format!("no webhook `{id}`")))
}

#[utoipa::path(post, path = "/v1/admin/webhooks", security(("operator" = [])), tag = "operators",
    request_body = crate::events::NewSubscription,
    responses((status = 201, description = "Subscribed (the secret is never shown again)", body = crate::events::Subscription), doc::OperatorErrors))]
async fn create_webhook(
    State(app): State<AppState>,
    _op: Operator,
    JsonBody(body): JsonBody<crate::events::NewSubscription>,
) -> Result<(StatusCode, Json<crate::events::Subscription>)> {
    Ok((StatusCode::CREATED, Json(app.webhooks.create(body).await?)))
}

#[utoipa::path(get, path = "/v1/admin/webhooks", security(("operator" = [])), tag = "operators",
    responses((status = 200, description = "Every subscription", body = doc::Webhooks), doc::OperatorErrors))]
async fn list_webhooks(State(app): State<AppState>, _op: Operator) -> Result<Json<Value>> {
    Ok(Json(json!({ "webhooks": app.webhooks.list().await? })))
}

#[utoipa::path(delete, path = "/v1/admin/webhooks/{id}", security(("operator" = [])), tag = "operators",
    params(("id" = i64, Path, description = "The subscription id")),
    responses((status = 204, description = "Deleted; its pending deliveries are dropped"), doc::OperatorErrors))]
async fn delete_webhook(
    State(app): State<AppState>,
    _op: Operator,
    Path(id): Path<String>,
) -> Result<StatusCode> {
    app.webhooks.delete(webhook_id(&id)?).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(get, path = "/v1/admin/webhooks/{id}/deliveries", security(("operator" = [])), tag = "operators",
    params(("id" = i64, Path, description = "The subscription id"),
        ("limit" = Option<u32>, Query, description = "At most this many (1-1000, default 100)")),
    responses((status = 200, description = "Its deliveries, newest first, with their attempts", body = doc::Deliveries), doc::OperatorErrors))]
async fn webhook_deliveries(
    State(app): State<AppState>,
    _op: Operator,
    Path(id): Path<String>,
    Query(q): Query<ListQuery>,
) -> Result<Json<Value>> {
    let limit = q.limit.unwrap_or(100).clamp(1, 1000);
    let deliveries = app.webhooks.deliveries(webhook_id(&id)?, limit).await?;
    Ok(Json(json!({ "deliveries": deliveries })))
}
