//! Activities and scenes: the operator API, the MySQL rows, and the in-process cache the
//! issuing path reads (refreshed on a timer, never a MySQL read per award).

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::{Json, Router};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sqlx::Row;

use crate::domain::{ActivityId, AwardType, Cents, SceneId, Stage, MAX_CENTS};
use crate::error::{ApiError, ApiResult};
use crate::http::{JsonBody, Operator};
use crate::startup::AppState;

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Activity {
    pub id: String,
    pub name: String,
    pub stage: Stage,
    pub starts_at: DateTime<Utc>,
    pub ends_at: DateTime<Utc>,
    pub budget_cents: i64,
    pub max_award_cents: i64,
}

impl Activity {
    pub fn is_open_at(&self, now: DateTime<Utc>) -> bool {
        self.starts_at <= now && now < self.ends_at
    }
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Scene {
    pub activity_id: String,
    pub id: String,
    pub name: String,
    pub award_type: String,
    pub rate_limit_per_s: Option<u32>,
    pub admission_fraction: Option<f64>,
}

/// One activity with its scenes, as the cache holds it.
#[derive(Debug, Clone)]
pub struct CachedActivity {
    pub activity: Activity,
    pub scenes: HashMap<String, Scene>,
}

/// Activity and scene settings in process memory. Readers take a cheap `Arc` snapshot;
/// a refresh swaps the whole map, so a reader never sees half an update.
#[derive(Default)]
pub struct ActivityCache {
    snapshot: RwLock<Arc<HashMap<String, Arc<CachedActivity>>>>,
}

impl ActivityCache {
    pub fn get(&self, id: &str) -> Option<Arc<CachedActivity>> {
        self.snapshot
            .read()
            .expect("activity cache lock poisoned")
            .get(id)
            .cloned()
    }

    pub fn all(&self) -> Vec<Arc<CachedActivity>> {
        self.snapshot
            .read()
            .expect("activity cache lock poisoned")
            .values()
            .cloned()
            .collect()
    }

