//! Vigil's per-node agent: collectors for kernel syscall latency (eBPF), and later GPU (NVML)
//! and process stats, for the model servers on a node.
//!
//! Data flow: `selection` picks the model-server processes, `collectors/*` turn what the node
//! exposes into `sample`s and events, and `snapshot` prints them once.

pub mod attribution;
pub mod collectors;
pub mod config;
pub mod exposition;
pub mod pass;
pub mod sample;
pub mod selection;
pub mod snapshot;
pub mod transport;
