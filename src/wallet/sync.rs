//! Client sync: the client's copy of its tokens restores what the server lost. A token
//! is restored as pending only when it verifies (signature, key, owner, activity,
//! stage, out_trade_no), Redis does not hold it and the ledger does not know it.

use std::collections::HashSet;

use serde::Serialize;

use super::Wallet;
use crate::domain::{ActivityId, AwardType, OutTradeNo, SceneId, UserId};
use crate::error::Result;
use crate::pb;
use crate::token::{self, TokenError};

#[derive(Debug, Serialize, PartialEq, Eq, utoipa::ToSchema)]
pub struct Rejected {
    pub index: u32,
    pub code: &'static str,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct SyncResult {
    pub restored: u32,
    pub known: u32,
    pub rejected: Vec<Rejected>,
}

impl Wallet {
    /// Checks one client token: signature, key, owner, activity and stage; the error
    /// is the API code of the rejection.
    fn check_client_token(
        &self,
        user: UserId,
        bytes: &[u8],
    ) -> std::result::Result<pb::RedPacketToken, &'static str> {
        let token = token::verify(&self.keys.current(), bytes).map_err(|_| "invalid_request")?;
        if token.user_id != user.get() {
            return Err("forbidden");
        }
        // A red packet share belongs to no operator activity: its signature is its
        // proof (only an open mints one), and it is always live.
        let stage = if token.activity_id == crate::packets::PACKETS_ACTIVITY {
            if token.award_type != crate::packets::PACKET_AWARD_TYPE {
                return Err("invalid_request");
            }
            crate::domain::Stage::Live
        } else {
            self.activities
                .get(&token.activity_id)
                .ok_or("not_found")?
                .activity
                .stage
        };
        if stage.to_pb() as i32 != token.stage {
            return Err("invalid_request");
        }
        let expected = (|| {
            Some(OutTradeNo::compose(
                user,
                &ActivityId::parse(&token.activity_id).ok()?,
                &SceneId::parse(&token.scene_id).ok()?,
                token.rain_id,
                &AwardType::parse(&token.award_type).ok()?,
                stage,
            ))
        })();
        // Cash carries a positive amount; a coupon none, and names a known template.
        let worth = match &token.coupon {
            None => token.amount_cents > 0,
            Some(c) => {
                token.amount_cents == 0 && self.activities.templates().contains_key(&c.template_id)
            }
        };
        if expected.as_ref().map(OutTradeNo::as_str) != Some(token.out_trade_no.as_str()) || !worth
        {
            return Err("invalid_request");
        }
        Ok(token)
    }

    /// Claims again, for the client's tokens of scenes that allow one win per user, the
    /// win each stands for (a claim Redis lost with its data would let the user win the
    /// scene again). A claim held already, by this token or another, is left as it is.
    async fn claim_wins(
        &self,
        user: UserId,
        valid: &[(pb::RedPacketToken, Vec<u8>)],
    ) -> Result<()> {
        let wins: Vec<(String, &str)> = valid
            .iter()
            .filter(|(t, _)| {
                self.activities.get(&t.activity_id).is_some_and(|a| {
                    a.scenes
                        .get(&t.scene_id)
                        .is_some_and(|s| s.guards.one_win_per_user)
                })
            })
            .map(|(t, _)| {
                (
                    crate::issue::guards::win_scene(&t.activity_id, &t.scene_id),
                    t.out_trade_no.as_str(),
                )
            })
            .collect();
        self.tokens.claim_wins(user, &wins).await?;
        Ok(())
    }

    /// Restores the tokens the server lost and the ledger does not know, as pending.
    pub async fn sync(
        &self,
        user: UserId,
        tokens: Vec<std::result::Result<Vec<u8>, TokenError>>,
    ) -> Result<SyncResult> {
        let mut result = SyncResult {
            restored: 0,
            known: 0,
            rejected: Vec::new(),
        };
        let mut valid: Vec<(pb::RedPacketToken, Vec<u8>)> = Vec::new();
        let mut seen = HashSet::new();
        for (i, t) in tokens.into_iter().enumerate() {
            let checked = t.map_err(|_| "invalid_request").and_then(|bytes| {
                self.check_client_token(user, &bytes)
                    .map(|tok| (tok, bytes))
            });
            match checked {
                Ok((tok, bytes)) => {
                    if seen.insert(tok.out_trade_no.clone()) {
                        valid.push((tok, bytes));
                    } else {
                        result.known += 1;
                    }
                }
                Err(code) => result.rejected.push(Rejected {
                    index: i as u32,
                    code,
                }),
            }
        }
        if valid.is_empty() {
            return Ok(result);
        }
        self.claim_wins(user, &valid).await?;
        let keys: Vec<(UserId, &str)> = valid
            .iter()
            .map(|(t, _)| (user, t.out_trade_no.as_str()))
            .collect();
        let mut held = self.tokens.held(&keys).await?;
        // A greeting recorded for an award whose token Redis had lost: the client's
        // token is the award, and replaces the marker.
        let greeted: Vec<(UserId, &str)> = held
            .iter()
            .zip(&keys)
            .filter(|(h, _)| h.as_deref() == Some(crate::tokens::GREETING))
            .map(|(_, k)| *k)
            .collect();
        if !greeted.is_empty() {
            self.tokens.forget_greetings(&greeted).await?;
            for h in held.iter_mut() {
                if h.as_deref() == Some(crate::tokens::GREETING) {
                    *h = None;
                }
            }
        }
        let missing: Vec<usize> = held
            .iter()
            .enumerate()
            .filter(|(_, h)| h.is_none())
            .map(|(i, _)| i)
            .collect();
        result.known += (valid.len() - missing.len()) as u32;
        let missing_otns: Vec<&str> = missing.iter().map(|&i| keys[i].1).collect();
        let in_ledger = self.ledger.booked_of(user, &missing_otns).await?;
        let to_restore: Vec<(UserId, pb::RedPacketToken, Vec<u8>)> = missing
            .iter()
            .filter(|&&i| !in_ledger.contains(keys[i].1))
            .map(|&i| (user, valid[i].0.clone(), valid[i].1.clone()))
            .collect();
        result.known += (missing.len() - to_restore.len()) as u32;
        // The ledger's unique key still decides: a restored token that was booked in
        // the meantime is booked as a no-op by the worker.
        for now_stored in self.tokens.restore(&to_restore).await? {
            if now_stored {
                result.restored += 1;
            } else {
                result.known += 1;
            }
        }
        Ok(result)
    }
}