    /// Reloads every activity and scene from MySQL and returns the activities whose
    /// budget differs from the previous snapshot (their sub-stocks need funding).
    pub async fn refresh(&self, pool: &sqlx::MySqlPool) -> anyhow::Result<Vec<Activity>> {
        let activities = sqlx::query(
            "SELECT id, name, stage, starts_at, ends_at, budget_cents, max_award_cents FROM activities",
        )
        .fetch_all(pool)
        .await?;
        let scenes = sqlx::query(
            "SELECT activity_id, id, name, award_type, rate_limit_per_s, admission_fraction FROM scenes",
        )
        .fetch_all(pool)
        .await?;
        let mut map: HashMap<String, CachedActivity> = HashMap::with_capacity(activities.len());
        for row in activities {
            // One bad row (a hand edit, a value out of range) must not keep every other
            // activity from loading: it is logged and left out.
            let activity = match activity_from_row(&row) {
                Ok(a) => a,
                Err(err) => {
                    let id: String = row.try_get("id").unwrap_or_default();
                    tracing::error!(
                        activity = id,
                        error = format!("{err:#}"),
                        "activity row unreadable; left out of the cache"
                    );
                    continue;
                }
            };
            map.insert(
                activity.id.clone(),
                CachedActivity {
                    activity,
                    scenes: HashMap::new(),
                },
            );
        }
        for row in scenes {
            let scene = match scene_from_row(&row) {
                Ok(s) => s,
                Err(err) => {
                    tracing::error!(
                        error = format!("{err:#}"),
                        "scene row unreadable; left out of the cache"
                    );
                    continue;
                }
            };
            if let Some(entry) = map.get_mut(&scene.activity_id) {
                entry.scenes.insert(scene.id.clone(), scene);
            }
        }
        let fresh: HashMap<String, Arc<CachedActivity>> =
            map.into_iter().map(|(k, v)| (k, Arc::new(v))).collect();
        let mut guard = self.snapshot.write().expect("activity cache lock poisoned");
        let changed = fresh
            .values()
            .filter(|new| {
                guard
                    .get(&new.activity.id)
                    .is_none_or(|old| old.activity.budget_cents != new.activity.budget_cents)
            })
            .map(|a| a.activity.clone())
            .collect();
        *guard = Arc::new(fresh);
        Ok(changed)
    }
}

fn activity_from_row(row: &sqlx::mysql::MySqlRow) -> anyhow::Result<Activity> {
    let stage: String = row.try_get("stage")?;
    let budget: i64 = row.try_get("budget_cents")?;
    let cap: i64 = row.try_get("max_award_cents")?;
    for (field, value) in [("budget_cents", budget), ("max_award_cents", cap)] {
        Cents::positive(value, field).map_err(|e| anyhow::anyhow!("stored {field}: {e}"))?;
    }
    Ok(Activity {
        id: row.try_get("id")?,
        name: row.try_get("name")?,
        stage: stage
            .parse()
            .map_err(|e| anyhow::anyhow!("stored stage: {e}"))?,
        starts_at: row
            .try_get::<chrono::NaiveDateTime, _>("starts_at")?
            .and_utc(),
        ends_at: row
            .try_get::<chrono::NaiveDateTime, _>("ends_at")?
            .and_utc(),
        budget_cents: row.try_get("budget_cents")?,
        max_award_cents: row.try_get("max_award_cents")?,
    })
}

fn scene_from_row(row: &sqlx::mysql::MySqlRow) -> anyhow::Result<Scene> {
    Ok(Scene {
        activity_id: row.try_get("activity_id")?,
        id: row.try_get("id")?,
        name: row.try_get("name")?,
        award_type: row.try_get("award_type")?,
        rate_limit_per_s: row
            .try_get::<Option<i32>, _>("rate_limit_per_s")?
            .map(|v| v.max(0) as u32),
        admission_fraction: row.try_get("admission_fraction")?,
    })
}

pub async fn load_activity(pool: &sqlx::MySqlPool, id: &str) -> ApiResult<Activity> {
    let row = sqlx::query(
        "SELECT id, name, stage, starts_at, ends_at, budget_cents, max_award_cents FROM activities WHERE id = ?",
    )
    .bind(id)
    .fetch_optional(pool)
    .await?
    .ok_or_else(|| ApiError::NotFound(format!("no activity `{id}`")))?;
    Ok(activity_from_row(&row)?)
}

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/v1/admin/activities", post(create_activity))
        .route("/v1/admin/activities/{id}", get(get_activity))
        .route("/v1/admin/activities/{id}/budget", post(add_budget))
        .route("/v1/admin/activities/{id}/scenes", post(create_scene))
        .route(
            "/v1/admin/activities/{id}/repair-leak",
            post(crate::reconcile::repair_leak_handler),
        )
        .route(
            "/v1/admin/activities/{id}/release-in-doubt",
            post(crate::reconcile::release_in_doubt_handler),
        )
}

#[derive(Debug, Deserialize)]
pub struct NewActivity {
    pub id: String,
    pub name: String,
    pub stage: String,
    pub starts_at: DateTime<Utc>,
    pub ends_at: DateTime<Utc>,
    pub budget_cents: i64,
    pub max_award_cents: i64,
}

/// Checks every rule before anything is written.
fn parse_new_activity(body: NewActivity) -> ApiResult<Activity> {
    let id = ActivityId::parse(&body.id)?;
    let name = body.name.trim();
    if name.is_empty() || name.len() > 128 {
        return Err(ApiError::InvalidRequest(
            "name must be 1-128 characters".into(),
        ));
    }
    let stage: Stage = body.stage.parse()?;
    if body.ends_at <= body.starts_at {
        return Err(ApiError::InvalidRequest(
            "ends_at must be after starts_at".into(),
        ));
    }
    let budget = Cents::positive(body.budget_cents, "budget_cents")?;
    let cap = Cents::positive(body.max_award_cents, "max_award_cents")?;
    // Times are stored with millisecond precision; truncate now so what we return is
    // exactly what a later read gives back.
    let ms = |t: DateTime<Utc>| DateTime::from_timestamp_millis(t.timestamp_millis()).unwrap_or(t);
    Ok(Activity {
        id: id.as_str().to_string(),
        name: name.to_string(),
        stage,
        starts_at: ms(body.starts_at),
        ends_at: ms(body.ends_at),
        budget_cents: budget.0,
        max_award_cents: cap.0,
    })
}

