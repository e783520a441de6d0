//! The pod directory against a stand-in API server on 127.0.0.1 serving real PodList JSON.

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::TcpListener,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use super::*;
use crate::attribution::{ContainerRuntime, cgroup::parse_cgroup_path};
use crate::sample::Labels;

/// What `GET /api/v1/pods?fieldSelector=spec.nodeName=gpu-node-7` answers on a node running a
/// vLLM pod (Burstable; init container, server and sidecar) and a Triton pod (Guaranteed).
const PODS_ON_GPU_NODE_7: &str = include_str!("pods-on-gpu-node-7.json");
const NO_PODS: &str =
    r#"{"kind":"PodList","apiVersion":"v1","metadata":{"resourceVersion":"48213377"},"items":[]}"#;

const VLLM_POD_UID: &str = "8d6d3a5e-9c1b-4a8e-b3a4-2f7c1e0d9b61";
const VLLM_CONTAINER: &str = "ec8207a3dde607f7867f8f5390915018488b877761306ffd4ef099f9b3ee16a1";
const SIDECAR_CONTAINER: &str = "6c8b4535ccc87f19061c4646189e33d78f01c8b63dc4e3cb2f630b1796ee93b6";
const INIT_CONTAINER: &str = "bb54068aea85faa7e487530083366be9962390af822e4c71ef1aca7033c83e66";
const TRITON_POD_UID: &str = "c0ffee00-1234-4abc-8def-0123456789ab";
const TRITON_CONTAINER: &str = "b7933ed6180d9e2895a9d2df885e2a8b92e998a3c16297581f5b8698daacf492";
/// A container id no pod lists (a container started since the last list).
const NEW_CONTAINER: &str = "0a94bbda170c96a38390e676bacc3068ea31935a8658b3b48b5b04b49b1e93eb";

/// A stand-in for the API server: answers every request with the current canned answer and
/// records each request's head (request line and headers).
struct FakeApiServer {
    url: String,
    shared: Arc<Mutex<FakeState>>,
}

/// Reads one request head and writes the canned answer; a failed TLS handshake reads nothing.
fn answer_one(mut stream: impl Read + Write, server: &Mutex<FakeState>) {
    let mut head = Vec::new();
    let mut reader = BufReader::new(&mut stream);
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
            break;
        }
        head.push(line.trim_end().to_string());
    }
    if head.is_empty() {
        return;
    }
    let (status, body) = {
        let mut state = server.lock().unwrap();
        state.requests.push(head);
        (state.status, state.body.clone())
    };
    let _ = write!(
        stream,
        "HTTP/1.1 {status} Canned\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = stream.flush();
}

struct FakeState {
    status: u16,
    body: String,
    requests: Vec<Vec<String>>,
}

impl FakeApiServer {
    /// A plain-HTTP server.
    fn start(status: u16, body: &str) -> Self {
        Self::serve(status, body, None)
    }

    /// An HTTPS server presenting `test-pki/apiserver.crt` (signed by `test-pki/ca.crt`).
    fn start_tls(status: u16, body: &str) -> Self {
        use rustls::pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};
        let certificate = CertificateDer::from_pem_slice(APISERVER_CERT.as_bytes()).unwrap();
        let key = PrivateKeyDer::from_pem_slice(APISERVER_KEY.as_bytes()).unwrap();
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![certificate], key)
        .unwrap();
        Self::serve(status, body, Some(Arc::new(config)))
    }

    fn serve(status: u16, body: &str, tls: Option<Arc<rustls::ServerConfig>>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let address = listener.local_addr().unwrap();
        let scheme = if tls.is_some() { "https" } else { "http" };
        let shared = Arc::new(Mutex::new(FakeState {
            status,
            body: body.to_string(),
            requests: Vec::new(),
        }));
        let server = Arc::clone(&shared);
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { continue };
                match &tls {
                    None => answer_one(stream, &server),
                    Some(config) => {
                        let connection = rustls::ServerConnection::new(Arc::clone(config)).unwrap();
                        answer_one(rustls::StreamOwned::new(connection, stream), &server);
                    }
                }
            }
        });
        Self {
            url: format!("{scheme}://{address}"),
            shared,
        }
    }

    fn answer(&self, status: u16, body: &str) {
        let mut state = self.shared.lock().unwrap();
        state.status = status;
        state.body = body.to_string();
    }

    fn requests(&self) -> Vec<Vec<String>> {
        self.shared.lock().unwrap().requests.clone()
    }

    fn access(&self) -> ClusterAccess {
        ClusterAccess {
            api_url: self.url.clone(),
            token: BearerToken::Fixed("test-token".into()),
            ca_pem: None,
        }
    }
}

