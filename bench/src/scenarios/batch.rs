//! The rain in batches: `POST /v1/awards:batch` in protobuf, `batch_size` fresh users per
//! request, from a few clients. Awards are counted one by one (a batch may accept some
//! and refuse others); the latency is the request's, from encoding the batch to its
//! answer (decoding the answer is not counted).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use prost::Message;

use crate::bench::Bench;
use crate::load::{self, Call, Until};
use crate::product::pb;
use crate::report::{round2, RainBatch};
use crate::scenarios::award;

pub async fn run(bench: &Arc<Bench>) -> anyhow::Result<RainBatch> {
    let before = bench.product.redis_usage().await?;
    let sent = Arc::new(AtomicU64::new(0));
    let received = Arc::new(AtomicU64::new(0));
    let (s, r) = (sent.clone(), received.clone());
    let b = bench.clone();
    let size = bench.plan.batch_size;
    let load = load::run(
        bench.plan.concurrency_batch,
        Until::Elapsed(bench.plan.rain),
        move |_| {
            let first = b.take_users(size as i64);
            let batch = pb::AwardBatchRequest {
                awards: (0..size as i64).map(|i| award(first + i, 2)).collect(),
            };
            let b = b.clone();
            let (s, r) = (s.clone(), r.clone());
            async move {
                // Encoding is timed, as it always was; building the awards is not.
                let body = batch.encode_to_vec();
                s.fetch_add(body.len() as u64, Ordering::Relaxed);
                match b.api.post_pb("/v1/awards:batch", body).await {
                    Ok((200, bytes)) => {
                        r.fetch_add(bytes.len() as u64, Ordering::Relaxed);
                        let answered = Instant::now();
                        let resp = pb::AwardBatchResponse::decode(bytes).unwrap_or_default();
                        let ok = resp
                            .results
                            .iter()
                            .filter(|r| matches!(r.result, Some(pb::award_result::Result::Ok(_))))
                            .count() as u64;
                        Call::items(ok, resp.results.len() as u64 - ok).answered_at(answered)
                    }
                    _ => Call::failed_items(size as u64),
                }
            }
        },
    )
    .await?;
    let redis = bench.product.redis_usage().await?.since(&before, load.ok);
    let per =
        |bytes: &AtomicU64| (bytes.load(Ordering::Relaxed) as f64 / load.ok.max(1) as f64).round();
    Ok(RainBatch {
        awards: load.ok,
        request_bytes_per_award: per(&sent),
        answer_bytes_per_award: per(&received),
        awards_per_s: round2(load.ok_per_s()),
        p99_ms: round2(load.latencies.ms_at(0.99)),
        errors: load.errors,
        redis,
    })
}
