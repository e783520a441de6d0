//! `cargo xtask gpu-check`: the real-GPU truth check. Runs the agent's snapshot against the real
//! NVIDIA driver and compares it with `nvidia-smi`, read just before and just after, within
//! stated tolerances; prints a table and fails on any disagreement.
//!
//! On a GPU machine without a Rust toolchain, build here and carry both binaries:
//! `target/release/xtask gpu-check --agent target/release/vigil-agent`.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

use anyhow::{Context, Result, bail};
use serde_json::Value;

/// `nvidia-smi --query-gpu` fields, in order, and how each maps to the agent's metric.
const GPU_FIELDS: &str = "uuid,index,name,utilization.gpu,memory.used,memory.total,power.draw,temperature.gpu,clocks.sm,clocks.mem";

const MIB: f64 = 1024.0 * 1024.0;

/// One GPU as nvidia-smi reports it (None: `[N/A]` or `[Not Supported]`).
#[derive(Debug, Clone, PartialEq)]
pub struct SmiGpu {
    pub uuid: String,
    pub index: String,
    pub name: String,
    pub utilization_pct: Option<f64>,
    pub memory_used_mib: Option<f64>,
    pub memory_total_mib: Option<f64>,
    pub power_w: Option<f64>,
    pub temperature_c: Option<f64>,
    pub sm_clock_mhz: Option<f64>,
    pub mem_clock_mhz: Option<f64>,
}

fn number(field: &str) -> Option<f64> {
    field.trim().parse().ok()
}

/// Parses `--query-gpu=GPU_FIELDS --format=csv,noheader,nounits`.
pub fn parse_gpus(csv: &str) -> Result<Vec<SmiGpu>> {
    csv.lines()
        .filter(|line| !line.trim().is_empty())
        .map(|line| {
            let f: Vec<&str> = line.split(',').map(str::trim).collect();
            if f.len() != 10 {
                bail!("unexpected nvidia-smi line ({} fields): {line}", f.len());
            }
            Ok(SmiGpu {
                uuid: f[0].to_string(),
                index: f[1].to_string(),
                name: f[2].to_string(),
                utilization_pct: number(f[3]),
                memory_used_mib: number(f[4]),
                memory_total_mib: number(f[5]),
                power_w: number(f[6]),
                temperature_c: number(f[7]),
                sm_clock_mhz: number(f[8]),
                mem_clock_mhz: number(f[9]),
            })
        })
        .collect()
}

/// Parses `--query-compute-apps=gpu_uuid,pid,used_memory`: MiB per GPU uuid, and the pids.
pub fn parse_apps(csv: &str) -> (BTreeMap<String, f64>, Vec<u32>) {
    let mut per_gpu = BTreeMap::new();
    let mut pids = Vec::new();
    for line in csv.lines() {
        let f: Vec<&str> = line.split(',').map(str::trim).collect();
        if f.len() != 3 {
            continue;
        }
        if let Ok(pid) = f[1].parse() {
            pids.push(pid);
        }
        *per_gpu.entry(f[0].to_string()).or_insert(0.0) += number(f[2]).unwrap_or(0.0);
    }
    (per_gpu, pids)
}

/// One compared figure.
#[derive(Debug, Clone, PartialEq)]
pub struct Check {
    pub gpu: String,
    pub field: &'static str,
    /// nvidia-smi before and after the snapshot.
    pub smi: (f64, f64),
    pub vigil: Option<f64>,
    /// Allowed distance outside [min(smi), max(smi)].
    pub tolerance: f64,
    pub unit: &'static str,
}

impl Check {
    pub fn ok(&self) -> bool {
        let (lo, hi) = (self.smi.0.min(self.smi.1), self.smi.0.max(self.smi.1));
        self.vigil
            .is_some_and(|v| v >= lo - self.tolerance && v <= hi + self.tolerance)
    }
}

/// The agent's value of `name` for the GPU with `uuid` (and extra label matches).
fn vigil_value(samples: &[Value], name: &str, uuid: &str, extra: &[(&str, &str)]) -> Option<f64> {
    samples
        .iter()
        .find(|s| {
            s["name"] == name
                && s["labels"]["uuid"] == uuid
                && extra.iter().all(|(k, v)| s["labels"][*k] == *v)
        })
        .and_then(|s| s["value"].as_f64())
}

fn vigil_sum(samples: &[Value], name: &str, uuid: &str) -> f64 {
    samples
        .iter()
        .filter(|s| s["name"] == name && s["labels"]["uuid"] == uuid)
        .filter_map(|s| s["value"].as_f64())
        .sum()
}

