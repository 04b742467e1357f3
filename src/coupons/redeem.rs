//! Redemption: a merchant marks a coupon used, once, idempotent by its request id.

use serde::{Deserialize, Serialize};
use sqlx::Row;

use super::{state_at, Coupons};
use crate::domain::UserId;
use crate::error::{Error, Result};

/// A merchant's redemption request.
#[derive(Debug, Clone, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Redeem {
    /// The coupon's owner: a coupon is never used by another user.
    pub user_id: i64,
    pub out_trade_no: String,
    /// The merchant's id of this redemption, 1-64 bytes: the same id again answers the
    /// same result.
    pub request_id: String,
    /// The order the coupon is used on; it must reach the coupon's minimum spend.
    pub order_cents: i64,
}

/// A used coupon.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct Redeemed {
    pub out_trade_no: String,
    pub user_id: i64,
    pub template_id: String,
    /// What the coupon takes off the order.
    pub face_value_cents: i64,
    pub order_cents: i64,
    pub used_at_ms: i64,
    /// True when this answers an earlier request with the same request id.
    pub replayed: bool,
}

impl Coupons {
    /// Uses the coupon for `caller`'s request. A coupon still waiting to be booked is
    /// booked first (forced settlement, as a withdrawal does); then, under the coupon's
    /// row lock, it is used unless it is used, expired, another user's, or the order is
    /// too small.
    pub async fn redeem(&self, caller: &str, req: &Redeem, now_ms: i64) -> Result<Redeemed> {
        let user = UserId::parse(req.user_id)?;
        if req.out_trade_no.is_empty()
            || req.out_trade_no.len() > 160
            || req.out_trade_no.contains('|')
        {
            return Err(Error::InvalidRequest(
                "out_trade_no must be 1-160 characters without `|`".into(),
            ));
        }
        if req.request_id.is_empty() || req.request_id.len() > 64 {
            return Err(Error::InvalidRequest(
                "request_id must be 1-64 bytes".into(),
            ));
        }
        if !(0..=crate::domain::MAX_CENTS).contains(&req.order_cents) {
            return Err(Error::InvalidRequest(
                "order_cents must be 0 or more".into(),
            ));
        }
        if let Some(done) = self.replay(caller, user, req).await? {
            return Ok(done);
        }
        let claimed = self.claim(caller, user, req, now_ms).await?;
        let result = self.redeem_claimed(caller, user, req, now_ms).await;
        match &result {
            // A concurrent copy of this request that was refused may have freed the claim
            // meanwhile (a coupon not valid yet at its instant, valid at ours): claimed
            // again, it names this redemption. The coupon is used whatever this answers.
            Ok(_) if !claimed => {
                if let Err(err) = self.claim(caller, user, req, now_ms).await {
                    tracing::warn!(error = %err, request_id = %req.request_id, "claiming a redemption's request id again failed");
                }
            }
            // Refused: freed for the corrected request, unless a concurrent copy of it
            // used the coupon meanwhile (or that cannot be read now).
            Err(err)
                if claimed
                    && is_refusal(err)
                    && matches!(self.replay(caller, user, req).await, Ok(None)) =>
            {
                self.unclaim(caller, user, req).await?;
            }
            _ => {}
        }
        result
    }

