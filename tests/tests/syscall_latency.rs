//! The syscall-latency collector on the real kernel: programs load and attach, counts are exact,
//! latencies land in the right bucket, and tracking follows processes as they come and go.
//!
//! These tests need root (or CAP_BPF + CAP_PERFMON). They never skip under CI; elsewhere, set
//! VIGIL_SKIP_BPF_TESTS=1 to skip them when BPF is unavailable.

use vigil_agent::{
    collectors::{
        CollectorStatus, error_chain,
        syscalls::{
            CALLS_METRIC, ERRORS_METRIC, LATENCY_METRIC, MEMORY_METRIC, OVER_BUDGET_METRIC,
            SyscallLatencyCollector, SyscallsConfig, TRACED_METRIC, attach_empty_programs,
            map_memory_bytes, node_pid_max,
        },
    },
    sample::{Sample, SampleValue},
    selection::ModelServerProcess,
};
use vigil_agent_common::histogram::{bucket_index, bucket_upper_bound_ns};
use vigil_tests::{Workload, kernel_lock, require_bpf};

const WORKLOAD: &str = env!("CARGO_BIN_EXE_syscall-workload");

/// Identity as the process scan would report it.
fn identity(workload: &Workload) -> ModelServerProcess {
    ModelServerProcess {
        pid: workload.pid(),
        start_time_ticks: workload.start_time_ticks(),
        comm: "syscall-workloa".to_string(),
        server: "test-workload".to_string(),
    }
}

/// Starts the collector, or explains why it cannot. Skipping is allowed only outside CI and only
/// when asked for, so CI can never pass without running the programs.
fn start_collector() -> Option<SyscallLatencyCollector> {
    let config = SyscallsConfig {
        max_tracked_processes: 8,
        ..Default::default()
    };
    start_collector_with(&config, config.histogram_syscall_numbers().unwrap())
}

fn start_collector_with(
    config: &SyscallsConfig,
    preassigned: Vec<u32>,
) -> Option<SyscallLatencyCollector> {
    match SyscallLatencyCollector::start(config, preassigned) {
        Ok(collector) => Some(collector),
        Err(error) => {
            require_bpf(&error_chain(&error));
            None
        }
    }
}

fn find<'a>(samples: &'a [Sample], name: &str, pid: u32, syscall: &str) -> Option<&'a Sample> {
    samples.iter().find(|s| {
        s.name == name && s.labels["pid"] == pid.to_string() && s.labels["syscall"] == syscall
    })
}

fn value(sample: Option<&Sample>) -> f64 {
    match sample.map(|s| &s.value) {
        Some(SampleValue::Value(v)) => *v,
        other => panic!("expected a value sample, got {other:?}"),
    }
}

/// The p50 bucket index from a snapshot histogram (cumulative `[le_seconds, count]` pairs).
fn p50_bucket(sample: Option<&Sample>) -> (usize, u64) {
    let Some(SampleValue::Histogram(h)) = sample.map(|s| &s.value) else {
        panic!("expected a histogram sample, got {sample:?}");
    };
    let rank = h.count.div_ceil(2);
    let (le, _) = h
        .buckets
        .iter()
        .find(|(_, c)| *c >= rank)
        .expect("p50 bucket");
    let le_ns = (le * 1e9).round() as u64;
    (bucket_index(le_ns), h.count)
}

/// The p50 of the workload's own user-space measurements, as a bucket index.
fn true_p50_bucket(latencies: &[u64]) -> usize {
    let mut sorted = latencies.to_vec();
    sorted.sort_unstable();
    bucket_index(sorted[latencies.len().div_ceil(2) - 1])
}

/// Runs one pass of a workload while it is traced and returns its samples, pid and the
/// latencies the workload measured itself.
fn trace_one_run(
    collector: &mut SyscallLatencyCollector,
    mode: &str,
    calls: usize,
    millis: u64,
) -> (Workload, Vec<Sample>, Vec<u64>) {
    let mut workload = Workload::spawn(WORKLOAD, mode, calls, millis);
    collector.update_tracked(&[identity(&workload)]);
    let latencies = workload.run();
    collector.refresh();
    (workload, collector.samples(), latencies)
}

/// The histogram holds every call, and its p50 bucket is within one bucket of the p50 that the
/// workload measured around its own syscalls.
fn assert_p50_within_one_bucket(histogram: Option<&Sample>, latencies: &[u64]) {
    let (bucket, count) = p50_bucket(histogram);
    assert_eq!(
        count,
        latencies.len() as u64,
        "every call is in the histogram"
    );
    let expected = true_p50_bucket(latencies);
    assert!(
        bucket.abs_diff(expected) <= 1,
        "kernel p50 <= {} ns, user-space p50 in bucket <= {} ns",
        bucket_upper_bound_ns(bucket),
        bucket_upper_bound_ns(expected)
    );
}

