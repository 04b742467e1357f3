//! Booking awards: ledger rows inserted and accounts credited by exactly what was
//! inserted, in one transaction per shard.

use std::collections::{BTreeMap, HashSet};

use sqlx::{MySql, QueryBuilder, Transaction};

use super::{
    is_duplicate, upsert_accounts, Account, Booked, Ledger, LedgerError, MoveOut, Moved, MovedOut,
};
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

/// The users of `entries`, sorted and distinct: the order accounts are locked in.
fn users_of(entries: &[AwardEntry]) -> Vec<UserId> {
    let mut users: Vec<UserId> = entries.iter().map(|e| e.user).collect();
    users.sort_unstable();
    users.dedup();
    users
}

/// One ledger row as [`Ledger::insert_rows`] writes it.
struct Row<'a> {
    user: UserId,
    out_trade_no: &'a str,
    kind: &'a str,
    amount_cents: i64,
    /// An award's activity and scene; `None` for a move of money.
    source: Option<(&'a str, &'a str)>,
    at_ms: i64,
    budget_gen: i64,
    token: Option<&'a [u8]>,
}

impl Ledger {
    /// Books `entries` inside `tx`: inserts the ledger rows the ledger does not hold yet
    /// and credits each account by exactly what was inserted for it. A coupon gets its
    /// ledger row (kind `coupon`, one unit of its template's stock) and its `coupons`
    /// row; no account is touched for it.
    ///
    /// The common case (no entry booked yet) takes one statement per step
    /// ([`Ledger::book_new`]); an entry the ledger already holds sends the batch down the
    /// locked path, in the same transaction.
    pub async fn book_in_tx(
        &self,
        tx: &mut Transaction<'_, MySql>,
        entries: &[AwardEntry],
    ) -> Result<Booked, LedgerError> {
        if let Some(booked) = self.book_new(tx, entries).await? {
            return Ok(booked);
        }
        self.book_locked(tx, entries).await
    }

    /// The booking of entries none of which the ledger holds: the bucket check, the
    /// ledger rows, the coupons (if any), one account statement per batch that creates,
    /// locks, credits and reads every account at once (`INSERT … ON DUPLICATE KEY UPDATE
    /// … RETURNING`), and a check of the users' other pending tokens when they have
    /// some. Those are read after the account statement, when every earlier booker of
    /// these users has committed, as the module comment requires. `None` when an entry
    /// is already in the ledger: its row's insert hit the unique key and InnoDB undid
    /// that statement; the bucket locks stay, the transaction goes on with
    /// [`Ledger::book_locked`].
    async fn book_new(
        &self,
        tx: &mut Transaction<'_, MySql>,
        entries: &[AwardEntry],
    ) -> Result<Option<Booked>, LedgerError> {
        let users = users_of(entries);
        if users.is_empty() {
            return Ok(Some(Booked::default()));
        }
        // `users` is not empty, so `own_buckets` names the shard.
        let shard = self.own_buckets(tx, &users).await?.unwrap_or_default();
        let mut seen: HashSet<&str> = HashSet::with_capacity(entries.len());
        let newly: Vec<AwardEntry> = entries
            .iter()
            .filter(|e| seen.insert(e.out_trade_no.as_str()))
            .cloned()
            .collect();
        let credit = credits(&newly)?;
        match self.insert_rows(tx, &newly, None).await {
            Err(LedgerError::Sql(err)) if is_duplicate(&err) => return Ok(None),
            other => other?,
        }
        // Past this point the rows are in: any failure fails the transaction.
        self.insert_coupons(tx, &newly).await?;
        let accounts = self.credit_accounts(shard, tx, &users, &credit).await?;
        // After the account statement: every earlier booker of these users has committed.
        let extras = self.pending_besides(&users, &seen).await?;
        let otns: Vec<&str> = extras.iter().map(|e| e.out_trade_no.as_str()).collect();
        let known = Self::already_booked(&mut **tx, &otns).await?;
        let mut to_mark: Vec<AwardEntry> = extras
            .into_iter()
            .filter(|e| known.contains(&e.out_trade_no))
            .collect();
        to_mark.extend_from_slice(entries);
        Ok(Some(Booked {
            newly_booked: newly,
            accounts: accounts.into_values().collect(),
            to_mark,
        }))
    }

