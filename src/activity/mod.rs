//! Activities and scenes: their rules, the MySQL rows, the in-process cache the issuing
//! path reads, and the operator's view of one activity (settings, budget, issued,
//! booked and pending).

mod cache;
mod repo;

use std::sync::Arc;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::budget::Budget;
use crate::domain::{ActivityId, AwardType, Cents, SceneId, Stage, MAX_CENTS};
use crate::error::{Error, Result};
use crate::ledger::Ledger;
use crate::store::{Db, Redis};
use crate::tokens::Tokens;

/// How old a budget close still waiting for its drain must be before the refresh
/// finishes it: a close in progress drains within milliseconds of committing.
const CUT_OFF_CLOSE_AGE: std::time::Duration = std::time::Duration::from_secs(2);

pub use cache::{ActivityCache, CachedActivity};

#[derive(Debug, Clone, Serialize, PartialEq, utoipa::ToSchema)]
pub struct Activity {
    #[schema(value_type = String)]
    pub id: ActivityId,
    pub name: String,
    /// test, gray or live.
    #[schema(value_type = String)]
    pub stage: Stage,
    pub starts_at: DateTime<Utc>,
    pub ends_at: DateTime<Utc>,
    #[schema(value_type = i64)]
    pub budget_cents: Cents,
    #[schema(value_type = i64)]
    pub max_award_cents: Cents,
}

impl Activity {
    pub fn is_open_at(&self, now: DateTime<Utc>) -> bool {
        self.starts_at <= now && now < self.ends_at
    }
}

#[derive(Debug, Clone, Serialize, PartialEq, utoipa::ToSchema)]
pub struct Scene {
    #[schema(value_type = String)]
    pub activity_id: ActivityId,
    #[schema(value_type = String)]
    pub id: SceneId,
    pub name: String,
    #[schema(value_type = String)]
    pub award_type: AwardType,
    pub rate_limit_per_s: Option<u32>,
    pub admission_fraction: Option<f64>,
    /// The seckill guards this scene turns on (all off by default).
    #[serde(default)]
    pub guards: SceneGuards,
    /// A coupon scene's template and fallback (award_type `coupon`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub coupon: Option<SceneCoupon>,
}

/// What a coupon scene hands out.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SceneCoupon {
    /// The template each award is a coupon of.
    pub template_id: String,
    /// Handed out instead once the template runs low.
    #[serde(default)]
    pub fallback: Option<CouponFallback>,
}

/// A coupon scene's fallback: once the template's remaining stock is under
/// `under_share` of its stock (or gone), awards get a coupon of `template_id`, or
/// only `greeting` (no value, no token). Exactly one of the two.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CouponFallback {
    /// 0.0-1.0 (the seed used 0.1).
    pub under_share: f64,
    #[serde(default)]
    pub template_id: Option<String>,
    #[serde(default)]
    pub greeting: Option<String>,
}

/// Seckill guards of a scene (see `issue::guards`), each optional.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(default, deny_unknown_fields)]
pub struct SceneGuards {
    /// A user wins this scene once, whatever the rain: a second award is refused with
    /// 409 `already_won` (a retry of the winning one is still answered).
    pub one_win_per_user: bool,
    /// Awards before this moment are refused (422 `activity_closed`) and the user
    /// flagged (`early`).
    #[schema(value_type = Option<String>)]
    pub opens_at: Option<chrono::DateTime<chrono::Utc>>,
    /// A user whose requests reach issuing more than once within one second is flagged
    /// (`burst`).
    pub flag_bursts: bool,
    /// Flagged users are refused here (403 `forbidden`).
    pub refuse_flagged: bool,
}

impl SceneGuards {
    pub fn any(&self) -> bool {
        *self != SceneGuards::default()
    }

    /// Whether a guard kept in Redis is on (`issue::guards::Guards::check_shared`).
    pub fn in_redis(&self) -> bool {
        self.flag_bursts || self.refuse_flagged || self.one_win_per_user
    }
}

/// The activities capability. Cheap to clone.
#[derive(Clone)]
pub struct Activities {
    db: Arc<Db>,
    redis: Arc<Redis>,
    cache: Arc<ActivityCache>,
    budget: Arc<Budget>,
    tokens: Tokens,
    ledger: Ledger,
}

/// Whether a create was new or a repeat of an identical one.
pub enum Created<T> {
    New(T),
    Existing(T),
}

impl Activities {
    pub fn new(
        db: Arc<Db>,
        redis: Arc<Redis>,
        cache: Arc<ActivityCache>,
        budget: Arc<Budget>,
        tokens: Tokens,
        ledger: Ledger,
    ) -> Self {
        Self {
            db,
            redis,
            cache,
            budget,
            tokens,
            ledger,
        }
    }

    pub fn cache(&self) -> &Arc<ActivityCache> {
        &self.cache
    }

