//! The audit log: one JSON object per line for every connection, every accepted stream and
//! every denied request: when, from where, who (a token's name and role, or a client
//! certificate's names; never a token), and the outcome.

use std::{
    fs::{File, OpenOptions},
    io::Write,
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::Mutex,
};

use serde::Serialize;
use time::{OffsetDateTime, format_description::well_known::Rfc3339};

/// One audit record. `time` is filled in when it is written.
#[derive(Debug, Clone, Default, Serialize)]
pub struct AuditEntry {
    pub time: String,
    /// `connection` (TCP accept and TLS handshake), `stream` (an Ingest stream), or a `Query`
    /// call: `query_instant`, `query_range`, `subscribe`, `list_nodes`.
    pub event: &'static str,
    /// `accepted` or `denied`.
    pub outcome: &'static str,
    pub peer: Option<SocketAddr>,
    /// `token:<name> (<role>)`, `cert:<names>`, or `anonymous`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub who: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub agent_instance: Option<String>,
    /// The gRPC status code of a denial (`unauthenticated`, `permission_denied`, ...).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub code: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

/// The open audit log.
pub struct AuditLog {
    path: PathBuf,
    file: Mutex<File>,
}

impl AuditLog {
    pub fn open(path: &Path) -> std::io::Result<AuditLog> {
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)?;
        }
        let file = OpenOptions::new().create(true).append(true).open(path)?;
        Ok(AuditLog {
            path: path.to_owned(),
            file: Mutex::new(file),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends one line. A failing audit log is reported, not fatal.
    pub fn record(&self, mut entry: AuditEntry) {
        entry.time = OffsetDateTime::now_utc()
            .format(&Rfc3339)
            .unwrap_or_default();
        let mut line = serde_json::to_string(&entry).expect("audit entries serialise");
        line.push('\n');
        let result = self
            .file
            .lock()
            .expect("audit lock poisoned")
            .write_all(line.as_bytes());
        if let Err(error) = result {
            tracing::error!("cannot write audit log {}: {error}", self.path.display());
        }
    }
}
