//! Validation of award requests against the cached activity settings (no MySQL on
//! this path), and what makes two awards "the same award".

use std::sync::Arc;

use crate::activity::{ActivityCache, SceneGuards};
use crate::coupons::Template;
use crate::domain::{
    parse_rain_id, ActivityId, AwardType, Cents, OutTradeNo, SceneId, Stage, UserId,
};
use crate::error::{Error, Result};
use crate::pb;

/// An award request as the caller sent it (JSON or protobuf).
#[derive(Debug, Clone, serde::Deserialize, utoipa::ToSchema)]
pub struct AwardRequest {
    pub user_id: i64,
    #[serde(default)]
    pub app_id: u32,
    pub activity_id: String,
    pub scene_id: String,
    #[serde(default)]
    pub rain_id: i64,
    pub award_type: String,
    /// Cash awards: the amount. Coupon awards: 0 or absent (a coupon's worth is its
    /// template's).
    #[serde(default)]
    pub amount_cents: i64,
    /// Optional: when present it must be the activity's stage.
    #[serde(default)]
    pub stage: Option<String>,
    #[serde(default)]
    pub open_time_ms: Option<i64>,
}

impl From<pb::AwardRequest> for AwardRequest {
    fn from(r: pb::AwardRequest) -> Self {
        Self {
            user_id: r.user_id,
            app_id: r.app_id,
            activity_id: r.activity_id,
            scene_id: r.scene_id,
            rain_id: r.rain_id,
            award_type: r.award_type,
            amount_cents: r.amount_cents,
            stage: (!r.stage.is_empty()).then_some(r.stage),
            open_time_ms: (r.open_time_ms != 0).then_some(r.open_time_ms),
        }
    }
}

/// A request that passed validation: every field parsed, the activity open.
#[derive(Debug, Clone)]
pub struct ValidAward {
    pub user: UserId,
    pub out_trade_no: OutTradeNo,
    pub activity_id: String,
    pub amount: Cents,
    /// The token as it would be minted now (signature and key id not yet set).
    pub draft: pb::RedPacketToken,
    /// The scene's seckill guards.
    pub guards: SceneGuards,
    /// A coupon award: its template and the scene's fallback.
    pub coupon: Option<CouponPlan>,
}

/// What a coupon award hands out: a coupon of `template`, or once it runs low the
/// scene's fallback.
#[derive(Debug, Clone)]
pub struct CouponPlan {
    pub template: Arc<Template>,
    pub fallback: Option<Fallback>,
}

#[derive(Debug, Clone)]
pub struct Fallback {
    pub under_share: f64,
    pub to: FallbackTo,
}

#[derive(Debug, Clone)]
pub enum FallbackTo {
    Template(Arc<Template>),
    Greeting(String),
}

impl ValidAward {
    /// The cash this award carries (none for a coupon).
    pub fn cash_cents(&self) -> i64 {
        if self.coupon.is_some() {
            0
        } else {
            self.amount.get()
        }
    }
}

/// The fields that make two awards "the same award". The open time is the client's
/// moment and may differ between a request and its retry.
pub fn same_award(a: &pb::RedPacketToken, b: &pb::RedPacketToken) -> bool {
    a.app_id == b.app_id
        && a.user_id == b.user_id
        && a.activity_id == b.activity_id
        && a.scene_id == b.scene_id
        && a.amount_cents == b.amount_cents
        && a.rain_id == b.rain_id
        && a.award_type == b.award_type
        && a.stage == b.stage
        && a.out_trade_no == b.out_trade_no
}

