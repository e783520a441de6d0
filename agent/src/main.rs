//! `vigil-agent`: the command line.

use std::{
    io::{BufRead, IsTerminal, Write},
    path::PathBuf,
    process::ExitCode,
    sync::mpsc::RecvTimeoutError,
    time::Duration,
};

use clap::{Parser, Subcommand, ValueEnum};
use vigil_agent::{
    collectors::{
        error_chain,
        syscalls::{SyscallLatencyCollector, SyscallsConfig, attach_empty_programs},
    },
    config::{AgentConfig, DEFAULT_CONFIG_PATH},
    pass::CollectionPass,
    selection::ModelServerProcess,
    snapshot::take_snapshot,
    transport::run_agent,
};

#[derive(Parser)]
#[command(
    name = "vigil-agent",
    version,
    about = "Vigil's per-node telemetry agent for GPU model-serving fleets"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run as the node's agent: collect on a wall-clock-aligned interval and stream batches to
    /// the aggregator (`[transport]`), keeping them in an on-disk spool until acked. Stops on
    /// SIGTERM or SIGINT.
    Run {
        /// Config file.
        #[arg(long, default_value = DEFAULT_CONFIG_PATH)]
        config: PathBuf,
        /// Also track processes whose comm, executable or command line matches this regex
        /// (repeatable).
        #[arg(long, value_name = "REGEX")]
        track: Vec<String>,
        /// NVML library to load (overrides gpu.nvml_library; default libnvidia-ml.so.1).
        #[arg(long, value_name = "PATH")]
        nvml_library: Option<String>,
    },
    /// Collect for a while, then print what was seen as one document.
    Snapshot {
        /// How long to collect, e.g. `10s`, `500ms`, `1m`.
        #[arg(long, value_parser = humantime::parse_duration, default_value = "5s")]
        duration: Duration,
        /// Also track processes whose comm, executable or command line matches this regex
        /// (repeatable).
        #[arg(long, value_name = "REGEX")]
        track: Vec<String>,
        /// Config file (default /etc/vigil/agent.toml when it exists).
        #[arg(long)]
        config: Option<PathBuf>,
        /// NVML library to load (overrides gpu.nvml_library; default libnvidia-ml.so.1).
        #[arg(long, value_name = "PATH")]
        nvml_library: Option<String>,
        #[arg(long, value_enum, default_value_t = Format::Json)]
        format: Format,
    },
    /// Time collection passes for `cargo xtask bench collect`: prints one JSON document with
    /// each pass's CPU time per part and the agent's memory.
    #[command(hide = true)]
    CollectBench {
        #[arg(long, value_name = "REGEX")]
        track: Vec<String>,
        /// Collectors to run, comma-separated (default: all).
        #[arg(long, value_delimiter = ',')]
        collectors: Vec<String>,
        #[arg(long, default_value_t = 10)]
        passes: u32,
        #[arg(long, value_parser = humantime::parse_duration, default_value = "1s")]
        interval: Duration,
        #[arg(long)]
        config: Option<PathBuf>,
        /// NVML library to load (overrides gpu.nvml_library).
        #[arg(long, value_name = "PATH")]
        nvml_library: Option<String>,
    },
    /// Attach the probes for the overhead benchmark (`cargo xtask bench syscall-overhead`):
    /// prints `ready` once attached and detaches when stdin closes.
    #[command(hide = true)]
    OverheadProbe {
        #[arg(long, value_enum)]
        mode: ProbeMode,
        /// The process to trace in `tracked` mode.
        #[arg(long)]
        pid: Option<u32>,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum Format {
    Json,
}

#[derive(Clone, Copy, PartialEq, ValueEnum)]
enum ProbeMode {
    /// Empty programs on sys_enter/sys_exit: the raw-tracepoint floor.
    Floor,
    /// The real programs, tracing only this probe process.
    Untracked,
    /// The real programs, tracing `--pid`.
    Tracked,
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run {
            config,
            track,
            nvml_library,
        } => run(&config, nvml_library, &track),
        Command::Snapshot {
            duration,
            track,
            config,
            nvml_library,
            format: Format::Json,
        } => snapshot(config, nvml_library, &track, duration),
        Command::OverheadProbe { mode, pid } => overhead_probe(mode, pid),
        Command::CollectBench {
            track,
            collectors,
            passes,
            interval,
            config,
            nvml_library,
        } => collect_bench(config, nvml_library, &track, &collectors, passes, interval),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("vigil-agent: {message}");
            ExitCode::FAILURE
        }
    }
}

fn run(
    config: &std::path::Path,
    nvml_library: Option<String>,
    track: &[String],
) -> Result<(), String> {
    let mut config = AgentConfig::from_file(config).map_err(|e| error_chain(&e))?;
    if let Some(path) = nvml_library {
        config.gpu.nvml_library = path;
    }
    run_agent(&config, track).map_err(|e| error_chain(&e))
}

