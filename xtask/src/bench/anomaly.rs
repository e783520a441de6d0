//! `cargo xtask bench anomaly`: precision, recall and false alarms of the aggregator's anomaly
//! detector on generated series (clean ones and ones with injected spikes, level shifts and
//! slow drifts; aggregator/src/anomaly/evaluation.rs says how they are made and counted),
//! over three seeds, by target/release/anomaly-eval.
//!
//! Targets (from the issue), reported as met or NOT met: precision >= 0.9, recall >= 0.9,
//! <= 1 false alarm per series per day. Figures are printed and written to
//! target/bench/anomaly.json.

use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};

use super::collect::write_report;
use crate::workspace::Workspace;

const SEEDS: [u64; 3] = [1, 2, 3];
const MIN_PRECISION: f64 = 0.9;
const MIN_RECALL: f64 = 0.9;
const MAX_FALSE_ALARMS_PER_DAY: f64 = 1.0;

pub fn run(ws: &Workspace) -> Result<()> {
    let binary = ws.target.join("release").join("anomaly-eval");
    if !binary.exists() {
        bail!(
            "{} is missing: `cargo xtask build` builds it",
            binary.display()
        );
    }
    let mut runs = Vec::new();
    for seed in SEEDS {
        let output = Command::new(&binary)
            .args(["--seed", &seed.to_string()])
            .stderr(Stdio::inherit())
            .output()
            .context("running anomaly-eval")?;
        if !output.status.success() {
            bail!("anomaly-eval --seed {seed} failed ({})", output.status);
        }
        let report: Value =
            serde_json::from_slice(&output.stdout).context("anomaly-eval report")?;
        runs.push(report);
    }
    println!();
    println!(
        "{:<6} {:>7} {:>10} {:>9} {:>10} {:>8} {:>7} {:>12} {:>9} {:>9} {:>9}",
        "seed",
        "series",
        "series-days",
        "anomalies",
        "precision",
        "recall",
        "FA",
        "FA/series-day",
        "spikes",
        "shifts",
        "drifts"
    );
    let f = |v: &Value| v.as_f64().unwrap_or(f64::NAN);
    let found = |run: &Value, kind: &str| {
        format!(
            "{}/{}",
            run["by_kind"][kind]["found"], run["by_kind"][kind]["injected"]
        )
    };
    for run in &runs {
        println!(
            "{:<6} {:>7} {:>10} {:>9} {:>10.3} {:>8.3} {:>7} {:>12.3} {:>9} {:>9} {:>9}",
            run["seed"].to_string(),
            run["series"].to_string(),
            run["series_days"].to_string(),
            run["anomalies"].to_string(),
            f(&run["precision"]),
            f(&run["recall"]),
            run["false_alarms"].to_string(),
            f(&run["false_alarms_per_series_day"]),
            found(run, "spike"),
            found(run, "shift"),
            found(run, "drift"),
        );
    }
    let sum = |key: &str| runs.iter().map(|r| f(&r[key])).sum::<f64>();
    let precision = sum("true_episodes") / sum("episodes").max(1.0);
    let recall = sum("found") / sum("anomalies").max(1.0);
    let false_alarms = sum("false_alarms") / sum("series_days");
    let verdict = |ok: bool| if ok { "met" } else { "NOT met" };
    println!(
        "all seeds: precision {precision:.3} ({}), recall {recall:.3} ({}), false alarms per \
         series-day {false_alarms:.3} ({}); median delay to detection {} s (seed {})",
        verdict(precision >= MIN_PRECISION),
        verdict(recall >= MIN_RECALL),
        verdict(false_alarms <= MAX_FALSE_ALARMS_PER_DAY),
        runs[0]["median_delay_s"],
        runs[0]["seed"],
    );
    write_report(
        ws,
        "anomaly.json",
        &json!({
            "bench": "anomaly",
            "date": time::OffsetDateTime::now_utc()
                .format(&time::format_description::well_known::Rfc3339)?,
            "precision": precision,
            "recall": recall,
            "false_alarms_per_series_day": false_alarms,
            "runs": runs,
        }),
    )
}
