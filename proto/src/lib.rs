//! Vigil's wire protocol, package `vigil.v1` (proto/vigil/v1/*.proto; rules in
//! docs/protocol.md). Generated code only: encoding and validation live with the agent's
//! transport and the aggregator's ingest.

/// The `vigil.v1` package: messages and the `Ingest`, `Query` and `Alerts` services (client and
/// server).
pub mod v1 {
    tonic::include_proto!("vigil.v1");
}
