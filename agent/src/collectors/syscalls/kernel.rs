//! The kernel half of the syscall-latency collector: loads the embedded eBPF object, sizes its
//! maps for this node, attaches the raw tracepoints, and gives typed access to the maps.
//!
//! Counter maps are `mmap`ed, so one collection pass reads every histogram with plain memory
//! loads instead of one `bpf()` syscall per bucket.

use std::{
    collections::HashMap,
    os::fd::{AsFd, AsRawFd},
    sync::atomic::{AtomicU32, AtomicU64, Ordering},
};

use aya::{
    Ebpf, EbpfError, EbpfLoader,
    maps::{Array, Map, MapData, MapError},
    programs::{ProgramError, RawTracePoint},
};
use memmap2::{MmapMut, MmapOptions};
use vigil_agent_common::{
    histogram::BUCKET_COUNT,
    maps::{
        LATENCY_COLUMNS, LATENCY_ROWS, LatencyRow, PROCESS_SLOTS, PROGRAM_EMPTY_ENTER,
        PROGRAM_EMPTY_EXIT, PROGRAM_SYS_ENTER, PROGRAM_SYS_EXIT, ProcessColumns, SLOTS_PER_WORD,
        SYSCALL_COLUMNS, SYSCALL_COUNTS, SYSCALL_NR_LIMIT, SyscallCount, THREAD_STARTS,
        slot_position,
    },
};

/// The object built from `agent-ebpf` (empty when the agent was built without it).
static BPF_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/vigil-syscalls.bpf.o"));

/// Why the probes could not be set up. Every message says what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error(
        "this vigil-agent was built without its eBPF object; rebuild it with `cargo xtask build`"
    )]
    ObjectMissing,
    #[error("loading the eBPF maps failed{hint}")]
    Load {
        hint: String,
        #[source]
        source: Box<EbpfError>,
    },
    #[error("the kernel refused eBPF program {program}{hint}")]
    Program {
        program: &'static str,
        hint: String,
        #[source]
        source: Box<ProgramError>,
    },
    #[error(
        "eBPF program {0} is missing from the embedded object; rebuild with `cargo xtask build`"
    )]
    MissingProgram(&'static str),
    #[error("eBPF map {map} is missing from the object or has an unexpected type")]
    Map {
        map: &'static str,
        #[source]
        source: Option<MapError>,
    },
    #[error("mapping eBPF map {map} into memory failed (kernel older than 5.5?)")]
    Mmap {
        map: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("updating eBPF map {map} failed")]
    Update {
        map: &'static str,
        #[source]
        source: MapError,
    },
}

/// Extra words for an error when the likely cause is missing privileges.
fn privilege_hint() -> String {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let missing = missing_bpf_capabilities(&status);
    if missing.is_empty() {
        String::new()
    } else {
        format!(
            "; vigil-agent lacks {} (run it as root, or grant CAP_BPF and CAP_PERFMON)",
            missing.join(" and ")
        )
    }
}

/// The capabilities that loading and attaching raw tracepoints needs and the effective set in
/// `/proc/self/status` lacks (CAP_SYS_ADMIN stands in for both on any kernel).
fn missing_bpf_capabilities(proc_status: &str) -> Vec<&'static str> {
    const CAP_SYS_ADMIN: u32 = 21;
    const CAP_PERFMON: u32 = 38;
    const CAP_BPF: u32 = 39;
    let effective = proc_status
        .lines()
        .find_map(|line| line.strip_prefix("CapEff:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        .unwrap_or(0);
    let has = |cap: u32| effective & (1 << cap) != 0 || effective & (1 << CAP_SYS_ADMIN) != 0;
    [(CAP_BPF, "CAP_BPF"), (CAP_PERFMON, "CAP_PERFMON")]
        .into_iter()
        .filter(|&(cap, _)| !has(cap))
        .map(|(_, name)| name)
        .collect()
}

/// Lifts RLIMIT_MEMLOCK, which kernels before 5.11 charge BPF maps against.
fn raise_memlock_limit() {
    let unlimited = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: setrlimit reads the struct we pass and has no other preconditions.
    if unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &unlimited) } != 0 {
        tracing::debug!("could not raise RLIMIT_MEMLOCK; fine on kernels >= 5.11");
    }
}

