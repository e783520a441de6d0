//! `host` collector: node-wide stats from /proc and statvfs (CPU time, load, memory, network,
//! disks, filesystems, pressure stall information, uptime), so model-server metrics can be read
//! against what the whole node was doing.
//!
//! One file per source, each reading its /proc file once per pass: `cpu` (/proc/stat,
//! /proc/loadavg), `memory` (/proc/meminfo), `network` (/proc/net/dev), `disk`
//! (/proc/diskstats), `filesystem` (/proc/self/mounts + statvfs), `pressure` (/proc/pressure/*),
//! `system` (/proc/uptime, hostname, kernel release, boot id). Names and units follow
//! node_exporter's where one exists (`node_cpu_seconds_total` -> `vigil_host_cpu_seconds_total`),
//! and the peer test `tests/tests/host_vs_node_exporter.rs` checks the values against it.
//!
//! A source that cannot be read (no PSI in this kernel, a mount that fails statvfs) drops only
//! its own metrics; the collector reports it as `degraded`, saying what and why, and logs it when
//! it appears, changes or ends rather than every pass. A pass costs ~0.2 ms here (release build,
//! 2 CPUs, 10 mounts).

mod cpu;
mod disk;
mod filesystem;
mod memory;
mod network;
mod pressure;
mod system;

use std::collections::BTreeMap;

use serde::Deserialize;

pub use cpu::{
    BOOT_TIME_METRIC, CPU_SECONDS_METRIC, CPUS_METRIC, LOAD1_METRIC, LOAD5_METRIC, LOAD15_METRIC,
};
pub use disk::{
    DISK_IO_TIME_METRIC, DISK_READ_BYTES_METRIC, DISK_READS_METRIC, DISK_WRITES_METRIC,
    DISK_WRITTEN_BYTES_METRIC,
};
pub use filesystem::{FILESYSTEM_AVAIL_METRIC, FILESYSTEM_FREE_METRIC, FILESYSTEM_SIZE_METRIC};
pub use memory::{
    MEMORY_AVAILABLE_METRIC, MEMORY_BUFFERS_METRIC, MEMORY_CACHED_METRIC, MEMORY_TOTAL_METRIC,
    MEMORY_USED_METRIC, SWAP_FREE_METRIC, SWAP_TOTAL_METRIC,
};
pub use network::{
    NETWORK_RECEIVE_BYTES_METRIC, NETWORK_RECEIVE_ERRORS_METRIC, NETWORK_RECEIVE_PACKETS_METRIC,
    NETWORK_TRANSMIT_BYTES_METRIC, NETWORK_TRANSMIT_ERRORS_METRIC, NETWORK_TRANSMIT_PACKETS_METRIC,
};
pub use pressure::{PressureResource, PressureStall, pressure_metric};
pub use system::{INFO_METRIC, UPTIME_METRIC};

use crate::{
    collectors::{Collector, CollectorStatus, UnavailableCollector, error_chain},
    sample::{Event, Labels, Sample, SampleValue},
    selection::PassSelection,
};

/// The collector's name in snapshots.
pub const NAME: &str = "host";

/// `[host]` in the agent config.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HostConfig {
    /// Collect node-wide stats (default true).
    pub enabled: bool,
    /// Filesystem types left out of `vigil_host_filesystem_*`: kernel pseudo filesystems with
    /// no space to run out of, and read-only or layered ones whose "free space" means nothing
    /// (squashfs, iso9660, overlay: a container's overlay shares the space of the filesystem
    /// under /var/lib/containerd or /var/lib/docker, which is reported itself). The default is
    /// node_exporter's list; unlike some distributions' defaults it keeps `tmpfs`, because a
    /// full /dev/shm or /run stops model servers (NCCL and PyTorch data loaders use /dev/shm).
    pub exclude_filesystem_types: Vec<String>,
    /// Mount points left out of `vigil_host_filesystem_*`, each with everything below it.
    /// The default leaves out what container runtimes and the kubelet mount per container or
    /// per pod (secrets, service-account tokens, sandbox /dev/shm): one series per pod would
    /// make the `mountpoint` label unbounded.
    pub exclude_mount_points: Vec<String>,
    /// Network interfaces whose name starts with one of these are left out of
    /// `vigil_host_network_*`. The default leaves out the host side of per-pod interfaces of
    /// common CNIs (`veth` for bridge/flannel/docker, `cali` for Calico, `lxc` for Cilium),
    /// which come and go with pods; pod traffic is still counted on the node's own interfaces.
    pub exclude_network_device_prefixes: Vec<String>,
}

