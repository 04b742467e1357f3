//! The in-process activity cache the issuing path reads (refreshed on a timer, never a
//! MySQL read per award), and the decoding of activity and scene rows.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use sqlx::Row;

use super::{Activity, Scene};
use crate::coupons::Template;
use crate::domain::{ActivityId, AwardType, Cents, SceneId};

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
    /// Refreshes started, and the start number of the one installed: a refresh whose
    /// reads began before another's is not installed over it (a background refresh
    /// that read just before an activity was created would otherwise drop it until the
    /// next one).
    started: std::sync::atomic::AtomicU64,
    installed: std::sync::atomic::AtomicU64,
    /// Coupon templates (never changed once created), installed with the activities.
    templates: RwLock<Arc<HashMap<String, Arc<Template>>>>,
}

impl ActivityCache {
    pub fn get(&self, id: &str) -> Option<Arc<CachedActivity>> {
        self.snapshot
            .read()
            .expect("activity cache lock poisoned")
            .get(id)
            .cloned()
    }

    /// The coupon templates.
    pub fn templates(&self) -> Arc<HashMap<String, Arc<Template>>> {
        self.templates
            .read()
            .expect("template cache lock poisoned")
            .clone()
    }

    pub fn all(&self) -> Vec<Arc<CachedActivity>> {
        self.snapshot
            .read()
            .expect("activity cache lock poisoned")
            .values()
            .cloned()
            .collect()
    }

    /// Reloads every activity and scene from MySQL and swaps the snapshot whole. (The
    /// budget is not funded from here: grants follow the budget in MySQL, see
    /// `Activities::refresh`.)
    pub async fn refresh(&self, pool: &sqlx::MySqlPool) -> anyhow::Result<()> {
        use std::sync::atomic::Ordering;
        let seq = self.started.fetch_add(1, Ordering::SeqCst) + 1;
        let activities = sqlx::query(
            "SELECT id, name, stage, starts_at, ends_at, budget_cents, max_award_cents FROM activities",
        )
        .fetch_all(pool)
        .await?;
        let scenes = sqlx::query(
            "SELECT activity_id, id, name, award_type, rate_limit_per_s, admission_fraction, guards, coupon FROM scenes",
        )
        .fetch_all(pool)
        .await?;
        let templates = crate::coupons::load_templates(pool, None).await?;
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
                activity.id.to_string(),
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
            if let Some(entry) = map.get_mut(scene.activity_id.as_str()) {
                entry.scenes.insert(scene.id.to_string(), scene);
            }
        }
        let fresh: HashMap<String, Arc<CachedActivity>> =
            map.into_iter().map(|(k, v)| (k, Arc::new(v))).collect();
        let mut snapshot = self.snapshot.write().expect("activity cache lock poisoned");
        if seq > self.installed.load(Ordering::SeqCst) {
            self.installed.store(seq, Ordering::SeqCst);
            *snapshot = Arc::new(fresh);
            *self
                .templates
                .write()
                .expect("template cache lock poisoned") = Arc::new(
                templates
                    .into_iter()
                    .map(|t| (t.id.clone(), Arc::new(t)))
                    .collect(),
            );
        }
        Ok(())
    }
}

pub(super) fn activity_from_row(row: &sqlx::mysql::MySqlRow) -> anyhow::Result<Activity> {
    let stage: String = row.try_get("stage")?;
    let cents = |field: &str| -> anyhow::Result<Cents> {
        Cents::positive(row.try_get(field)?, field)
            .map_err(|e| anyhow::anyhow!("stored {field}: {e}"))
    };
    let id: String = row.try_get("id")?;
    Ok(Activity {
        id: ActivityId::parse(&id).map_err(|e| anyhow::anyhow!("stored id: {e}"))?,
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
        budget_cents: cents("budget_cents")?,
        max_award_cents: cents("max_award_cents")?,
    })
}

pub(super) fn scene_from_row(row: &sqlx::mysql::MySqlRow) -> anyhow::Result<Scene> {
    let text = |field: &str| -> anyhow::Result<String> { Ok(row.try_get(field)?) };
    let bad = |field: &'static str| {
        move |e: crate::domain::Invalid| anyhow::anyhow!("stored {field}: {e}")
    };
    Ok(Scene {
        activity_id: ActivityId::parse(&text("activity_id")?).map_err(bad("activity_id"))?,
        id: SceneId::parse(&text("id")?).map_err(bad("id"))?,
        name: row.try_get("name")?,
        award_type: AwardType::parse(&text("award_type")?).map_err(bad("award_type"))?,
        rate_limit_per_s: row
            .try_get::<Option<i32>, _>("rate_limit_per_s")?
            .map(|v| v.max(0) as u32),
        admission_fraction: row.try_get("admission_fraction")?,
        guards: {
            let text: String = row.try_get("guards")?;
            if text.is_empty() {
                Default::default()
            } else {
                serde_json::from_str(&text).map_err(|e| anyhow::anyhow!("stored guards: {e}"))?
            }
        },
        coupon: {
            let text: String = row.try_get("coupon")?;
            if text.is_empty() {
                None
            } else {
                Some(
                    serde_json::from_str(&text)
                        .map_err(|e| anyhow::anyhow!("stored coupon: {e}"))?,
                )
            }
        },
    })
}
