//! PromQL: parsed by `promql-parser`, evaluated here over a [`SeriesSource`].
//!
//! [`Engine::instant`] and [`Engine::range`] are what the HTTP API, the gRPC `Query` service,
//! the rule evaluator and the dashboard call.

pub mod engine;
pub mod source;
pub mod value;

pub use engine::Engine;
pub use source::{Labels, MatchOp, Matcher, Samples, SelectedSeries, SeriesSource};
pub use value::{InstantSample, QueryError, RangeSeries, SampleValue, Value};
