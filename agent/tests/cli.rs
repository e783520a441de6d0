//! `vigil-agent` as a user runs it: the snapshot document for a real tracked process, and clear
//! errors for bad input. Runs the real eBPF programs, so it needs root (as CI has).

use std::{
    io::{BufRead, BufReader},
    process::{Command, Stdio},
};

use serde_json::Value;

const AGENT: &str = env!("CARGO_BIN_EXE_vigil-agent");

fn snapshot(args: &[&str]) -> (bool, Value, String) {
    let output = Command::new(AGENT)
        .arg("snapshot")
        .args(args)
        .output()
        .expect("run vigil-agent");
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    let document = serde_json::from_slice(&output.stdout).unwrap_or(Value::Null);
    (output.status.success(), document, stderr)
}

/// A stand-in model server: a Python process running `body` after saying it is ready. It is
/// killed when dropped.
struct PythonServer(std::process::Child);

impl PythonServer {
    fn start(body: &str) -> Self {
        let script =
            format!("import sys, time\nsys.stdout.write('ready\\n'); sys.stdout.flush()\n{body}");
        let mut child = Command::new("python3")
            .args(["-c", &script])
            .stdout(Stdio::piped())
            .spawn()
            .expect("python3");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert_eq!(line.trim(), "ready");
        Self(child)
    }

    fn pid(&self) -> u32 {
        self.0.id()
    }
}

impl Drop for PythonServer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn snapshot_of_a_tracked_python_server_shows_its_sleep_latency() {
    // Python sleeping 2 ms at a time (clock_nanosleep), marked so that only it matches
    // --track.
    let server = PythonServer::start(
        "end = time.monotonic() + 8  # vigil_cli_test_server\n\
         while time.monotonic() < end: time.sleep(0.002)\n",
    );

    let (ok, doc, stderr) = snapshot(&[
        "--duration",
        "2s",
        "--track",
        "vigil_cli_test_server",
        "--format",
        "json",
    ]);
    let pid = server.pid().to_string();
    drop(server);
    assert!(ok, "snapshot failed: {stderr}");

    assert_eq!(
        doc["collectors"]["syscalls"]["status"], "ok",
        "{}",
        doc["collectors"]
    );
    assert!(doc["node"].as_str().is_some_and(|n| !n.is_empty()));
    let samples = doc["samples"].as_array().unwrap();
    let latency = samples
        .iter()
        .find(|s| {
            s["name"] == "vigil_syscall_latency_seconds"
                && s["labels"]["pid"] == pid.as_str()
                && s["labels"]["syscall"] == "clock_nanosleep"
        })
        .unwrap_or_else(|| panic!("no clock_nanosleep histogram for pid {pid}: {samples:#?}"));
    assert_eq!(latency["labels"]["comm"], "python3");
    let histogram = &latency["histogram"];
    let count = histogram["count"].as_u64().unwrap();
    assert!(count >= 200, "2 s of 2 ms sleeps, got {count}");
    let buckets = histogram["buckets"].as_array().unwrap();
    let p50 = buckets
        .iter()
        .find(|b| b[1].as_u64().unwrap() * 2 >= count)
        .map(|b| b[0].as_f64().unwrap())
        .unwrap();
    assert!((0.002..0.0025).contains(&p50), "p50 bucket le = {p50} s");
    let sum = histogram["sum"].as_f64().unwrap();
    assert!(
        (0.002..0.0025).contains(&(sum / count as f64)),
        "mean = {} s",
        sum / count as f64
    );

    let calls = samples
        .iter()
        .find(|s| {
            s["name"] == "vigil_syscalls_total"
                && s["labels"]["pid"] == pid.as_str()
                && s["labels"]["syscall"] == "clock_nanosleep"
        })
        .expect("call counter");
    assert!(calls["value"].as_f64().unwrap() >= count as f64 - 1.0);
    let events = doc["events"].as_array().unwrap();
    assert!(
        events
            .iter()
            .any(|e| e["kind"] == "process_traced" && e["labels"]["pid"] == pid.as_str()),
        "{events:#?}"
    );
}

#[test]
fn without_bpf_privileges_the_collector_is_unavailable_and_the_snapshot_still_succeeds() {
    // Run as nobody: no capabilities, so the kernel refuses to load the programs.
    let output = Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            AGENT,
            "snapshot",
        ])
        .args(["--duration", "100ms", "--format", "json"])
        .output()
        .expect("setpriv (util-linux)");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    let doc: Value = serde_json::from_slice(&output.stdout).unwrap();
    let syscalls = &doc["collectors"]["syscalls"];
    assert_eq!(syscalls["status"], "unavailable");
    let reason = syscalls["reason"].as_str().unwrap();
    assert!(
        reason.contains("CAP_BPF"),
        "reason should say what is missing: {reason}"
    );
    // The other collectors carry on.
    assert_eq!(doc["collectors"]["host"]["status"], "ok");
    let samples = doc["samples"].as_array().unwrap();
    assert!(
        samples
            .iter()
            .any(|s| s["name"] == "vigil_host_memory_total_bytes")
    );
    assert!(
        samples
            .iter()
            .all(|s| !s["name"].as_str().unwrap().starts_with("vigil_syscall")),
        "no syscall samples without the probes"
    );
}