    /// The booking that locks the accounts first: batches holding an entry the ledger
    /// already has.
    async fn book_locked(
        &self,
        tx: &mut Transaction<'_, MySql>,
        entries: &[AwardEntry],
    ) -> Result<Booked, LedgerError> {
        // A coupon's user is locked too: `lock_accounts` checks this shard owns the
        // user's bucket (`own_buckets`), and the coupon moves with the bucket.
        let users = users_of(entries);
        if users.is_empty() {
            return Ok(Booked::default());
        }
        let (shard, locked) = self.lock_accounts_on(tx, &users).await?;

        // After the locks: every earlier booker of these users has committed.
        let given: HashSet<&str> = entries.iter().map(|e| e.out_trade_no.as_str()).collect();
        let extras = self.pending_besides(&users, &given).await?;
        let otns: Vec<&str> = entries
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
        for e in entries {
            // `insert` also drops a second copy of one token inside the same batch.
            if known.insert(e.out_trade_no.clone()) {
                newly.push(e.clone());
            }
        }
        let credit = credits(&newly)?;
        self.insert_rows(tx, &newly, None).await?;
        self.insert_coupons(tx, &newly).await?;
        // Credited, the accounts as they will be committed (every user again).
        let accounts = if credit.is_empty() {
            locked
        } else {
            // `users` is not empty, so `lock_accounts_on` named the shard.
            self.credit_accounts(shard.unwrap_or_default(), tx, &users, &credit)
                .await?
        };
        to_mark.extend_from_slice(entries);
        Ok(Booked {
            newly_booked: newly,
            accounts: accounts.into_values().collect(),
            to_mark,
        })
    }

    /// Forced settlement and a move of money out of `user`'s account (a withdrawal, a
    /// red packet sent), in `tx`: locks the account, books every cash token of the user
    /// still pending in Redis (read after the lock, when every earlier booker of the user
    /// has committed; those the ledger holds already are only marked), and moves
    /// `out.amount` out with its ledger row, if the balance then covers it. Nothing is
    /// written when it does not.
    ///
    /// Four statements in the common case: the bucket check, the lock, one insert of the
    /// tokens' rows and the move's row, one update of the account by the credit and the
    /// debit (one more on MySQL 8, whose lock reads the row back with a second
    /// statement). The pending tokens are taken for unbooked at first; if the insert
    /// meets one the ledger holds (booked by a worker that has not marked it yet), InnoDB
    /// undoes the statement, and the rows are written again without the tokens the ledger
    /// holds (two more statements). The failed insert leaves shared locks on the rows it
    /// met, to the end of the transaction: those rows are committed and never change.
    pub async fn settle_and_move_out(
        &self,
        tx: &mut Transaction<'_, MySql>,
        user: UserId,
        out: &MoveOut<'_>,
    ) -> Result<MovedOut, LedgerError> {
        let (_, mut locked) = self.lock_accounts_on(tx, &[user]).await?;
        let mut account = locked.remove(&user).ok_or(sqlx::Error::RowNotFound)?;
        // After the lock: every earlier booker of this user has committed.
        // One user's hash: each out_trade_no once.
        let pending = self.tokens.pending_of_users(&[user]).await?;
        let mut newly: Vec<AwardEntry> = pending.clone();
        let mut first_try = true;
        let credit = loop {
            let credit = credits(&newly)?.remove(&user).unwrap_or(0);
            let covered = account
                .balance_cents
                .checked_add(credit)
                .ok_or(LedgerError::Overflow("balance overflows"))?;
            // The first try credits every pending token: when even that falls short,
            // the balance does.
            if covered < out.amount.get() {
                return Ok(MovedOut::Insufficient);
            }
            match self.insert_rows(tx, &newly, Some((user, out))).await {
                Err(LedgerError::Sql(err)) if first_try && is_duplicate(&err) => {
                    let otns: Vec<&str> = newly.iter().map(|e| e.out_trade_no.as_str()).collect();
                    let known = Self::already_booked(&mut **tx, &otns).await?;
                    newly.retain(|e| !known.contains(&e.out_trade_no));
                    first_try = false;
                }
                other => break other.map(|()| credit)?,
            }
        };
        account.credit(credit)?;
        account.move_out(out.amount)?;
        account.version += 1;
        sqlx::query(
            "UPDATE accounts SET balance_cents = ?, total_income_cents = ?, withdrawn_cents = ?, version = ? WHERE user_id = ?",
        )
        .bind(account.balance_cents)
        .bind(account.total_income_cents)
        .bind(account.withdrawn_cents)
        .bind(account.version)
        .bind(user.get())
        .execute(&mut **tx)
        .await?;
        Ok(MovedOut::Done(Moved {
            account,
            newly_booked: newly.len(),
            to_mark: pending,
        }))
    }

