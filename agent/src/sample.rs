//! What collectors produce: samples (one value or one histogram per metric and label set) and
//! events (things that happened at a moment, such as a model server starting or exiting).

use std::collections::BTreeMap;

use serde::Serialize;
use vigil_agent_common::histogram::{BUCKET_COUNT, OVERFLOW_BUCKET, bucket_upper_bound_ns};

/// Label name -> value. Ordered so that output is stable.
pub type Labels = BTreeMap<String, String>;

/// One metric value for one label set.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Sample {
    pub name: &'static str,
    pub labels: Labels,
    #[serde(flatten)]
    pub value: SampleValue,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
#[serde(rename_all = "lowercase")]
pub enum SampleValue {
    /// A gauge reading or a counter's running total.
    Value(f64),
    Histogram(HistogramSnapshot),
}

/// Latency histogram with Vigil's log-linear buckets (see `vigil_agent_common::histogram`).
///
/// Counts are running totals; two histograms merge by adding bucket counts, whichever processes
/// or nodes they come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LatencyHistogram {
    buckets: Box<[u64; BUCKET_COUNT]>,
    sum_ns: u64,
}

impl Default for LatencyHistogram {
    fn default() -> Self {
        Self {
            buckets: Box::new([0; BUCKET_COUNT]),
            sum_ns: 0,
        }
    }
}

impl LatencyHistogram {
    /// Records `count` observations in bucket `index`, adding `sum_ns` to the total.
    pub fn add_bucket(&mut self, index: usize, count: u64) {
        self.buckets[index] += count;
    }

    pub fn add_sum_ns(&mut self, sum_ns: u64) {
        self.sum_ns += sum_ns;
    }

    /// Records one observation of `value_ns`.
    pub fn record(&mut self, value_ns: u64) {
        self.buckets[vigil_agent_common::histogram::bucket_index(value_ns)] += 1;
        self.sum_ns += value_ns;
    }

    pub fn merge(&mut self, other: &LatencyHistogram) {
        for (mine, theirs) in self.buckets.iter_mut().zip(other.buckets.iter()) {
            *mine += theirs;
        }
        self.sum_ns += other.sum_ns;
    }

    pub fn count(&self) -> u64 {
        self.buckets.iter().sum()
    }

    pub fn bucket_counts(&self) -> &[u64; BUCKET_COUNT] {
        &self.buckets
    }

    /// Upper bound (ns) of the bucket holding the `q`-quantile, as Prometheus'
    /// `histogram_quantile` would bracket it; `None` when empty.
    pub fn quantile_upper_bound_ns(&self, q: f64) -> Option<u64> {
        let count = self.count();
        if count == 0 {
            return None;
        }
        let rank = (q.clamp(0.0, 1.0) * count as f64).ceil().max(1.0) as u64;
        let mut seen = 0;
        for (index, n) in self.buckets.iter().enumerate() {
            seen += n;
            if seen >= rank {
                return Some(bucket_upper_bound_ns(index));
            }
        }
        None
    }

    /// The JSON/export form: cumulative counts at each non-empty bucket's upper bound.
    pub fn snapshot(&self) -> HistogramSnapshot {
        let mut cumulative = 0;
        let mut buckets = Vec::new();
        for (index, &n) in self.buckets.iter().enumerate().take(OVERFLOW_BUCKET) {
            if n > 0 {
                cumulative += n;
                buckets.push((bucket_upper_bound_ns(index) as f64 / 1e9, cumulative));
            }
        }
        HistogramSnapshot {
            count: self.count(),
            sum: self.sum_ns as f64 / 1e9,
            buckets,
        }
    }
}

/// A histogram as printed and exported: `buckets` holds `[le_seconds, cumulative_count]` for
/// every non-empty finite bucket; observations above the last finite bound (~137 s) count only
/// in `count` (the `+Inf` bucket).
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct HistogramSnapshot {
    pub count: u64,
    pub sum: f64,
    pub buckets: Vec<(f64, u64)>,
}

/// Something that happened at one moment.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Event {
    /// RFC 3339, UTC.
    pub time: String,
    pub kind: &'static str,
    pub labels: Labels,
    pub message: String,
}

impl Event {
    pub fn now(kind: &'static str, labels: Labels, message: String) -> Self {
        let time = time::OffsetDateTime::now_utc()
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap_or_default();
        Self {
            time,
            kind,
            labels,
            message,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vigil_agent_common::histogram::bucket_index;

    #[test]
    fn merging_adds_bucket_counts_and_sums() {
        let mut a = LatencyHistogram::default();
        let mut b = LatencyHistogram::default();
        a.record(2_000_000);
        a.record(100);
        b.record(2_000_000);
        b.record(200_000_000_000); // beyond the last finite bucket
        a.merge(&b);
        assert_eq!(a.count(), 4);
        assert_eq!(a.bucket_counts()[bucket_index(2_000_000)], 2);
        assert_eq!(a.bucket_counts()[OVERFLOW_BUCKET], 1);
        assert_eq!(
            a.snapshot().sum,
            (4_000_000u64 + 100 + 200_000_000_000) as f64 / 1e9
        );
    }

    #[test]
    fn snapshot_lists_cumulative_counts_at_non_empty_upper_bounds() {
        let mut h = LatencyHistogram::default();
        h.record(100);
        h.record(100);
        h.record(2_000_000);
        let s = h.snapshot();
        assert_eq!(s.count, 3);
        assert_eq!(s.buckets.len(), 2);
        assert_eq!(
            s.buckets[0],
            (bucket_upper_bound_ns(bucket_index(100)) as f64 / 1e9, 2)
        );
        assert_eq!(s.buckets[1], (2_031_616e-9, 3));
    }

    #[test]
    fn quantiles_name_the_bucket_holding_the_rank() {
        let mut h = LatencyHistogram::default();
        assert_eq!(h.quantile_upper_bound_ns(0.5), None);
        for _ in 0..9 {
            h.record(1_000);
        }
        h.record(50_000_000);
        assert_eq!(
            h.quantile_upper_bound_ns(0.5),
            Some(bucket_upper_bound_ns(bucket_index(1_000)))
        );
        assert_eq!(
            h.quantile_upper_bound_ns(1.0),
            Some(bucket_upper_bound_ns(bucket_index(50_000_000)))
        );
    }

    #[test]
    fn samples_serialize_as_value_or_histogram() {
        let s = Sample {
            name: "vigil_x",
            labels: Labels::new(),
            value: SampleValue::Value(1.5),
        };
        assert_eq!(
            serde_json::to_string(&s).unwrap(),
            r#"{"name":"vigil_x","labels":{},"value":1.5}"#
        );
        let mut h = LatencyHistogram::default();
        h.record(64);
        let s = Sample {
            name: "vigil_h",
            labels: Labels::new(),
            value: SampleValue::Histogram(h.snapshot()),
        };
        assert_eq!(
            serde_json::to_string(&s).unwrap(),
            r#"{"name":"vigil_h","labels":{},"histogram":{"count":1,"sum":6.4e-8,"buckets":[[6.4e-8,1]]}}"#
        );
    }
}