/// node_exporter 1.5's `--collector.filesystem.fs-types-exclude` default.
pub const DEFAULT_EXCLUDED_FILESYSTEM_TYPES: &[&str] = &[
    "autofs",
    "binfmt_misc",
    "bpf",
    "cgroup",
    "cgroup2",
    "configfs",
    "debugfs",
    "devpts",
    "devtmpfs",
    "fusectl",
    "hugetlbfs",
    "iso9660",
    "mqueue",
    "nsfs",
    "overlay",
    "proc",
    "procfs",
    "pstore",
    "rpc_pipefs",
    "securityfs",
    "selinuxfs",
    "squashfs",
    "sysfs",
    "tracefs",
];

/// node_exporter's mount points (upstream default, less /dev, /proc and /sys whose own mounts
/// are pseudo filesystems excluded by type, so /dev/shm stays), plus the kubelet's and
/// containerd's per-pod mounts.
pub const DEFAULT_EXCLUDED_MOUNT_POINTS: &[&str] = &[
    "/run/credentials",
    "/run/containerd",
    "/run/netns",
    "/var/lib/containerd",
    "/var/lib/containers/storage",
    "/var/lib/docker",
    "/var/lib/kubelet/pods",
];

pub const DEFAULT_EXCLUDED_NETWORK_DEVICE_PREFIXES: &[&str] = &["veth", "cali", "lxc"];

impl Default for HostConfig {
    fn default() -> Self {
        let strings = |list: &[&str]| list.iter().map(|s| s.to_string()).collect();
        Self {
            enabled: true,
            exclude_filesystem_types: strings(DEFAULT_EXCLUDED_FILESYSTEM_TYPES),
            exclude_mount_points: strings(DEFAULT_EXCLUDED_MOUNT_POINTS),
            exclude_network_device_prefixes: strings(DEFAULT_EXCLUDED_NETWORK_DEVICE_PREFIXES),
        }
    }
}

/// The `host` collector for this config: the real one, or one that says it is disabled.
pub fn start(config: &HostConfig) -> Box<dyn Collector> {
    if !config.enabled {
        return Box::new(UnavailableCollector {
            name: NAME,
            reason: "disabled in the config (host.enabled = false)".into(),
        });
    }
    Box::new(HostCollector::new(config))
}