#[test]
fn a_config_typo_is_an_error_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("agent.toml");
    std::fs::write(&path, "[syscalls]\nmax_tracked_procs = 4\n").unwrap();
    let (ok, _, stderr) = snapshot(&["--config", path.to_str().unwrap(), "--duration", "0s"]);
    assert!(!ok);
    assert!(
        stderr.contains("unknown field `max_tracked_procs`"),
        "{stderr}"
    );
}

#[test]
fn an_invalid_track_regex_is_an_error_naming_it() {
    let (ok, _, stderr) = snapshot(&["--track", "triton(", "--duration", "0s"]);
    assert!(!ok);
    assert!(stderr.contains("triton("), "{stderr}");
}

#[test]
fn snapshot_with_a_stand_in_nvml_driver_joins_gpu_use_to_the_tracked_server() {
    // The stand-in driver, as a node would have it: libnvidia-ml.so.1 in a folder, with the
    // scenario file beside it.
    let dir = tempfile::tempdir().unwrap();
    let deps = std::env::current_exe()
        .unwrap()
        .parent()
        .unwrap()
        .to_path_buf();
    let library = dir.path().join("libnvidia-ml.so.1");
    std::fs::copy(deps.join("libfake_nvml.so"), &library).expect("libfake_nvml.so beside the test");

    let server = PythonServer::start("time.sleep(30)  # vigil_cli_gpu_server\n");
    let pid = server.pid();

    let scenario = serde_json::json!({"devices": [{
        "uuid": "GPU-5a1c0d3e-0000-4000-8000-00000000cafe",
        "name": "NVIDIA H200",
        "pci_bus_id": "00000000:17:00.0",
        "memory_total_bytes": 150_754_820_096u64,
        "timeline": [{"at_s": 0, "gpu_util": 73, "memory_used_bytes": 42_949_672_960u64,
                      "power_mw": 412_000, "temperature_c": 61}],
        "nvlinks": [{"active": true, "replay_errors": 0, "recovery_errors": 0,
                     "crc_flit_errors": 0, "crc_data_errors": 0}],
        "processes": [{"pid": pid, "kind": "compute", "used_memory_bytes": 40_000_000_000u64,
                       "sm_util": 70, "mem_util": 30}]
    }]});
    std::fs::write(
        dir.path().join(fake_nvml::SCENARIO_FILE_NAME),
        serde_json::to_vec(&scenario).unwrap(),
    )
    .unwrap();

    let (ok, doc, stderr) = snapshot(&[
        "--duration",
        "1500ms",
        "--track",
        "vigil_cli_gpu_server",
        "--nvml-library",
        library.to_str().unwrap(),
        "--format",
        "json",
    ]);
    drop(server);
    assert!(ok, "snapshot failed: {stderr}");
    assert_eq!(
        doc["collectors"]["gpu"]["status"], "ok",
        "{}",
        doc["collectors"]
    );

    let samples = doc["samples"].as_array().unwrap();
    let find = |name: &str, extra: &[(&str, &str)]| {
        samples
            .iter()
            .find(|s| s["name"] == name && extra.iter().all(|(k, v)| s["labels"][*k] == *v))
            .unwrap_or_else(|| panic!("no {name} {extra:?}"))
    };
    let utilization = find("vigil_gpu_utilization_ratio", &[("gpu", "0")]);
    assert_eq!(
        utilization["labels"]["uuid"],
        "GPU-5a1c0d3e-0000-4000-8000-00000000cafe"
    );
    assert_eq!(utilization["labels"]["model"], "NVIDIA H200");
    assert_eq!(utilization["value"], 0.73);
    assert_eq!(
        find("vigil_gpu_power_watts", &[("gpu", "0")])["value"],
        412.0
    );
    assert_eq!(
        find("vigil_gpu_temperature_celsius", &[("gpu", "0")])["value"],
        61.0
    );
    // The server's GPU memory carries the same pid and server labels as its other series.
    let pid = pid.to_string();
    let memory = find(
        "vigil_gpu_process_memory_used_bytes",
        &[("pid", pid.as_str())],
    );
    assert_eq!(memory["value"], 40_000_000_000.0);
    assert_eq!(memory["labels"]["server"], "python3");
    find(
        "vigil_process_resident_memory_bytes",
        &[("pid", pid.as_str())],
    );
}