/// Validates one request against the cached activity settings.
pub fn validate(activities: &ActivityCache, req: &AwardRequest, now_ms: i64) -> Result<ValidAward> {
    let user = UserId::parse(req.user_id)?;
    let rain_id = parse_rain_id(req.rain_id)?;
    let activity_id = ActivityId::parse(&req.activity_id)?;
    let scene_id = SceneId::parse(&req.scene_id)?;
    let award_type = AwardType::parse(&req.award_type)?;
    let requested_stage: Option<Stage> = req.stage.as_deref().map(str::parse).transpose()?;
    let cached = activities
        .get(activity_id.as_str())
        .ok_or_else(|| Error::NotFound(format!("no activity `{activity_id}`")))?;
    let scene = cached.scenes.get(scene_id.as_str()).ok_or_else(|| {
        Error::NotFound(format!("no scene `{scene_id}` in activity `{activity_id}`"))
    })?;
    if scene.award_type != award_type {
        return Err(Error::InvalidRequest(format!(
            "scene `{scene_id}` awards `{}`, not `{award_type}`",
            scene.award_type
        )));
    }
    let coupon = match &scene.coupon {
        None => None,
        Some(c) => {
            if req.amount_cents != 0 {
                return Err(Error::InvalidRequest(
                    "a coupon award carries no amount_cents (0 or absent)".into(),
                ));
            }
            let templates = activities.templates();
            let template = |id: &str| {
                templates.get(id).cloned().ok_or_else(|| {
                    Error::Unavailable(format!("coupon template `{id}` is not loaded yet"))
                })
            };
            let fallback = match &c.fallback {
                None => None,
                Some(f) => match (&f.template_id, &f.greeting) {
                    (Some(t), _) => {
                        let t = template(t)?;
                        // A fallback whose window is over would hand out coupons
                        // expired at birth: there is no fallback then.
                        t.issuable_at(now_ms).then_some(FallbackTo::Template(t))
                    }
                    (None, g) => Some(FallbackTo::Greeting(g.clone().unwrap_or_default())),
                }
                .map(|to| Fallback {
                    under_share: f.under_share,
                    to,
                }),
            };
            let plan = CouponPlan {
                template: template(&c.template_id)?,
                fallback,
            };
            if !plan.template.issuable_at(now_ms) {
                return Err(Error::ActivityClosed(format!(
                    "coupon template `{}` is no longer valid",
                    c.template_id
                )));
            }
            Some(plan)
        }
    };
    // A coupon takes one unit of its template's stock.
    let amount = match coupon {
        Some(_) => Cents::positive(1, "amount_cents")?,
        None => Cents::positive(req.amount_cents, "amount_cents")?,
    };
    let activity = &cached.activity;
    let now = chrono::DateTime::from_timestamp_millis(now_ms).unwrap_or_default();
    if !activity.is_open_at(now) {
        return Err(Error::ActivityClosed(format!(
            "activity `{activity_id}` is open from {} to {}",
            activity.starts_at.to_rfc3339(),
            activity.ends_at.to_rfc3339()
        )));
    }
    if let Some(stage) = requested_stage {
        if stage != activity.stage {
            return Err(Error::ActivityClosed(format!(
                "activity `{activity_id}` runs in stage {}, not {}",
                activity.stage.as_str(),
                stage.as_str()
            )));
        }
    }
    if coupon.is_none() && amount > activity.max_award_cents {
        return Err(Error::AmountOverCap(format!(
            "amount_cents {} is above the cap of {}",
            amount.get(),
            activity.max_award_cents
        )));
    }
    let out_trade_no = OutTradeNo::compose(
        user,
        &activity_id,
        &scene_id,
        rain_id,
        &award_type,
        activity.stage,
    );
    let draft = pb::RedPacketToken {
        app_id: req.app_id,
        user_id: user.get(),
        activity_id: activity_id.as_str().to_string(),
        scene_id: scene_id.as_str().to_string(),
        amount_cents: if coupon.is_some() { 0 } else { amount.get() },
        out_trade_no: out_trade_no.as_str().to_string(),
        open_time_ms: req.open_time_ms.unwrap_or(now_ms),
        rain_id,
        status: pb::TokenStatus::Pending as i32,
        award_type: award_type.as_str().to_string(),
        stage: activity.stage.to_pb() as i32,
        key_id: String::new(),
        issued_at_ms: now_ms,
        budget_gen: 0,
        coupon: coupon.as_ref().map(|c| c.template.terms_at(now_ms, false)),
    };
    Ok(ValidAward {
        user,
        out_trade_no,
        activity_id: activity_id.as_str().to_string(),
        amount,
        draft,
        guards: scene.guards,
        coupon,
    })
}
