//! Operations: reconciliation and budget repairs, scheduled jobs, degradation switches.

pub mod cron;
pub mod reconcile;
pub mod switches;
