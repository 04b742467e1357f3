//! redpacket-wallet: hands out cash red packets in bursts far larger than the accounting
//! database can take, while every user sees every cent at once and can withdraw it.
//!
//! Every award is a signed protobuf token (Ed25519), stored in Redis with its accounting
//! status and kept by the client too. An accounting worker books tokens into the MySQL
//! ledger at a bounded rate; views merge the ledger with the pending tokens exactly; a
//! withdrawal books the user's pending tokens first.
//!
//! # Layout
//! - [`config`], [`domain`], [`error`]: settings, value types, the API error.
//! - [`keys`], [`token`]: signing keys and award tokens.
//! - [`store`]: Redis and MySQL connections and the Redis key layout.
//! - [`activity`]: activities and scenes, the operator API and the in-process cache.
//! - [`issue`]: the hot path, awards to tokens (budget sub-stocks, store script).
//! - [`settle`]: booking into the ledger; [`settle::worker`] drains the streams.
//! - [`wallet`]: balance and flow views, client sync. [`withdraw`]: withdrawals, payouts.
//! - [`reconcile`], [`cron`], [`switches`], [`admission`], [`metrics`]: operations.
//! - [`http`], [`startup`]: the HTTP edge and assembling the application.

pub mod activity;
pub mod admission;
pub mod config;
pub mod cron;
pub mod domain;
pub mod error;
pub mod http;
pub mod issue;
pub mod keys;
pub mod metrics;
pub mod reconcile;
pub mod settle;
pub mod startup;
pub mod store;
pub mod switches;
pub mod token;
pub mod tokens;
pub mod wallet;
pub mod withdraw;

/// Messages generated from `proto/redpacket.proto`.
#[allow(clippy::all, missing_docs)]
pub mod pb {
    include!(concat!(env!("OUT_DIR"), "/redpacket.v1.rs"));
}
