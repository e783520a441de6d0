//! Reads one process's `/proc/PID/{stat,status,io,limits,fd}` into plain numbers.
//!
//! This runs every pass for every tracked process, so it keeps the work small: each file is
//! opened relative to a `/proc/PID` descriptor held across passes (procfs's `Process`), read with
//! one `read` into a reused buffer, and parsed for just the fields the metrics need, without
//! allocating. The open-fd count comes from the size the kernel reports for `/proc/PID/fd`
//! (Linux 6.2 and later) instead of listing the directory, which for a server with thousands of
//! sockets would cost far more than everything else here together.
//!
//! Holding the directory descriptor also pins the process: once it exits, reads through it fail
//! instead of describing whichever process reuses the pid.

use std::io::{self, Read};

use procfs::ProcError;
use procfs::process::Process;

/// The files read per process; also what a degraded status names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(super) enum ProcFile {
    /// `/proc/PID` itself.
    Directory,
    Stat,
    Status,
    Io,
    Limits,
    Fd,
}

impl ProcFile {
    pub(super) fn name(self) -> &'static str {
        match self {
            ProcFile::Directory => "",
            ProcFile::Stat => "stat",
            ProcFile::Status => "status",
            ProcFile::Io => "io",
            ProcFile::Limits => "limits",
            ProcFile::Fd => "fd",
        }
    }
}

/// Scheduler state of a process (of its main thread, which is what `/proc/PID/stat` shows),
/// reduced to a fixed set so the `state` label stays bounded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum ProcessState {
    Running,
    Sleeping,
    DiskSleep,
    Stopped,
    Zombie,
    Other,
}

impl ProcessState {
    pub(super) const ALL: [ProcessState; 6] = [
        ProcessState::Running,
        ProcessState::Sleeping,
        ProcessState::DiskSleep,
        ProcessState::Stopped,
        ProcessState::Zombie,
        ProcessState::Other,
    ];

    /// From the state letter of `/proc/PID/stat` (see `proc_pid_stat(5)`).
    pub(super) fn from_stat_letter(letter: u8) -> Self {
        match letter {
            b'R' => ProcessState::Running,
            // `I` (idle) is an uninterruptible wait that does not count towards load: a sleep.
            b'S' | b'I' => ProcessState::Sleeping,
            b'D' => ProcessState::DiskSleep,
            // `t` is stopped by a tracer (a debugger), `T` by a signal.
            b'T' | b't' => ProcessState::Stopped,
            b'Z' => ProcessState::Zombie,
            // `X` (dead), and letters older kernels used: `W` (paging/waking), `K`, `P`.
            _ => ProcessState::Other,
        }
    }

    pub(super) fn label(self) -> &'static str {
        match self {
            ProcessState::Running => "running",
            ProcessState::Sleeping => "sleeping",
            ProcessState::DiskSleep => "disk_sleep",
            ProcessState::Stopped => "stopped",
            ProcessState::Zombie => "zombie",
            ProcessState::Other => "other",
        }
    }
}

/// The fields of `/proc/PID/stat` the metrics use; counts are raw (clock ticks, bytes, pages).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct StatFields {
    pub state: ProcessState,
    pub minor_faults: u64,
    pub major_faults: u64,
    pub user_ticks: u64,
    pub system_ticks: u64,
    pub threads: u64,
    pub start_time_ticks: u64,
    pub virtual_bytes: u64,
}

/// Parses `/proc/PID/stat`. comm (field 2) may contain spaces and parentheses, so fields are
/// counted from the last `)`.
pub(super) fn parse_stat(text: &[u8]) -> Option<StatFields> {
    let close = text.iter().rposition(|&b| b == b')')?;
    let mut fields = text[close + 1..]
        .split(|&b| b == b' ' || b == b'\n')
        .filter(|field| !field.is_empty());
    // Field numbers as in proc_pid_stat(5); field 3 (state) is the first after comm.
    let state = ProcessState::from_stat_letter(*fields.next()?.first()?);
    let mut number = |skip: usize| -> Option<u64> { parse_u64(fields.nth(skip)?) };
    let minor_faults = number(10 - 4)?;
    let major_faults = number(12 - 11)?;
    let user_ticks = number(14 - 13)?;
    let system_ticks = number(0)?;
    let threads = number(20 - 16)?;
    let start_time_ticks = number(22 - 21)?;
    let virtual_bytes = number(0)?;
    Some(StatFields {
        state,
        minor_faults,
        major_faults,
        user_ticks,
        system_ticks,
        threads,
        start_time_ticks,
        virtual_bytes,
    })
}

