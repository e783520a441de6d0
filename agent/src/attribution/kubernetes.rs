//! The pods on this node, from the Kubernetes API: pod name, namespace, QoS class, the configured
//! pod labels, and the name of every container, looked up by container id or pod UID.
//!
//! One `GET /api/v1/pods?fieldSelector=spec.nodeName=<node>` lists them (the agent needs `list`
//! on `pods` cluster-wide). A background thread repeats it every `refresh_interval`, and sooner
//! when a process shows up in a pod container the directory does not know yet, at most once per
//! `on_demand_gap`. Looking a container up never waits for the network: a pod that started
//! since the last list is attributed by container id until the next list names it. When the
//! API cannot be reached, the last good list keeps serving, and the failure is logged once per
//! outage rather than on every retry.

use std::{
    collections::{HashMap, HashSet},
    path::{Path, PathBuf},
    sync::{Arc, Condvar, Mutex, MutexGuard},
    time::{Duration, Instant},
};

use serde::Deserialize;

use super::cgroup::{ContainerIdentity, QosClass};
use super::{Attribution, AttributionConfig, prometheus_label_name};

/// Where the kubelet mounts a pod's service-account token, CA bundle and namespace.
pub const SERVICE_ACCOUNT_DIR: &str = "/var/run/secrets/kubernetes.io/serviceaccount";

/// A list answer larger than this is refused; 110 pods (the kubelet's default maximum) with
/// managed fields take a few MiB.
const MAX_POD_LIST_BYTES: u64 = 64 << 20;

/// Unknown containers remembered so that each asks for at most one early refresh; forgotten all
/// at once past this many, which bounds the memory a stream of short-lived containers can take.
const MAX_REMEMBERED_UNKNOWN: usize = 4096;

/// How the agent reaches the Kubernetes API server.
#[derive(Debug, Clone)]
pub struct ClusterAccess {
    /// Base URL without a trailing slash, e.g. `https://10.96.0.1:443`.
    pub api_url: String,
    pub token: BearerToken,
    /// PEM bundle of the CAs the API server's certificate must chain to; `None`: the Mozilla
    /// roots (an API server behind a public certificate). Unused for `http://` URLs.
    pub ca_pem: Option<Vec<u8>>,
}

/// The bearer token sent with every request.
#[derive(Debug, Clone)]
pub enum BearerToken {
    /// Read before every request: the kubelet rotates projected service-account tokens (they
    /// expire after an hour), rewriting the file in place.
    File(PathBuf),
    Fixed(String),
}

impl ClusterAccess {
    /// The access a pod gets from Kubernetes: the API's address in `KUBERNETES_SERVICE_HOST` and
    /// `KUBERNETES_SERVICE_PORT`, the token and CA in `service_account_dir` (normally
    /// [`SERVICE_ACCOUNT_DIR`]). `Ok(None)` when not in a pod; an error when in a pod without a
    /// usable service account. `env` looks up environment variables.
    pub fn in_cluster(
        env: &dyn Fn(&str) -> Option<String>,
        service_account_dir: &Path,
    ) -> Result<Option<Self>, PodDirectoryError> {
        let (Some(host), Some(port)) = (
            env("KUBERNETES_SERVICE_HOST").filter(|h| !h.is_empty()),
            env("KUBERNETES_SERVICE_PORT").filter(|p| !p.is_empty()),
        ) else {
            return Ok(None);
        };
        let token_path = service_account_dir.join("token");
        std::fs::metadata(&token_path).map_err(|source| PodDirectoryError::ServiceAccount {
            path: token_path.clone(),
            source,
        })?;
        let ca_path = service_account_dir.join("ca.crt");
        let ca_pem =
            std::fs::read(&ca_path).map_err(|source| PodDirectoryError::ServiceAccount {
                path: ca_path.clone(),
                source,
            })?;
        if root_certificates(&ca_pem).is_empty() {
            return Err(PodDirectoryError::NoCaCertificate { path: ca_path });
        }
        // An IPv6 service address needs brackets in a URL.
        let host = if host.contains(':') {
            format!("[{host}]")
        } else {
            host
        };
        Ok(Some(Self {
            api_url: format!("https://{host}:{port}"),
            token: BearerToken::File(token_path),
            ca_pem: Some(ca_pem),
        }))
    }
}