/// Why one source's metrics are missing from a pass.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("cannot read {path}")]
    Read {
        path: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot read {path}")]
    Procfs {
        path: &'static str,
        #[source]
        source: procfs::ProcError,
    },
    #[error("{path}: unexpected content {content:?}")]
    Format { path: &'static str, content: String },
    #[error("statvfs({mount_point}) failed")]
    Statvfs {
        mount_point: String,
        #[source]
        source: std::io::Error,
    },
}

/// Node-wide stats, read fresh on every pass; the model-server selection does not matter here.
pub struct HostCollector {
    filesystems: filesystem::FilesystemSpace,
    network: network::NetworkFilter,
    /// USER_HZ, the unit of /proc/stat.
    ticks_per_second: f64,
    samples: Vec<Sample>,
    /// What is missing in the latest pass, as `source -> why`; shown in the status.
    problems: BTreeMap<String, String>,
}

impl HostCollector {
    pub fn new(config: &HostConfig) -> Self {
        Self {
            filesystems: filesystem::FilesystemSpace::new(filesystem::FilesystemFilter::new(
                &config.exclude_filesystem_types,
                &config.exclude_mount_points,
            )),
            network: network::NetworkFilter::new(&config.exclude_network_device_prefixes),
            ticks_per_second: procfs::ticks_per_second() as f64,
            samples: Vec::new(),
            problems: BTreeMap::new(),
        }
    }

    /// Reads every source once and replaces the samples with what it found.
    pub fn refresh(&mut self) {
        let mut out = Vec::with_capacity(self.samples.len());
        let mut problems = BTreeMap::new();
        let mut record = |source: &str, result: Result<(), SourceError>| {
            if let Err(error) = result {
                problems.insert(source.to_string(), error_chain(&error));
            }
        };
        record("cpu", cpu::collect_stat(self.ticks_per_second, &mut out));
        record("load", cpu::collect_load(&mut out));
        record("memory", memory::collect(&mut out));
        record("network", network::collect(&self.network, &mut out));
        record("disk", disk::collect(&mut out));
        record("uptime", system::collect_uptime(&mut out));
        record("info", system::collect_info(&mut out));
        for (resource, result) in pressure::collect(&mut out) {
            record(&format!("pressure {resource}"), result);
        }
        for (mount_point, error) in self.filesystems.collect(&mut out) {
            record(&format!("filesystem {mount_point}"), Err(error));
        }

        // Log a problem when it appears or changes, and its end, rather than every pass.
        for (source, why) in &problems {
            if self.problems.get(source) != Some(why) {
                tracing::warn!("host collector: {source} not collected: {why}");
            }
        }
        for source in self.problems.keys() {
            if !problems.contains_key(source) {
                tracing::info!("host collector: {source} collected again");
            }
        }
        self.problems = problems;
        self.samples = out;
    }

    pub fn status(&self) -> CollectorStatus {
        if self.problems.is_empty() {
            return CollectorStatus::Ok;
        }
        let missing: Vec<String> = self
            .problems
            .iter()
            .map(|(source, why)| format!("{source}: {why}"))
            .collect();
        CollectorStatus::Degraded(format!("not collected: {}", missing.join("; ")))
    }
}

impl Collector for HostCollector {
    fn name(&self) -> &'static str {
        NAME
    }

    fn collect(&mut self, _selection: &PassSelection) {
        self.refresh();
    }

    fn samples(&self) -> Vec<Sample> {
        self.samples.clone()
    }

    fn take_events(&mut self) -> Vec<Event> {
        Vec::new()
    }

    fn status(&self) -> CollectorStatus {
        HostCollector::status(self)
    }
}

/// Appends one value sample.
fn push(out: &mut Vec<Sample>, name: &'static str, labels: Labels, value: f64) {
    out.push(Sample {
        name,
        labels,
        value: SampleValue::Value(value),
    });
}

