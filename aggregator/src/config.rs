//! The aggregator's configuration: the TOML file (`--config`), with command-line flags
//! overriding it. Every key has a default; an unknown key is an error, so a typo is not
//! silently ignored.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use serde::{Deserialize, Deserializer};

/// The whole config file.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AggregatorConfig {
    /// Where the write-ahead log (`wal/`) and, unless `audit.path` says otherwise, the audit
    /// log live (default `/var/lib/vigil-aggregator`).
    pub data_dir: PathBuf,
    /// `[grpc]`: the ingest endpoint agents stream to.
    pub grpc: GrpcConfig,
    /// `[http]`: the query API, `/metrics` and the dashboard (a later issue; not served yet).
    pub http: HttpConfig,
    /// `[tls]`: certificates, or an explicit choice of plaintext.
    pub tls: TlsConfig,
    /// `[auth]`: bearer tokens.
    pub auth: AuthConfig,
    /// `[audit]`: the record of connections and denied requests.
    pub audit: AuditConfig,
    /// `[limits]`: what the ingest path accepts.
    pub limits: LimitsConfig,
    /// `[wal]`: the write-ahead log.
    pub wal: WalConfig,
}

impl Default for AggregatorConfig {
    fn default() -> Self {
        Self {
            data_dir: PathBuf::from("/var/lib/vigil-aggregator"),
            grpc: GrpcConfig::default(),
            http: HttpConfig::default(),
            tls: TlsConfig::default(),
            auth: AuthConfig::default(),
            audit: AuditConfig::default(),
            limits: LimitsConfig::default(),
            wal: WalConfig::default(),
        }
    }
}

/// `[grpc]` in the aggregator config.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GrpcConfig {
    /// Address the ingest gRPC server listens on (default `127.0.0.1:7401`; port 0 picks a
    /// free port).
    pub listen: SocketAddr,
    /// Largest accepted gRPC message, after decompression (default 16 MiB). A larger one ends
    /// the stream with `resource_exhausted`; the agent should send smaller batches.
    pub max_message_bytes: usize,
    /// How long a new stream may take to send its Hello (default 10 s).
    #[serde(deserialize_with = "human_duration")]
    pub hello_timeout: Duration,
}

impl Default for GrpcConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 7401)),
            max_message_bytes: 16 * 1024 * 1024,
            hello_timeout: Duration::from_secs(10),
        }
    }
}

/// `[http]` in the aggregator config.
#[derive(Debug, Clone, PartialEq, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    /// Address for the HTTP query API, `/metrics` and the dashboard; no HTTP when unset.
    pub listen: Option<SocketAddr>,
}

/// `[tls]` in the aggregator config.
#[derive(Debug, Clone, PartialEq, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct TlsConfig {
    /// PEM certificate chain the server presents (leaf first).
    pub cert_file: Option<PathBuf>,
    /// PEM private key of `cert_file` (PKCS#8, PKCS#1 or SEC1).
    pub key_file: Option<PathBuf>,
    /// PEM CA certificates that sign agents' client certificates. When set, every client must
    /// present a certificate signed by one of them (mTLS), and its names (DNS SANs and CN) are
    /// the nodes it may write as.
    pub client_ca_file: Option<PathBuf>,
    /// Serve without TLS (default false). Must be chosen explicitly when no certificate is
    /// configured, and is refused on non-loopback addresses unless
    /// `allow_insecure_non_loopback` is true.
    pub plaintext: bool,
    /// Allow plaintext, or no authentication at all, on a non-loopback address (default
    /// false). Anyone who can reach the port can then read tokens off the wire or write as any
    /// node.
    pub allow_insecure_non_loopback: bool,
}

/// `[auth]` in the aggregator config.
#[derive(Debug, Clone, PartialEq, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// TOML file of bearer tokens (see docs/protocol.md, "Authentication"). When set, every
    /// stream needs `authorization: Bearer <token>` of an `agent` token.
    pub tokens_file: Option<PathBuf>,
}

/// `[audit]` in the aggregator config.
#[derive(Debug, Clone, PartialEq, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct AuditConfig {
    /// JSON-lines audit log (default `<data_dir>/audit.log`).
    pub path: Option<PathBuf>,
}

/// `[limits]` in the aggregator config.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Most distinct series (name + labels) stored per node (default 20,000). Declarations past
    /// it are refused with reason SERIES_LIMIT.
    pub max_series_per_node: usize,
    /// Samples older than this are refused with reason TOO_OLD (default 15 days).
    #[serde(deserialize_with = "human_duration")]
    pub retention: Duration,
    /// Samples more than this far in the future are refused with reason FUTURE_TIMESTAMP
    /// (default 5 minutes).
    #[serde(deserialize_with = "human_duration")]
    pub max_future_skew: Duration,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            max_series_per_node: 20_000,
            retention: Duration::from_secs(15 * 24 * 3600),
            max_future_skew: Duration::from_secs(5 * 60),
        }
    }
}

/// `[wal]` in the aggregator config.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WalConfig {
    /// A new segment file starts once the current one is this large (default 64 MiB).
    pub segment_bytes: u64,
}

impl Default for WalConfig {
    fn default() -> Self {
        Self {
            segment_bytes: 64 * 1024 * 1024,
        }
    }
}

/// A config file that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path} is invalid: {source}")]
    Parse {
        path: PathBuf,
        source: Box<toml::de::Error>,
    },
}

impl AggregatorConfig {
    /// Reads a config file; missing keys take their defaults.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text).map_err(|source| ConfigError::Parse {
            path: path.to_owned(),
            source: Box::new(source),
        })
    }

    /// Parses the text of a config file.
    pub fn parse(text: &str) -> Result<Self, toml::de::Error> {
        toml::from_str(text)
    }

    /// Where the audit log is written.
    pub fn audit_path(&self) -> PathBuf {
        self.audit
            .path
            .clone()
            .unwrap_or_else(|| self.data_dir.join("audit.log"))
    }
}

/// Durations written as `"15d"`, `"5m"`, `"500ms"`.
fn human_duration<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Duration, D::Error> {
    let text = String::deserialize(deserializer)?;
    humantime::parse_duration(&text).map_err(|error| {
        serde::de::Error::custom(format!(
            "{text:?} is not a duration ({error}); write e.g. \"15d\", \"5m\", \"10s\""
        ))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_empty_file_gives_the_documented_defaults() {
        let config = AggregatorConfig::parse("").unwrap();
        assert_eq!(config, AggregatorConfig::default());
        assert_eq!(config.grpc.listen.to_string(), "127.0.0.1:7401");
        assert_eq!(config.grpc.max_message_bytes, 16 << 20);
        assert_eq!(config.limits.max_series_per_node, 20_000);
        assert_eq!(config.limits.retention, Duration::from_secs(15 * 86_400));
    }

    #[test]
    fn durations_are_human_readable() {
        let config =
            AggregatorConfig::parse("[limits]\nretention = \"2d\"\nmax_future_skew = \"30s\"\n")
                .unwrap();
        assert_eq!(config.limits.retention, Duration::from_secs(2 * 86_400));
        assert_eq!(config.limits.max_future_skew, Duration::from_secs(30));
    }

    #[test]
    fn a_misspelt_key_is_an_error_that_names_it() {
        let error = AggregatorConfig::parse("[limits]\nmax_series_per_nod = 5\n").unwrap_err();
        assert!(error.to_string().contains("max_series_per_nod"), "{error}");
    }
}