/// The node's `pid_max`: thread ids index `THREAD_STARTS`, and tgids index `PROCESS_SLOTS`.
pub fn node_pid_max() -> u32 {
    std::fs::read_to_string("/proc/sys/kernel/pid_max")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(4_194_304) // the kernel's upper limit on 64-bit, so every tid fits
}

/// Bytes of kernel memory the maps take for `slots` processes on a node with `pid_max`.
pub fn map_memory_bytes(slots: u32, pid_max: u32) -> u64 {
    let (slots, pid_max) = (slots as u64, pid_max as u64);
    let per_entry = |value_size: usize| value_size.next_multiple_of(8) as u64;
    pid_max.div_ceil(SLOTS_PER_WORD as u64) * 8
        + pid_max * 8
        + slots * SYSCALL_NR_LIMIT as u64 * per_entry(size_of::<SyscallCount>())
        + slots * per_entry(size_of::<ProcessColumns>())
        + slots * LATENCY_COLUMNS as u64 * per_entry(size_of::<LatencyRow>())
}

fn load_object(slots: u32, pid_max: u32) -> Result<Ebpf, ProbeError> {
    if BPF_OBJECT.is_empty() {
        return Err(ProbeError::ObjectMissing);
    }
    raise_memlock_limit();
    EbpfLoader::new()
        .map_max_entries(PROCESS_SLOTS, pid_max.div_ceil(SLOTS_PER_WORD))
        .map_max_entries(THREAD_STARTS, pid_max)
        .map_max_entries(SYSCALL_COUNTS, slots * SYSCALL_NR_LIMIT)
        .map_max_entries(SYSCALL_COLUMNS, slots)
        .map_max_entries(LATENCY_ROWS, slots * LATENCY_COLUMNS)
        .load(BPF_OBJECT)
        .map_err(|source| ProbeError::Load {
            hint: privilege_hint(),
            source: Box::new(source),
        })
}

fn attach(ebpf: &mut Ebpf, program: &'static str, tracepoint: &str) -> Result<(), ProbeError> {
    let refused = |source| ProbeError::Program {
        program,
        hint: privilege_hint(),
        source: Box::new(source),
    };
    let prog: &mut RawTracePoint = ebpf
        .program_mut(program)
        .ok_or(ProbeError::MissingProgram(program))?
        .try_into()
        .map_err(refused)?;
    prog.load().map_err(refused)?;
    prog.attach(tracepoint).map_err(refused)?;
    Ok(())
}

/// Attaches the empty programs only: what the raw-tracepoint path costs with no work of ours.
/// Used by the overhead benchmark; dropping the returned object detaches them.
pub fn attach_empty_programs() -> Result<Ebpf, ProbeError> {
    let mut ebpf = load_object(1, SLOTS_PER_WORD)?;
    attach(&mut ebpf, PROGRAM_EMPTY_ENTER, "sys_enter")?;
    attach(&mut ebpf, PROGRAM_EMPTY_EXIT, "sys_exit")?;
    Ok(ebpf)
}

/// A BPF array mapped into our address space (shared with the kernel, which updates it with
/// atomic adds while we read).
struct MappedArray {
    name: &'static str,
    memory: MmapMut,
}

impl MappedArray {
    fn map(ebpf: &mut Ebpf, name: &'static str, value_size: usize) -> Result<Self, ProbeError> {
        let Some(Map::Array(data)) = ebpf.map(name) else {
            return Err(ProbeError::Map {
                map: name,
                source: None,
            });
        };
        let entries = data.info().map_err(|e| ProbeError::Map {
            map: name,
            source: Some(e),
        })?;
        let len = entries.max_entries() as usize * value_size.next_multiple_of(8);
        // SAFETY: the fd is a BPF array created with BPF_F_MMAPABLE whose data is exactly `len`
        // bytes; the kernel keeps the memory alive while it is mapped, and all accesses go
        // through atomics because the kernel writes concurrently.
        let memory = unsafe {
            MmapOptions::new()
                .len(len)
                .map_mut(data.fd().as_fd().as_raw_fd())
        }
        .map_err(|source| ProbeError::Mmap { map: name, source })?;
        Ok(Self { name, memory })
    }

