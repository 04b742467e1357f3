//! The physical ceiling: how many tokens one core can sign a second with the service's
//! own minting code. A one-second CPU measurement on the calling thread, not a load: it
//! does not go through `load::run`, whose per-call bookkeeping would be counted in it.

use std::time::{Duration, Instant};

use crate::bench::Bench;
use crate::product::pb;
use crate::report::{round2, Ceiling};
use crate::scenarios::award;

pub fn run(bench: &Bench) -> anyhow::Result<Ceiling> {
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let draft = award(1, 1);
    let token = pb::RedPacketToken {
        user_id: draft.user_id,
        activity_id: draft.activity_id,
        amount_cents: draft.amount_cents,
        out_trade_no: "1_rain_1_cash_live".into(),
        ..Default::default()
    };
    let signer = bench.product.signer();
    let started = Instant::now();
    let mut n = 0u64;
    while started.elapsed() < Duration::from_secs(1) {
        for i in 0..100 {
            let mut t = token.clone();
            t.issued_at_ms = i;
            std::hint::black_box(signer.mint(t)?);
        }
        n += 100;
    }
    Ok(Ceiling {
        cores,
        sign_per_s_per_core: round2(n as f64 / started.elapsed().as_secs_f64()),
    })
}
