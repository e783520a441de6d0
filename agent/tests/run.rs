//! `vigil-agent run` as a process against an in-process fake aggregator: passes on aligned
//! ticks arrive in sequence, SIGTERM stops it cleanly, and after a `kill -9` the spooled
//! batches are sent at the next start.

#[allow(dead_code)]
mod fake_aggregator;

use std::{
    net::SocketAddr,
    path::Path,
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use fake_aggregator::{Behaviour, Record, free_address, start_aggregator};

const AGENT: &str = env!("CARGO_BIN_EXE_vigil-agent");

fn write_config(dir: &Path, address: SocketAddr, extra: &str) -> std::path::PathBuf {
    std::fs::write(dir.join("token"), "run-test-token\n").unwrap();
    let config = format!(
        r#"
[syscalls]
enabled = false
[gpu]
enabled = false
[transport]
endpoints = ["http://{address}"]
plaintext = true
token_file = "{dir}/token"
spool_dir = "{dir}/spool"
interval = "200ms"
compression = "zstd"
{extra}
"#,
        dir = dir.display()
    );
    let path = dir.join("agent.toml");
    std::fs::write(&path, config).unwrap();
    path
}

fn start_agent(config: &Path) -> Child {
    Command::new(AGENT)
        .args(["run", "--config"])
        .arg(config)
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start vigil-agent run")
}

fn signal(child: &Child, signal: i32) {
    // SAFETY: kill(2) on the pid of a child we started and have not waited for yet.
    assert_eq!(unsafe { libc::kill(child.id() as i32, signal) }, 0);
}

fn wait_exit(child: &mut Child, within: Duration) -> std::process::ExitStatus {
    let deadline = Instant::now() + within;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        assert!(Instant::now() < deadline, "vigil-agent did not exit");
        std::thread::sleep(Duration::from_millis(20));
    }
}

async fn wait_stored(record: &Arc<Mutex<Record>>, batches: usize) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while record.lock().unwrap().stored.len() < batches {
        assert!(
            Instant::now() < deadline,
            "fewer than {batches} batches arrived"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn run_streams_aligned_passes_in_sequence_and_stops_cleanly_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let address = free_address().await;
    let (record, _server) = start_aggregator(address, Behaviour::AckAll).await;
    let mut agent = start_agent(&write_config(dir.path(), address, ""));
    wait_stored(&record, 4).await;
    signal(&agent, libc::SIGTERM);
    let status = wait_exit(&mut agent, Duration::from_secs(10));
    assert!(status.success(), "{status}");

    let record = record.lock().unwrap();
    let sequences: Vec<u64> = record.stored.keys().copied().collect();
    assert_eq!(sequences, (1..=sequences.len() as u64).collect::<Vec<_>>());
    for batch in record.stored.values() {
        assert_eq!(
            batch.base_time_ms % 200,
            0,
            "aligned to the 200 ms interval"
        );
    }
    let names: Vec<&str> = record.stored[&1]
        .series
        .iter()
        .map(|s| s.name.as_str())
        .collect();
    assert!(
        names.contains(&"vigil_agent_spool_dropped_batches_total"),
        "{names:?}"
    );
    assert!(
        record.stored[&2].series.len() < record.stored[&1].series.len(),
        "series are declared once"
    );
    let boot_id = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").unwrap();
    assert_eq!(record.hellos[0].boot_id, boot_id.trim());
    assert_eq!(
        record.authorization[0].as_deref(),
        Some("Bearer run-test-token")
    );
}

#[tokio::test]
async fn batches_spooled_before_a_kill_9_are_sent_after_the_restart() {
    let dir = tempfile::tempdir().unwrap();
    let address = free_address().await;
    let config = write_config(dir.path(), address, "");
    // The aggregator is down: batches pile up in the spool.
    let mut agent = start_agent(&config);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    signal(&agent, libc::SIGKILL);
    wait_exit(&mut agent, Duration::from_secs(5));
    let killed_at_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;

    let (record, _server) = start_aggregator(address, Behaviour::AckAll).await;
    let mut agent = start_agent(&config);
    wait_stored(&record, 10).await;
    signal(&agent, libc::SIGTERM);
    assert!(wait_exit(&mut agent, Duration::from_secs(10)).success());

    let record = record.lock().unwrap();
    let received: Vec<u64> = record.received.iter().flatten().copied().collect();
    assert_eq!(
        received[..10],
        (1..=10).collect::<Vec<_>>(),
        "the spool first, oldest first, then live batches"
    );
    let before_kill = record
        .stored
        .values()
        .filter(|b| b.base_time_ms < killed_at_ms)
        .count();
    assert!(
        before_kill >= 4,
        "batches from before the kill arrived: {before_kill}"
    );
    let instances: std::collections::HashSet<&str> = record
        .hellos
        .iter()
        .map(|h| h.agent_instance.as_str())
        .collect();
    assert_eq!(instances.len(), 1, "the restart keeps the agent instance");
}

/// Runs `vigil-agent run` with this config file; it must refuse to start. Its stderr.
fn refused_config(text: &str) -> String {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("agent.toml");
    std::fs::write(&config, text).unwrap();
    let output = Command::new(AGENT)
        .args(["run", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    assert!(!output.status.success());
    String::from_utf8_lossy(&output.stderr).into_owned()
}

#[test]
fn run_refuses_a_config_with_an_unknown_transport_key() {
    let stderr =
        refused_config("[transport]\nendpoints = [\"http://127.0.0.1:1\"]\nplain_text = true\n");
    assert!(stderr.contains("unknown field `plain_text`"), "{stderr}");
}

#[test]
fn run_refuses_plaintext_without_the_explicit_opt_in() {
    let stderr = refused_config("[transport]\nendpoints = [\"http://127.0.0.1:1\"]\n");
    assert!(stderr.contains("transport.plaintext = true"), "{stderr}");
}
