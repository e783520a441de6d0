//! The inverted index: label name -> value -> the series that have it (sorted refs), with
//! `__name__` and `node` among the labels. A histogram series is also listed under the names
//! of its classic views (`_bucket`, `_count`, `_sum`), so selecting those finds it.

use std::collections::HashMap;

use super::{MetricKind, SeriesRef, StoredSeries};
use crate::query::Matcher;

#[derive(Default)]
pub(crate) struct Index {
    postings: HashMap<String, HashMap<String, Vec<SeriesRef>>>,
}

impl Index {
    /// Adds a series; refs are added in increasing order, so postings stay sorted.
    pub fn add(&mut self, series: &StoredSeries) {
        let mut names = vec![series.name.clone()];
        if series.kind == MetricKind::Histogram {
            for suffix in ["_bucket", "_count", "_sum"] {
                names.push(format!("{}{suffix}", series.name));
            }
        }
        for name in names {
            self.post("__name__", name, series.id);
        }
        self.post("node", series.node.clone(), series.id);
        for (name, value) in &series.labels {
            self.post(name, value.clone(), series.id);
        }
    }

    fn post(&mut self, name: &str, value: String, id: SeriesRef) {
        let refs = self
            .postings
            .entry(name.to_owned())
            .or_default()
            .entry(value)
            .or_default();
        if refs.last() != Some(&id) {
            refs.push(id);
        }
    }

    /// Every series that may pass all matchers (`total`: how many series there are). Only
    /// matchers that refuse the empty value narrow the set: a series without the label passes
    /// the others. `le` exists only on bucket views, which the caller checks exactly.
    pub fn candidates(&self, matchers: &[Matcher], total: usize) -> Vec<SeriesRef> {
        let mut result: Option<Vec<SeriesRef>> = None;
        for matcher in matchers {
            if matcher.name == "le" || matcher.matches("") {
                continue;
            }
            let Some(values) = self.postings.get(&matcher.name) else {
                return Vec::new();
            };
            let mut refs: Vec<SeriesRef> = values
                .iter()
                .filter(|(value, _)| matcher.matches(value))
                .flat_map(|(_, refs)| refs.iter().copied())
                .collect();
            refs.sort_unstable();
            refs.dedup();
            result = Some(match result {
                None => refs,
                Some(previous) => intersect(&previous, &refs),
            });
            if result.as_ref().is_some_and(Vec::is_empty) {
                return Vec::new();
            }
        }
        result.unwrap_or_else(|| (0..total as u64).map(SeriesRef).collect())
    }
}

fn intersect(a: &[SeriesRef], b: &[SeriesRef]) -> Vec<SeriesRef> {
    let (mut i, mut j) = (0, 0);
    let mut out = Vec::new();
    while i < a.len() && j < b.len() {
        match a[i].cmp(&b[j]) {
            std::cmp::Ordering::Less => i += 1,
            std::cmp::Ordering::Greater => j += 1,
            std::cmp::Ordering::Equal => {
                out.push(a[i]);
                i += 1;
                j += 1;
            }
        }
    }
    out
}
