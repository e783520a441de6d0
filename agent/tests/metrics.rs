//! `/metrics` of `vigil-agent run` (`[metrics] listen`): with the aggregator unreachable the
//! agent still collects and spools, and serves the latest pass — syscall latency histograms of
//! a tracked Python process, GPU readings from the stand-in NVML driver, host counters and the
//! agent's own state — in a form `promtool check metrics` accepts.

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    path::Path,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

const AGENT: &str = env!("CARGO_BIN_EXE_vigil-agent");
const PROMTOOL: &str = "/usr/bin/promtool";

/// A process killed when the test ends.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_address() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

/// `GET path` over HTTP/1.1: the status and the body.
fn get(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    let (head, body) = response.split_once("\r\n\r\n")?;
    let status = head.split_whitespace().nth(1)?.parse().ok()?;
    assert!(
        !head
            .to_ascii_lowercase()
            .contains("transfer-encoding: chunked"),
        "a whole-body answer is expected: {head}"
    );
    Some((status, body.to_string()))
}

fn stand_in_nvml(dir: &Path, pid: u32) -> std::path::PathBuf {
    let deps = std::env::current_exe()
        .unwrap()
        .parent()
        .unwrap()
        .to_path_buf();
    let library = dir.join("libnvidia-ml.so.1");
    std::fs::copy(deps.join("libfake_nvml.so"), &library).expect("libfake_nvml.so beside the test");
    let scenario = serde_json::json!({"devices": [{
        "uuid": "GPU-5a1c0d3e-0000-4000-8000-00000000beef",
        "name": "NVIDIA H200",
        "pci_bus_id": "00000000:17:00.0",
        "memory_total_bytes": 150_754_820_096u64,
        "timeline": [{"at_s": 0, "gpu_util": 73, "memory_used_bytes": 42_949_672_960u64,
                      "power_mw": 412_000, "temperature_c": 61}],
        "processes": [{"pid": pid, "kind": "compute", "used_memory_bytes": 40_000_000_000u64,
                       "sm_util": 70, "mem_util": 30}]
    }]});
    std::fs::write(
        dir.join(fake_nvml::SCENARIO_FILE_NAME),
        serde_json::to_vec(&scenario).unwrap(),
    )
    .unwrap();
    library
}

/// The value of the first line starting with `prefix` (a series name and labels).
fn value_of(text: &str, prefix: &str) -> Option<f64> {
    text.lines()
        .find(|line| line.starts_with(prefix))
        .and_then(|line| line.rsplit_once(' '))
        .map(|(_, value)| value.parse().unwrap())
}