    /// Claims the request id on the main database for this body: true when claimed now,
    /// false when it already names this very body (a retry, or a concurrent copy); a
    /// conflict when it names another user's, coupon's or order's redemption.
    async fn claim(&self, caller: &str, user: UserId, req: &Redeem, now_ms: i64) -> Result<bool> {
        let main = self.db.main();
        loop {
            let inserted = sqlx::query(
                "INSERT IGNORE INTO coupon_redemption_keys (caller, request_id, user_id, out_trade_no, order_cents, at_ms) VALUES (?, ?, ?, ?, ?, ?)",
            )
            .bind(caller)
            .bind(req.request_id.as_bytes())
            .bind(user.get())
            .bind(&req.out_trade_no)
            .bind(req.order_cents)
            .bind(now_ms)
            .execute(main)
            .await?
            .rows_affected();
            if inserted == 1 {
                return Ok(true);
            }
            let held: Option<(i64, Vec<u8>, i64)> = sqlx::query_as(
                "SELECT user_id, out_trade_no, order_cents FROM coupon_redemption_keys WHERE caller = ? AND request_id = ?",
            )
            .bind(caller)
            .bind(req.request_id.as_bytes())
            .fetch_optional(main)
            .await?;
            match held {
                // Freed by a refusal in between: claim it again.
                None => continue,
                Some((u, otn, order))
                    if u == user.get()
                        && otn == req.out_trade_no.as_bytes()
                        && order == req.order_cents =>
                {
                    return Ok(false)
                }
                Some(_) => {
                    return Err(Error::IdempotencyConflict(format!(
                        "request_id `{}` names another redemption",
                        req.request_id
                    )))
                }
            }
        }
    }

    /// Frees a claim whose redemption was refused, so the corrected request may use it.
    async fn unclaim(&self, caller: &str, user: UserId, req: &Redeem) -> Result<()> {
        sqlx::query(
            "DELETE FROM coupon_redemption_keys WHERE caller = ? AND request_id = ? AND user_id = ? AND out_trade_no = ? AND order_cents = ?",
        )
        .bind(caller)
        .bind(req.request_id.as_bytes())
        .bind(user.get())
        .bind(&req.out_trade_no)
        .bind(req.order_cents)
        .execute(self.db.main())
        .await?;
        Ok(())
    }

    /// The redemption itself, on the coupon's shard, once the request id is claimed.
    async fn redeem_claimed(
        &self,
        caller: &str,
        user: UserId,
        req: &Redeem,
        now_ms: i64,
    ) -> Result<Redeemed> {
        self.book_if_waiting(user, &req.out_trade_no).await?;
        let pool = self.db.for_user(user);
        let mut tx = pool.begin().await?;
        // The bucket's shared lock: a move between shards waits for this redemption.
        self.ledger.own_buckets(&mut tx, &[user]).await?;
        let row = sqlx::query(
            "SELECT user_id, template_id, face_value_cents, min_spend_cents, valid_from_ms, valid_until_ms, state, used_by, used_request_id FROM coupons WHERE out_trade_no = ? FOR UPDATE",
        )
        .bind(&req.out_trade_no)
        .fetch_optional(&mut *tx)
        .await?;
        let not_found =
            || Error::NotFound(format!("user {user} has no coupon `{}`", req.out_trade_no));
        let Some(row) = row else {
            return Err(not_found());
        };
        if row.try_get::<i64, _>(0)? != user.get() {
            return Err(not_found());
        }
        let template_id = crate::ledger::text(&row, 1)?;
        let face_value_cents: i64 = row.try_get(2)?;
        let min_spend_cents: i64 = row.try_get(3)?;
        let valid_from_ms: i64 = row.try_get(4)?;
        let valid_until_ms: i64 = row.try_get(5)?;
        let stored = crate::ledger::text(&row, 6)?;
        match state_at(&stored, valid_until_ms, now_ms) {
            "used" => {
                drop(tx);
                // A concurrent request with this very id may have won the row lock.
                return match self.replay(caller, user, req).await? {
                    Some(done) => Ok(done),
                    None => Err(Error::CouponUsed),
                };
            }
            "expired" => {
                return Err(Error::CouponExpired(format!(
                    "coupon `{}` was valid until {valid_until_ms} ms",
                    req.out_trade_no
                )))
            }
            _ => {}
        }
        if now_ms < valid_from_ms {
            return Err(Error::CouponExpired(format!(
                "coupon `{}` is valid from {valid_from_ms} ms",
                req.out_trade_no
            )));
        }
        if req.order_cents < min_spend_cents {
            return Err(Error::BelowMinSpend(format!(
                "the order of {} cents is under this coupon's minimum spend of {min_spend_cents}",
                req.order_cents
            )));
        }
        let used = sqlx::query(
            "UPDATE coupons SET state = 'used', used_by = ?, used_request_id = ?, used_order_cents = ?, used_at_ms = ? WHERE out_trade_no = ? AND state = 'active'",
        )
        .bind(caller)
        .bind(req.request_id.as_bytes())
        .bind(req.order_cents)
        .bind(now_ms)
        .bind(&req.out_trade_no)
        .execute(&mut *tx)
        .await;
        match used {
            Ok(done) if done.rows_affected() == 1 => {}
            Ok(_) => return Err(Error::CouponUsed),
            // The request id names another coupon of this merchant.
            Err(sqlx::Error::Database(e)) if e.is_unique_violation() => {
                return Err(Error::IdempotencyConflict(format!(
                    "request_id `{}` redeemed another coupon",
                    req.request_id
                )))
            }
            Err(e) => return Err(e.into()),
        }
        tx.commit().await?;
        crate::metrics::coupon_redeemed();
        Ok(Redeemed {
            out_trade_no: req.out_trade_no.clone(),
            user_id: user.get(),
            template_id,
            face_value_cents,
            order_cents: req.order_cents,
            used_at_ms: now_ms,
            replayed: false,
        })
    }