fn options() -> DirectoryOptions {
    DirectoryOptions {
        node_name: "gpu-node-7".into(),
        pod_labels: vec!["app.kubernetes.io/name".into(), "team".into()],
        // Nothing lists in the background unless a test asks for it.
        refresh_interval: Duration::from_secs(3600),
        on_demand_gap: Duration::ZERO,
        request_timeout: Duration::from_secs(5),
    }
}

fn identity(container_id: &str, pod_uid: Option<&str>) -> ContainerIdentity {
    ContainerIdentity {
        runtime: ContainerRuntime::Containerd,
        container_id: container_id.into(),
        pod_uid: pod_uid.map(str::to_string),
        qos: Some(QosClass::Burstable),
    }
}

/// Polls `done` for up to 5 s.
fn eventually(mut done: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        if done() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

/// Log lines at WARN and above written while `f` runs on this thread.
fn warnings_during<T>(f: impl FnOnce() -> T) -> (T, Vec<String>) {
    #[derive(Clone, Default)]
    struct Capture(Arc<Mutex<Vec<u8>>>);
    impl Write for Capture {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let capture = Capture::default();
    let writer = capture.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::WARN)
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .finish();
    let result = tracing::subscriber::with_default(subscriber, f);
    let text = String::from_utf8(capture.0.lock().unwrap().clone()).unwrap();
    (result, text.lines().map(str::to_string).collect())
}

#[test]
fn lists_the_pods_of_its_node_with_a_field_selector_and_the_bearer_token() {
    let server = FakeApiServer::start(200, PODS_ON_GPU_NODE_7);
    let directory = PodDirectory::connect(server.access(), options());
    assert_eq!(directory.refresh().unwrap(), 2);
    let requests = server.requests();
    assert_eq!(requests.len(), 1);
    assert_eq!(
        requests[0][0],
        "GET /api/v1/pods?fieldSelector=spec.nodeName%3Dgpu-node-7 HTTP/1.1"
    );
    let authorization: Vec<&String> = requests[0]
        .iter()
        .filter(|h| h.to_ascii_lowercase().starts_with("authorization:"))
        .collect();
    assert_eq!(authorization.len(), 1, "{:?}", requests[0]);
    assert_eq!(authorization[0][14..].trim(), "Bearer test-token");
    assert_eq!(
        directory.status(),
        DirectoryStatus {
            pods: 2,
            loaded: true,
            error: None
        }
    );
}

#[test]
fn containers_get_their_name_pod_namespace_qos_and_configured_labels() {
    let server = FakeApiServer::start(200, PODS_ON_GPU_NODE_7);
    let directory = PodDirectory::connect(server.access(), options());
    directory.refresh().unwrap();

    let vllm_labels = vec![
        (
            "label_app_kubernetes_io_name".to_string(),
            "vllm".to_string(),
        ),
        ("label_team".to_string(), "search-ranking".to_string()),
    ];
    let vllm_pod = |container: &str| Attribution {
        container: Some(container.into()),
        pod: Some("vllm-llama-8b-5d9f8c7b6-x2kqz".into()),
        namespace: Some("inference".into()),
        qos: Some("Burstable"),
        labels: vllm_labels.clone(),
    };
    assert_eq!(
        directory.attribute(&identity(VLLM_CONTAINER, Some(VLLM_POD_UID))),
        vllm_pod("vllm")
    );
    assert_eq!(
        directory.attribute(&identity(SIDECAR_CONTAINER, Some(VLLM_POD_UID))),
        vllm_pod("metrics-sidecar")
    );
    assert_eq!(
        directory.attribute(&identity(INIT_CONTAINER, Some(VLLM_POD_UID))),
        vllm_pod("model-download")
    );
    // The cgroup said Burstable; the API's Guaranteed wins. The pod has no `team` label.
    assert_eq!(
        directory.attribute(&identity(TRITON_CONTAINER, Some(TRITON_POD_UID))),
        Attribution {
            container: Some("triton".into()),
            pod: Some("triton-ranker-0".into()),
            namespace: Some("search".into()),
            qos: Some("Guaranteed"),
            labels: vec![("label_app_kubernetes_io_name".into(), "triton".into())],
        }
    );
}

#[test]
fn a_container_identity_from_a_real_cgroup_path_is_attributed() {
    let server = FakeApiServer::start(200, PODS_ON_GPU_NODE_7);
    let directory = PodDirectory::connect(server.access(), options());
    directory.refresh().unwrap();
    let identity = parse_cgroup_path(&format!(
        "/kubepods.slice/kubepods-pod{}.slice/cri-containerd-{TRITON_CONTAINER}.scope",
        TRITON_POD_UID.replace('-', "_")
    ))
    .unwrap();
    let mut labels = Labels::from([("pid".to_string(), "4242".to_string())]);
    directory.attribute(&identity).append_labels(&mut labels);
    assert_eq!(
        labels,
        Labels::from([
            ("pid".to_string(), "4242".to_string()),
            ("container".to_string(), "triton".to_string()),
            ("pod".to_string(), "triton-ranker-0".to_string()),
            ("namespace".to_string(), "search".to_string()),
            (
                "label_app_kubernetes_io_name".to_string(),
                "triton".to_string()
            ),
        ])
    );
}

#[test]
fn a_container_the_list_does_not_name_yet_is_placed_in_its_pod_by_uid() {
    let server = FakeApiServer::start(200, PODS_ON_GPU_NODE_7);
    let directory = PodDirectory::connect(server.access(), options());
    directory.refresh().unwrap();
    let attribution = directory.attribute(&identity(NEW_CONTAINER, Some(TRITON_POD_UID)));
    assert_eq!(attribution.container.as_deref(), Some("0a94bbda170c"));
    assert_eq!(attribution.pod.as_deref(), Some("triton-ranker-0"));
    assert_eq!(attribution.namespace.as_deref(), Some("search"));
}

#[test]
fn a_container_in_an_unknown_pod_triggers_an_early_list_without_waiting_for_it() {
    let server = FakeApiServer::start(200, NO_PODS);
    let directory = PodDirectory::connect(server.access(), options());
    assert_eq!(directory.refresh().unwrap(), 0);
    server.answer(200, PODS_ON_GPU_NODE_7);

    let vllm = identity(VLLM_CONTAINER, Some(VLLM_POD_UID));
    let first = directory.attribute(&vllm);
    assert_eq!(first.container.as_deref(), Some("ec8207a3dde6"));
    assert_eq!(first.pod, None);
    assert!(
        eventually(|| directory.attribute(&vllm).pod.is_some()),
        "no early list: {:?}",
        server.requests()
    );
    assert_eq!(
        directory.attribute(&vllm).container.as_deref(),
        Some("vllm")
    );
    assert_eq!(server.requests().len(), 2);
}

#[test]
fn an_unknown_container_asks_for_one_early_list_only() {
    let server = FakeApiServer::start(200, NO_PODS);
    let directory = PodDirectory::connect(server.access(), options());
    directory.refresh().unwrap();
    let unknown = identity(NEW_CONTAINER, Some(VLLM_POD_UID));
    directory.attribute(&unknown);
    assert!(eventually(|| server.requests().len() == 2));
    for _ in 0..5 {
        directory.attribute(&unknown);
    }
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(server.requests().len(), 2);
}

#[test]
fn early_lists_wait_for_the_on_demand_gap() {
    let server = FakeApiServer::start(200, NO_PODS);
    let directory = PodDirectory::connect(
        server.access(),
        DirectoryOptions {
            on_demand_gap: Duration::from_secs(3600),
            ..options()
        },
    );
    directory.refresh().unwrap();
    directory.attribute(&identity(VLLM_CONTAINER, Some(VLLM_POD_UID)));
    directory.attribute(&identity(TRITON_CONTAINER, Some(TRITON_POD_UID)));
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(server.requests().len(), 1);
}

#[test]
fn containers_outside_pods_do_not_trigger_lists() {
    let server = FakeApiServer::start(200, NO_PODS);
    let directory = PodDirectory::connect(server.access(), options());
    directory.refresh().unwrap();
    let docker = ContainerIdentity {
        runtime: ContainerRuntime::Docker,
        container_id: NEW_CONTAINER.into(),
        pod_uid: None,
        qos: None,
    };
    assert_eq!(
        directory.attribute(&docker),
        Attribution {
            container: Some("0a94bbda170c".into()),
            ..Attribution::default()
        }
    );
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(server.requests().len(), 1);
}

#[test]
fn the_background_thread_lists_every_refresh_interval() {
    let server = FakeApiServer::start(200, PODS_ON_GPU_NODE_7);
    let directory = PodDirectory::connect(
        server.access(),
        DirectoryOptions {
            refresh_interval: Duration::from_millis(100),
            ..options()
        },
    );
    assert!(eventually(|| server.requests().len() >= 3));
    assert_eq!(directory.status().pods, 2);
}

#[test]
fn a_failing_api_keeps_the_last_pods_and_reports_each_outage_once() {
    let server = FakeApiServer::start(200, PODS_ON_GPU_NODE_7);
    let directory = PodDirectory::connect(server.access(), options());
    let vllm = identity(VLLM_CONTAINER, Some(VLLM_POD_UID));
    directory.refresh().unwrap();

    let (errors, warnings) = warnings_during(|| {
        server.answer(
            500,
            r#"{"kind":"Status","message":"etcdserver: request timed out"}"#,
        );
        let mut errors = vec![
            directory.refresh().unwrap_err(),
            directory.refresh().unwrap_err(),
        ];
        server.answer(200, "<html><body>502 Bad Gateway</body></html>");
        errors.push(directory.refresh().unwrap_err());
        server.answer(200, r#"{"kind":"Status","status":"Failure"}"#);
        errors.push(directory.refresh().unwrap_err());
        errors
    });
    assert!(
        matches!(errors[0], PodDirectoryError::Status { status: 500, .. }),
        "{:?}",
        errors[0]
    );
    assert!(
        matches!(errors[2], PodDirectoryError::Decode { .. }),
        "{:?}",
        errors[2]
    );
    assert!(
        matches!(errors[3], PodDirectoryError::Decode { .. }),
        "{:?}",
        errors[3]
    );
    assert_eq!(warnings.len(), 1, "{warnings:?}");
    assert!(
        warnings[0].contains(
            "answered 500 ({\"kind\":\"Status\",\"message\":\"etcdserver: request timed out\"})"
        ),
        "{warnings:?}"
    );
    assert!(
        warnings[0].contains("keeps the last list (2 pods)"),
        "{warnings:?}"
    );
    assert_eq!(
        directory.attribute(&vllm).container.as_deref(),
        Some("vllm")
    );
    let status = directory.status();
    assert_eq!(status.pods, 2);
    assert!(status.error.unwrap().contains("not a PodList"));

    // Recovery clears the error; the next outage is reported again.
    let (_, warnings) = warnings_during(|| {
        server.answer(200, PODS_ON_GPU_NODE_7);
        directory.refresh().unwrap();
        assert_eq!(directory.status().error, None);
        server.answer(500, "");
        directory.refresh().unwrap_err();
    });
    assert_eq!(warnings.len(), 1, "{warnings:?}");
    assert!(
        warnings[0].contains("answered 500 (empty body)"),
        "{warnings:?}"
    );
}

#[test]
fn an_unreachable_api_is_an_error_naming_the_url() {
    // Bind and drop a listener, so the port is (almost certainly) closed.
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let directory = PodDirectory::connect(
        ClusterAccess {
            api_url: format!("http://127.0.0.1:{port}"),
            token: BearerToken::Fixed("t".into()),
            ca_pem: None,
        },
        options(),
    );
    let error = directory.refresh().unwrap_err().to_string();
    assert!(
        error.starts_with(&format!(
            "cannot list pods on node gpu-node-7 from http://127.0.0.1:{port}/api/v1/pods?"
        )),
        "{error}"
    );
    assert!(!directory.status().loaded);
}

#[test]
fn a_forbidden_answer_says_which_permission_is_missing() {
    let server = FakeApiServer::start(403, r#"{"kind":"Status","reason":"Forbidden"}"#);
    let directory = PodDirectory::connect(server.access(), options());
    let error = directory.refresh().unwrap_err().to_string();
    assert!(
        error.ends_with("needs `list` on `pods` (ClusterRole)"),
        "{error}"
    );
}

#[test]
fn the_token_file_is_read_again_for_every_list() {
    let server = FakeApiServer::start(200, NO_PODS);
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("token");
    std::fs::write(&token, "first-token\n").unwrap();
    let directory = PodDirectory::connect(
        ClusterAccess {
            token: BearerToken::File(token.clone()),
            ..server.access()
        },
        options(),
    );
    directory.refresh().unwrap();
    std::fs::write(&token, "rotated-token\n").unwrap();
    directory.refresh().unwrap();
    let bearer: Vec<String> = server
        .requests()
        .iter()
        .map(|head| {
            head.iter()
                .find_map(|h| h.strip_prefix("authorization: "))
                .unwrap_or_else(|| panic!("no authorization header in {head:?}"))
                .to_string()
        })
        .collect();
    assert_eq!(bearer, ["Bearer first-token", "Bearer rotated-token"]);
}

#[test]
fn a_static_pod_is_found_by_the_config_hash_in_its_cgroup() {
    let mirror = r#"{"kind":"PodList","apiVersion":"v1","metadata":{},"items":[{
        "metadata":{"name":"llm-gateway-gpu-node-7","namespace":"kube-system",
          "uid":"5e6f7a8b-9c0d-4e1f-a2b3-c4d5e6f7a8b9",
          "annotations":{"kubernetes.io/config.hash":"6f3c0e3b2a1d4c5e8f9a0b1c2d3e4f5a",
            "kubernetes.io/config.mirror":"6f3c0e3b2a1d4c5e8f9a0b1c2d3e4f5a",
            "kubernetes.io/config.source":"file"}},
        "status":{"qosClass":"BestEffort"}}]}"#;
    let server = FakeApiServer::start(200, mirror);
    let directory = PodDirectory::connect(server.access(), options());
    assert_eq!(directory.refresh().unwrap(), 1);
    let attribution = directory.attribute(&identity(
        NEW_CONTAINER,
        Some("6f3c0e3b2a1d4c5e8f9a0b1c2d3e4f5a"),
    ));
    assert_eq!(attribution.pod.as_deref(), Some("llm-gateway-gpu-node-7"));
    assert_eq!(attribution.qos, Some("BestEffort"));
}

