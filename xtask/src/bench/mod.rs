//! `cargo xtask bench NAME`: benchmarks that need the release build and a real kernel.

mod aggregator_process;
mod alert_latency;
mod anomaly;
mod collect;
mod gpu;
mod ingest;
mod probe_process;
mod storage;
mod syscall_overhead;

use anyhow::Result;
use clap::{Args, ValueEnum};

use crate::workspace::Workspace;

#[derive(Args)]
pub struct BenchArgs {
    /// The benchmark to run.
    name: BenchName,
    /// syscall-overhead: getppid calls timed per setup and round.
    #[arg(long, default_value = "2_000_000", value_parser = parse_count)]
    calls: u64,
    /// syscall-overhead: rounds; each round measures every setup once, in a rotated order.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..))]
    rounds: u32,
    /// collect, gpu: collection passes, 1 s apart.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u32).range(2..))]
    passes: u32,
    /// ingest: simulated agents in the throughput run (as fast as acks allow).
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..=5000))]
    throughput_agents: u32,
    /// ingest: simulated agents in the latency run (one batch a second each).
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..=5000))]
    agents: u32,
    /// ingest: simulated agents in the second, lighter latency run.
    #[arg(long, default_value_t = 250, value_parser = clap::value_parser!(u32).range(1..=5000))]
    light_agents: u32,
    /// storage: hours of 1 s data in the float run.
    #[arg(long, default_value_t = 24.0)]
    hours: f64,
    /// storage: nodes in the histogram run.
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..=1000))]
    nodes: u32,
    /// alert-latency: XID events from the stand-in driver (each a new alert; at most 104).
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..=104))]
    xid_events: u32,
    /// alert-latency: simulated agents that go silent, one second apart.
    #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u32).range(1..=1000))]
    silent_nodes: u32,
}

#[derive(Clone, Copy, ValueEnum)]
enum BenchName {
    /// ns per getppid syscall with no probe, empty programs, Vigil's programs and bpftrace.
    SyscallOverhead,
    /// CPU time of a process + host collection pass with 300 processes (64 tracked), and the
    /// agent's memory.
    Collect,
    /// CPU time of a gpu collection pass over 8 GPUs and 64 processes on the stand-in NVML.
    Gpu,
    /// Samples/s per aggregator core, ack latency and bytes per sample with simulated agents
    /// (target/release/ingest-load) against the release aggregator on 127.0.0.1.
    Ingest,
    /// Bytes per sample on disk (against Prometheus's TSDB on the same data), memory per
    /// series and query latency of the aggregator's store (target/release/storage-load).
    Storage,
    /// Precision, recall and false alarms per series-day of the anomaly detector on generated
    /// series (target/release/anomaly-eval).
    Anomaly,
    /// Time from a GPU XID at the (stand-in) driver, and from an agent going silent, to a real
    /// Alertmanager (p50/p99), and the cost of one evaluation round of 200 rules over 100
    /// nodes (target/release/silent-nodes, rule-eval).
    AlertLatency,
}

pub fn run(ws: &Workspace, args: &BenchArgs) -> Result<()> {
    match args.name {
        BenchName::SyscallOverhead => syscall_overhead::run(ws, args.calls, args.rounds),
        BenchName::Collect => collect::run(ws, args.passes),
        BenchName::Gpu => gpu::run(ws, args.passes),
        BenchName::Ingest => {
            ingest::run(ws, args.throughput_agents, args.agents, args.light_agents)
        }
        BenchName::Storage => storage::run(ws, args.hours, args.nodes),
        BenchName::Anomaly => anomaly::run(ws),
        BenchName::AlertLatency => alert_latency::run(ws, args.xid_events, args.silent_nodes),
    }
}

/// A positive count, with optional `_` separators (`2_000_000`).
fn parse_count(text: &str) -> Result<u64, String> {
    match text.replace('_', "").parse::<u64>() {
        Ok(0) => Err("must be at least 1".to_string()),
        Ok(count) => Ok(count),
        Err(err) => Err(format!("not a count: {err}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_accept_underscore_separators_and_reject_zero() {
        assert_eq!(parse_count("2_000_000"), Ok(2_000_000));
        assert_eq!(parse_count("500"), Ok(500));
        assert!(parse_count("0").is_err());
        assert!(parse_count("lots").is_err());
    }
}
