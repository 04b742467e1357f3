//! The HTTP floor: `GET /healthz` with the client and concurrency of the single rain
//! and the views, so their rates can be read as a share of what HTTP alone allows on
//! this machine.

use std::sync::Arc;

use crate::bench::Bench;
use crate::load::{self, Call, Until};
use crate::report::{round2, HttpFloor};

pub async fn run(bench: &Arc<Bench>) -> anyhow::Result<HttpFloor> {
    let b = bench.clone();
    let load = load::run(
        bench.plan.concurrency_single,
        Until::Elapsed(bench.plan.view),
        move |_| {
            let b = b.clone();
            async move {
                match b.api.healthz().await {
                    Ok(true) => Call::ok(),
                    _ => Call::failed(),
                }
            }
        },
    )
    .await?;
    Ok(HttpFloor {
        requests_per_s: round2(load.ok_per_s()),
        p99_ms: round2(load.latencies.ms_at(0.99)),
        errors: load.errors,
    })
}
