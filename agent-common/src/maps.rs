//! Layout of the syscall-latency maps shared by `agent-ebpf` and the agent's `syscalls` collector.
//!
//! Hot-path design (Rezolus' lessons): every map touched per syscall is an `Array`, whose lookups
//! the verifier inlines, and counters are bumped with atomic adds; nothing is inserted into or
//! deleted from a hash map per syscall. User space `mmap`s the counter arrays and reads them
//! without a syscall per bucket.
//!
//! * `PROCESS_SLOTS` — tgid -> slot, four 16-bit slots packed in each `u64` (2 bytes per pid).
//!   Slot 0 means "untracked"; tracked processes get slots `1..=max_tracked`.
//! * `THREAD_STARTS` — tid -> encoded start of the syscall in flight (see [`encode_start`]).
//! * `SYSCALL_COUNTS` — `(slot - 1) * SYSCALL_NR_LIMIT + nr` -> [`SyscallCount`].
//! * `SYSCALL_COLUMNS` — `slot - 1` -> [`ProcessColumns`]: which latency row a syscall feeds.
//! * `LATENCY_ROWS` — `(slot - 1) * LATENCY_COLUMNS + column` -> [`LatencyRow`].

use crate::histogram::BUCKET_COUNT;

/// Syscall numbers at or above this are ignored (x86_64 and arm64 both stay below 512).
pub const SYSCALL_NR_LIMIT: u32 = 512;
/// Latency histogram rows per tracked process. Column 0 collects syscalls without a column of
/// their own ("other"); user space assigns columns 1.. to the syscalls a process uses.
pub const LATENCY_COLUMNS: u32 = 32;
/// Column for syscalls that have no histogram of their own.
pub const OTHER_COLUMN: u8 = 0;
/// Slots packed into each `PROCESS_SLOTS` word.
pub const SLOTS_PER_WORD: u32 = 4;

pub const PROCESS_SLOTS: &str = "PROCESS_SLOTS";
pub const THREAD_STARTS: &str = "THREAD_STARTS";
pub const SYSCALL_COUNTS: &str = "SYSCALL_COUNTS";
pub const SYSCALL_COLUMNS: &str = "SYSCALL_COLUMNS";
pub const LATENCY_ROWS: &str = "LATENCY_ROWS";

/// Program names in the object file.
pub const PROGRAM_SYS_ENTER: &str = "vigil_sys_enter";
pub const PROGRAM_SYS_EXIT: &str = "vigil_sys_exit";
/// Programs that do nothing, attached by the overhead benchmark to measure the floor cost.
pub const PROGRAM_EMPTY_ENTER: &str = "vigil_empty_enter";
pub const PROGRAM_EMPTY_EXIT: &str = "vigil_empty_exit";

/// `BPF_F_MMAPABLE`: lets user space map an array's values into its address space.
pub const BPF_F_MMAPABLE: u32 = 1 << 10;

/// Bits of a `THREAD_STARTS` entry that hold the start time (`ktime` ns modulo 2^54, ~208 days).
pub const START_TIME_BITS: u32 = 54;
pub const START_TIME_MASK: u64 = (1 << START_TIME_BITS) - 1;

/// Packs the syscall number and start time of a syscall in flight into one word.
///
/// The number is stored plus one so that an entry is never 0, which means "nothing in flight".
#[inline(always)]
pub fn encode_start(nr: u32, start_ns: u64) -> u64 {
    ((nr as u64 + 1) << START_TIME_BITS) | (start_ns & START_TIME_MASK)
}

/// Unpacks a non-zero `THREAD_STARTS` entry into `(nr, start time modulo 2^54)`.
#[inline(always)]
pub fn decode_start(entry: u64) -> (u32, u64) {
    (
        ((entry >> START_TIME_BITS) - 1) as u32,
        entry & START_TIME_MASK,
    )
}

/// Elapsed ns between an encoded start time and `now_ns`, correct across the 2^54 wrap.
#[inline(always)]
pub fn elapsed_since(start_ns: u64, now_ns: u64) -> u64 {
    now_ns.wrapping_sub(start_ns) & START_TIME_MASK
}

/// Index of the `PROCESS_SLOTS` word that holds `tgid`'s slot, and the bit shift inside it.
#[inline(always)]
pub fn slot_position(tgid: u32) -> (u32, u32) {
    (tgid / SLOTS_PER_WORD, (tgid % SLOTS_PER_WORD) * 16)
}

/// Call and error counts of one syscall of one tracked process.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SyscallCount {
    /// Calls made while the syscall had no latency row of its own. Once it has one, the row's
    /// bucket counts are its calls (the kernel skips this add to save an atomic per syscall).
    pub calls: u64,
    /// Calls that returned a negative value (`-errno`).
    pub errors: u64,
}

/// Which latency row each syscall of one process feeds (`columns[nr]`).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct ProcessColumns {
    pub columns: [u8; SYSCALL_NR_LIMIT as usize],
}

/// One latency histogram in kernel memory.
///
/// Bucket counters are 32 bits to halve the map; user space reads them at least every few seconds
/// and accumulates wrapping differences into 64-bit totals.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct LatencyRow {
    pub sum_ns: u64,
    pub buckets: [u32; BUCKET_COUNT],
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: plain `#[repr(C)]` integers and arrays with no padding and no invalid bit patterns.
    unsafe impl aya::Pod for super::SyscallCount {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::ProcessColumns {}
    // SAFETY: as above (8 + 498 * 4 bytes, no trailing padding).
    unsafe impl aya::Pod for super::LatencyRow {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn start_entries_round_trip_and_are_never_zero() {
        assert_ne!(encode_start(0, 0), 0);
        let e = encode_start(230, 123_456_789_012);
        assert_eq!(decode_start(e), (230, 123_456_789_012));
        let e = encode_start(511, u64::MAX);
        assert_eq!(decode_start(e), (511, START_TIME_MASK));
    }

    #[test]
    fn elapsed_time_survives_the_start_time_wrap() {
        let start = START_TIME_MASK - 10;
        let (_, s) = decode_start(encode_start(1, start));
        assert_eq!(elapsed_since(s, START_TIME_MASK + 1 + 5), 16);
    }

    #[test]
    fn latency_rows_have_no_padding() {
        assert_eq!(core::mem::size_of::<LatencyRow>(), 8 + 4 * BUCKET_COUNT);
        assert_eq!(core::mem::size_of::<LatencyRow>() % 8, 0);
        assert_eq!(slot_position(7), (1, 48));
    }
}