#[test]
fn nanosleep_calls_are_counted_exactly_and_timed_within_one_bucket() {
    let _kernel = kernel_lock();
    let Some(mut collector) = start_collector() else {
        return;
    };
    let (workload, samples, latencies) = trace_one_run(&mut collector, "nanosleep", 200, 2);
    let pid = workload.pid();

    assert_eq!(value(find(&samples, CALLS_METRIC, pid, "nanosleep")), 200.0);
    assert_eq!(value(find(&samples, ERRORS_METRIC, pid, "nanosleep")), 0.0);
    let histogram = find(&samples, LATENCY_METRIC, pid, "nanosleep");
    assert_p50_within_one_bucket(histogram, &latencies);
    let (bucket, _) = p50_bucket(histogram);
    assert!(
        bucket_upper_bound_ns(bucket) >= 2_000_000,
        "a 2 ms sleep cannot take less"
    );
    assert_eq!(collector.status(), CollectorStatus::Ok);
    workload.finish();
}

#[test]
fn pipe_reads_blocked_on_a_slow_writer_are_timed_within_one_bucket() {
    let _kernel = kernel_lock();
    let Some(mut collector) = start_collector() else {
        return;
    };
    let (workload, samples, latencies) = trace_one_run(&mut collector, "pipe-read", 100, 3);
    let pid = workload.pid();

    // The blocked read on stdin that released the workload began before tracking, so only the
    // pipe reads count.
    assert_eq!(value(find(&samples, CALLS_METRIC, pid, "read")), 100.0);
    // The writer thread belongs to the same process: its sleeps are counted too.
    assert_eq!(value(find(&samples, CALLS_METRIC, pid, "nanosleep")), 100.0);
    assert_p50_within_one_bucket(find(&samples, LATENCY_METRIC, pid, "read"), &latencies);
    workload.finish();
}

#[test]
fn failed_calls_are_counted_as_errors() {
    let _kernel = kernel_lock();
    let Some(mut collector) = start_collector() else {
        return;
    };
    let (workload, samples, _) = trace_one_run(&mut collector, "bad-read", 1000, 0);
    assert_eq!(
        value(find(&samples, CALLS_METRIC, workload.pid(), "read")),
        1000.0
    );
    assert_eq!(
        value(find(&samples, ERRORS_METRIC, workload.pid(), "read")),
        1000.0
    );
    workload.finish();
}

#[test]
fn an_untracked_process_produces_no_samples() {
    let _kernel = kernel_lock();
    let Some(mut collector) = start_collector() else {
        return;
    };
    let mut tracked = Workload::spawn(WORKLOAD, "nanosleep", 20, 1);
    let mut untracked = Workload::spawn(WORKLOAD, "nanosleep", 20, 1);
    collector.update_tracked(&[identity(&tracked)]);
    tracked.run();
    untracked.run();
    collector.refresh();
    let samples = collector.samples();
    let untracked_pid = untracked.pid().to_string();
    assert!(
        samples
            .iter()
            .all(|s| s.labels.get("pid") != Some(&untracked_pid))
    );
    assert_eq!(collector.kernel_slot(untracked.pid()), 0);
    assert_eq!(
        value(find(&samples, CALLS_METRIC, tracked.pid(), "nanosleep")),
        20.0
    );
    tracked.finish();
    untracked.finish();
}

#[test]
fn a_tracked_process_that_exits_is_cleaned_up_and_its_slot_reused() {
    let _kernel = kernel_lock();
    let Some(mut collector) = start_collector() else {
        return;
    };
    let mut first = Workload::spawn(WORKLOAD, "nanosleep", 10, 1);
    let first_pid = first.pid();
    collector.update_tracked(&[identity(&first)]);
    let slot = collector.kernel_slot(first_pid);
    assert_ne!(slot, 0);
    first.run();
    first.finish();

    // The next scan no longer lists it.
    let mut second = Workload::spawn(WORKLOAD, "nanosleep", 5, 1);
    collector.update_tracked(&[identity(&second)]);
    assert_eq!(collector.traced_pids(), vec![second.pid()]);
    assert_eq!(
        collector.kernel_slot(first_pid),
        0,
        "kernel no longer tracks the exited pid"
    );
    assert_eq!(
        collector.kernel_slot(second.pid()),
        slot,
        "the freed slot is reused"
    );
    let events = collector.take_events();
    assert!(
        events
            .iter()
            .any(|e| e.kind == "process_exited" && e.labels["pid"] == first_pid.to_string())
    );

    second.run();
    collector.refresh();
    let samples = collector.samples();
    // The reused slot starts from zero: only the second process's own calls.
    assert_eq!(
        value(find(&samples, CALLS_METRIC, second.pid(), "nanosleep")),
        5.0
    );
    // The exited process's final totals are still reported until forgotten.
    assert_eq!(
        value(find(&samples, CALLS_METRIC, first_pid, "nanosleep")),
        10.0
    );
    collector.forget_retired();
    assert!(find(&collector.samples(), CALLS_METRIC, first_pid, "nanosleep").is_none());
    second.finish();
}