fn snapshot(
    config: Option<PathBuf>,
    nvml_library: Option<String>,
    track: &[String],
    duration: Duration,
) -> Result<(), String> {
    let mut config = AgentConfig::load(config.as_deref()).map_err(|e| error_chain(&e))?;
    if let Some(path) = nvml_library {
        config.gpu.nvml_library = path;
    }
    let document = take_snapshot(&config, track, duration).map_err(|e| error_chain(&e))?;
    let mut stdout = std::io::stdout().lock();
    serde_json::to_writer_pretty(&mut stdout, &document).map_err(|e| e.to_string())?;
    writeln!(stdout).map_err(|e| e.to_string())
}

fn collect_bench(
    config: Option<PathBuf>,
    nvml_library: Option<String>,
    track: &[String],
    collectors: &[String],
    passes: u32,
    interval: Duration,
) -> Result<(), String> {
    let mut config = AgentConfig::load(config.as_deref()).map_err(|e| error_chain(&e))?;
    if let Some(path) = nvml_library {
        config.gpu.nvml_library = path;
    }
    if !collectors.is_empty() {
        // Not started at all, so they cost nothing (memory included).
        let wanted = |name: &str| collectors.iter().any(|c| c == name);
        config.syscalls.enabled &= wanted("syscalls");
        config.process.enabled &= wanted("process");
        config.host.enabled &= wanted("host");
        config.gpu.enabled &= wanted("gpu");
    }
    let mut pass = CollectionPass::new(&config, track).map_err(|e| error_chain(&e))?;
    if !collectors.is_empty() {
        pass.retain_collectors(collectors);
    }
    let mut report = Vec::new();
    for index in 0..passes {
        if index > 0 {
            std::thread::sleep(interval);
        }
        let cost = pass.run();
        let parts: serde_json::Map<String, serde_json::Value> = cost
            .collectors
            .iter()
            .map(|(name, d)| (name.to_string(), (d.as_nanos() as u64).into()))
            .collect();
        report.push(serde_json::json!({
            "tracked": cost.tracked,
            "folded": cost.folded,
            "selection_ns": cost.selection.as_nanos() as u64,
            "collectors_ns": parts,
            "total_ns": cost.total().as_nanos() as u64,
        }));
    }
    let statuses: serde_json::Map<String, serde_json::Value> = pass
        .collectors()
        .iter()
        .map(|c| (c.name().to_string(), serde_json::json!(c.status())))
        .collect();
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let kib = |field: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(field))
            .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse::<u64>().ok())
            .map(|k| k * 1024)
    };
    let document = serde_json::json!({
        "passes": report,
        "collectors": statuses,
        "rss_bytes": kib("VmRSS:"),
        "peak_rss_bytes": kib("VmHWM:"),
    });
    println!("{document}");
    Ok(())
}

/// The identity of a running process, for tracing it by pid.
fn process_by_pid(pid: u32) -> Result<ModelServerProcess, String> {
    let stat = procfs::process::Process::new(pid as i32)
        .and_then(|p| p.stat())
        .map_err(|e| format!("cannot read /proc/{pid}/stat: {e}"))?;
    Ok(ModelServerProcess {
        pid,
        start_time_ticks: stat.starttime,
        comm: stat.comm,
        server: "benchmark".to_string(),
    })
}

fn overhead_probe(mode: ProbeMode, pid: Option<u32>) -> Result<(), String> {
    let mut collector = None;
    let _floor = match mode {
        ProbeMode::Floor => Some(attach_empty_programs().map_err(|e| error_chain(&e))?),
        ProbeMode::Untracked | ProbeMode::Tracked => {
            let target = match (mode, pid) {
                (ProbeMode::Tracked, Some(pid)) => pid,
                (ProbeMode::Tracked, None) => return Err("--mode tracked needs --pid".into()),
                _ => std::process::id(),
            };
            let config = SyscallsConfig::default();
            let numbers = config
                .histogram_syscall_numbers()
                .map_err(|e| e.to_string())?;
            let mut started =
                SyscallLatencyCollector::start(&config, numbers).map_err(|e| error_chain(&e))?;
            started.update_tracked(&[process_by_pid(target)?]);
            collector = Some(started);
            None
        }
    };
    println!("ready");
    std::io::stdout().flush().map_err(|e| e.to_string())?;

    // Stay attached until the benchmark closes our stdin, running collection passes as the
    // agent does (more often, so short measurements see the steady state).
    let (closed_tx, closed_rx) = std::sync::mpsc::channel::<()>();
    std::thread::spawn(move || {
        for line in std::io::stdin().lock().lines() {
            if line.is_err() {
                break;
            }
        }
        let _ = closed_tx.send(());
    });
    while let Err(RecvTimeoutError::Timeout) = closed_rx.recv_timeout(Duration::from_millis(100)) {
        if let Some(collector) = collector.as_mut() {
            collector.refresh();
        }
    }
    Ok(())
}
