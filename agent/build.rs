//! Embeds the eBPF object built by `cargo xtask build-ebpf`.
//!
//! The object is taken from `VIGIL_BPF_OBJECT`, or from `target/bpf/vigil-syscalls.bpf.o` under the
//! workspace. When neither exists (a plain `cargo build` without the eBPF toolchain) an empty
//! object is embedded and the `syscalls` collector reports itself unavailable at run time,
//! naming the command that builds it.
use std::{env, fs, path::PathBuf};

fn main() {
    println!("cargo::rerun-if-env-changed=VIGIL_BPF_OBJECT");
    let manifest_dir = PathBuf::from(env::var("CARGO_MANIFEST_DIR").expect("set by cargo"));
    let object = env::var_os("VIGIL_BPF_OBJECT")
        .map(PathBuf::from)
        .unwrap_or_else(|| manifest_dir.join("../target/bpf/vigil-syscalls.bpf.o"));
    println!("cargo::rerun-if-changed={}", object.display());

    let out =
        PathBuf::from(env::var("OUT_DIR").expect("set by cargo")).join("vigil-syscalls.bpf.o");
    match fs::read(&object) {
        Ok(bytes) => fs::write(&out, bytes).expect("write embedded eBPF object"),
        Err(error) => {
            println!(
                "cargo::warning=eBPF object {} not found ({error}); building without it, so the \
                 syscalls collector will be unavailable. Run `cargo xtask build` to include it.",
                object.display()
            );
            fs::write(&out, []).expect("write empty eBPF object");
        }
    }
}
