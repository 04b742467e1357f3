//! The `redpacket-wallet` command line: parses arguments and calls into the library.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use clap::{Parser, Subcommand};
use redpacket_wallet::app::{shutdown_signal, App, RunOptions, Running};
use redpacket_wallet::config::Settings;
use redpacket_wallet::domain::UserId;
use redpacket_wallet::http::auth::AuthKeys;
use redpacket_wallet::keys;
use redpacket_wallet::store::Db;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "redpacket-wallet",
    version,
    about = "Red-packet token wallet service",
    long_about = "Red-packet token wallet service: signed award tokens, booking at a bounded \
rate, exact merged views.\n\nSettings come from the defaults, then a --config file, then \
RPW_SECTION__KEY environment variables (config/example.toml lists every one). Logs go to \
stderr; RUST_LOG sets their level, RPW_LOG_FORMAT=json makes them JSON lines.",
    after_help = "Examples:\n  redpacket-wallet migrate\n  redpacket-wallet keys generate\n  \
redpacket-wallet --config config/local.toml serve\n  RPW_SETTLE__MAX_TPS=500 redpacket-wallet worker\n  \
redpacket-wallet reconcile --activity cny2027"
)]
struct Cli {
    /// A TOML configuration file (see config/example.toml); `RPW_SECTION__KEY`
    /// environment variables override it.
    #[arg(long, global = true, env = "RPW_CONFIG", value_name = "FILE")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serves the HTTP API, with the accounting worker and the cron jobs.
    #[command(after_help = "Examples:\n  redpacket-wallet serve\n  \
RPW_HTTP__ADDR=0.0.0.0:8080 redpacket-wallet serve --no-worker   # HTTP only; run `worker` elsewhere\n  \
redpacket-wallet serve --no-cron --no-migrate")]
    Serve {
        /// Do not run the accounting worker in this process (run `worker` elsewhere).
        #[arg(long)]
        no_worker: bool,
        /// Do not run the cron jobs in this process (another instance runs them; each
        /// tick runs once per fleet anyway).
        #[arg(long)]
        no_cron: bool,
        /// Do not apply migrations at start, whatever `mysql.migrate_on_start` says.
        #[arg(long)]
        no_migrate: bool,
    },
    /// Runs only the accounting worker (and the webhook dispatcher), without HTTP.
    #[command(after_help = "Example:\n  RPW_SETTLE__MAX_TPS=2000 redpacket-wallet worker")]
    Worker,
    /// Creates the database(s) when missing and applies the embedded migrations.
    #[command(
        after_help = "Example:\n  RPW_MYSQL__URL=mysql://rpw:rpw@127.0.0.1:3306/rpw redpacket-wallet migrate"
    )]
    Migrate,
    /// Manages the Ed25519 signing keys in `keys.dir`.
    #[command(
        after_help = "Examples:\n  redpacket-wallet keys generate\n  redpacket-wallet keys list\n  \
redpacket-wallet keys retire k1a2b3c4"
    )]
    Keys {
        #[command(subcommand)]
        action: KeysAction,
    },
    /// Prints a user JWT signed with the configured secret, for trying the API by hand.
    #[command(
        after_help = "Example:\n  curl -H \"Authorization: Bearer $(redpacket-wallet dev-jwt 42)\" \
localhost:8080/v1/wallet"
    )]
    DevJwt {
        /// The user id (a positive integer): the JWT's `sub`.
        user_id: i64,
        /// Lifetime in seconds.
        #[arg(long, default_value_t = 3600)]
        ttl: u64,
    },
    /// Books every pending token now (what the batch-settlement job does), showing
    /// progress per partition.
    #[command(after_help = "Example:\n  redpacket-wallet settle --all")]
    Settle {
        /// Every partition (required: the sweep books them all).
        #[arg(long)]
        all: bool,
    },
    /// Reconciles one hour (default: the current one) of one activity, or of every
    /// activity running in it, and stores the reports. Prints them as JSON; exits 3 when
    /// one shows a mismatch.
    #[command(
        after_help = "Examples:\n  redpacket-wallet reconcile --activity cny2027\n  \
redpacket-wallet reconcile --hour 2027021012          # every activity of that hour"
    )]
    Reconcile {
        /// The activity; every activity whose window overlaps the hour when left out.
        #[arg(long)]
        activity: Option<String>,
        /// The hour as YYYYMMDDHH (UTC).
        #[arg(long)]
        hour: Option<String>,
    },
    /// Returns an activity's leaked budget (taken, never a token). Safe at any time:
    /// it drains the live budget generation and settles drained ones once their
    /// in-flight grace has passed; run it again after `issue.in_flight_grace_ms`.
    #[command(after_help = "Example:\n  redpacket-wallet repair-leak --activity cny2027")]
    RepairLeak {
        /// The activity id.
        #[arg(long)]
        activity: String,
    },
    /// Releases budget frozen in doubt after a Redis loss, as far as the ledger and the
    /// synced client tokens prove it unspent (only losses older than
    /// `issue.in_doubt_grace_ms`).
    #[command(after_help = "Example:\n  redpacket-wallet release-in-doubt --activity cny2027")]
    ReleaseInDoubt {
        /// The activity id.
        #[arg(long)]
        activity: String,
    },
    /// Drops the shadow traffic data (`X-RPW-Shadow`: the shadow Redis keys and the
    /// shadow database's rows) of this configuration's deployment once no shadow request
    /// has come for `shadow.expire_after_secs`. A running instance does this by itself;
    /// this is for a deployment that stopped while its shadow data was alive.
    #[command(after_help = "Example:
  RPW_REDIS__KEY_PREFIX=demo: redpacket-wallet shadow-purge")]
    ShadowPurge,
    /// Forgets every account snapshot in Redis, after MySQL was restored from a backup
    /// (the snapshots may be ahead of it): views read MySQL for each user until their
    /// next booking writes a snapshot again. Fences and tokens stay.
    #[command(after_help = "Example:\n  redpacket-wallet forget-snapshots")]
    ForgetSnapshots,
    /// Moves the account snapshots still kept where earlier releases kept them (`acct:`)
    /// into the users' status hashes, once every instance runs this release with
    /// `wallet.snapshot_compat` off: those users' views come back to Redis without
    /// waiting for their next booking. A snapshot hash holding a fence is left alone.
    #[command(after_help = "Example:\n  redpacket-wallet move-snapshots")]
    MoveSnapshots,
    /// Prints an activity's budget figures: budget, granted, in doubt, ungranted,
    /// available in Redis, remaining.
    #[command(after_help = "Example:\n  redpacket-wallet budget --activity cny2027")]
    Budget {
        /// The activity id.
        #[arg(long)]
        activity: String,
    },
    /// Moves a bucket of users (user_id mod 1024) to another MySQL shard: its booking
    /// and withdrawals pause for the move, its rows are copied and verified, the shard
    /// map switches, the old rows go. Run it again to resume a move that was cut short.
    #[command(after_help = "Example:\n  redpacket-wallet reshard --bucket 17 --to 1")]
    Reshard {
        /// The bucket: user_id mod 1024.
        #[arg(long)]
        bucket: u16,
        /// The shard index (0: mysql.url, 1..: mysql.shard_urls in order).
        #[arg(long)]
        to: usize,
    },
}

