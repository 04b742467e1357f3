//! The user's wallet: exact balances merged from the ledger and pending tokens
//! ([`Wallet::view`]), the flow list ([`flows`]), and client sync ([`sync`]: the
//! client's copy of its tokens restores the server's).
//!
//! Exactness (DESIGN.md "View"), two ways:
//! - **From Redis alone**, in one transaction (MULTI/EXEC, see
//!   [`crate::tokens::Tokens::redis_record`]): the user's token statuses and account
//!   snapshot, and the identity of the Redis data. The snapshot is the account as a
//!   committed transaction left it, written with the tokens it booked marked settled, so
//!   it never includes a token still pending; it is trusted only when written in this
//!   very Redis data (its `rid`) and no fence is up (a withdrawal or reversal that may
//!   commit before its snapshot is written). Booking changes nothing else, and a booking
//!   committed but not yet marked leaves its tokens pending beside the older snapshot:
//!   still exact.
//! - **Otherwise with MySQL**: in ONE statement the account row and which of the
//!   not-yet-settled tokens the ledger already holds. A token reaches the ledger only
//!   after it is in Redis, and is marked settled only after the commit, so in this order
//!   no token is counted twice (it is either pending-and-not-in-ledger or in the booked
//!   balance) and none is dropped.

pub mod flows;
pub mod sync;

use std::sync::Arc;

use serde::Serialize;

use crate::activity::ActivityCache;
use crate::domain::UserId;
use crate::error::{Error, Result};
use crate::keys::Keys;
use crate::ledger::Ledger;
use crate::switches::Switches;
use crate::tokens::{Booked, Tokens};

pub use flows::{decode_cursor, encode_cursor, FlowItem, FlowsPage};
pub use sync::{Rejected, SyncResult};

/// The wallet capability. Cheap to clone.
#[derive(Clone)]
pub struct Wallet {
    pub tokens: Tokens,
    pub ledger: Ledger,
    pub switches: Arc<Switches>,
    pub keys: Arc<Keys>,
    pub activities: Arc<ActivityCache>,
    /// How old a Redis life must be before its snapshots are trusted
    /// (`wallet.identity_quiet_ms`, see [`crate::tokens::RedisRecord::exact_booked`]).
    pub identity_quiet_ms: i64,
}

#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq, Default, utoipa::ToSchema)]
pub struct WalletView {
    pub user_id: i64,
    pub balance_cents: i64,
    pub booked_cents: i64,
    pub pending_cents: i64,
    pub pending_count: i64,
    pub total_income_cents: i64,
    pub withdrawn_cents: i64,
    /// Present (true) only when served from Redis alone (`views_fallback`).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    #[schema(required = false)]
    pub degraded: bool,
}

/// Where a view's booked figures came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ViewSource {
    /// The account snapshot in Redis, proven exact.
    Redis,
    /// The ledger.
    Mysql,
    /// The snapshot, unproven, while MySQL failed (`views_fallback`).
    Degraded,
}

impl ViewSource {
    pub fn as_str(self) -> &'static str {
        match self {
            ViewSource::Redis => "redis",
            ViewSource::Mysql => "mysql",
            ViewSource::Degraded => "degraded",
        }
    }
}

fn overflow() -> Error {
    Error::internal("wallet sums overflow")
}

/// The merge both views share: pending tokens added to the booked figures, in checked
/// arithmetic (`balance = booked + pending`; income counts pending awards too).
pub fn add_pending(view: &mut WalletView, pending: impl Iterator<Item = i64>) -> Result<()> {
    for cents in pending {
        view.pending_cents = view.pending_cents.checked_add(cents).ok_or_else(overflow)?;
        view.pending_count += 1;
    }
    view.balance_cents = view
        .booked_cents
        .checked_add(view.pending_cents)
        .ok_or_else(overflow)?;
    view.total_income_cents = view
        .total_income_cents
        .checked_add(view.pending_cents)
        .ok_or_else(overflow)?;
    Ok(())
}