/// A CA as a service account's `ca.crt` holds one, the API server certificate it signed (for
/// IP 127.0.0.1) with its key, and an unrelated CA; see `test-pki/README.md`.
const CA_PEM: &str = include_str!("test-pki/ca.crt");
const APISERVER_CERT: &str = include_str!("test-pki/apiserver.crt");
const APISERVER_KEY: &str = include_str!("test-pki/apiserver.key");
const OTHER_CA_PEM: &str = include_str!("test-pki/other-ca.crt");

fn service_account_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("token"), "eyJhbGciOiJSUzI1NiJ9.e30.c2ln\n").unwrap();
    std::fs::write(dir.path().join("ca.crt"), CA_PEM).unwrap();
    std::fs::write(dir.path().join("namespace"), "vigil\n").unwrap();
    dir
}

fn pod_env(name: &str) -> Option<String> {
    match name {
        "KUBERNETES_SERVICE_HOST" => Some("10.96.0.1".into()),
        "KUBERNETES_SERVICE_PORT" => Some("443".into()),
        "NODE_NAME" => Some("gpu-node-7".into()),
        _ => None,
    }
}

#[test]
fn in_a_pod_the_api_is_reached_at_the_service_address_with_the_mounted_token() {
    let dir = service_account_dir();
    let access = ClusterAccess::in_cluster(&pod_env, dir.path())
        .unwrap()
        .unwrap();
    assert_eq!(access.api_url, "https://10.96.0.1:443");
    assert!(matches!(&access.token, BearerToken::File(path) if *path == dir.path().join("token")));
    assert_eq!(access.ca_pem.as_deref(), Some(CA_PEM.as_bytes()));

    let ipv6 = |name: &str| match name {
        "KUBERNETES_SERVICE_HOST" => Some("fd00:10:96::1".to_string()),
        other => pod_env(other),
    };
    let access = ClusterAccess::in_cluster(&ipv6, dir.path())
        .unwrap()
        .unwrap();
    assert_eq!(access.api_url, "https://[fd00:10:96::1]:443");
}

