//! Collectors turn what the node exposes (kernel probes, NVML, /proc) into samples and events.
//!
//! Each collector lives in its own folder and reports its own status, so one that cannot run
//! (no BPF, no GPU driver) says why and the others carry on.

pub mod syscalls;

use serde::Serialize;

/// Whether a collector is producing data, as printed under `collectors` in a snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "status", content = "reason", rename_all = "lowercase")]
pub enum CollectorStatus {
    Ok,
    /// Running, but some data is missing; the reason says which and why.
    Degraded(String),
    /// Not running at all; the reason says why and what to do about it.
    Unavailable(String),
}

/// Renders an error with its chain of causes on one line (`a: b: c`).
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_serializes_with_reason_only_when_not_ok() {
        assert_eq!(
            serde_json::to_string(&CollectorStatus::Ok).unwrap(),
            r#"{"status":"ok"}"#
        );
        assert_eq!(
            serde_json::to_string(&CollectorStatus::Unavailable("no BPF".into())).unwrap(),
            r#"{"status":"unavailable","reason":"no BPF"}"#
        );
    }
}
