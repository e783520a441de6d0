//! `[alerting]` in the aggregator config.

use std::{collections::BTreeMap, time::Duration};

use serde::{Deserialize, Deserializer};

/// `[alerting]`: rule files, their evaluation, and where notifications go.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AlertingConfig {
    /// Rule files (Prometheus format), as paths or globs (relative ones from the aggregator's
    /// working directory). No rules (the default) means no rule evaluation.
    pub rule_files: Vec<String>,
    /// How often a group without its own `interval` is evaluated (default 5 s; at least 1 s).
    #[serde(deserialize_with = "duration")]
    pub evaluation_interval: Duration,
    /// How often a still-firing alert is sent again to Alertmanager and webhooks (default 1 m).
    #[serde(deserialize_with = "duration")]
    pub resend_interval: Duration,
    /// How often the rule files are checked for changes (default 5 s); a changed file is
    /// reloaded as on SIGHUP.
    #[serde(deserialize_with = "duration")]
    pub file_check_interval: Duration,
    /// Labels added to every notification (not to stored series), e.g. `cluster = "east"`.
    pub external_labels: BTreeMap<String, String>,
    /// Values for `${name}` placeholders in rule files; they override the defaults the files
    /// write as `${name:-default}` (docs/alerts.md lists the catalog's).
    #[serde(deserialize_with = "thresholds")]
    pub thresholds: BTreeMap<String, String>,
    /// The `node` of recorded series (recording rules, `ALERTS`) whose labels have no `node`
    /// (default "vigil-aggregator").
    pub node: String,
    /// `[[alerting.alertmanager]]`: Alertmanagers (API v2) every alert is sent to.
    pub alertmanager: Vec<AlertmanagerConfig>,
    /// `[[alerting.webhook]]`: generic JSON webhooks every alert is sent to.
    pub webhook: Vec<WebhookConfig>,
}

impl Default for AlertingConfig {
    fn default() -> Self {
        Self {
            rule_files: Vec::new(),
            evaluation_interval: Duration::from_secs(5),
            resend_interval: Duration::from_secs(60),
            file_check_interval: Duration::from_secs(5),
            external_labels: BTreeMap::new(),
            thresholds: BTreeMap::new(),
            node: "vigil-aggregator".into(),
            alertmanager: Vec::new(),
            webhook: Vec::new(),
        }
    }
}

/// One `[[alerting.alertmanager]]`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AlertmanagerConfig {
    /// The Alertmanager's base URL, e.g. `http://alertmanager:9093` (alerts go to
    /// `<url>/api/v2/alerts`).
    pub url: String,
    /// How long one POST may take (default 10 s).
    #[serde(default = "default_timeout", deserialize_with = "duration")]
    pub timeout: Duration,
    /// Attempts after the first failed one before the alerts of that POST are dropped and
    /// counted (default 3; firing alerts are sent again at the next resend anyway).
    #[serde(default = "default_am_retries")]
    pub max_retries: u32,
}

/// One `[[alerting.webhook]]`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookConfig {
    /// Where the JSON is POSTed (http or https).
    pub url: String,
    /// How long one POST may take (default 10 s).
    #[serde(default = "default_timeout", deserialize_with = "duration")]
    pub timeout: Duration,
    /// Attempts after the first failed one (default 5).
    #[serde(default = "default_webhook_retries")]
    pub max_retries: u32,
    /// First wait before a retry, doubled per failure up to `max_backoff` (default 500 ms).
    #[serde(default = "default_min_backoff", deserialize_with = "duration")]
    pub min_backoff: Duration,
    /// Longest wait between retries (default 30 s).
    #[serde(default = "default_max_backoff", deserialize_with = "duration")]
    pub max_backoff: Duration,
}

impl WebhookConfig {
    pub fn new(url: &str) -> WebhookConfig {
        WebhookConfig {
            url: url.to_owned(),
            timeout: default_timeout(),
            max_retries: default_webhook_retries(),
            min_backoff: default_min_backoff(),
            max_backoff: default_max_backoff(),
        }
    }
}

impl AlertmanagerConfig {
    pub fn new(url: &str) -> AlertmanagerConfig {
        AlertmanagerConfig {
            url: url.to_owned(),
            timeout: default_timeout(),
            max_retries: default_am_retries(),
        }
    }
}

fn default_timeout() -> Duration {
    Duration::from_secs(10)
}

fn default_am_retries() -> u32 {
    3
}

fn default_webhook_retries() -> u32 {
    5
}

fn default_min_backoff() -> Duration {
    Duration::from_millis(500)
}

fn default_max_backoff() -> Duration {
    Duration::from_secs(30)
}

fn duration<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Duration, D::Error> {
    let text = String::deserialize(deserializer)?;
    humantime::parse_duration(&text).map_err(|error| {
        serde::de::Error::custom(format!(
            "{text:?} is not a duration ({error}); write e.g. \"5s\", \"1m\""
        ))
    })
}

/// Threshold values may be written as TOML numbers or strings (`"5m"` for a range).
fn thresholds<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<BTreeMap<String, String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Value {
        Integer(i64),
        Float(f64),
        Text(String),
    }
    let map = BTreeMap::<String, Value>::deserialize(deserializer)?;
    Ok(map
        .into_iter()
        .map(|(name, value)| {
            let text = match value {
                Value::Integer(value) => value.to_string(),
                Value::Float(value) => value.to_string(),
                Value::Text(text) => text,
            };
            (name, text)
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_section_parses_with_defaults() {
        let config: AlertingConfig = toml::from_str(
            "rule_files = [\"/etc/vigil/rules/*.yml\"]\nevaluation_interval = \"2s\"\n\
             [thresholds]\ngpu_temperature_max_celsius = 90\ngpu_memory_max_ratio = 0.9\n\
             [external_labels]\ncluster = \"east\"\n\
             [[alertmanager]]\nurl = \"http://127.0.0.1:9093\"\n\
             [[webhook]]\nurl = \"http://127.0.0.1:8080/hook\"\nmax_retries = 2\n",
        )
        .unwrap();
        assert_eq!(config.evaluation_interval, Duration::from_secs(2));
        assert_eq!(config.resend_interval, Duration::from_secs(60));
        assert_eq!(config.thresholds["gpu_temperature_max_celsius"], "90");
        assert_eq!(config.thresholds["gpu_memory_max_ratio"], "0.9");
        assert_eq!(
            config.alertmanager[0],
            AlertmanagerConfig::new("http://127.0.0.1:9093")
        );
        assert_eq!(config.webhook[0].max_retries, 2);
        assert!(toml::from_str::<AlertingConfig>("rule_file = []").is_err());
    }
}
