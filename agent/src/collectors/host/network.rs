//! Per-interface traffic counters from /proc/net/dev.

use super::{SourceError, labels, push};
use crate::sample::Sample;

pub const NETWORK_RECEIVE_BYTES_METRIC: &str = "vigil_host_network_receive_bytes_total";
pub const NETWORK_TRANSMIT_BYTES_METRIC: &str = "vigil_host_network_transmit_bytes_total";
pub const NETWORK_RECEIVE_PACKETS_METRIC: &str = "vigil_host_network_receive_packets_total";
pub const NETWORK_TRANSMIT_PACKETS_METRIC: &str = "vigil_host_network_transmit_packets_total";
pub const NETWORK_RECEIVE_ERRORS_METRIC: &str = "vigil_host_network_receive_errors_total";
pub const NETWORK_TRANSMIT_ERRORS_METRIC: &str = "vigil_host_network_transmit_errors_total";

const NET_DEV_PATH: &str = "/proc/net/dev";

/// Which interfaces are reported (`host.exclude_network_device_prefixes`).
pub(super) struct NetworkFilter {
    excluded_prefixes: Vec<String>,
}

impl NetworkFilter {
    pub(super) fn new(excluded_prefixes: &[String]) -> Self {
        Self {
            excluded_prefixes: excluded_prefixes.to_vec(),
        }
    }

    fn includes(&self, device: &str) -> bool {
        !self
            .excluded_prefixes
            .iter()
            .any(|prefix| device.starts_with(prefix.as_str()))
    }
}

/// Interfaces of this network namespace (the host's when the agent runs with hostNetwork).
pub(super) fn collect(filter: &NetworkFilter, out: &mut Vec<Sample>) -> Result<(), SourceError> {
    let devices = procfs::net::dev_status().map_err(|source| SourceError::Procfs {
        path: NET_DEV_PATH,
        source,
    })?;
    let mut devices: Vec<_> = devices
        .into_values()
        .filter(|device| filter.includes(&device.name))
        .collect();
    devices.sort_by(|a, b| a.name.cmp(&b.name));
    for device in devices {
        let counters = [
            (NETWORK_RECEIVE_BYTES_METRIC, device.recv_bytes),
            (NETWORK_TRANSMIT_BYTES_METRIC, device.sent_bytes),
            (NETWORK_RECEIVE_PACKETS_METRIC, device.recv_packets),
            (NETWORK_TRANSMIT_PACKETS_METRIC, device.sent_packets),
            (NETWORK_RECEIVE_ERRORS_METRIC, device.recv_errs),
            (NETWORK_TRANSMIT_ERRORS_METRIC, device.sent_errs),
        ];
        for (name, value) in counters {
            push(out, name, labels([("device", &device.name)]), value as f64);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::collectors::host::DEFAULT_EXCLUDED_NETWORK_DEVICE_PREFIXES;

    #[test]
    fn per_pod_interfaces_are_left_out_by_default_and_node_interfaces_kept() {
        let prefixes: Vec<String> = DEFAULT_EXCLUDED_NETWORK_DEVICE_PREFIXES
            .iter()
            .map(|s| s.to_string())
            .collect();
        let filter = NetworkFilter::new(&prefixes);
        for pod_side in ["veth1a2b3c4", "cali0ef24b1a2b3", "lxc9f8e7d6c5b4a"] {
            assert!(!filter.includes(pod_side), "{pod_side}");
        }
        for node_side in ["lo", "eth0", "ens5", "bond0", "ib0", "cilium_host", "cni0"] {
            assert!(filter.includes(node_side), "{node_side}");
        }
    }

    #[test]
    fn an_empty_prefix_list_keeps_every_interface() {
        let filter = NetworkFilter::new(&[]);
        assert!(filter.includes("veth1a2b3c4"));
    }
}
