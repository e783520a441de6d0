//! CPU time, CPU count and boot time from /proc/stat; load averages from /proc/loadavg.

use procfs::{CurrentSI, KernelStats};

use super::{SourceError, labels, push};
use crate::sample::{Labels, Sample};

/// Seconds the CPUs spent in each mode, summed over CPUs (`mode` label).
pub const CPU_SECONDS_METRIC: &str = "vigil_host_cpu_seconds_total";
/// CPUs online (the `cpuN` lines of /proc/stat).
pub const CPUS_METRIC: &str = "vigil_host_cpus";
/// When the node booted, in seconds since the Unix epoch.
pub const BOOT_TIME_METRIC: &str = "vigil_host_boot_time_seconds";
pub const LOAD1_METRIC: &str = "vigil_host_load1";
pub const LOAD5_METRIC: &str = "vigil_host_load5";
pub const LOAD15_METRIC: &str = "vigil_host_load15";

const STAT_PATH: &str = "/proc/stat";
const LOADAVG_PATH: &str = "/proc/loadavg";

/// Reads /proc/stat once. Its `cpu` line already sums every CPU, so its cost does not grow with
/// the modes reported; `user` and `nice` include guest time, as in the kernel's own accounting.
pub(super) fn collect_stat(
    ticks_per_second: f64,
    out: &mut Vec<Sample>,
) -> Result<(), SourceError> {
    let stat = KernelStats::current().map_err(|source| SourceError::Procfs {
        path: STAT_PATH,
        source,
    })?;
    let total = &stat.total;
    let modes = [
        ("user", Some(total.user)),
        ("nice", Some(total.nice)),
        ("system", Some(total.system)),
        ("idle", Some(total.idle)),
        ("iowait", total.iowait),
        ("irq", total.irq),
        ("softirq", total.softirq),
        ("steal", total.steal),
    ];
    for (mode, ticks) in modes {
        if let Some(ticks) = ticks {
            let seconds = ticks as f64 / ticks_per_second;
            push(out, CPU_SECONDS_METRIC, labels([("mode", mode)]), seconds);
        }
    }
    push(out, CPUS_METRIC, Labels::new(), stat.cpu_time.len() as f64);
    push(out, BOOT_TIME_METRIC, Labels::new(), stat.btime as f64);
    Ok(())
}

pub(super) fn collect_load(out: &mut Vec<Sample>) -> Result<(), SourceError> {
    let text = std::fs::read_to_string(LOADAVG_PATH).map_err(|source| SourceError::Read {
        path: LOADAVG_PATH,
        source,
    })?;
    let [one, five, fifteen] = parse_loadavg(&text).ok_or_else(|| SourceError::Format {
        path: LOADAVG_PATH,
        content: text.trim().to_string(),
    })?;
    push(out, LOAD1_METRIC, Labels::new(), one);
    push(out, LOAD5_METRIC, Labels::new(), five);
    push(out, LOAD15_METRIC, Labels::new(), fifteen);
    Ok(())
}

/// The three load averages of /proc/loadavg (`0.52 0.58 0.59 1/467 12345`), parsed as f64 so
/// they print as the kernel wrote them.
fn parse_loadavg(text: &str) -> Option<[f64; 3]> {
    let mut fields = text.split_whitespace().map(str::parse::<f64>);
    let mut next = || fields.next()?.ok();
    Some([next()?, next()?, next()?])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn load_averages_are_the_first_three_fields() {
        assert_eq!(
            parse_loadavg("0.52 1.58 12.00 1/467 12345\n"),
            Some([0.52, 1.58, 12.0])
        );
    }

    #[test]
    fn a_short_or_garbled_loadavg_is_refused() {
        assert_eq!(parse_loadavg("0.52 1.58\n"), None);
        assert_eq!(parse_loadavg("0.52 x 12.00 1/467 12345\n"), None);
        assert_eq!(parse_loadavg(""), None);
    }
}
