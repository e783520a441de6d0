//! `vigil-aggregator`: receives telemetry from Vigil agents and stores it.

use std::{net::SocketAddr, path::PathBuf, process::ExitCode};

use clap::Parser;
use vigil_aggregator::AggregatorConfig;

#[derive(Debug, Parser)]
#[command(name = "vigil-aggregator", version, about)]
struct Cli {
    /// TOML config file (docs/protocol.md, "Running the aggregator"); without it, the built-in
    /// defaults. The flags below override it.
    #[arg(long, value_name = "FILE")]
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
        // One line on stdout that scripts and tests can wait for (the real port with :0).
        println!(
            "vigil-aggregator: grpc listening on {}",
            aggregator.grpc_addr()
        );
        if let Some(http) = aggregator.http_addr() {
            println!("vigil-aggregator: http listening on {http}");
        }
        match aggregator.serve_until(stop_signal()).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(error) => {
                eprintln!("vigil-aggregator: gRPC server failed: {error}");
                ExitCode::FAILURE
            }
        }
    })
}

/// SIGINT or SIGTERM.
async fn stop_signal() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(term) => term,
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
