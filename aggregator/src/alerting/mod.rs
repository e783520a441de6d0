//! Alerting: Prometheus rule files ([`rules`], [`template`]) evaluated over the store
//! ([`group`], [`manager`]), their results stored like any series ([`writer`]), alerts sent to
//! Alertmanager and webhooks ([`notify`]) and kept in a history ([`history`]), which HTTP
//! (`http/alerts.rs`) and gRPC ([`grpc`]) serve. [`fast`] wakes groups as soon as ingested
//! data can make an alert fire (the XID and agent-silent fast path).
//! `docs/alerts.md` describes the shipped catalog (`packaging/rules/`).

pub mod config;
pub mod fast;
pub mod group;
pub mod grpc;
pub mod history;
pub mod manager;
pub mod notify;
pub mod rules;
pub mod template;
pub mod writer;

pub use config::{AlertingConfig, AlertmanagerConfig, WebhookConfig};
pub use group::{Alert, AlertState};
pub use history::{AlertHistory, HistoryRecord};
pub use manager::{ManagerParts, ReloadStatus, RuleManager, load_rules};
pub use notify::Notifier;
pub use rules::{RuleError, RuleGroup};
pub use writer::SampleWriter;

use std::sync::Arc;

use tokio::sync::watch;

use crate::{
    config::AggregatorConfig,
    http::metrics::Telemetry,
    ingest::{admission::Limits, counters::IngestCounters},
    query::Engine,
    storage::{Store, Wal},
};

/// Starts the rule manager of `config.alerting` (`None` without rule files): loads the rules
/// (a file that does not load stops the start, with file, line and reason), opens the history
/// under `<data_dir>/alerts/`, starts the notifiers and the evaluation, and adds its families to
/// `/metrics`.
pub fn start_from_config(
    config: &AggregatorConfig,
    store: &Arc<Store>,
    wal: &Arc<Wal>,
    counters: &Arc<IngestCounters>,
    telemetry: &Telemetry,
    shutdown: watch::Receiver<bool>,
) -> Result<Option<RuleManager>, String> {
    let alerting = &config.alerting;
    if alerting.rule_files.is_empty() {
        return Ok(None);
    }
    if alerting.evaluation_interval < rules::MIN_INTERVAL {
        return Err(format!(
            "alerting.evaluation_interval {:?} is shorter than the minimum, 1s",
            alerting.evaluation_interval
        ));
    }
    let now = manager::now_ms();
    let limits = Limits::from_config(&config.limits);
    let history = AlertHistory::open(
        &config.data_dir.join("alerts"),
        config.limits.retention,
        now,
    )
    .map_err(|error| {
        format!(
            "cannot open the alert history under {}: {error}",
            config.data_dir.join("alerts").display()
        )
    })?;
    let generator_url = config
        .http
        .listen
        .map(|addr| format!("http://{addr}/api/v1/rules"));
    let notifier = Notifier::start(
        &alerting.alertmanager,
        &alerting.webhook,
        alerting
            .external_labels
            .iter()
            .map(|(name, value)| (name.clone(), value.clone()))
            .collect(),
        generator_url,
        shutdown.clone(),
    )?;
    let manager = RuleManager::new(ManagerParts {
        config: alerting.clone(),
        engine: Engine::new(store.clone()),
        writer: SampleWriter::new(
            store.clone(),
            wal.clone(),
            counters.clone(),
            limits,
            &alerting.node,
            now,
        ),
        history,
        notifier,
    })
    .map_err(|error| format!("alerting.rule_files: {error}"))?;
    let groups = manager.groups();
    tracing::info!(
        "alerting: {} rule groups, {} rules; notifying {} Alertmanagers and {} webhooks",
        groups.len(),
        groups.iter().map(|g| g.rules.len()).sum::<usize>(),
        alerting.alertmanager.len(),
        alerting.webhook.len()
    );
    // Before the first agent stream is accepted, so every live batch can wake a group.
    store.add_sink(manager.fast_sink());
    manager.start(shutdown);
    let metrics = manager.clone();
    telemetry.add_writer(Arc::new(move |out: &mut String| metrics.write_metrics(out)));
    Ok(Some(manager))
}
