//! Accepting connections: TCP, then (unless plaintext) the TLS handshake, each recorded in the
//! audit log. Handshakes run in their own tasks with a deadline, so a slow or hostile client
//! holds up nobody else. The connections go to tonic with a [`ConnectionInfo`] that the
//! ingest service reads from each request's extensions.

use std::{
    io,
    net::SocketAddr,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{TcpListener, TcpStream},
    sync::{mpsc, watch},
};
use tokio_rustls::{TlsAcceptor, server::TlsStream};
use tonic::transport::server::Connected;

use super::{
    audit::{AuditEntry, AuditLog},
    tls::certificate_names,
};
use crate::ingest::counters::IngestCounters;

/// Longest a TLS handshake may take.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// What the ingest service knows about a request's connection.
#[derive(Debug, Clone)]
pub struct ConnectionInfo {
    pub peer: SocketAddr,
    pub tls: bool,
    /// The names of a verified client certificate (mTLS); `None` without one.
    pub certificate_names: Option<Vec<String>>,
}

enum Transport {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

/// An accepted connection, ready for HTTP/2.
pub struct Connection {
    transport: Transport,
    info: ConnectionInfo,
}

impl Connected for Connection {
    type ConnectInfo = ConnectionInfo;

    fn connect_info(&self) -> ConnectionInfo {
        self.info.clone()
    }
}

impl AsyncRead for Connection {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match &mut self.get_mut().transport {
            Transport::Plain(tcp) => Pin::new(tcp).poll_read(cx, buf),
            Transport::Tls(tls) => Pin::new(tls.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Connection {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match &mut self.get_mut().transport {
            Transport::Plain(tcp) => Pin::new(tcp).poll_write(cx, buf),
            Transport::Tls(tls) => Pin::new(tls.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().transport {
            Transport::Plain(tcp) => Pin::new(tcp).poll_flush(cx),
            Transport::Tls(tls) => Pin::new(tls.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().transport {
            Transport::Plain(tcp) => Pin::new(tcp).poll_shutdown(cx),
            Transport::Tls(tls) => Pin::new(tls.as_mut()).poll_shutdown(cx),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match &mut self.get_mut().transport {
            Transport::Plain(tcp) => Pin::new(tcp).poll_write_vectored(cx, bufs),
            Transport::Tls(tls) => Pin::new(tls.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match &self.transport {
            Transport::Plain(tcp) => tcp.is_write_vectored(),
            Transport::Tls(tls) => tls.is_write_vectored(),
        }
    }
}

/// Accepts connections until `shutdown` turns true or tonic stops taking them.
pub(crate) async fn accept_loop(
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    connections: mpsc::Sender<io::Result<Connection>>,
    audit: Arc<AuditLog>,
    counters: Arc<IngestCounters>,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        let accepted = tokio::select! {
            _ = crate::ingest::stopped(&mut shutdown) => return,
            _ = connections.closed() => return,
            accepted = listener.accept() => accepted,
        };
        let (tcp, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(error) => {
                // Out of file descriptors and the like: wait rather than spin.
                tracing::warn!("accepting a gRPC connection failed: {error}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        IngestCounters::add(&counters.connections_accepted, 1);
        let _ = tcp.set_nodelay(true);
        let Some(acceptor) = tls.clone() else {
            audit.record(AuditEntry {
                event: "connection",
                outcome: "accepted",
                peer: Some(peer),
                detail: Some("plaintext".into()),
                ..AuditEntry::default()
            });
            let info = ConnectionInfo {
                peer,
                tls: false,
                certificate_names: None,
            };
            let connection = Connection {
                transport: Transport::Plain(tcp),
                info,
            };
            if connections.send(Ok(connection)).await.is_err() {
                return;
            }
            continue;
        };
        let (connections, audit, counters) = (connections.clone(), audit.clone(), counters.clone());
        tokio::spawn(async move {
            let handshake = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await;
            let tls = match handshake {
                Ok(Ok(tls)) => tls,
                Ok(Err(error)) => {
                    return handshake_failed(&audit, &counters, peer, error.to_string());
                }
                Err(_) => {
                    return handshake_failed(
                        &audit,
                        &counters,
                        peer,
                        format!("no TLS handshake within {HANDSHAKE_TIMEOUT:?}"),
                    );
                }
            };
            let certificate_names = tls
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|chain| chain.first())
                .map(certificate_names);
            audit.record(AuditEntry {
                event: "connection",
                outcome: "accepted",
                peer: Some(peer),
                who: certificate_names
                    .as_ref()
                    .map(|names| format!("cert:{}", names.join(","))),
                detail: Some("tls".into()),
                ..AuditEntry::default()
            });
            let connection = Connection {
                transport: Transport::Tls(Box::new(tls)),
                info: ConnectionInfo {
                    peer,
                    tls: true,
                    certificate_names,
                },
            };
            let _ = connections.send(Ok(connection)).await;
        });
    }
}

fn handshake_failed(audit: &AuditLog, counters: &IngestCounters, peer: SocketAddr, why: String) {
    IngestCounters::add(&counters.tls_handshake_failures, 1);
    tracing::info!("TLS handshake with {peer} failed: {why}");
    audit.record(AuditEntry {
        event: "connection",
        outcome: "denied",
        peer: Some(peer),
        code: Some("tls_handshake_failed"),
        detail: Some(why),
        ..AuditEntry::default()
    });
}
