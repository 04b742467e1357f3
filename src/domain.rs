//! Domain types that can only hold valid values. Requests are parsed into these at the
//! edge; the code inside trusts them.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::pb;

/// Why a value was refused; the message is safe to show to the caller.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Invalid(pub String);

fn invalid(msg: impl Into<String>) -> Invalid {
    Invalid(msg.into())
}

/// The largest amount of money any one value may hold, in cents (10^13 cents: a hundred
/// billion yuan). Far inside 2^53, so sums of a few thousand such values stay exact
/// wherever they are added, Lua's doubles included.
pub const MAX_CENTS: i64 = 10_000_000_000_000;

/// An amount of money in cents. Never a float.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize,
)]
#[serde(transparent)]
pub struct Cents(i64);

impl Cents {
    pub const ZERO: Cents = Cents(0);

    pub fn get(self) -> i64 {
        self.0
    }

    /// A strictly positive amount, as awards, budgets and withdrawals must be.
    pub fn positive(value: i64, field: &str) -> Result<Self, Invalid> {
        if value > 0 && value <= MAX_CENTS {
            Ok(Self(value))
        } else {
            Err(invalid(format!(
                "{field} must be a positive number of cents, at most {MAX_CENTS}"
            )))
        }
    }

    /// `self + other`, refused past [`MAX_CENTS`] instead of wrapping.
    pub fn checked_add(self, other: Cents) -> Option<Cents> {
        self.0
            .checked_add(other.0)
            .filter(|sum| *sum <= MAX_CENTS)
            .map(Cents)
    }

    /// `self - other`, refused below zero.
    pub fn checked_sub(self, other: Cents) -> Option<Cents> {
        self.0.checked_sub(other.0).filter(|d| *d >= 0).map(Cents)
    }
}

impl fmt::Display for Cents {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// One person across all client apps (the write-up's "actID").
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct UserId(i64);

impl UserId {
    pub fn parse(value: i64) -> Result<Self, Invalid> {
        if value > 0 {
            Ok(Self(value))
        } else {
            Err(invalid("user_id must be a positive integer"))
        }
    }
    pub fn get(self) -> i64 {
        self.0
    }
    /// The Redis partition this user's keys live in.
    pub fn partition(self, partitions: u32) -> u32 {
        (self.0 % i64::from(partitions)) as u32
    }
}

impl fmt::Display for UserId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

fn parse_slug(value: &str, what: &str) -> Result<(), Invalid> {
    let ok = (1..=32).contains(&value.len())
        && value
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(invalid(format!(
            "{what} must be 1-32 characters of [a-z0-9-]"
        )))
    }
}

macro_rules! slug_type {
    ($(#[$doc:meta])* $name:ident, $what:literal) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
        #[serde(transparent)]
        pub struct $name(String);

        impl $name {
            pub fn parse(value: &str) -> Result<Self, Invalid> {
                parse_slug(value, $what)?;
                Ok(Self(value.to_string()))
            }
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
    };
}

slug_type!(
    /// An activity id: 1-32 of `[a-z0-9-]`.
    ActivityId,
    "activity id"
);
slug_type!(
    /// A scene id: 1-32 of `[a-z0-9-]`.
    SceneId,
    "scene id"
);
slug_type!(
    /// The kind of award (`cash`, `card`, ...): 1-32 of `[a-z0-9-]`, so that the
    /// underscore-separated out_trade_no stays unambiguous.
    AwardType,
    "award_type"
);

/// Data of different stages never mixes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Stage {
    Test,
    Gray,
    Live,
}

impl Stage {
    pub fn as_str(self) -> &'static str {
        match self {
            Stage::Test => "test",
            Stage::Gray => "gray",
            Stage::Live => "live",
        }
    }
    pub fn to_pb(self) -> pb::Stage {
        match self {
            Stage::Test => pb::Stage::Test,
            Stage::Gray => pb::Stage::Gray,
            Stage::Live => pb::Stage::Live,
        }
    }
}

impl FromStr for Stage {
    type Err = Invalid;
    fn from_str(s: &str) -> Result<Self, Invalid> {
        match s {
            "test" => Ok(Stage::Test),
            "gray" => Ok(Stage::Gray),
            "live" => Ok(Stage::Live),
            _ => Err(invalid("stage must be test, gray or live")),
        }
    }
}

/// The award's idempotency key:
/// `{user_id}_{activity_id}_{scene_id}_{rain_id}_{award_type}_{stage}`. Every part but the
/// numbers is `[a-z0-9-]`, so the parts never run together.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
#[serde(transparent)]
pub struct OutTradeNo(String);

