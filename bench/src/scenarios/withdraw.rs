//! Withdrawals during the backlog: fresh users each get `PER_USER` pending tokens, then
//! each withdraws once, `CLIENTS` at a time, so every withdrawal first books its user's
//! pending tokens (forced settlement). Any failed withdrawal fails the run.
//!
//! The first `CLIENTS` withdrawals start together, on a server that has not withdrawn
//! yet (its pool opens connections and prepares the statements on them); they are timed
//! apart as the first wave, beside the p99 of the rest.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use anyhow::bail;
use prost::Message;

use crate::bench::Bench;
use crate::load::{self, Call, Latencies, Until};
use crate::product::pb;
use crate::report::{round2, Withdraw};
use crate::scenarios::award;

/// Pending tokens each user holds when withdrawing.
const PER_USER: i64 = 50;
/// Withdrawals in flight at once.
const CLIENTS: usize = 16;
/// What each user withdraws.
pub const AMOUNT_CENTS: i64 = 10;
/// The rains the users' tokens come from: `FIRST_RAIN..FIRST_RAIN + PER_USER`.
const FIRST_RAIN: i64 = 100;

/// What the scenario did, for the conservation check to verify in the users' wallets.
pub struct Withdrawals {
    pub figures: Withdraw,
    /// Each user and the cents the service accepted to award them; each withdrew
    /// [`AMOUNT_CENTS`].
    pub income_cents: BTreeMap<i64, i64>,
}

/// The scenario's users, each holding [`PER_USER`] pending tokens, not yet withdrawn.
pub struct Issued {
    users: Vec<i64>,
    income_cents: BTreeMap<i64, i64>,
}

/// Issues the scenario's tokens: [`PER_USER`] to each of its fresh users.
pub async fn issue(bench: &Arc<Bench>) -> anyhow::Result<Issued> {
    let first = bench.take_users(bench.plan.withdraw_users);
    let users: Vec<i64> = (first..first + bench.plan.withdraw_users).collect();
    let awards: Vec<pb::AwardRequest> = users
        .iter()
        .flat_map(|&u| (0..PER_USER).map(move |r| award(u, FIRST_RAIN + r)))
        .collect();
    let mut income_cents: BTreeMap<i64, i64> = users.iter().map(|&u| (u, 0)).collect();
    for chunk in awards.chunks(1000) {
        let body = pb::AwardBatchRequest {
            awards: chunk.to_vec(),
        }
        .encode_to_vec();
        let (status, answer) = bench.api.post_pb("/v1/awards:batch", body).await?;
        if status != 200 {
            bail!("issuing the withdraw scenario's tokens: {status}");
        }
        // Results come in request order; only accepted awards reach the wallets.
        let answer = pb::AwardBatchResponse::decode(answer)?;
        for (a, r) in chunk.iter().zip(&answer.results) {
            if matches!(r.result, Some(pb::award_result::Result::Ok(_))) {
                *income_cents.entry(a.user_id).or_default() += a.amount_cents;
            }
        }
    }
    Ok(Issued {
        users,
        income_cents,
    })
}

/// Each issued user withdraws [`AMOUNT_CENTS`] once, [`CLIENTS`] at a time.
pub async fn run(bench: &Arc<Bench>, issued: Issued) -> anyhow::Result<Withdrawals> {
    let Issued {
        users,
        income_cents,
    } = issued;
    let b = bench.clone();
    let queue = Arc::new(users);
    // Each answered withdrawal's place in the order they started and its latency (µs).
    let timed: Arc<Mutex<Vec<(u64, u64)>>> = Arc::default();
    let timings = timed.clone();
    let load = load::run(CLIENTS, Until::Count(queue.len() as u64), move |turn| {
        let user = queue[turn.seq as usize];
        let jwt = b.product.user_jwt(user, 600);
        let b = b.clone();
        let timings = timings.clone();
        async move {
            let Ok(jwt) = jwt else {
                return Call::failed();
            };
            let request_id = format!("bench-{user}");
            let started = Instant::now();
            match b.api.withdraw(&jwt, &request_id, AMOUNT_CENTS).await {
                Ok(201) => {
                    let us = started.elapsed().as_micros() as u64;
                    timings.lock().expect("timings").push((turn.seq, us));
                    Call::ok()
                }
                _ => Call::failed(),
            }
        }
    })
    .await?;
    if load.errors > 0 {
        bail!("{} withdrawals failed", load.errors);
    }
    let timed = std::mem::take(&mut *timed.lock().expect("timings"));
    let (first, rest): (Vec<_>, Vec<_>) = timed
        .into_iter()
        .partition(|(seq, _)| *seq < CLIENTS as u64);
    let first = Latencies::of(first.into_iter().map(|(_, us)| us).collect());
    let rest = Latencies::of(rest.into_iter().map(|(_, us)| us).collect());
    Ok(Withdrawals {
        figures: Withdraw {
            pending_per_user: PER_USER,
            p50_ms: round2(load.latencies.ms_at(0.50)),
            p99_ms: round2(load.latencies.ms_at(0.99)),
            first_wave_p50_ms: round2(first.ms_at(0.50)),
            first_wave_max_ms: round2(first.ms_at(1.0)),
            after_first_wave_p99_ms: round2(rest.ms_at(0.99)),
        },
        income_cents,
    })
}