/// The fields of `/proc/PID/status` the metrics use. A zombie has no memory lines left.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(super) struct StatusFields {
    pub resident_bytes: Option<u64>,
    pub voluntary_switches: Option<u64>,
    pub involuntary_switches: Option<u64>,
}

pub(super) fn parse_status(text: &[u8]) -> StatusFields {
    let mut fields = StatusFields::default();
    for line in text.split(|&b| b == b'\n') {
        if let Some(rest) = line.strip_prefix(b"VmRSS:") {
            fields.resident_bytes = parse_kib(rest);
        } else if let Some(rest) = line.strip_prefix(b"voluntary_ctxt_switches:") {
            fields.voluntary_switches = parse_u64(trim(rest));
        } else if let Some(rest) = line.strip_prefix(b"nonvoluntary_ctxt_switches:") {
            fields.involuntary_switches = parse_u64(trim(rest));
        }
    }
    fields
}

/// Bytes the process caused to be fetched from and sent to storage (`/proc/PID/io`
/// `read_bytes`/`write_bytes`; page-cache hits and `rchar`/`wchar` are not counted).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct IoFields {
    pub read_bytes: u64,
    pub written_bytes: u64,
}

pub(super) fn parse_io(text: &[u8]) -> Option<IoFields> {
    let (mut read_bytes, mut written_bytes) = (None, None);
    for line in text.split(|&b| b == b'\n') {
        if let Some(rest) = line.strip_prefix(b"read_bytes:") {
            read_bytes = parse_u64(trim(rest));
        } else if let Some(rest) = line.strip_prefix(b"write_bytes:") {
            written_bytes = parse_u64(trim(rest));
        }
    }
    Some(IoFields {
        read_bytes: read_bytes?,
        written_bytes: written_bytes?,
    })
}

/// The soft limit on open files from `/proc/PID/limits`; `None` when unlimited (Linux does not
/// allow that for open files) or missing.
pub(super) fn parse_max_open_files(text: &[u8]) -> Option<u64> {
    let line = text
        .split(|&b| b == b'\n')
        .find_map(|line| line.strip_prefix(b"Max open files"))?;
    let soft = line.split(|&b| b == b' ').find(|field| !field.is_empty())?;
    parse_u64(soft)
}

fn trim(bytes: &[u8]) -> &[u8] {
    bytes.trim_ascii()
}

fn parse_u64(digits: &[u8]) -> Option<u64> {
    if digits.is_empty() {
        return None;
    }
    digits.iter().try_fold(0u64, |value, &b| {
        if !b.is_ascii_digit() {
            return None;
        }
        value.checked_mul(10)?.checked_add(u64::from(b - b'0'))
    })
}

/// `  123456 kB` -> bytes.
fn parse_kib(text: &[u8]) -> Option<u64> {
    parse_u64(trim(text).strip_suffix(b" kB")?.trim_ascii())?.checked_mul(1024)
}

/// Everything read from one process in one pass. A file that could not be read leaves its
/// fields `None`; stat is required (without it there is no process to report).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct ProcessReading {
    pub stat: StatFields,
    pub status: Option<StatusFields>,
    pub io: Option<IoFields>,
    pub max_fds: Option<u64>,
    pub open_fds: Option<u64>,
}

/// Why a file could not be read.
#[derive(Debug)]
pub(super) enum ReadFailure {
    /// The process exited (or its pid now names another process): not a problem to report.
    Gone,
    /// Anything else: permission denied, an unexpected format. Reported in the status.
    Unreadable(ProcFile, String),
}

/// A process's open `/proc/PID` directory.
pub(super) struct ProcDir {
    process: Process,
    start_time_ticks: u64,
    /// The open-files limit as last read, and how many more passes reuse it.
    max_fds: Option<u64>,
    passes_until_limits: u32,
}

/// `limits` is read on the first pass and then every this many passes: limits rarely change
/// (`prlimit` on a running server), and the file costs as much to produce as `stat`.
pub(super) const LIMITS_EVERY_PASSES: u32 = 10;

/// The buffer files are read into, reused for every file of every process. Large enough for
/// stat, status, io and limits in one read each (status, the largest, is about 1.5 KiB).
pub(super) fn read_buffer() -> Vec<u8> {
    vec![0; 8192]
}

