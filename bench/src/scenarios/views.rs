//! Wallet views during the backlog: `GET /v1/wallet` in protobuf for users of the single
//! rain, who hold pending tokens. Any failed view fails the run.

use std::sync::Arc;

use anyhow::bail;

use crate::bench::Bench;
use crate::load::{self, Call, Until};
use crate::report::{round2, View};

/// The users viewed: 1 to this, the single rain's first users.
const USERS: i64 = 2_000;
/// Each client steps through the users this many at a time, from its own index.
const STRIDE: u64 = 7;

pub async fn run(bench: &Arc<Bench>) -> anyhow::Result<View> {
    let jwts: Arc<Vec<String>> = Arc::new(
        (1..=USERS)
            .map(|u| bench.product.user_jwt(u, 600))
            .collect::<anyhow::Result<_>>()?,
    );
    let b = bench.clone();
    let load = load::run(
        bench.plan.concurrency_single,
        Until::Elapsed(bench.plan.view),
        move |turn| {
            let i = (turn.worker as u64 + STRIDE * turn.round) as usize % jwts.len();
            let (b, jwts) = (b.clone(), jwts.clone());
            async move {
                match b.api.view_wallet_pb(&jwts[i]).await {
                    Ok(true) => Call::ok(),
                    _ => Call::failed(),
                }
            }
        },
    )
    .await?;
    if load.errors > 0 {
        bail!("{} wallet views failed", load.errors);
    }
    Ok(View {
        requests: load.ok,
        requests_per_s: round2(load.ok_per_s()),
        p99_ms: round2(load.latencies.ms_at(0.99)),
    })
}
