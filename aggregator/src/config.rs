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
    /// Where the write-ahead log (`wal/`), the store (`store.redb`, docs/storage.md) and,
    /// unless `audit.path` says otherwise, the audit log live (default
    /// `/var/lib/vigil-aggregator`).
    pub data_dir: PathBuf,
    /// `[grpc]`: the ingest endpoint agents stream to.
    pub grpc: GrpcConfig,
    /// `[http]`: the query API, `/metrics` and the dashboard.
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
    /// `[storage]`: the embedded time-series store (`<data_dir>/store.redb`).
    pub storage: StorageConfig,
    /// `[export]`: sending what is stored on to Prometheus-compatible systems.
    pub export: ExportConfig,
    /// `[alerting]`: rule files, their evaluation, Alertmanager and webhooks (docs/alerts.md).
    pub alerting: crate::alerting::AlertingConfig,
    /// `[anomaly]`: which series get adaptive baselines and a `vigil_anomaly_score`.
    pub anomaly: crate::anomaly::scorer::AnomalyConfig,
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
            storage: StorageConfig::default(),
            export: ExportConfig::default(),
            alerting: crate::alerting::AlertingConfig::default(),
            anomaly: crate::anomaly::scorer::AnomalyConfig::default(),
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

/// `[export]` in the aggregator config.
#[derive(Debug, Clone, PartialEq, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct ExportConfig {
    /// `[[export.remote_write]]`: Prometheus remote-write targets (none by default). Each gets
    /// every stored sample (events are not exported) through its own on-disk queue under
    /// `<data_dir>/export/<name>/`, so an unreachable target loses nothing until its queue is
    /// full. Names must be unique.
    #[serde(deserialize_with = "remote_write_targets")]
    pub remote_write: Vec<RemoteWriteConfig>,
}

/// One `[[export.remote_write]]` target.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RemoteWriteConfig {
    /// Names the target in logs, metrics (`target` label) and its queue directory: letters,
    /// digits, `_`, `-` and `.` (required).
    pub name: String,
    /// The receiver's remote-write URL, http or https, e.g.
    /// `http://prometheus:9090/api/v1/write` or `http://victoria:8428/api/v1/write` (required).
    pub url: String,
    /// File holding a bearer token sent as `Authorization: Bearer <token>` (read at startup).
    #[serde(default)]
    pub bearer_token_file: Option<PathBuf>,
    /// How long one POST may take before it is retried (default 30 s).
    #[serde(
        default = "default_remote_write_timeout",
        deserialize_with = "human_duration"
    )]
    pub timeout: Duration,
    /// Most samples in one POST (default 2,000).
    #[serde(default = "default_max_samples_per_send")]
    pub max_samples_per_send: usize,
    /// Bound of the on-disk queue; when full, the oldest queued samples are dropped and
    /// counted (default 512 MiB).
    #[serde(default = "default_queue_max_bytes")]
    pub queue_max_bytes: u64,
    /// First wait before retrying a failed POST (connection error, 5xx, 429); doubled per
    /// failure up to `max_backoff`, with jitter (default 100 ms).
    #[serde(default = "default_min_backoff", deserialize_with = "human_duration")]
    pub min_backoff: Duration,
    /// Longest wait between retries (default 30 s).
    #[serde(default = "default_max_backoff", deserialize_with = "human_duration")]
    pub max_backoff: Duration,
}

fn default_remote_write_timeout() -> Duration {
    Duration::from_secs(30)
}

fn default_max_samples_per_send() -> usize {
    2_000
}

fn default_queue_max_bytes() -> u64 {
    512 * 1024 * 1024
}

fn default_min_backoff() -> Duration {
    Duration::from_millis(100)
}

fn default_max_backoff() -> Duration {
    Duration::from_secs(30)
}

impl RemoteWriteConfig {
    /// A target with the defaults for everything but its name and URL.
    pub fn new(name: &str, url: &str) -> RemoteWriteConfig {
        RemoteWriteConfig {
            name: name.to_owned(),
            url: url.to_owned(),
            bearer_token_file: None,
            timeout: default_remote_write_timeout(),
            max_samples_per_send: default_max_samples_per_send(),
            queue_max_bytes: default_queue_max_bytes(),
            min_backoff: default_min_backoff(),
            max_backoff: default_max_backoff(),
        }
    }