/// What a [`PodDirectory`] lists and how often.
#[derive(Debug, Clone, PartialEq)]
pub struct DirectoryOptions {
    /// The node whose pods are listed (`spec.nodeName`).
    pub node_name: String,
    /// Pod label keys copied into [`Attribution::labels`].
    pub pod_labels: Vec<String>,
    /// Time between two lists when nothing asks for one sooner.
    pub refresh_interval: Duration,
    /// Least time between the start of two lists when unknown containers ask for one early.
    pub on_demand_gap: Duration,
    /// Limit on one list request, connection included.
    pub request_timeout: Duration,
}

impl DirectoryOptions {
    pub fn new(config: &AttributionConfig, node_name: String) -> Self {
        Self {
            node_name,
            pod_labels: config.pod_labels.clone(),
            refresh_interval: config.refresh_interval,
            on_demand_gap: Duration::from_secs(5),
            request_timeout: Duration::from_secs(10),
        }
    }
}

/// Why pods could not be listed, or why the directory could not start.
#[derive(Debug, thiserror::Error)]
pub enum PodDirectoryError {
    #[error(
        "in a Kubernetes pod (KUBERNETES_SERVICE_HOST is set) but cannot read {path}: {source}; \
         pod attribution is off: mount the service-account token \
         (automountServiceAccountToken: true) or set attribution.kubernetes = false"
    )]
    ServiceAccount {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "{path} holds no PEM certificate, so the API server cannot be verified; pod attribution \
         is off"
    )]
    NoCaCertificate { path: PathBuf },
    #[error("cannot read the service-account token {path}: {source}")]
    Token {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot list pods on node {node} from {url}: {error}")]
    Request {
        node: String,
        url: String,
        error: Box<ureq::Error>,
    },
    #[error(
        "listing pods on node {node} from {url}: the API server answered {status} ({body}){hint}"
    )]
    Status {
        node: String,
        url: String,
        status: u16,
        body: String,
        hint: &'static str,
    },
    #[error("listing pods on node {node} from {url}: the answer is not a PodList: {error}")]
    Decode {
        node: String,
        url: String,
        error: serde_json::Error,
    },
}

/// A pod as the directory keeps it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodInfo {
    pub name: String,
    pub namespace: String,
    pub uid: String,
    /// `status.qosClass`, once the kubelet has set it.
    pub qos: Option<QosClass>,
    /// The configured pod labels that this pod has, as (label key, value), in config order.
    pub labels: Vec<(String, String)>,
}

/// A container the API named, and its pod.
#[derive(Debug, Clone)]
struct KnownContainer {
    name: String,
    pod: Arc<PodInfo>,
}

/// What is known now, swapped whole after each good list.
#[derive(Debug, Default)]
struct State {
    /// By `metadata.uid`, and for static pods also by the config hash their cgroup carries.
    pods: HashMap<String, Arc<PodInfo>>,
    /// By the 64-hex container id.
    containers: HashMap<String, KnownContainer>,
    /// Set when the last list failed: its message. Cleared by the next good list.
    failing: Option<String>,
    /// Whether a list has succeeded yet.
    loaded: bool,
    /// Set after a good list that held no pod, so the node-name hint is logged once.
    warned_empty: bool,
    last_attempt: Option<Instant>,
    /// An unknown container asked for an early list.
    wanted: bool,
    /// Unknown containers that already asked for an early list.
    asked: HashSet<String>,
    shutdown: bool,
}

