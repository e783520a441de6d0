//! Deciding who a stream's caller is and which node it may write as.

use tonic::metadata::MetadataMap;

use super::{
    connection::ConnectionInfo,
    tokens::{Role, TokenTable},
};

/// How streams are authenticated.
#[derive(Debug, Clone)]
pub struct Authenticator {
    /// With a tokens file, every stream needs an `agent` token.
    pub tokens: Option<TokenTable>,
    /// With a client CA, every connection has a verified client certificate.
    pub client_certificates: bool,
}

/// An authenticated caller.
#[derive(Debug, Clone)]
pub struct Caller {
    /// For the audit log: `token:<name> (agent)`, `cert:<names>`, both, or `anonymous`.
    pub who: String,
    /// The node an agent token is bound to (`*` for any); `None` without tokens.
    token_node: Option<String>,
    /// A client certificate's names; `None` without mTLS.
    certificate_names: Option<Vec<String>>,
}

/// A refused stream.
#[derive(Debug, Clone)]
pub struct Denial {
    /// Whom the credentials named, when they named anyone.
    pub who: Option<String>,
    pub status: tonic::Status,
}

impl Authenticator {
    pub fn authenticate(
        &self,
        metadata: &MetadataMap,
        connection: Option<&ConnectionInfo>,
    ) -> Result<Caller, Denial> {
        let certificate_names = connection.and_then(|info| info.certificate_names.clone());
        let cert_who = certificate_names
            .as_ref()
            .map(|names| format!("cert:{}", names.join(",")));
        if self.client_certificates && certificate_names.is_none() {
            // rustls refuses such connections already; this guards an in-process misuse.
            return Err(Denial {
                who: None,
                status: tonic::Status::unauthenticated(
                    "a client certificate signed by the configured client CA is required",
                ),
            });
        }
        let Some(tokens) = &self.tokens else {
            return Ok(Caller {
                who: cert_who.unwrap_or_else(|| "anonymous".into()),
                token_node: None,
                certificate_names,
            });
        };
        let presented = metadata
            .get("authorization")
            .and_then(|value| value.to_str().ok())
            .and_then(|value| {
                // The scheme is case-insensitive (RFC 9110).
                let (scheme, token) = value.split_once(' ')?;
                scheme.eq_ignore_ascii_case("bearer").then_some(token)
            });
        let Some(presented) = presented else {
            return Err(Denial {
                who: cert_who,
                status: tonic::Status::unauthenticated(
                    "missing bearer token: send `authorization: Bearer <token>` with a token \
                     from the aggregator's tokens file",
                ),
            });
        };
        let Some(entry) = tokens.find(presented.trim()) else {
            return Err(Denial {
                who: cert_who,
                status: tonic::Status::unauthenticated(
                    "unknown bearer token: it is not in the aggregator's tokens file",
                ),
            });
        };
        let token_who = format!("token:{} ({:?})", entry.name, entry.role).to_lowercase();
        let who = match cert_who {
            Some(cert) => format!("{token_who} {cert}"),
            None => token_who,
        };
        if entry.role != Role::Agent {
            return Err(Denial {
                who: Some(who),
                status: tonic::Status::permission_denied(format!(
                    "token {:?} has role {:?}; streaming telemetry needs an agent token",
                    entry.name, entry.role
                )),
            });
        }
        Ok(Caller {
            who,
            token_node: entry.node.clone(),
            certificate_names,
        })
    }
}

impl Caller {
    /// Whether this caller may write as `node` (the Hello's node); the message says why not.
    pub fn may_write_as(&self, node: &str) -> Result<(), String> {
        if let Some(bound) = &self.token_node
            && bound != "*"
            && bound != node
        {
            return Err(format!(
                "this token writes as node {bound:?}, not {node:?}: an agent may write only as its own node"
            ));
        }
        if let Some(names) = &self.certificate_names
            && !names.iter().any(|name| name == node)
        {
            return Err(format!(
                "the client certificate is for {names:?}, not node {node:?}: an agent may write \
                 only as its own node"
            ));
        }
        Ok(())
    }
}