    /// The cash tokens of `users` pending in Redis, but those named in `besides`.
    async fn pending_besides(
        &self,
        users: &[UserId],
        besides: &HashSet<&str>,
    ) -> Result<Vec<AwardEntry>, LedgerError> {
        let pending = self.tokens.pending_of_users(users).await?;
        Ok(pending
            .into_iter()
            .filter(|e| !besides.contains(e.out_trade_no.as_str()))
            .collect())
    }

    /// Inserts the ledger rows of `newly`, with each token's signed bytes as Redis holds
    /// them, and the row of `moved` (a move out of that user's account) if any, in one
    /// statement. A row the ledger holds already fails the whole statement on the unique
    /// key, and InnoDB undoes the statement whole.
    async fn insert_rows(
        &self,
        tx: &mut Transaction<'_, MySql>,
        newly: &[AwardEntry],
        moved: Option<(UserId, &MoveOut<'_>)>,
    ) -> Result<(), LedgerError> {
        if newly.is_empty() && moved.is_none() {
            return Ok(());
        }
        let tokens = self.tokens.token_bytes(newly).await?;
        let mut insert = QueryBuilder::<MySql>::new(
            "INSERT INTO ledger_entries (user_id, out_trade_no, kind, amount_cents, activity_id, scene_id, at_ms, budget_gen, token) ",
        );
        let awards = newly.iter().zip(&tokens).map(|(e, token)| Row {
            user: e.user,
            out_trade_no: &e.out_trade_no,
            kind: if e.coupon { "coupon" } else { "award" },
            amount_cents: e.amount_cents,
            source: Some((&e.activity_id, &e.scene_id)),
            at_ms: e.at_ms,
            budget_gen: e.budget_gen,
            token: token.as_deref().filter(|t| *t != TRIMMED),
        });
        let moved = moved.map(|(user, out)| Row {
            user,
            out_trade_no: out.out_trade_no,
            kind: out.kind,
            amount_cents: -out.amount.get(),
            source: None,
            at_ms: out.at_ms,
            budget_gen: 0,
            token: None,
        });
        insert.push_values(awards.chain(moved), |mut b, row| {
            b.push_bind(row.user.get())
                .push_bind(row.out_trade_no)
                .push_bind(row.kind)
                .push_bind(row.amount_cents)
                .push_bind(row.source.map(|s| s.0))
                .push_bind(row.source.map(|s| s.1))
                .push_bind(row.at_ms)
                .push_bind(row.budget_gen)
                .push_bind(row.token);
        });
        insert.build().execute(&mut **tx).await?;
        Ok(())
    }

    /// The `coupons` rows of the coupons among `newly` (after their ledger rows).
    async fn insert_coupons(
        &self,
        tx: &mut Transaction<'_, MySql>,
        newly: &[AwardEntry],
    ) -> Result<(), LedgerError> {
        let coupons: Vec<&AwardEntry> = newly.iter().filter(|e| e.coupon).collect();
        crate::coupons::book_in_tx(tx, &self.db, &coupons).await?;
        Ok(())
    }

    /// One statement for every account of `users` (sorted, distinct): created if new,
    /// locked, credited by `credit` (nothing for a user it does not name) and read back
    /// as it will be committed (a second statement, `SELECT … FOR UPDATE`, on a server
    /// without `INSERT … RETURNING`). Every account's version grows by one.
    async fn credit_accounts(
        &self,
        shard: usize,
        tx: &mut Transaction<'_, MySql>,
        users: &[UserId],
        credit: &BTreeMap<UserId, i64>,
    ) -> Result<BTreeMap<UserId, Account>, LedgerError> {
        let mut q = QueryBuilder::<MySql>::new(
            "INSERT INTO accounts (user_id, balance_cents, total_income_cents, version) ",
        );
        q.push_values(users, |mut b, user| {
            let cents = credit.get(user).copied().unwrap_or(0);
            b.push_bind(user.get())
                .push_bind(cents)
                .push_bind(cents)
                .push_bind(1i64);
        });
        q.push(
            " ON DUPLICATE KEY UPDATE balance_cents = balance_cents + VALUES(balance_cents), \
             total_income_cents = total_income_cents + VALUES(total_income_cents), version = version + 1",
        );
        upsert_accounts(&self.db, shard, tx, q, users).await
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
            let booked = self.book_in_tx(&mut tx, &part).await?;
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
