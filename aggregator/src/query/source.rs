//! What the query engine reads: series chosen by label matchers, with their samples in a time
//! range. The store implements [`SeriesSource`]; tests can implement it over plain vectors.
//!
//! Every series seen by queries carries its metric name as the `__name__` label and its node
//! as the `node` label. A stored histogram series `name` is seen four ways, so both PromQL
//! styles work: `name` itself (histogram samples), and the classic float series
//! `name_bucket{le="<upper bound in seconds>"}` (cumulative counts; one per non-empty log-linear
//! bucket plus `le="+Inf"`), `name_count` and `name_sum`.

use std::fmt;

use regex::Regex;

use crate::storage::HistogramPoint;

/// A series' labels, sorted by name, `__name__` included.
pub type Labels = Vec<(String, String)>;

/// How a matcher compares a label's value.
#[derive(Debug, Clone)]
pub enum MatchOp {
    Equal,
    NotEqual,
    /// The regex is anchored at both ends, as in PromQL.
    Regex(Regex),
    NotRegex(Regex),
}

/// One PromQL label matcher. A label that is absent has the value "".
#[derive(Debug, Clone)]
pub struct Matcher {
    pub name: String,
    pub op: MatchOp,
    /// The value as written (for `Regex`/`NotRegex`, the unanchored pattern).
    pub value: String,
}

impl Matcher {
    pub fn equal(name: &str, value: &str) -> Matcher {
        Matcher {
            name: name.to_owned(),
            op: MatchOp::Equal,
            value: value.to_owned(),
        }
    }

    /// A regex matcher; the pattern is anchored (`^(?:pattern)$`) as PromQL does.
    pub fn regex(name: &str, pattern: &str, negate: bool) -> Result<Matcher, regex::Error> {
        let compiled = Regex::new(&format!("^(?:{pattern})$"))?;
        Ok(Matcher {
            name: name.to_owned(),
            op: if negate {
                MatchOp::NotRegex(compiled)
            } else {
                MatchOp::Regex(compiled)
            },
            value: pattern.to_owned(),
        })
    }

    /// Whether a label value (absent = "") passes this matcher.
    pub fn matches(&self, value: &str) -> bool {
        match &self.op {
            MatchOp::Equal => value == self.value,
            MatchOp::NotEqual => value != self.value,
            MatchOp::Regex(re) => re.is_match(value),
            MatchOp::NotRegex(re) => !re.is_match(value),
        }
    }

    /// Whether a whole label set passes this matcher.
    pub fn matches_labels(&self, labels: &[(String, String)]) -> bool {
        let value = labels
            .iter()
            .find(|(name, _)| *name == self.name)
            .map(|(_, value)| value.as_str())
            .unwrap_or("");
        self.matches(value)
    }
}

impl fmt::Display for Matcher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let op = match self.op {
            MatchOp::Equal => "=",
            MatchOp::NotEqual => "!=",
            MatchOp::Regex(_) => "=~",
            MatchOp::NotRegex(_) => "!~",
        };
        write!(f, "{}{}{:?}", self.name, op, self.value)
    }
}

/// The samples of one selected series, oldest first, timestamps in milliseconds since the
/// Unix epoch.
#[derive(Debug, Clone, PartialEq)]
pub enum Samples {
    Floats(Vec<(i64, f64)>),
    Histograms(Vec<(i64, HistogramPoint)>),
}

impl Samples {
    pub fn len(&self) -> usize {
        match self {
            Samples::Floats(points) => points.len(),
            Samples::Histograms(points) => points.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Only the newest sample (the samples are oldest first).
    pub fn last_only(self) -> Samples {
        match self {
            Samples::Floats(mut points) => {
                Samples::Floats(points.split_off(points.len().saturating_sub(1)))
            }
            Samples::Histograms(mut points) => {
                Samples::Histograms(points.split_off(points.len().saturating_sub(1)))
            }
        }
    }
}

/// A series chosen by a selector, with its samples in the asked range.
#[derive(Debug, Clone, PartialEq)]
pub struct SelectedSeries {
    pub labels: Labels,
    pub samples: Samples,
}

/// Read access to stored series for queries. Every method takes the time range in
/// milliseconds (inclusive at both ends) and returns only series with at least one sample
/// in it. Matchers all have to pass (a selector's matchers are ANDed); at least one of them
/// names `__name__` or matches a non-empty value, as PromQL requires (the engine checks).
pub trait SeriesSource: Send + Sync {
    /// The series whose labels pass every matcher, with their samples in `[start_ms, end_ms]`,
    /// sorted by labels.
    fn select(&self, matchers: &[Matcher], start_ms: i64, end_ms: i64) -> Vec<SelectedSeries>;

    /// As [`SeriesSource::select`], with only each series' newest sample in the range (what an
    /// instant selector reads). Sources that can find it without reading the whole range
    /// override this.
    fn select_latest(
        &self,
        matchers: &[Matcher],
        start_ms: i64,
        end_ms: i64,
    ) -> Vec<SelectedSeries> {
        self.select(matchers, start_ms, end_ms)
            .into_iter()
            .map(|series| SelectedSeries {
                samples: series.samples.last_only(),
                ..series
            })
            .collect()
    }

    /// The label sets of matching series (no samples), sorted; for `/api/v1/series`.
    fn series_labels(&self, matchers: &[Matcher], start_ms: i64, end_ms: i64) -> Vec<Labels>;

    /// Every label name of matching series (all series when `matchers` is empty), sorted.
    fn label_names(&self, matchers: &[Matcher], start_ms: i64, end_ms: i64) -> Vec<String> {
        let mut names: Vec<String> = self
            .series_labels(matchers, start_ms, end_ms)
            .into_iter()
            .flat_map(|labels| labels.into_iter().map(|(name, _)| name))
            .collect();
        names.sort();
        names.dedup();
        names
    }

    /// Every value of one label among matching series (all series when `matchers` is empty),
    /// sorted.
    fn label_values(
        &self,
        name: &str,
        matchers: &[Matcher],
        start_ms: i64,
        end_ms: i64,
    ) -> Vec<String> {
        let mut values: Vec<String> = self
            .series_labels(matchers, start_ms, end_ms)
            .into_iter()
            .filter_map(|labels| {
                labels
                    .into_iter()
                    .find(|(label, _)| label == name)
                    .map(|(_, value)| value)
            })
            .collect();
        values.sort();
        values.dedup();
        values
    }
}
