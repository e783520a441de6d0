//! Reads what selection needs about every process from a proc filesystem.
//!
//! Each process is read through a descriptor for its `/proc/PID` directory (procfs's
//! `Process`): once that process exits, reads fail instead of silently returning a
//! new process that reused the PID, so stat, cmdline and exe always describe the same
//! process. stat is parsed here rather than with procfs's parser, which needs all 52
//! fields and can panic on a truncated line; we need only comm, state, flags and
//! start time.

use std::io::Read;
use std::path::Path;

use procfs::ProcError;
use procfs::process::Process;

use super::ProcessIdentity;

/// Set in stat's flags for kernel threads (`PF_KTHREAD`, include/linux/sched.h).
const PF_KTHREAD: u64 = 0x0020_0000;

/// One live user-space process.
pub(super) struct ProcessSnapshot {
    pub start_time_ticks: u64,
    pub identity: ProcessIdentity,
}

/// The numeric entries of `proc_root`: every pid, without opening anything per process.
pub(super) fn list_pids(proc_root: &Path) -> Vec<u32> {
    match std::fs::read_dir(proc_root) {
        Ok(entries) => entries
            .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse().ok())
            .collect(),
        Err(error) => {
            tracing::warn!(proc_root = %proc_root.display(), %error, "cannot list processes");
            Vec::new()
        }
    }
}

/// What one read of `/proc/PID/stat` tells the scan: enough to see that a known process is
/// still the same one (start time) running the same program (comm changes on exec and
/// with setproctitle).
pub(super) struct StatSummary {
    pub comm: String,
    pub start_time_ticks: u64,
    /// Kernel thread or zombie: never a model server.
    pub ignored: bool,
}

/// Reads `/proc/PID/stat` into `buffer` with one `read`; `None` when the process is gone or
/// the line does not parse.
pub(super) fn read_stat(proc_root: &Path, pid: u32, buffer: &mut Vec<u8>) -> Option<StatSummary> {
    let mut file = std::fs::File::open(proc_root.join(pid.to_string()).join("stat")).ok()?;
    buffer.clear();
    file.read_to_end(buffer).ok()?;
    let stat = parse_stat(std::str::from_utf8(buffer).ok()?)?;
    Some(StatSummary {
        ignored: stat.flags & PF_KTHREAD != 0 || matches!(stat.state, 'Z' | 'X'),
        comm: stat.comm,
        start_time_ticks: stat.start_time_ticks,
    })
}

/// Everything selection needs about one process (stat, cmdline, exe), read through one
/// descriptor of its `/proc/PID` directory.
pub(super) fn read_process_by_pid(proc_root: &Path, pid: u32) -> Option<ProcessSnapshot> {
    let process = Process::new_with_root(proc_root.join(pid.to_string()))
        .map_err(|error| log_skipped(Some(pid), &error))
        .ok()?;
    read_process(&process, pid)
        .map_err(|error| log_skipped(Some(pid), &error))
        .ok()
        .flatten()
}

/// `Ok(None)` for kernel threads, zombies and unparsable stat files.
fn read_process(process: &Process, pid: u32) -> Result<Option<ProcessSnapshot>, ProcError> {
    let stat = read_bytes(process, "stat")?;
    let Some(stat) = parse_stat(&String::from_utf8_lossy(&stat)) else {
        tracing::debug!(pid, "skipping process with unparsable stat");
        return Ok(None);
    };
    // A zombie has no cmdline or exe left and no syscalls to trace.
    if stat.flags & PF_KTHREAD != 0 || matches!(stat.state, 'Z' | 'X') {
        return Ok(None);
    }
    let cmdline = parse_cmdline(&read_bytes(process, "cmdline")?);
    let exe = match process.exe() {
        Ok(path) => Some(exe_path(&path.to_string_lossy())),
        Err(error) => {
            tracing::trace!(pid, %error, "exe unreadable");
            None
        }
    };
    Ok(Some(ProcessSnapshot {
        start_time_ticks: stat.start_time_ticks,
        identity: ProcessIdentity {
            comm: stat.comm,
            exe,
            cmdline,
        },
    }))
}

