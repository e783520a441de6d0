//! `process` collector: per model-server process stats from /proc (work in progress).
