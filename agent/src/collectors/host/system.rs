//! Uptime from /proc/uptime, and the node's identity: hostname, kernel release, boot id.

use procfs::{Current, Uptime};

use super::{SourceError, labels, push};
use crate::sample::{Labels, Sample};

/// Seconds since boot, including time suspended.
pub const UPTIME_METRIC: &str = "vigil_host_uptime_seconds";
/// Always 1; the labels `hostname`, `kernel` (release) and `boot_id` say which boot of which
/// node the other series come from.
pub const INFO_METRIC: &str = "vigil_host_info";

const UPTIME_PATH: &str = "/proc/uptime";
const HOSTNAME_PATH: &str = "/proc/sys/kernel/hostname";
const KERNEL_PATH: &str = "/proc/sys/kernel/osrelease";
const BOOT_ID_PATH: &str = "/proc/sys/kernel/random/boot_id";

pub(super) fn collect_uptime(out: &mut Vec<Sample>) -> Result<(), SourceError> {
    let uptime = Uptime::current().map_err(|source| SourceError::Procfs {
        path: UPTIME_PATH,
        source,
    })?;
    push(out, UPTIME_METRIC, Labels::new(), uptime.uptime);
    Ok(())
}

/// Read every pass: the hostname can change while the agent runs.
pub(super) fn collect_info(out: &mut Vec<Sample>) -> Result<(), SourceError> {
    let read = |path: &'static str| {
        std::fs::read_to_string(path)
            .map(|text| text.trim().to_string())
            .map_err(|source| SourceError::Read { path, source })
    };
    let hostname = read(HOSTNAME_PATH)?;
    let kernel = read(KERNEL_PATH)?;
    let boot_id = read(BOOT_ID_PATH)?;
    let labels = labels([
        ("hostname", hostname.as_str()),
        ("kernel", kernel.as_str()),
        ("boot_id", boot_id.as_str()),
    ]);
    push(out, INFO_METRIC, labels, 1.0);
    Ok(())
}