fn log_skipped(pid: Option<u32>, error: &ProcError) {
    match error {
        // Exited between listing /proc and reading it: routine.
        ProcError::NotFound(_) => tracing::trace!(pid, %error, "process vanished during scan"),
        _ => tracing::debug!(pid, %error, "skipping unreadable process"),
    }
}

fn read_bytes(process: &Process, file: &str) -> Result<Vec<u8>, ProcError> {
    let mut bytes = Vec::new();
    process.open_relative(file)?.read_to_end(&mut bytes)?;
    Ok(bytes)
}

/// The fields of `/proc/PID/stat` that selection uses.
#[derive(Debug, PartialEq, Eq)]
struct Stat {
    comm: String,
    state: char,
    flags: u64,
    start_time_ticks: u64,
}

/// Parses `/proc/PID/stat`. comm (field 2) may itself contain spaces and
/// parentheses, so it runs from the first `(` to the *last* `)`.
fn parse_stat(text: &str) -> Option<Stat> {
    let open = text.find('(')?;
    let close = text.rfind(')')?;
    let comm = text.get(open + 1..close)?.to_owned();
    // Fields after comm, starting at field 3 (state).
    let mut fields = text[close + 1..].split_ascii_whitespace();
    let state = fields.next()?.chars().next()?;
    let flags = fields.nth(9 - 4)?.parse().ok()?;
    let start_time_ticks = fields.nth(22 - 10)?.parse().ok()?;
    Some(Stat {
        comm,
        state,
        flags,
        start_time_ticks,
    })
}

/// Splits `/proc/PID/cmdline` at NULs. Trailing empty pieces are dropped: the final
/// terminator, and the NUL padding setproctitle leaves after a shortened title.
fn parse_cmdline(bytes: &[u8]) -> Vec<String> {
    let mut args: Vec<String> = bytes
        .split(|&byte| byte == 0)
        .map(|arg| String::from_utf8_lossy(arg).into_owned())
        .collect();
    while args.last().is_some_and(String::is_empty) {
        args.pop();
    }
    args
}

/// The kernel appends " (deleted)" to exe when the binary was replaced on disk (an
/// upgrade under a running server); the process still runs that program.
fn exe_path(link: &str) -> String {
    link.strip_suffix(" (deleted)").unwrap_or(link).to_owned()
}

#[cfg(test)]
mod tests {
    use std::fs;
    use std::os::unix::fs::symlink;
    use std::process::{Child, Command};

    use super::super::{ModelServerProcess, ProcessSelector, RuleConfig, SelectionConfig};
    use super::*;

    /// Fake pids start at the kernel's PID_MAX_LIMIT (2^22), one past the largest pid
    /// Linux hands out, so none can equal the test process's own pid, which every scan
    /// drops.
    const PID: u32 = 4_194_304;

    /// A stat line as the kernel writes it, with the fields selection reads filled in.
    fn stat_line(pid: u32, comm: &str, state: char, flags: u64, start_time: u64) -> String {
        format!(
            "{pid} ({comm}) {state} 1 {pid} {pid} 0 -1 {flags} 2405 0 12 0 130 41 0 0 20 0 \
             24 0 {start_time} 9061220352 412345 18446744073709551615 1 1 0 0 0 0 0 16781312 \
             17922 0 0 0 17 3 0 0 0 0 0 0 0 0 0 0 0 0 0"
        )
    }

    struct FakeProc {
        root: tempfile::TempDir,
    }

    impl FakeProc {
        fn new() -> Self {
            Self {
                root: tempfile::tempdir().unwrap(),
            }
        }

        fn path(&self) -> &Path {
            self.root.path()
        }

        /// A process directory with stat, comm, cmdline and (if given) an exe link.
        fn add(&self, pid: u32, comm: &str, start_time: u64, cmdline: &[&str], exe: Option<&str>) {
            self.add_raw(
                pid,
                stat_line(pid, comm, 'S', 0x0040_0100, start_time),
                cmdline,
                exe,
            );
        }

        /// Replaces a process directory, as exec or pid reuse would.
        fn replace(
            &self,
            pid: u32,
            comm: &str,
            start_time: u64,
            cmdline: &[&str],
            exe: Option<&str>,
        ) {
            fs::remove_dir_all(self.path().join(pid.to_string())).unwrap();
            self.add(pid, comm, start_time, cmdline, exe);
        }

