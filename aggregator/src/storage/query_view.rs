//! The store as queries see it ([`SeriesSource`]): every series with `__name__` and `node`
//! labels, and each histogram series also as classic `_bucket`/`_count`/`_sum` float series.

use std::sync::Arc;

use vigil_agent_common::histogram::bucket_upper_bound_ns;

use super::{HistogramPoint, MetricKind, Point, PointValue, Store, StoredSeries};
use crate::query::{Labels, Matcher, Samples, SelectedSeries, SeriesSource};

/// One way a stored series is seen by queries.
#[derive(Debug, Clone, Copy, PartialEq)]
enum View {
    /// The series itself: floats, or histogram samples for a histogram.
    Native,
    /// `name_bucket{le=...}` for the bucket with this index (`None`: `+Inf`).
    Bucket(Option<u32>),
    Count,
    Sum,
}

/// `le` as Prometheus writes bucket bounds: seconds, shortest form that round-trips.
pub fn le_label(bucket: Option<u32>) -> String {
    match bucket {
        None => "+Inf".into(),
        Some(index) => format_float(bucket_upper_bound_ns(index as usize) as f64 / 1e9),
    }
}

fn format_float(value: f64) -> String {
    let mut text = format!("{value}");
    if text.contains('e') {
        text = format!("{value:e}");
    }
    text
}

fn base_labels(series: &StoredSeries, name: &str) -> Labels {
    let mut labels = Vec::with_capacity(series.labels.len() + 2);
    labels.push(("__name__".to_owned(), name.to_owned()));
    labels.push(("node".to_owned(), series.node.clone()));
    labels.extend(series.labels.iter().cloned());
    labels.sort();
    labels
}

/// Every (labels, view) under which a series is seen, given its points (for the buckets).
fn views(series: &StoredSeries, points: &[Point]) -> Vec<(Labels, View)> {
    let mut out = vec![(base_labels(series, &series.name), View::Native)];
    if series.kind == MetricKind::Histogram {
        let mut buckets: Vec<u32> = points
            .iter()
            .filter_map(|point| match &point.value {
                PointValue::Histogram(h) => Some(h.buckets.iter().map(|(index, _)| *index)),
                PointValue::Value(_) => None,
            })
            .flatten()
            .collect();
        buckets.sort_unstable();
        buckets.dedup();
        let bucket_name = format!("{}_bucket", series.name);
        for bucket in buckets.into_iter().map(Some).chain([None]) {
            let mut labels = base_labels(series, &bucket_name);
            labels.push(("le".to_owned(), le_label(bucket)));
            labels.sort();
            out.push((labels, View::Bucket(bucket)));
        }
        out.push((
            base_labels(series, &format!("{}_count", series.name)),
            View::Count,
        ));
        out.push((
            base_labels(series, &format!("{}_sum", series.name)),
            View::Sum,
        ));
    }
    out
}

fn cumulative_count(histogram: &HistogramPoint, bucket: Option<u32>) -> f64 {
    match bucket {
        None => histogram.count as f64,
        Some(le) => histogram
            .buckets
            .iter()
            .take_while(|(index, _)| *index <= le)
            .map(|(_, count)| *count as f64)
            .sum(),
    }
}

fn samples_of_view(points: &[Point], view: View) -> Samples {
    match view {
        View::Native => {
            if points
                .iter()
                .all(|point| matches!(point.value, PointValue::Value(_)))
            {
                Samples::Floats(
                    points
                        .iter()
                        .filter_map(|point| match point.value {
                            PointValue::Value(v) => Some((point.time_ms, v)),
                            PointValue::Histogram(_) => None,
                        })
                        .collect(),
                )
            } else {
                Samples::Histograms(
                    points
                        .iter()
                        .filter_map(|point| match &point.value {
                            PointValue::Histogram(h) => Some((point.time_ms, h.clone())),
                            PointValue::Value(_) => None,
                        })
                        .collect(),
                )
            }
        }
        View::Bucket(_) | View::Count | View::Sum => Samples::Floats(
            points
                .iter()
                .filter_map(|point| match &point.value {
                    PointValue::Histogram(h) => Some((
                        point.time_ms,
                        match view {
                            View::Bucket(bucket) => cumulative_count(h, bucket),
                            View::Count => h.count as f64,
                            _ => h.sum_seconds,
                        },
                    )),
                    PointValue::Value(_) => None,
                })
                .collect(),
        ),
    }
}