async fn create_activity(
    State(app): State<AppState>,
    _op: Operator,
    JsonBody(body): JsonBody<NewActivity>,
) -> ApiResult<(StatusCode, Json<Activity>)> {
    let activity = parse_new_activity(body)?;
    // The activity and its first budget generation are created together; the budget
    // itself stays in MySQL until grants move it to Redis.
    let mut tx = app.db.main().begin().await?;
    let inserted = sqlx::query(
        "INSERT IGNORE INTO activities (id, name, stage, starts_at, ends_at, budget_cents, max_award_cents) VALUES (?, ?, ?, ?, ?, ?, ?)",
    )
    .bind(&activity.id)
    .bind(&activity.name)
    .bind(activity.stage.as_str())
    .bind(activity.starts_at.naive_utc())
    .bind(activity.ends_at.naive_utc())
    .bind(activity.budget_cents)
    .bind(activity.max_award_cents)
    .execute(&mut *tx)
    .await?
    .rows_affected();
    if inserted == 1 {
        app.budget.open_first(&mut tx, &activity.id).await?;
    }
    tx.commit().await?;
    if inserted == 0 {
        let existing = load_activity(app.db.main(), &activity.id).await?;
        if existing == activity {
            return Ok((StatusCode::OK, Json(existing)));
        }
        return Err(ApiError::IdempotencyConflict(format!(
            "activity `{}` exists with other settings",
            activity.id
        )));
    }
    app.refresh_activities().await?;
    Ok((StatusCode::CREATED, Json(activity)))
}

#[derive(Debug, Serialize)]
pub struct ActivityView {
    #[serde(flatten)]
    pub activity: Activity,
    pub scenes: Vec<Scene>,
    /// What may still be issued: ungranted + what the live sub-stocks hold.
    pub budget_remaining_cents: i64,
    pub budget_taken_cents: i64,
    /// Moved to Redis by grants and not given back.
    pub budget_granted_cents: i64,
    /// Only MySQL holds it: budget - granted.
    pub budget_ungranted_cents: i64,
    /// Granted, then lost with Redis; frozen until `release-in-doubt`.
    pub budget_in_doubt_cents: i64,
    /// What the live sub-stocks hold now.
    pub budget_available_cents: i64,
    pub issued_cents: i64,
    pub issued_count: i64,
    pub booked_cents: i64,
    pub booked_count: i64,
    pub pending_cents: i64,
    pub pending_count: i64,
}

pub async fn activity_view(app: &crate::startup::App, id: &str) -> ApiResult<ActivityView> {
    let activity = load_activity(app.db.main(), id).await?;
    let mut scenes: Vec<Scene> = sqlx::query(
        "SELECT activity_id, id, name, award_type, rate_limit_per_s, admission_fraction FROM scenes WHERE activity_id = ? ORDER BY id",
    )
    .bind(id)
    .fetch_all(app.db.main())
    .await?
    .iter()
    .map(scene_from_row)
    .collect::<anyhow::Result<_>>()?;
    scenes.sort_by(|a, b| a.id.cmp(&b.id));
    let budget = app
        .budget
        .figures(&app.redis, &app.db, id)
        .await
        .map_err(ApiError::Internal)?;
    let issued = crate::reconcile::issued_totals(&app.redis, id).await?;
    let booked = crate::reconcile::booked_totals(&app.db, id, None).await?;
    Ok(ActivityView {
        activity,
        scenes,
        budget_remaining_cents: budget.remaining_cents,
        budget_taken_cents: budget.taken_cents,
        budget_granted_cents: budget.granted_cents,
        budget_ungranted_cents: budget.ungranted_cents,
        budget_in_doubt_cents: budget.in_doubt_cents,
        budget_available_cents: budget.available_cents,
        issued_cents: issued.cents,
        issued_count: issued.count,
        booked_cents: booked.cents,
        booked_count: booked.count,
        pending_cents: issued.cents - booked.cents,
        pending_count: issued.count - booked.count,
    })
}

async fn get_activity(
    State(app): State<AppState>,
    _op: Operator,
    Path(id): Path<String>,
) -> ApiResult<Json<ActivityView>> {
    let id =
        ActivityId::parse(&id).map_err(|_| ApiError::NotFound(format!("no activity `{id}`")))?;
    Ok(Json(activity_view(&app, id.as_str()).await?))
}

#[derive(Debug, Deserialize)]
struct BudgetDelta {
    delta_cents: i64,
}

