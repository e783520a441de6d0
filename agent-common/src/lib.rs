//! Types and constants shared by Vigil's eBPF programs (`agent-ebpf`) and the user-space agent.
//!
//! Everything here is `no_std` and allocation-free so the kernel side can use it. The map layout
//! described in [`maps`] and the histogram bucket math in [`histogram`] are the contract between
//! the two sides: change one and the other changes with it.
#![no_std]

pub mod histogram;
pub mod maps;
