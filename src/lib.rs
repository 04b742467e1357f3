//! redpacket-wallet: hands out cash red packets in bursts far larger than the accounting
//! database can take, while every user sees every cent at once and can withdraw it.
//!
//! Every award is a signed protobuf token (Ed25519), stored in Redis with its accounting
//! status and kept by the client too. An accounting worker books tokens into the MySQL
//! ledger at a bounded rate; views merge the ledger with the pending tokens exactly; a
//! withdrawal books the user's pending tokens first.
//!
//! # Where things happen
//! - An award is **minted** in [`issue`] (validation, the budget from [`budget`],
//!   signing with [`token`]) and stored by [`tokens`], the owner of the Redis token record.
//! - It is **booked** by [`settle`] (the worker and the sweep) through [`ledger`], the one
//!   writer of `ledger_entries` and `accounts`.
//! - Views **merge** ledger and pending tokens in [`wallet`]; client sync restores tokens.
//! - Money is **withdrawn** in [`withdraw`] (forced settlement, debit, payout verdicts).
//! - Changes others must hear of (a withdrawal submitted, paid or failed; a mismatch)
//!   write an event in the same transaction; [`events`] delivers them to webhooks.
//! - [`activity`]: activities, scenes and their cache. [`ops`]: reconciliation and
//!   cron. [`switches`]: the degradation switches every capability reads.
//! - [`http`]: the only axum code, one router per capability. [`app`]: the wiring.
//! - [`domain`], [`error`], [`config`], [`keys`], [`store`], [`metrics`]: shared parts.

pub mod activity;
pub mod app;
pub mod budget;
pub mod config;
pub mod coupons;
pub mod domain;
pub mod error;
pub mod events;
pub mod http;
pub mod issue;
pub mod keys;
pub mod ledger;
pub mod metrics;
pub mod ops;
pub mod packets;
pub mod settle;
pub mod shadow;
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
