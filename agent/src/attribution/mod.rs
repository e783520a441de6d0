//! Container and Kubernetes pod attribution of processes (work in progress).
