//! Wallet views during the backlog: `GET /v1/wallet` in protobuf for users of the single
//! rain, who hold pending tokens beside a booked history (one award each, issued and
//! booked before the rains by [`history`]): a wallet's common case. Any failed view fails
//! the run.

use std::sync::Arc;
use std::time::Duration;

use anyhow::bail;
use prost::Message;

use crate::bench::Bench;
use crate::load::{self, Call, Until};
use crate::product::pb;
use crate::report::{round2, View};
use crate::scenarios::award;

/// The rain the viewed users' history comes from (the single rain is rain 1).
const HISTORY_RAIN: i64 = 0;

/// The users viewed: 1 to this, the single rain's first users.
const USERS: i64 = 2_000;
/// Each client steps through the users this many at a time, from its own index.
const STRIDE: u64 = 7;

/// The viewed users' history: one award each, booked (by the service's own worker)
/// before the rains begin, so their account snapshots exist as a returning user's do.
pub async fn history(bench: &Arc<Bench>) -> anyhow::Result<()> {
    let awards: Vec<pb::AwardRequest> = (1..=USERS).map(|u| award(u, HISTORY_RAIN)).collect();
    for chunk in awards.chunks(1000) {
        let body = pb::AwardBatchRequest {
            awards: chunk.to_vec(),
        }
        .encode_to_vec();
        let (status, _) = bench.api.post_pb("/v1/awards:batch", body).await?;
        if status != 200 {
            bail!("issuing the viewed users' history: {status}");
        }
    }
    crate::scenarios::drain::run(bench, 0, Duration::from_secs(60), true).await?;
    Ok(())
}

/// The served-from-Redis counter and the total of the view counters.
async fn view_counters(bench: &Bench) -> anyhow::Result<(f64, f64)> {
    let mut all = 0.0;
    let mut redis = 0.0;
    for source in ["redis", "mysql", "degraded"] {
        let n = bench
            .api
            .metric(&format!("rpw_wallet_views_total{{source=\"{source}\"}}"))
            .await?;
        all += n;
        if source == "redis" {
            redis = n;
        }
    }
    Ok((redis, all))
}

pub async fn run(bench: &Arc<Bench>) -> anyhow::Result<View> {
    let counters_before = view_counters(bench).await?;
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
    let counters_after = view_counters(bench).await?;
    let counted = counters_after.1 - counters_before.1;
    let from_redis =
        (counted > 0.0).then(|| round2((counters_after.0 - counters_before.0) / counted));
    Ok(View {
        requests: load.ok,
        requests_per_s: round2(load.ok_per_s()),
        p99_ms: round2(load.latencies.ms_at(0.99)),
        from_redis,
    })
}
