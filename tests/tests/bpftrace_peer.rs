//! The syscall-latency collector against a peer: bpftrace (Debian's package) times the same
//! process's syscalls on the same tracepoints, and both must agree on the number of calls and
//! on the total time spent in them.

use std::{
    io::{BufRead, BufReader},
    process::{Command, Stdio},
    sync::mpsc,
    time::Duration,
};

use serde_json::Value;
use vigil_agent::{
    collectors::{
        error_chain,
        syscalls::{CALLS_METRIC, LATENCY_METRIC, SyscallLatencyCollector, SyscallsConfig, names},
    },
    sample::SampleValue,
    selection::ModelServerProcess,
};
use vigil_tests::{Workload, kernel_lock, require_bpf};

const WORKLOAD: &str = env!("CARGO_BIN_EXE_syscall-workload");

#[test]
fn call_counts_and_total_latency_match_bpftrace() {
    let _kernel = kernel_lock();
    let config = SyscallsConfig::default();
    let mut collector = match SyscallLatencyCollector::start(
        &config,
        config.histogram_syscall_numbers().unwrap(),
    ) {
        Ok(collector) => collector,
        Err(error) => {
            require_bpf(&error_chain(&error));
            return;
        }
    };
    const CALLS: usize = 150;
    let mut workload = Workload::spawn(WORKLOAD, "pipe-read", CALLS, 2);
    let pid = workload.pid();
    let read_nr = names::syscall_number("read").unwrap();

    let me = std::process::id();
    let getppid_nr = names::syscall_number("getppid").unwrap();
    let script = format!(
        "tracepoint:raw_syscalls:sys_enter /pid == {pid} && args->id == {read_nr}/ \
         {{ @start[tid] = nsecs; }} \
         tracepoint:raw_syscalls:sys_exit /@start[tid]/ \
         {{ @calls = count(); @sum_ns = sum(nsecs - @start[tid]); delete(@start[tid]); }} \
         tracepoint:raw_syscalls:sys_exit /pid == {me} && args->id == {getppid_nr} && !@armed/ \
         {{ @armed = 1; printf(\"armed\\n\"); }}"
    );
    let mut bpftrace = Command::new("bpftrace")
        .args(["-f", "json", "-e", &script])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("bpftrace (Debian package bpftrace; `cargo xtask setup` installs it)");
    let (lines_tx, lines) = mpsc::channel();
    let stdout = BufReader::new(bpftrace.stdout.take().unwrap());
    std::thread::spawn(move || {
        for line in stdout.lines().map_while(Result::ok) {
            if lines_tx.send(line).is_err() {
                break;
            }
        }
    });
    // bpftrace announces its probes before they are live: make syscalls of our own until its
    // last probe reports one, so every probe is attached before the workload starts.
    let armed = (0..1000).any(|_| {
        // SAFETY: getppid takes no arguments and cannot fail.
        unsafe { libc::syscall(libc::SYS_getppid) };
        lines
            .recv_timeout(Duration::from_millis(10))
            .is_ok_and(|line| line.contains("armed"))
    });
    assert!(armed, "bpftrace never attached (is tracefs mounted?)");

    collector.update_tracked(&[ModelServerProcess {
        pid,
        start_time_ticks: workload.start_time_ticks(),
        comm: "syscall-workloa".into(),
        server: "test-workload".into(),
    }]);
    workload.run();
    collector.refresh();

    // SAFETY: signals our own child; bpftrace prints its maps on SIGINT and exits.
    unsafe { libc::kill(bpftrace.id() as i32, libc::SIGINT) };
    let mut peer_calls = None;
    let mut peer_sum_ns = None;
    while let Ok(line) = lines.recv_timeout(Duration::from_secs(10)) {
        let Ok(value) = serde_json::from_str::<Value>(&line) else {
            continue;
        };
        if let Some(n) = value["data"]["@calls"].as_u64() {
            peer_calls = Some(n);
        }
        if let Some(n) = value["data"]["@sum_ns"].as_u64() {
            peer_sum_ns = Some(n);
        }
    }
    bpftrace.wait().unwrap();
    workload.finish();

    let samples = collector.samples();
    let ours = |name: &str| {
        samples
            .iter()
            .find(|s| {
                s.name == name
                    && s.labels["pid"] == pid.to_string()
                    && s.labels["syscall"] == "read"
            })
            .map(|s| s.value.clone())
            .unwrap_or_else(|| panic!("no {name} sample for read"))
    };
    assert_eq!(ours(CALLS_METRIC), SampleValue::Value(CALLS as f64));
    assert_eq!(peer_calls, Some(CALLS as u64), "bpftrace's count");
    let SampleValue::Histogram(histogram) = ours(LATENCY_METRIC) else {
        panic!("histogram")
    };
    assert_eq!(histogram.count, CALLS as u64);
    let peer_sum = peer_sum_ns.expect("bpftrace's sum") as f64 / 1e9;
    let relative = (histogram.sum - peer_sum).abs() / peer_sum;
    eprintln!(
        "time in read: ours {} s, bpftrace {} s",
        histogram.sum, peer_sum
    );
    assert!(
        relative < 0.01,
        "total time in read: ours {} s, bpftrace {} s ({:.2}% apart)",
        histogram.sum,
        peer_sum,
        relative * 100.0
    );
}