    fn u64_at(&self, byte_offset: usize) -> &AtomicU64 {
        assert!(
            byte_offset.is_multiple_of(8) && byte_offset + 8 <= self.memory.len(),
            "{}",
            self.name
        );
        // SAFETY: in bounds and 8-byte aligned (mmap is page aligned); AtomicU64 has u64's layout.
        unsafe { &*self.memory.as_ptr().add(byte_offset).cast::<AtomicU64>() }
    }

    fn u32_at(&self, byte_offset: usize) -> &AtomicU32 {
        assert!(
            byte_offset.is_multiple_of(4) && byte_offset + 4 <= self.memory.len(),
            "{}",
            self.name
        );
        // SAFETY: in bounds and 4-byte aligned; AtomicU32 has u32's layout.
        unsafe { &*self.memory.as_ptr().add(byte_offset).cast::<AtomicU32>() }
    }

    fn zero(&mut self, range: std::ops::Range<usize>) {
        // Only called for slots no process owns, so the kernel is not writing there.
        self.memory[range].fill(0);
    }
}

/// The attached syscall-latency programs and their maps, for `slots` tracked processes.
pub struct SyscallProbes {
    /// Owns the programs and links: dropping it detaches everything.
    _ebpf: Ebpf,
    process_slots: Array<MapData, u64>,
    syscall_columns: Array<MapData, ProcessColumns>,
    counts: MappedArray,
    rows: MappedArray,
    /// Our copy of the non-zero `PROCESS_SLOTS` words (we are their only writer).
    slot_words: HashMap<u32, u64>,
    slots: u32,
    pid_max: u32,
}