#[test]
fn run_serves_the_latest_pass_in_the_prometheus_text_format() {
    assert!(
        Path::new(PROMTOOL).exists(),
        "{PROMTOOL} is missing: install prometheus (cargo xtask setup)"
    );
    let dir = tempfile::tempdir().unwrap();
    // A model server stand-in sleeping 2 ms at a time, marked so that only it matches --track.
    let mut python = Command::new("python3")
        .args([
            "-c",
            "import sys, time\nsys.stdout.write('ready\\n'); sys.stdout.flush()\n\
             end = time.monotonic() + 60  # vigil_metrics_test_server\n\
             while time.monotonic() < end: time.sleep(0.002)\n",
        ])
        .stdout(Stdio::piped())
        .spawn()
        .expect("python3");
    let mut line = String::new();
    BufReader::new(python.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert_eq!(line.trim(), "ready");
    let pid = python.id();
    let _python = Killed(python);

    let library = stand_in_nvml(dir.path(), pid);
    // Nothing listens on the aggregator's address: batches stay in the spool.
    let aggregator = free_address();
    let metrics = free_address();
    let config = dir.path().join("agent.toml");
    std::fs::write(
        &config,
        format!(
            r#"
[gpu]
nvml_library = "{library}"
[transport]
endpoints = ["http://{aggregator}"]
plaintext = true
spool_dir = "{dir}/spool"
interval = "500ms"
[metrics]
listen = "{metrics}"
"#,
            library = library.display(),
            dir = dir.path().display()
        ),
    )
    .unwrap();
    let mut agent = Killed(
        Command::new(AGENT)
            .args(["run", "--track", "vigil_metrics_test_server", "--config"])
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start vigil-agent run"),
    );

    // Wait for a pass that has seen the Python process's sleeps and the GPU.
    let pid_label = format!("pid=\"{pid}\"");
    let deadline = Instant::now() + Duration::from_secs(30);
    let text = loop {
        if let Some((status, body)) = get(metrics, "/metrics") {
            assert_eq!(status, 200, "{body}");
            let ready = body.lines().any(|line| {
                line.starts_with("vigil_syscall_latency_seconds_bucket{")
                    && line.contains(&pid_label)
                    && line.contains("syscall=\"clock_nanosleep\"")
            }) && body.contains("vigil_gpu_memory_used_bytes{");
            if ready {
                break body;
            }
        }
        if let Some(status) = agent.0.try_wait().unwrap() {
            panic!("vigil-agent exited early: {status}");
        }
        assert!(
            Instant::now() < deadline,
            "no pass with the tracked process and the GPU within 30 s"
        );
        std::thread::sleep(Duration::from_millis(200));
    };

    // promtool accepts it as is.
    let path = dir.path().join("metrics.txt");
    std::fs::write(&path, &text).unwrap();
    let check = Command::new(PROMTOOL)
        .args(["check", "metrics"])
        .stdin(std::fs::File::open(&path).unwrap())
        .output()
        .expect("promtool runs");
    assert!(
        check.status.success(),
        "promtool check metrics failed: {}{}\n{text}",
        String::from_utf8_lossy(&check.stdout),
        String::from_utf8_lossy(&check.stderr)
    );

    let node = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .unwrap()
        .trim()
        .to_string();
    let node_label = format!("{{node=\"{node}\"");
    for (family, kind) in [
        ("vigil_syscall_latency_seconds", "histogram"),
        ("vigil_host_cpu_seconds_total", "counter"),
        ("vigil_gpu_memory_used_bytes", "gauge"),
        ("vigil_agent_spool_unacked_batches", "gauge"),
        ("vigil_agent_collector_up", "gauge"),
    ] {
        assert!(
            text.contains(&format!("# TYPE {family} {kind}\n")),
            "{family} typed {kind}:\n{text}"
        );
    }
    for collector in ["syscalls", "gpu", "host", "process"] {
        assert_eq!(
            value_of(
                &text,
                &format!("vigil_agent_collector_up{node_label},collector=\"{collector}\"}}")
            ),
            Some(1.0),
            "{collector} up:\n{text}"
        );
    }
    assert_eq!(
        value_of(
            &text,
            &format!("vigil_gpu_memory_used_bytes{node_label},gpu=\"0\"")
        ),
        Some(42_949_672_960.0),
        "{text}"
    );
    // Unreachable aggregator: batches wait in the spool, nothing acked.
    assert!(
        value_of(
            &text,
            &format!("vigil_agent_spool_unacked_batches{node_label}")
        )
        .unwrap()
            >= 1.0
    );
    assert_eq!(
        value_of(&text, &format!("vigil_agent_acked_sequence{node_label}")),
        Some(0.0)
    );

    // The tracked process's clock_nanosleep histogram: cumulative buckets in increasing `le`,
    // `+Inf` equal to `_count`.
    let series =
        |line: &&str| line.contains(&pid_label) && line.contains("syscall=\"clock_nanosleep\"");
    let buckets: Vec<(f64, f64)> = text
        .lines()
        .filter(|line| line.starts_with("vigil_syscall_latency_seconds_bucket{"))
        .filter(series)
        .map(|line| {
            let le = line
                .split("le=\"")
                .nth(1)
                .unwrap()
                .split('"')
                .next()
                .unwrap();
            let le = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().unwrap()
            };
            (le, line.rsplit_once(' ').unwrap().1.parse().unwrap())
        })
        .collect();
    assert!(buckets.len() >= 2, "{buckets:?}");
    assert!(
        buckets
            .windows(2)
            .all(|w| w[0].0 < w[1].0 && w[0].1 <= w[1].1),
        "{buckets:?}"
    );
    assert_eq!(buckets.last().unwrap().0, f64::INFINITY);
    let count_line = text
        .lines()
        .filter(|line| line.starts_with("vigil_syscall_latency_seconds_count{"))
        .find(series)
        .expect("a _count line");
    let count: f64 = count_line.rsplit_once(' ').unwrap().1.parse().unwrap();
    assert_eq!(buckets.last().unwrap().1, count);
    // 2 ms sleeps land in the bucket whose bound is just above 2 ms.
    let median_le = buckets.iter().find(|(_, c)| *c * 2.0 >= count).unwrap().0;
    assert!((0.002..0.003).contains(&median_le), "median le {median_le}");

    // SIGTERM still stops it cleanly with /metrics served.
    // SAFETY: kill(2) on the pid of a child we started and have not waited for yet.
    assert_eq!(unsafe { libc::kill(agent.0.id() as i32, libc::SIGTERM) }, 0);
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(status) = agent.0.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "vigil-agent did not stop");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "{status}");
}
