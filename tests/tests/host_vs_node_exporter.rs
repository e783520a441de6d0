//! The host collector against a peer: Debian's node_exporter reads the same /proc files, so one
//! scrape of it, taken between two passes of the host collector, must agree with both passes.
//!
//! Counters are checked by bracketing (pass before <= node_exporter <= pass after), which holds
//! however busy the machine is, and by closeness to the pass right after the scrape (1%, or for
//! loopback bytes the traffic of the scrape itself, which happens after node_exporter's read).

use std::{
    collections::BTreeMap,
    io::{Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    path::Path,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use vigil_agent::{
    collectors::{
        Collector,
        host::{
            CPU_SECONDS_METRIC, CPUS_METRIC, HostCollector, HostConfig, MEMORY_AVAILABLE_METRIC,
            MEMORY_TOTAL_METRIC, NETWORK_RECEIVE_BYTES_METRIC, NETWORK_TRANSMIT_BYTES_METRIC,
        },
    },
    sample::{Sample, SampleValue},
};

const NODE_EXPORTER: &str = "/usr/bin/prometheus-node-exporter";

/// Slack for CPU seconds, per CPU, in USER_HZ ticks (1/100 s). node_exporter sums the per-CPU
/// lines of /proc/stat where we read the summed `cpu` line; the kernel converts each line from
/// nanoseconds to ticks on its own, truncating, so the per-CPU lines lose up to one tick per
/// mode (8) and CPU against the summed line. Two more ticks cover a tickless kernel's idle and
/// iowait of a sleeping CPU, computed at read time, settling between reads.
const CPU_SLACK_SECONDS_PER_CPU: f64 = 10.0 / 100.0;
/// Loopback bytes besides the scrape's payload: Ethernet, IP and TCP headers of its segments,
/// and the ACK and FIN packets of the connection, all sent after node_exporter read the counter.
const LOOPBACK_HEADER_SLACK_BYTES: f64 = 4096.0;

/// Our own node_exporter on a free loopback port, killed when dropped (also when a check fails).
struct NodeExporter {
    child: Child,
    address: SocketAddr,
}

impl NodeExporter {
    /// Starts node_exporter with only the collectors this test compares, so a scrape is small
    /// and quick, and waits until it serves /metrics.
    fn start() -> Self {
        assert!(
            Path::new(NODE_EXPORTER).exists(),
            "{NODE_EXPORTER} not found: this test needs Debian's prometheus-node-exporter as a \
             peer; `cargo xtask setup` installs it (apt-get install prometheus-node-exporter)"
        );
        let mut last_failure = String::new();
        // The port is free when we look; another process could take it before node_exporter
        // binds it, so try a few.
        for _ in 0..3 {
            let address = free_loopback_address();
            let child = Command::new(NODE_EXPORTER)
                .arg(format!("--web.listen-address={address}"))
                .args([
                    "--web.disable-exporter-metrics",
                    "--collector.disable-defaults",
                    "--collector.cpu",
                    "--collector.meminfo",
                    "--collector.netdev",
                    // Debian's build excludes lo by default; we want exactly lo.
                    "--collector.netdev.device-exclude=",
                    "--collector.netdev.device-include=^lo$",
                ])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap_or_else(|error| panic!("cannot start {NODE_EXPORTER}: {error}"));
            let mut exporter = NodeExporter { child, address };
            match exporter.wait_until_serving() {
                Ok(()) => return exporter,
                Err(why) => last_failure = why,
            }
        }
        panic!("node_exporter never served /metrics: {last_failure}");
    }

    fn wait_until_serving(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                let mut stderr = String::new();
                if let Some(mut pipe) = self.child.stderr.take() {
                    let _ = pipe.read_to_string(&mut stderr);
                }
                return Err(format!("it exited ({status}): {stderr}"));
            }
            match http_get(self.address, "/metrics") {
                Ok(_) => return Ok(()),
                Err(why) if Instant::now() > deadline => {
                    return Err(format!("no answer within 10 s: {why}"));
                }
                Err(_) => std::thread::sleep(Duration::from_millis(50)),
            }
        }
    }
}

impl Drop for NodeExporter {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_loopback_address() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .expect("bind a free port on 127.0.0.1")
}