        fn add_raw(&self, pid: u32, stat: String, cmdline: &[&str], exe: Option<&str>) {
            let dir = self.path().join(pid.to_string());
            fs::create_dir(&dir).unwrap();
            let comm = parse_stat(&stat).map(|s| s.comm).unwrap_or_default();
            fs::write(dir.join("stat"), stat + "\n").unwrap();
            fs::write(dir.join("comm"), comm + "\n").unwrap();
            let mut raw = Vec::new();
            for arg in cmdline {
                raw.extend_from_slice(arg.as_bytes());
                raw.push(0);
            }
            fs::write(dir.join("cmdline"), raw).unwrap();
            if let Some(exe) = exe {
                // Dangling is fine: like /proc/PID/exe, only the link text is read.
                symlink(exe, dir.join("exe")).unwrap();
            }
        }
    }

    fn selector(rules: &[(&str, &str)], track: &[&str]) -> ProcessSelector {
        let config = SelectionConfig {
            builtin_rules: true,
            rules: rules
                .iter()
                .map(|(server, pattern)| RuleConfig {
                    server: (*server).to_owned(),
                    pattern: (*pattern).to_owned(),
                })
                .collect(),
            ..SelectionConfig::default()
        };
        let track: Vec<String> = track.iter().map(|t| (*t).to_owned()).collect();
        ProcessSelector::new(&config, &track).unwrap()
    }

    fn found(pid: u32, start_time_ticks: u64, comm: &str, server: &str) -> ModelServerProcess {
        ModelServerProcess {
            pid,
            start_time_ticks,
            comm: comm.to_owned(),
            server: server.to_owned(),
        }
    }

    #[test]
    fn stat_comm_runs_to_the_last_closing_parenthesis() {
        let stat = parse_stat(&stat_line(42, "rank) S 7 (v2", 'R', 0x0040_0000, 987_654)).unwrap();
        assert_eq!(
            stat,
            Stat {
                comm: "rank) S 7 (v2".to_owned(),
                state: 'R',
                flags: 0x0040_0000,
                start_time_ticks: 987_654,
            }
        );
    }

    #[test]
    fn truncated_or_garbled_stat_is_rejected_not_misread() {
        assert_eq!(parse_stat("42 (tritonserver)"), None);
        assert_eq!(
            parse_stat("42 (tritonserver) S 1 42 42 0 -1 4194560 0"),
            None
        );
        assert_eq!(parse_stat("42 tritonserver S 1"), None);
        assert_eq!(parse_stat(") 42 ("), None);
    }

    #[test]
    fn cmdline_splits_at_nuls_and_drops_trailing_padding() {
        assert_eq!(
            parse_cmdline(b"python3\0-m\0vllm.entrypoints.api_server\0"),
            ["python3", "-m", "vllm.entrypoints.api_server"]
        );
        assert_eq!(
            parse_cmdline(b"VLLM::EngineCore\0\0\0\0"),
            ["VLLM::EngineCore"]
        );
        assert_eq!(parse_cmdline(b"prog\0\0--flag\0"), ["prog", "", "--flag"]);
        assert_eq!(parse_cmdline(b""), Vec::<String>::new());
    }

    #[test]
    fn scan_finds_model_servers_sorted_by_pid_with_start_times() {
        let proc = FakeProc::new();
        proc.add(
            PID + 30,
            "python3",
            5_000,
            &[
                "python3",
                "-m",
                "vllm.entrypoints.openai.api_server",
                "--port",
                "8000",
            ],
            Some("/usr/bin/python3.12"),
        );
        proc.add(
            PID + 10,
            "tritonserver",
            4_000,
            &["tritonserver", "--model-repository=/models"],
            Some("/opt/tritonserver/bin/tritonserver"),
        );
        proc.add(
            PID + 20,
            "bash",
            3_000,
            &["bash", "-c", "tail -f /var/log/tritonserver.log"],
            Some("/usr/bin/bash"),
        );
        assert_eq!(
            selector(&[], &[]).scan_proc_root(proc.path()),
            [
                found(PID + 10, 4_000, "tritonserver", "triton"),
                found(PID + 30, 5_000, "python3", "vllm"),
            ]
        );
    }

