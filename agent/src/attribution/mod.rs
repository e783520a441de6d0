//! Container and Kubernetes pod attribution of processes: which container a model-server process
//! runs in (from its cgroup path, [`cgroup`]), and which pod, namespace and container name that
//! is (from the Kubernetes API, [`kubernetes`]), turned into the `container`, `pod` and
//! `namespace` labels and a bounded set of configured pod labels.
//!
//! Per collection pass a collector asks [`ContainerIdentityCache::identity`] for each process
//! (one read of `/proc/PID/cgroup` per process lifetime), then [`PodDirectory::attribute`] when a
//! directory runs (or [`Attribution::from_cgroup`] when not), and
//! [`Attribution::append_labels`] to its samples' labels.

pub mod cgroup;
pub mod kubernetes;

use std::{collections::HashMap, path::Path, path::PathBuf, time::Duration};

use serde::Deserialize;

pub use cgroup::{
    ContainerIdentity, ContainerRuntime, QosClass, parse_cgroup_path, parse_proc_cgroup,
    read_container_identity, read_container_identity_in,
};
pub use kubernetes::{
    BearerToken, ClusterAccess, DirectoryOptions, DirectoryStatus, PodDirectory, PodDirectoryError,
    PodInfo, SERVICE_ACCOUNT_DIR,
};

use crate::sample::Labels;

/// `[attribution]` in the agent config.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AttributionConfig {
    /// Name pods from the Kubernetes API when the agent runs in a pod (default true). Outside a
    /// cluster this does nothing; containers are then named by their short id.
    pub kubernetes: bool,
    /// Pod labels copied onto samples, each as `label_<key with non-alphanumerics as _>`
    /// (default `["app.kubernetes.io/name"]`). Only these: every label adds series.
    pub pod_labels: Vec<String>,
    /// The node whose pods are listed (default: env `NODE_NAME`, set it from the downward API's
    /// `spec.nodeName`; else the hostname).
    pub node_name: Option<String>,
    /// Time between two pod lists, e.g. "30s" (default). A process in a pod the agent does not
    /// know yet triggers a list sooner.
    #[serde(deserialize_with = "duration_from_text")]
    pub refresh_interval: Duration,
}

impl Default for AttributionConfig {
    fn default() -> Self {
        Self {
            kubernetes: true,
            pod_labels: vec!["app.kubernetes.io/name".to_string()],
            node_name: None,
            refresh_interval: Duration::from_secs(30),
        }
    }
}

/// A config the attribution cannot honour.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum AttributionConfigError {
    #[error("attribution.pod_labels has an empty label key")]
    EmptyPodLabel,
    #[error(
        "attribution.pod_labels: {first:?} and {second:?} would both be the sample label \
         {label}; keep one"
    )]
    PodLabelCollision {
        first: String,
        second: String,
        label: String,
    },
    #[error("attribution.refresh_interval must be at least 1s, not {0:?}")]
    RefreshTooOften(Duration),
}

impl AttributionConfig {
    pub fn validate(&self) -> Result<(), AttributionConfigError> {
        if self.refresh_interval < Duration::from_secs(1) {
            return Err(AttributionConfigError::RefreshTooOften(
                self.refresh_interval,
            ));
        }
        let mut seen: HashMap<String, &String> = HashMap::new();
        for key in &self.pod_labels {
            if key.is_empty() {
                return Err(AttributionConfigError::EmptyPodLabel);
            }
            let label = prometheus_label_name(key);
            if let Some(first) = seen.insert(label.clone(), key) {
                return Err(AttributionConfigError::PodLabelCollision {
                    first: first.clone(),
                    second: key.clone(),
                    label,
                });
            }
        }
        Ok(())
    }

    /// The node name: `node_name`, else env `NODE_NAME`, else the first line of
    /// `hostname_file` (normally `/proc/sys/kernel/hostname`).
    pub fn resolve_node_name(
        &self,
        env: &dyn Fn(&str) -> Option<String>,
        hostname_file: &Path,
    ) -> Option<String> {
        let hostname = || {
            let text = std::fs::read_to_string(hostname_file).ok()?;
            Some(text.lines().next()?.trim().to_string())
        };
        self.node_name
            .clone()
            .or_else(|| env("NODE_NAME"))
            .or_else(hostname)
            .filter(|name| !name.is_empty())
    }
}

fn duration_from_text<'de, D: serde::Deserializer<'de>>(
    deserializer: D,
) -> Result<Duration, D::Error> {
    let text = String::deserialize(deserializer)?;
    humantime::parse_duration(&text).map_err(|e| {
        serde::de::Error::custom(format!("{text:?} is not a duration like \"30s\": {e}"))
    })
}

