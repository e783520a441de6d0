//! Vigil's wire protocol, package `vigil.v1` (proto/vigil/v1/*.proto; rules in
//! docs/protocol.md). Generated code, and the stream-delta codec both ends share ([`delta`]);
//! the rest of encoding and validation lives with the agent's transport and the aggregator's
//! ingest.

pub mod delta;

/// The `vigil.v1` package: messages and the `Ingest`, `Query` and `Alerts` services (client and
/// server).
pub mod v1 {
    tonic::include_proto!("vigil.v1");
}