#[test]
fn outside_a_cluster_the_directory_is_off_without_an_error() {
    let dir = service_account_dir();
    let no_env = |_: &str| None;
    assert!(
        ClusterAccess::in_cluster(&no_env, dir.path())
            .unwrap()
            .is_none()
    );
    let config = AttributionConfig::default();
    let (directory, warnings) = warnings_during(|| {
        PodDirectory::start_with(&config, &no_env, dir.path(), Path::new("/nonexistent"))
    });
    assert!(directory.is_none());
    assert_eq!(warnings, Vec::<String>::new());
}

#[test]
fn turned_off_in_the_config_the_directory_does_not_start_even_in_a_pod() {
    let dir = service_account_dir();
    let config = AttributionConfig {
        kubernetes: false,
        ..AttributionConfig::default()
    };
    assert!(
        PodDirectory::start_with(&config, &pod_env, dir.path(), Path::new("/nonexistent"))
            .is_none()
    );
}

#[test]
fn a_pod_without_a_service_account_token_warns_once_and_stays_off() {
    let dir = tempfile::tempdir().unwrap();
    let error = ClusterAccess::in_cluster(&pod_env, dir.path()).unwrap_err();
    assert!(
        matches!(&error, PodDirectoryError::ServiceAccount { path, .. } if *path == dir.path().join("token"))
    );
    let (directory, warnings) = warnings_during(|| {
        PodDirectory::start_with(
            &AttributionConfig::default(),
            &pod_env,
            dir.path(),
            Path::new("/nonexistent"),
        )
    });
    assert!(directory.is_none());
    assert_eq!(warnings.len(), 1, "{warnings:?}");
    assert!(
        warnings[0].contains("automountServiceAccountToken: true"),
        "{warnings:?}"
    );
}

