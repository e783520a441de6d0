//! The `vigil-aggregator` binary: flags over the config file, the line it prints when ready,
//! and a `kill -9` in the middle: what was acked is there after a restart, and a resend of it
//! is acked without being stored twice.

mod common;

use std::{
    io::{BufRead, BufReader},
    net::SocketAddr,
    path::Path,
    process::{Child, Command, Stdio},
};

use common::*;
use tonic::transport::Endpoint;
use vigil_aggregator::storage::Wal;
use vigil_proto::v1::MetricType;

/// Starts the binary and waits for its "grpc listening on ADDR" line.
fn spawn(config: &Path, data_dir: &Path) -> (Child, SocketAddr) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_vigil-aggregator"))
        .arg("--config")
        .arg(config)
        .arg("--data-dir")
        .arg(data_dir)
        .args(["--grpc-listen", "127.0.0.1:0"])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start vigil-aggregator");
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let addr = line
        .trim()
        .strip_prefix("vigil-aggregator: grpc listening on ")
        .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
        .parse()
        .unwrap();
    (child, addr)
}

fn records_in(data_dir: &Path) -> u64 {
    let copy = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(data_dir.join("wal")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|ext| ext == "wal") {
            std::fs::copy(&path, copy.path().join(path.file_name().unwrap())).unwrap();
        }
    }
    Wal::open(copy.path(), 1 << 20, |_| {}).unwrap().1.records
}

#[tokio::test]
async fn after_kill_9_the_acked_batches_are_kept_and_a_resend_is_stored_once() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("aggregator.toml");
    // The file's data_dir and listen address are overridden by the flags.
    std::fs::write(
        &config,
        "data_dir = \"/nonexistent\"\n[grpc]\nlisten = \"127.0.0.1:1\"\n[tls]\nplaintext = true\n",
    )
    .unwrap();
    let data_dir = dir.path().join("data");
    let series = vec![declare(
        1,
        "vigil_gpu_power_watts",
        &[("gpu", "0")],
        MetricType::Gauge,
    )];

    let (mut child, addr) = spawn(&config, &data_dir);
    let channel = Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut stream = open(channel, hello("node-a", "spool-a"), None)
        .await
        .unwrap();
    for sequence in 1..=3 {
        let declarations = if sequence == 1 {
            series.clone()
        } else {
            vec![]
        };
        assert_eq!(
            stream
                .store(batch(sequence, declarations, vec![sample(1, 0, 1.0)]))
                .await,
            vec![]
        );
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    assert_eq!(records_in(&data_dir), 3);

    let (mut child, addr) = spawn(&config, &data_dir);
    let channel = Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut stream = open(channel, hello("node-a", "spool-a"), None)
        .await
        .unwrap();
    // The agent did not see ack 3 (say) and resends it, then goes on with 4 on the old ids.
    assert_eq!(
        stream
            .store(batch(3, vec![], vec![sample(1, 0, 1.0)]))
            .await,
        vec![]
    );
    assert_eq!(
        stream
            .store(batch(4, vec![], vec![sample(1, 0, 1.0)]))
            .await,
        vec![]
    );
    child.kill().unwrap();
    child.wait().unwrap();
    assert_eq!(records_in(&data_dir), 4, "batch 3 is stored once");
}
