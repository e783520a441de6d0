//! The process collector against real processes: what it reports agrees with what the kernel
//! shows in /proc right after, folded processes sum into `server="other"`, a process that exited
//! leaves no trace, and an unreadable file drops only its own metrics.
//!
//! Each test drives its own `process-workload` child, which waits in a blocking read between
//! commands, so its counters hold still while the test compares readings.

use std::{
    collections::BTreeMap,
    io::{BufRead, BufReader, Write},
    process::{Child, ChildStdin, ChildStdout, Command, Stdio},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use vigil_agent::{
    collectors::{
        Collector, CollectorStatus,
        process::{
            CONTEXT_SWITCHES_METRIC, CPU_METRIC, FOLDED_PROCESSES_METRIC, MAX_FDS_METRIC,
            OPEN_FDS_METRIC, PAGE_FAULTS_METRIC, ProcessCollector, READ_BYTES_METRIC,
            RESIDENT_MEMORY_METRIC, START_TIME_METRIC, STATE_METRIC, THREADS_METRIC,
            VIRTUAL_MEMORY_METRIC, WRITTEN_BYTES_METRIC,
        },
    },
    sample::{Sample, SampleValue},
    selection::{ModelServerProcess, PassSelection, budget::ProcessBudget},
};

const WORKLOAD: &str = env!("CARGO_BIN_EXE_process-workload");
const MIB: f64 = 1024.0 * 1024.0;

/// A running `process-workload`, killed when dropped.
struct Workload {
    child: Child,
    stdin: Option<ChildStdin>,
    stdout: BufReader<ChildStdout>,
}

impl Workload {
    fn spawn() -> Self {
        let mut child = Command::new(WORKLOAD)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn process-workload");
        let stdin = child.stdin.take();
        let stdout = BufReader::new(child.stdout.take().unwrap());
        let mut workload = Self {
            child,
            stdin,
            stdout,
        };
        assert_eq!(workload.read_line(), "ready");
        workload.wait_until_blocked();
        workload
    }

    fn read_line(&mut self) -> String {
        let mut line = String::new();
        self.stdout.read_line(&mut line).unwrap();
        line.trim().to_owned()
    }

    /// Runs one command and waits until it is done and the child waits for the next.
    fn run(&mut self, command: &str) -> &mut Self {
        writeln!(self.stdin.as_mut().unwrap(), "{command}").unwrap();
        assert_eq!(self.read_line(), "ok", "workload command {command:?}");
        self.wait_until_blocked();
        self
    }

    /// Waits until the child sleeps in its stdin read (after printing `ready` or `ok` it still
    /// has to get there, and until then its state and counters move).
    fn wait_until_blocked(&self) {
        for _ in 0..1000 {
            if self.stat_field(3) == "S" {
                return;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        panic!("workload {} never blocked on stdin", self.pid());
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Field `n` (1-based, as in proc_pid_stat(5)) of /proc/PID/stat, read directly.
    fn stat_field(&self, n: usize) -> String {
        let stat = proc_file(self.pid(), "stat");
        let after_comm = &stat[stat.rfind(')').unwrap() + 2..];
        after_comm.split(' ').nth(n - 3).unwrap().to_owned()
    }

    fn stat_number(&self, n: usize) -> u64 {
        self.stat_field(n).parse().unwrap()
    }

    /// A `/proc/PID/status` value in kB, as bytes.
    fn status_kib(&self, key: &str) -> u64 {
        let status = proc_file(self.pid(), "status");
        let line = status
            .lines()
            .find_map(|line| line.strip_prefix(&format!("{key}:")))
            .unwrap_or_else(|| panic!("no {key} in status"));
        line.trim()
            .strip_suffix(" kB")
            .unwrap()
            .parse::<u64>()
            .unwrap()
            * 1024
    }

    fn listed_fds(&self) -> u64 {
        std::fs::read_dir(format!("/proc/{}/fd", self.pid()))
            .unwrap()
            .count() as u64
    }

    /// The process as the model-server scan would report it.
    fn identity(&self, server: &str) -> ModelServerProcess {
        ModelServerProcess {
            pid: self.pid(),
            start_time_ticks: self.stat_number(22),
            comm: "process-workloa".to_owned(),
            server: server.to_owned(),
        }
    }

    /// Closes stdin, waits for the exit and reaps the child: its pid is gone from /proc.
    fn exit(mut self) {
        drop(self.stdin.take());
        assert!(self.child.wait().unwrap().success());
    }
}

impl Drop for Workload {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn proc_file(pid: u32, name: &str) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/{name}")).unwrap()
}

fn clock_ticks_per_second() -> f64 {
    // SAFETY: sysconf has no preconditions.
    unsafe { libc::sysconf(libc::_SC_CLK_TCK) as f64 }
}

fn tracking(processes: &[&Workload]) -> PassSelection {
    PassSelection {
        tracked: processes.iter().map(|w| w.identity("test")).collect(),
        folded: Vec::new(),
    }
}

fn collect_once(selection: &PassSelection) -> (Vec<Sample>, CollectorStatus) {
    let mut collector = ProcessCollector::new();
    collector.collect(selection);
    (collector.samples(), collector.status())
}

fn value_of(sample: &Sample) -> f64 {
    match sample.value {
        SampleValue::Value(v) => v,
        ref other => panic!("{} is not a plain value: {other:?}", sample.name),
    }
}

/// The value of `name` for `pid` with the extra label `extra` (e.g. `("mode", "user")`).
fn find(samples: &[Sample], name: &str, pid: u32, extra: Option<(&str, &str)>) -> Option<f64> {
    let pid = pid.to_string();
    let found: Vec<&Sample> = samples
        .iter()
        .filter(|s| {
            s.name == name
                && s.labels.get("pid") == Some(&pid)
                && extra
                    .is_none_or(|(key, value)| s.labels.get(key).map(String::as_str) == Some(value))
        })
        .collect();
    assert!(
        found.len() <= 1,
        "several {name} samples for pid {pid}: {found:?}"
    );
    found.first().map(|s| value_of(s))
}

fn get(samples: &[Sample], name: &str, pid: u32, extra: Option<(&str, &str)>) -> f64 {
    find(samples, name, pid, extra)
        .unwrap_or_else(|| panic!("no {name} {extra:?} for pid {pid} in {samples:#?}"))
}

/// Total CPU seconds (user + system) the collector reported for `pid`.
fn cpu_seconds(samples: &[Sample], pid: u32) -> f64 {
    get(samples, CPU_METRIC, pid, Some(("mode", "user")))
        + get(samples, CPU_METRIC, pid, Some(("mode", "system")))
}

#[test]
fn resident_memory_and_cpu_time_agree_with_proc_read_right_after() {
    let mut workload = Workload::spawn();
    workload.run("alloc 64").run("burn 300");
    let pid = workload.pid();

    let (samples, status) = collect_once(&tracking(&[&workload]));
    let vm_rss = workload.status_kib("VmRSS");
    let utime = workload.stat_number(14);
    let stime = workload.stat_number(15);
    let vsize = workload.stat_number(23);

    assert_eq!(status, CollectorStatus::Ok);
    let rss = get(&samples, RESIDENT_MEMORY_METRIC, pid, None);
    assert_eq!(rss, vm_rss as f64);
    assert!(
        rss >= 64.0 * MIB,
        "RSS {rss} below the 64 MiB the child touched"
    );
    assert_eq!(
        get(&samples, VIRTUAL_MEMORY_METRIC, pid, None),
        vsize as f64
    );

    let ticks = clock_ticks_per_second();
    assert_eq!(
        get(&samples, CPU_METRIC, pid, Some(("mode", "user"))),
        utime as f64 / ticks
    );
    assert_eq!(
        get(&samples, CPU_METRIC, pid, Some(("mode", "system"))),
        stime as f64 / ticks
    );
    // The child measured 300 ms of its own CPU time; stat rounds to whole ticks.
    let cpu = cpu_seconds(&samples, pid);
    assert!(cpu >= 0.3 - 1.0 / ticks, "CPU {cpu} s after burning 300 ms");
}

#[test]
fn threads_descriptors_and_their_limit_match_what_the_child_created() {
    let mut workload = Workload::spawn();
    let pid = workload.pid();
    let (before, _) = collect_once(&tracking(&[&workload]));
    assert_eq!(get(&before, THREADS_METRIC, pid, None), 1.0);
    let fds_before = workload.listed_fds();
    assert_eq!(get(&before, OPEN_FDS_METRIC, pid, None), fds_before as f64);

    workload.run("threads 3").run("files 10").run("nofile 200");
    let (after, status) = collect_once(&tracking(&[&workload]));
    assert_eq!(status, CollectorStatus::Ok);
    assert_eq!(get(&after, THREADS_METRIC, pid, None), 4.0);
    assert_eq!(
        get(&after, OPEN_FDS_METRIC, pid, None),
        (fds_before + 10) as f64
    );
    assert_eq!(workload.listed_fds(), fds_before + 10);
    assert_eq!(get(&after, MAX_FDS_METRIC, pid, None), 200.0);
}

#[test]
fn counters_agree_with_status_and_io_read_right_after() {
    let mut workload = Workload::spawn();
    workload.run("alloc 8");
    let pid = workload.pid();
    let (samples, _) = collect_once(&tracking(&[&workload]));
    let status = proc_file(pid, "status");
    let io = proc_file(pid, "io");
    let field = |text: &str, key: &str| -> f64 {
        text.lines()
            .find_map(|line| line.strip_prefix(key))
            .unwrap_or_else(|| panic!("no {key}"))
            .trim()
            .parse()
            .unwrap()
    };

    let switches = |kind| get(&samples, CONTEXT_SWITCHES_METRIC, pid, Some(("kind", kind)));
    assert_eq!(
        switches("voluntary"),
        field(&status, "voluntary_ctxt_switches:")
    );
    assert_eq!(
        switches("involuntary"),
        field(&status, "nonvoluntary_ctxt_switches:")
    );
    assert_eq!(
        get(&samples, READ_BYTES_METRIC, pid, None),
        field(&io, "read_bytes:")
    );
    assert_eq!(
        get(&samples, WRITTEN_BYTES_METRIC, pid, None),
        field(&io, "write_bytes:")
    );
    let faults = |kind| get(&samples, PAGE_FAULTS_METRIC, pid, Some(("kind", kind)));
    assert_eq!(faults("minor"), workload.stat_number(10) as f64);
    assert_eq!(faults("major"), workload.stat_number(12) as f64);
    // Touching 8 MiB page by page faulted at least once per 2 MiB (once per page without
    // transparent huge pages).
    assert!(faults("minor") >= 4.0, "{} minor faults", faults("minor"));
}

#[test]
fn start_time_is_boot_time_plus_start_ticks_and_close_to_the_spawn() {
    let spawned = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    let workload = Workload::spawn();
    let pid = workload.pid();
    let (samples, _) = collect_once(&tracking(&[&workload]));

    let boot_time: f64 = std::fs::read_to_string("/proc/stat")
        .unwrap()
        .lines()
        .find_map(|line| line.strip_prefix("btime "))
        .unwrap()
        .parse()
        .unwrap();
    let start = get(&samples, START_TIME_METRIC, pid, None);
    assert_eq!(
        start,
        boot_time + workload.stat_number(22) as f64 / clock_ticks_per_second()
    );
    // btime is whole seconds, so the start time is within a second or so of the spawn.
    assert!(
        (start - spawned).abs() < 2.0,
        "start {start}, spawned {spawned}"
    );
}

/// The `vigil_process_state` values for `pid`, by state.
fn states(samples: &[Sample], pid: u32) -> BTreeMap<String, f64> {
    samples
        .iter()
        .filter(|s| s.name == STATE_METRIC && s.labels["pid"] == pid.to_string())
        .map(|s| (s.labels["state"].clone(), value_of(s)))
        .collect()
}

fn state_map(current: &str) -> BTreeMap<String, f64> {
    [
        "running",
        "sleeping",
        "disk_sleep",
        "stopped",
        "zombie",
        "other",
    ]
    .into_iter()
    .map(|state| (state.to_owned(), if state == current { 1.0 } else { 0.0 }))
    .collect()
}

#[test]
fn state_is_one_for_the_current_state_and_zero_for_the_other_five() {
    let workload = Workload::spawn();
    let pid = workload.pid();
    let (waiting, _) = collect_once(&tracking(&[&workload]));
    assert_eq!(states(&waiting, pid), state_map("sleeping"));

    // SAFETY: signals our own child.
    assert_eq!(unsafe { libc::kill(pid as i32, libc::SIGSTOP) }, 0);
    for _ in 0..1000 {
        if workload.stat_field(3) == "T" {
            break;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    let (stopped, _) = collect_once(&tracking(&[&workload]));
    // SAFETY: as above.
    assert_eq!(unsafe { libc::kill(pid as i32, libc::SIGCONT) }, 0);
    assert_eq!(states(&stopped, pid), state_map("stopped"));
}

/// `(metric, extra label)` pairs every process reports, except the start time (not summed).
const SUMMED: [(&str, Option<(&str, &str)>); 13] = [
    (CPU_METRIC, Some(("mode", "user"))),
    (CPU_METRIC, Some(("mode", "system"))),
    (RESIDENT_MEMORY_METRIC, None),
    (VIRTUAL_MEMORY_METRIC, None),
    (THREADS_METRIC, None),
    (OPEN_FDS_METRIC, None),
    (MAX_FDS_METRIC, None),
    (READ_BYTES_METRIC, None),
    (WRITTEN_BYTES_METRIC, None),
    (CONTEXT_SWITCHES_METRIC, Some(("kind", "voluntary"))),
    (CONTEXT_SWITCHES_METRIC, Some(("kind", "involuntary"))),
    (PAGE_FAULTS_METRIC, Some(("kind", "major"))),
    (PAGE_FAULTS_METRIC, Some(("kind", "minor"))),
];

fn other_series<'a>(
    samples: &'a [Sample],
    name: &str,
    extra: Option<(&str, &str)>,
) -> Vec<&'a Sample> {
    samples
        .iter()
        .filter(|s| {
            s.name == name
                && s.labels.get("server").map(String::as_str) == Some("other")
                && extra
                    .is_none_or(|(key, value)| s.labels.get(key).map(String::as_str) == Some(value))
        })
        .collect()
}

#[test]
fn folded_processes_sum_into_one_other_series_per_metric() {
    let mut workloads: Vec<Workload> = (0..3).map(|_| Workload::spawn()).collect();
    for (i, workload) in workloads.iter_mut().enumerate() {
        workload
            .run(&format!("alloc {}", 8 * (i + 1)))
            .run(&format!("threads {i}"))
            .run(&format!("files {}", 2 * i))
            .run("burn 30");
    }
    let [kept, folded_a, folded_b] = [&workloads[0], &workloads[1], &workloads[2]];

    // Every process on its own, then the same processes with two of them over the budget.
    let (own, _) = collect_once(&tracking(&[kept, folded_a, folded_b]));
    let budgeted = PassSelection {
        tracked: vec![kept.identity("test")],
        folded: vec![folded_a.identity("test"), folded_b.identity("test")],
    };
    let (samples, status) = collect_once(&budgeted);
    assert_eq!(status, CollectorStatus::Ok);

    for (name, extra) in SUMMED {
        let series = other_series(&samples, name, extra);
        assert_eq!(series.len(), 1, "{name} {extra:?}: {series:#?}");
        let expected =
            get(&own, name, folded_a.pid(), extra) + get(&own, name, folded_b.pid(), extra);
        let summed = value_of(series[0]);
        assert!(
            (summed - expected).abs() <= expected.abs() * 1e-12,
            "{name} {extra:?}: other = {summed}, sum of the folded processes = {expected}"
        );
        // The one within the budget keeps its own series, unchanged.
        assert_eq!(
            find(&samples, name, kept.pid(), extra),
            find(&own, name, kept.pid(), extra)
        );
        // Labels stay bounded: the sum carries no pid or comm.
        assert_eq!(series[0].labels.get("pid"), None);
        assert_eq!(series[0].labels.get("comm"), None);
    }
    let other_states: BTreeMap<String, f64> = other_series(&samples, STATE_METRIC, None)
        .iter()
        .map(|s| (s.labels["state"].clone(), value_of(s)))
        .collect();
    let mut two_sleeping = state_map("none");
    two_sleeping.insert("sleeping".into(), 2.0);
    assert_eq!(other_states, two_sleeping);
    assert_eq!(other_series(&samples, START_TIME_METRIC, None).len(), 0);

    let folded_count: Vec<f64> = samples
        .iter()
        .filter(|s| s.name == FOLDED_PROCESSES_METRIC)
        .map(value_of)
        .collect();
    assert_eq!(folded_count, [2.0]);
    for folded in [folded_a, folded_b] {
        let pid = folded.pid().to_string();
        assert!(
            samples.iter().all(|s| s.labels.get("pid") != Some(&pid)),
            "folded pid {pid} has series of its own"
        );
    }
}

fn only_the_folded_count(samples: &[Sample], count: f64) {
    assert_eq!(samples.len(), 1, "{samples:#?}");
    assert_eq!(samples[0].name, FOLDED_PROCESSES_METRIC);
    assert_eq!(value_of(&samples[0]), count);
}

#[test]
fn a_process_that_exited_before_the_pass_produces_no_samples_and_no_error() {
    let gone_tracked = Workload::spawn();
    let gone_folded = Workload::spawn();
    let selection = PassSelection {
        tracked: vec![gone_tracked.identity("test")],
        folded: vec![gone_folded.identity("test")],
    };
    gone_tracked.exit();
    gone_folded.exit();

    let (samples, status) = collect_once(&selection);
    assert_eq!(status, CollectorStatus::Ok);
    only_the_folded_count(&samples, 0.0);
}

#[test]
fn a_tracked_process_that_exits_between_passes_disappears_without_an_error() {
    let workload = Workload::spawn();
    let pid = workload.pid();
    let selection = tracking(&[&workload]);
    let mut collector = ProcessCollector::new();
    collector.collect(&selection);
    assert!(find(&collector.samples(), THREADS_METRIC, pid, None).is_some());

    workload.exit();
    // The same selection (the scan has not noticed yet); the collector still holds the
    // process's /proc directory from the first pass.
    collector.collect(&selection);
    assert_eq!(collector.status(), CollectorStatus::Ok);
    only_the_folded_count(&collector.samples(), 0.0);
}

#[test]
fn a_pid_reused_by_another_process_is_not_reported_as_the_selected_one() {
    let workload = Workload::spawn();
    let mut selected = workload.identity("test");
    // As if the selected process had exited and this one had been given its pid.
    selected.start_time_ticks -= 1;
    let (samples, status) = collect_once(&PassSelection {
        tracked: vec![selected],
        folded: Vec::new(),
    });
    assert_eq!(status, CollectorStatus::Ok);
    only_the_folded_count(&samples, 0.0);
}

#[test]
fn files_the_agent_may_not_read_drop_only_their_metrics_and_degrade_the_status() {
    // SAFETY: geteuid has no preconditions.
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "this test needs root: it reads a root-owned child as an unprivileged user"
    );
    let workload = Workload::spawn();
    let pid = workload.pid();
    let selection = tracking(&[&workload]);

    // Credentials are per thread in the kernel: this thread alone becomes `nobody` (raw
    // syscalls, as glibc's wrappers would change every thread). Without ptrace rights over the
    // child, /proc/PID/io and /proc/PID/fd are closed to it; stat, status and limits are not.
    let (samples, status) = std::thread::spawn(move || {
        // SAFETY: changes only this thread's credentials; the thread ends right after.
        unsafe {
            assert_eq!(libc::syscall(libc::SYS_setresgid, 65534, 65534, 65534), 0);
            assert_eq!(libc::syscall(libc::SYS_setresuid, 65534, 65534, 65534), 0);
        }
        assert!(std::fs::read(format!("/proc/{pid}/io")).is_err());
        let mut collector = ProcessCollector::new();
        collector.collect(&selection);
        (collector.samples(), collector.status())
    })
    .join()
    .unwrap();

    for missing in [READ_BYTES_METRIC, WRITTEN_BYTES_METRIC, OPEN_FDS_METRIC] {
        assert_eq!(find(&samples, missing, pid, None), None, "{missing}");
    }
    assert_eq!(get(&samples, THREADS_METRIC, pid, None), 1.0);
    assert_eq!(
        get(&samples, MAX_FDS_METRIC, pid, None),
        workload_soft_nofile(pid)
    );
    assert!(get(&samples, RESIDENT_MEMORY_METRIC, pid, None) > 0.0);
    assert!(find(&samples, CPU_METRIC, pid, Some(("mode", "user"))).is_some());
    let CollectorStatus::Degraded(reason) = status else {
        panic!("expected a degraded status, got {status:?}");
    };
    assert_eq!(
        reason,
        format!(
            "cannot read /proc/{pid}/io of process-workloa (pid {pid}): permission denied; \
             vigil_process_read_bytes_total and vigil_process_written_bytes_total missing for it \
             (run the agent as root, or give it CAP_SYS_PTRACE and CAP_DAC_READ_SEARCH); \
             cannot read /proc/{pid}/fd of process-workloa (pid {pid}): permission denied; \
             vigil_process_open_fds missing for it \
             (run the agent as root, or give it CAP_SYS_PTRACE and CAP_DAC_READ_SEARCH)"
        )
    );
}

fn workload_soft_nofile(pid: u32) -> f64 {
    proc_file(pid, "limits")
        .lines()
        .find_map(|line| line.strip_prefix("Max open files"))
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .parse()
        .unwrap()
}

fn scanned(workloads: &[Workload]) -> Vec<ModelServerProcess> {
    workloads.iter().map(|w| w.identity("test")).collect()
}

fn sorted_pids(workloads: &[&Workload]) -> Vec<u32> {
    let mut pids: Vec<u32> = workloads.iter().map(|w| w.pid()).collect();
    pids.sort();
    pids
}

fn pids(list: &[ModelServerProcess]) -> Vec<u32> {
    list.iter().map(|p| p.pid).collect()
}

#[test]
fn over_the_budget_the_process_busiest_since_the_last_pass_is_tracked() {
    let mut workloads: Vec<Workload> = (0..3).map(|_| Workload::spawn()).collect();
    let mut budget = ProcessBudget::with_max_tracked(1);
    let no_gpu = Default::default();

    workloads[1].run("burn 200");
    let first = budget.apply(scanned(&workloads), &no_gpu);
    assert_eq!(pids(&first.tracked), [workloads[1].pid()]);
    assert_eq!(
        pids(&first.folded),
        sorted_pids(&[&workloads[0], &workloads[2]])
    );

    // Workload 1 has more CPU time in all, but workload 2 used more since the first pass.
    workloads[2].run("burn 100");
    let second = budget.apply(scanned(&workloads), &no_gpu);
    assert_eq!(pids(&second.tracked), [workloads[2].pid()]);
    assert_eq!(
        pids(&second.folded),
        sorted_pids(&[&workloads[0], &workloads[1]])
    );
}
