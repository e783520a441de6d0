//! `vigil-aggregator`: receives telemetry from Vigil agents and stores it.

use std::{net::SocketAddr, path::PathBuf, process::ExitCode};

use clap::Parser;
use vigil_aggregator::AggregatorConfig;

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Debug, Parser)]
#[command(name = "vigil-aggregator", version, about)]
struct Cli {
    /// TOML config file (docs/protocol.md, "Running the aggregator"); without it, the built-in
    /// defaults. The flags below override it.
    #[arg(long, value_name = "FILE", global = true)]
    config: Option<PathBuf>,
    /// Directory of the write-ahead log and the audit log (config: data_dir).
    #[arg(long, value_name = "DIR")]
    data_dir: Option<PathBuf>,
    /// gRPC ingest address (config: grpc.listen; default 127.0.0.1:7401; port 0 picks one).
    #[arg(long, value_name = "ADDR")]
    grpc_listen: Option<SocketAddr>,
    /// HTTP address for the query API and /metrics (config: http.listen).
    #[arg(long, value_name = "ADDR")]
    http_listen: Option<SocketAddr>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, clap::Subcommand)]
enum Command {
    /// Checks Prometheus rule files without starting the aggregator: each file's groups and
    /// rules, or FILE:LINE:COLUMN: reason. Thresholds (`${name:-default}`) take their values
    /// from --config's [alerting.thresholds] when given. Exits 1 if any file fails.
    CheckRules {
        #[arg(required = true, value_name = "FILE")]
        files: Vec<PathBuf>,
    },
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = Cli::parse();
    if let Some(Command::CheckRules { files }) = &cli.command {
        return check_rules(cli.config.as_deref(), files);
    }
    let mut config = match &cli.config {
        Some(path) => match AggregatorConfig::load(path) {
            Ok(config) => config,
            Err(error) => {
                eprintln!("vigil-aggregator: {error}");
                return ExitCode::from(2);
            }
        },
        None => AggregatorConfig::default(),
    };
    if let Some(dir) = cli.data_dir {
        config.data_dir = dir;
    }
    if let Some(addr) = cli.grpc_listen {
        config.grpc.listen = addr;
    }
    if let Some(addr) = cli.http_listen {
        config.http.listen = Some(addr);
    }
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("vigil-aggregator: cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async {
        let aggregator = match vigil_aggregator::start(&config).await {
            Ok(aggregator) => aggregator,
            Err(error) => {
                eprintln!("vigil-aggregator: {error}");
                return ExitCode::FAILURE;
            }
        };
        // Signal handlers first: whoever reads the lines below may send SIGTERM at once.
        let stop = stop_signal();
        // One line on stdout that scripts and tests can wait for (the real port with :0).
        println!(
            "vigil-aggregator: grpc listening on {}",
            aggregator.grpc_addr()
        );
        if let Some(http) = aggregator.http_addr() {
            println!("vigil-aggregator: http listening on {http}");
        }
        match aggregator.serve_until(stop).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(error) => {
                eprintln!("vigil-aggregator: gRPC server failed: {error}");
                ExitCode::FAILURE
            }
        }
    })
}

/// `check-rules FILE...`.
fn check_rules(config: Option<&std::path::Path>, files: &[PathBuf]) -> ExitCode {
    let config = match config.map(AggregatorConfig::load).transpose() {
        Ok(config) => config.unwrap_or_default(),
        Err(error) => {
            eprintln!("vigil-aggregator: {error}");
            return ExitCode::from(2);
        }
    };
    let mut failed = false;
    for file in files {
        match vigil_aggregator::alerting::rules::load_files(
            std::slice::from_ref(file),
            config.alerting.evaluation_interval,
            &config.alerting.thresholds,
        ) {
            Ok(groups) => {
                let alerting: usize = groups
                    .iter()
                    .map(|g| g.rules.iter().filter(|r| r.is_alerting()).count())
                    .sum();
                let total: usize = groups.iter().map(|g| g.rules.len()).sum();
                println!(
                    "{}: SUCCESS: {} groups, {alerting} alerting and {} recording rules",
                    file.display(),
                    groups.len(),
                    total - alerting
                );
            }
            Err(error) => {
                failed = true;
                eprintln!("{error}");
            }
        }
    }
    if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

/// Resolves on SIGINT or SIGTERM. The handlers are installed by the call itself, not when the
/// future is first polled, so a signal that arrives right after the call stops the aggregator
/// cleanly instead of killing it.
fn stop_signal() -> impl Future<Output = ()> {
    use tokio::signal::unix::{SignalKind, signal};
    let handlers = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    );
    async move {
        match handlers {
            (Ok(mut term), Ok(mut interrupt)) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = interrupt.recv() => {}
                }
            }
            _ => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
}
