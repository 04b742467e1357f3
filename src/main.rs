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
    about = "Red-packet token wallet service"
)]
struct Cli {
    /// A TOML configuration file; `RPW_SECTION__KEY` environment variables override it.
    #[arg(long, global = true, env = "RPW_CONFIG")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serves the HTTP API, with the accounting worker and the cron jobs.
    Serve {
        /// Do not run the accounting worker in this process.
        #[arg(long)]
        no_worker: bool,
        /// Do not run the cron jobs in this process.
        #[arg(long)]
        no_cron: bool,
        /// Do not apply migrations at start, whatever `mysql.migrate_on_start` says.
        #[arg(long)]
        no_migrate: bool,
    },
    /// Runs only the accounting worker.
    Worker,
    /// Creates the database(s) when missing and applies the embedded migrations.
    Migrate,
    /// Manages the Ed25519 signing keys in `keys.dir`.
    Keys {
        #[command(subcommand)]
        action: KeysAction,
    },
    /// Prints a user JWT signed with the configured secret, for trying the API by hand.
    DevJwt {
        user_id: i64,
        /// Lifetime in seconds.
        #[arg(long, default_value_t = 3600)]
        ttl: u64,
    },
    /// Books every pending token now (what the batch-settlement job does).
    Settle {
        #[arg(long)]
        all: bool,
    },
    /// Reconciles one activity for one hour (default: the current hour).
    Reconcile {
        #[arg(long)]
        activity: String,
        /// The hour as YYYYMMDDHH (UTC).
        #[arg(long)]
        hour: Option<String>,
    },
    /// Returns an activity's leaked budget (taken, never a token). Safe at any time:
    /// it drains the live budget generation and settles drained ones once their
    /// in-flight grace has passed; run it again after `issue.in_flight_grace_ms`.
    RepairLeak {
        #[arg(long)]
        activity: String,
    },
    /// Releases budget frozen in doubt after a Redis loss, as far as the ledger and the
    /// synced client tokens prove it unspent (only losses older than
    /// `issue.in_doubt_grace_ms`).
    ReleaseInDoubt {
        #[arg(long)]
        activity: String,
    },
    /// Prints an activity's budget figures: budget, granted, in doubt, ungranted,
    /// available in Redis, remaining.
    Budget {
        #[arg(long)]
        activity: String,
    },
    /// Moves a bucket of users (user_id mod 1024) to another MySQL shard: its booking
    /// and withdrawals pause for the move, its rows are copied and verified, the shard
    /// map switches, the old rows go. Run it again to resume a move that was cut short.
    Reshard {
        #[arg(long)]
        bucket: u16,
        /// The shard index (0: mysql.url, 1..: mysql.shard_urls in order).
        #[arg(long)]
        to: usize,
    },
}

#[derive(Subcommand)]
enum KeysAction {
    /// Creates a new key; it becomes the active signer.
    Generate,
    /// Lists every key with its state.
    List,
    /// Retires a key: tokens it signed no longer verify.
    Retire { key_id: String },
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
            let booked = redpacket_wallet::settle::settle_all(&app.settler, max).await?;
            let drained = app.reconciler.mark_drained().await?;
            println!("booked {booked} tokens; drained activities: {drained:?}");
        }
        Command::Reconcile { activity, hour } => {
            let app: Arc<App> = App::build(settings, false).await?;
            let hour = hour.unwrap_or_else(|| {
                redpacket_wallet::store::hour_of(redpacket_wallet::store::now_ms())
            });
            let report = app
                .reconciler
                .reconcile(&activity, &hour, "manual")
                .await
                .map_err(|e| anyhow::anyhow!("{}: {}", e.code(), e))
                .context("reconciling")?;
            println!("{}", serde_json::to_string_pretty(&report)?);
            if !report.ok {
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
                .release_in_doubt(&app.db, &activity)
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