#[derive(Subcommand)]
enum KeysAction {
    /// Creates a new key; it becomes the active signer. Prints its id.
    Generate,
    /// Lists every key with its state (active, verifies, retired).
    List,
    /// Retires a key: tokens it signed no longer verify.
    Retire {
        /// The key id, as `keys list` prints it.
        key_id: String,
    },
}

/// Progress of a long command on stderr: one line rewritten in place on a terminal,
/// plain lines at most every two seconds otherwise (a log or a pipe).
struct Progress {
    label: &'static str,
    tty: bool,
    last: Option<std::time::Instant>,
}

impl Progress {
    fn new(label: &'static str) -> Self {
        use std::io::IsTerminal;
        Self {
            label,
            tty: std::io::stderr().is_terminal(),
            last: None,
        }
    }

    fn update(&mut self, message: &str) {
        let every = if self.tty { 100 } else { 2_000 };
        if self
            .last
            .is_some_and(|t| t.elapsed() < std::time::Duration::from_millis(every))
        {
            return;
        }
        self.last = Some(std::time::Instant::now());
        if self.tty {
            eprint!("\r\x1b[2K{}: {message}", self.label);
        } else {
            eprintln!("{}: {message}", self.label);
        }
    }

    fn finish(&mut self, message: &str) {
        if self.tty {
            eprint!("\r\x1b[2K");
        }
        eprintln!("{}: {message}", self.label);
    }
}