/// Everything compared, GPU by GPU. Tolerances: exact-ish for fixed quantities, a margin around
/// the before/after range of nvidia-smi for ones that move while the snapshot runs.
pub fn compare(
    before: &[SmiGpu],
    after: &[SmiGpu],
    apps_mib: &BTreeMap<String, f64>,
    samples: &[Value],
) -> Vec<Check> {
    let mut checks = Vec::new();
    for gpu in before {
        let later = after.iter().find(|g| g.uuid == gpu.uuid).unwrap_or(gpu);
        let uuid = gpu.uuid.as_str();
        let mut add = |field, smi: (Option<f64>, Option<f64>), vigil, tolerance, unit| {
            if let (Some(a), Some(b)) = smi {
                checks.push(Check {
                    gpu: format!("{} {}", gpu.index, gpu.name),
                    field,
                    smi: (a, b),
                    vigil,
                    tolerance,
                    unit,
                });
            }
        };
        let total = gpu.memory_total_mib.unwrap_or(0.0);
        add(
            "memory.total",
            (gpu.memory_total_mib, later.memory_total_mib),
            vigil_value(samples, "vigil_gpu_memory_total_bytes", uuid, &[]).map(|b| b / MIB),
            1.0,
            "MiB",
        );
        add(
            "memory.used",
            (gpu.memory_used_mib, later.memory_used_mib),
            vigil_value(samples, "vigil_gpu_memory_used_bytes", uuid, &[]).map(|b| b / MIB),
            (total * 0.02).max(256.0),
            "MiB",
        );
        add(
            "utilization.gpu",
            (gpu.utilization_pct, later.utilization_pct),
            vigil_value(samples, "vigil_gpu_utilization_ratio", uuid, &[]).map(|r| r * 100.0),
            10.0,
            "%",
        );
        let power_margin = gpu.power_w.unwrap_or(0.0).max(later.power_w.unwrap_or(0.0)) * 0.1;
        add(
            "power.draw",
            (gpu.power_w, later.power_w),
            vigil_value(samples, "vigil_gpu_power_watts", uuid, &[]),
            power_margin.max(5.0),
            "W",
        );
        add(
            "temperature.gpu",
            (gpu.temperature_c, later.temperature_c),
            vigil_value(samples, "vigil_gpu_temperature_celsius", uuid, &[]),
            3.0,
            "C",
        );
        for (field, smi, clock) in [
            ("clocks.sm", (gpu.sm_clock_mhz, later.sm_clock_mhz), "sm"),
            (
                "clocks.mem",
                (gpu.mem_clock_mhz, later.mem_clock_mhz),
                "memory",
            ),
        ] {
            let margin = smi.0.unwrap_or(0.0).max(smi.1.unwrap_or(0.0)) * 0.05;
            add(
                field,
                smi,
                vigil_value(samples, "vigil_gpu_clock_hertz", uuid, &[("clock", clock)])
                    .map(|hz| hz / 1e6),
                margin.max(15.0),
                "MHz",
            );
        }
        // Process memory: tracked servers' series plus the untracked total.
        let apps = apps_mib.get(uuid).copied().unwrap_or(0.0);
        let vigil_apps = (vigil_sum(samples, "vigil_gpu_process_memory_used_bytes", uuid)
            + vigil_sum(
                samples,
                "vigil_gpu_untracked_process_memory_used_bytes",
                uuid,
            ))
            / MIB;
        add(
            "compute-apps memory",
            (Some(apps), Some(apps)),
            Some(vigil_apps),
            (apps * 0.05).max(64.0),
            "MiB",
        );
    }
    checks
}

