//! Syscall numbers <-> names for the architecture the agent runs on (x86_64 or arm64 tables from
//! the `syscalls` crate), and the syscalls that get a latency histogram from the start.

use std::str::FromStr;

use syscalls::Sysno;
use vigil_agent_common::maps::SYSCALL_NR_LIMIT;

/// The name used in the `syscall` label (`syscall_<nr>` for numbers the table lacks).
pub fn syscall_name(nr: u32) -> String {
    match Sysno::new(nr as usize) {
        Some(sysno) => sysno.name().to_string(),
        None => format!("syscall_{nr}"),
    }
}

/// The number of a syscall on this architecture, if it exists here and fits the probe's table.
pub fn syscall_number(name: &str) -> Option<u32> {
    let nr = Sysno::from_str(name).ok()?.id() as u32;
    (nr < SYSCALL_NR_LIMIT).then_some(nr)
}

/// Syscalls that model servers spend their time in: socket and file I/O, waiting (futex, epoll,
/// sleeps), GPU driver calls (ioctl on /dev/nvidia*), memory mapping. Each gets a latency
/// histogram from a process's first call; others get one once seen in a collection pass (until a
/// process's columns run out) and share the `other` histogram until then. Names absent on this
/// architecture (arm64 has no `epoll_wait` or `poll`) are skipped.
pub const DEFAULT_HISTOGRAM_SYSCALLS: &[&str] = &[
    "read",
    "write",
    "pread64",
    "pwrite64",
    "readv",
    "writev",
    "recvfrom",
    "sendto",
    "recvmsg",
    "sendmsg",
    "futex",
    "epoll_wait",
    "epoll_pwait",
    "poll",
    "ppoll",
    "nanosleep",
    "clock_nanosleep",
    "ioctl",
    "openat",
    "fsync",
];

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn x86_64_numbers_and_names_agree_with_the_kernel_table() {
        assert_eq!(syscall_name(0), "read");
        assert_eq!(syscall_name(35), "nanosleep");
        assert_eq!(syscall_name(230), "clock_nanosleep");
        assert_eq!(syscall_number("getppid"), Some(110));
        assert_eq!(syscall_number("ioctl"), Some(16));
    }

    #[test]
    fn unknown_names_and_numbers_are_reported_as_such() {
        assert_eq!(syscall_number("not_a_syscall"), None);
        assert_eq!(syscall_name(511), "syscall_511");
    }

    #[test]
    fn default_histogram_syscalls_fit_the_columns() {
        let known = DEFAULT_HISTOGRAM_SYSCALLS
            .iter()
            .filter(|n| syscall_number(n).is_some());
        assert!(known.count() < vigil_agent_common::maps::LATENCY_COLUMNS as usize);
    }
}
