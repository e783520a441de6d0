//! Memory and swap from /proc/meminfo.

use procfs::{Current, Meminfo};

use super::{SourceError, push};
use crate::sample::{Labels, Sample};

pub const MEMORY_TOTAL_METRIC: &str = "vigil_host_memory_total_bytes";
/// The kernel's estimate of memory available to start new work without swapping
/// (`MemAvailable`: free memory plus what reclaim would give back, such as clean page cache).
pub const MEMORY_AVAILABLE_METRIC: &str = "vigil_host_memory_available_bytes";
/// `total - available`: memory the node's work holds and cannot give up without swapping.
/// Unlike `free`'s "used" (total - free - buffers - cache), it counts unreclaimable cache such
/// as tmpfs and /dev/shm, which model servers fill, and leaves out reclaimable cache.
pub const MEMORY_USED_METRIC: &str = "vigil_host_memory_used_bytes";
/// Page cache (`Cached`, which includes tmpfs and shared memory).
pub const MEMORY_CACHED_METRIC: &str = "vigil_host_memory_cached_bytes";
pub const MEMORY_BUFFERS_METRIC: &str = "vigil_host_memory_buffers_bytes";
pub const SWAP_TOTAL_METRIC: &str = "vigil_host_swap_total_bytes";
pub const SWAP_FREE_METRIC: &str = "vigil_host_swap_free_bytes";

const MEMINFO_PATH: &str = "/proc/meminfo";

/// procfs converts /proc/meminfo's kB (KiB) to bytes.
pub(super) fn collect(out: &mut Vec<Sample>) -> Result<(), SourceError> {
    let meminfo = Meminfo::current().map_err(|source| SourceError::Procfs {
        path: MEMINFO_PATH,
        source,
    })?;
    let mut gauge = |name, bytes: u64| push(out, name, Labels::new(), bytes as f64);
    gauge(MEMORY_TOTAL_METRIC, meminfo.mem_total);
    // MemAvailable exists since Linux 3.14; without it, "used" has no honest definition.
    if let Some(available) = meminfo.mem_available {
        gauge(MEMORY_AVAILABLE_METRIC, available);
        gauge(
            MEMORY_USED_METRIC,
            meminfo.mem_total.saturating_sub(available),
        );
    }
    gauge(MEMORY_CACHED_METRIC, meminfo.cached);
    gauge(MEMORY_BUFFERS_METRIC, meminfo.buffers);
    gauge(SWAP_TOTAL_METRIC, meminfo.swap_total);
    gauge(SWAP_FREE_METRIC, meminfo.swap_free);
    Ok(())
}
