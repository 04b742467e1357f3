//! The flow list: ledger rows and pending tokens merged, newest first.
//!
//! Flows are ordered by (time, out_trade_no), newest first, where an award's time is
//! its issue time: booking a pending award does not move it, and new awards land above
//! any cursor, so paging sees every item exactly once.

use std::collections::HashSet;

use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use base64::Engine;
use serde::Serialize;

use super::Wallet;
use crate::domain::UserId;
use crate::error::Result;

#[derive(Debug, Clone, Serialize, PartialEq, utoipa::ToSchema)]
pub struct FlowItem {
    pub out_trade_no: String,
    pub kind: String,
    pub amount_cents: i64,
    pub status: &'static str,
    pub activity_id: Option<String>,
    pub scene_id: Option<String>,
    pub at: String,
    #[serde(skip)]
    pub at_ms: i64,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct FlowsPage {
    pub items: Vec<FlowItem>,
    pub next_cursor: Option<String>,
}

fn rfc3339(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .unwrap_or_default()
        .to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

pub fn encode_cursor(at_ms: i64, otn: &str) -> String {
    B64.encode(format!("{at_ms}|{otn}"))
}

pub fn decode_cursor(cursor: &str) -> Option<(i64, String)> {
    let text = String::from_utf8(B64.decode(cursor).ok()?).ok()?;
    let (at, otn) = text.split_once('|')?;
    Some((at.parse().ok()?, otn.to_string()))
}

/// Sorts newest first, keeps `limit` and names the cursor of the next page when more
/// items were there.
pub fn page(mut items: Vec<FlowItem>, limit: u32) -> FlowsPage {
    items.sort_by(|a, b| (b.at_ms, &b.out_trade_no).cmp(&(a.at_ms, &a.out_trade_no)));
    let more = items.len() > limit as usize;
    items.truncate(limit as usize);
    let next_cursor = if more {
        items
            .last()
            .map(|i| encode_cursor(i.at_ms, &i.out_trade_no))
    } else {
        None
    };
    FlowsPage { items, next_cursor }
}

impl Wallet {
    /// One page of `user`'s flows, strictly after `cursor` in the order above.
    pub async fn flows(
        &self,
        user: UserId,
        limit: u32,
        cursor: Option<(i64, String)>,
    ) -> Result<FlowsPage> {
        let candidates = self.tokens.pending_of(user).await?;
        let before = |at: i64, otn: &str| match &cursor {
            Some((c_at, c_otn)) => (at, otn) < (*c_at, c_otn.as_str()),
            None => true,
        };
        let rows = self.ledger.flows(user, limit + 1, cursor.as_ref()).await?;
        let mut items: Vec<FlowItem> = Vec::with_capacity(rows.len() + candidates.len());
        let mut seen: HashSet<String> = HashSet::new();
        for row in rows {
            seen.insert(row.out_trade_no.clone());
            items.push(FlowItem {
                at: rfc3339(row.at_ms),
                at_ms: row.at_ms,
                out_trade_no: row.out_trade_no,
                kind: row.kind,
                amount_cents: row.amount_cents,
                status: "booked",
                activity_id: row.activity_id,
                scene_id: row.scene_id,
            });
        }
        for c in candidates {
            if seen.contains(&c.out_trade_no) || !before(c.at_ms, &c.out_trade_no) {
                continue;
            }
            items.push(FlowItem {
                at: rfc3339(c.at_ms),
                at_ms: c.at_ms,
                out_trade_no: c.out_trade_no,
                kind: "award".into(),
                amount_cents: c.amount_cents,
                status: "pending",
                activity_id: Some(c.activity_id),
                scene_id: Some(c.scene_id),
            });
        }
        Ok(page(items, limit))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item(at_ms: i64, otn: &str) -> FlowItem {
        FlowItem {
            out_trade_no: otn.into(),
            kind: "award".into(),
            amount_cents: 1,
            status: "pending",
            activity_id: None,
            scene_id: None,
            at: rfc3339(at_ms),
            at_ms,
        }
    }

    #[test]
    fn cursors_round_trip_and_refuse_garbage() {
        let c = encode_cursor(1_700_000_000_000, "42_a_b_1_cash_live");
        assert_eq!(
            decode_cursor(&c),
            Some((1_700_000_000_000, "42_a_b_1_cash_live".to_string()))
        );
        assert_eq!(decode_cursor("not base64!"), None);
        assert_eq!(decode_cursor(&B64.encode("no-bar")), None);
        assert_eq!(decode_cursor(&B64.encode("x|otn")), None);
    }

    #[test]
    fn a_page_is_newest_first_with_ties_broken_by_out_trade_no() {
        let p = page(
            vec![item(1, "a"), item(3, "b"), item(3, "c"), item(2, "d")],
            3,
        );
        let order: Vec<&str> = p.items.iter().map(|i| i.out_trade_no.as_str()).collect();
        assert_eq!(order, vec!["c", "b", "d"]);
        assert_eq!(
            p.next_cursor.as_deref().and_then(decode_cursor),
            Some((2, "d".into()))
        );
        let last = page(vec![item(1, "a")], 3);
        assert_eq!(last.next_cursor, None);
    }
}
