//! Validation of award requests against the cached activity settings (no MySQL on
//! this path), and what makes two awards "the same award".

use crate::activity::{ActivityCache, SceneGuards};
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
    let amount = Cents::positive(req.amount_cents, "amount_cents")?;
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
    if amount > activity.max_award_cents {
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
        amount_cents: amount.get(),
        out_trade_no: out_trade_no.as_str().to_string(),
        open_time_ms: req.open_time_ms.unwrap_or(now_ms),
        rain_id,
        status: pb::TokenStatus::Pending as i32,
        award_type: award_type.as_str().to_string(),
        stage: activity.stage.to_pb() as i32,
        key_id: String::new(),
        issued_at_ms: now_ms,
        budget_gen: 0,
    };
    Ok(ValidAward {
        user,
        out_trade_no,
        activity_id: activity_id.as_str().to_string(),
        amount,
        draft,
        guards: scene.guards,
    })
}