struct Shared {
    client: PodListClient,
    options: DirectoryOptions,
    /// (pod label key, Vigil label name), in config order.
    label_names: Vec<(String, String)>,
    created: Instant,
    state: Mutex<State>,
    wake: Condvar,
    /// Serialises lists, so a list on demand and the background one never interleave.
    listing: Mutex<()>,
}

/// How the directory stands, for the collector's status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirectoryStatus {
    /// Pods in the cache being served.
    pub pods: usize,
    /// Whether a list has succeeded yet.
    pub loaded: bool,
    /// The last list's failure, while the API cannot be reached (the cache is then older).
    pub error: Option<String>,
}

/// The pods of this node, kept fresh by a background thread (stopped when this is dropped).
pub struct PodDirectory {
    shared: Arc<Shared>,
}

impl PodDirectory {
    /// The directory for this config when the agent runs in a Kubernetes pod; `None` when
    /// `attribution.kubernetes` is off or the agent is not in a pod (one debug line), or when
    /// the pod has no usable service account (one warning saying how to fix it). The first
    /// list starts at once in the background.
    pub fn start(config: &AttributionConfig) -> Option<Self> {
        Self::start_with(
            config,
            &|name| std::env::var(name).ok(),
            Path::new(SERVICE_ACCOUNT_DIR),
            Path::new("/proc/sys/kernel/hostname"),
        )
    }

    /// [`Self::start`] with the environment, the service-account folder and the hostname file
    /// given.
    pub fn start_with(
        config: &AttributionConfig,
        env: &dyn Fn(&str) -> Option<String>,
        service_account_dir: &Path,
        hostname_file: &Path,
    ) -> Option<Self> {
        if !config.kubernetes {
            tracing::debug!("pod attribution off: attribution.kubernetes = false");
            return None;
        }
        let access = match ClusterAccess::in_cluster(env, service_account_dir) {
            Ok(Some(access)) => access,
            Ok(None) => {
                tracing::debug!(
                    "not in a Kubernetes pod (KUBERNETES_SERVICE_HOST/PORT unset): pod \
                     attribution off"
                );
                return None;
            }
            Err(error) => {
                tracing::warn!("{error}");
                return None;
            }
        };
        let Some(node_name) = config.resolve_node_name(env, hostname_file) else {
            tracing::warn!(
                "pod attribution off: no node name (set attribution.node_name, or NODE_NAME from \
                 the downward API's spec.nodeName)"
            );
            return None;
        };
        let directory = Self::connect(access, DirectoryOptions::new(config, node_name));
        directory.request_refresh();
        Some(directory)
    }

    /// A directory reading from `access`. It lists nothing until [`Self::refresh`] or
    /// [`Self::request_refresh`] is called, an unknown pod container is looked up, or
    /// `refresh_interval` has passed.
    pub fn connect(access: ClusterAccess, options: DirectoryOptions) -> Self {
        let label_names = options
            .pod_labels
            .iter()
            .map(|key| (key.clone(), prometheus_label_name(key)))
            .collect();
        let shared = Arc::new(Shared {
            client: PodListClient::new(access, &options),
            label_names,
            options,
            created: Instant::now(),
            state: Mutex::new(State::default()),
            wake: Condvar::new(),
            listing: Mutex::new(()),
        });
        let background = Arc::clone(&shared);
        let spawned = std::thread::Builder::new()
            .name("vigil-pods".into())
            .spawn(move || background.refresh_loop());
        if let Err(error) = spawned {
            tracing::warn!(
                "cannot start the pod directory's thread ({error}): pods are listed only when \
                 the agent asks (PodDirectory::refresh)"
            );
        }
        Self { shared }
    }

    /// Lists the node's pods now and waits for the answer: the number of pods on success. On
    /// failure the previous cache stays; the first failure of an outage is also logged.
    pub fn refresh(&self) -> Result<usize, PodDirectoryError> {
        self.shared.refresh()
    }

