//! A [`SeriesSource`] over plain vectors: for tests of the engine, and for callers that want
//! to query data they hold (a rule's test fixture, a benchmark).

use super::source::{Labels, Matcher, Samples, SelectedSeries, SeriesSource};

/// Series held in memory. Labels are sorted on insertion; samples must be oldest first.
#[derive(Debug, Default, Clone)]
pub struct MemorySource {
    series: Vec<SelectedSeries>,
}

impl MemorySource {
    pub fn new() -> MemorySource {
        MemorySource::default()
    }

    /// Adds a series (`labels` include `__name__`).
    pub fn add(&mut self, labels: &[(&str, &str)], samples: Samples) {
        let mut labels: Labels = labels
            .iter()
            .map(|(name, value)| (name.to_string(), value.to_string()))
            .collect();
        labels.sort();
        self.series.push(SelectedSeries { labels, samples });
        self.series.sort_by(|a, b| a.labels.cmp(&b.labels));
    }

    fn matching(&self, matchers: &[Matcher], start_ms: i64, end_ms: i64) -> Vec<SelectedSeries> {
        self.series
            .iter()
            .filter(|series| matchers.iter().all(|m| m.matches_labels(&series.labels)))
            .filter_map(|series| {
                let samples = match &series.samples {
                    Samples::Floats(points) => Samples::Floats(
                        points
                            .iter()
                            .filter(|(t, _)| *t >= start_ms && *t <= end_ms)
                            .cloned()
                            .collect(),
                    ),
                    Samples::Histograms(points) => Samples::Histograms(
                        points
                            .iter()
                            .filter(|(t, _)| *t >= start_ms && *t <= end_ms)
                            .cloned()
                            .collect(),
                    ),
                };
                (!samples.is_empty()).then(|| SelectedSeries {
                    labels: series.labels.clone(),
                    samples,
                })
            })
            .collect()
    }
}

impl SeriesSource for MemorySource {
    fn select(&self, matchers: &[Matcher], start_ms: i64, end_ms: i64) -> Vec<SelectedSeries> {
        self.matching(matchers, start_ms, end_ms)
    }

    fn series_labels(&self, matchers: &[Matcher], start_ms: i64, end_ms: i64) -> Vec<Labels> {
        self.matching(matchers, start_ms, end_ms)
            .into_iter()
            .map(|series| series.labels)
            .collect()
    }
}