fn init_tracing() {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if std::env::var("RPW_LOG_FORMAT").as_deref() == Ok("json") {
        builder.json().init();
    } else {
        builder.init();
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    init_tracing();
    let cli = Cli::parse();
    let settings = Settings::load(cli.config.as_deref())?;
    match cli.command {
        Command::Serve {
            no_worker,
            no_cron,
            no_migrate,
        } => {
            tracing::info!(settings = ?settings, "starting");
            let migrate = settings.mysql.migrate_on_start && !no_migrate;
            let app = App::build(settings, migrate).await?;
            let running = Running::start(
                app,
                RunOptions {
                    http: true,
                    worker: !no_worker,
                    cron: !no_cron,
                },
            )
            .await?;
            tracing::info!(url = running.url(), "serving");
            shutdown_signal().await;
            tracing::info!("shutting down");
            running.stop().await;
        }
        Command::Worker => {
            let app = App::build(settings, false).await?;
            let running = Running::start(
                app,
                RunOptions {
                    http: false,
                    worker: true,
                    cron: false,
                },
            )
            .await?;
            tracing::info!("worker running");
            shutdown_signal().await;
            running.stop().await;
        }
        Command::Migrate => {
            use sqlx::migrate::MigrateDatabase;
            for url in std::iter::once(&settings.mysql.url).chain(settings.mysql.shard_urls.iter())
            {
                if !sqlx::MySql::database_exists(url.expose()).await? {
                    sqlx::MySql::create_database(url.expose()).await?;
                }
            }
            Db::connect_lazy(&settings.mysql)?.migrate().await?;
            println!("migrations applied");
        }
        Command::Keys { action } => match action {
            KeysAction::Generate => {
                let id = keys::generate(&settings.keys.dir)?;
                println!("{id}");
            }
            KeysAction::List => {
                let ring = keys::KeyRing::load(&settings.keys.dir, &[])?;
                for key in ring.all() {
                    let state = if key.retired {
                        "retired"
                    } else if key.active {
                        "active"
                    } else {
                        "verifies"
                    };
                    println!("{}\t{}\t{}", key.key_id, key.alg, state);
                }
            }
            KeysAction::Retire { key_id } => {
                keys::retire(&settings.keys.dir, &key_id)?;
                let db = Db::connect_lazy(&settings.mysql)?;
                let updated = sqlx::query("UPDATE signing_keys SET retired_at = COALESCE(retired_at, CURRENT_TIMESTAMP(3)) WHERE key_id = ?")
                    .bind(&key_id)
                    .execute(db.main())
                    .await;
                if let Err(err) = updated {
                    eprintln!("retired in {}; mysql not updated ({err}); instances sharing this directory learn it at their next key refresh, the others not until mysql is updated", settings.keys.dir.display());
                }
                println!("retired {key_id}");
            }
        },
        Command::DevJwt { user_id, ttl } => {
            let user = UserId::parse(user_id).map_err(|e| anyhow::anyhow!(e.0))?;
            let auth = AuthKeys::new(&settings.auth, Vec::new(), 0);
            println!("{}", auth.issue_user_jwt(user, ttl)?);
        }
        Command::Settle { all } => {
            anyhow::ensure!(all, "say --all: the sweep books every partition");
            let app = App::build(settings, false).await?;
            let max = app.settings.settle.sweep_max_batches;
            let partitions = app.redis.partitions();
            let mut progress = Progress::new("settle");
            let booked = redpacket_wallet::settle::settle_until(
                &app.settler,
                max,
                None,
                &mut |partition, booked| {
                    progress.update(&format!(
                        "partition {}/{partitions}, {booked} tokens booked",
                        partition + 1
                    ))
                },
            )
            .await?;
            progress.finish(&format!(
                "{partitions} partitions swept, {booked} tokens booked"
            ));
            let drained = app.reconciler.mark_drained().await?;
            println!("booked {booked} tokens; drained activities: {drained:?}");
        }
        Command::Reconcile { activity, hour } => {
            let app: Arc<App> = App::build(settings, false).await?;
            let hour = hour.unwrap_or_else(|| {
                redpacket_wallet::store::hour_of(redpacket_wallet::store::now_ms())
            });
            let activities: Vec<String> = match activity {
                Some(a) => vec![a],
                None => app
                    .reconciler
                    .activities_in_hour(&hour)
                    .map_err(|e| anyhow::anyhow!("{}: {}", e.code(), e))?,
            };
            let single = activities.len() == 1;
            let mut progress = Progress::new("reconcile");
            let mut reports = Vec::new();
            let mut mismatches = 0;
            for (i, activity) in activities.iter().enumerate() {
                progress.update(&format!(
                    "{}/{} activities, {mismatches} with a mismatch; now {activity}",
                    i + 1,
                    activities.len()
                ));
                let report = app
                    .reconciler
                    .reconcile(activity, &hour, "manual")
                    .await
                    .map_err(|e| anyhow::anyhow!("{}: {}", e.code(), e))
                    .with_context(|| format!("reconciling {activity}"))?;
                mismatches += usize::from(!report.ok);
                reports.push(report);
            }
            progress.finish(&format!(
                "hour {hour}: {} activities, {mismatches} with a mismatch",
                activities.len()
            ));
            if single {
                println!("{}", serde_json::to_string_pretty(&reports[0])?);
            } else {
                println!("{}", serde_json::to_string_pretty(&reports)?);
            }
            if mismatches > 0 {
                std::process::exit(3);
            }
        }
        Command::RepairLeak { activity } => {
            let app: Arc<App> = App::build(settings, false).await?;
            let repair = app
                .budget
                .repair(&app.redis, &app.db, &activity)
                .await
                .context("repairing the budget leak")?;
            println!("{}", serde_json::to_string_pretty(&repair)?);
        }
        Command::ReleaseInDoubt { activity } => {
            let app: Arc<App> = App::build(settings, false).await?;
            let release = app
                .budget
                .release_in_doubt(&app.redis, &app.db, &activity)
                .await
                .context("releasing in-doubt budget")?;
            println!("{}", serde_json::to_string_pretty(&release)?);
        }
        Command::Reshard { bucket, to } => {
            let db = Db::connect_lazy(&settings.mysql)?;
            db.load_map().await.context("the shard map")?;
            let moved = redpacket_wallet::ops::reshard::reshard(&db, bucket, to)
                .await
                .with_context(|| format!("moving bucket {bucket} to shard {to}"))?;
            println!("{}", serde_json::to_string_pretty(&moved)?);
        }
        Command::ForgetSnapshots => {
            let redis = redpacket_wallet::store::Redis::connect(&settings.redis).await?;
            let (statuses, legacy) = redis
                .forget_snapshots()
                .await
                .context("forgetting the account snapshots")?;
            println!(
                "account snapshots forgotten: {statuses} status hashes, {legacy} hashes of earlier releases"
            );
        }
        Command::MoveSnapshots => {
            anyhow::ensure!(
                !settings.wallet.snapshot_compat,
                "wallet.snapshot_compat is on: the earlier releases' snapshots are still kept for their instances"
            );
            let app: Arc<App> = App::build(settings, false).await?;
            let (moved, left) = app
                .ledger
                .move_legacy_snapshots()
                .await
                .context("moving the account snapshots")?;
            println!("account snapshots moved: {moved}; left (fenced, or failed): {left}");
        }
        Command::ShadowPurge => {
            if redpacket_wallet::shadow::purge_lapsed(&settings).await? {
                println!("shadow data purged");
            } else {
                println!("shadow traffic is still coming (its marker is alive): nothing purged");
            }
        }
        Command::Budget { activity } => {
            let app: Arc<App> = App::build(settings, false).await?;
            let figures = app
                .budget
                .figures(&app.redis, &app.db, &activity)
                .await
                .context("reading the budget")?;
            println!("{}", serde_json::to_string_pretty(&figures)?);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::Cli;

    /// Every subcommand has its help and an example; every flag and argument its help.
    #[test]
    fn every_subcommand_and_flag_is_explained() {
        let cli = Cli::command();
        cli.clone().debug_assert();
        let mut seen = 0;
        let mut stack: Vec<clap::Command> = cli.get_subcommands().cloned().collect();
        while let Some(cmd) = stack.pop() {
            seen += 1;
            let name = cmd.get_name().to_string();
            assert!(cmd.get_about().is_some(), "`{name}` has no help");
            let subs: Vec<clap::Command> = cmd.get_subcommands().cloned().collect();
            if subs.is_empty() {
                // A leaf: its own example, or its parent's (keys generate|list|retire).
                let parent_has = ["generate", "list", "retire"].contains(&name.as_str());
                assert!(
                    parent_has
                        || cmd
                            .get_after_help()
                            .is_some_and(|h| h.to_string().contains("Example")),
                    "`{name}` has no example"
                );
            } else {
                assert!(cmd
                    .get_after_help()
                    .is_some_and(|h| h.to_string().contains("redpacket-wallet")));
            }
            for arg in cmd.get_arguments() {
                let id = arg.get_id().as_str();
                if id == "help" || id == "version" {
                    continue;
                }
                assert!(arg.get_help().is_some(), "`{name} {id}` has no help");
            }
            stack.extend(subs);
        }
        assert!(seen >= 14, "{seen}");
    }
}