impl Wallet {
    /// The exact merge (see the module comment): from Redis alone when the user's
    /// snapshot proves exact ([`crate::tokens::RedisRecord::exact_booked`]), otherwise
    /// the booked figures from MySQL. When MySQL fails and the `views_fallback` switch is
    /// on, the snapshot answers anyway, marked degraded.
    pub async fn view(&self, user: UserId) -> Result<WalletView> {
        let (view, source) = self.view_from(user).await?;
        crate::metrics::view_served(source.as_str());
        Ok(view)
    }

    /// [`Wallet::view`] and where its booked figures came from.
    pub async fn view_from(&self, user: UserId) -> Result<(WalletView, ViewSource)> {
        let record = self.tokens.redis_record(user).await?;
        if let Some(booked) = record.exact_booked(self.identity_quiet_ms) {
            let pending = record.pending.iter().map(|e| e.amount_cents);
            return Ok((merged(user, booked, pending, false)?, ViewSource::Redis));
        }
        let candidates = &record.pending;
        let otns: Vec<&str> = candidates.iter().map(|c| c.out_trade_no.as_str()).collect();
        let account = match self.ledger.account_with(user, &otns).await {
            Ok(account) => account,
            Err(err) if self.switches.views_fallback() => {
                tracing::warn!(error = %err, "mysql unavailable; serving the wallet from redis");
                crate::metrics::dependency_error("mysql");
                let pending = candidates.iter().map(|e| e.amount_cents);
                let figures = self
                    .tokens
                    .degraded_figures(user, &record)
                    .await
                    .unwrap_or_else(|_| record.snapshot_figures());
                let view = merged(user, figures, pending, true)?;
                return Ok((view, ViewSource::Degraded));
            }
            Err(err) => return Err(err.into()),
        };
        let booked = Booked {
            balance_cents: account.balance_cents,
            total_income_cents: account.total_income_cents,
            withdrawn_cents: account.withdrawn_cents,
        };
        let pending = candidates
            .iter()
            .filter(|c| !account.booked.contains(&c.out_trade_no))
            .map(|c| c.amount_cents);
        Ok((merged(user, booked, pending, false)?, ViewSource::Mysql))
    }
}

/// The view of `booked` figures and the pending amounts not in them.
fn merged(
    user: UserId,
    booked: Booked,
    pending: impl Iterator<Item = i64>,
    degraded: bool,
) -> Result<WalletView> {
    let mut view = WalletView {
        user_id: user.get(),
        booked_cents: booked.balance_cents,
        total_income_cents: booked.total_income_cents,
        withdrawn_cents: booked.withdrawn_cents,
        degraded,
        ..Default::default()
    };
    add_pending(&mut view, pending)?;
    Ok(view)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pending_adds_to_balance_and_income() {
        let mut view = WalletView {
            booked_cents: 100,
            total_income_cents: 150,
            withdrawn_cents: 50,
            ..Default::default()
        };
        add_pending(&mut view, [7, 3].into_iter()).unwrap();
        assert_eq!(view.pending_cents, 10);
        assert_eq!(view.pending_count, 2);
        assert_eq!(view.balance_cents, 110);
        assert_eq!(view.total_income_cents, 160);
        assert_eq!(view.withdrawn_cents, 50);
    }

    #[test]
    fn nothing_pending_is_the_booked_balance() {
        let mut view = WalletView {
            booked_cents: 42,
            total_income_cents: 42,
            ..Default::default()
        };
        add_pending(&mut view, std::iter::empty()).unwrap();
        assert_eq!((view.balance_cents, view.pending_count), (42, 0));
    }

    #[test]
    fn an_overflowing_merge_is_an_error_not_a_wrap() {
        let mut view = WalletView {
            booked_cents: i64::MAX - 1,
            ..Default::default()
        };
        assert!(add_pending(&mut view, [5].into_iter()).is_err());
        let mut view = WalletView::default();
        assert!(add_pending(&mut view, [i64::MAX, 1].into_iter()).is_err());
    }
}
