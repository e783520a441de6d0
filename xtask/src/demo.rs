//! `cargo xtask demo`: all of Vigil on this machine with one command. Runs setup and the
//! release build, then starts (all under `target/demo/`, all on 127.0.0.1):
//!
//! 1. `vigil-aggregator`: plaintext gRPC on loopback with bearer tokens (a generated tokens
//!    file with an agent and a reader token), the dashboard and query API over HTTP, the
//!    shipped alert rules (`packaging/rules/`);
//! 2. a synthetic, clearly-labelled model server (`packaging/demo/vigil-demo-model-server`)
//!    unless a real one is already running;
//! 3. `vigil-agent run` on this node (as root for the eBPF syscall probes), tracking the demo
//!    server; with `--fake-gpu`, loading the NVML stand-in (`libfake_nvml.so`) with a demo
//!    scenario in which the demo server uses GPU 0;
//!
//! prints the dashboard's URL (with the reader token in its fragment, which browsers never
//! send) and stops everything, in order, on Ctrl-C or after `--duration`.

use std::{
    fs,
    io::{BufRead, BufReader, Read},
    net::TcpListener,
    os::unix::{fs::PermissionsExt, process::CommandExt},
    path::Path,
    process::{Child, Command, Stdio},
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use clap::Args;
use serde_json::json;

use crate::{shell, workspace::Workspace};

#[derive(Args, Debug)]
pub struct DemoArgs {
    /// Stop after this long (e.g. `90s`, `5m`); default: run until Ctrl-C.
    #[arg(long, value_parser = parse_duration)]
    pub duration: Option<Duration>,
    /// Use the NVML stand-in (tests/fake-nvml) with a demo scenario: two GPUs, the demo
    /// server on GPU 0, an XID error and an ECC error along the way.
    #[arg(long)]
    pub fake_gpu: bool,
    /// Dashboard and query API port on 127.0.0.1.
    #[arg(long, default_value_t = 9400)]
    pub http_port: u16,
    /// gRPC ingest port on 127.0.0.1.
    #[arg(long, default_value_t = 7401)]
    pub grpc_port: u16,
    /// Skip setup and the build; use the release binaries already in target/release.
    #[arg(long)]
    pub no_build: bool,
    /// Where the binaries (and libfake_nvml.so) are; default target/release. With
    /// `--no-build`, e.g. `target/debug` after a plain `cargo build`.
    #[arg(long, value_name = "DIR")]
    pub binaries: Option<std::path::PathBuf>,
    /// Start the synthetic model server even when a real one is running.
    #[arg(long)]
    pub synthetic: bool,
}

/// `90s`, `5m`, `1h`, `500ms`, or plain seconds.
fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let value: f64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not a duration (e.g. 90s, 5m, 1h)"))?;
    let seconds = match unit {
        "" | "s" => value,
        "ms" => value / 1000.0,
        "m" => value * 60.0,
        "h" => value * 3600.0,
        _ => return Err(format!("unknown unit {unit:?} in {text:?} (ms, s, m or h)")),
    };
    if !(seconds > 0.0 && seconds.is_finite()) {
        return Err(format!("{text:?}: the duration must be positive"));
    }
    Ok(Duration::from_secs_f64(seconds))
}

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
}

/// Model servers the agent's built-in rules recognise: when one runs, the demo shows it
/// instead of the synthetic one.
const REAL_SERVERS: &[&str] = &[
    "tritonserver",
    "vllm",
    "text-generation-launcher",
    "text-generation-router",
    "torchserve",
    "tensorflow_model_server",
    "sglang",
];

fn real_model_server() -> Option<(u32, String)> {
    let me = std::process::id();
    for entry in fs::read_dir("/proc").ok()?.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        if pid == me {
            continue;
        }
        let comm = fs::read_to_string(entry.path().join("comm")).unwrap_or_default();
        let cmdline = fs::read(entry.path().join("cmdline")).unwrap_or_default();
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        if let Some(name) = REAL_SERVERS
            .iter()
            .find(|name| comm.trim() == **name || cmdline.contains(&format!("{name} ")))
        {
            return Some((pid, name.to_string()));
        }
    }
    None
}