    #[test]
    fn scan_reads_comm_with_spaces_and_parentheses_from_stat() {
        let proc = FakeProc::new();
        proc.add(
            PID + 1,
            "rank) S 7 (v2",
            123_456,
            &["/opt/ranker/bin/ranker"],
            Some("/opt/ranker/bin/ranker"),
        );
        assert_eq!(
            selector(&[("ranker", r"^rank\) S 7 \(v2$")], &[]).scan_proc_root(proc.path()),
            [found(PID + 1, 123_456, "rank) S 7 (v2", "ranker")]
        );
    }

    #[test]
    fn scan_ignores_non_process_entries() {
        let proc = FakeProc::new();
        proc.add(PID + 1, "tritonserver", 100, &["tritonserver"], None);
        // Like the real /proc: `self` links to a process directory and must not
        // report it twice; `sys` and files are not processes.
        symlink((PID + 1).to_string(), proc.path().join("self")).unwrap();
        fs::create_dir(proc.path().join("sys")).unwrap();
        fs::create_dir(proc.path().join("4194399abc")).unwrap();
        fs::write(proc.path().join("uptime"), "350735.47 234388.90\n").unwrap();
        assert_eq!(
            selector(&[], &[]).scan_proc_root(proc.path()),
            [found(PID + 1, 100, "tritonserver", "triton")]
        );
    }

    #[test]
    fn scan_skips_process_dirs_missing_stat_or_cmdline_but_not_exe() {
        let proc = FakeProc::new();
        proc.add(PID + 1, "tritonserver", 100, &["tritonserver"], None);
        proc.add(PID + 2, "tritonserver", 200, &["tritonserver"], None);
        fs::remove_file(proc.path().join((PID + 2).to_string()).join("stat")).unwrap();
        proc.add(PID + 3, "tritonserver", 300, &["tritonserver"], None);
        fs::remove_file(proc.path().join((PID + 3).to_string()).join("cmdline")).unwrap();
        fs::create_dir(proc.path().join((PID + 4).to_string())).unwrap();
        assert_eq!(
            selector(&[], &[]).scan_proc_root(proc.path()),
            [found(PID + 1, 100, "tritonserver", "triton")]
        );
    }

    #[test]
    fn scan_strips_deleted_suffix_from_exe() {
        let proc = FakeProc::new();
        proc.add(
            PID + 1,
            "tf-serve",
            100,
            &["tf-serve", "--port=8500"],
            Some("/usr/bin/tensorflow_model_server (deleted)"),
        );
        assert_eq!(
            selector(&[], &[]).scan_proc_root(proc.path()),
            [found(PID + 1, 100, "tf-serve", "tf-serving")]
        );
    }

    #[test]
    fn scan_never_selects_kernel_threads_or_zombies() {
        let proc = FakeProc::new();
        let kernel_thread = stat_line(PID + 1, "kworker/3:1-events", 'I', 0x0420_8060, 10);
        proc.add_raw(PID + 1, kernel_thread, &[], None);
        let zombie = stat_line(PID + 2, "tritonserver", 'Z', 0x0040_4104, 20);
        proc.add_raw(PID + 2, zombie, &[], None);
        assert_eq!(
            selector(&[], &["kworker", "tritonserver"]).scan_proc_root(proc.path()),
            []
        );
    }

    #[test]
    fn scan_never_selects_the_scanning_process_itself() {
        let proc = FakeProc::new();
        let own_pid = std::process::id();
        proc.add(own_pid, "tritonserver", 100, &["tritonserver"], None);
        proc.add(PID + 1, "tritonserver", 200, &["tritonserver"], None);
        assert_eq!(
            selector(&[], &[]).scan_proc_root(proc.path()),
            [found(PID + 1, 200, "tritonserver", "triton")]
        );
    }

    #[test]
    fn scan_of_missing_proc_root_finds_nothing() {
        let proc = FakeProc::new();
        assert_eq!(
            selector(&[], &[]).scan_proc_root(&proc.path().join("absent")),
            []
        );
    }

    /// Kills the child even when an assertion fails.
    struct KillOnDrop(Child);

