//! Where things are: the workspace root, its target directory and the artefacts tasks pass on.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::shell;

/// The eBPF crate's binary target, and so the name of the object it produces.
pub const EBPF_BINARY: &str = "vigil-syscalls";

pub struct Workspace {
    pub root: PathBuf,
    /// The host build's target directory (`CARGO_TARGET_DIR` when set, else `<root>/target`).
    pub target: PathBuf,
}

impl Workspace {
    pub fn locate() -> Self {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .expect("xtask lives one level below the workspace root")
            .to_path_buf();
        let target = match std::env::var_os("CARGO_TARGET_DIR") {
            Some(dir) if !dir.is_empty() => root.join(dir),
            _ => root.join("target"),
        };
        Workspace { root, target }
    }

    pub fn ebpf_crate(&self) -> PathBuf {
        self.root.join("agent-ebpf")
    }

    /// The eBPF crate's own target directory, apart from the host build's.
    pub fn ebpf_target_dir(&self) -> PathBuf {
        self.target.join("ebpf")
    }

    /// The object the agent embeds (`VIGIL_BPF_OBJECT`).
    pub fn bpf_object(&self) -> PathBuf {
        self.target.join("bpf").join(format!("{EBPF_BINARY}.bpf.o"))
    }

    pub fn agent_binary(&self) -> PathBuf {
        self.target.join("release").join("vigil-agent")
    }

    pub fn bench_dir(&self) -> PathBuf {
        self.target.join("bench")
    }

    /// The host toolchain's cargo (the one running this xtask), in the workspace root, with
    /// `VIGIL_BPF_OBJECT` pointing at the eBPF object so the agent's build script can embed it.
    pub fn cargo(&self, bpf_object: &Path) -> Command {
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let mut command = Command::new(cargo);
        shell::scrub_outer_cargo_env(&mut command, self);
        command
            .current_dir(&self.root)
            .env("VIGIL_BPF_OBJECT", bpf_object);
        command
    }
}