impl Store {
    /// The candidates from the inverted index. A float series has one view, whose labels are
    /// known without its points: it is checked here, before anything is read. Histograms'
    /// bucket views depend on the points.
    fn prefiltered(&self, matchers: &[Matcher]) -> Vec<Arc<StoredSeries>> {
        self.candidates(matchers)
            .into_iter()
            .filter(|series| {
                series.kind == MetricKind::Histogram || {
                    let labels = base_labels(series, &series.name);
                    matchers.iter().all(|m| m.matches_labels(&labels))
                }
            })
            .collect()
    }

    /// The labels of every matching view with points in the range, without their samples:
    /// float series are only decoded when no chunk lies wholly inside the range.
    fn matching_labels(&self, matchers: &[Matcher], start_ms: i64, end_ms: i64) -> Vec<Labels> {
        let (histograms, floats): (Vec<_>, Vec<_>) = self
            .prefiltered(matchers)
            .into_iter()
            .partition(|series| series.kind == MetricKind::Histogram);
        let mut out: Vec<Labels> = floats
            .iter()
            .zip(self.have_points(&floats, start_ms, end_ms))
            .filter(|(_, has)| *has)
            .map(|(series, _)| base_labels(series, &series.name))
            .collect();
        let points = self.points_in_range(&histograms, start_ms, end_ms);
        for (series, points) in histograms.iter().zip(points) {
            if points.is_empty() {
                continue;
            }
            out.extend(
                views(series, &points)
                    .into_iter()
                    .map(|(labels, _)| labels)
                    .filter(|labels| matchers.iter().all(|m| m.matches_labels(labels))),
            );
        }
        out.sort();
        out
    }

    /// Every matching view of every series with points in the range: the inverted index
    /// chooses the candidates, and only their chunks that overlap the range are decoded.
    fn matching(&self, matchers: &[Matcher], start_ms: i64, end_ms: i64) -> Vec<SelectedSeries> {
        let candidates = self.prefiltered(matchers);
        let mut out = Vec::new();
        self.push_views(&mut out, matchers, &candidates, start_ms, end_ms, false);
        out.sort_by(|a, b| a.labels.cmp(&b.labels));
        out
    }

    /// Appends every matching view of `series` with points in the range, each with all its
    /// samples or (`newest_only`) its newest.
    fn push_views(
        &self,
        out: &mut Vec<SelectedSeries>,
        matchers: &[Matcher],
        series: &[Arc<StoredSeries>],
        start_ms: i64,
        end_ms: i64,
        newest_only: bool,
    ) {
        let points = self.points_in_range(series, start_ms, end_ms);
        for (series, points) in series.iter().zip(points) {
            if points.is_empty() {
                continue;
            }
            for (labels, view) in views(series, &points) {
                if matchers.iter().all(|m| m.matches_labels(&labels)) {
                    let samples = samples_of_view(&points, view);
                    out.push(SelectedSeries {
                        labels,
                        samples: if newest_only {
                            samples.last_only()
                        } else {
                            samples
                        },
                    });
                }
            }
        }
    }
}

impl Store {
    /// [`Store::matching`] with each view's newest sample only. Float series take the
    /// latest-point path; histograms (whose classic bucket views depend on every point of the
    /// range) are selected whole and cut to their last sample.
    fn matching_latest(
        &self,
        matchers: &[Matcher],
        start_ms: i64,
        end_ms: i64,
    ) -> Vec<SelectedSeries> {
        let (histograms, floats): (Vec<_>, Vec<_>) = self
            .prefiltered(matchers)
            .into_iter()
            .partition(|series| series.kind == MetricKind::Histogram);
        let mut out: Vec<SelectedSeries> = floats
            .iter()
            .zip(self.latest_floats(&floats, start_ms, end_ms))
            .filter_map(|(series, latest)| {
                Some(SelectedSeries {
                    labels: base_labels(series, &series.name),
                    samples: Samples::Floats(vec![latest?]),
                })
            })
            .collect();
        self.push_views(&mut out, matchers, &histograms, start_ms, end_ms, true);
        out.sort_by(|a, b| a.labels.cmp(&b.labels));
        out
    }
}

impl SeriesSource for Store {
    fn select(&self, matchers: &[Matcher], start_ms: i64, end_ms: i64) -> Vec<SelectedSeries> {
        self.matching(matchers, start_ms, end_ms)
    }

    fn select_latest(
        &self,
        matchers: &[Matcher],
        start_ms: i64,
        end_ms: i64,
    ) -> Vec<SelectedSeries> {
        self.matching_latest(matchers, start_ms, end_ms)
    }

    fn series_labels(&self, matchers: &[Matcher], start_ms: i64, end_ms: i64) -> Vec<Labels> {
        self.matching_labels(matchers, start_ms, end_ms)
    }
}