impl ProcDir {
    /// Opens `/proc/PID` for the process that started at `start_time_ticks`; every
    /// [`read_all`](Self::read_all) checks it is still that process.
    pub(super) fn open(
        proc_root: &std::path::Path,
        pid: u32,
        start_time_ticks: u64,
    ) -> Result<Self, ReadFailure> {
        let process = Process::new_with_root(proc_root.join(pid.to_string()))
            .map_err(|error| proc_failure(ProcFile::Directory, error))?;
        Ok(Self {
            process,
            start_time_ticks,
            max_fds: None,
            passes_until_limits: 0,
        })
    }

    pub(super) fn start_time_ticks(&self) -> u64 {
        self.start_time_ticks
    }

    /// Reads every file once (`limits` every [`LIMITS_EVERY_PASSES`] passes). `Gone` when the
    /// process exited or its pid names another process now. Problems with one file other than
    /// stat are passed to `failed` and leave only that file's fields unset.
    pub(super) fn read_all(
        &mut self,
        buffer: &mut Vec<u8>,
        mut failed: impl FnMut(ProcFile, String),
    ) -> Result<ProcessReading, ReadFailure> {
        let stat = parse_stat(self.read(ProcFile::Stat, buffer)?)
            .ok_or_else(|| ReadFailure::Unreadable(ProcFile::Stat, UNEXPECTED_FORMAT.into()))?;
        if stat.start_time_ticks != self.start_time_ticks {
            return Err(ReadFailure::Gone);
        }
        let status = optional(
            self.read(ProcFile::Status, buffer).map(parse_status),
            &mut failed,
        )?;
        let io = optional(
            self.read(ProcFile::Io, buffer).and_then(|text| {
                parse_io(text)
                    .ok_or_else(|| ReadFailure::Unreadable(ProcFile::Io, UNEXPECTED_FORMAT.into()))
            }),
            &mut failed,
        )?;
        if self.passes_until_limits == 0 {
            let limits = self
                .read(ProcFile::Limits, buffer)
                .map(parse_max_open_files);
            self.max_fds = optional(limits, &mut failed)?.flatten();
            // An unreadable limit is tried again next pass.
            if self.max_fds.is_some() {
                self.passes_until_limits = LIMITS_EVERY_PASSES;
            }
        }
        self.passes_until_limits = self.passes_until_limits.saturating_sub(1);
        let open_fds = optional(self.count_fds(), &mut failed)?;
        Ok(ProcessReading {
            stat,
            status,
            io,
            max_fds: self.max_fds,
            open_fds,
        })
    }

    /// Reads a whole file into the buffer.
    fn read<'b>(&self, file: ProcFile, buffer: &'b mut Vec<u8>) -> Result<&'b [u8], ReadFailure> {
        let mut handle = self
            .process
            .open_relative(file.name())
            .map_err(|error| proc_failure(file, error))?;
        let mut filled = 0;
        loop {
            if filled == buffer.len() {
                buffer.resize((buffer.len() * 2).max(4096), 0);
            }
            let n = handle
                .read(&mut buffer[filled..])
                .map_err(|error| io_failure(file, &error))?;
            filled += n;
            // These are single-record seq files: a read shorter than asked for reached the end,
            // which saves the extra `read` that would return 0.
            if n == 0 || filled < buffer.len() {
                return Ok(&buffer[..filled]);
            }
        }
    }

    /// Open descriptors: the size the kernel reports for `/proc/PID/fd` (Linux 6.2+), else a
    /// directory listing.
    fn count_fds(&self) -> Result<u64, ReadFailure> {
        let dir = self
            .process
            .open_relative(ProcFile::Fd.name())
            .map_err(|error| proc_failure(ProcFile::Fd, error))?;
        let size = dir
            .metadata()
            .map_err(|error| io_failure(ProcFile::Fd, &error))?
            .len();
        if size > 0 {
            return Ok(size);
        }
        // Older kernels report 0; so does a process with no descriptors, which lists quickly.
        self.process
            .fd_count()
            .map(|count| count as u64)
            .map_err(|error| proc_failure(ProcFile::Fd, error))
    }
}

const UNEXPECTED_FORMAT: &str = "unexpected format";

