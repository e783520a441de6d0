//! `host` collector: node-wide stats from /proc and /sys (work in progress).
