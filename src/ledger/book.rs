//! Booking awards: ledger rows inserted and accounts credited by exactly what was
//! inserted, in one transaction per shard.

use std::collections::{BTreeMap, HashSet};

use sqlx::{MySql, QueryBuilder, Transaction};

use super::{Booked, Ledger, LedgerError};
use crate::domain::UserId;
use crate::tokens::{AwardEntry, TRIMMED};

/// Sums the cash awards per user, refusing what would overflow a 64-bit balance.
/// Coupons carry no cash and are left out.
pub(super) fn credits<'a>(
    entries: impl IntoIterator<Item = &'a AwardEntry>,
) -> Result<BTreeMap<UserId, i64>, LedgerError> {
    let mut credit: BTreeMap<UserId, i64> = BTreeMap::new();
    for e in entries.into_iter().filter(|e| !e.coupon) {
        if e.amount_cents <= 0 {
            return Err(LedgerError::Overflow("awards are positive"));
        }
        let c = credit.entry(e.user).or_default();
        *c = c
            .checked_add(e.amount_cents)
            .ok_or(LedgerError::Overflow("credit overflows a 64-bit balance"))?;
    }
    Ok(credit)
}

impl Ledger {
    /// Books `entries` inside `tx`: inserts the ledger rows the ledger does not hold yet
    /// and credits each account by exactly what was inserted for it. With `force`, that
    /// user's pending tokens (read after the lock) are booked too: a withdrawal's forced
    /// settlement. A coupon gets its ledger row (kind `coupon`, one unit of its
    /// template's stock) and its `coupons` row; no account is touched for it.
    pub async fn book_in_tx(
        &self,
        tx: &mut Transaction<'_, MySql>,
        entries: &[AwardEntry],
        force: Option<UserId>,
    ) -> Result<Booked, LedgerError> {
        // A coupon's user is locked too: the lock proves this shard owns the user's
        // bucket (see `own_buckets`), and the coupon moves with the bucket.
        let mut users: Vec<UserId> = entries.iter().map(|e| e.user).collect();
        users.extend(force);
        users.sort_unstable();
        users.dedup();
        if users.is_empty() {
            return Ok(Booked::default());
        }
        let mut accounts = self.lock_accounts(tx, &users).await?;

        // After the locks: every earlier booker of these users has committed.
        let pending = self.tokens.pending_of_users(&users).await?;
        let mut all: Vec<AwardEntry> = entries.to_vec();
        let mut in_all: HashSet<String> = all.iter().map(|e| e.out_trade_no.clone()).collect();
        let mut extras: Vec<AwardEntry> = Vec::new();
        for candidate in pending {
            if in_all.contains(&candidate.out_trade_no) {
                continue;
            }
            if Some(candidate.user) == force {
                in_all.insert(candidate.out_trade_no.clone());
                all.push(candidate);
            } else {
                extras.push(candidate);
            }
        }
        let otns: Vec<&str> = all
            .iter()
            .chain(&extras)
            .map(|e| e.out_trade_no.as_str())
            .collect();
        let mut known = Self::already_booked(&mut **tx, &otns).await?;
        let mut to_mark: Vec<AwardEntry> = extras
            .into_iter()
            .filter(|e| known.contains(&e.out_trade_no))
            .collect();
        let mut newly: Vec<AwardEntry> = Vec::new();
        for e in &all {
            // `insert` also drops a second copy of one token inside the same batch.
            if known.insert(e.out_trade_no.clone()) {
                newly.push(e.clone());
            }
        }
        let credit = credits(&newly)?;
        if !newly.is_empty() {
            let tokens = self.tokens.token_bytes(&newly).await?;
            let mut insert = QueryBuilder::<MySql>::new(
                "INSERT INTO ledger_entries (user_id, out_trade_no, kind, amount_cents, activity_id, scene_id, at_ms, budget_gen, token) ",
            );
            insert.push_values(newly.iter().zip(&tokens), |mut b, (e, token)| {
                b.push_bind(e.user.get())
                    .push_bind(&e.out_trade_no)
                    .push_bind(if e.coupon { "coupon" } else { "award" })
                    .push_bind(e.amount_cents)
                    .push_bind(&e.activity_id)
                    .push_bind(&e.scene_id)
                    .push_bind(e.at_ms)
                    .push_bind(e.budget_gen)
                    .push_bind(token.as_deref().filter(|t| *t != TRIMMED));
            });
            insert.build().execute(&mut **tx).await?;
            let coupons: Vec<&AwardEntry> = newly.iter().filter(|e| e.coupon).collect();
            crate::coupons::book_in_tx(tx, &self.db, &coupons).await?;
        }
        if !credit.is_empty() {
            let mut update = QueryBuilder::<MySql>::new(
                "INSERT INTO accounts (user_id, balance_cents, total_income_cents) ",
            );
            update.push_values(&credit, |mut b, (user, cents)| {
                b.push_bind(user.get()).push_bind(*cents).push_bind(*cents);
            });
            update.push(
                " ON DUPLICATE KEY UPDATE balance_cents = balance_cents + VALUES(balance_cents), \
                 total_income_cents = total_income_cents + VALUES(total_income_cents), version = version + 1",
            );
            update.build().execute(&mut **tx).await?;
            for (user, cents) in credit {
                if let Some(a) = accounts.get_mut(&user) {
                    a.balance_cents = a
                        .balance_cents
                        .checked_add(cents)
                        .ok_or(LedgerError::Overflow("balance overflows"))?;
                    a.total_income_cents = a
                        .total_income_cents
                        .checked_add(cents)
                        .ok_or(LedgerError::Overflow("income overflows"))?;
                    a.version += 1;
                }
            }
        }
        to_mark.extend(all);
        Ok(Booked {
            newly_booked: newly,
            accounts: accounts.into_values().collect(),
            to_mark,
        })
    }

