//! The design this service replaces: every award booked into MySQL in its own
//! transaction (account row + ledger row) with the service's own booking code, on a
//! separate, empty database. Run first, on an idle MariaDB: its most favourable moment.

use std::sync::Arc;

use crate::bench::{Bench, ACTIVITY};
use crate::load::{self, Call, Until};
use crate::report::{round2, SyncBaseline};
use crate::scenarios::award;

pub async fn run(bench: &Arc<Bench>, mysql_url: &str) -> anyhow::Result<SyncBaseline> {
    let ledger = bench.product.sync_ledger(mysql_url).await?;
    let load = load::run(
        bench.plan.concurrency_single,
        Until::Elapsed(bench.plan.baseline),
        move |turn| {
            // The baseline's users are its own (its own database): 1, 2, 3, ...
            let user = turn.seq as i64 + 1;
            let award = award(user, 1);
            let out_trade_no = format!("{user}_{ACTIVITY}_rain_1_cash_live");
            let ledger = ledger.clone();
            async move {
                match ledger.book(&award, out_trade_no).await {
                    Ok(()) => Call::ok(),
                    Err(_) => Call::failed(),
                }
            }
        },
    )
    .await?;
    Ok(SyncBaseline {
        awards_per_s: round2(load.ok_per_s()),
        errors: load.errors,
    })
}
