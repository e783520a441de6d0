//! Vigil's syscall-latency programs, attached to the `sys_enter` and `sys_exit` raw tracepoints.
//!
//! Only the tracepoint arguments are read (syscall number on enter, return value on exit), so the
//! programs run on kernels in lockdown mode, where `bpf_probe_read_kernel`, kprobes and fentry are
//! refused. The map layout and its rationale live in `vigil_agent_common::maps`.
//!
//! Every syscall on the node passes through these programs, so the untracked path is one inlined
//! array lookup, and the tracked path touches only arrays and atomic adds (no hash updates).
#![no_std]
#![no_main]
#![feature(core_intrinsics)]
#![allow(internal_features)]

use core::intrinsics::{AtomicOrdering, atomic_xadd};

use aya_ebpf::{
    helpers::{bpf_get_current_pid_tgid, bpf_ktime_get_ns},
    macros::{map, raw_tracepoint},
    maps::Array,
    programs::RawTracePointContext,
};
use vigil_agent_common::{
    histogram::{BUCKET_COUNT, bucket_index},
    maps::{
        BPF_F_MMAPABLE, LATENCY_COLUMNS, LatencyRow, OTHER_COLUMN, ProcessColumns, SLOTS_PER_WORD,
        SYSCALL_NR_LIMIT, SyscallCount, decode_start, elapsed_since, encode_start, slot_position,
    },
};

// Default sizes (pid_max 32768, 256 tracked processes); user space resizes every map before
// loading to the node's pid_max and its configured process budget.
const DEFAULT_PID_MAX: u32 = 32768;
const DEFAULT_SLOTS: u32 = 256;

#[map]
static PROCESS_SLOTS: Array<u64> = Array::with_max_entries(DEFAULT_PID_MAX / SLOTS_PER_WORD, 0);

#[map]
static THREAD_STARTS: Array<u64> = Array::with_max_entries(DEFAULT_PID_MAX, 0);

#[map]
static SYSCALL_COUNTS: Array<SyscallCount> =
    Array::with_max_entries(DEFAULT_SLOTS * SYSCALL_NR_LIMIT, BPF_F_MMAPABLE);

#[map]
static SYSCALL_COLUMNS: Array<ProcessColumns> = Array::with_max_entries(DEFAULT_SLOTS, 0);

#[map]
static LATENCY_ROWS: Array<LatencyRow> =
    Array::with_max_entries(DEFAULT_SLOTS * LATENCY_COLUMNS, BPF_F_MMAPABLE);

/// Syscalls that never return to their caller, so recording a start would leave a stale entry.
#[cfg(bpf_target_arch = "aarch64")]
const NO_RETURN_SYSCALLS: [u64; 2] = [93, 94]; // exit, exit_group
#[cfg(not(bpf_target_arch = "aarch64"))]
const NO_RETURN_SYSCALLS: [u64; 2] = [60, 231]; // exit, exit_group (x86_64)

/// Slot of a process (1-based), or 0 when it is not tracked.
#[inline(always)]
fn process_slot(tgid: u32) -> u32 {
    let (word, shift) = slot_position(tgid);
    match PROCESS_SLOTS.get(word) {
        Some(slots) => ((*slots >> shift) & 0xffff) as u32,
        None => 0,
    }
}

#[raw_tracepoint(tracepoint = "sys_enter")]
pub fn vigil_sys_enter(ctx: RawTracePointContext) -> i32 {
    let pid_tgid = bpf_get_current_pid_tgid();
    if process_slot((pid_tgid >> 32) as u32) == 0 {
        return 0;
    }
    let nr: u64 = ctx.arg(1);
    if nr >= SYSCALL_NR_LIMIT as u64 || nr == NO_RETURN_SYSCALLS[0] || nr == NO_RETURN_SYSCALLS[1] {
        return 0;
    }
    if let Some(start) = THREAD_STARTS.get_ptr_mut(pid_tgid as u32) {
        // SAFETY: the pointer comes from a successful array lookup and stays valid for the
        // program's run; only this thread writes its own entry. The helper takes no arguments.
        unsafe { *start = encode_start(nr as u32, bpf_ktime_get_ns()) };
    }
    0
}

#[raw_tracepoint(tracepoint = "sys_exit")]
pub fn vigil_sys_exit(ctx: RawTracePointContext) -> i32 {
    let pid_tgid = bpf_get_current_pid_tgid();
    let Some(start) = THREAD_STARTS.get_ptr_mut(pid_tgid as u32) else {
        return 0;
    };
    // SAFETY: valid array element (see vigil_sys_enter); this thread is its only writer.
    let entry = unsafe { *start };
    if entry == 0 {
        return 0; // no start recorded: untracked, or tracking began mid-syscall
    }
    // SAFETY: as above.
    unsafe { *start = 0 };
    let slot = process_slot((pid_tgid >> 32) as u32);
    if slot == 0 {
        return 0; // the process stopped being tracked while the syscall was in flight
    }
    let elapsed = {
        let (_, started) = decode_start(entry);
        // SAFETY: helper call without arguments.
        elapsed_since(started, unsafe { bpf_ktime_get_ns() })
    };
    let (nr, _) = decode_start(entry);
    let nr = nr % SYSCALL_NR_LIMIT;
    let process = slot - 1;
    let ret: i64 = ctx.arg(1);

    let column = match SYSCALL_COLUMNS.get(process) {
        Some(columns) => columns.columns[nr as usize] as u32 % LATENCY_COLUMNS,
        None => 0,
    };
    // A syscall with a histogram row of its own is counted by that row alone (one atomic add
    // less on the hot path); user space adds the row's count to `calls`.
    if column == OTHER_COLUMN as u32 || ret < 0 {
        if let Some(count) = SYSCALL_COUNTS.get_ptr_mut(process * SYSCALL_NR_LIMIT + nr) {
            // SAFETY: valid array element; concurrent updaters use atomic adds.
            unsafe {
                if column == OTHER_COLUMN as u32 {
                    atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(
                        &raw mut (*count).calls,
                        1,
                    );
                }
                if ret < 0 {
                    atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(
                        &raw mut (*count).errors,
                        1,
                    );
                }
            }
        }
    }
    if let Some(row) = LATENCY_ROWS.get_ptr_mut(process * LATENCY_COLUMNS + column) {
        let bucket = bucket_index(elapsed);
        if bucket < BUCKET_COUNT {
            // SAFETY: valid array element, bucket index checked above; atomic adds only.
            unsafe {
                atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(
                    &raw mut (*row).sum_ns,
                    elapsed,
                );
                atomic_xadd::<u32, u32, { AtomicOrdering::Relaxed }>(
                    (&raw mut (*row).buckets).cast::<u32>().add(bucket),
                    1,
                );
            }
        }
    }
    0
}

/// Empty programs: attached by `vigil-agent overhead-probe --mode floor` to measure what the
/// raw-tracepoint path costs before any work of ours.
#[raw_tracepoint(tracepoint = "sys_enter")]
pub fn vigil_empty_enter(_ctx: RawTracePointContext) -> i32 {
    0
}

#[raw_tracepoint(tracepoint = "sys_exit")]
pub fn vigil_empty_exit(_ctx: RawTracePointContext) -> i32 {
    0
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // SAFETY: the verifier rejects programs with reachable loops, so nothing may panic; every
    // index above is bounds-checked explicitly.
    unsafe { core::hint::unreachable_unchecked() }
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
