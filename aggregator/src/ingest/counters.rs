//! The ingest path's counters, served at `/metrics` (http/metrics.rs); tests and logs read them
//! through [`IngestCounters::snapshot`].

use std::sync::atomic::{AtomicU64, Ordering};

macro_rules! counters {
    ($($(#[$doc:meta])* $name:ident),* $(,)?) => {
        /// Live counters, shared by every stream.
        #[derive(Debug, Default)]
        pub struct IngestCounters {
            $($(#[$doc])* pub $name: AtomicU64,)*
        }

        /// The counters at one moment.
        #[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
        pub struct CountersSnapshot {
            $($(#[$doc])* pub $name: u64,)*
        }

        impl IngestCounters {
            pub fn snapshot(&self) -> CountersSnapshot {
                CountersSnapshot {
                    $($name: self.$name.load(Ordering::Relaxed),)*
                }
            }
        }
    };
}

counters! {
    /// TCP connections accepted (before TLS).
    connections_accepted,
    /// TLS handshakes that failed (bad or untrusted client certificate, not TLS at all, ...).
    tls_handshake_failures,
    /// Streams that passed authentication and sent a valid Hello.
    streams_accepted,
    /// Streams refused for a missing or unknown token: `unauthenticated`.
    streams_unauthenticated,
    /// Streams refused for writing as a node their token or certificate does not allow:
    /// `permission_denied`.
    streams_permission_denied,
    /// Streams that did not open with a valid Hello, or sent a second one: `invalid_argument`.
    streams_invalid,
    /// Messages over `grpc.max_message_bytes`: `resource_exhausted`.
    messages_oversize,
    /// Messages of a kind this aggregator does not know (a newer agent); ignored.
    messages_unknown,
    /// Batches whose delta block could not be decoded: the stream is ended, the agent resends.
    messages_undecodable,
    /// Batches that carried a delta block (stream-delta encoding).
    batches_delta_coded,
    /// Batches stored (appended to the log and acked once durable).
    batches_stored,
    /// Batches at or below their agent instance's stored sequence: acked, not stored again.
    batches_duplicate,
    /// Batches refused whole (sequence 0).
    batches_malformed,
    /// Gauge and counter samples stored.
    samples_stored,
    /// Histograms stored.
    histograms_stored,
    /// Events stored.
    events_stored,
    /// Series declarations accepted (repeats of known ones included).
    series_declared,
    /// Samples, histograms or events rejected with INVALID_VALUE.
    rejected_invalid_value,
    /// ... with FUTURE_TIMESTAMP.
    rejected_future_timestamp,
    /// ... with TOO_OLD.
    rejected_too_old,
    /// Samples and declarations rejected with SERIES_LIMIT.
    rejected_series_limit,
    /// ... with UNKNOWN_SERIES.
    rejected_unknown_series,
    /// Samples, histograms, events and declarations rejected with MALFORMED.
    rejected_malformed,
}

impl IngestCounters {
    pub(crate) fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }
}
