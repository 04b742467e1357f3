//! The rain of single awards: `POST /v1/awards` in protobuf, one fresh user per request,
//! from many clients at once.

use std::sync::Arc;

use prost::Message;

use crate::bench::Bench;
use crate::load::{self, Call, Until};
use crate::report::{round2, RainSingle};
use crate::scenarios::award;

pub async fn run(bench: &Arc<Bench>) -> anyhow::Result<RainSingle> {
    let before = bench.product.redis_usage().await?;
    let b = bench.clone();
    let load = load::run(
        bench.plan.concurrency_single,
        Until::Elapsed(bench.plan.rain),
        move |_| {
            let body = award(b.take_users(1), 1).encode_to_vec();
            let b = b.clone();
            async move {
                match b.api.post_pb("/v1/awards", body).await {
                    Ok((201, _)) => Call::ok(),
                    _ => Call::failed(),
                }
            }
        },
    )
    .await?;
    let redis = bench.product.redis_usage().await?.since(&before, load.ok);
    Ok(RainSingle {
        awards: load.ok,
        awards_per_s: round2(load.ok_per_s()),
        p50_ms: round2(load.latencies.ms_at(0.50)),
        p99_ms: round2(load.latencies.ms_at(0.99)),
        errors: load.errors,
        redis,
    })
}
