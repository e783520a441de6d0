//! Who may connect and write: TLS (with optional client certificates), bearer tokens, and the
//! audit log that records every connection and every denial.

pub mod access;
pub mod audit;
pub mod connection;
pub mod tls;
pub mod tokens;

pub use access::{Authenticator, Caller, Denial};
pub use audit::{AuditEntry, AuditLog};
pub use connection::ConnectionInfo;
pub use tokens::{Role, TokenTable};
