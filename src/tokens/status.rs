//! The codecs of the token record: the status value beside each token and the
//! settlement stream entry that carries a token to the accounting worker.
//!
//! A status is `p|amount|at_ms|activity|scene|gen` while pending and the same with `s`
//! once booked and marked (mark.lua); a coupon's status starts with `c`, then `d`, its
//! activity is its template and its amount the one unit of stock it took. Entries
//! written before budget generations have no `gen` part: generation 0. Ids are `[a-z0-9-]` and out_trade_nos never hold `|`, so
//! the parts never run together.

use redis::streams::StreamId;

use crate::domain::UserId;

/// One award known to Redis, as the status hash or a stream entry describes it: what the
/// ledger needs to book it.
#[derive(Debug, Clone, PartialEq)]
pub struct AwardEntry {
    pub user: UserId,
    pub out_trade_no: String,
    pub amount_cents: i64,
    pub activity_id: String,
    pub scene_id: String,
    /// The token's issue time; the ledger orders flows by it.
    pub at_ms: i64,
    /// The settlement stream entry this came from, if any.
    pub stream_id: Option<String>,
    /// The budget generation its money was taken from.
    pub budget_gen: i64,
    /// A coupon: `activity_id` is its template (the stock it came from) and
    /// `amount_cents` the one unit of stock it took; it carries no cash.
    pub coupon: bool,
}

/// One entry of a user's status hash.
#[derive(Debug, Clone, PartialEq)]
pub struct StatusEntry {
    pub pending: bool,
    pub entry: AwardEntry,
}

/// The first letter of a pending status: `p` for cash, `c` for a coupon.
pub fn pending_letter(coupon: bool) -> &'static str {
    if coupon {
        "c"
    } else {
        "p"
    }
}

/// The status value of a freshly stored token (what store.lua writes).
pub fn pending_status(e: &AwardEntry) -> String {
    format!(
        "{}|{}|{}|{}|{}|{}",
        pending_letter(e.coupon),
        e.amount_cents,
        e.at_ms,
        e.activity_id,
        e.scene_id,
        e.budget_gen
    )
}

/// A token's line in a settlement stream entry (store.lua joins a call's lines of one
/// partition with newlines into field `b`; [`parse_entry`] reads them).
pub fn stream_line(e: &AwardEntry) -> String {
    format!(
        "{}|{}|{}|{}|{}|{}|{}{}",
        e.user,
        e.out_trade_no,
        e.amount_cents,
        e.activity_id,
        e.scene_id,
        e.at_ms,
        e.budget_gen,
        if e.coupon { "|c" } else { "" }
    )
}

/// Reads a cash status value (see the module comment); `None` for anything else, a
/// coupon's included: cash views and forced settlement never see coupons.
pub fn parse_status(user: UserId, otn: &str, value: &str) -> Option<StatusEntry> {
    parse_any_status(user, otn, value).filter(|s| !s.entry.coupon)
}

/// Reads a coupon's status value; `None` for anything else.
pub fn parse_coupon_status(user: UserId, otn: &str, value: &str) -> Option<StatusEntry> {
    parse_any_status(user, otn, value).filter(|s| s.entry.coupon)
}

fn parse_any_status(user: UserId, otn: &str, value: &str) -> Option<StatusEntry> {
    // The snapshot's fields share the hash (mark.lua); an out_trade_no starts with a digit.
    if otn.starts_with('=') {
        return None;
    }
    let mut parts = value.split('|');
    let (pending, coupon) = match parts.next()? {
        "p" => (true, false),
        "s" => (false, false),
        "c" => (true, true),
        "d" => (false, true),
        _ => return None,
    };
    let amount_cents: i64 = parts.next()?.parse().ok().filter(|a| *a > 0)?;
    let at_ms: i64 = parts.next()?.parse().ok()?;
    let activity_id = parts.next()?.to_string();
    let scene_id = parts.next()?.to_string();
    let budget_gen: i64 = match parts.next() {
        Some(g) => g.parse().ok()?,
        None => 0,
    };
    if parts.next().is_some() {
        return None;
    }
    Some(StatusEntry {
        pending,
        entry: AwardEntry {
            user,
            out_trade_no: otn.to_string(),
            amount_cents,
            activity_id,
            scene_id,
            at_ms,
            stream_id: None,
            budget_gen,
            coupon,
        },
    })
}

/// The pending entries among a user's raw status hash.
pub fn pending_in(
    user: UserId,
    statuses: &[(String, String)],
) -> impl Iterator<Item = AwardEntry> + '_ {
    statuses
        .iter()
        .filter_map(move |(otn, v)| parse_status(user, otn, v))
        .filter(|s| s.pending)
        .map(|s| s.entry)
}

