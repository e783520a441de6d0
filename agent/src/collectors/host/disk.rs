//! Block-device I/O counters from /proc/diskstats.
//!
//! Like node_exporter 1.5 (`--collector.diskstats.device-exclude`), whole disks are kept and
//! RAM disks, loop devices, floppies and partitions of sd/vd/hd/xvd/nvme disks are left out:
//! loop devices come and go with every snap or image mount, and a partition's I/O is already
//! counted on its disk. Device-mapper (`dm-N`), md RAID, zram and mmcblk devices are kept.

use super::{SourceError, labels, push};
use crate::sample::Sample;

pub const DISK_READS_METRIC: &str = "vigil_host_disk_reads_completed_total";
pub const DISK_WRITES_METRIC: &str = "vigil_host_disk_writes_completed_total";
pub const DISK_READ_BYTES_METRIC: &str = "vigil_host_disk_read_bytes_total";
pub const DISK_WRITTEN_BYTES_METRIC: &str = "vigil_host_disk_written_bytes_total";
/// Seconds the device had I/O in flight (field 10 of /proc/diskstats); its rate is utilisation.
pub const DISK_IO_TIME_METRIC: &str = "vigil_host_disk_io_time_seconds_total";

const DISKSTATS_PATH: &str = "/proc/diskstats";
/// /proc/diskstats counts sectors of 512 bytes, whatever the device's own sector size.
const SECTOR_BYTES: f64 = 512.0;

pub(super) fn collect(out: &mut Vec<Sample>) -> Result<(), SourceError> {
    let disks = procfs::diskstats().map_err(|source| SourceError::Procfs {
        path: DISKSTATS_PATH,
        source,
    })?;
    for disk in disks.iter().filter(|disk| is_reported_disk(&disk.name)) {
        let device = labels([("device", &disk.name)]);
        let counters = [
            (DISK_READS_METRIC, disk.reads as f64),
            (DISK_WRITES_METRIC, disk.writes as f64),
            (
                DISK_READ_BYTES_METRIC,
                disk.sectors_read as f64 * SECTOR_BYTES,
            ),
            (
                DISK_WRITTEN_BYTES_METRIC,
                disk.sectors_written as f64 * SECTOR_BYTES,
            ),
            (DISK_IO_TIME_METRIC, disk.time_in_progress as f64 / 1000.0),
        ];
        for (name, value) in counters {
            push(out, name, device.clone(), value);
        }
    }
    Ok(())
}

/// node_exporter's `^(ram|loop|fd|(h|s|v|xv)d[a-z]|nvme\d+n\d+p)\d+$`, negated, except that
/// disks past the 26th (`sdaa1`) have their partitions left out too.
fn is_reported_disk(name: &str) -> bool {
    let numbered = |prefix: &str| name.strip_prefix(prefix).is_some_and(is_number);
    if ["ram", "loop", "fd"].into_iter().any(numbered) {
        return false;
    }
    // sda1, vdb2, hdc3, xvda1: letters after the prefix, then a partition number.
    for prefix in ["sd", "vd", "hd", "xvd"] {
        if let Some(rest) = name.strip_prefix(prefix) {
            let letters = rest.len()
                - rest
                    .trim_start_matches(|c: char| c.is_ascii_lowercase())
                    .len();
            if letters > 0 && is_number(&rest[letters..]) {
                return false;
            }
        }
    }
    // nvme0n1p1: controller, namespace, partition.
    if let Some(rest) = name.strip_prefix("nvme") {
        let partition = rest
            .split_once('n')
            .and_then(|(controller, rest)| Some((controller, rest.split_once('p')?)));
        if let Some((controller, (namespace, partition))) = partition
            && is_number(controller)
            && is_number(namespace)
            && is_number(partition)
        {
            return false;
        }
    }
    true
}

fn is_number(text: &str) -> bool {
    !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn whole_disks_and_virtual_block_devices_are_reported() {
        for name in [
            "sda",
            "sdaa",
            "vda",
            "hdb",
            "xvda",
            "nvme0n1",
            "nvme12n3",
            "dm-0",
            "md127",
            "zram0",
            "mmcblk0",
            "mmcblk0p1",
        ] {
            assert!(is_reported_disk(name), "{name}");
        }
    }

    #[test]
    fn partitions_ram_disks_loops_and_floppies_are_left_out() {
        for name in [
            "sda1",
            "sdaa12",
            "vda15",
            "hdb2",
            "xvda1",
            "nvme0n1p1",
            "nvme10n2p13",
            "ram0",
            "loop7",
            "loop12",
            "fd0",
        ] {
            assert!(!is_reported_disk(name), "{name}");
        }
    }

    #[test]
    fn names_that_only_start_like_excluded_ones_are_kept() {
        // No number after the prefix, or something else in between.
        for name in [
            "loop",
            "ramdisk",
            "sd",
            "nvme0",
            "nvme0n1px",
            "loop-control",
        ] {
            assert!(is_reported_disk(name), "{name}");
        }
    }
}