fn labels<const N: usize>(pairs: [(&str, &str); N]) -> Labels {
    pairs
        .into_iter()
        .map(|(name, value)| (name.to_string(), value.to_string()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn value_of(samples: &[Sample], name: &str, wanted: &[(&str, &str)]) -> Option<f64> {
        samples.iter().find_map(|s| {
            let matches = s.name == name
                && wanted
                    .iter()
                    .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v));
            match (&s.value, matches) {
                (SampleValue::Value(v), true) => Some(*v),
                _ => None,
            }
        })
    }

    #[test]
    fn config_defaults_to_enabled_with_node_exporter_filesystem_exclusions() {
        let config: HostConfig = toml::from_str("").unwrap();
        assert!(config.enabled);
        assert!(config.exclude_filesystem_types.contains(&"cgroup2".into()));
        assert!(config.exclude_filesystem_types.contains(&"overlay".into()));
        assert!(!config.exclude_filesystem_types.contains(&"tmpfs".into()));
        assert!(!config.exclude_filesystem_types.contains(&"ext4".into()));
    }

    #[test]
    fn config_rejects_unknown_keys() {
        let err = toml::from_str::<HostConfig>("enable = false").unwrap_err();
        assert!(err.to_string().contains("unknown field `enable`"), "{err}");
    }

    #[test]
    fn a_disabled_collector_says_so() {
        let collector = start(&HostConfig {
            enabled: false,
            ..Default::default()
        });
        assert_eq!(collector.name(), NAME);
        assert_eq!(
            collector.status(),
            CollectorStatus::Unavailable("disabled in the config (host.enabled = false)".into())
        );
    }

    #[test]
    fn status_is_degraded_naming_each_missing_source_and_why() {
        let mut collector = HostCollector::new(&HostConfig::default());
        assert_eq!(collector.status(), CollectorStatus::Ok);
        collector.problems = BTreeMap::from([
            (
                "pressure cpu".to_string(),
                "cannot read /proc/pressure/cpu: Operation not supported (os error 95)".to_string(),
            ),
            (
                "filesystem /data".to_string(),
                "statvfs(/data) failed: Permission denied (os error 13)".to_string(),
            ),
        ]);
        assert_eq!(
            collector.status(),
            CollectorStatus::Degraded(
                "not collected: filesystem /data: statvfs(/data) failed: Permission denied \
                 (os error 13); pressure cpu: cannot read /proc/pressure/cpu: Operation not \
                 supported (os error 95)"
                    .into()
            )
        );
    }

    /// Runs on the real /proc of the build machine: every source this kernel has is read.
    #[test]
    fn one_pass_reads_this_node() {
        let mut collector = HostCollector::new(&HostConfig::default());
        collector.collect(&PassSelection {
            tracked: Vec::new(),
            folded: Vec::new(),
        });
        let samples = collector.samples();
        let cpus = value_of(&samples, CPUS_METRIC, &[]).expect("cpus");
        assert_eq!(
            cpus as usize,
            std::thread::available_parallelism().unwrap().get()
        );
        for mode in ["user", "system", "idle"] {
            let seconds = value_of(&samples, CPU_SECONDS_METRIC, &[("mode", mode)]);
            assert!(seconds.is_some_and(|s| s > 0.0), "{mode}: {seconds:?}");
        }
        let total = value_of(&samples, MEMORY_TOTAL_METRIC, &[]).unwrap();
        let available = value_of(&samples, MEMORY_AVAILABLE_METRIC, &[]).unwrap();
        let used = value_of(&samples, MEMORY_USED_METRIC, &[]).unwrap();
        assert_eq!(used, total - available);
        assert!(value_of(&samples, NETWORK_RECEIVE_BYTES_METRIC, &[("device", "lo")]).is_some());
        let root = value_of(&samples, FILESYSTEM_SIZE_METRIC, &[("mountpoint", "/")]);
        assert!(root.is_some_and(|size| size > 0.0), "{root:?}");
        let uptime = value_of(&samples, UPTIME_METRIC, &[]).unwrap();
        let boot = value_of(&samples, BOOT_TIME_METRIC, &[]).unwrap();
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs_f64();
        assert!(
            (boot + uptime - now).abs() < 5.0,
            "{boot} + {uptime} vs {now}"
        );
        let info = samples.iter().find(|s| s.name == INFO_METRIC).unwrap();
        assert_eq!(
            info.labels.keys().collect::<Vec<_>>(),
            ["boot_id", "hostname", "kernel"]
        );
        if std::path::Path::new("/proc/pressure/cpu").exists() {
            let some = pressure_metric(PressureResource::Cpu, PressureStall::Some);
            assert!(value_of(&samples, some, &[]).is_some());
        }
        assert_eq!(collector.status(), CollectorStatus::Ok, "on this machine");
    }
}
