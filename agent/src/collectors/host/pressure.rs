//! Pressure stall information (PSI) from /proc/pressure/{cpu,memory,io}: the time some (or all)
//! non-idle tasks were stalled waiting for a resource. Needs Linux 4.20 with CONFIG_PSI, not
//! booted with `psi=0`; without it these metrics are missing and the status says why.

use super::{SourceError, push};
use crate::sample::{Labels, Sample};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PressureResource {
    Cpu,
    Memory,
    Io,
}

impl PressureResource {
    const ALL: [PressureResource; 3] = [
        PressureResource::Cpu,
        PressureResource::Memory,
        PressureResource::Io,
    ];

    fn name(self) -> &'static str {
        match self {
            PressureResource::Cpu => "cpu",
            PressureResource::Memory => "memory",
            PressureResource::Io => "io",
        }
    }

    fn path(self) -> &'static str {
        match self {
            PressureResource::Cpu => "/proc/pressure/cpu",
            PressureResource::Memory => "/proc/pressure/memory",
            PressureResource::Io => "/proc/pressure/io",
        }
    }
}

/// `some`: at least one task stalled; `full`: all non-idle tasks stalled at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PressureStall {
    Some,
    Full,
}

/// `vigil_host_pressure_{cpu,memory,io}_{some,full}_seconds_total`.
pub fn pressure_metric(resource: PressureResource, stall: PressureStall) -> &'static str {
    match (resource, stall) {
        (PressureResource::Cpu, PressureStall::Some) => {
            "vigil_host_pressure_cpu_some_seconds_total"
        }
        (PressureResource::Cpu, PressureStall::Full) => {
            "vigil_host_pressure_cpu_full_seconds_total"
        }
        (PressureResource::Memory, PressureStall::Some) => {
            "vigil_host_pressure_memory_some_seconds_total"
        }
        (PressureResource::Memory, PressureStall::Full) => {
            "vigil_host_pressure_memory_full_seconds_total"
        }
        (PressureResource::Io, PressureStall::Some) => "vigil_host_pressure_io_some_seconds_total",
        (PressureResource::Io, PressureStall::Full) => "vigil_host_pressure_io_full_seconds_total",
    }
}

/// The `total=` fields (microseconds) of one pressure file.
#[derive(Debug, PartialEq, Eq)]
struct StallTotals {
    some_us: u64,
    /// Absent from /proc/pressure/cpu before Linux 5.13.
    full_us: Option<u64>,
}

/// Reads each resource's file once; the result says, per resource, whether it could.
pub(super) fn collect(out: &mut Vec<Sample>) -> Vec<(&'static str, Result<(), SourceError>)> {
    PressureResource::ALL
        .into_iter()
        .map(|resource| (resource.name(), collect_one(resource, out)))
        .collect()
}

fn collect_one(resource: PressureResource, out: &mut Vec<Sample>) -> Result<(), SourceError> {
    let path = resource.path();
    let text =
        std::fs::read_to_string(path).map_err(|source| SourceError::Read { path, source })?;
    let totals = parse_pressure(&text).ok_or_else(|| SourceError::Format {
        path,
        content: text.trim().to_string(),
    })?;
    let seconds = |us: u64| us as f64 / 1e6;
    push(
        out,
        pressure_metric(resource, PressureStall::Some),
        Labels::new(),
        seconds(totals.some_us),
    );
    if let Some(full_us) = totals.full_us {
        push(
            out,
            pressure_metric(resource, PressureStall::Full),
            Labels::new(),
            seconds(full_us),
        );
    }
    Ok(())
}

/// Parses `some avg10=0.12 avg60=0.05 avg300=0.01 total=123456` and the optional `full` line.
/// A file without a well-formed `some` line is refused.
fn parse_pressure(text: &str) -> Option<StallTotals> {
    let mut some_us = None;
    let mut full_us = None;
    for line in text.lines() {
        let mut fields = line.split_whitespace();
        let slot = match fields.next() {
            Some("some") => &mut some_us,
            Some("full") => &mut full_us,
            _ => continue,
        };
        let total = fields.find_map(|field| field.strip_prefix("total="))?;
        *slot = Some(total.parse().ok()?);
    }
    Some(StallTotals {
        some_us: some_us?,
        full_us,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn totals_of_both_lines_are_read_in_microseconds() {
        let text = "some avg10=1.95 avg60=2.17 avg300=2.00 total=156869978\n\
                    full avg10=0.00 avg60=0.00 avg300=0.00 total=42\n";
        assert_eq!(
            parse_pressure(text),
            Some(StallTotals {
                some_us: 156_869_978,
                full_us: Some(42),
            })
        );
    }

    #[test]
    fn cpu_pressure_before_linux_5_13_has_no_full_line() {
        let text = "some avg10=0.00 avg60=0.00 avg300=0.00 total=7\n";
        assert_eq!(
            parse_pressure(text),
            Some(StallTotals {
                some_us: 7,
                full_us: None,
            })
        );
    }

    #[test]
    fn a_file_without_a_well_formed_some_total_is_refused() {
        assert_eq!(parse_pressure(""), None);
        assert_eq!(
            parse_pressure("full avg10=0.00 avg60=0.00 avg300=0.00 total=42\n"),
            None
        );
        assert_eq!(parse_pressure("some avg10=0.00 avg60=0.00\n"), None);
        assert_eq!(
            parse_pressure("some avg10=0.00 avg60=0.00 avg300=0.00 total=-1\n"),
            None
        );
    }

    #[test]
    fn metric_names_follow_resource_and_stall() {
        assert_eq!(
            pressure_metric(PressureResource::Memory, PressureStall::Full),
            "vigil_host_pressure_memory_full_seconds_total"
        );
        assert_eq!(
            pressure_metric(PressureResource::Cpu, PressureStall::Some),
            "vigil_host_pressure_cpu_some_seconds_total"
        );
    }
}