    /// Reloads the cache and the live budget generations, and keeps the sub-stocks of
    /// activities not ended yet funded by grants. One activity failing to refill does
    /// not keep the others from it.
    pub async fn refresh(&self) -> anyhow::Result<()> {
        self.cache.refresh(self.db.main()).await?;
        self.budget.refresh_live(&self.redis, &self.db).await?;
        if let Err(err) = self
            .budget
            .finish_cut_off_closes(&self.redis, &self.db, CUT_OFF_CLOSE_AGE)
            .await
        {
            tracing::warn!(
                error = format!("{err:#}"),
                "looking for cut-off budget closes failed"
            );
        }
        let now = Utc::now();
        for cached in self.cache.all() {
            let a = &cached.activity;
            if a.ends_at <= now {
                continue;
            }
            if let Err(err) = self
                .budget
                .refill(
                    &self.redis,
                    &self.db,
                    a.id.as_str(),
                    a.budget_cents.get(),
                    a.max_award_cents.get(),
                )
                .await
            {
                tracing::warn!(
                    activity = %a.id,
                    error = format!("{err:#}"),
                    "budget refill failed; will retry"
                );
            }
        }
        Ok(())
    }

    /// Moves each activity's budget into the configured sub-stock layout, if it changed.
    pub async fn relayout_all(&self) {
        for cached in self.cache.all() {
            if let Err(err) = self
                .budget
                .relayout(&self.redis, &self.db, cached.activity.id.as_str())
                .await
            {
                tracing::warn!(
                    activity = %cached.activity.id,
                    error = format!("{err:#}"),
                    "budget re-layout failed; will use the current layout"
                );
            }
        }
    }

    /// Every activity (settings only; the figures are [`Activities::view`]'s), the
    /// latest to start first.
    pub async fn list(&self, limit: u32) -> Result<Vec<Activity>> {
        repo::list_activities(self.db.main(), limit).await
    }

    pub async fn load(&self, id: &str) -> Result<Activity> {
        repo::load_activity(self.db.main(), id).await
    }

    /// Creates an activity and its first budget generation; an identical repeat is
    /// answered with the existing one, a different one is a conflict.
    pub async fn create(&self, body: NewActivity) -> Result<Created<Activity>> {
        let activity = parse_new_activity(body)?;
        let inserted = repo::insert_activity(&self.db, &self.budget, &activity).await?;
        if !inserted {
            let existing = match self.load(activity.id.as_str()).await {
                Err(Error::NotFound(_)) => {
                    return Err(Error::IdempotencyConflict(format!(
                        "`{}` is the id of a coupon template",
                        activity.id
                    )))
                }
                other => other?,
            };
            if existing == activity {
                return Ok(Created::Existing(existing));
            }
            return Err(Error::IdempotencyConflict(format!(
                "activity `{}` exists with other settings",
                activity.id
            )));
        }
        self.refresh().await?;
        Ok(Created::New(activity))
    }

    /// Raises an activity's budget by `delta`. MySQL holds the budget; grants move the
    /// new part to Redis as it is needed.
    pub async fn add_budget(&self, id: &ActivityId, delta: Cents) -> Result<ActivityView> {
        let current = self.load(id.as_str()).await?;
        let too_much = || {
            Error::InvalidRequest(format!(
                "the budget would exceed the maximum of {MAX_CENTS} cents"
            ))
        };
        current
            .budget_cents
            .checked_add(delta)
            .ok_or_else(too_much)?;
        if !repo::add_budget(self.db.main(), id.as_str(), delta).await? {
            return Err(too_much());
        }
        self.budget.forget_exhausted(id.as_str());
        self.refresh().await?;
        self.view(id.as_str()).await
    }

    pub async fn create_scene(&self, activity_id: &ActivityId, body: NewScene) -> Result<Scene> {
        let scene = parse_new_scene(activity_id, body)?;
        self.load(activity_id.as_str()).await?;
        if let Some(c) = &scene.coupon {
            let mut ids = vec![c.template_id.as_str()];
            ids.extend(c.fallback.as_ref().and_then(|f| f.template_id.as_deref()));
            let found = crate::coupons::load_templates(self.db.main(), Some(&ids)).await?;
            if let Some(missing) = ids.iter().find(|id| !found.iter().any(|t| t.id == **id)) {
                return Err(Error::NotFound(format!("no coupon template `{missing}`")));
            }
        }
        if !repo::insert_scene(self.db.main(), &scene).await? {
            return Err(Error::IdempotencyConflict(format!(
                "scene `{}` already exists in activity `{}`",
                scene.id, scene.activity_id
            )));
        }
        self.refresh().await?;
        Ok(scene)
    }