    impl Drop for KillOnDrop {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }

    #[test]
    fn scan_of_real_proc_finds_a_tracked_child_with_its_pid_and_start_time() {
        // A `sleep` started under a name no other process has; comm is the name it
        // was exec'd as, so the symlink's name.
        let dir = tempfile::tempdir().unwrap();
        let name = format!("vglsel{}", std::process::id());
        let program = dir.path().join(&name);
        symlink("/bin/sleep", &program).unwrap();
        // spawn returns only after the exec succeeded, so /proc already shows the new name.
        let child = KillOnDrop(Command::new(&program).arg("30").spawn().unwrap());
        let pid = child.0.id();

        // Field 22, read independently of the code under test.
        let stat = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
        let after_comm = &stat[stat.rfind(')').unwrap() + 1..];
        let start_time: u64 = after_comm
            .split_whitespace()
            .nth(19)
            .unwrap()
            .parse()
            .unwrap();

        let selected = selector(&[], &[&format!("^{name}$")]).scan();
        assert_eq!(selected, [found(pid, start_time, &name, &name)]);
    }

    #[test]
    fn a_process_that_execs_into_a_model_server_is_found_within_the_recheck_interval() {
        let proc = FakeProc::new();
        proc.add(
            PID,
            "bash",
            500,
            &["bash", "start.sh"],
            Some("/usr/bin/bash"),
        );
        let selector = selector(&[], &[]);
        assert!(selector.scan_proc_root(proc.path()).is_empty());
        // exec keeps pid and start time; comm, cmdline and exe change.
        let triton = "/opt/tritonserver/bin/tritonserver";
        proc.replace(PID, "tritonserver", 500, &[triton], Some(triton));
        let scans_until_found = (1..=super::super::RECHECK_EVERY)
            .find(|_| !selector.scan_proc_root(proc.path()).is_empty())
            .expect("found within RECHECK_EVERY scans");
        assert!(scans_until_found <= super::super::RECHECK_EVERY);
        assert_eq!(
            selector.scan_proc_root(proc.path()),
            vec![found(PID, 500, "tritonserver", "triton")]
        );
    }

    #[test]
    fn a_model_server_whose_pid_is_reused_is_dropped_on_the_next_scan() {
        let proc = FakeProc::new();
        let triton = "/opt/tritonserver/bin/tritonserver";
        proc.add(PID, "tritonserver", 500, &[triton], Some(triton));
        let selector = selector(&[], &[]);
        assert_eq!(selector.scan_proc_root(proc.path()).len(), 1);
        proc.replace(PID, "bash", 900, &["bash"], Some("/usr/bin/bash"));
        assert!(selector.scan_proc_root(proc.path()).is_empty());
    }

    #[test]
    fn a_model_server_that_becomes_a_zombie_is_dropped_on_the_next_scan() {
        let proc = FakeProc::new();
        let triton = "/opt/tritonserver/bin/tritonserver";
        proc.add(PID, "tritonserver", 500, &[triton], Some(triton));
        let selector = selector(&[], &[]);
        assert_eq!(selector.scan_proc_root(proc.path()).len(), 1);
        let zombie = stat_line(PID, "tritonserver", 'Z', 0x0040_0100, 500);
        fs::write(proc.path().join(PID.to_string()).join("stat"), zombie).unwrap();
        assert!(selector.scan_proc_root(proc.path()).is_empty());
    }

    #[test]
    fn a_known_model_server_is_not_read_in_full_again_while_unchanged() {
        let proc = FakeProc::new();
        let triton = "/opt/tritonserver/bin/tritonserver";
        proc.add(PID, "tritonserver", 500, &[triton], Some(triton));
        let selector = selector(&[], &[]);
        assert_eq!(selector.scan_proc_root(proc.path()).len(), 1);
        // Without its cmdline and exe a new process could not be classified; a known one
        // with the same start time and comm keeps its classification.
        let dir = proc.path().join(PID.to_string());
        fs::remove_file(dir.join("cmdline")).unwrap();
        fs::remove_file(dir.join("exe")).unwrap();
        assert_eq!(
            selector.scan_proc_root(proc.path()),
            vec![found(PID, 500, "tritonserver", "triton")]
        );
    }
}