/// One HTTP/1.0 GET: the body of a 200 answer, and the bytes of the whole response.
fn http_get(address: SocketAddr, path: &str) -> Result<(String, usize), String> {
    let mut stream = TcpStream::connect_timeout(&address, Duration::from_secs(2))
        .map_err(|e| format!("connect {address}: {e}"))?;
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(|e| e.to_string())?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {address}\r\n\r\n")
        .map_err(|e| format!("send to {address}: {e}"))?;
    let mut response = Vec::new();
    stream
        .read_to_end(&mut response)
        .map_err(|e| format!("read from {address}: {e}"))?;
    let text = String::from_utf8(response).map_err(|e| e.to_string())?;
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| format!("no HTTP header in {text:?}"))?;
    let status = head.lines().next().unwrap_or_default();
    if !status.contains(" 200 ") {
        return Err(format!("GET {path}: {status}"));
    }
    Ok((body.to_string(), text.len()))
}

/// One line of the Prometheus text format: `name{label="value",...} value [timestamp]`.
#[derive(Debug)]
struct ExpositionSample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

/// The samples of a Prometheus text exposition; comments and blank lines are skipped.
fn parse_exposition(text: &str) -> Vec<ExpositionSample> {
    text.lines()
        .filter(|line| !line.is_empty() && !line.starts_with('#'))
        .map(|line| parse_exposition_line(line).unwrap_or_else(|| panic!("bad line {line:?}")))
        .collect()
}

fn parse_exposition_line(line: &str) -> Option<ExpositionSample> {
    let name_end = line.find(['{', ' '])?;
    let name = line[..name_end].to_string();
    let mut rest = &line[name_end..];
    let mut labels = BTreeMap::new();
    if let Some(mut inside) = rest.strip_prefix('{') {
        loop {
            inside = inside.trim_start_matches(',');
            if let Some(after) = inside.strip_prefix('}') {
                rest = after;
                break;
            }
            let (label, after) = inside.split_once("=\"")?;
            let mut value = String::new();
            let mut chars = after.char_indices();
            let end = loop {
                match chars.next()? {
                    (_, '\\') => match chars.next()?.1 {
                        'n' => value.push('\n'),
                        other => value.push(other),
                    },
                    (index, '"') => break index,
                    (_, other) => value.push(other),
                }
            };
            labels.insert(label.to_string(), value);
            inside = &after[end + 1..];
        }
    }
    let value = rest.split_whitespace().next()?.parse().ok()?;
    Some(ExpositionSample {
        name,
        labels,
        value,
    })
}

/// The sum of node_exporter's `name` samples that carry `labels`.
fn exporter_sum(scrape: &[ExpositionSample], name: &str, labels: &[(&str, &str)]) -> f64 {
    let matching: Vec<f64> = scrape
        .iter()
        .filter(|s| s.name == name)
        .filter(|s| {
            labels
                .iter()
                .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
        })
        .map(|s| s.value)
        .collect();
    assert!(
        !matching.is_empty(),
        "node_exporter reported no {name}{labels:?}"
    );
    matching.iter().sum()
}

