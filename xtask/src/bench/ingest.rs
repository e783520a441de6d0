//! `cargo xtask bench ingest`: the aggregator's ingest path under simulated agents.
//!
//! Starts the release `vigil-aggregator` on 127.0.0.1 (a free port, plaintext, a fresh data
//! directory, the WAL fsyncing as configured by default) and drives it with
//! `target/release/ingest-load` (tests/src/bin/ingest-load.rs), one fresh aggregator per run:
//!
//! 1. throughput: `--throughput-agents` agents (default 64) sending as fast as acks allow
//!    (8 batches unacked at most per agent) for 10 s: samples acked per aggregator CPU-second;
//! 2. latency: `--agents` agents (default 1,000) each sending one batch a second, spread over
//!    the second, for 15 s: ack latency percentiles;
//! 3. the same at `--light-agents` (default 250), a load this machine can carry, to show the
//!    latency of the ingest path when it is not saturated.
//!
//! Runs 1 and 3 go twice: with the stream-delta encoding (docs/protocol.md, what the agent uses
//! against this aggregator) and with plain batches (each message compressed alone, what an
//! agent sends to an aggregator that does not offer it), side by side in one invocation.
//!
//! Every run first lets all agents connect and declare their series (timed apart as
//! "declare s"); the figures are of the sending that follows. Aggregator CPU is utime + stime
//! from /proc/<pid>/stat from the generator's `ingest-load: sending` line to its exit; the
//! generator's own CPU is its getrusage over the same span. Figures are printed and written to
//! target/bench/ingest.json. Targets are reported as met or NOT met, never asserted.