/// The sample label for pod label `key`, as kube-state-metrics names them:
/// `app.kubernetes.io/name` -> `label_app_kubernetes_io_name`.
pub fn prometheus_label_name(key: &str) -> String {
    let mut name = String::with_capacity(6 + key.len());
    name.push_str("label_");
    name.extend(
        key.chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' }),
    );
    name
}

/// What a process's samples say about where it runs.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Attribution {
    /// The container's name when the Kubernetes API knows it, else its 12-hex short id.
    pub container: Option<String>,
    pub pod: Option<String>,
    pub namespace: Option<String>,
    /// The pod's QoS class (the API's, else the cgroup path's). Not a sample label.
    pub qos: Option<&'static str>,
    /// Configured pod labels the pod has, as (sample label name, value).
    pub labels: Vec<(String, String)>,
}

impl Attribution {
    /// What the cgroup path alone tells: the short id and the QoS class.
    pub fn from_cgroup(identity: &ContainerIdentity) -> Self {
        Self {
            container: Some(identity.short_id().to_string()),
            qos: identity.qos.map(QosClass::as_str),
            ..Self::default()
        }
    }

    /// Adds `container`, `pod`, `namespace` and the pod labels that are known to `labels`.
    pub fn append_labels(&self, labels: &mut Labels) {
        let named = [
            ("container", &self.container),
            ("pod", &self.pod),
            ("namespace", &self.namespace),
        ];
        for (name, value) in named {
            if let Some(value) = value {
                labels.insert(name.to_string(), value.clone());
            }
        }
        for (name, value) in &self.labels {
            labels.insert(name.clone(), value.clone());
        }
    }
}

/// Container identities of processes, read once per process: a process does not change
/// container, and (pid, start time) names one process across PID reuse.
#[derive(Debug)]
pub struct ContainerIdentityCache {
    proc_root: PathBuf,
    /// Identity and whether the process was asked for since the last [`Self::end_pass`].
    entries: HashMap<(u32, u64), (Option<ContainerIdentity>, bool)>,
}

impl Default for ContainerIdentityCache {
    fn default() -> Self {
        Self::new()
    }
}

impl ContainerIdentityCache {
    pub fn new() -> Self {
        Self::with_proc_root(Path::new("/proc"))
    }

    pub fn with_proc_root(proc_root: &Path) -> Self {
        Self {
            proc_root: proc_root.to_owned(),
            entries: HashMap::new(),
        }
    }

    /// The container of process `pid` started at `start_time_ticks` (field 22 of
    /// `/proc/PID/stat`); read from `/proc/PID/cgroup` the first time only.
    pub fn identity(&mut self, pid: u32, start_time_ticks: u64) -> Option<&ContainerIdentity> {
        let proc_root = &self.proc_root;
        let entry = self
            .entries
            .entry((pid, start_time_ticks))
            .or_insert_with(|| (read_container_identity_in(proc_root, pid), false));
        entry.1 = true;
        entry.0.as_ref()
    }