    /// The operator's view: settings, scenes, budget figures, issued and booked totals.
    pub async fn view(&self, id: &str) -> Result<ActivityView> {
        let activity = self.load(id).await?;
        let scenes = repo::scenes_of(self.db.main(), id).await?;
        let budget = self
            .budget
            .figures(&self.redis, &self.db, id)
            .await
            .map_err(Error::Internal)?;
        let issued = self.tokens.issued_totals(id).await?;
        let booked = self.ledger.totals(id, None).await?;
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
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
pub struct NewActivity {
    /// 1-32 of [a-z0-9-].
    pub id: String,
    pub name: String,
    /// test, gray or live.
    pub stage: String,
    pub starts_at: DateTime<Utc>,
    pub ends_at: DateTime<Utc>,
    pub budget_cents: i64,
    pub max_award_cents: i64,
}

/// Checks every rule before anything is written.
fn parse_new_activity(body: NewActivity) -> Result<Activity> {
    let id = ActivityId::parse(&body.id)?;
    if id.as_str() == crate::packets::PACKETS_ACTIVITY {
        return Err(Error::InvalidRequest(format!(
            "id `{}` is reserved for red packet shares",
            crate::packets::PACKETS_ACTIVITY
        )));
    }
    let name = body.name.trim();
    if name.is_empty() || name.len() > 128 {
        return Err(Error::InvalidRequest(
            "name must be 1-128 characters".into(),
        ));
    }
    let stage: Stage = body.stage.parse()?;
    if body.ends_at <= body.starts_at {
        return Err(Error::InvalidRequest(
            "ends_at must be after starts_at".into(),
        ));
    }
    let budget = Cents::positive(body.budget_cents, "budget_cents")?;
    let cap = Cents::positive(body.max_award_cents, "max_award_cents")?;
    // Times are stored with millisecond precision; truncate now so what we return is
    // exactly what a later read gives back.
    let ms = |t: DateTime<Utc>| DateTime::from_timestamp_millis(t.timestamp_millis()).unwrap_or(t);
    Ok(Activity {
        id,
        name: name.to_string(),
        stage,
        starts_at: ms(body.starts_at),
        ends_at: ms(body.ends_at),
        budget_cents: budget,
        max_award_cents: cap,
    })
}

/// An activity with its scenes and live figures.
#[derive(Debug, Serialize, utoipa::ToSchema)]
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

#[derive(Debug, Deserialize, utoipa::ToSchema)]
pub struct NewScene {
    /// 1-32 of [a-z0-9-].
    pub id: String,
    pub name: String,
    /// cash.
    pub award_type: String,
    #[serde(default)]
    pub rate_limit_per_s: Option<u32>,
    #[serde(default)]
    pub admission_fraction: Option<f64>,
    #[serde(default)]
    pub guards: SceneGuards,
    /// Required when award_type is `coupon`, refused otherwise.
    #[serde(default)]
    pub coupon: Option<SceneCoupon>,
}

/// Checks a coupon scene's settings (the templates' existence is checked on write).
fn check_scene_coupon(award_type: &AwardType, coupon: &Option<SceneCoupon>) -> Result<()> {
    match (award_type.as_str() == "coupon", coupon) {
        (false, None) => return Ok(()),
        (false, Some(_)) => {
            return Err(Error::InvalidRequest(
                "coupon settings are for award_type `coupon` only".into(),
            ))
        }
        (true, None) => {
            return Err(Error::InvalidRequest(
                "a coupon scene needs `coupon.template_id`".into(),
            ))
        }
        (true, Some(_)) => {}
    }
    let Some(c) = coupon else { return Ok(()) };
    ActivityId::parse(&c.template_id)?;
    if let Some(f) = &c.fallback {
        if !(f.under_share > 0.0 && f.under_share <= 1.0) {
            return Err(Error::InvalidRequest(
                "coupon.fallback.under_share must be above 0.0 and at most 1.0".into(),
            ));
        }
        match (&f.template_id, &f.greeting) {
            (Some(t), None) => {
                ActivityId::parse(t)?;
                if *t == c.template_id {
                    return Err(Error::InvalidRequest(
                        "the fallback template must be another template".into(),
                    ));
                }
            }
            (None, Some(g)) if !g.trim().is_empty() && g.len() <= 200 => {}
            _ => {
                return Err(Error::InvalidRequest(
                    "coupon.fallback needs either template_id or a greeting of 1-200 bytes".into(),
                ))
            }
        }
    }
    Ok(())
}

/// Checks every rule of a new scene before anything is written.
fn parse_new_scene(activity_id: &ActivityId, body: NewScene) -> Result<Scene> {
    let scene_id = SceneId::parse(&body.id)?;
    let award_type = AwardType::parse(&body.award_type)?;
    let name = body.name.trim();
    if name.is_empty() || name.len() > 128 {
        return Err(Error::InvalidRequest(
            "name must be 1-128 characters".into(),
        ));
    }
    if let Some(f) = body.admission_fraction {
        if !(0.0..=1.0).contains(&f) {
            return Err(Error::InvalidRequest(
                "admission_fraction must be between 0.0 and 1.0".into(),
            ));
        }
    }
    if body.rate_limit_per_s == Some(0) || body.rate_limit_per_s.is_some_and(|r| r > 10_000_000) {
        return Err(Error::InvalidRequest(
            "rate_limit_per_s must be 1..=10000000".into(),
        ));
    }
    check_scene_coupon(&award_type, &body.coupon)?;
    Ok(Scene {
        activity_id: activity_id.clone(),
        id: scene_id,
        name: name.to_string(),
        award_type,
        rate_limit_per_s: body.rate_limit_per_s,
        admission_fraction: body.admission_fraction,
        guards: body.guards,
        coupon: body.coupon,
    })
}
