//! Operations: reconciliation and budget repairs, and the scheduled jobs.

pub mod cron;
pub mod reconcile;
pub mod reshard;
