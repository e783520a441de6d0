//! Bearer tokens: the tokens file maps each token to a name (what the audit log shows), a role
//! and, for agents, the node it may write as.
//!
//! ```toml
//! [[tokens]]
//! name = "gpu-node-17"      # who, in the audit log (never the token itself)
//! token = "…"               # at least 16 characters; send as `authorization: Bearer …`
//! role = "agent"            # agent | reader | admin
//! node = "gpu-node-17"      # agents only: the node it writes as, or "*" for any
//! ```

use std::path::{Path, PathBuf};

use serde::Deserialize;

/// What a token allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Streams telemetry as its node (or any node with `node = "*"`).
    Agent,
    /// Reads: the HTTP query API and the gRPC `Query` service; cannot ingest.
    Reader,
    /// Reads like `reader` (administration comes later); cannot ingest: agents write only with
    /// agent tokens.
    Admin,
}

/// One entry of the tokens file.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenEntry {
    /// Who holds the token, as the audit log names it.
    pub name: String,
    /// The secret. Never logged.
    token: String,
    pub role: Role,
    /// For `agent` tokens: the node it may write as, or `*`.
    #[serde(default)]
    pub node: Option<String>,
}

impl std::fmt::Debug for TokenEntry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenEntry")
            .field("name", &self.name)
            .field("role", &self.role)
            .field("node", &self.node)
            .finish_non_exhaustive()
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TokensFile {
    #[serde(default)]
    tokens: Vec<TokenEntry>,
}

/// A tokens file that cannot be used. Messages name the entry, never the token.
#[derive(Debug, thiserror::Error)]
pub enum TokensError {
    #[error("cannot read tokens file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("tokens file {path} is invalid: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("tokens file {path}: entry {name:?}: {problem}")]
    Entry {
        path: PathBuf,
        name: String,
        problem: &'static str,
    },
}

/// The loaded tokens.
#[derive(Debug, Clone)]
pub struct TokenTable {
    entries: Vec<TokenEntry>,
}

impl TokenTable {
    pub fn load(path: &Path) -> Result<TokenTable, TokensError> {
        let text = std::fs::read_to_string(path).map_err(|source| TokensError::Read {
            path: path.to_owned(),
            source,
        })?;
        warn_if_readable_by_others(path);
        // toml's messages quote the offending line, which may hold a token: say only where.
        let file: TokensFile = toml::from_str(&text).map_err(|error| TokensError::Parse {
            path: path.to_owned(),
            message: match error.span() {
                Some(span) => format!(
                    "syntax or key error on line {} (expected [[tokens]] entries with name, \
                     token, role and node)",
                    text[..span.start].lines().count().max(1)
                ),
                None => "expected [[tokens]] entries with name, token, role and node".into(),
            },
        })?;
        let entry_error = |entry: &TokenEntry, problem| TokensError::Entry {
            path: path.to_owned(),
            name: entry.name.clone(),
            problem,
        };
        for (i, entry) in file.tokens.iter().enumerate() {
            if entry.token.len() < 16 {
                return Err(entry_error(entry, "token shorter than 16 characters"));
            }
            match (entry.role, &entry.node) {
                (Role::Agent, None) => {
                    return Err(entry_error(
                        entry,
                        "agent tokens need node = \"<node name>\" (or \"*\" for any node)",
                    ));
                }
                (Role::Reader | Role::Admin, Some(_)) => {
                    return Err(entry_error(entry, "only agent tokens are bound to a node"));
                }
                _ => {}
            }
            if file.tokens[..i]
                .iter()
                .any(|other| other.token == entry.token)
            {
                return Err(entry_error(entry, "same token as an earlier entry"));
            }
        }
        Ok(TokenTable {
            entries: file.tokens,
        })
    }

    /// The entry of a presented token. Compares against every entry in constant time per entry.
    pub fn find(&self, presented: &str) -> Option<&TokenEntry> {
        let mut found = None;
        for entry in &self.entries {
            if constant_time_eq(entry.token.as_bytes(), presented.as_bytes()) {
                found = Some(entry);
            }
        }
        found
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(unix)]
fn warn_if_readable_by_others(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    if let Ok(meta) = std::fs::metadata(path)
        && meta.permissions().mode() & 0o077 != 0
    {
        tracing::warn!(
            "tokens file {} is readable by group or others; chmod 600 it",
            path.display()
        );
    }
}

#[cfg(not(unix))]
fn warn_if_readable_by_others(_: &Path) {}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(text: &str) -> Result<TokenTable, TokensError> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokens.toml");
        std::fs::write(&path, text).unwrap();
        TokenTable::load(&path)
    }

    #[test]
    fn finds_the_entry_of_a_token() {
        let table = load(
            "[[tokens]]\nname = \"a\"\ntoken = \"aaaaaaaaaaaaaaaa\"\nrole = \"agent\"\nnode = \"n1\"\n\
             [[tokens]]\nname = \"r\"\ntoken = \"rrrrrrrrrrrrrrrr\"\nrole = \"reader\"\n",
        )
        .unwrap();
        assert_eq!(
            table.find("aaaaaaaaaaaaaaaa").unwrap().node.as_deref(),
            Some("n1")
        );
        assert_eq!(table.find("rrrrrrrrrrrrrrrr").unwrap().role, Role::Reader);
        assert!(table.find("aaaaaaaaaaaaaaab").is_none());
    }

    #[test]
    fn errors_never_quote_the_token() {
        let secret = "sssssssssssssssssecret";
        for text in [
            format!("[[tokens]]\nname = \"a\"\ntoken = \"{secret}\"\nrole = \"agent\"\n"),
            format!("[[tokens]]\nname = \"a\"\ntoken = \"{secret}\"\nrole = \"superuser\"\n"),
            format!("[[tokens]]\nname = \"a\"\ntoken = \"{secret}\"\nrol = \"agent\"\n"),
        ] {
            let error = load(&text).unwrap_err().to_string();
            assert!(!error.contains("secret"), "{error}");
        }
    }
}
