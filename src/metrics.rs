//! Prometheus metrics. One recorder per process (tests start several apps in one
//! process, so it is installed once and shared). Names carry their unit last. Work done
//! for shadow traffic records nothing (`shadow::active`).

use std::sync::OnceLock;

use metrics::{counter, gauge, histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

const LATENCY_BUCKETS_SECONDS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
];

pub fn install() -> PrometheusHandle {
    HANDLE
        .get_or_init(|| {
            let recorder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), LATENCY_BUCKETS_SECONDS)
                .expect("static bucket list is not empty")
                .build_recorder();
            let handle = recorder.handle();
            // Another recorder may already be installed (an embedding program's); then
            // this handle renders an empty page rather than failing start-up.
            let _ = metrics::set_global_recorder(recorder);
            register_zeroes();
            handle
        })
        .clone()
}

/// Registers the counters at zero, so every series exists from the start (a dashboard
/// sees "no errors" rather than "no data").
fn register_zeroes() {
    for dependency in ["mysql", "redis"] {
        counter!("rpw_dependency_errors_total", "dependency" => dependency).increment(0);
    }
    counter!("rpw_booked_tokens_total").increment(0);
    counter!("rpw_webhook_deliveries_total", "outcome" => "delivered").increment(0);
    counter!("rpw_webhook_deliveries_total", "outcome" => "failed").increment(0);
    counter!("rpw_webhook_deliveries_total", "outcome" => "gave_up").increment(0);
    counter!("rpw_reconciliation_mismatches_total", "activity" => "").increment(0);
    counter!("rpw_awards_total", "outcome" => "issued").increment(0);
    counter!("rpw_tx_retries_total", "op" => "withdraw").increment(0);
    for source in ["redis", "mysql", "degraded"] {
        counter!("rpw_wallet_views_total", "source" => source).increment(0);
    }
}

pub fn award_outcome(outcome: &'static str) {
    if crate::shadow::active() {
        return;
    }
    counter!("rpw_awards_total", "outcome" => outcome).increment(1);
}

pub fn award_latency(seconds: f64, endpoint: &'static str) {
    if crate::shadow::active() {
        return;
    }
    histogram!("rpw_award_request_duration_seconds", "endpoint" => endpoint).record(seconds);
}

pub fn backlog(partition: u32, entries: u64) {
    if crate::shadow::active() {
        return;
    }
    gauge!("rpw_settle_backlog_entries", "partition" => partition.to_string()).set(entries as f64);
}

pub fn booked(tokens: u64) {
    if crate::shadow::active() {
        return;
    }
    counter!("rpw_booked_tokens_total").increment(tokens);
}

pub fn booking_batch_latency(seconds: f64) {
    if crate::shadow::active() {
        return;
    }
    histogram!("rpw_booking_batch_duration_seconds").record(seconds);
}

pub fn withdraw_latency(seconds: f64) {
    if crate::shadow::active() {
        return;
    }
    histogram!("rpw_withdraw_duration_seconds").record(seconds);
}

pub fn view_latency(seconds: f64, view: &'static str) {
    if crate::shadow::active() {
        return;
    }
    histogram!("rpw_view_duration_seconds", "view" => view).record(seconds);
}

pub fn reconciliation_mismatch(activity: &str) {
    if crate::shadow::active() {
        return;
    }
    counter!("rpw_reconciliation_mismatches_total", "activity" => activity.to_string())
        .increment(1);
}

/// A wallet view answered: from Redis alone (`redis`), with MySQL's booked figures
/// (`mysql`), or from the snapshot while MySQL failed (`degraded`).
pub fn view_served(source: &'static str) {
    if crate::shadow::active() {
        return;
    }
    counter!("rpw_wallet_views_total", "source" => source).increment(1);
}