    /// The earlier answer to this caller's request id, if it used a coupon; a conflict
    /// when that was another coupon or another order.
    async fn replay(&self, caller: &str, user: UserId, req: &Redeem) -> Result<Option<Redeemed>> {
        let row = sqlx::query(
            "SELECT out_trade_no, user_id, template_id, face_value_cents, used_order_cents, used_at_ms FROM coupons WHERE used_by = ? AND used_request_id = ?",
        )
        .bind(caller)
        .bind(req.request_id.as_bytes())
        .fetch_optional(self.db.for_user(user))
        .await?;
        let Some(row) = row else { return Ok(None) };
        let out_trade_no = crate::ledger::text(&row, 0)?;
        let order_cents: Option<i64> = row.try_get(4)?;
        if out_trade_no != req.out_trade_no
            || row.try_get::<i64, _>(1)? != user.get()
            || order_cents != Some(req.order_cents)
        {
            return Err(Error::IdempotencyConflict(format!(
                "request_id `{}` redeemed another coupon or order",
                req.request_id
            )));
        }
        Ok(Some(Redeemed {
            out_trade_no,
            user_id: user.get(),
            template_id: crate::ledger::text(&row, 2)?,
            face_value_cents: row.try_get(3)?,
            order_cents: req.order_cents,
            used_at_ms: row.try_get::<Option<i64>, _>(5)?.unwrap_or_default(),
            replayed: true,
        }))
    }

    /// Books the coupon now if it still waits in Redis.
    async fn book_if_waiting(&self, user: UserId, otn: &str) -> Result<()> {
        let booked: Option<i64> =
            sqlx::query_scalar("SELECT 1 FROM coupons WHERE out_trade_no = ?")
                .bind(otn)
                .fetch_optional(self.db.for_user(user))
                .await?;
        if booked.is_some() {
            return Ok(());
        }
        let Some(entry) = self.tokens.coupon_status(user, otn).await?.map(|s| s.entry) else {
            return Ok(());
        };
        let booked = self.ledger.book(std::slice::from_ref(&entry)).await?;
        // If this fails, the worker marks the coupon when it reaches its stream entry.
        if let Err(err) = self
            .tokens
            .mark(&booked.to_mark, &booked.snapshots(), &[])
            .await
        {
            tracing::warn!(error = %err, "marking a coupon booked for redemption failed");
        }
        Ok(())
    }
}

/// A refusal leaves the coupon untouched by this request: its claim is freed. Any other
/// error (a commit whose answer was lost among them) keeps the claim bound to its body.
fn is_refusal(err: &Error) -> bool {
    matches!(
        err,
        Error::NotFound(_)
            | Error::CouponUsed
            | Error::CouponExpired(_)
            | Error::BelowMinSpend(_)
            | Error::IdempotencyConflict(_)
    )
}
