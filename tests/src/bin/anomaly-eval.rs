//! `anomaly-eval`: runs the anomaly detector's evaluation (vigil_aggregator::anomaly::evaluation)
//! for `cargo xtask bench anomaly` and prints one JSON report.
//!
//! ```text
//! anomaly-eval [--clean N] [--injected N] [--seed S]
//! ```

use std::time::Instant;

use vigil_aggregator::anomaly::{DetectorConfig, evaluation};

fn main() {
    let mut clean = 200usize;
    let mut injected = 200usize;
    let mut seed = 7u64;
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let value = args.next().unwrap_or_else(|| {
            eprintln!("anomaly-eval: {flag} needs a value");
            std::process::exit(2);
        });
        let parsed = value.parse::<u64>().unwrap_or_else(|e| {
            eprintln!("anomaly-eval: {flag} {value}: {e}");
            std::process::exit(2);
        });
        match flag.as_str() {
            "--clean" => clean = parsed as usize,
            "--injected" => injected = parsed as usize,
            "--seed" => seed = parsed,
            other => {
                eprintln!("anomaly-eval: unknown argument {other}");
                std::process::exit(2);
            }
        }
    }
    let config = DetectorConfig::default();
    let started = Instant::now();
    let report = evaluation::evaluate(config, clean, injected, seed);
    let kinds = ["spike", "shift", "drift"];
    let by_kind: serde_json::Map<String, serde_json::Value> = kinds
        .iter()
        .zip(report.found_by_kind)
        .map(|(kind, (found, total))| {
            (
                kind.to_string(),
                serde_json::json!({"found": found, "injected": total}),
            )
        })
        .collect();
    println!(
        "{}",
        serde_json::json!({
            "series": report.series,
            "series_days": report.series_days,
            "clean_series_days": report.clean_series_days,
            "anomalies": report.anomalies,
            "found": report.found,
            "by_kind": by_kind,
            "episodes": report.episodes,
            "true_episodes": report.true_episodes,
            "false_alarms": report.false_alarms,
            "false_alarms_on_clean_series": report.false_alarms_on_clean,
            "precision": report.precision(),
            "recall": report.recall(),
            "false_alarms_per_series_day": report.false_alarms_per_series_day(),
            "median_delay_s": report.median_delay_s,
            "seed": seed,
            "seconds": started.elapsed().as_secs_f64(),
            "config": format!("{config:?}"),
        })
    );
}
