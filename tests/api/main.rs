//! Integration tests against the real Redis and MariaDB started by scripts/services.sh.

mod helpers;

mod cluster;
mod coupons;
mod foundation;
mod guards;
mod issuance;
mod money_safety;
mod openapi;
mod operations;
mod packets;
mod pages;
mod reshard;
mod settlement;
mod views;
mod wallet;
mod webhooks;