#[test]
fn a_ca_file_without_a_certificate_is_refused() {
    let dir = service_account_dir();
    std::fs::write(dir.path().join("ca.crt"), "not a certificate\n").unwrap();
    let error = ClusterAccess::in_cluster(&pod_env, dir.path()).unwrap_err();
    assert!(
        matches!(&error, PodDirectoryError::NoCaCertificate { path } if *path == dir.path().join("ca.crt"))
    );
}

#[test]
fn started_in_a_pod_the_directory_lists_at_once_over_https_verified_by_the_service_account_ca() {
    let server = FakeApiServer::start_tls(200, PODS_ON_GPU_NODE_7);
    let port = server.url.rsplit(':').next().unwrap().to_string();
    let env = |name: &str| match name {
        "KUBERNETES_SERVICE_HOST" => Some("127.0.0.1".to_string()),
        "KUBERNETES_SERVICE_PORT" => Some(port.clone()),
        other => pod_env(other),
    };
    let dir = service_account_dir();
    let directory = PodDirectory::start_with(
        &AttributionConfig::default(),
        &env,
        dir.path(),
        Path::new("/nonexistent"),
    )
    .expect("in a pod with a service account");
    assert!(
        eventually(|| directory.status().loaded),
        "{:?}",
        directory.status()
    );
    assert_eq!(directory.status().pods, 2);
    let requests = server.requests();
    assert_eq!(
        requests[0][0],
        "GET /api/v1/pods?fieldSelector=spec.nodeName%3Dgpu-node-7 HTTP/1.1"
    );
    assert!(
        requests[0].contains(&"authorization: Bearer eyJhbGciOiJSUzI1NiJ9.e30.c2ln".to_string()),
        "{:?}",
        requests[0]
    );
}

#[test]
fn an_api_server_certificate_from_another_ca_is_refused() {
    let server = FakeApiServer::start_tls(200, PODS_ON_GPU_NODE_7);
    let directory = PodDirectory::connect(
        ClusterAccess {
            ca_pem: Some(OTHER_CA_PEM.as_bytes().to_vec()),
            ..server.access()
        },
        options(),
    );
    let error = directory.refresh().unwrap_err();
    assert!(
        matches!(error, PodDirectoryError::Request { .. }),
        "{error:?}"
    );
    assert_eq!(server.requests().len(), 0);

    let trusting = PodDirectory::connect(
        ClusterAccess {
            ca_pem: Some(CA_PEM.as_bytes().to_vec()),
            ..server.access()
        },
        options(),
    );
    assert_eq!(trusting.refresh().unwrap(), 2);
}
