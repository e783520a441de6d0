//! Garbage on the gRPC port (random bytes, truncated HTTP/2 frames, a TLS port spoken to in
//! plaintext) does not take the aggregator down: a proper agent is served afterwards.

mod common;

use std::{net::SocketAddr, time::Duration};

use common::*;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Deterministic pseudo-random bytes (xorshift), so a failure can be replayed.
fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut state = seed | 1;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect()
}

/// HTTP/2 frame header: 24-bit length, type, flags, 31-bit stream id.
fn frame_header(len: u32, kind: u8, flags: u8, stream: u32) -> Vec<u8> {
    let mut header = len.to_be_bytes()[1..].to_vec();
    header.extend_from_slice(&[kind, flags]);
    header.extend_from_slice(&stream.to_be_bytes());
    header
}

/// The hostile payloads, each sent on its own connection, which is then dropped or half-read.
fn payloads() -> Vec<Vec<u8>> {
    let mut payloads = vec![
        noise(1, 10),
        noise(2, 4096),
        noise(3, 70_000),
        PREFACE[..10].to_vec(),
        // Preface, then a SETTINGS frame header without its payload.
        [PREFACE, &frame_header(18, 0x4, 0, 0)].concat(),
        // Preface, empty SETTINGS, then a HEADERS frame promising 1000 bytes and sending 5.
        [
            PREFACE,
            &frame_header(0, 0x4, 0, 0),
            &frame_header(1000, 0x1, 0x4, 1),
            b"\x82\x86\x84\x41\x8a",
        ]
        .concat(),
        // A DATA frame on a stream that was never opened, with a huge length.
        [
            PREFACE,
            &frame_header(0, 0x4, 0, 0),
            &frame_header(0xff_ffff, 0x0, 0, 3),
        ]
        .concat(),
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(),
    ];
    payloads.push([PREFACE, &noise(4, 3000)].concat());
    payloads
}

async fn hurl(addr: SocketAddr, payload: &[u8]) {
    let Ok(mut tcp) = TcpStream::connect(addr).await else {
        return;
    };
    let _ = tcp.write_all(payload).await;
    let mut sink = [0u8; 1024];
    let _ = tokio::time::timeout(Duration::from_millis(200), tcp.read(&mut sink)).await;
}

#[tokio::test]
async fn random_bytes_and_truncated_http2_frames_do_not_stop_the_plaintext_server() {
    let dir = tempfile::tempdir().unwrap();
    let aggregator = start(&plaintext_config(dir.path())).await;
    for payload in payloads() {
        hurl(aggregator.grpc_addr(), &payload).await;
    }
    let mut stream = open_plaintext(&aggregator, hello("node-a", "spool-a")).await;
    assert_eq!(stream.store(batch(1, vec![], vec![])).await, vec![]);
    assert!(aggregator.counters().connections_accepted > payloads().len() as u64);
    aggregator.shutdown().await;
}

#[tokio::test]
async fn garbage_on_the_tls_port_fails_the_handshake_and_is_audited() {
    let dir = tempfile::tempdir().unwrap();
    let pki = TestPki::new(dir.path());
    let mut config = plaintext_config(&dir.path().join("data"));
    config.tls.plaintext = false;
    config.tls.cert_file = Some(pki.server_cert());
    config.tls.key_file = Some(pki.server_key());
    config.tls.client_ca_file = Some(pki.ca_file());
    let aggregator = start(&config).await;
    for payload in payloads() {
        hurl(aggregator.grpc_addr(), &payload).await;
    }
    let channel = pki
        .channel(&aggregator, Some(pki.client_identity("node-a", true)))
        .await
        .unwrap();
    let mut stream = open(channel, hello("node-a", "spool-a"), None)
        .await
        .unwrap();
    assert_eq!(stream.store(batch(1, vec![], vec![])).await, vec![]);

    let failures = aggregator.counters().tls_handshake_failures;
    assert!(failures >= 5, "{failures} handshake failures");
    // Each failure is counted, then audited, by its handshake task.
    let audited = || {
        audit_lines(aggregator.audit_path())
            .into_iter()
            .filter(|line| line["code"] == "tls_handshake_failed")
            .count() as u64
    };
    for _ in 0..100 {
        if audited() >= failures {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(audited(), failures);
    aggregator.shutdown().await;
}
