//! The `vigil.v1.Alerts` gRPC service (proto/vigil/v1/alerts.proto): active alerts and alert
//! history for programs, on the same port as Ingest and Query. Reading needs a `reader` or
//! `admin` token when a tokens file is configured, and every call is audited, as for Query.

use std::sync::Arc;

use tonic::{Request, Response, Status};
use vigil_proto::v1::{
    ActiveAlert, ActiveAlertsRequest, ActiveAlertsResponse, AlertHistoryRequest,
    AlertHistoryResponse, AlertRecord, Label, alerts_server::Alerts,
};

use super::{AlertState, RuleManager, manager::now_ms};
use crate::security::{AuditEntry, AuditLog, ConnectionInfo, Role, TokenTable};

/// The history range when a request leaves `start_ms` at 0.
const DEFAULT_RANGE_MS: i64 = 24 * 3600 * 1000;

/// Serves `vigil.v1.Alerts` from a rule manager.
pub struct AlertsService {
    manager: RuleManager,
    tokens: Option<TokenTable>,
    audit: Arc<AuditLog>,
}

impl AlertsService {
    pub fn new(
        manager: RuleManager,
        tokens: Option<TokenTable>,
        audit: Arc<AuditLog>,
    ) -> AlertsService {
        AlertsService {
            manager,
            tokens,
            audit,
        }
    }

    /// Lets readers through; audits the call either way.
    fn authorize<T>(&self, request: &Request<T>, event: &'static str) -> Result<(), Status> {
        let connection = request.extensions().get::<ConnectionInfo>();
        let cert_who = connection
            .and_then(|info| info.certificate_names.as_ref())
            .map(|names| format!("cert:{}", names.join(",")));
        let decision: Result<String, (Option<String>, Status)> = match &self.tokens {
            None => Ok(cert_who.clone().unwrap_or_else(|| "anonymous".into())),
            Some(tokens) => {
                let presented = request
                    .metadata()
                    .get("authorization")
                    .and_then(|value| value.to_str().ok())
                    .and_then(|value| {
                        let (scheme, token) = value.split_once(' ')?;
                        scheme
                            .eq_ignore_ascii_case("bearer")
                            .then_some(token.trim())
                    });
                match presented.map(|token| tokens.find(token)) {
                    None => Err((
                        cert_who.clone(),
                        Status::unauthenticated(
                            "missing bearer token: send `authorization: Bearer <token>` with a \
                             reader or admin token",
                        ),
                    )),
                    Some(None) => Err((
                        cert_who.clone(),
                        Status::unauthenticated("unknown bearer token"),
                    )),
                    Some(Some(entry)) => {
                        let who = format!("token:{} ({:?})", entry.name, entry.role).to_lowercase();
                        match entry.role {
                            Role::Reader | Role::Admin => Ok(who),
                            Role::Agent => Err((
                                Some(who),
                                Status::permission_denied(
                                    "this token has role agent; reading alerts needs a reader \
                                     or admin token",
                                ),
                            )),
                        }
                    }
                }
            }
        };
        let (outcome, who, code, detail) = match &decision {
            Ok(who) => ("accepted", Some(who.clone()), None, None),
            Err((who, status)) => (
                "denied",
                who.clone(),
                Some(match status.code() {
                    tonic::Code::PermissionDenied => "permission_denied",
                    _ => "unauthenticated",
                }),
                Some(status.message().to_owned()),
            ),
        };
        self.audit.record(AuditEntry {
            event,
            outcome,
            peer: connection.map(|info| info.peer),
            who,
            code,
            detail,
            ..AuditEntry::default()
        });
        decision.map(drop).map_err(|(_, status)| status)
    }
}

fn labels(pairs: &[(String, String)]) -> Vec<Label> {
    pairs
        .iter()
        .map(|(name, value)| Label {
            name: name.clone(),
            value: value.clone(),
        })
        .collect()
}

#[tonic::async_trait]
impl Alerts for AlertsService {
    async fn active_alerts(
        &self,
        request: Request<ActiveAlertsRequest>,
    ) -> Result<Response<ActiveAlertsResponse>, Status> {
        self.authorize(&request, "alerts_active")?;
        let alerts = self
            .manager
            .active_alerts()
            .into_iter()
            .map(|alert| ActiveAlert {
                labels: labels(&alert.labels),
                annotations: labels(&alert.annotations),
                state: alert.state.as_str().to_owned(),
                active_at_ms: alert.active_at_ms,
                fired_at_ms: match alert.state {
                    AlertState::Firing => alert.fired_at_ms.unwrap_or_default(),
                    _ => 0,
                },
                value: alert.value,
            })
            .collect();
        Ok(Response::new(ActiveAlertsResponse { alerts }))
    }

    async fn alert_history(
        &self,
        request: Request<AlertHistoryRequest>,
    ) -> Result<Response<AlertHistoryResponse>, Status> {
        self.authorize(&request, "alerts_history")?;
        let request = request.into_inner();
        let end = if request.end_ms == 0 {
            now_ms()
        } else {
            request.end_ms
        };
        let start = if request.start_ms == 0 {
            end - DEFAULT_RANGE_MS
        } else {
            request.start_ms
        };
        if end < start {
            return Err(Status::invalid_argument("end_ms is before start_ms"));
        }
        let alerts = self
            .manager
            .history()
            .query(start, end)
            .into_iter()
            .filter(|record| {
                request.alertname.is_empty()
                    || record
                        .labels
                        .iter()
                        .any(|(name, value)| name == "alertname" && *value == request.alertname)
            })
            .map(|record| AlertRecord {
                id: record.id,
                labels: labels(&record.labels),
                annotations: labels(&record.annotations),
                active_at_ms: record.active_at_ms,
                started_at_ms: record.started_at_ms,
                ended_at_ms: record.ended_at_ms,
                peak_value: record.peak_value,
                interrupted: record.interrupted,
            })
            .collect();
        Ok(Response::new(AlertHistoryResponse { alerts }))
    }
}