impl SyscallProbes {
    /// Loads and attaches the programs with room for `slots` tracked processes.
    pub fn attach(slots: u32) -> Result<Self, ProbeError> {
        let pid_max = node_pid_max();
        let mut ebpf = load_object(slots, pid_max)?;
        let counts = MappedArray::map(&mut ebpf, SYSCALL_COUNTS, size_of::<SyscallCount>())?;
        let rows = MappedArray::map(&mut ebpf, LATENCY_ROWS, size_of::<LatencyRow>())?;
        let take = |ebpf: &mut Ebpf, map: &'static str| {
            let data = ebpf
                .take_map(map)
                .ok_or(ProbeError::Map { map, source: None })?;
            Ok::<_, ProbeError>((map, data))
        };
        let (name, data) = take(&mut ebpf, PROCESS_SLOTS)?;
        let process_slots = Array::try_from(data).map_err(|e| ProbeError::Map {
            map: name,
            source: Some(e),
        })?;
        let (name, data) = take(&mut ebpf, SYSCALL_COLUMNS)?;
        let syscall_columns = Array::try_from(data).map_err(|e| ProbeError::Map {
            map: name,
            source: Some(e),
        })?;
        // Maps are populated before the programs run, so attach last.
        attach(&mut ebpf, PROGRAM_SYS_ENTER, "sys_enter")?;
        attach(&mut ebpf, PROGRAM_SYS_EXIT, "sys_exit")?;
        Ok(Self {
            _ebpf: ebpf,
            process_slots,
            syscall_columns,
            counts,
            rows,
            slot_words: HashMap::new(),
            slots,
            pid_max,
        })
    }

    pub fn slots(&self) -> u32 {
        self.slots
    }

    pub fn pid_max(&self) -> u32 {
        self.pid_max
    }

    /// Points `tgid` at `slot` (1-based; 0 stops tracking it).
    pub fn set_process_slot(&mut self, tgid: u32, slot: u16) -> Result<(), ProbeError> {
        let (word_index, shift) = slot_position(tgid);
        let old = self.slot_words.get(&word_index).copied().unwrap_or(0);
        let new = (old & !(0xffff << shift)) | ((slot as u64) << shift);
        self.process_slots
            .set(word_index, new, 0)
            .map_err(|source| ProbeError::Update {
                map: PROCESS_SLOTS,
                source,
            })?;
        if new == 0 {
            self.slot_words.remove(&word_index);
        } else {
            self.slot_words.insert(word_index, new);
        }
        Ok(())
    }

    /// The slot the kernel sees for `tgid` (0 when untracked).
    pub fn process_slot(&self, tgid: u32) -> u16 {
        let (word_index, shift) = slot_position(tgid);
        let word = self.process_slots.get(&word_index, 0).unwrap_or(0);
        ((word >> shift) & 0xffff) as u16
    }

    /// Clears a free slot's counters and histograms and installs its column map. Call before
    /// pointing a process at the slot.
    pub fn reset_slot(&mut self, slot: u16, columns: &ProcessColumns) -> Result<(), ProbeError> {
        let index = (slot - 1) as usize;
        let counts_len = SYSCALL_NR_LIMIT as usize * size_of::<SyscallCount>();
        self.counts
            .zero(index * counts_len..(index + 1) * counts_len);
        let rows_len = LATENCY_COLUMNS as usize * size_of::<LatencyRow>();
        self.rows.zero(index * rows_len..(index + 1) * rows_len);
        self.set_columns(slot, columns)
    }

    pub fn set_columns(&mut self, slot: u16, columns: &ProcessColumns) -> Result<(), ProbeError> {
        self.syscall_columns
            .set((slot - 1) as u32, columns, 0)
            .map_err(|source| ProbeError::Update {
                map: SYSCALL_COLUMNS,
                source,
            })
    }

    /// Calls and errors of syscall `nr` in `slot` since the slot was reset.
    pub fn syscall_count(&self, slot: u16, nr: u32) -> SyscallCount {
        let entry = (slot as usize - 1) * SYSCALL_NR_LIMIT as usize + nr as usize;
        let offset = entry * size_of::<SyscallCount>();
        SyscallCount {
            calls: self.counts.u64_at(offset).load(Ordering::Relaxed),
            errors: self.counts.u64_at(offset + 8).load(Ordering::Relaxed),
        }
    }

    /// Copies one latency row: the sum of latencies in ns, and the 32-bit (wrapping) bucket counts.
    pub fn read_latency_row(
        &self,
        slot: u16,
        column: u8,
        buckets: &mut [u32; BUCKET_COUNT],
    ) -> u64 {
        let row = (slot as usize - 1) * LATENCY_COLUMNS as usize + column as usize;
        let offset = row * size_of::<LatencyRow>();
        for (index, bucket) in buckets.iter_mut().enumerate() {
            *bucket = self
                .rows
                .u32_at(offset + 8 + index * 4)
                .load(Ordering::Relaxed);
        }
        self.rows.u64_at(offset).load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_capabilities_are_named_from_the_effective_set() {
        let status = |eff: &str| format!("Name:\tvigil-agent\nCapEff:\t{eff}\nCapBnd:\t0\n");
        assert_eq!(
            missing_bpf_capabilities(&status("0000000000000000")),
            ["CAP_BPF", "CAP_PERFMON"]
        );
        assert_eq!(
            missing_bpf_capabilities(&status("000000c000000000")),
            Vec::<&str>::new()
        );
        assert_eq!(
            missing_bpf_capabilities(&status("0000008000000000")),
            ["CAP_PERFMON"]
        );
        // CAP_SYS_ADMIN alone is enough.
        assert_eq!(
            missing_bpf_capabilities(&status("0000000000200000")),
            Vec::<&str>::new()
        );
        assert_eq!(
            missing_bpf_capabilities(&status("000001ffffffffff")),
            Vec::<&str>::new()
        );
    }
}
