//! `cargo xtask bench collect`: CPU time of one pass of the process and host collectors with
//! ~300 processes on the machine, 64 of them tracked model servers, and the agent's memory while
//! it runs passes at a 1 s interval (`vigil-agent collect-bench`).

use std::process::{Child, Command, Stdio};

use anyhow::{Context, Result, bail};
use serde_json::Value;

use crate::workspace::Workspace;

/// Model servers the agent tracks (its default budget), and other processes beside them.
const TRACKED: usize = 64;
const OTHERS: usize = 236;
pub(super) const MARKER: &str = "vigil-bench-server";
/// Targets from the issue: per-pass CPU time and agent memory.
const MAX_PASS_MS: f64 = 5.0;
const MAX_RSS_MIB: f64 = 30.0;

/// Idle processes that die with the benchmark, even when it fails.
pub(super) struct Crowd(Vec<Child>);

impl Crowd {
    /// Pids of the processes `--track MARKER` selects.
    pub(super) fn tracked_pids(&self, tracked: usize) -> Vec<u32> {
        self.0.iter().take(tracked).map(Child::id).collect()
    }
}

impl Drop for Crowd {
    fn drop(&mut self) {
        for child in &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// `tracked` idle processes with [`MARKER`] as argv[0] (the first ones), then `others`.
pub(super) fn spawn_crowd(tracked: usize, others: usize) -> Result<Crowd> {
    let mut crowd = Crowd(Vec::new());
    for index in 0..tracked + others {
        let mut command = if index < tracked {
            // argv[0] carries the marker, so `--track` selects exactly these.
            let mut c = Command::new("bash");
            c.args(["-c", &format!("exec -a {MARKER} sleep 600")]);
            c
        } else {
            let mut c = Command::new("sleep");
            c.arg("600");
            c
        };
        let child = command
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .context("spawning idle processes")?;
        crowd.0.push(child);
    }
    // Let the `bash -c exec` processes become `sleep`.
    std::thread::sleep(std::time::Duration::from_millis(300));
    Ok(crowd)
}

fn processes_on_the_machine() -> usize {
    std::fs::read_dir("/proc")
        .map(|dir| {
            dir.filter_map(|e| e.ok())
                .filter(|e| e.file_name().to_string_lossy().parse::<u32>().is_ok())
                .count()
        })
        .unwrap_or(0)
}

/// Runs `vigil-agent collect-bench --passes N --interval 1s` with `configure`'s extra arguments
/// and environment, and returns its report.
pub(super) fn run_collect_bench(
    ws: &Workspace,
    passes: u32,
    configure: impl FnOnce(&mut Command),
) -> Result<Value> {
    let mut command = Command::new(ws.agent_binary());
    command
        .args(["collect-bench", "--track", MARKER])
        .args(["--passes", &passes.to_string(), "--interval", "1s"])
        .stderr(Stdio::inherit());
    configure(&mut command);
    let output = command
        .output()
        .context("running vigil-agent collect-bench")?;
    if !output.status.success() {
        bail!("vigil-agent collect-bench failed ({})", output.status);
    }
    serde_json::from_slice(&output.stdout).context("parsing collect-bench output")
}

/// Per-pass CPU figures: the first pass (cold caches, first classification) apart from the
/// steady state of the others.
pub(super) struct PassFigures {
    pub first: f64,
    pub median: f64,
    pub p90: f64,
}

impl PassFigures {
    pub(super) fn of(pass_ms: &[f64]) -> Self {
        let first = pass_ms[0];
        let mut steady = pass_ms[1..].to_vec();
        if steady.is_empty() {
            steady.push(first);
        }
        steady.sort_by(f64::total_cmp);
        Self {
            first,
            median: percentile(&steady, 0.5),
            p90: percentile(&steady, 0.9),
        }
    }
}

/// Writes a benchmark's JSON report under target/bench/.
pub(super) fn write_report(ws: &Workspace, file: &str, report: &Value) -> Result<()> {
    let dir = ws.bench_dir();
    std::fs::create_dir_all(&dir)?;
    let path = dir.join(file);
    std::fs::write(&path, serde_json::to_string_pretty(report)?)?;
    eprintln!("bench: figures written to {}", path.display());
    Ok(())
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    let rank = ((p * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

pub fn run(ws: &Workspace, passes: u32) -> Result<()> {
    let crowd = spawn_crowd(TRACKED, OTHERS)?;
    let processes = processes_on_the_machine();
    let report = run_collect_bench(ws, passes, |command| {
        command.args(["--collectors", "process,host"]);
    });
    drop(crowd);
    let report = report?;

    let pass_ms: Vec<f64> = report["passes"]
        .as_array()
        .context("passes")?
        .iter()
        .map(|p| p["total_ns"].as_f64().unwrap_or(0.0) / 1e6)
        .collect();
    let tracked = report["passes"][0]["tracked"].as_u64().unwrap_or(0);
    if tracked != TRACKED as u64 {
        bail!("the agent tracked {tracked} model servers, expected {TRACKED}");
    }
    let collectors: Vec<String> = report["collectors"]
        .as_object()
        .map(|m| m.keys().cloned().collect())
        .unwrap_or_default();
    if collectors.is_empty() {
        bail!("vigil-agent ran none of the process and host collectors");
    }
    // The first pass warms caches and allocates; report it apart from the steady state.
    let PassFigures { first, median, p90 } = PassFigures::of(&pass_ms);
    let mib = |v: &Value| v.as_f64().unwrap_or(0.0) / (1024.0 * 1024.0);
    let rss = mib(&report["rss_bytes"]);
    let peak_rss = mib(&report["peak_rss_bytes"]);

    println!();
    println!("processes on the machine: {processes}; tracked model servers: {tracked}");
    println!(
        "collectors: {} ({passes} passes, 1 s apart)",
        collectors.join(", ")
    );
    println!("{:<28} {:>10}", "figure", "value");
    println!("{:<28} {:>10.3}", "first pass CPU ms", first);
    println!("{:<28} {:>10.3}", "pass CPU ms (median)", median);
    println!("{:<28} {:>10.3}", "pass CPU ms (p90)", p90);
    println!("{:<28} {:>10.1}", "agent RSS MiB", rss);
    println!("{:<28} {:>10.1}", "agent peak RSS MiB", peak_rss);
    println!();
    let verdict = |ok: bool| if ok { "met" } else { "NOT met" };
    println!(
        "target: pass CPU <= {MAX_PASS_MS} ms: median {median:.3} ms ({})",
        verdict(median <= MAX_PASS_MS)
    );
    println!(
        "target: agent RSS <= {MAX_RSS_MIB} MiB: peak {peak_rss:.1} MiB ({})",
        verdict(peak_rss <= MAX_RSS_MIB)
    );

    let json = serde_json::json!({
        "bench": "collect",
        "date": time::OffsetDateTime::now_utc()
            .format(&time::format_description::well_known::Rfc3339)?,
        "kernel": std::fs::read_to_string("/proc/sys/kernel/osrelease")?.trim(),
        "processes_on_machine": processes,
        "tracked": tracked,
        "collectors": collectors,
        "pass_cpu_ms": pass_ms,
        "first_pass_cpu_ms": first,
        "median_pass_cpu_ms": median,
        "p90_pass_cpu_ms": p90,
        "rss_mib": rss,
        "peak_rss_mib": peak_rss,
        "targets": {
            "pass_cpu_ms": {"max": MAX_PASS_MS, "met": median <= MAX_PASS_MS},
            "peak_rss_mib": {"max": MAX_RSS_MIB, "met": peak_rss <= MAX_RSS_MIB},
        },
        "agent_report": report,
    });
    write_report(ws, "collect.json", &json)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_take_the_nearest_rank() {
        let sorted = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0];
        assert_eq!(percentile(&sorted, 0.5), 5.0);
        assert_eq!(percentile(&sorted, 0.9), 9.0);
        assert_eq!(percentile(&[3.0], 0.9), 3.0);
    }
}
