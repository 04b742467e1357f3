//! The `activities` and `scenes` rows.

use sqlx::MySqlPool;

use super::cache::{activity_from_row, scene_from_row};
use super::{Activity, Scene};
use crate::budget::Budget;
use crate::domain::{Cents, MAX_CENTS};
use crate::error::{Error, Result};
use crate::store::Db;

pub async fn load_activity(pool: &MySqlPool, id: &str) -> Result<Activity> {
    let row = sqlx::query(
        "SELECT id, name, stage, starts_at, ends_at, budget_cents, max_award_cents FROM activities WHERE id = ? AND kind = 'cash'",
    )
    .bind(id)
    .fetch_optional(pool)
    .await?
    .ok_or_else(|| Error::NotFound(format!("no activity `{id}`")))?;
    Ok(activity_from_row(&row)?)
}

/// Every activity, the latest to start first (at most `limit`).
pub async fn list_activities(pool: &MySqlPool, limit: u32) -> Result<Vec<Activity>> {
    let rows = sqlx::query(
        "SELECT id, name, stage, starts_at, ends_at, budget_cents, max_award_cents FROM activities WHERE kind = 'cash' ORDER BY starts_at DESC, id LIMIT ?",
    )
    .bind(limit)
    .fetch_all(pool)
    .await?;
    Ok(rows
        .iter()
        .map(activity_from_row)
        .collect::<anyhow::Result<_>>()?)
}

/// Inserts the activity and its first budget generation together (the budget itself
/// stays in MySQL until grants move it to Redis); false when the id exists.
pub async fn insert_activity(db: &Db, budget: &Budget, activity: &Activity) -> Result<bool> {
    let mut tx = db.main().begin().await?;
    let inserted = sqlx::query(
        "INSERT IGNORE INTO activities (id, name, stage, starts_at, ends_at, budget_cents, max_award_cents) VALUES (?, ?, ?, ?, ?, ?, ?)",
    )
    .bind(activity.id.as_str())
    .bind(&activity.name)
    .bind(activity.stage.as_str())
    .bind(activity.starts_at.naive_utc())
    .bind(activity.ends_at.naive_utc())
    .bind(activity.budget_cents.get())
    .bind(activity.max_award_cents.get())
    .execute(&mut *tx)
    .await?
    .rows_affected()
        == 1;
    if inserted {
        budget.open_first(&mut tx, activity.id.as_str()).await?;
    }
    tx.commit().await?;
    Ok(inserted)
}

/// Adds `delta` to the budget unless the sum would pass [`MAX_CENTS`], checked in the
/// statement so a concurrent add cannot pass it; false when refused.
pub async fn add_budget(pool: &MySqlPool, id: &str, delta: Cents) -> Result<bool> {
    let updated = sqlx::query(
        "UPDATE activities SET budget_cents = budget_cents + ? WHERE id = ? AND kind = 'cash' AND budget_cents <= ? - ?",
    )
    .bind(delta.get())
    .bind(id)
    .bind(MAX_CENTS)
    .bind(delta.get())
    .execute(pool)
    .await?
    .rows_affected();
    Ok(updated == 1)
}

/// False when the scene exists.
pub async fn insert_scene(pool: &MySqlPool, scene: &Scene) -> Result<bool> {
    let inserted = sqlx::query(
        "INSERT IGNORE INTO scenes (activity_id, id, name, award_type, rate_limit_per_s, admission_fraction, guards, coupon) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
    )
    .bind(scene.activity_id.as_str())
    .bind(scene.id.as_str())
    .bind(&scene.name)
    .bind(scene.award_type.as_str())
    .bind(scene.rate_limit_per_s.map(|v| v as i32))
    .bind(scene.admission_fraction)
    .bind(if scene.guards.any() {
        serde_json::to_string(&scene.guards).unwrap_or_default()
    } else {
        String::new()
    })
    .bind(
        scene
            .coupon
            .as_ref()
            .map(|c| serde_json::to_string(c).unwrap_or_default())
            .unwrap_or_default(),
    )
    .execute(pool)
    .await?
    .rows_affected();
    Ok(inserted == 1)
}

pub async fn scenes_of(pool: &MySqlPool, activity: &str) -> Result<Vec<Scene>> {
    let rows = sqlx::query(
        "SELECT activity_id, id, name, award_type, rate_limit_per_s, admission_fraction, guards, coupon FROM scenes WHERE activity_id = ? ORDER BY id",
    )
    .bind(activity)
    .fetch_all(pool)
    .await?;
    let scenes: Vec<Scene> = rows
        .iter()
        .map(scene_from_row)
        .collect::<anyhow::Result<_>>()?;
    Ok(scenes)
}
