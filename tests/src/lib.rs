//! Test-only support for Vigil's end-to-end tests. The workloads the kernel tests drive are the
//! binaries in `src/bin/`.