/// A red packet grab answered (`eligible`, `finished`, `already_opened`, `expired`).
pub fn packet_grab(outcome: crate::packets::Grab) {
    if crate::shadow::active() {
        return;
    }
    let outcome = match outcome {
        crate::packets::Grab::Eligible => "eligible",
        crate::packets::Grab::Finished => "finished",
        crate::packets::Grab::AlreadyOpened => "already_opened",
        crate::packets::Grab::Expired => "expired",
    };
    counter!("rpw_packet_grabs_total", "outcome" => outcome).increment(1);
}

/// An award refused by a seckill guard (`blacklist`, `early`, `flagged`, `one_win`).
pub fn guard_refusal(guard: &'static str) {
    if crate::shadow::active() {
        return;
    }
    counter!("rpw_guard_refusals_total", "guard" => guard).increment(1);
}

/// New one-win claims checked against the ledger (Redis had lost claims of their scene).
pub fn guard_ledger_checks(n: usize) {
    if crate::shadow::active() {
        return;
    }
    counter!("rpw_guard_ledger_checks_total").increment(n as u64);
}

/// A user flagged (`early`, `burst`).
pub fn user_flagged(reason: &'static str) {
    if crate::shadow::active() {
        return;
    }
    counter!("rpw_flagged_users_total", "reason" => reason).increment(1);
}

/// A red packet share opened.
pub fn packet_opened() {
    if crate::shadow::active() {
        return;
    }
    counter!("rpw_packet_shares_opened_total").increment(1);
}

/// A red packet's remainder refunded to its sender.
pub fn packet_refunded() {
    if crate::shadow::active() {
        return;
    }
    counter!("rpw_packet_refunds_total").increment(1);
}

pub fn dependency_error(dependency: &'static str) {
    if crate::shadow::active() {
        return;
    }
    counter!("rpw_dependency_errors_total", "dependency" => dependency).increment(1);
}

/// A MySQL transaction rolled back by a deadlock or a lock wait timeout, tried again.
pub fn tx_retry(op: &'static str) {
    if crate::shadow::active() {
        return;
    }
    counter!("rpw_tx_retries_total", "op" => op).increment(1);
}

pub fn rate_limited(kind: &'static str) {
    if crate::shadow::active() {
        return;
    }
    counter!("rpw_rate_limited_total", "limit" => kind).increment(1);
}

pub fn budget_generation_lost(activity: &str) {
    if crate::shadow::active() {
        return;
    }
    counter!("rpw_budget_generations_lost_total", "activity" => activity.to_string()).increment(1);
}

/// One webhook delivery attempt: `delivered`, `failed` (to be retried) or `gave_up`.
pub fn webhook_delivery(outcome: &'static str) {
    if crate::shadow::active() {
        return;
    }
    counter!("rpw_webhook_deliveries_total", "outcome" => outcome).increment(1);
}

pub fn booking_failure(partition: u32) {
    if crate::shadow::active() {
        return;
    }
    counter!("rpw_booking_failures_total", "partition" => partition.to_string()).increment(1);
}

pub fn parked(partition: u32, entries: u64) {
    if crate::shadow::active() {
        return;
    }
    counter!("rpw_parked_entries_total", "partition" => partition.to_string()).increment(entries);
}

/// Coupons booked (their `coupons` rows written).
pub fn coupons_booked(n: usize) {
    if crate::shadow::active() || n == 0 {
        return;
    }
    counter!("rpw_coupons_booked_total").increment(n as u64);
}

/// Coupons the expiry job turned `expired`.
pub fn coupons_expired(n: u64) {
    if crate::shadow::active() || n == 0 {
        return;
    }
    counter!("rpw_coupons_expired_total").increment(n);
}

/// A coupon used by a merchant.
pub fn coupon_redeemed() {
    if crate::shadow::active() {
        return;
    }
    counter!("rpw_coupons_redeemed_total").increment(1);
}

/// A coupon scene handed out its fallback (`template` or `greeting`).
pub fn coupon_fallback(kind: &'static str) {
    if crate::shadow::active() {
        return;
    }
    counter!("rpw_coupon_fallbacks_total", "kind" => kind).increment(1);
}
