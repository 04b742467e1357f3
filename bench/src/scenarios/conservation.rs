//! The end-of-run check that money was conserved, read from the service's own accounts
//! (no SQL of the bench's): the operator API's live figures of the activity, the wallets
//! of the users who withdrew, and the service's reconciliation report for every hour the
//! run touched. Runs after the drains, with nothing in flight.

use crate::api::Wallet;
use crate::bench::{Bench, ACTIVITY};
use crate::product::Product;
use crate::report::Conservation;
use crate::scenarios::withdraw::{Withdrawals, AMOUNT_CENTS};

/// Wallet mismatches listed one by one; past this many only their number is given.
const WALLET_PROBLEMS_LISTED: usize = 5;

pub async fn run(bench: &Bench, withdrawals: &Withdrawals) -> anyhow::Result<Conservation> {
    let mut problems = Vec::new();

    let figures = bench.api.activity_figures(ACTIVITY).await?;
    let backlog = bench.product.backlog().await?;
    // After the drain every issued token is booked, and only once.
    if figures.issued_cents != figures.booked_cents || figures.issued_count != figures.booked_count
    {
        problems.push(format!(
            "issued {} cents in {} tokens, booked {} cents in {} rows after the drain",
            figures.issued_cents, figures.issued_count, figures.booked_cents, figures.booked_count
        ));
    }
    if backlog != 0 || figures.pending_cents != 0 || figures.pending_count != 0 {
        problems.push(format!(
            "backlog {backlog} entries, {} cents in {} tokens pending after the drain",
            figures.pending_cents, figures.pending_count
        ));
    }
    // Nothing is in flight, so every cent of budget taken became a token.
    if figures.budget_taken_cents != figures.issued_cents {
        problems.push(format!(
            "budget taken {} cents, issued {} cents",
            figures.budget_taken_cents, figures.issued_cents
        ));
    }

    let mut reconciliation = Vec::new();
    for hour in Product::hours(bench.started_ms, Product::now_ms()) {
        reconciliation.push(bench.product.reconcile(ACTIVITY, &hour).await?);
    }
    for r in reconciliation.iter().filter(|r| !r.ok) {
        problems.push(format!(
            "reconciliation of hour {}: {}",
            r.hour,
            r.problems.join("; ")
        ));
    }
    // The leak is the activity's (over its open budget generations), the same in every
    // hour's report: the latest one says it.
    let leak_cents = reconciliation.last().map_or(0, |r| r.leak_cents);
    if leak_cents != 0 {
        problems.push(format!("leak of {leak_cents} cents with nothing in flight"));
    }

    let mut withdrawn_cents = 0;
    let mut wrong_wallets = Vec::new();
    for (&user, &income_cents) in &withdrawals.income_cents {
        let jwt = bench.product.user_jwt(user, 600)?;
        let wallet = bench.api.wallet(&jwt).await?;
        withdrawn_cents += wallet.withdrawn_cents;
        if !wallet_adds_up(&wallet, income_cents) {
            wrong_wallets.push(format!(
                "user {user}: {wallet:?}, expected income {income_cents}, withdrawn {AMOUNT_CENTS}, nothing pending"
            ));
        }
    }
    if !wrong_wallets.is_empty() {
        let n = wrong_wallets.len();
        problems.extend(wrong_wallets.into_iter().take(WALLET_PROBLEMS_LISTED));
        if n > WALLET_PROBLEMS_LISTED {
            problems.push(format!("{n} wallets in all do not add up"));
        }
    }

    Ok(Conservation {
        ok: problems.is_empty(),
        issued_cents: figures.issued_cents,
        booked_cents: figures.booked_cents,
        pending_cents: figures.pending_cents,
        withdrawn_cents,
        issued_count: figures.issued_count,
        booked_count: figures.booked_count,
        backlog,
        budget_taken_cents: figures.budget_taken_cents,
        leak_cents,
        wallets_checked: withdrawals.income_cents.len(),
        reconciliation,
        problems,
    })
}

/// A withdrawing user's wallet after the drain: everything awarded came in, the one
/// withdrawal went out, nothing is pending, and the balance is the difference.
fn wallet_adds_up(wallet: &Wallet, income_cents: i64) -> bool {
    let balance_cents = income_cents - AMOUNT_CENTS;
    wallet.total_income_cents == income_cents
        && wallet.withdrawn_cents == AMOUNT_CENTS
        && wallet.pending_cents == 0
        && wallet.booked_cents == balance_cents
        && wallet.balance_cents == balance_cents
}