/// A random token (hex of 16 bytes from the kernel's CSPRNG).
fn random_token(prefix: &str) -> Result<String> {
    let mut bytes = [0u8; 16];
    fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .context("reading /dev/urandom")?;
    Ok(format!(
        "{prefix}-{}",
        bytes.iter().map(|b| format!("{b:02x}")).collect::<String>()
    ))
}

fn write_private(path: &Path, text: &str) -> Result<()> {
    fs::write(path, text).with_context(|| format!("writing {}", path.display()))?;
    fs::set_permissions(path, fs::Permissions::from_mode(0o600))
        .with_context(|| format!("chmod 600 {}", path.display()))
}

fn port_free(port: u16) -> bool {
    TcpListener::bind(("127.0.0.1", port)).is_ok()
}

/// The demo's stand-in GPUs: GPU 0 runs the demo server and alternates (two minutes a cycle,
/// in step with the server's serve/checkpoint cycle) between busy serving and nearly idle
/// while the server checkpoints; GPU 1 is idle. An XID error at 45 s and a corrected ECC error
/// at 75 s give the event timeline and the alerts something to show.
pub fn fake_gpu_scenario(server_pid: u32, hours: u32) -> serde_json::Value {
    let cycle = 120.0;
    let mut busy_timeline = Vec::new();
    let mut energy_mj: u64 = 1_000_000;
    for i in 0..(hours * 3600 / 10) {
        let at = f64::from(i) * 10.0;
        let serving = (at % cycle) < cycle / 2.0;
        // A little movement within each phase, so the charts are not flat lines.
        let wobble: u32 = [0, 3, 1, 4, 2, 5][(i % 6) as usize];
        let (util, power, temp, clock) = if serving {
            (92 + wobble, 610_000 + wobble * 5_000, 71 + wobble / 2, 1980)
        } else {
            (
                2 + wobble / 2,
                120_000 + wobble * 2_000,
                52 + wobble / 2,
                1410,
            )
        };
        // Power (mW) over the 10 s step, in mJ.
        energy_mj += u64::from(power) * 10;
        busy_timeline.push(json!({
            "at_s": at,
            "gpu_util": util,
            "mem_util": util / 2,
            "memory_used_bytes": 34_359_738_368u64 + u64::from(wobble) * 268_435_456,
            "power_mw": power,
            "energy_mj": energy_mj,
            "temperature_c": temp,
            "sm_clock_mhz": clock,
            "memory_clock_mhz": 2619,
            "graphics_clock_mhz": clock,
            "performance_state": if serving { 0 } else { 8 },
            "pcie_tx_kbps": if serving { 900_000 } else { 2_000 },
            "pcie_rx_kbps": if serving { 1_800_000 } else { 3_000 },
            "throttle_reasons": if serving { json!(["sw_power_cap"]) } else { json!(["gpu_idle"]) },
        }));
    }
    let device = |index: u32,
                  timeline: serde_json::Value,
                  processes: serde_json::Value,
                  events: serde_json::Value| {
        json!({
            "uuid": format!("GPU-de300000-0000-4000-8000-00000000000{index}"),
            "name": "NVIDIA H100 80GB HBM3 (vigil demo stand-in)",
            "pci_bus_id": format!("00000000:{:02x}:00.0", 0x17 + index),
            "memory_total_bytes": 85_520_809_984u64,
            "power_limit_mw": 700_000,
            "not_supported": ["fan_speed"],
            "timeline": timeline,
            "processes": processes,
            "events": events,
        })
    };
    json!({
        "devices": [
            device(
                0,
                json!(busy_timeline),
                server_gpu_use(server_pid, hours, cycle),
                json!([
                    {"at_s": 45.0, "type": "xid", "xid": 63},
                    {"at_s": 75.0, "type": "ecc_single_bit"},
                ]),
            ),
            device(
                1,
                json!([{"at_s": 0, "gpu_util": 0, "mem_util": 0, "memory_used_bytes": 536_870_912u64,
                        "power_mw": 70_000, "energy_mj": 500_000, "temperature_c": 34,
                        "sm_clock_mhz": 345, "memory_clock_mhz": 2619, "graphics_clock_mhz": 345,
                        "performance_state": 8, "pcie_tx_kbps": 0, "pcie_rx_kbps": 0,
                        "throttle_reasons": ["gpu_idle"]}]),
                json!([]),
                json!([]),
            ),
        ]
    })
}

