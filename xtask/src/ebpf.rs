//! `cargo xtask build-ebpf`: build `agent-ebpf/` for `bpfel-unknown-none` and put the object
//! where the agent's build script looks for it (`target/bpf/vigil-syscalls.bpf.o`).

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

use crate::setup::{self, EbpfToolchain, ToolchainKind};
use crate::shell;
use crate::workspace::{EBPF_BINARY, Workspace};

const BPF_TARGET: &str = "bpfel-unknown-none";

/// Variables the outer (stable, rustup) cargo or the user may have set that would make the
/// inner cargo use another compiler, other flags or the host's target directory.
const FOREIGN_BUILD_VARS: &[&str] = &[
    "RUSTC",
    "RUSTC_WRAPPER",
    "RUSTC_WORKSPACE_WRAPPER",
    "RUSTDOC",
    "RUSTFLAGS",
    "RUSTDOCFLAGS",
    "CARGO_ENCODED_RUSTFLAGS",
    "CARGO_ENCODED_RUSTDOCFLAGS",
    "CARGO_TARGET_DIR",
    "CARGO_MAKEFLAGS",
    "RUSTUP_TOOLCHAIN",
    "RUSTUP_TOOLCHAIN_SOURCE",
];

/// Builds the eBPF object (running setup first) and returns its path.
pub fn build(ws: &Workspace) -> Result<PathBuf> {
    let toolchain = setup::ensure()?;
    let crate_dir = ws.ebpf_crate();
    if !crate_dir.join("Cargo.toml").is_file() {
        bail!(
            "build-ebpf: {} not found; the eBPF crate lives in agent-ebpf/",
            crate_dir.join("Cargo.toml").display()
        );
    }
    let target_dir = ws.ebpf_target_dir();

    let mut cargo = inner_cargo(&toolchain, ws)?;
    cargo.current_dir(&crate_dir).args([
        "build".as_ref(),
        "--release".as_ref(),
        "--target".as_ref(),
        BPF_TARGET.as_ref(),
        "-Z".as_ref(),
        "build-std=core".as_ref(),
        "--target-dir".as_ref(),
        target_dir.as_os_str(),
    ]);
    shell::run(&mut cargo).context("build-ebpf: building agent-ebpf failed")?;

    let built = target_dir
        .join(BPF_TARGET)
        .join("release")
        .join(EBPF_BINARY);
    let object = ws.bpf_object();
    copy_if_changed(&built, &object)?;
    eprintln!("build-ebpf: {}", object.display());
    Ok(object)
}

/// The cargo that can build `core` for the BPF target, with an environment cleared of what the
/// outer cargo set, and bpf-linker on `PATH`.
fn inner_cargo(toolchain: &EbpfToolchain, ws: &Workspace) -> Result<Command> {
    let mut cargo = match &toolchain.kind {
        ToolchainKind::Debian => Command::new("/usr/bin/cargo"),
        ToolchainKind::RustupNightly { rustup } => {
            let mut rustup = Command::new(rustup);
            rustup.args(["run", "nightly", "cargo"]);
            rustup
        }
    };
    shell::scrub_outer_cargo_env(&mut cargo, ws);
    for (key, _) in std::env::vars_os() {
        let Some(key) = key.to_str() else { continue };
        if FOREIGN_BUILD_VARS.contains(&key) || key.starts_with("CARGO_BUILD_") {
            cargo.env_remove(key);
        }
    }
    if let ToolchainKind::Debian = toolchain.kind {
        // Debian's rustc is a stable release; RUSTC_BOOTSTRAP lets it take `-Z build-std`
        // and the eBPF crate's `#![feature(...)]`s.
        cargo
            .env("RUSTC", "/usr/bin/rustc")
            .env("RUSTC_BOOTSTRAP", "1");
    }
    if let Some(path) = path_with(&toolchain.bpf_linker_dir)? {
        cargo.env("PATH", path);
    }
    Ok(cargo)
}

/// `PATH` with `dir` first, or `None` when `dir` is already on it.
fn path_with(dir: &Path) -> Result<Option<OsString>> {
    let current = std::env::var_os("PATH").unwrap_or_default();
    let mut dirs: Vec<PathBuf> = std::env::split_paths(&current).collect();
    if dirs.iter().any(|existing| existing == dir) {
        return Ok(None);
    }
    dirs.insert(0, dir.to_path_buf());
    let path = std::env::join_paths(dirs).context("PATH holds a folder name with a ':' in it")?;
    Ok(Some(path))
}

/// Copies only when the content differs, so an unchanged object keeps its modification time
/// and the agent's build script does not rerun.
fn copy_if_changed(from: &Path, to: &Path) -> Result<()> {
    let new = std::fs::read(from).with_context(|| {
        format!(
            "build-ebpf: the build succeeded but {} is missing; is the eBPF binary target \
             still named {EBPF_BINARY}?",
            from.display()
        )
    })?;
    if std::fs::read(to).is_ok_and(|old| old == new) {
        return Ok(());
    }
    let dir = to.parent().expect("the object path has a parent");
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let partial = to.with_extension("o.partial");
    std::fs::write(&partial, &new)
        .with_context(|| format!("cannot write {}", partial.display()))?;
    std::fs::rename(&partial, to).with_context(|| format!("cannot write {}", to.display()))?;
    Ok(())
}
