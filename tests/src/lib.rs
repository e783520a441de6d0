//! Test-only support for Vigil's end-to-end tests: the workloads the kernel tests drive (the
//! binaries in `src/bin/`) and the helpers that run them.

use std::{
    io::{BufRead, BufReader, Write},
    process::{Child, ChildStdin, ChildStdout, Command, Stdio},
    sync::{Mutex, MutexGuard},
};

/// Tests that attach probes to every syscall on the node run one at a time.
static KERNEL: Mutex<()> = Mutex::new(());

pub fn kernel_lock() -> MutexGuard<'static, ()> {
    KERNEL
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Fails the test when BPF is unavailable, unless skipping was asked for outside CI (so CI can
/// never pass without running the programs). Returns false when the test should skip.
pub fn require_bpf(reason: &str) -> bool {
    let in_ci = std::env::var("CI").is_ok_and(|v| v == "true");
    if !in_ci && std::env::var("VIGIL_SKIP_BPF_TESTS").is_ok_and(|v| v == "1") {
        eprintln!("SKIPPED (VIGIL_SKIP_BPF_TESTS=1): {reason}");
        return false;
    }
    panic!("eBPF programs could not be loaded and attached: {reason}");
}

/// A running `syscall-workload`, held at its start line until `go`.
pub struct Workload {
    child: Child,
    stdin: Option<ChildStdin>,
    stdout: BufReader<ChildStdout>,
}

impl Workload {
    /// Starts `syscall-workload` (pass `env!("CARGO_BIN_EXE_syscall-workload")`) and waits
    /// until it is parked on its start line.
    pub fn spawn(exe: &str, mode: &str, count: usize, millis: u64) -> Self {
        let mut child = Command::new(exe)
            .args([mode, &count.to_string(), &millis.to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn syscall-workload");
        let stdin = child.stdin.take();
        let mut stdout = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        stdout.read_line(&mut line).unwrap();
        assert_eq!(line.trim(), "ready");
        let workload = Self {
            child,
            stdin,
            stdout,
        };
        workload.wait_until_blocked();
        workload
    }

    /// Waits until the workload sleeps in its stdin read, so that read began before tracking
    /// and is not counted (it would be if tracking won the race to its `sys_enter`).
    fn wait_until_blocked(&self) {
        for _ in 0..500 {
            let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.pid())).unwrap();
            if stat[stat.rfind(')').unwrap() + 2..].starts_with('S') {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
        panic!("workload {} never blocked on stdin", self.pid());
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Field 22 of /proc/PID/stat: with the pid, what identifies the process.
    pub fn start_time_ticks(&self) -> u64 {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.pid())).unwrap();
        let after_comm = &stat[stat.rfind(')').unwrap() + 2..];
        after_comm.split(' ').nth(19).unwrap().parse().unwrap()
    }

    /// Lets the workload run and waits until it reports its own per-call latencies.
    pub fn run(&mut self) -> Vec<u64> {
        writeln!(self.stdin.as_mut().unwrap(), "go").unwrap();
        let mut line = String::new();
        self.stdout.read_line(&mut line).unwrap();
        let list = line.trim().strip_prefix("done ").expect("done line");
        list.split(',').map(|n| n.parse().unwrap()).collect()
    }

    /// Closes stdin and waits for the process to exit.
    pub fn finish(mut self) {
        drop(self.stdin.take());
        assert!(self.child.wait().unwrap().success());
    }
}
