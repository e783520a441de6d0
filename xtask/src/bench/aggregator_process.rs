//! A release `vigil-aggregator` run by a benchmark: plaintext on 127.0.0.1 (free ports), its
//! config, data directory and log under one folder, with its CPU time, memory and data size.

use std::{
    io::{BufRead, BufReader},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

/// A running aggregator; killed when dropped (its folder stays: the caller owns it).
pub(super) struct AggregatorProcess {
    child: Child,
    pub grpc_port: u16,
    pub http_port: Option<u16>,
    dir: PathBuf,
}

impl AggregatorProcess {
    /// Starts `binary` with `config` (TOML) written to `dir/aggregator.toml`, data in
    /// `dir/data`, log in `dir/aggregator.log`; with `http`, the query API on a free port too.
    /// Returns once it prints its listening lines.
    pub fn start(binary: &Path, dir: &Path, config: &str, http: bool) -> Result<Self> {
        std::fs::create_dir_all(dir.join("data"))?;
        let config_path = dir.join("aggregator.toml");
        std::fs::write(&config_path, config)?;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("aggregator.log"))?;
        let mut command = Command::new(binary);
        command
            .arg("--config")
            .arg(&config_path)
            .arg("--data-dir")
            .arg(dir.join("data"))
            .args(["--grpc-listen", "127.0.0.1:0"]);
        if http {
            command.args(["--http-listen", "127.0.0.1:0"]);
        }
        let mut child = command
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {}", binary.display()))?;
        let stdout = child.stdout.take().context("aggregator stdout")?;
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut aggregator = AggregatorProcess {
            child,
            grpc_port: 0,
            http_port: None,
            dir: dir.to_owned(),
        };
        // A large store can take a while to open (WAL replay).
        let deadline = Instant::now() + Duration::from_secs(300);
        let port_of = |line: &str, prefix: &str| -> Option<u16> {
            line.trim()
                .strip_prefix(prefix)
                .and_then(|port| port.parse().ok())
        };
        while aggregator.grpc_port == 0 || (http && aggregator.http_port.is_none()) {
            let wait = deadline.saturating_duration_since(Instant::now());
            let line = rx.recv_timeout(wait).map_err(|_| {
                anyhow::anyhow!(
                    "vigil-aggregator did not report its ports; see {}",
                    dir.join("aggregator.log").display()
                )
            })?;
            if let Some(port) = port_of(&line, "vigil-aggregator: grpc listening on 127.0.0.1:") {
                aggregator.grpc_port = port;
            } else if let Some(port) =
                port_of(&line, "vigil-aggregator: http listening on 127.0.0.1:")
            {
                aggregator.http_port = Some(port);
            } else {
                bail!("unexpected line from vigil-aggregator: {line:?}");
            }
        }
        Ok(aggregator)
    }

    /// utime + stime so far, in seconds.
    pub fn cpu_seconds(&self) -> Result<f64> {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.child.id()))?;
        // Fields after the command name in parentheses: state is field 3, utime 14, stime 15.
        let rest = stat.rsplit_once(')').context("/proc/pid/stat")?.1;
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let ticks: f64 = fields[11].parse::<f64>()? + fields[12].parse::<f64>()?;
        // SAFETY: sysconf has no preconditions.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
        Ok(ticks / hz)
    }

    /// A line of /proc/PID/status in MiB (`VmHWM` peak, `VmRSS` now).
    fn status_mib(&self, field: &str) -> f64 {
        std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .ok()
            .and_then(|status| {
                status
                    .lines()
                    .find_map(|l| l.strip_prefix(field))
                    .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
            })
            .map_or(0.0, |kib| kib / 1024.0)
    }

    /// Peak resident memory, MiB.
    pub fn peak_rss_mib(&self) -> f64 {
        self.status_mib("VmHWM:")
    }

    /// Resident memory now, MiB.
    pub fn rss_mib(&self) -> f64 {
        self.status_mib("VmRSS:")
    }

    /// Bytes under the data directory (or one folder of it).
    pub fn data_bytes(&self, sub: &str) -> u64 {
        dir_bytes(&self.dir.join("data").join(sub))
    }

    /// SIGTERM, then waits (up to `grace`) for a clean exit.
    pub fn stop(mut self, grace: Duration) -> Result<()> {
        // SAFETY: kill has no memory preconditions; the pid is our child's.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + grace;
        loop {
            if let Some(status) = self.child.try_wait()? {
                if !status.success() {
                    bail!("vigil-aggregator exited with {status} after SIGTERM");
                }
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!("vigil-aggregator still running {grace:?} after SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for AggregatorProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Bytes of every file under `path` (0 when absent).
pub(super) fn dir_bytes(path: &Path) -> u64 {
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.is_dir() => std::fs::read_dir(path)
            .map(|dir| {
                dir.filter_map(|e| e.ok())
                    .map(|e| dir_bytes(&e.path()))
                    .sum()
            })
            .unwrap_or(0),
        Ok(meta) => meta.len(),
        Err(_) => 0,
    }
}
