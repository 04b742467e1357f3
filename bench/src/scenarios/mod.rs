//! The scenarios, one file each, in the order `main` runs them: the signing ceiling, the
//! synchronous baseline, the rain of single awards, the rain of batches, withdrawals and
//! wallet views during the backlog, the drains, and the conservation check at the end.

pub mod baseline;
pub mod batch;
pub mod conservation;
pub mod drain;
pub mod floor;
pub mod rain;
pub mod signing;
pub mod views;
pub mod withdraw;

use std::time::Duration;

use serde_json::json;

use crate::bench::{Bench, ACTIVITY};
use crate::product::pb;

/// The award every scenario issues: `user` in rain `rain`, 1 to 88 cents by user.
pub fn award(user: i64, rain: i64) -> pb::AwardRequest {
    pb::AwardRequest {
        user_id: user,
        app_id: 1,
        activity_id: ACTIVITY.into(),
        scene_id: "rain".into(),
        rain_id: rain,
        award_type: "cash".into(),
        amount_cents: 1 + user % 88,
        ..Default::default()
    }
}

/// Creates the run's activity (live, a budget no scenario exhausts) and its scene.
pub async fn create_activity(bench: &Bench) -> anyhow::Result<()> {
    let now = chrono::Utc::now();
    bench
        .api
        .admin_post(
            "/v1/admin/activities",
            &json!({"id": ACTIVITY, "name": "Benchmark rain", "stage": "live",
                    "starts_at": (now - chrono::Duration::minutes(1)).to_rfc3339(),
                    "ends_at": (now + chrono::Duration::hours(2)).to_rfc3339(),
                    "budget_cents": 1_000_000_000_000i64, "max_award_cents": 100}),
        )
        .await?;
    bench
        .api
        .admin_post(
            &format!("/v1/admin/activities/{ACTIVITY}/scenes"),
            &json!({"id": "rain", "name": "Rain", "award_type": "cash"}),
        )
        .await?;
    // Let every instance's activity cache see the new activity.
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    Ok(())
}
