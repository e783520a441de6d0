//! `[transport]` in the agent's config: where batches go, how they are protected, and where
//! they wait while the aggregator cannot take them.

use std::{path::PathBuf, time::Duration};

use serde::{Deserialize, Deserializer};

/// Where the spool lives when `transport.spool_dir` is not set.
pub const DEFAULT_SPOOL_DIR: &str = "/var/lib/vigil/spool";
/// The spool's bound when `transport.spool_max_bytes` is not set (1 GiB: hours of a busy node).
pub const DEFAULT_SPOOL_MAX_BYTES: u64 = 1 << 30;

/// `[transport]`: streaming batches to the aggregator (`vigil-agent run`).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TransportConfig {
    /// Aggregator endpoints, tried in order; on failure the agent fails over to the next one.
    /// `https://host:port` (TLS, needs `ca_file`), or `http://host:port` with `plaintext = true`.
    pub endpoints: Vec<String>,
    /// File holding the bearer token sent as `authorization: Bearer ...` (never logged).
    pub token_file: Option<PathBuf>,
    /// PEM file of the CA(s) that signed the aggregator's certificate (required for https).
    pub ca_file: Option<PathBuf>,
    /// PEM client certificate for mutual TLS (together with `client_key_file`).
    pub client_cert_file: Option<PathBuf>,
    /// PEM private key of `client_cert_file`.
    pub client_key_file: Option<PathBuf>,
    /// Compression of batches on the wire: `zstd` (default), `gzip` or `none`.
    pub compression: Compression,
    /// Code each value against the series' previous one on the stream (docs/protocol.md, "Delta
    /// encoding"; 5-10x fewer bytes), when the aggregator offers it. Default true.
    pub delta_encoding: bool,
    /// Directory of the on-disk spool (batches not yet acked, the agent instance id).
    pub spool_dir: PathBuf,
    /// The spool's bound in bytes; when full, the oldest batches are dropped and counted.
    pub spool_max_bytes: u64,
    /// How often a collection pass runs, aligned to the wall clock (`1s`: every whole second).
    #[serde(deserialize_with = "duration_from_text")]
    pub interval: Duration,
    /// Allow `http://` endpoints (no TLS, no protection of the token). Off unless set.
    pub plaintext: bool,
}

impl Default for TransportConfig {
    fn default() -> Self {
        Self {
            endpoints: Vec::new(),
            token_file: None,
            ca_file: None,
            client_cert_file: None,
            client_key_file: None,
            compression: Compression::Zstd,
            delta_encoding: true,
            spool_dir: PathBuf::from(DEFAULT_SPOOL_DIR),
            spool_max_bytes: DEFAULT_SPOOL_MAX_BYTES,
            interval: Duration::from_secs(1),
            plaintext: false,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Compression {
    Zstd,
    Gzip,
    None,
}

/// A `[transport]` section the agent cannot run with.
#[derive(Debug, thiserror::Error)]
pub enum TransportConfigError {
    #[error(
        "transport.endpoints is empty: set at least one aggregator, e.g. endpoints = [\"https://aggregator:7401\"]"
    )]
    NoEndpoints,
    #[error(
        "transport endpoint {0} is plaintext http: use https, or set transport.plaintext = true to send without TLS"
    )]
    PlaintextNotAllowed(String),
    #[error("transport endpoint {0} must start with https:// or http://")]
    BadScheme(String),
    #[error("transport endpoint {0} uses https but transport.ca_file is not set")]
    NoCaFile(String),
    #[error("transport.client_cert_file and transport.client_key_file must be set together")]
    HalfClientIdentity,
    #[error("transport.interval must be between 10ms and 1h, not {0:?}")]
    Interval(Duration),
    #[error("transport.spool_max_bytes must be at least 1 MiB, not {0}")]
    SpoolTooSmall(u64),
}

impl TransportConfig {
    pub fn validate(&self) -> Result<(), TransportConfigError> {
        if self.endpoints.is_empty() {
            return Err(TransportConfigError::NoEndpoints);
        }
        for endpoint in &self.endpoints {
            if endpoint.starts_with("http://") {
                if !self.plaintext {
                    return Err(TransportConfigError::PlaintextNotAllowed(endpoint.clone()));
                }
            } else if endpoint.starts_with("https://") {
                if self.ca_file.is_none() {
                    return Err(TransportConfigError::NoCaFile(endpoint.clone()));
                }
            } else {
                return Err(TransportConfigError::BadScheme(endpoint.clone()));
            }
        }
        if self.client_cert_file.is_some() != self.client_key_file.is_some() {
            return Err(TransportConfigError::HalfClientIdentity);
        }
        if self.interval < Duration::from_millis(10) || self.interval > Duration::from_secs(3600) {
            return Err(TransportConfigError::Interval(self.interval));
        }
        if self.spool_max_bytes < 1 << 20 {
            return Err(TransportConfigError::SpoolTooSmall(self.spool_max_bytes));
        }
        Ok(())
    }
}

fn duration_from_text<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Duration, D::Error> {
    let text = String::deserialize(deserializer)?;
    humantime::parse_duration(&text)
        .map_err(|e| serde::de::Error::custom(format!("invalid duration {text:?}: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_key_parses() {
        let config: TransportConfig = toml::from_str(
            r#"
            endpoints = ["https://agg-1:7401", "https://agg-2:7401"]
            token_file = "/etc/vigil/token"
            ca_file = "/etc/vigil/ca.pem"
            client_cert_file = "/etc/vigil/node.pem"
            client_key_file = "/etc/vigil/node.key"
            compression = "gzip"
            spool_dir = "/tmp/spool"
            spool_max_bytes = 2097152
            interval = "500ms"
            plaintext = false
            "#,
        )
        .unwrap();
        assert_eq!(config.endpoints.len(), 2);
        assert_eq!(config.compression, Compression::Gzip);
        assert_eq!(config.interval, Duration::from_millis(500));
        config.validate().unwrap();
    }

    #[test]
    fn an_unknown_key_is_an_error() {
        let err = toml::from_str::<TransportConfig>("endpoint = [\"https://a:1\"]").unwrap_err();
        assert!(
            err.to_string().contains("unknown field `endpoint`"),
            "{err}"
        );
    }

    #[test]
    fn plaintext_needs_an_explicit_opt_in() {
        let mut config = TransportConfig {
            endpoints: vec!["http://127.0.0.1:7401".into()],
            ..Default::default()
        };
        let err = config.validate().unwrap_err().to_string();
        assert!(err.contains("transport.plaintext = true"), "{err}");
        config.plaintext = true;
        config.validate().unwrap();
    }

    #[test]
    fn https_needs_a_ca_file() {
        let config = TransportConfig {
            endpoints: vec!["https://agg:7401".into()],
            ..Default::default()
        };
        assert!(matches!(
            config.validate(),
            Err(TransportConfigError::NoCaFile(_))
        ));
    }
}