    /// Asks the background thread for a list as soon as `on_demand_gap` allows.
    pub fn request_refresh(&self) {
        let mut state = self.shared.lock();
        state.wanted = true;
        self.shared.wake.notify_all();
    }

    pub fn status(&self) -> DirectoryStatus {
        let state = self.shared.lock();
        DirectoryStatus {
            pods: pod_count(&state.pods),
            loaded: state.loaded,
            error: state.failing.clone(),
        }
    }

    /// The pod this node's API knows for `identity`'s container id, or else its pod UID.
    pub fn pod(&self, identity: &ContainerIdentity) -> Option<PodInfo> {
        let state = self.shared.lock();
        state
            .containers
            .get(&identity.container_id)
            .map(|known| known.pod.as_ref().clone())
            .or_else(|| {
                let uid = identity.pod_uid.as_ref()?;
                state.pods.get(uid).map(|pod| pod.as_ref().clone())
            })
    }

    /// Names `identity`'s container, pod and namespace from the cache. A container of a pod
    /// (its cgroup shows a pod UID) that the cache does not know asks once for an early list;
    /// until it arrives the container is named by its short id and the pod is unknown.
    pub fn attribute(&self, identity: &ContainerIdentity) -> Attribution {
        let mut state = self.shared.lock();
        let known = state.containers.get(&identity.container_id).cloned();
        let pod = match &known {
            Some(known) => Some(Arc::clone(&known.pod)),
            None => identity
                .pod_uid
                .as_ref()
                .and_then(|uid| state.pods.get(uid).cloned()),
        };
        if known.is_none() && identity.pod_uid.is_some() {
            if state.asked.len() >= MAX_REMEMBERED_UNKNOWN {
                state.asked.clear();
            }
            if state.asked.insert(identity.container_id.clone()) {
                state.wanted = true;
                self.shared.wake.notify_all();
            }
        }
        drop(state);

        let mut attribution = Attribution::from_cgroup(identity);
        if let Some(known) = known {
            attribution.container = Some(known.name);
        }
        if let Some(pod) = pod {
            attribution.pod = Some(pod.name.clone());
            attribution.namespace = Some(pod.namespace.clone());
            if let Some(qos) = pod.qos {
                attribution.qos = Some(qos.as_str());
            }
            attribution.labels = self
                .shared
                .label_names
                .iter()
                .filter_map(|(key, label)| {
                    let (_, value) = pod.labels.iter().find(|(k, _)| k == key)?;
                    Some((label.clone(), value.clone()))
                })
                .collect();
        }
        attribution
    }
}

