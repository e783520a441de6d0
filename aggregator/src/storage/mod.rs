//! Where accepted batches go: the write-ahead log ([`wal`]) and the store built from it
//! ([`store`]): heads in memory, closed chunks ([`codec`]) and checkpoints in an embedded
//! database ([`disk`]), an inverted index ([`index`]) for queries ([`query_view`]).

pub mod codec;
pub mod disk;
mod index;
pub mod live;
pub mod query_view;
pub mod store;
pub mod wal;

pub use disk::{Rollup, StoreError};
pub use live::{IngestSink, IngestedBatch};
pub use store::{
    CheckpointReport, HistogramPoint, MetricKind, Point, PointValue, SeriesRef, StorageStats,
    Store, StoreOptions, StoredEvent, StoredSeries,
};
pub use wal::{Lsn, ReplayReport, TornTail, Wal, WalError, WalRecord};

/// How often retention runs (from the checkpoint loop).
const RETENTION_EVERY: std::time::Duration = std::time::Duration::from_secs(3600);

/// Checkpoints every `interval` and applies retention hourly, until `stop` turns true (the
/// last checkpoint is the shutdown's, once no stream can write any more).
pub async fn checkpoint_loop(
    store: std::sync::Arc<Store>,
    wal: std::sync::Arc<Wal>,
    interval: std::time::Duration,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let mut last_retention: Option<std::time::Instant> = None;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = stop.wait_for(|stop| *stop) => return,
        }
        let (store, wal) = (store.clone(), wal.clone());
        let retention_due = last_retention.is_none_or(|at| at.elapsed() >= RETENTION_EVERY);
        let outcome = tokio::task::spawn_blocking(move || {
            let report = store.checkpoint(&wal);
            let retention = retention_due.then(|| {
                let now_ms = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_millis() as i64);
                store.apply_retention(now_ms)
            });
            (report, retention)
        })
        .await;
        match outcome {
            Ok((report, retention)) => {
                match report {
                    Ok(report) => tracing::debug!("checkpoint: {report:?}"),
                    // The log keeps everything; the next checkpoint tries again.
                    Err(error) => tracing::error!("checkpoint failed: {error}"),
                }
                match retention {
                    Some(Ok(())) => last_retention = Some(std::time::Instant::now()),
                    Some(Err(error)) => tracing::error!("retention failed: {error}"),
                    None => {}
                }
            }
            Err(error) => tracing::error!("checkpoint task: {error}"),
        }
    }
}
