//! PromQL: parsed by `promql-parser`, evaluated here over a [`SeriesSource`].
//!
//! [`Engine::instant`] and [`Engine::range`] are what the HTTP API, the gRPC `Query` service,
//! the rule evaluator and the dashboard call. What is supported: `docs/query.md`.

mod aggregate;
mod binary;
pub mod engine;
mod eval;
mod functions;
mod histogram;
pub mod memory;
pub mod source;
pub mod value;

#[cfg(test)]
mod tests;

pub use aggregate::format_value;
pub use engine::{Engine, parse};
pub use eval::valid_label_name as is_valid_label_name;
pub use memory::MemorySource;
pub use source::{Labels, MatchOp, Matcher, Samples, SelectedSeries, SeriesSource};
pub use value::{FloatHistogram, InstantSample, QueryError, RangeSeries, SampleValue, Value};

/// The label matchers of a selector such as `up{job="x"}` (for `match[]` parameters).
pub fn parse_selector(text: &str) -> Result<Vec<Matcher>, QueryError> {
    match parse(text)? {
        promql_parser::parser::Expr::VectorSelector(selector) => eval::selector_matchers(&selector),
        _ => Err(QueryError::BadData(format!(
            "invalid parameter \"match[]\": {text:?} is not a series selector"
        ))),
    }
}