    /// Books `entries` in one transaction per MySQL shard.
    pub async fn book(&self, entries: &[AwardEntry]) -> Result<Booked, LedgerError> {
        let mut by_shard: BTreeMap<usize, Vec<AwardEntry>> = BTreeMap::new();
        for e in entries {
            by_shard
                .entry(self.db.shard_index(e.user))
                .or_default()
                .push(e.clone());
        }
        let mut all = Booked::default();
        for (shard, part) in by_shard {
            let mut tx = self.db.shard(shard).begin().await?;
            let booked = self.book_in_tx(&mut tx, &part, None).await?;
            tx.commit().await?;
            all.newly_booked.extend(booked.newly_booked);
            all.accounts.extend(booked.accounts);
            all.to_mark.extend(booked.to_mark);
        }
        Ok(all)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn award(user: i64, cents: i64) -> AwardEntry {
        AwardEntry {
            user: UserId::parse(user).unwrap(),
            out_trade_no: format!("{user}_{cents}"),
            amount_cents: cents,
            activity_id: "a".into(),
            scene_id: "s".into(),
            at_ms: 0,
            stream_id: None,
            budget_gen: 1,
            coupon: false,
        }
    }

    #[test]
    fn credits_sum_per_user() {
        let c = credits(&[award(1, 5), award(2, 7), award(1, 10)]).unwrap();
        assert_eq!(
            c.into_iter().map(|(u, c)| (u.get(), c)).collect::<Vec<_>>(),
            vec![(1, 15), (2, 7)]
        );
    }

    #[test]
    fn a_coupon_credits_no_cash() {
        let coupon = AwardEntry {
            coupon: true,
            ..award(1, 1)
        };
        let c = credits(&[award(2, 7), coupon]).unwrap();
        assert_eq!(
            c.into_iter().map(|(u, c)| (u.get(), c)).collect::<Vec<_>>(),
            vec![(2, 7)]
        );
    }

    #[test]
    fn credits_refuse_overflow_and_non_positive_awards() {
        assert!(credits(&[award(1, i64::MAX), award(1, 1)]).is_err());
        assert!(credits(&[award(1, 0)]).is_err());
        assert!(credits(&[award(1, -3)]).is_err());
    }
}