    /// Why this target cannot be used, if it cannot.
    pub fn check(&self) -> Result<(), String> {
        let name = &self.name;
        if name.is_empty()
            || name == "."
            || name == ".."
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
        {
            return Err(format!(
                "export.remote_write name {name:?} is not usable: use letters, digits, '_', '-' \
                 and '.' (it names the queue directory)"
            ));
        }
        let url: hyper::Uri = self.url.parse().map_err(|error| {
            format!(
                "export.remote_write {name:?}: url {:?} is not a URL: {error}",
                self.url
            )
        })?;
        if !matches!(url.scheme_str(), Some("http" | "https")) || url.host().is_none() {
            return Err(format!(
                "export.remote_write {name:?}: url {:?} must be an http:// or https:// URL \
                 with a host, e.g. http://prometheus:9090/api/v1/write",
                self.url
            ));
        }
        if self.max_samples_per_send == 0 {
            return Err(format!(
                "export.remote_write {name:?}: max_samples_per_send must be at least 1"
            ));
        }
        if self.queue_max_bytes < 1024 * 1024 {
            return Err(format!(
                "export.remote_write {name:?}: queue_max_bytes must be at least 1 MiB"
            ));
        }
        if self.timeout.is_zero() {
            return Err(format!(
                "export.remote_write {name:?}: timeout must be above zero"
            ));
        }
        if self.min_backoff.is_zero() || self.min_backoff > self.max_backoff {
            return Err(format!(
                "export.remote_write {name:?}: min_backoff must be above zero and at most \
                 max_backoff"
            ));
        }
        Ok(())
    }
}

/// `[[export.remote_write]]` entries, each checked, with unique names.
fn remote_write_targets<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<Vec<RemoteWriteConfig>, D::Error> {
    let targets = Vec::<RemoteWriteConfig>::deserialize(deserializer)?;
    for (index, target) in targets.iter().enumerate() {
        target.check().map_err(serde::de::Error::custom)?;
        if targets[..index].iter().any(|t| t.name == target.name) {
            return Err(serde::de::Error::custom(format!(
                "export.remote_write name {:?} is used twice; names must be unique",
                target.name
            )));
        }
    }
    Ok(targets)
}

/// `[storage]` in the aggregator config (docs/storage.md).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StorageConfig {
    /// How often recent data is written from memory to the store and the write-ahead log is
    /// trimmed (default 60 s; also at shutdown). Longer means more replay at startup.
    #[serde(deserialize_with = "human_duration")]
    pub checkpoint_interval: Duration,
    /// How long 1-minute rollups (min/max/sum/count/last per series) are kept after raw data
    /// is gone (`limits.retention`), for capacity planning (default 90 days).
    #[serde(deserialize_with = "human_duration")]
    pub rollup_retention: Duration,
}

impl Default for StorageConfig {
    fn default() -> Self {
        Self {
            checkpoint_interval: Duration::from_secs(60),
            rollup_retention: Duration::from_secs(90 * 86_400),
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
pub(crate) fn human_duration<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<Duration, D::Error> {
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
    fn remote_write_targets_parse_with_defaults_and_are_checked() {
        let config = AggregatorConfig::parse(
            "[[export.remote_write]]\nname = \"prom\"\nurl = \"http://127.0.0.1:9090/api/v1/write\"\n\
             [[export.remote_write]]\nname = \"vm\"\nurl = \"https://vm.example:8428/api/v1/write\"\n\
             timeout = \"5s\"\nmax_samples_per_send = 500\nmax_backoff = \"1m\"\n",
        )
        .unwrap();
        let targets = &config.export.remote_write;
        assert_eq!(targets.len(), 2);
        assert_eq!(
            targets[0],
            RemoteWriteConfig::new("prom", "http://127.0.0.1:9090/api/v1/write")
        );
        assert_eq!(targets[0].queue_max_bytes, 512 << 20);
        assert_eq!(targets[1].timeout, Duration::from_secs(5));
        assert_eq!(targets[1].max_samples_per_send, 500);
        assert_eq!(targets[1].max_backoff, Duration::from_secs(60));

        let refused = |text: &str, expected: &str| {
            let error = AggregatorConfig::parse(text).unwrap_err().to_string();
            assert!(error.contains(expected), "{error}");
        };
        let target = |name: &str, url: &str| {
            format!("[[export.remote_write]]\nname = \"{name}\"\nurl = \"{url}\"\n")
        };
        refused(
            &format!("{}{}", target("a", "http://x/w"), target("a", "http://y/w")),
            "\"a\" is used twice",
        );
        refused(
            &target("a", "ftp://x/w"),
            "must be an http:// or https:// URL",
        );
        refused(&target("a", "not a url"), "is not a URL");
        refused(&target("../etc", "http://x/w"), "is not usable");
        refused(
            &format!("{}max_samples_per_send = 0\n", target("a", "http://x/w")),
            "max_samples_per_send must be at least 1",
        );
        refused(
            &format!("{}min_backoff = \"2m\"\n", target("a", "http://x/w")),
            "at most max_backoff",
        );
        refused(
            &format!("{}urll = \"x\"\n", target("a", "http://x/w")),
            "urll",
        );
        refused(
            "[[export.remote_write]]\nname = \"a\"\n",
            "missing field `url`",
        );
    }

    #[test]
    fn a_misspelt_key_is_an_error_that_names_it() {
        let error = AggregatorConfig::parse("[limits]\nmax_series_per_nod = 5\n").unwrap_err();
        assert!(error.to_string().contains("max_series_per_nod"), "{error}");
    }
}
