//! TLS, client certificates and tokens: who may write as which node, and the audit log that
//! records connections and denials (never a token).

mod common;

use std::path::Path;

use common::*;
use tonic::Code;
use vigil_aggregator::{AggregatorConfig, StartError};

const AGENT_TOKEN: &str = "agent-token-for-node-a-0123456789";
const ANY_NODE_TOKEN: &str = "agent-token-for-any-node-0123456789";
const READER_TOKEN: &str = "reader-token-0123456789abcdef";

fn write_tokens(dir: &Path) -> std::path::PathBuf {
    let path = dir.join("tokens.toml");
    std::fs::write(
        &path,
        format!(
            r#"
[[tokens]]
name = "node-a-agent"
token = "{AGENT_TOKEN}"
role = "agent"
node = "node-a"

[[tokens]]
name = "fleet-agent"
token = "{ANY_NODE_TOKEN}"
role = "agent"
node = "*"

[[tokens]]
name = "grafana"
token = "{READER_TOKEN}"
role = "reader"
"#
        ),
    )
    .unwrap();
    path
}

/// TLS with the test PKI and the tokens file; mTLS when `client_ca`.
fn tls_config(dir: &Path, pki: &TestPki, client_ca: bool) -> AggregatorConfig {
    let mut config = AggregatorConfig {
        data_dir: dir.join("data"),
        ..AggregatorConfig::default()
    };
    config.grpc.listen = "127.0.0.1:0".parse().unwrap();
    config.tls.cert_file = Some(pki.server_cert());
    config.tls.key_file = Some(pki.server_key());
    if client_ca {
        config.tls.client_ca_file = Some(pki.ca_file());
    }
    config.auth.tokens_file = Some(write_tokens(dir));
    config
}

fn denials(audit: &Path, code: &str) -> Vec<serde_json::Value> {
    audit_lines(audit)
        .into_iter()
        .filter(|line| line["outcome"] == "denied" && line["code"] == code)
        .collect()
}

fn assert_no_token_in(audit: &Path) {
    let text = std::fs::read_to_string(audit).unwrap();
    for token in [AGENT_TOKEN, ANY_NODE_TOKEN, READER_TOKEN, "wrong-token"] {
        assert!(!text.contains(token), "the audit log holds a token: {text}");
    }
}

#[tokio::test]
async fn an_agent_with_tls_and_its_token_writes_as_its_node_and_is_audited() {
    let dir = tempfile::tempdir().unwrap();
    let pki = TestPki::new(dir.path());
    let aggregator = start(&tls_config(dir.path(), &pki, false)).await;
    let channel = pki.channel(&aggregator, None).await.unwrap();
    let mut stream = open(
        channel.clone(),
        hello("node-a", "spool-a"),
        Some(AGENT_TOKEN),
    )
    .await
    .unwrap();
    assert_eq!(stream.store(batch(1, vec![], vec![])).await, vec![]);
    // A fleet-wide agent token may write as any node.
    let mut stream = open(channel, hello("node-z", "spool-z"), Some(ANY_NODE_TOKEN))
        .await
        .unwrap();
    assert_eq!(stream.store(batch(1, vec![], vec![])).await, vec![]);

    let audit = audit_lines(aggregator.audit_path());
    let accepted: Vec<_> = audit
        .iter()
        .filter(|line| line["event"] == "stream" && line["outcome"] == "accepted")
        .collect();
    assert_eq!(accepted.len(), 2, "{audit:#?}");
    assert_eq!(accepted[0]["who"], "token:node-a-agent (agent)");
    assert_eq!(accepted[0]["node"], "node-a");
    assert!(
        accepted[0]["peer"]
            .as_str()
            .unwrap()
            .starts_with("127.0.0.1:")
    );
    assert!(accepted[0]["time"].as_str().unwrap().ends_with('Z'));
    assert!(
        audit
            .iter()
            .any(|line| line["event"] == "connection" && line["detail"] == "tls"),
        "{audit:#?}"
    );
    assert_no_token_in(aggregator.audit_path());
    aggregator.shutdown().await;
}

#[tokio::test]
async fn a_wrong_or_missing_token_is_unauthenticated_and_audited() {
    let dir = tempfile::tempdir().unwrap();
    let pki = TestPki::new(dir.path());
    let aggregator = start(&tls_config(dir.path(), &pki, false)).await;
    let channel = pki.channel(&aggregator, None).await.unwrap();
    for token in [Some("wrong-token-0123456789abcdef"), None] {
        let status = open(channel.clone(), hello("node-a", "spool-a"), token)
            .await
            .err()
            .expect("refused");
        assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
    }
    let status = open(channel, hello("node-a", "spool-a"), Some(READER_TOKEN))
        .await
        .err()
        .expect("a reader token cannot ingest");
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");

    let unauthenticated = denials(aggregator.audit_path(), "unauthenticated");
    assert_eq!(unauthenticated.len(), 2);
    assert!(
        unauthenticated[0]["peer"]
            .as_str()
            .unwrap()
            .starts_with("127.0.0.1:")
    );
    let denied = denials(aggregator.audit_path(), "permission_denied");
    assert_eq!(denied[0]["who"], "token:grafana (reader)");
    assert_no_token_in(aggregator.audit_path());
    let counters = aggregator.counters();
    assert_eq!(
        (
            counters.streams_unauthenticated,
            counters.streams_permission_denied
        ),
        (2, 1)
    );
    assert!(aggregator.store().series().is_empty());
    aggregator.shutdown().await;
}