impl OutTradeNo {
    pub fn compose(
        user: UserId,
        activity: &ActivityId,
        scene: &SceneId,
        rain_id: i64,
        award_type: &AwardType,
        stage: Stage,
    ) -> Self {
        Self(format!(
            "{}_{}_{}_{}_{}_{}",
            user,
            activity,
            scene,
            rain_id,
            award_type,
            stage.as_str()
        ))
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The activity part of a composed out_trade_no.
    pub fn activity_of(otn: &str) -> Option<&str> {
        otn.split('_').nth(1)
    }
}

impl fmt::Display for OutTradeNo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A caller's idempotency key for a withdrawal: 1-64 printable ASCII characters
/// without spaces.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
#[serde(transparent)]
pub struct RequestId(String);

impl RequestId {
    pub fn parse(value: &str) -> Result<Self, Invalid> {
        let ok = (1..=64).contains(&value.len()) && value.bytes().all(|b| b.is_ascii_graphic());
        if ok {
            Ok(Self(value.to_string()))
        } else {
            Err(invalid(
                "request_id must be 1-64 printable characters without spaces",
            ))
        }
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for RequestId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Where a withdrawal stands: `submitted` until the payout channel answers, then `paid`
/// (final) or `failed` (the money went back with a reversal).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WithdrawalStatus {
    Submitted,
    Paid,
    Failed,
}

impl WithdrawalStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            WithdrawalStatus::Submitted => "submitted",
            WithdrawalStatus::Paid => "paid",
            WithdrawalStatus::Failed => "failed",
        }
    }

    /// A verdict of the payout channel: `paid` or `failed`.
    pub fn parse_verdict(value: &str) -> Result<Self, Invalid> {
        match value {
            "paid" => Ok(WithdrawalStatus::Paid),
            "failed" => Ok(WithdrawalStatus::Failed),
            _ => Err(invalid("status must be paid or failed")),
        }
    }
}

impl FromStr for WithdrawalStatus {
    type Err = Invalid;
    fn from_str(s: &str) -> Result<Self, Invalid> {
        match s {
            "submitted" => Ok(WithdrawalStatus::Submitted),
            other => Self::parse_verdict(other),
        }
    }
}

/// A rain id is the wave number inside a scene; zero is allowed, negatives are not.
pub fn parse_rain_id(value: i64) -> Result<i64, Invalid> {
    if value >= 0 {
        Ok(value)
    } else {
        Err(invalid("rain_id must not be negative"))
    }
}

/// Lower-case hex of `bytes` (ids, key ids, signatures).
pub fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes
        .iter()
        .fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slugs_refuse_what_would_break_keys() {
        assert!(ActivityId::parse("cny2027").is_ok());
        assert!(ActivityId::parse("").is_err());
        assert!(ActivityId::parse("Upper").is_err());
        assert!(ActivityId::parse("a_b").is_err());
        assert!(ActivityId::parse("a{b}").is_err());
        assert!(ActivityId::parse(&"a".repeat(33)).is_err());
        assert!(SceneId::parse("rain-1").is_ok());
    }

    #[test]
    fn out_trade_no_has_the_documented_shape() {
        let otn = OutTradeNo::compose(
            UserId::parse(42).unwrap(),
            &ActivityId::parse("cny2027").unwrap(),
            &SceneId::parse("rain").unwrap(),
            7,
            &AwardType::parse("cash").unwrap(),
            Stage::Live,
        );
        assert_eq!(otn.as_str(), "42_cny2027_rain_7_cash_live");
        assert_eq!(OutTradeNo::activity_of(otn.as_str()), Some("cny2027"));
    }

    #[test]
    fn money_and_users_are_positive() {
        assert!(Cents::positive(0, "amount_cents").is_err());
        assert!(Cents::positive(-5, "amount_cents").is_err());
        assert!(Cents::positive(MAX_CENTS, "budget_cents").is_ok());
        assert!(Cents::positive(MAX_CENTS + 1, "budget_cents").is_err());
        assert!(UserId::parse(0).is_err());
        assert_eq!(UserId::parse(42).unwrap().partition(16), 10);
    }

    #[test]
    fn money_arithmetic_is_checked() {
        let a = Cents::positive(MAX_CENTS - 1, "a").unwrap();
        let one = Cents::positive(1, "b").unwrap();
        assert_eq!(a.checked_add(one).map(Cents::get), Some(MAX_CENTS));
        assert_eq!(a.checked_add(one).unwrap().checked_add(one), None);
        assert_eq!(one.checked_sub(a), None);
        assert_eq!(one.checked_sub(one), Some(Cents::ZERO));
    }

    #[test]
    fn request_ids_and_withdrawal_statuses() {
        assert!(RequestId::parse("r-1").is_ok());
        assert!(RequestId::parse("").is_err());
        assert!(RequestId::parse(" r").is_err());
        assert!(RequestId::parse("a b").is_err());
        assert!(RequestId::parse(&"r".repeat(65)).is_err());
        assert_eq!("paid".parse(), Ok(WithdrawalStatus::Paid));
        assert_eq!("submitted".parse(), Ok(WithdrawalStatus::Submitted));
        assert!(WithdrawalStatus::parse_verdict("submitted").is_err());
        assert!("PAID".parse::<WithdrawalStatus>().is_err());
    }
}