/// The fields of one token's stream entry: what earlier releases' store.lua wrote (this
/// one writes field `b`, see [`stream_line`]) and what the parked stream holds, with the
/// entry's original id and error beside them.
pub fn entry_fields(e: &AwardEntry) -> Vec<(&'static str, String)> {
    let mut fields = vec![
        ("u", e.user.to_string()),
        ("o", e.out_trade_no.clone()),
        ("a", e.amount_cents.to_string()),
        ("act", e.activity_id.clone()),
        ("sc", e.scene_id.clone()),
        ("t", e.at_ms.to_string()),
        ("g", e.budget_gen.to_string()),
    ];
    if e.coupon {
        fields.push(("k", "c".to_string()));
    }
    fields
}

/// Reads a settlement stream entry: the tokens it carries, each with the entry's id, or
/// `None` when it is not one. store.lua writes one entry per partition and call, field `b` holding a
/// line `user|out_trade_no|amount|activity|scene|at|gen` per token (`...|gen|c` for a
/// coupon); an entry of one token in separate fields (earlier releases,
/// [`entry_fields`]) is read as well.
pub fn parse_entry(id: &StreamId) -> Option<Vec<AwardEntry>> {
    let Some(lines) = id.get::<String>("b") else {
        let user: i64 = id.get("u")?;
        return Some(vec![AwardEntry {
            user: UserId::parse(user).ok()?,
            out_trade_no: id.get("o")?,
            amount_cents: id.get::<i64>("a").filter(|a| *a > 0)?,
            activity_id: id.get("act")?,
            scene_id: id.get("sc")?,
            at_ms: id.get("t")?,
            stream_id: Some(id.id.clone()),
            budget_gen: id.get("g").unwrap_or(0),
            coupon: id.get::<String>("k").as_deref() == Some("c"),
        }]);
    };
    lines
        .split('\n')
        .map(|line| {
            let mut parts = line.split('|');
            let entry = AwardEntry {
                user: UserId::parse(parts.next()?.parse().ok()?).ok()?,
                out_trade_no: parts.next()?.to_string(),
                amount_cents: parts.next()?.parse().ok().filter(|a| *a > 0)?,
                activity_id: parts.next()?.to_string(),
                scene_id: parts.next()?.to_string(),
                at_ms: parts.next()?.parse().ok()?,
                stream_id: Some(id.id.clone()),
                budget_gen: parts.next()?.parse().ok()?,
                coupon: false,
            };
            // A coupon's line ends in `|c`.
            let entry = match parts.next() {
                None => entry,
                Some("c") => AwardEntry {
                    coupon: true,
                    ..entry
                },
                Some(_) => return None,
            };
            parts.next().is_none().then_some(entry)
        })
        .collect()
}

/// `user|out_trade_no`, as the settled index and the marker index hold their members.
pub fn index_member(user: UserId, otn: &str) -> String {
    format!("{user}|{otn}")
}