#[test]
fn a_reused_pid_with_a_new_start_time_is_a_new_process() {
    let _kernel = kernel_lock();
    let Some(mut collector) = start_collector() else {
        return;
    };
    let mut workload = Workload::spawn(WORKLOAD, "nanosleep", 10, 1);
    let mut identity = identity(&workload);
    collector.update_tracked(std::slice::from_ref(&identity));
    workload.run();
    collector.refresh();
    // Same pid, later start time: what the scan reports after the pid is recycled.
    identity.start_time_ticks += 1;
    collector.update_tracked(std::slice::from_ref(&identity));
    collector.refresh();
    let current: Vec<_> = collector
        .samples()
        .into_iter()
        .filter(|s| s.name == CALLS_METRIC && s.labels["syscall"] == "nanosleep")
        .map(|s| s.value)
        .collect();
    // The retired process keeps its 10 calls; the new one starts from nothing.
    assert_eq!(current, vec![SampleValue::Value(10.0)]);
    // The real process (its true start time) still runs: untraced, not exited.
    let events = collector.take_events();
    assert!(
        events.iter().any(|e| e.kind == "process_untraced"),
        "{events:?}"
    );
    assert_eq!(collector.traced_pids(), vec![workload.pid()]);
    workload.finish();
}

#[test]
fn syscalls_without_a_preassigned_histogram_get_one_after_a_pass() {
    let _kernel = kernel_lock();
    let config = SyscallsConfig {
        max_tracked_processes: 4,
        ..Default::default()
    };
    // No preassigned columns at all: every syscall starts in `other`.
    let Some(mut collector) = start_collector_with(&config, vec![]) else {
        return;
    };
    let mut workload = Workload::spawn(WORKLOAD, "nanosleep", 30, 1);
    let pid = workload.pid();
    collector.update_tracked(&[identity(&workload)]);
    workload.run();
    collector.refresh(); // sees nanosleep for the first time and gives it a column
    let samples = collector.samples();
    let (_, in_other) = p50_bucket(find(&samples, LATENCY_METRIC, pid, "other"));
    let all_calls: f64 = samples
        .iter()
        .filter(|s| s.name == CALLS_METRIC && s.labels["pid"] == pid.to_string())
        .map(|s| value(Some(s)))
        .sum();
    assert!(all_calls >= 30.0);
    assert_eq!(
        in_other as f64, all_calls,
        "calls before the first pass all share `other`"
    );
    assert!(find(&samples, LATENCY_METRIC, pid, "nanosleep").is_none());

    workload.run();
    collector.refresh();
    let samples = collector.samples();
    let (_, own) = p50_bucket(find(&samples, LATENCY_METRIC, pid, "nanosleep"));
    assert_eq!(own, 30, "later calls have their own histogram");
    assert_eq!(value(find(&samples, CALLS_METRIC, pid, "nanosleep")), 60.0);
    workload.finish();
}

#[test]
fn the_empty_floor_programs_pass_the_verifier_and_attach() {
    let _kernel = kernel_lock();
    if start_collector().is_none() {
        return;
    }
    attach_empty_programs().unwrap_or_else(|e| panic!("floor programs: {}", error_chain(&e)));
}

#[test]
fn processes_over_the_budget_are_counted_and_reported() {
    let _kernel = kernel_lock();
    let config = SyscallsConfig {
        max_tracked_processes: 1,
        ..Default::default()
    };
    let Some(mut collector) =
        start_collector_with(&config, config.histogram_syscall_numbers().unwrap())
    else {
        return;
    };
    let first = Workload::spawn(WORKLOAD, "nanosleep", 1, 1);
    let second = Workload::spawn(WORKLOAD, "nanosleep", 1, 1);
    collector.update_tracked(&[identity(&first), identity(&second)]);
    assert_eq!(collector.traced_pids(), vec![first.pid()]);
    assert_eq!(collector.kernel_slot(second.pid()), 0);
    let CollectorStatus::Degraded(reason) = collector.status() else {
        panic!("expected degraded, got {:?}", collector.status());
    };
    assert!(
        reason.contains("1 model-server processes are not traced"),
        "{reason}"
    );
    let samples = collector.samples();
    let gauge = |name: &str| value(samples.iter().find(|s| s.name == name));
    assert_eq!(gauge(TRACED_METRIC), 1.0);
    assert_eq!(gauge(OVER_BUDGET_METRIC), 1.0);
    assert_eq!(
        gauge(MEMORY_METRIC),
        map_memory_bytes(1, node_pid_max()) as f64
    );

    // When the traced one exits, the waiting one gets the slot on the next scan.
    first.finish();
    collector.update_tracked(&[identity(&second)]);
    assert_eq!(collector.traced_pids(), vec![second.pid()]);
    assert_eq!(collector.status(), CollectorStatus::Ok);
    second.finish();
}