/// The sum of the host collector's `name` samples that carry `labels`.
fn vigil_sum(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> f64 {
    let matching: Vec<f64> = samples
        .iter()
        .filter(|s| s.name == name)
        .filter(|s| {
            labels
                .iter()
                .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
        })
        .map(|s| match s.value {
            SampleValue::Value(value) => value,
            SampleValue::Histogram(_) => panic!("{name} is a histogram"),
        })
        .collect();
    assert!(
        !matching.is_empty(),
        "the host collector reported no {name}{labels:?}"
    );
    matching.iter().sum()
}

fn one_pass(collector: &mut HostCollector) -> Vec<Sample> {
    collector.refresh();
    collector.samples()
}

/// `|ours - theirs|` as a fraction of theirs.
fn relative_difference(ours: f64, theirs: f64) -> f64 {
    (ours - theirs).abs() / theirs.abs()
}

#[test]
fn cpu_memory_and_loopback_stats_match_node_exporter() {
    let exporter = NodeExporter::start();
    let mut collector = HostCollector::new(&HostConfig::default());

    let before = one_pass(&mut collector);
    let (body, response_bytes) = http_get(exporter.address, "/metrics")
        .unwrap_or_else(|why| panic!("scraping node_exporter: {why}"));
    let after = one_pass(&mut collector);
    drop(exporter);
    let scrape = parse_exposition(&body);

    // CPU seconds, all modes and CPUs together.
    let cpus = vigil_sum(&after, CPUS_METRIC, &[]);
    let cpu_slack = CPU_SLACK_SECONDS_PER_CPU * cpus;
    let theirs = exporter_sum(&scrape, "node_cpu_seconds_total", &[]);
    let ours_before = vigil_sum(&before, CPU_SECONDS_METRIC, &[]);
    let ours = vigil_sum(&after, CPU_SECONDS_METRIC, &[]);
    eprintln!(
        "cpu seconds: node_exporter {theirs:.2}, vigil before {ours_before:.2}, after {ours:.2} \
         (difference {:.2} s, {:.4}%)",
        ours - theirs,
        100.0 * relative_difference(ours, theirs)
    );
    assert!(
        ours_before - cpu_slack <= theirs && theirs <= ours + cpu_slack,
        "node_exporter's CPU seconds {theirs} are not between ours before ({ours_before}) and \
         after ({ours}) its scrape"
    );
    assert!(relative_difference(ours, theirs) <= 0.01);

    // Memory.
    for (ours_name, theirs_name) in [
        (MEMORY_TOTAL_METRIC, "node_memory_MemTotal_bytes"),
        (MEMORY_AVAILABLE_METRIC, "node_memory_MemAvailable_bytes"),
    ] {
        let theirs = exporter_sum(&scrape, theirs_name, &[]);
        let ours = vigil_sum(&after, ours_name, &[]);
        let difference = relative_difference(ours, theirs);
        eprintln!(
            "{ours_name}: node_exporter {theirs}, vigil {ours} ({:.4}%)",
            100.0 * difference
        );
        assert!(
            difference <= 0.01,
            "{ours_name} {ours} vs node_exporter's {theirs_name} {theirs}"
        );
    }

    // Loopback bytes. The scrape's response crosses lo after node_exporter read the counters,
    // so the pass after it sees at least that much more; other processes' loopback traffic in
    // the few milliseconds between the reads is what the 1% is for.
    let lo = [("device", "lo")];
    let loopback_slack = response_bytes as f64 + LOOPBACK_HEADER_SLACK_BYTES;
    for (ours_name, theirs_name) in [
        (
            NETWORK_RECEIVE_BYTES_METRIC,
            "node_network_receive_bytes_total",
        ),
        (
            NETWORK_TRANSMIT_BYTES_METRIC,
            "node_network_transmit_bytes_total",
        ),
    ] {
        let theirs = exporter_sum(&scrape, theirs_name, &lo);
        let ours_before = vigil_sum(&before, ours_name, &lo);
        let ours = vigil_sum(&after, ours_name, &lo);
        let tolerance = loopback_slack.max(0.01 * theirs);
        eprintln!(
            "{ours_name}{{device=\"lo\"}}: node_exporter {theirs}, vigil before {ours_before}, \
             after {ours} (difference {} bytes; scrape response {response_bytes} bytes; \
             tolerance {tolerance})",
            ours - theirs
        );
        assert!(
            ours_before <= theirs && theirs <= ours,
            "node_exporter's {theirs_name} {theirs} is not between ours before ({ours_before}) \
             and after ({ours}) its scrape"
        );
        assert!(
            ours - theirs <= tolerance,
            "{ours_name} {ours} is {} bytes past node_exporter's {theirs}; allowed {tolerance}",
            ours - theirs
        );
    }
}

#[test]
fn exposition_lines_parse_with_escaped_label_values() {
    let sample =
        parse_exposition_line(r#"node_x{a="1",b="q\"u\\o\nte"} 2.4727023616e+10"#).unwrap();
    assert_eq!(sample.name, "node_x");
    assert_eq!(
        sample.labels,
        BTreeMap::from([
            ("a".to_string(), "1".to_string()),
            ("b".to_string(), "q\"u\\o\nte".to_string()),
        ])
    );
    assert_eq!(sample.value, 2.4727023616e10);
    let bare = parse_exposition_line("node_load1 0.52").unwrap();
    assert_eq!((bare.name.as_str(), bare.value), ("node_load1", 0.52));
    assert!(bare.labels.is_empty());
    assert!(parse_exposition_line("node_x{a=\"1\"").is_none());
}