    /// Forgets processes not asked for since the previous call; call once per pass.
    pub fn end_pass(&mut self) {
        self.entries.retain(|_, (_, asked)| std::mem::take(asked));
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "ec8207a3dde607f7867f8f5390915018488b877761306ffd4ef099f9b3ee16a1";

    #[test]
    fn the_default_config_names_pods_in_a_cluster_and_copies_the_app_name_label() {
        let config: AttributionConfig = toml::from_str("").unwrap();
        assert_eq!(config, AttributionConfig::default());
        assert!(config.kubernetes);
        assert_eq!(config.pod_labels, ["app.kubernetes.io/name"]);
        assert_eq!(config.node_name, None);
        assert_eq!(config.refresh_interval, Duration::from_secs(30));
        assert_eq!(config.validate(), Ok(()));
    }

    #[test]
    fn a_full_config_parses_with_a_human_duration() {
        let config: AttributionConfig = toml::from_str(
            r#"
            kubernetes = false
            pod_labels = ["app.kubernetes.io/name", "team"]
            node_name = "gpu-node-7"
            refresh_interval = "2m"
            "#,
        )
        .unwrap();
        assert_eq!(
            config,
            AttributionConfig {
                kubernetes: false,
                pod_labels: vec!["app.kubernetes.io/name".into(), "team".into()],
                node_name: Some("gpu-node-7".into()),
                refresh_interval: Duration::from_secs(120),
            }
        );
    }

    #[test]
    fn a_typo_or_a_bad_duration_is_an_error_naming_it() {
        let typo = toml::from_str::<AttributionConfig>("pod_label = [\"team\"]").unwrap_err();
        assert!(
            typo.to_string().contains("unknown field `pod_label`"),
            "{typo}"
        );
        let duration =
            toml::from_str::<AttributionConfig>("refresh_interval = \"soon\"").unwrap_err();
        assert!(
            duration
                .to_string()
                .contains("\"soon\" is not a duration like \"30s\""),
            "{duration}"
        );
    }

    #[test]
    fn pod_labels_that_would_share_a_sample_label_are_refused() {
        let config = AttributionConfig {
            pod_labels: vec![
                "app.kubernetes.io/name".into(),
                "app_kubernetes_io/name".into(),
            ],
            ..AttributionConfig::default()
        };
        assert_eq!(
            config.validate(),
            Err(AttributionConfigError::PodLabelCollision {
                first: "app.kubernetes.io/name".into(),
                second: "app_kubernetes_io/name".into(),
                label: "label_app_kubernetes_io_name".into(),
            })
        );
        let empty = AttributionConfig {
            pod_labels: vec![String::new()],
            ..AttributionConfig::default()
        };
        assert_eq!(empty.validate(), Err(AttributionConfigError::EmptyPodLabel));
        let hasty = AttributionConfig {
            refresh_interval: Duration::from_millis(100),
            ..AttributionConfig::default()
        };
        assert_eq!(
            hasty.validate(),
            Err(AttributionConfigError::RefreshTooOften(
                Duration::from_millis(100)
            ))
        );
    }

    #[test]
    fn pod_label_keys_become_prometheus_label_names_as_kube_state_metrics_writes_them() {
        assert_eq!(
            prometheus_label_name("app.kubernetes.io/name"),
            "label_app_kubernetes_io_name"
        );
        assert_eq!(prometheus_label_name("team"), "label_team");
        assert_eq!(prometheus_label_name("gpu-pool"), "label_gpu_pool");
    }

    #[test]
    fn the_node_name_comes_from_the_config_then_node_name_then_the_hostname() {
        let dir = tempfile::tempdir().unwrap();
        let hostname = dir.path().join("hostname");
        std::fs::write(&hostname, "ip-10-20-7-17\n").unwrap();
        let env = |name: &str| (name == "NODE_NAME").then(|| "gpu-node-7".to_string());
        let no_env = |_: &str| None;
        let configured = AttributionConfig {
            node_name: Some("from-config".into()),
            ..AttributionConfig::default()
        };
        let default = AttributionConfig::default();
        assert_eq!(
            configured.resolve_node_name(&env, &hostname).as_deref(),
            Some("from-config")
        );
        assert_eq!(
            default.resolve_node_name(&env, &hostname).as_deref(),
            Some("gpu-node-7")
        );
        assert_eq!(
            default.resolve_node_name(&no_env, &hostname).as_deref(),
            Some("ip-10-20-7-17")
        );
        assert_eq!(
            default.resolve_node_name(&no_env, &dir.path().join("missing")),
            None
        );
    }

    #[test]
    fn without_a_pod_directory_a_container_is_named_by_its_short_id() {
        let identity = ContainerIdentity {
            runtime: ContainerRuntime::Containerd,
            container_id: ID.into(),
            pod_uid: Some("8d6d3a5e-9c1b-4a8e-b3a4-2f7c1e0d9b61".into()),
            qos: Some(QosClass::BestEffort),
        };
        let attribution = Attribution::from_cgroup(&identity);
        assert_eq!(
            attribution,
            Attribution {
                container: Some("ec8207a3dde6".into()),
                pod: None,
                namespace: None,
                qos: Some("BestEffort"),
                labels: vec![],
            }
        );
        let mut labels = Labels::from([("pid".to_string(), "7".to_string())]);
        attribution.append_labels(&mut labels);
        assert_eq!(
            labels,
            Labels::from([
                ("pid".to_string(), "7".to_string()),
                ("container".to_string(), "ec8207a3dde6".to_string()),
            ])
        );
    }

    #[test]
    fn the_identity_cache_reads_each_process_once_and_forgets_processes_gone_for_a_pass() {
        let proc_root = tempfile::tempdir().unwrap();
        let cgroup = proc_root.path().join("4242/cgroup");
        std::fs::create_dir(proc_root.path().join("4242")).unwrap();
        std::fs::write(&cgroup, format!("0::/system.slice/docker-{ID}.scope\n")).unwrap();
        let mut cache = ContainerIdentityCache::with_proc_root(proc_root.path());
        assert_eq!(cache.identity(4242, 100).unwrap().container_id, ID);

        // Read once per process: a rewrite is not seen by the same process (pid, start time)...
        std::fs::write(&cgroup, "0::/user.slice/user-1000.slice/session-3.scope\n").unwrap();
        cache.end_pass();
        assert_eq!(cache.identity(4242, 100).unwrap().container_id, ID);
        // ...but a new process that reuses the pid is read afresh.
        assert_eq!(cache.identity(4242, 200), None);
        assert_eq!(cache.len(), 2);

        // A pass that does not ask for a process forgets it.
        cache.end_pass();
        cache.identity(4242, 200);
        cache.end_pass();
        assert_eq!(cache.len(), 1);
        cache.end_pass();
        assert!(cache.is_empty());
    }
}