fn nvidia_smi(args: &[&str]) -> Result<String> {
    let output = Command::new("nvidia-smi")
        .args(args)
        .output()
        .context("running nvidia-smi (is the NVIDIA driver installed?)")?;
    if !output.status.success() {
        bail!(
            "nvidia-smi {args:?} failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

fn query_gpus() -> Result<Vec<SmiGpu>> {
    parse_gpus(&nvidia_smi(&[
        &format!("--query-gpu={GPU_FIELDS}"),
        "--format=csv,noheader,nounits",
    ])?)
}

pub fn run(agent: &Path, duration: &str) -> Result<()> {
    let before = query_gpus()?;
    if before.is_empty() {
        bail!("nvidia-smi lists no GPU");
    }
    let output = Command::new(agent)
        .args(["snapshot", "--duration", duration, "--format", "json"])
        .output()
        .with_context(|| format!("running {}", agent.display()))?;
    if !output.status.success() {
        bail!(
            "vigil-agent snapshot failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let after = query_gpus()?;
    let (apps_mib, pids) = parse_apps(&nvidia_smi(&[
        "--query-compute-apps=gpu_uuid,pid,used_memory",
        "--format=csv,noheader,nounits",
    ])?);
    let document: Value = serde_json::from_slice(&output.stdout).context("snapshot JSON")?;
    let status = &document["collectors"]["gpu"];
    println!("gpu collector: {status}");
    println!("nvidia-smi compute apps: {} (pids {pids:?})", pids.len());
    let samples = document["samples"].as_array().cloned().unwrap_or_default();
    let checks = compare(&before, &after, &apps_mib, &samples);

    println!(
        "{:<28} {:<20} {:>22} {:>12} {:>10}  result",
        "gpu", "field", "nvidia-smi (before-after)", "vigil", "tolerance"
    );
    for check in &checks {
        let vigil = check
            .vigil
            .map_or("missing".to_string(), |v| format!("{v:.1}"));
        println!(
            "{:<28} {:<20} {:>22} {:>12} {:>10}  {}",
            check.gpu,
            check.field,
            format!("{:.1}-{:.1} {}", check.smi.0, check.smi.1, check.unit),
            vigil,
            format!("+-{:.1}", check.tolerance),
            if check.ok() { "ok" } else { "DISAGREE" }
        );
    }
    let bad = checks.iter().filter(|c| !c.ok()).count();
    if status["status"] == "unavailable" {
        bail!("the gpu collector is unavailable: {}", status["reason"]);
    }
    if bad > 0 {
        bail!("{bad} of {} figures disagree with nvidia-smi", checks.len());
    }
    println!(
        "gpu-check: all {} figures agree with nvidia-smi",
        checks.len()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const UUID: &str = "GPU-5a1c0d3e-0000-4000-8000-000000000000";

    fn smi(util: f64, power: f64) -> SmiGpu {
        SmiGpu {
            uuid: UUID.into(),
            index: "0".into(),
            name: "NVIDIA H200".into(),
            utilization_pct: Some(util),
            memory_used_mib: Some(40960.0),
            memory_total_mib: Some(143771.0),
            power_w: Some(power),
            temperature_c: Some(41.0),
            sm_clock_mhz: Some(1980.0),
            mem_clock_mhz: Some(3201.0),
        }
    }

    fn sample(name: &str, value: f64, extra: &[(&str, &str)]) -> Value {
        let mut labels = json!({"uuid": UUID, "gpu": "0"});
        for (k, v) in extra {
            labels[*k] = json!(v);
        }
        json!({"name": name, "labels": labels, "value": value})
    }

    fn agreeing_samples() -> Vec<Value> {
        vec![
            sample("vigil_gpu_memory_total_bytes", 143771.0 * MIB, &[]),
            sample("vigil_gpu_memory_used_bytes", 40960.0 * MIB, &[]),
            sample("vigil_gpu_utilization_ratio", 0.5, &[]),
            sample("vigil_gpu_power_watts", 300.0, &[]),
            sample("vigil_gpu_temperature_celsius", 41.0, &[]),
            sample("vigil_gpu_clock_hertz", 1980e6, &[("clock", "sm")]),
            sample("vigil_gpu_clock_hertz", 3201e6, &[("clock", "memory")]),
            sample(
                "vigil_gpu_process_memory_used_bytes",
                30000.0 * MIB,
                &[("pid", "7")],
            ),
            sample(
                "vigil_gpu_untracked_process_memory_used_bytes",
                10000.0 * MIB,
                &[],
            ),
        ]
    }

    #[test]
    fn nvidia_smi_csv_parses_with_not_available_fields_left_out() {
        let csv = format!("{UUID}, 0, NVIDIA H200, 50, 40960, 143771, [N/A], 41, 1980, 3201\n");
        let gpus = parse_gpus(&csv).unwrap();
        assert_eq!(gpus.len(), 1);
        assert_eq!(gpus[0].power_w, None);
        assert_eq!(gpus[0].memory_total_mib, Some(143771.0));
        assert!(parse_gpus("too, few").is_err());
        let (apps, pids) = parse_apps(&format!("{UUID}, 7, 30000\n{UUID}, 9, 10000\n"));
        assert_eq!(apps[UUID], 40000.0);
        assert_eq!(pids, vec![7, 9]);
    }

    #[test]
    fn values_between_the_two_nvidia_smi_readings_agree() {
        let apps = BTreeMap::from([(UUID.to_string(), 40000.0)]);
        let checks = compare(
            &[smi(40.0, 280.0)],
            &[smi(60.0, 320.0)],
            &apps,
            &agreeing_samples(),
        );
        assert_eq!(checks.len(), 8);
        assert!(checks.iter().all(Check::ok), "{checks:#?}");
    }

    #[test]
    fn a_missing_or_distant_value_disagrees() {
        let apps = BTreeMap::from([(UUID.to_string(), 40000.0)]);
        let mut samples = agreeing_samples();
        samples[4] = sample("vigil_gpu_temperature_celsius", 60.0, &[]);
        samples.remove(2); // no utilization
        let checks = compare(&[smi(50.0, 300.0)], &[smi(50.0, 300.0)], &apps, &samples);
        let bad: Vec<&str> = checks.iter().filter(|c| !c.ok()).map(|c| c.field).collect();
        assert_eq!(bad, vec!["utilization.gpu", "temperature.gpu"]);
    }
}