impl Drop for PodDirectory {
    fn drop(&mut self) {
        self.shared.lock().shutdown = true;
        self.shared.wake.notify_all();
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves a consistent cache (it is swapped whole).
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn refresh_loop(&self) {
        let mut state = self.lock();
        loop {
            if state.shutdown {
                return;
            }
            let now = Instant::now();
            let periodic_at =
                state.last_attempt.unwrap_or(self.created) + self.options.refresh_interval;
            let early_at = state
                .last_attempt
                .map_or(now, |last| last + self.options.on_demand_gap);
            let next = if state.wanted {
                periodic_at.min(early_at)
            } else {
                periodic_at
            };
            if next <= now {
                state.wanted = false;
                drop(state);
                // Failures are recorded (and logged once) by `refresh`.
                let _ = self.refresh();
                state = self.lock();
                continue;
            }
            state = self
                .wake
                .wait_timeout(state, next - now)
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .0;
        }
    }

    fn refresh(&self) -> Result<usize, PodDirectoryError> {
        let _listing = self.listing.lock().unwrap_or_else(|p| p.into_inner());
        self.lock().last_attempt = Some(Instant::now());
        let result = self.client.list(&self.options.node_name);
        let mut state = self.lock();
        match result {
            Ok(list) => {
                let (pods, containers) = index_pods(list, &self.options.pod_labels);
                let count = pod_count(&pods);
                state.pods = pods;
                state.containers = containers;
                state.loaded = true;
                if state.failing.take().is_some() {
                    tracing::info!(
                        "listing pods works again: {count} pods on node {}",
                        self.options.node_name
                    );
                }
                if count == 0 && !state.warned_empty {
                    tracing::warn!(
                        "the Kubernetes API lists no pod on node {:?}; if pods run here, the node \
                         name is wrong: set attribution.node_name or NODE_NAME (downward API \
                         spec.nodeName)",
                        self.options.node_name
                    );
                }
                state.warned_empty |= count == 0;
                Ok(count)
            }
            Err(error) => {
                let message = error.to_string();
                if state.failing.is_none() {
                    tracing::warn!(
                        "{message}; pod attribution keeps the last list ({} pods) and retries \
                         every {}",
                        pod_count(&state.pods),
                        humantime::format_duration(self.options.refresh_interval)
                    );
                }
                state.failing = Some(message);
                Err(error)
            }
        }
    }
}

/// Pods in a table that also holds static pods under their config hash.
fn pod_count(pods: &HashMap<String, Arc<PodInfo>>) -> usize {
    pods.iter().filter(|(key, pod)| **key == pod.uid).count()
}

/// Builds the lookup tables from a pod list.
fn index_pods(
    list: PodList,
    pod_labels: &[String],
) -> (
    HashMap<String, Arc<PodInfo>>,
    HashMap<String, KnownContainer>,
) {
    let mut pods = HashMap::new();
    let mut containers = HashMap::new();
    for item in list.items {
        let metadata = item.metadata;
        let labels = pod_labels
            .iter()
            .filter_map(|key| Some((key.clone(), metadata.labels.get(key)?.clone())))
            .collect();
        let pod = Arc::new(PodInfo {
            name: metadata.name,
            namespace: metadata.namespace,
            uid: metadata.uid.clone(),
            qos: item
                .status
                .qos_class
                .as_deref()
                .and_then(QosClass::from_api),
            labels,
        });
        // A static pod's cgroup carries the kubelet's config hash, which the API shows only on
        // the mirror pod's annotation.
        if let Some(hash) = metadata.annotations.get("kubernetes.io/config.mirror") {
            pods.insert(hash.clone(), Arc::clone(&pod));
        }
        let statuses = [
            item.status.container_statuses,
            item.status.init_container_statuses,
            item.status.ephemeral_container_statuses,
        ];
        for status in statuses.into_iter().flatten() {
            // `containerd://<id>`, `cri-o://<id>`, `docker://<id>`; absent while creating.
            let Some((_, id)) = status
                .container_id
                .as_deref()
                .and_then(|c| c.split_once("://"))
            else {
                continue;
            };
            containers.insert(
                id.to_string(),
                KnownContainer {
                    name: status.name,
                    pod: Arc::clone(&pod),
                },
            );
        }
        pods.insert(metadata.uid, pod);
    }
    (pods, containers)
}

/// One HTTP client for the API server, reused across lists (keeps the TLS connection).
struct PodListClient {
    agent: ureq::Agent,
    api_url: String,
    token: BearerToken,
}

impl PodListClient {
    fn new(access: ClusterAccess, options: &DirectoryOptions) -> Self {
        let mut tls = ureq::tls::TlsConfig::builder();
        if let Some(pem) = &access.ca_pem {
            tls = tls.root_certs(ureq::tls::RootCerts::new_with_certs(&root_certificates(
                pem,
            )));
        }
        let agent = ureq::Agent::config_builder()
            .tls_config(tls.build())
            // In-cluster traffic goes straight to the service address, whatever HTTPS_PROXY says.
            .proxy(None)
            .http_status_as_error(false)
            .timeout_global(Some(options.request_timeout))
            .user_agent(concat!("vigil-agent/", env!("CARGO_PKG_VERSION")))
            .build()
            .into();
        Self {
            agent,
            api_url: access.api_url.trim_end_matches('/').to_string(),
            token: access.token,
        }
    }