use std::{
    io::{BufRead, BufReader},
    path::Path,
    process::{Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};

use super::{aggregator_process::AggregatorProcess, collect::write_report};
use crate::workspace::Workspace;

const THROUGHPUT_SECONDS: u64 = 10;
const LATENCY_SECONDS: u64 = 15;
/// Targets from the issue.
const MIN_SAMPLES_PER_CORE: f64 = 1_000_000.0;
const MAX_P99_MS: f64 = 100.0;
const MAX_BYTES_PER_SAMPLE: f64 = 3.0;

fn run_once(
    ws: &Workspace,
    name: &str,
    generator_args: &[String],
    budget: Duration,
) -> Result<Value> {
    let release = ws.target.join("release");
    let dir =
        std::env::temp_dir().join(format!("vigil-bench-ingest-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let aggregator = AggregatorProcess::start(
        &release.join("vigil-aggregator"),
        &dir,
        "[tls]\nplaintext = true\n",
        false,
    )?;
    let report = drive(&release, &aggregator, name, generator_args, budget);
    drop(aggregator);
    let _ = std::fs::remove_dir_all(&dir);
    report
}

/// Runs the generator against `aggregator` and adds the aggregator's figures to its report.
fn drive(
    release: &Path,
    aggregator: &AggregatorProcess,
    name: &str,
    generator_args: &[String],
    budget: Duration,
) -> Result<Value> {
    let cpu_at_start = aggregator.cpu_seconds()?;
    eprintln!(
        "bench ingest: {name}: ingest-load {} against 127.0.0.1:{}",
        generator_args.join(" "),
        aggregator.grpc_port
    );
    let mut generator = Command::new(release.join("ingest-load"))
        .args(["--endpoint", &format!("127.0.0.1:{}", aggregator.grpc_port)])
        .args(generator_args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .context("starting target/release/ingest-load")?;
    let stdout = generator.stdout.take().context("ingest-load stdout")?;
    let (lines_tx, lines) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if lines_tx.send(line).is_err() {
                break;
            }
        }
    });
    let deadline = Instant::now() + budget;
    // The aggregator's CPU from the moment every agent has declared its series.
    let mut cpu_at_send = None;
    let mut output = String::new();
    let take_lines = |cpu_at_send: &mut Option<f64>, output: &mut String| -> Result<()> {
        while let Ok(line) = lines.try_recv() {
            if line.trim() == "ingest-load: sending" {
                *cpu_at_send = Some(aggregator.cpu_seconds()?);
            } else if !line.trim().is_empty() {
                *output = line;
            }
        }
        Ok(())
    };
    let status = loop {
        take_lines(&mut cpu_at_send, &mut output)?;
        if let Some(status) = generator.try_wait()? {
            break status;
        }
        if Instant::now() >= deadline {
            let _ = generator.kill();
            let _ = generator.wait();
            bail!("ingest-load ran past {budget:?}: killed");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let cpu_at_end = aggregator.cpu_seconds()?;
    // The reader thread ends with the pipe; collect what it has left.
    std::thread::sleep(Duration::from_millis(100));
    take_lines(&mut cpu_at_send, &mut output)?;
    if !status.success() {
        bail!("ingest-load failed ({status})");
    }
    let cpu_at_send = cpu_at_send.context("ingest-load never started sending")?;
    let mut report: Value = serde_json::from_str(output.trim()).context("ingest-load report")?;
    report["aggregator"] = json!({
        "cpu_s": cpu_at_end - cpu_at_send,
        "cpu_s_declaring": cpu_at_send - cpu_at_start,
        "peak_rss_mib": aggregator.peak_rss_mib(),
        "wal_bytes": aggregator.data_bytes(""),
    });
    Ok(report)
}

/// Derived figures of one run.
struct Figures {
    samples_per_s: f64,
    samples_per_core: f64,
    aggregator_cores: f64,
    generator_cores: f64,
    tcp_bytes_per_sample: f64,
    frame_bytes_per_sample: f64,
    wal_bytes_per_sample: f64,
    p50: f64,
    p99: f64,
    declare_s: f64,
    unacked: u64,
    failed: u64,
}

fn figures(report: &Value) -> Figures {
    let f = |v: &Value| v.as_f64().unwrap_or(f64::NAN);
    let samples = f(&report["samples_acked"]);
    let run_s = f(&report["run_s"]);
    let cpu = f(&report["aggregator"]["cpu_s"]);
    Figures {
        samples_per_s: f(&report["samples_acked_per_s"]),
        samples_per_core: samples / cpu,
        aggregator_cores: cpu / run_s,
        generator_cores: f(&report["generator_cpu_s_while_sending"]) / run_s,
        tcp_bytes_per_sample: f(&report["wire"]["tcp_bytes_written_while_sending"]) / samples,
        frame_bytes_per_sample: f(&report["wire"]["grpc_frame_bytes_per_batch_zstd"])
            / f(&report["samples_per_batch"]),
        wal_bytes_per_sample: f(&report["aggregator"]["wal_bytes"]) / samples,
        p50: f(&report["latency_ms"]["p50"]),
        p99: f(&report["latency_ms"]["p99"]),
        declare_s: f(&report["declare_s"]),
        unacked: report["batches_unacked_at_end"].as_u64().unwrap_or(0),
        failed: report["agents_failed"].as_u64().unwrap_or(0),
    }
}

pub fn run(
    ws: &Workspace,
    throughput_agents: u32,
    latency_agents: u32,
    light_agents: u32,
) -> Result<()> {
    for binary in ["vigil-aggregator", "ingest-load"] {
        let path = ws.target.join("release").join(binary);
        if !path.exists() {
            bail!(
                "{} is missing: `cargo xtask build` builds it",
                path.display()
            );
        }
    }
    let args =
        |agents: u32, mode: &str, seconds: u64, window: u32, encoding: &str| -> Vec<String> {
            [
                "--encoding",
                encoding,
                "--agents",
                &agents.to_string(),
                "--mode",
                mode,
                "--duration-s",
                &seconds.to_string(),
                "--window",
                &window.to_string(),
                "--threads",
                "2",
            ]
            .iter()
            .map(|s| s.to_string())
            .collect()
        };
    // Each run: warm-up, sending, up to 10 s draining, plus slack.
    let budget = |seconds: u64| Duration::from_secs(seconds + 60);
    let runs: Vec<(&str, Vec<String>, u64)> = vec![
        (
            "throughput",
            args(
                throughput_agents,
                "throughput",
                THROUGHPUT_SECONDS,
                8,
                "delta",
            ),
            THROUGHPUT_SECONDS,
        ),
        (
            "latency",
            args(latency_agents, "interval", LATENCY_SECONDS, 64, "delta"),
            LATENCY_SECONDS,
        ),
        (
            "latency-light",
            args(light_agents, "interval", LATENCY_SECONDS, 64, "delta"),
            LATENCY_SECONDS,
        ),
        (
            "throughput",
            args(
                throughput_agents,
                "throughput",
                THROUGHPUT_SECONDS,
                8,
                "plain",
            ),
            THROUGHPUT_SECONDS,
        ),
        (
            "latency-light",
            args(light_agents, "interval", LATENCY_SECONDS, 64, "plain"),
            LATENCY_SECONDS,
        ),
    ];
    let mut reports = Vec::new();
    for (name, generator_args, seconds) in &runs {
        let report = run_once(ws, name, generator_args, budget(*seconds))
            .with_context(|| format!("bench ingest: run {name}"))?;
        reports.push((*name, report));
    }

    println!();
    let first = &reports[0].1;
    println!(
        "per agent and batch: {} values + {} histograms = {} samples; WAL fsync before every ack",
        first["values_per_batch"], first["histograms_per_batch"], first["samples_per_batch"]
    );
    println!(
        "{:<14} {:>6} {:>6} {:>9} {:>11} {:>12} {:>9} {:>9} {:>8} {:>8} {:>9} {:>9} {:>8}",
        "run",
        "enc",
        "agents",
        "declare s",
        "samples/s",
        "samples/core",
        "agg cores",
        "gen cores",
        "p50 ms",
        "p99 ms",
        "B/sample",
        "WAL B/smp",
        "unacked"
    );
    let mut all = Vec::new();
    for (name, report) in &reports {
        let f = figures(report);
        println!(
            "{:<14} {:>6} {:>6} {:>9.1} {:>11.0} {:>12.0} {:>9.2} {:>9.2} {:>8.1} {:>8.1} {:>9.2} {:>9.1} {:>8}",
            name,
            report["encoding"].as_str().unwrap_or("?"),
            report["agents"],
            f.declare_s,
            f.samples_per_s,
            f.samples_per_core,
            f.aggregator_cores,
            f.generator_cores,
            f.p50,
            f.p99,
            f.tcp_bytes_per_sample,
            f.wal_bytes_per_sample,
            f.unacked
        );
        if f.failed > 0 {
            println!(
                "  {name}: {} agents failed; first: {}",
                f.failed, report["first_errors"]
            );
        }
        all.push((name, f));
    }
    let throughput = &all[0].1;
    let latency = &all[1].1;
    let plain = &all[3].1;
    println!();
    for (encoding, f, report) in [
        ("delta", throughput, &reports[0].1),
        ("plain", plain, &reports[3].1),
    ] {
        println!(
            "wire, {encoding}: {:.2} B/sample counted on the sockets while sending (HTTP/2 + gRPC \
             framing); {:.2} B/sample in a steady-state gRPC frame (zstd level 3); parts of one \
             batch: {}",
            f.tcp_bytes_per_sample, f.frame_bytes_per_sample, report["wire"]["parts_of_one_batch"]
        );
    }
    println!(
        "delta vs plain, measured side by side: {:.2}x the bytes per sample, {:.2}x the samples \
         per aggregator CPU-second",
        throughput.tcp_bytes_per_sample / plain.tcp_bytes_per_sample,
        throughput.samples_per_core / plain.samples_per_core
    );
    let verdict = |ok: bool| if ok { "met" } else { "NOT met" };
    println!(
        "target: >= {MIN_SAMPLES_PER_CORE:.0} samples/s per aggregator core with WAL fsync: \
         {:.0} ({})",
        throughput.samples_per_core,
        verdict(throughput.samples_per_core >= MIN_SAMPLES_PER_CORE)
    );
    let lower_bound = if latency.unacked > 0 || latency.failed > 0 {
        " (a lower bound: some batches were never acked)"
    } else {
        ""
    };
    println!(
        "target: p99 ack latency <= {MAX_P99_MS} ms at {latency_agents} agents: {:.1} ms{lower_bound} ({})",
        latency.p99,
        verdict(latency.p99 <= MAX_P99_MS && latency.unacked == 0 && latency.failed == 0)
    );
    println!(
        "target: <= {MAX_BYTES_PER_SAMPLE} bytes per sample on the wire: {:.2} ({})",
        throughput.tcp_bytes_per_sample,
        verdict(throughput.tcp_bytes_per_sample <= MAX_BYTES_PER_SAMPLE)
    );

    let json = json!({
        "bench": "ingest",
        "date": time::OffsetDateTime::now_utc()
            .format(&time::format_description::well_known::Rfc3339)?,
        "kernel": std::fs::read_to_string("/proc/sys/kernel/osrelease")?.trim(),
        "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "runs": reports.iter().map(|(name, report)| {
            let f = figures(report);
            json!({
                "name": name,
                "encoding": report["encoding"],
                "generator": report,
                "samples_per_aggregator_cpu_s": f.samples_per_core,
                "aggregator_cores": f.aggregator_cores,
                "generator_cores": f.generator_cores,
                "tcp_bytes_per_sample": f.tcp_bytes_per_sample,
                "grpc_frame_bytes_per_sample": f.frame_bytes_per_sample,
                "wal_bytes_per_sample": f.wal_bytes_per_sample,
            })
        }).collect::<Vec<_>>(),
        "targets": {
            "samples_per_core": {"min": MIN_SAMPLES_PER_CORE, "value": throughput.samples_per_core,
                "met": throughput.samples_per_core >= MIN_SAMPLES_PER_CORE},
            "p99_ack_latency_ms": {"max": MAX_P99_MS, "agents": latency_agents, "value": latency.p99,
                "met": latency.p99 <= MAX_P99_MS && latency.unacked == 0 && latency.failed == 0},
            "bytes_per_sample": {"max": MAX_BYTES_PER_SAMPLE, "value": throughput.tcp_bytes_per_sample,
                "met": throughput.tcp_bytes_per_sample <= MAX_BYTES_PER_SAMPLE},
        },
    });
    write_report(ws, "ingest.json", &json)
}
