//! Sets `bpf_target_arch` to the architecture the programs will run on (the host, unless
//! `CARGO_CFG_BPF_TARGET_ARCH` says otherwise), so the syscall numbers in the programs match it.
fn main() {
    println!("cargo::rustc-check-cfg=cfg(bpf_target_arch, values(\"x86_64\", \"aarch64\"))");
    println!("cargo::rerun-if-env-changed=CARGO_CFG_BPF_TARGET_ARCH");
    let arch = std::env::var("CARGO_CFG_BPF_TARGET_ARCH")
        .unwrap_or_else(|_| std::env::consts::ARCH.to_string());
    println!("cargo::rustc-cfg=bpf_target_arch=\"{arch}\"");
}