    fn list(&self, node: &str) -> Result<PodList, PodDirectoryError> {
        let url = format!(
            "{}/api/v1/pods?fieldSelector={}",
            self.api_url,
            percent_encode(&format!("spec.nodeName={node}"))
        );
        let token = match &self.token {
            BearerToken::Fixed(token) => token.clone(),
            BearerToken::File(path) => std::fs::read_to_string(path)
                .map_err(|source| PodDirectoryError::Token {
                    path: path.clone(),
                    source,
                })?
                .trim()
                .to_string(),
        };
        let request_error = |error: ureq::Error| PodDirectoryError::Request {
            node: node.to_string(),
            url: url.clone(),
            error: Box::new(error),
        };
        let mut response = self
            .agent
            .get(&url)
            .header("Authorization", &format!("Bearer {token}"))
            .header("Accept", "application/json")
            .call()
            .map_err(request_error)?;
        let body = response
            .body_mut()
            .with_config()
            .limit(MAX_POD_LIST_BYTES)
            .read_to_vec()
            .map_err(request_error)?;
        let status = response.status().as_u16();
        if status != 200 {
            return Err(PodDirectoryError::Status {
                node: node.to_string(),
                url,
                status,
                body: body_excerpt(&body),
                hint: match status {
                    401 => ": the service-account token was refused",
                    403 => ": the agent's service account needs `list` on `pods` (ClusterRole)",
                    _ => "",
                },
            });
        }
        let list: PodList =
            serde_json::from_slice(&body).map_err(|error| PodDirectoryError::Decode {
                node: node.to_string(),
                url,
                error,
            })?;
        Ok(list)
    }
}

/// The certificates of a PEM bundle (other items, such as keys, are skipped).
fn root_certificates(pem: &[u8]) -> Vec<ureq::tls::Certificate<'static>> {
    ureq::tls::parse_pem(pem)
        .filter_map(|item| match item {
            Ok(ureq::tls::PemItem::Certificate(certificate)) => Some(certificate),
            _ => None,
        })
        .collect()
}

/// The start of an error answer, on one line, for the log.
fn body_excerpt(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(&body[..body.len().min(200)]);
    let line: String = text.split_whitespace().collect::<Vec<_>>().join(" ");
    if line.is_empty() {
        "empty body".to_string()
    } else {
        line
    }
}

/// Percent-encodes a query value (RFC 3986: all but the unreserved characters).
fn percent_encode(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for byte in value.bytes() {
        if byte.is_ascii_alphanumeric() || b"-._~".contains(&byte) {
            out.push(byte as char);
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

/// The parts of a `PodList` (`kubectl get pods -o json`) the directory reads.
#[derive(Debug, Deserialize)]
struct PodList {
    /// Required: a JSON answer without it (an error page, a proxy's reply) is not a pod list.
    items: Vec<Pod>,
}

#[derive(Debug, Deserialize)]
struct Pod {
    metadata: PodMetadata,
    #[serde(default)]
    status: PodStatus,
}

#[derive(Debug, Deserialize)]
struct PodMetadata {
    name: String,
    namespace: String,
    uid: String,
    #[serde(default)]
    labels: HashMap<String, String>,
    #[serde(default)]
    annotations: HashMap<String, String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
struct PodStatus {
    qos_class: Option<String>,
    container_statuses: Vec<ContainerStatus>,
    init_container_statuses: Vec<ContainerStatus>,
    ephemeral_container_statuses: Vec<ContainerStatus>,
}

#[derive(Debug, Deserialize)]
struct ContainerStatus {
    name: String,
    #[serde(rename = "containerID")]
    container_id: Option<String>,
}

#[cfg(test)]
mod tests;