#[tokio::test]
async fn writing_as_another_node_is_permission_denied_and_audited() {
    let dir = tempfile::tempdir().unwrap();
    let pki = TestPki::new(dir.path());
    let aggregator = start(&tls_config(dir.path(), &pki, true)).await;

    // The token is node-a's and so is the certificate; the Hello claims node-b.
    let channel = pki
        .channel(&aggregator, Some(pki.client_identity("node-a", true)))
        .await
        .unwrap();
    let status = open(
        channel.clone(),
        hello("node-b", "spool-b"),
        Some(AGENT_TOKEN),
    )
    .await
    .err()
    .expect("refused");
    assert_eq!(status.code(), Code::PermissionDenied);
    assert!(status.message().contains("its own node"), "{status:?}");

    // A fleet token does not lift the certificate's binding.
    let status = open(
        channel.clone(),
        hello("node-b", "spool-b"),
        Some(ANY_NODE_TOKEN),
    )
    .await
    .err()
    .expect("refused");
    assert_eq!(status.code(), Code::PermissionDenied);
    assert!(
        status.message().contains("client certificate"),
        "{status:?}"
    );

    // Its own node works, with both.
    let mut stream = open(channel, hello("node-a", "spool-a"), Some(AGENT_TOKEN))
        .await
        .unwrap();
    assert_eq!(stream.store(batch(1, vec![], vec![])).await, vec![]);

    let denied = denials(aggregator.audit_path(), "permission_denied");
    assert_eq!(denied.len(), 2);
    assert_eq!(denied[0]["node"], "node-b");
    assert_eq!(denied[0]["who"], "token:node-a-agent (agent) cert:node-a");
    assert_no_token_in(aggregator.audit_path());
    aggregator.shutdown().await;
}

#[tokio::test]
async fn an_untrusted_or_missing_client_certificate_is_refused_at_the_handshake_and_audited() {
    let dir = tempfile::tempdir().unwrap();
    let pki = TestPki::new(dir.path());
    let aggregator = start(&tls_config(dir.path(), &pki, true)).await;
    for identity in [Some(pki.client_identity("node-a", false)), None] {
        // rustls may report the refusal at connect or at the first request.
        if let Ok(channel) = pki.channel(&aggregator, identity).await {
            let status = open(channel, hello("node-a", "spool-a"), Some(AGENT_TOKEN))
                .await
                .err()
                .expect("refused");
            // The TLS alert, as a transport error.
            assert!(format!("{status:?}").contains("alert"), "{status:?}");
        }
    }
    // The handshake task writes the audit line just after the client sees the alert.
    let mut handshakes = Vec::new();
    for _ in 0..100 {
        handshakes = denials(aggregator.audit_path(), "tls_handshake_failed");
        if handshakes.len() >= 2 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert!(handshakes.len() >= 2, "{handshakes:#?}");
    assert!(
        handshakes[0]["peer"]
            .as_str()
            .unwrap()
            .starts_with("127.0.0.1:")
    );
    assert!(aggregator.counters().tls_handshake_failures >= 2);
    assert!(aggregator.store().series().is_empty());
    aggregator.shutdown().await;
}

#[tokio::test]
async fn plaintext_or_no_authentication_is_refused_off_loopback_unless_forced() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = plaintext_config(dir.path());
    config.grpc.listen = "0.0.0.0:0".parse().unwrap();
    let error = vigil_aggregator::start(&config)
        .await
        .err()
        .expect("refused");
    assert!(matches!(error, StartError::Insecure(_)), "{error}");
    assert!(
        error.to_string().contains("allow_insecure_non_loopback"),
        "{error}"
    );

    let pki = TestPki::new(dir.path());
    let mut config = tls_config(dir.path(), &pki, false);
    config.grpc.listen = "0.0.0.0:0".parse().unwrap();
    config.auth.tokens_file = None;
    let error = vigil_aggregator::start(&config)
        .await
        .err()
        .expect("refused");
    assert!(error.to_string().contains("no authentication"), "{error}");

    // Neither TLS nor an explicit choice of plaintext.
    let mut config = plaintext_config(dir.path());
    config.tls.plaintext = false;
    let error = vigil_aggregator::start(&config)
        .await
        .err()
        .expect("refused");
    assert!(
        error.to_string().contains("tls.plaintext = true"),
        "{error}"
    );
}