async fn add_budget(
    State(app): State<AppState>,
    _op: Operator,
    Path(id): Path<String>,
    JsonBody(body): JsonBody<BudgetDelta>,
) -> ApiResult<Json<ActivityView>> {
    let delta = Cents::positive(body.delta_cents, "delta_cents")?;
    let id =
        ActivityId::parse(&id).map_err(|_| ApiError::NotFound(format!("no activity `{id}`")))?;
    let current = load_activity(app.db.main(), id.as_str()).await?;
    if current
        .budget_cents
        .checked_add(delta.0)
        .is_none_or(|b| b > MAX_CENTS)
    {
        return Err(ApiError::InvalidRequest(format!(
            "the budget would exceed the maximum of {MAX_CENTS} cents"
        )));
    }
    // The bound is checked again in the statement: a concurrent add cannot pass it.
    let updated = sqlx::query(
        "UPDATE activities SET budget_cents = budget_cents + ? WHERE id = ? AND budget_cents <= ? - ?",
    )
    .bind(delta.0)
    .bind(id.as_str())
    .bind(MAX_CENTS)
    .bind(delta.0)
    .execute(app.db.main())
    .await?
    .rows_affected();
    if updated == 0 {
        return Err(ApiError::InvalidRequest(format!(
            "the budget would exceed the maximum of {MAX_CENTS} cents"
        )));
    }
    // MySQL holds the budget; grants move the new part to Redis as it is needed.
    app.budget.forget_exhausted(id.as_str());
    app.refresh_activities().await?;
    Ok(Json(activity_view(&app, id.as_str()).await?))
}

#[derive(Debug, Deserialize)]
pub struct NewScene {
    pub id: String,
    pub name: String,
    pub award_type: String,
    #[serde(default)]
    pub rate_limit_per_s: Option<u32>,
    #[serde(default)]
    pub admission_fraction: Option<f64>,
}

async fn create_scene(
    State(app): State<AppState>,
    _op: Operator,
    Path(activity_id): Path<String>,
    JsonBody(body): JsonBody<NewScene>,
) -> ApiResult<(StatusCode, Json<Scene>)> {
    let activity_id = ActivityId::parse(&activity_id)
        .map_err(|_| ApiError::NotFound(format!("no activity `{activity_id}`")))?;
    let scene_id = SceneId::parse(&body.id)?;
    let award_type = AwardType::parse(&body.award_type)?;
    let name = body.name.trim();
    if name.is_empty() || name.len() > 128 {
        return Err(ApiError::InvalidRequest(
            "name must be 1-128 characters".into(),
        ));
    }
    if let Some(f) = body.admission_fraction {
        if !(0.0..=1.0).contains(&f) {
            return Err(ApiError::InvalidRequest(
                "admission_fraction must be between 0.0 and 1.0".into(),
            ));
        }
    }
    if body.rate_limit_per_s == Some(0) || body.rate_limit_per_s.is_some_and(|r| r > 10_000_000) {
        return Err(ApiError::InvalidRequest(
            "rate_limit_per_s must be 1..=10000000".into(),
        ));
    }
    load_activity(app.db.main(), activity_id.as_str()).await?;
    let scene = Scene {
        activity_id: activity_id.as_str().to_string(),
        id: scene_id.as_str().to_string(),
        name: name.to_string(),
        award_type: award_type.as_str().to_string(),
        rate_limit_per_s: body.rate_limit_per_s,
        admission_fraction: body.admission_fraction,
    };
    let inserted = sqlx::query(
        "INSERT IGNORE INTO scenes (activity_id, id, name, award_type, rate_limit_per_s, admission_fraction) VALUES (?, ?, ?, ?, ?, ?)",
    )
    .bind(&scene.activity_id)
    .bind(&scene.id)
    .bind(&scene.name)
    .bind(&scene.award_type)
    .bind(scene.rate_limit_per_s.map(|v| v as i32))
    .bind(scene.admission_fraction)
    .execute(app.db.main())
    .await?
    .rows_affected();
    if inserted == 0 {
        return Err(ApiError::IdempotencyConflict(format!(
            "scene `{}` already exists in activity `{}`",
            scene.id, scene.activity_id
        )));
    }
    app.refresh_activities().await?;
    Ok((StatusCode::CREATED, Json(scene)))
}