/// Reads an index member written by [`index_member`] (or mark.lua).
pub fn parse_member(member: &str) -> Option<(UserId, &str)> {
    let (user, otn) = member.split_once('|')?;
    let user = UserId::parse(user.parse().ok()?).ok()?;
    Some((user, otn))
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn entry() -> AwardEntry {
        AwardEntry {
            user: UserId::parse(42).unwrap(),
            out_trade_no: "42_cny_rain_7_cash_live".into(),
            amount_cents: 188,
            activity_id: "cny".into(),
            scene_id: "rain".into(),
            at_ms: 1_700_000_000_123,
            stream_id: None,
            budget_gen: 3,
            coupon: false,
        }
    }

    #[test]
    fn a_status_reads_back_what_was_written() {
        let e = entry();
        let parsed = parse_status(e.user, &e.out_trade_no, &pending_status(&e)).unwrap();
        assert!(parsed.pending);
        assert_eq!(parsed.entry, e);
        let settled = format!("s{}", &pending_status(&e)[1..]);
        let parsed = parse_status(e.user, &e.out_trade_no, &settled).unwrap();
        assert!(!parsed.pending);
        assert_eq!(parsed.entry, e);
    }

    #[test]
    fn a_coupon_status_is_never_read_as_cash() {
        let e = AwardEntry {
            activity_id: "tpl-5off".into(),
            amount_cents: 1,
            coupon: true,
            ..entry()
        };
        let pending = pending_status(&e);
        assert!(pending.starts_with("c|"), "{pending}");
        assert_eq!(parse_status(e.user, &e.out_trade_no, &pending), None);
        let parsed = parse_coupon_status(e.user, &e.out_trade_no, &pending).unwrap();
        assert!(parsed.pending);
        assert_eq!(parsed.entry, e);
        let booked = format!("d{}", &pending[1..]);
        assert_eq!(parse_status(e.user, &e.out_trade_no, &booked), None);
        assert!(
            !parse_coupon_status(e.user, &e.out_trade_no, &booked)
                .unwrap()
                .pending
        );
        let cash = pending_status(&entry());
        assert_eq!(parse_coupon_status(e.user, "o", &cash), None);
        let statuses = vec![("o".to_string(), pending)];
        assert_eq!(pending_in(e.user, &statuses).count(), 0);
    }

    #[test]
    fn a_status_without_generation_is_generation_zero() {
        let e = entry();
        let parsed = parse_status(e.user, "o", "p|5|10|cny|rain").unwrap();
        assert_eq!(parsed.entry.budget_gen, 0);
        assert_eq!(parsed.entry.amount_cents, 5);
    }

    #[test]
    fn anything_else_is_not_a_status() {
        let u = entry().user;
        for bad in [
            "",
            "x|5|10|a|s|1",
            "p|five|10|a|s|1",
            "p|0|10|a|s|1",
            "p|-5|10|a|s|1",
            "p|5|10|a",
            "p|5|10|a|s|g",
            "p|5|10|a|s|1|extra",
        ] {
            assert_eq!(parse_status(u, "o", bad), None, "{bad}");
        }
    }

    #[test]
    fn only_pending_entries_are_pending() {
        let e = entry();
        let statuses = vec![
            ("a".to_string(), "p|1|1|x|y|1".to_string()),
            ("b".to_string(), "s|2|2|x|y|1".to_string()),
            ("c".to_string(), "garbage".to_string()),
            ("d".to_string(), "p|4|4|x|y".to_string()),
        ];
        let pending: Vec<_> = pending_in(e.user, &statuses)
            .map(|e| (e.out_trade_no, e.amount_cents))
            .collect();
        assert_eq!(pending, vec![("a".into(), 1), ("d".into(), 4)]);
    }

    #[test]
    fn a_stream_entry_reads_back_what_was_written() {
        let e = entry();
        let map: HashMap<String, redis::Value> = entry_fields(&e)
            .into_iter()
            .map(|(k, v)| (k.to_string(), redis::Value::BulkString(v.into_bytes())))
            .collect();
        let id = StreamId {
            id: "1-1".into(),
            map,
        };
        let parsed = parse_entry(&id).unwrap();
        assert_eq!(
            parsed,
            vec![AwardEntry {
                stream_id: Some("1-1".into()),
                ..e.clone()
            }]
        );
        let coupon = AwardEntry { coupon: true, ..e };
        let map: HashMap<String, redis::Value> = entry_fields(&coupon)
            .into_iter()
            .map(|(k, v)| (k.to_string(), redis::Value::BulkString(v.into_bytes())))
            .collect();
        let parsed = parse_entry(&StreamId {
            id: "1-2".into(),
            map,
        })
        .unwrap();
        assert!(parsed[0].coupon);
    }

    #[test]
    fn a_stream_entry_of_many_tokens_reads_back_every_one() {
        let e = entry();
        let mut second = e.clone();
        second.out_trade_no = "43_cny_rain_7_cash_live".into();
        second.user = UserId::parse(43).unwrap();
        second.amount_cents = 7;
        let line = stream_line;
        let entry_of = |text: String| StreamId {
            id: "2-0".into(),
            map: HashMap::from([("b".to_string(), redis::Value::BulkString(text.into_bytes()))]),
        };
        let parsed = parse_entry(&entry_of(format!("{}\n{}", line(&e), line(&second)))).unwrap();
        let with_id = |e: &AwardEntry| AwardEntry {
            stream_id: Some("2-0".into()),
            ..e.clone()
        };
        assert_eq!(parsed, vec![with_id(&e), with_id(&second)]);
        let coupon_entry = AwardEntry {
            coupon: true,
            ..e.clone()
        };
        assert_eq!(line(&coupon_entry), format!("{}|c", line(&e)));
        let coupon = parse_entry(&entry_of(line(&coupon_entry))).unwrap();
        assert_eq!(
            coupon,
            vec![AwardEntry {
                coupon: true,
                ..with_id(&e)
            }]
        );
        for bad in [
            format!("{}|d", line(&e)),
            format!("{}\n", line(&e)),
            format!("{}|extra", line(&e)),
            "42|o|0|cny|rain|1|1".to_string(),
            "42|o|5|cny|rain|1".to_string(),
        ] {
            assert_eq!(parse_entry(&entry_of(bad.clone())), None, "{bad}");
        }
    }

    #[test]
    fn index_members_round_trip() {
        let e = entry();
        let m = index_member(e.user, &e.out_trade_no);
        assert_eq!(parse_member(&m), Some((e.user, e.out_trade_no.as_str())));
        assert_eq!(parse_member("nope"), None);
        assert_eq!(parse_member("0|x"), None);
    }
}