/// A file's fields, or `None` after reporting why the file could not be read; the process
/// being gone ends the whole reading.
fn optional<T>(
    result: Result<T, ReadFailure>,
    failed: &mut impl FnMut(ProcFile, String),
) -> Result<Option<T>, ReadFailure> {
    match result {
        Ok(value) => Ok(Some(value)),
        Err(ReadFailure::Gone) => Err(ReadFailure::Gone),
        Err(ReadFailure::Unreadable(file, why)) => {
            failed(file, why);
            Ok(None)
        }
    }
}

fn proc_failure(file: ProcFile, error: ProcError) -> ReadFailure {
    match error {
        ProcError::NotFound(_) => ReadFailure::Gone,
        ProcError::PermissionDenied(_) => ReadFailure::Unreadable(file, "permission denied".into()),
        ProcError::Io(error, _) => io_failure(file, &error),
        other => ReadFailure::Unreadable(file, other.to_string()),
    }
}

fn io_failure(file: ProcFile, error: &io::Error) -> ReadFailure {
    match error.raw_os_error() {
        Some(libc::ESRCH | libc::ENOENT) => ReadFailure::Gone,
        Some(libc::EACCES | libc::EPERM) => {
            ReadFailure::Unreadable(file, "permission denied".into())
        }
        _ => ReadFailure::Unreadable(file, error.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A stat line as Linux 6.x writes it (52 fields), with distinct numbers in the fields
    /// the metrics use: minflt 2405, majflt 12, utime 130, stime 41, threads 24,
    /// starttime 987654, vsize 9061220352.
    fn stat_line(comm: &str, state: char) -> String {
        format!(
            "4242 ({comm}) {state} 1 4242 4242 0 -1 4194560 2405 0 12 0 130 41 0 0 20 0 24 0 \
             987654 9061220352 412345 18446744073709551615 1 1 0 0 0 0 0 16781312 17922 0 0 0 \
             17 3 0 0 0 0 0 0 0 0 0 0 0 0 0\n"
        )
    }

    #[test]
    fn stat_fields_are_counted_from_the_last_parenthesis_of_comm() {
        assert_eq!(
            parse_stat(stat_line("rank) S 7 (v2", 'R').as_bytes()),
            Some(StatFields {
                state: ProcessState::Running,
                minor_faults: 2405,
                major_faults: 12,
                user_ticks: 130,
                system_ticks: 41,
                threads: 24,
                start_time_ticks: 987_654,
                virtual_bytes: 9_061_220_352,
            })
        );
    }

    #[test]
    fn truncated_or_garbled_stat_is_rejected() {
        assert_eq!(
            parse_stat(b"4242 (tritonserver) S 1 4242 4242 0 -1 4194560"),
            None
        );
        assert_eq!(parse_stat(b"4242 tritonserver S 1"), None);
        let garbled = stat_line("tritonserver", 'S').replace(" 130 ", " 1x0 ");
        assert_eq!(parse_stat(garbled.as_bytes()), None);
    }

    #[test]
    fn every_stat_state_letter_maps_to_one_bounded_state() {
        let cases = [
            ('R', "running"),
            ('S', "sleeping"),
            ('I', "sleeping"),
            ('D', "disk_sleep"),
            ('T', "stopped"),
            ('t', "stopped"),
            ('Z', "zombie"),
            ('X', "other"),
            ('W', "other"),
            ('P', "other"),
        ];
        for (letter, label) in cases {
            let stat = parse_stat(stat_line("vllm", letter).as_bytes()).unwrap();
            assert_eq!(stat.state.label(), label, "state letter {letter}");
        }
        let labels: Vec<&str> = ProcessState::ALL.iter().map(|s| s.label()).collect();
        assert_eq!(
            labels,
            [
                "running",
                "sleeping",
                "disk_sleep",
                "stopped",
                "zombie",
                "other"
            ]
        );
    }

    const STATUS: &str = "Name:\ttritonserver\nUmask:\t0022\nState:\tS (sleeping)\n\
        Tgid:\t4242\nPid:\t4242\nVmPeak:\t 9061220 kB\nVmSize:\t 8848848 kB\n\
        VmHWM:\t 1650000 kB\nVmRSS:\t 1649380 kB\nRssAnon:\t 1500000 kB\nThreads:\t24\n\
        voluntary_ctxt_switches:\t98765\nnonvoluntary_ctxt_switches:\t4321\n";

    #[test]
    fn status_gives_resident_bytes_and_context_switches() {
        assert_eq!(
            parse_status(STATUS.as_bytes()),
            StatusFields {
                resident_bytes: Some(1_649_380 * 1024),
                voluntary_switches: Some(98_765),
                involuntary_switches: Some(4_321),
            }
        );
    }

    #[test]
    fn a_zombie_status_has_switches_but_no_resident_memory() {
        let zombie = "Name:\tvllm\nState:\tZ (zombie)\nThreads:\t1\n\
            voluntary_ctxt_switches:\t5\nnonvoluntary_ctxt_switches:\t6\n";
        assert_eq!(
            parse_status(zombie.as_bytes()),
            StatusFields {
                resident_bytes: None,
                voluntary_switches: Some(5),
                involuntary_switches: Some(6),
            }
        );
    }

    #[test]
    fn io_gives_storage_bytes_not_rchar_or_wchar() {
        let io = "rchar: 111\nwchar: 222\nsyscr: 3\nsyscw: 4\nread_bytes: 40960\n\
                  write_bytes: 8192\ncancelled_write_bytes: 0\n";
        assert_eq!(
            parse_io(io.as_bytes()),
            Some(IoFields {
                read_bytes: 40_960,
                written_bytes: 8_192,
            })
        );
        assert_eq!(parse_io(b"rchar: 111\nwchar: 222\n"), None);
    }

    #[test]
    fn limits_give_the_soft_open_files_limit() {
        let limits = "Limit                     Soft Limit           Hard Limit           Units     \n\
            Max cpu time              unlimited            unlimited            seconds   \n\
            Max open files            1024                 524288               files     \n\
            Max locked memory         8388608              8388608              bytes     \n";
        assert_eq!(parse_max_open_files(limits.as_bytes()), Some(1024));
        let unlimited = limits.replace("1024        ", "unlimited   ");
        assert_eq!(parse_max_open_files(unlimited.as_bytes()), None);
        assert_eq!(parse_max_open_files(b"Limit Soft Limit\n"), None);
    }

    #[test]
    fn numbers_that_overflow_or_are_not_digits_are_rejected() {
        assert_eq!(parse_u64(b"18446744073709551615"), Some(u64::MAX));
        assert_eq!(parse_u64(b"18446744073709551616"), None);
        assert_eq!(parse_u64(b"-1"), None);
        assert_eq!(parse_u64(b""), None);
        assert_eq!(parse_kib(b"\t 12 kB"), Some(12 * 1024));
        assert_eq!(parse_kib(b"\t 12"), None);
    }

    /// A `sleep` child: its descriptors and limits do not change while the test reads them,
    /// unlike those of the (multi-threaded) test process itself.
    struct Sleeper(std::process::Child);

    impl Sleeper {
        /// Starts `sleep` and waits until it sleeps (until then its status still changes).
        fn spawn() -> Self {
            let sleeper = Self(
                std::process::Command::new("sleep")
                    .arg("30")
                    .spawn()
                    .unwrap(),
            );
            for _ in 0..2000 {
                let stat = std::fs::read(format!("/proc/{}/stat", sleeper.pid())).unwrap();
                if parse_stat(&stat).unwrap().state == ProcessState::Sleeping {
                    return sleeper;
                }
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
            panic!("sleep {} never went to sleep", sleeper.pid());
        }

        fn pid(&self) -> u32 {
            self.0.id()
        }

        fn start_time_ticks(&self) -> u64 {
            let stat = std::fs::read(format!("/proc/{}/stat", self.pid())).unwrap();
            parse_stat(&stat).unwrap().start_time_ticks
        }
    }

    impl Drop for Sleeper {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }

    fn proc_root() -> &'static std::path::Path {
        std::path::Path::new("/proc")
    }

    fn no_problems(file: ProcFile, why: String) {
        panic!("cannot read {}: {why}", file.name())
    }

    #[test]
    fn a_reading_agrees_with_the_proc_files_read_directly() {
        let sleeper = Sleeper::spawn();
        let pid = sleeper.pid();
        let mut buffer = read_buffer();
        let mut dir = ProcDir::open(proc_root(), pid, sleeper.start_time_ticks()).unwrap();
        let reading = dir.read_all(&mut buffer, no_problems).unwrap();

        let file = |name: &str| std::fs::read(format!("/proc/{pid}/{name}")).unwrap();
        assert_eq!(Some(reading.stat), parse_stat(&file("stat")));
        assert_eq!(reading.status, Some(parse_status(&file("status"))));
        assert_eq!(reading.io, parse_io(&file("io")));
        assert_eq!(reading.max_fds, parse_max_open_files(&file("limits")));
        let listed = std::fs::read_dir(format!("/proc/{pid}/fd"))
            .unwrap()
            .count() as u64;
        assert_eq!(reading.open_fds, Some(listed));
        assert_eq!(reading.stat.threads, 1);
        assert!(reading.max_fds.is_some());
        assert!(reading.status.unwrap().resident_bytes.unwrap() > 0);
    }

    /// Sets the soft open-files limit of `pid` (as `prlimit --nofile=N: --pid` would).
    fn set_soft_nofile(pid: u32, soft: u64) {
        let mut old = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: valid out pointer; a null new limit only reads.
        let read =
            unsafe { libc::prlimit(pid as i32, libc::RLIMIT_NOFILE, std::ptr::null(), &mut old) };
        assert_eq!(read, 0);
        let new = libc::rlimit {
            rlim_cur: soft,
            rlim_max: old.rlim_max,
        };
        // SAFETY: valid pointer to the new limit; our own child.
        let set =
            unsafe { libc::prlimit(pid as i32, libc::RLIMIT_NOFILE, &new, std::ptr::null_mut()) };
        assert_eq!(set, 0);
    }

    #[test]
    fn limits_are_read_on_the_first_pass_and_then_every_tenth() {
        let sleeper = Sleeper::spawn();
        let mut buffer = read_buffer();
        let mut dir =
            ProcDir::open(proc_root(), sleeper.pid(), sleeper.start_time_ticks()).unwrap();
        set_soft_nofile(sleeper.pid(), 100);
        let max_fds = |dir: &mut ProcDir, buffer: &mut Vec<u8>| {
            dir.read_all(buffer, no_problems).unwrap().max_fds
        };
        assert_eq!(max_fds(&mut dir, &mut buffer), Some(100));
        set_soft_nofile(sleeper.pid(), 200);
        for pass in 2..=LIMITS_EVERY_PASSES {
            assert_eq!(max_fds(&mut dir, &mut buffer), Some(100), "pass {pass}");
        }
        assert_eq!(max_fds(&mut dir, &mut buffer), Some(200));
    }

    #[test]
    fn a_pid_that_names_another_process_now_reads_as_gone() {
        let sleeper = Sleeper::spawn();
        let mut buffer = read_buffer();
        let start_time_ticks = sleeper.start_time_ticks();
        let mut other = ProcDir::open(proc_root(), sleeper.pid(), start_time_ticks + 1).unwrap();
        let result = other.read_all(&mut buffer, no_problems);
        assert!(matches!(result, Err(ReadFailure::Gone)), "{result:?}");
        let mut same = ProcDir::open(proc_root(), sleeper.pid(), start_time_ticks).unwrap();
        assert!(same.read_all(&mut buffer, no_problems).is_ok());
    }

    #[test]
    fn a_process_that_exited_after_opening_reads_as_gone() {
        let mut sleeper = Sleeper::spawn();
        let mut buffer = read_buffer();
        let mut dir =
            ProcDir::open(proc_root(), sleeper.pid(), sleeper.start_time_ticks()).unwrap();
        sleeper.0.kill().unwrap();
        sleeper.0.wait().unwrap();
        let result = dir.read_all(&mut buffer, no_problems);
        assert!(matches!(result, Err(ReadFailure::Gone)), "{result:?}");
    }

    #[test]
    fn a_pid_with_no_process_does_not_open() {
        let mut sleeper = Sleeper::spawn();
        let (pid, start_time_ticks) = (sleeper.pid(), sleeper.start_time_ticks());
        sleeper.0.kill().unwrap();
        sleeper.0.wait().unwrap();
        let result = ProcDir::open(proc_root(), pid, start_time_ticks);
        assert!(matches!(result, Err(ReadFailure::Gone)), "pid {pid} opened");
    }

    #[test]
    fn files_longer_than_the_buffer_are_read_whole() {
        let sleeper = Sleeper::spawn();
        let mut buffer = vec![0; 16];
        let dir = ProcDir::open(proc_root(), sleeper.pid(), sleeper.start_time_ticks()).unwrap();
        let status = dir.read(ProcFile::Status, &mut buffer).unwrap().to_vec();
        assert_eq!(
            status,
            std::fs::read(format!("/proc/{}/status", sleeper.pid())).unwrap()
        );
    }
}