/// The demo server's use of GPU 0: its kernels busy while it serves, nearly idle while it
/// checkpoints (one stand-in process entry per phase).
fn server_gpu_use(server_pid: u32, hours: u32, cycle: f64) -> serde_json::Value {
    let cycles = (f64::from(hours) * 3600.0 / cycle).ceil() as u32;
    let mut entries = Vec::new();
    for c in 0..cycles {
        let start = f64::from(c) * cycle;
        for (from, until, sm_util, mem_util) in [
            (start, start + cycle / 2.0, 85, 40),
            (start + cycle / 2.0, start + cycle, 2, 1),
        ] {
            entries.push(json!({
                "pid": server_pid,
                "used_memory_bytes": 32_212_254_720u64,
                "sm_util": sm_util,
                "mem_util": mem_util,
                "from_s": from,
                "until_s": until,
            }));
        }
    }
    json!(entries)
}

/// The processes the demo started, stopped in reverse order.
struct Running {
    children: Vec<(&'static str, Child)>,
}

impl Running {
    fn check_alive(&mut self) -> Result<()> {
        for (name, child) in &mut self.children {
            if let Some(status) = child.try_wait()? {
                bail!("{name} exited unexpectedly ({status}); see its log under target/demo/");
            }
        }
        Ok(())
    }

    /// SIGTERM each (last started first), waiting up to 15 s for it, then SIGKILL.
    fn stop(&mut self) {
        while let Some((name, mut child)) = self.children.pop() {
            if matches!(child.try_wait(), Ok(Some(_))) {
                continue;
            }
            // SAFETY: plain kill(2) on our own child's pid.
            unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(15);
            loop {
                match child.try_wait() {
                    Ok(Some(status)) => {
                        eprintln!("demo: {name} stopped ({status})");
                        break;
                    }
                    Ok(None) if Instant::now() < deadline => {
                        std::thread::sleep(Duration::from_millis(100))
                    }
                    _ => {
                        eprintln!("demo: {name} did not stop within 15 s; killing it");
                        let _ = child.kill();
                        let _ = child.wait();
                        break;
                    }
                }
            }
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A child in a process group of its own, so that Ctrl-C reaches only the demo, which then
/// stops the children in order (the agent first gets its last batches acked).
fn spawn(command: &mut Command, log: &Path) -> Result<Child> {
    let log_file = fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
    command
        .stderr(log_file)
        .stdin(Stdio::null())
        .process_group(0);
    command
        .spawn()
        .with_context(|| format!("starting {}", shell::describe(command)))
}

pub fn run(ws: &Workspace, args: &DemoArgs) -> Result<()> {
    if !args.no_build {
        crate::setup::ensure()?;
        crate::build(ws)?;
    }
    let release = args
        .binaries
        .clone()
        .unwrap_or_else(|| ws.target.join("release"));
    let aggregator_bin = release.join("vigil-aggregator");
    let agent_bin = release.join("vigil-agent");
    for binary in [&aggregator_bin, &agent_bin] {
        if !binary.exists() {
            bail!(
                "{} is missing: run `cargo xtask build` (or drop --no-build)",
                binary.display()
            );
        }
    }
    let fake_nvml = release.join("libfake_nvml.so");
    if args.fake_gpu && !fake_nvml.exists() {
        bail!(
            "{} is missing: `cargo xtask build` builds it (package fake-nvml)",
            fake_nvml.display()
        );
    }
    for (port, what) in [
        (args.http_port, "--http-port"),
        (args.grpc_port, "--grpc-port"),
    ] {
        if !port_free(port) {
            bail!(
                "127.0.0.1:{port} is in use (another demo or aggregator?); choose another {what}"
            );
        }
    }
    if !shell::is_root() {
        eprintln!(
            "demo: WARNING: not root: the agent cannot load its eBPF probes, so the syscall \
             latency views stay empty (they say why). Run `sudo -E cargo xtask demo` for them."
        );
    }

    let dir = ws.target.join("demo");
    fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let node = fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|name| name.trim().to_owned())
        .unwrap_or_else(|_| "localhost".to_owned());
    let agent_token = random_token("vigil-demo-agent")?;
    let reader_token = random_token("vigil-demo-reader")?;
    let tokens = dir.join("tokens.toml");
    write_private(
        &tokens,
        &format!(
            "# Generated by `cargo xtask demo`: new tokens at every start.\n\
             [[tokens]]\nname = \"demo-agent\"\ntoken = \"{agent_token}\"\nrole = \"agent\"\nnode = \"{node}\"\n\n\
             [[tokens]]\nname = \"demo-dashboard\"\ntoken = \"{reader_token}\"\nrole = \"reader\"\n"
        ),
    )?;
    write_private(&dir.join("agent.token"), &agent_token)?;
    let aggregator_config = dir.join("aggregator.toml");
    fs::write(
        &aggregator_config,
        format!(
            "# Generated by `cargo xtask demo`. Plaintext gRPC is allowed on loopback only; the\n\
             # tokens still authenticate every agent and reader.\n\
             [tls]\nplaintext = true\n\n[auth]\ntokens_file = \"{}\"\n\n\
             [alerting]\nrule_files = [\"{}\"]\n",
            tokens.display(),
            ws.root.join("packaging/rules/*.yml").display()
        ),
    )?;

    let mut running = Running {
        children: Vec::new(),
    };
    // SAFETY: installs a handler that only stores to an atomic.
    unsafe {
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
    }

    // 1. The aggregator; its first stdout lines say where it listens.
    let mut aggregator = spawn(
        Command::new(&aggregator_bin)
            .arg("--config")
            .arg(&aggregator_config)
            .arg("--data-dir")
            .arg(dir.join("data"))
            .arg("--grpc-listen")
            .arg(format!("127.0.0.1:{}", args.grpc_port))
            .arg("--http-listen")
            .arg(format!("127.0.0.1:{}", args.http_port))
            .stdout(Stdio::piped()),
        &dir.join("aggregator.log"),
    )?;
    let stdout = aggregator.stdout.take().expect("piped");
    running.children.push(("vigil-aggregator", aggregator));
    let mut lines = BufReader::new(stdout).lines();
    let mut http_ready = false;
    for line in lines.by_ref().take(4) {
        let line = line.context("reading the aggregator's output")?;
        if line.contains("http listening on") {
            http_ready = true;
            break;
        }
    }
    if !http_ready {
        running.stop();
        bail!(
            "the aggregator did not start; see {}",
            dir.join("aggregator.log").display()
        );
    }
    // Keep draining its stdout so it never blocks on a full pipe.
    std::thread::spawn(move || lines.for_each(drop));

    // 2. The model server to watch.
    let mut server_pid = None;
    match real_model_server().filter(|_| !args.synthetic) {
        Some((pid, name)) => {
            eprintln!(
                "demo: a real model server is running ({name}, pid {pid}): watching it (the \
                 built-in rules track it); --synthetic adds the synthetic one"
            );
        }
        None => {
            let workload = spawn(
                Command::new("python3")
                    .arg(ws.root.join("packaging/demo/vigil-demo-model-server"))
                    .arg("--workdir")
                    .arg(dir.join("workload"))
                    .stdout(Stdio::null()),
                &dir.join("workload.log"),
            )?;
            eprintln!(
                "demo: started the SYNTHETIC model server packaging/demo/vigil-demo-model-server \
                 (pid {}): CPU work, socket I/O, fsync-heavy checkpoints every other minute",
                workload.id()
            );
            server_pid = Some(workload.id());
            running.children.push(("vigil-demo-model-server", workload));
        }
    }

    // 3. The agent.
    let agent_config = dir.join("agent.toml");
    fs::write(
        &agent_config,
        format!(
            "# Generated by `cargo xtask demo`.\n\
             [[selection.rules]]\nserver = \"demo-model-server\"\npattern = \"vigil-demo-model-server\"\n\n\
             [transport]\nendpoints = [\"http://127.0.0.1:{}\"]\nplaintext = true\n\
             token_file = \"{}\"\nspool_dir = \"{}\"\ninterval = \"1s\"\n",
            args.grpc_port,
            dir.join("agent.token").display(),
            dir.join("spool").display()
        ),
    )?;
    let mut agent = Command::new(&agent_bin);
    agent.arg("run").arg("--config").arg(&agent_config);
    if args.fake_gpu {
        let scenario = dir.join("fake-nvml-scenario.json");
        // Without a synthetic server (a real one runs), GPU 0's process is pid 1: the
        // stand-in still shows its GPUs, only no server uses them.
        fs::write(
            &scenario,
            serde_json::to_string_pretty(&fake_gpu_scenario(server_pid.unwrap_or(1), 24))?,
        )?;
        agent
            .arg("--nvml-library")
            .arg(&fake_nvml)
            .env("FAKE_NVML_SCENARIO", &scenario);
    }
    let agent = spawn(agent.stdout(Stdio::null()), &dir.join("agent.log"))?;
    running.children.insert(1, ("vigil-agent", agent));

    let url = format!("http://127.0.0.1:{}/", args.http_port);
    eprintln!();
    eprintln!("demo: the dashboard:  {url}#token={reader_token}");
    eprintln!("demo: (the reader token is in the URL's #fragment, which the browser never sends)");
    eprintln!(
        "demo: node {node}{}; logs and data under {}",
        if args.fake_gpu {
            ", GPUs: the NVML stand-in (demo scenario)"
        } else {
            ""
        },
        dir.display()
    );
    eprintln!(
        "demo: running {}; Ctrl-C stops everything",
        args.duration
            .map(|d| format!("for {d:?}"))
            .unwrap_or_else(|| "until Ctrl-C".into())
    );
    // The URL on stdout too, for scripts.
    println!("{url}#token={reader_token}");

    let started = Instant::now();
    let result = loop {
        if STOP.load(Ordering::SeqCst) {
            eprintln!("\ndemo: stopping");
            break Ok(());
        }
        if args.duration.is_some_and(|d| started.elapsed() >= d) {
            eprintln!("demo: --duration reached; stopping");
            break Ok(());
        }
        if let Err(error) = running.check_alive() {
            break Err(error);
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    // The order matters: workload and agent before the aggregator, so the agent's last
    // batches are acked (children were pushed aggregator, agent, workload).
    running.stop();
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_with_units_and_refuse_nonsense() {
        assert_eq!(parse_duration("90s").unwrap(), Duration::from_secs(90));
        assert_eq!(parse_duration("5m").unwrap(), Duration::from_secs(300));
        assert_eq!(parse_duration("1h").unwrap(), Duration::from_secs(3600));
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("2").unwrap(), Duration::from_secs(2));
        assert!(parse_duration("0s").is_err());
        assert!(parse_duration("5 parsecs").is_err());
        assert!(parse_duration("").is_err());
    }

    #[test]
    fn the_fake_gpu_scenario_puts_the_server_on_gpu_0() {
        let scenario = fake_gpu_scenario(4242, 1);
        let devices = scenario["devices"].as_array().unwrap();
        assert_eq!(devices.len(), 2);
        let processes = devices[0]["processes"].as_array().unwrap();
        assert!(processes.iter().all(|p| p["pid"] == 4242));
        // One entry per phase, back to back: the server is always on GPU 0.
        assert_eq!(processes.len(), 60);
        assert_eq!(processes[0]["sm_util"], 85);
        assert_eq!(processes[1]["sm_util"], 2);
        assert_eq!(processes[0]["until_s"], processes[1]["from_s"]);
        assert_eq!(devices[1]["processes"].as_array().unwrap().len(), 0);
        let timeline = devices[0]["timeline"].as_array().unwrap();
        assert_eq!(timeline.len(), 360);
        // Serving half: busy; checkpoint half: nearly idle.
        assert!(timeline[0]["gpu_util"].as_u64().unwrap() >= 90);
        assert!(timeline[6]["gpu_util"].as_u64().unwrap() <= 5);
    }
}
