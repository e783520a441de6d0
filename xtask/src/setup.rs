//! `cargo xtask setup`: find, or install, what the eBPF build, the tests and the benchmark need.
//!
//! The eBPF crate builds `core` for `bpfel-unknown-none`, which needs the library source and an
//! unstable cargo flag. Two toolchains can do it:
//!
//! - Debian's: `rustc-web`/`cargo-web` (>= 1.96) with their source (`rust-web-src`), unlocked with
//!   `RUSTC_BOOTSTRAP=1`, plus bpf-linker built against Debian's LLVM 22 (the LLVM of that rustc).
//!   As root on Debian/Ubuntu, this is what gets installed.
//! - rustup's nightly with the `rust-src` component, plus `cargo install bpf-linker`.
//!
//! The tests and the benchmark also need `bpftrace` (a peer to compare with) and tracefs mounted
//! (bpftrace's tracepoints), the host collector's test needs `prometheus-node-exporter` (its
//! peer), the aggregator's tests need Prometheus (`promtool`), VictoriaMetrics, Alertmanager and
//! Python's grpcio (a third-party client), and the build needs `protoc`. `cargo xtask package`
//! and its tests need cargo-deb, cargo-generate-rpm, umoci, lintian, rpm, rpmlint and
//! kubernetes-validate (PyPI, in a venv at `target/tools/kubernetes-validate/`).

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Result, bail};

use crate::shell;

const DEBIAN_RUSTC: &str = "/usr/bin/rustc";
const DEBIAN_CARGO: &str = "/usr/bin/cargo";
/// The oldest Debian rustc verified to build the eBPF crate.
const DEBIAN_MIN_RUST: (u32, u32) = (1, 96);
/// The LLVM major of Debian's rustc-web; bpf-linker must read the bitcode that rustc writes.
const LLVM_MAJOR: u32 = 22;
const LLVM_DEV_PACKAGE: &str = "llvm-22-dev";
const LLVM_PREFIX: &str = "/usr/lib/llvm-22";
const BPF_LINKER_VERSION: &str = "0.13.0";
const TRACEFS: &str = "/sys/kernel/tracing";
/// Where Debian's prometheus-node-exporter installs node_exporter.
const NODE_EXPORTER: &str = "/usr/bin/prometheus-node-exporter";
/// Package tools for `cargo xtask package`, at versions that build with Rust 1.95.
const CARGO_DEB_VERSION: &str = "3.8.0";
const CARGO_GENERATE_RPM_VERSION: &str = "0.21.1";
/// Checks Kubernetes manifests offline against the API schemas it bundles.
const KUBERNETES_VALIDATE_VERSION: &str = "1.37.0";

/// The toolchain that builds the eBPF crate, as found (or installed) by [`ensure`].
pub struct EbpfToolchain {
    pub kind: ToolchainKind,
    /// The folder holding `bpf-linker`; it goes on the build's `PATH`.
    pub bpf_linker_dir: PathBuf,
}

pub enum ToolchainKind {
    /// `/usr/bin/rustc` and `/usr/bin/cargo` from Debian's `rustc-web`/`cargo-web`.
    Debian,
    /// rustup's `nightly` toolchain, run through this `rustup`.
    RustupNightly { rustup: PathBuf },
}

/// One thing setup looks for: what it is, how to check for it and what provides it.
struct Component {
    name: &'static str,
    /// `Ok(detail)` when present and usable, `Err(why not)` otherwise.
    check: fn() -> Result<String, String>,
    provider: Provider,
}

#[derive(Clone, Copy, PartialEq)]
enum Provider {
    /// A Debian package, installed with apt-get.
    Apt(&'static str),
    /// `cargo install bpf-linker` against Debian's LLVM (which needs llvm-22-dev).
    BpfLinkerForDebian,
    /// A rustup command; never run automatically (setup installs Debian's toolchain instead).
    Rustup(&'static str),
    /// `cargo install --locked CRATE --version VERSION`.
    CargoInstall(&'static str, &'static str),
    /// `pip install PACKAGE==VERSION` into its own venv under `target/tools/` (Debian's python3
    /// refuses system-wide pip installs).
    PythonVenv(&'static str, &'static str),
}

const DEBIAN_TOOLCHAIN: &[Component] = &[
    Component {
        name: "rustc (Debian)",
        check: check_debian_rustc,
        provider: Provider::Apt("rustc-web"),
    },
    Component {
        name: "cargo (Debian)",
        check: check_debian_cargo,
        provider: Provider::Apt("cargo-web"),
    },
    Component {
        name: "Rust library source",
        check: check_debian_library_source,
        provider: Provider::Apt("rust-web-src"),
    },
    Component {
        name: "bpf-linker (LLVM 22)",
        check: check_bpf_linker_for_debian,
        provider: Provider::BpfLinkerForDebian,
    },
];

const RUSTUP_TOOLCHAIN: &[Component] = &[
    Component {
        name: "rustup nightly",
        check: check_rustup_nightly,
        provider: Provider::Rustup("rustup toolchain install nightly --component rust-src"),
    },
    Component {
        name: "rust-src (nightly)",
        check: check_rustup_nightly_source,
        provider: Provider::Rustup("rustup component add rust-src --toolchain nightly"),
    },
    Component {
        name: "bpf-linker",
        check: check_bpf_linker_any,
        provider: Provider::Rustup("cargo install bpf-linker"),
    },
];

/// Needed whichever toolchain builds the eBPF crate.
const PEERS: &[Component] = &[
    Component {
        name: "bpftrace",
        check: check_bpftrace,
        provider: Provider::Apt("bpftrace"),
    },
    Component {
        name: "protoc",
        check: check_protoc,
        provider: Provider::Apt("protobuf-compiler"),
    },
    Component {
        name: "node_exporter",
        check: check_node_exporter,
        provider: Provider::Apt("prometheus-node-exporter"),
    },
    Component {
        name: "prometheus + promtool",
        check: || check_executable("/usr/bin/promtool", &["--version"]),
        provider: Provider::Apt("prometheus"),
    },
    Component {
        name: "victoria-metrics",
        check: || check_executable("/usr/bin/victoria-metrics", &["-version"]),
        provider: Provider::Apt("victoria-metrics"),
    },
    Component {
        name: "chromium (headless, the dashboard's browser tests)",
        check: || check_executable("/usr/bin/chromium", &["--version"]),
        provider: Provider::Apt("chromium"),
    },
    Component {
        name: "chromedriver (drives chromium for the browser tests)",
        check: || check_executable("/usr/bin/chromedriver", &["--version"]),
        provider: Provider::Apt("chromium-driver"),
    },
    Component {
        name: "alertmanager + amtool",
        check: || check_executable("/usr/bin/amtool", &["--version"]),
        provider: Provider::Apt("prometheus-alertmanager"),
    },
    Component {
        name: "python3 grpcio (a third-party gRPC client)",
        check: || check_python_module("grpc"),
        provider: Provider::Apt("python3-grpcio"),
    },
    Component {
        name: "python3 grpc_tools (protoc for Python)",
        check: || check_python_module("grpc_tools.protoc"),
        provider: Provider::Apt("python3-grpc-tools"),
    },
    Component {
        name: "lintian",
        check: || check_executable("/usr/bin/lintian", &["--version"]),
        provider: Provider::Apt("lintian"),
    },
    Component {
        name: "rpm",
        check: || check_executable("/usr/bin/rpm", &["--version"]),
        provider: Provider::Apt("rpm"),
    },
    Component {
        name: "rpmlint",
        check: || check_executable("/usr/bin/rpmlint", &["--version"]),
        provider: Provider::Apt("rpmlint"),
    },
    Component {
        name: "umoci (OCI images)",
        check: || check_executable("/usr/bin/umoci", &["--version"]),
        provider: Provider::Apt("umoci"),
    },
    Component {
        name: "gpg (rpm signing)",
        check: || check_executable("/usr/bin/gpg", &["--version"]),
        provider: Provider::Apt("gnupg"),
    },
    Component {
        name: "python3 venv",
        check: || check_python_module("ensurepip"),
        provider: Provider::Apt("python3-venv"),
    },
    Component {
        name: "cargo-deb",
        check: || check_cargo_subcommand("cargo-deb"),
        provider: Provider::CargoInstall("cargo-deb", CARGO_DEB_VERSION),
    },
    Component {
        name: "cargo-generate-rpm",
        check: || check_cargo_subcommand("cargo-generate-rpm"),
        provider: Provider::CargoInstall("cargo-generate-rpm", CARGO_GENERATE_RPM_VERSION),
    },
    Component {
        name: "kubernetes-validate",
        check: check_kubernetes_validate,
        provider: Provider::PythonVenv("kubernetes-validate", KUBERNETES_VALIDATE_VERSION),
    },
];

/// Makes sure everything is present, installing what is missing when it can (root with
/// apt-get), and returns the toolchain to build the eBPF crate with.
pub fn ensure() -> Result<EbpfToolchain> {
    let debian = checked(DEBIAN_TOOLCHAIN);
    // rustup is looked at only when Debian's toolchain is incomplete.
    let rustup = if all_found(&debian) {
        Vec::new()
    } else {
        checked(RUSTUP_TOOLCHAIN)
    };
    let peers = checked(PEERS);

    // Prefer Debian's toolchain (it is what setup installs); fall back on a complete rustup
    // nightly; otherwise install Debian's.
    let use_debian = all_found(&debian) || !all_found(&rustup);
    let toolchain = if use_debian { &debian } else { &rustup };
    let needed: Vec<&Checked> = toolchain.iter().chain(&peers).collect();

    if needed.iter().all(|c| c.result.is_ok()) {
        needed.iter().for_each(|c| c.print("found"));
    } else if shell::is_root() && shell::find_in_path("apt-get").is_some() {
        install(&needed)?;
    } else {
        // Show both ways to get a toolchain, so a rustup user sees what their nightly lacks.
        for c in debian.iter().chain(&rustup).chain(&peers) {
            c.print("found");
        }
        print_instructions(&debian, &rustup, &peers);
        bail!("setup: missing components (see above)");
    }

    check_tracefs();

    let bpf_linker = find_bpf_linker().expect("checked above");
    let bpf_linker_dir = bpf_linker
        .parent()
        .expect("an executable's path has a parent")
        .to_path_buf();
    let kind = if use_debian {
        eprintln!("setup: eBPF toolchain: Debian's rustc + bpf-linker");
        ToolchainKind::Debian
    } else {
        eprintln!("setup: eBPF toolchain: rustup nightly + rust-src + bpf-linker");
        ToolchainKind::RustupNightly {
            rustup: find_rustup().expect("checked above"),
        }
    };
    Ok(EbpfToolchain {
        kind,
        bpf_linker_dir,
    })
}

struct Checked {
    component: &'static Component,
    result: Result<String, String>,
}

impl Checked {
    /// One line: `found`/`installed` (the `state` given) with the detail, or `MISSING` and why.
    fn print(&self, state: &str) {
        let name = self.component.name;
        match &self.result {
            Ok(detail) => print_line(name, state, detail),
            Err(why) => print_line(name, "MISSING", why),
        }
    }
}

fn checked(components: &'static [Component]) -> Vec<Checked> {
    components
        .iter()
        .map(|component| Checked {
            component,
            result: (component.check)(),
        })
        .collect()
}

fn all_found(checked: &[Checked]) -> bool {
    checked.iter().all(|c| c.result.is_ok())
}

fn missing_apt_packages(checked: &[Checked]) -> Vec<&'static str> {
    checked
        .iter()
        .filter(|c| c.result.is_err())
        .filter_map(|c| match c.component.provider {
            Provider::Apt(package) => Some(package),
            _ => None,
        })
        .collect()
}

/// Installs what `needed` lacks with apt-get (one `update`, one `install`) and cargo install,
/// then checks again.
fn install(needed: &[&Checked]) -> Result<()> {
    for c in needed.iter().filter(|c| c.result.is_ok()) {
        c.print("found");
    }
    let missing: Vec<&Checked> = needed
        .iter()
        .copied()
        .filter(|c| c.result.is_err())
        .collect();
    let mut packages: Vec<&str> = missing
        .iter()
        .filter_map(|c| match c.component.provider {
            Provider::Apt(package) => Some(package),
            _ => None,
        })
        .collect();
    let build_bpf_linker = missing
        .iter()
        .any(|c| c.component.provider == Provider::BpfLinkerForDebian);
    if build_bpf_linker && !dpkg_installed(LLVM_DEV_PACKAGE) {
        packages.push(LLVM_DEV_PACKAGE);
    }

    if !packages.is_empty() {
        eprintln!("setup: installing {} with apt-get", packages.join(" "));
        apt_get(&["update"])?;
        let mut install = vec!["install", "-y"];
        install.extend(&packages);
        apt_get(&install)?;
    }
    if build_bpf_linker {
        eprintln!("setup: building bpf-linker {BPF_LINKER_VERSION} against LLVM {LLVM_MAJOR}");
        // The host toolchain's cargo; `--force` replaces a bpf-linker built for another LLVM.
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let mut command = Command::new(cargo);
        command.env("LLVM_PREFIX", LLVM_PREFIX).args([
            "install",
            "bpf-linker",
            "--version",
            BPF_LINKER_VERSION,
            "--locked",
            "--force",
            "--no-default-features",
            "--features",
            &format!("llvm-{LLVM_MAJOR}"),
        ]);
        shell::run(&mut command)?;
    }
    for c in &missing {
        match c.component.provider {
            Provider::CargoInstall(krate, version) => {
                let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
                let mut command = Command::new(cargo);
                command.args(["install", "--locked", krate, "--version", version]);
                shell::run(&mut command)?;
            }
            Provider::PythonVenv(package, version) => {
                let venv = python_venv(package);
                let mut create = Command::new("/usr/bin/python3");
                create.args(["-m", "venv"]).arg(&venv);
                shell::run(&mut create)?;
                let mut pip = Command::new(venv.join("bin/pip"));
                pip.args(["install", "--quiet", &format!("{package}=={version}")]);
                shell::run(&mut pip)?;
            }
            _ => {}
        }
    }

    for c in missing {
        let again = Checked {
            component: c.component,
            result: (c.component.check)(),
        };
        if let Err(why) = &again.result {
            bail!(
                "setup: {} is still missing after installing it: {why}",
                c.component.name
            );
        }
        again.print("installed");
    }
    Ok(())
}

fn print_line(name: &str, state: &str, detail: &str) {
    eprintln!("setup: {name:<22} {state}: {detail}");
}

fn apt_get(args: &[&str]) -> Result<()> {
    let mut command = Command::new("apt-get");
    command.env("DEBIAN_FRONTEND", "noninteractive").args(args);
    shell::run(&mut command)
}

fn print_instructions(debian: &[Checked], rustup: &[Checked], peers: &[Checked]) {
    let why = if shell::is_root() {
        "apt-get not found"
    } else {
        "not running as root"
    };
    eprintln!("setup: cannot install what is missing ({why}). To get it:");
    let peer_packages = missing_apt_packages(peers);
    if !all_found(debian) && !all_found(rustup) {
        let mut packages = vec!["rustc-web", "cargo-web", "rust-web-src", LLVM_DEV_PACKAGE];
        packages.extend(&peer_packages);
        eprintln!("  either, on Debian/Ubuntu as root (or with sudo):");
        eprintln!(
            "    apt-get update && apt-get install -y {}",
            packages.join(" ")
        );
        eprintln!(
            "    LLVM_PREFIX={LLVM_PREFIX} cargo install bpf-linker --version {BPF_LINKER_VERSION} \
             --locked --no-default-features --features llvm-{LLVM_MAJOR}"
        );
        eprintln!("  or, with rustup:");
        // Installing nightly with its rust-src covers a missing rust-src too.
        let nightly_missing = rustup[0].result.is_err();
        for (index, c) in rustup.iter().enumerate() {
            if index == 1 && nightly_missing {
                continue;
            }
            if let (Err(_), Provider::Rustup(command)) = (&c.result, c.component.provider) {
                eprintln!("    {command}");
            }
        }
        if !peer_packages.is_empty() {
            eprintln!("    plus your distribution's {}", peer_packages.join(" "));
        }
    } else {
        eprintln!("  as root (or with sudo):");
        eprintln!(
            "    apt-get update && apt-get install -y {}",
            peer_packages.join(" ")
        );
    }
    for c in peers.iter().filter(|c| c.result.is_err()) {
        match c.component.provider {
            Provider::CargoInstall(krate, version) => {
                eprintln!("    cargo install --locked {krate} --version {version}");
            }
            Provider::PythonVenv(package, version) => {
                let venv = python_venv(package);
                eprintln!(
                    "    /usr/bin/python3 -m venv {0} && {0}/bin/pip install {package}=={version}",
                    venv.display()
                );
            }
            _ => {}
        }
    }
}

// ---- checks ----

/// The release (`1.96.0`) and LLVM version from `rustc -vV` or `cargo -vV`, or why not.
fn verbose_version(program: &str) -> Result<(String, Option<String>), String> {
    let info = shell::stdout_of(program, &["-vV"]).ok_or_else(|| format!("{program} not found"))?;
    let release = field(&info, "release")
        .ok_or_else(|| format!("{program} -vV reports no release"))?
        .to_string();
    let llvm = field(&info, "LLVM version").map(str::to_string);
    Ok((release, llvm))
}

/// Fails unless `release` is at least [`DEBIAN_MIN_RUST`].
fn require_debian_min(program: &str, release: &str) -> Result<(), String> {
    let (min_major, min_minor) = DEBIAN_MIN_RUST;
    match parse_version(release) {
        Some(version) if version >= DEBIAN_MIN_RUST => Ok(()),
        _ => Err(format!(
            "{program} is {release}, need >= {min_major}.{min_minor} (Debian's rustc-web/cargo-web)"
        )),
    }
}

/// The value of `key: value` in `rustc -vV`/`cargo -vV` output.
fn field<'a>(info: &'a str, key: &str) -> Option<&'a str> {
    info.lines()
        .find_map(|line| line.strip_prefix(key)?.strip_prefix(':'))
        .map(str::trim)
}

/// `1.96.0` or `1.97.0-nightly` -> `(1, 96)` / `(1, 97)`.
fn parse_version(text: &str) -> Option<(u32, u32)> {
    let mut parts = text.split(['.', '-']);
    Some((parts.next()?.parse().ok()?, parts.next()?.parse().ok()?))
}

fn check_debian_rustc() -> Result<String, String> {
    let (release, llvm) = verbose_version(DEBIAN_RUSTC)?;
    require_debian_min(DEBIAN_RUSTC, &release)?;
    match llvm {
        Some(llvm) => Ok(format!("{DEBIAN_RUSTC} {release} (LLVM {llvm})")),
        None => Ok(format!("{DEBIAN_RUSTC} {release}")),
    }
}

fn check_debian_cargo() -> Result<String, String> {
    let (release, _) = verbose_version(DEBIAN_CARGO)?;
    require_debian_min(DEBIAN_CARGO, &release)?;
    Ok(format!("{DEBIAN_CARGO} {release}"))
}

/// `-Z build-std` compiles `<sysroot>/lib/rustlib/src/rust/library/core`.
fn library_source_of(rustc: &mut Command) -> Result<String, String> {
    let output = rustc
        .args(["--print", "sysroot"])
        .output()
        .map_err(|err| format!("cannot run rustc: {err}"))?;
    let sysroot = String::from_utf8_lossy(&output.stdout).trim().to_string();
    if !output.status.success() || sysroot.is_empty() {
        return Err("rustc --print sysroot failed".to_string());
    }
    let core = Path::new(&sysroot).join("lib/rustlib/src/rust/library/core");
    if core.join("Cargo.toml").is_file() {
        Ok(core.display().to_string())
    } else {
        Err(format!("{} not found", core.display()))
    }
}

fn check_debian_library_source() -> Result<String, String> {
    library_source_of(&mut Command::new(DEBIAN_RUSTC))
}

fn find_rustup() -> Option<PathBuf> {
    shell::find_in_path("rustup").or_else(|| {
        let candidate = shell::cargo_home()?.join("bin/rustup");
        shell::is_executable(&candidate).then_some(candidate)
    })
}

fn rustup_nightly() -> Command {
    let rustup = find_rustup().unwrap_or_else(|| "rustup".into());
    let mut command = Command::new(rustup);
    // Never let a probe download a toolchain.
    command
        .env("RUSTUP_AUTO_INSTALL", "0")
        .env_remove("RUSTUP_TOOLCHAIN")
        .args(["run", "nightly"]);
    command
}

fn check_rustup_nightly() -> Result<String, String> {
    let rustup = find_rustup().ok_or("rustup not found")?;
    let toolchains = shell::stdout_of(&rustup, &["toolchain", "list"]).unwrap_or_default();
    if !toolchains.lines().any(|line| line.starts_with("nightly")) {
        return Err("no nightly toolchain in `rustup toolchain list`".to_string());
    }
    let output = rustup_nightly()
        .args(["rustc", "--version"])
        .output()
        .map_err(|err| err.to_string())?;
    if !output.status.success() {
        return Err("`rustup run nightly rustc --version` failed".to_string());
    }
    Ok(String::from_utf8_lossy(&output.stdout).trim().to_string())
}

fn check_rustup_nightly_source() -> Result<String, String> {
    find_rustup().ok_or("rustup not found")?;
    library_source_of(rustup_nightly().arg("rustc"))
}

/// bpf-linker on `PATH`, or where `cargo install` puts it (`CARGO_INSTALL_ROOT`, `~/.cargo`).
fn find_bpf_linker() -> Option<PathBuf> {
    let install_roots = std::env::var_os("CARGO_INSTALL_ROOT")
        .filter(|root| !root.is_empty())
        .map(PathBuf::from)
        .into_iter()
        .chain(shell::cargo_home());
    shell::find_in_path("bpf-linker").or_else(|| {
        install_roots
            .map(|root| root.join("bin/bpf-linker"))
            .find(|candidate| shell::is_executable(candidate))
    })
}

/// The LLVM major a dynamically linked bpf-linker loads (`libLLVM.so.22.1`, `libLLVM-22.so`);
/// `None` when it is linked statically or `ldd` is unavailable.
fn linked_llvm_major(ldd_output: &str) -> Option<u32> {
    let rest = &ldd_output[ldd_output.find("libLLVM")? + "libLLVM".len()..];
    let digits = rest
        .strip_prefix(".so.")
        .or_else(|| rest.strip_prefix('-'))?;
    let end = digits
        .find(|ch: char| !ch.is_ascii_digit())
        .unwrap_or(digits.len());
    digits[..end].parse().ok()
}

fn describe_bpf_linker() -> Result<(PathBuf, String, Option<u32>), String> {
    let path = find_bpf_linker().ok_or("bpf-linker not found on PATH or in ~/.cargo/bin")?;
    let version = shell::stdout_of(&path, &["--version"])
        .ok_or_else(|| format!("{} --version failed", path.display()))?;
    let llvm = shell::stdout_of("ldd", &[&path.display().to_string()])
        .as_deref()
        .and_then(linked_llvm_major);
    Ok((path, version, llvm))
}

fn check_bpf_linker_for_debian() -> Result<String, String> {
    let (path, version, llvm) = describe_bpf_linker()?;
    match llvm {
        Some(llvm) if llvm != LLVM_MAJOR => Err(format!(
            "{} is built against LLVM {llvm}, Debian's rustc needs LLVM {LLVM_MAJOR}",
            path.display()
        )),
        Some(llvm) => Ok(format!("{} ({version}, LLVM {llvm})", path.display())),
        None => Ok(format!("{} ({version})", path.display())),
    }
}

fn check_bpf_linker_any() -> Result<String, String> {
    let (path, version, _) = describe_bpf_linker()?;
    Ok(format!("{} ({version})", path.display()))
}

fn check_bpftrace() -> Result<String, String> {
    let path = shell::find_in_path("bpftrace").ok_or("bpftrace not found on PATH")?;
    let version = shell::stdout_of(&path, &["--version"]).unwrap_or_default();
    Ok(format!("{} ({version})", path.display()))
}

fn check_protoc() -> Result<String, String> {
    let path = shell::find_in_path("protoc").ok_or("protoc not found on PATH")?;
    let version = shell::stdout_of(&path, &["--version"]).unwrap_or_default();
    Ok(format!("{} ({version})", path.display()))
}

/// The host collector's peer test starts its own instance of Debian's node_exporter.
fn check_node_exporter() -> Result<String, String> {
    if !shell::is_executable(Path::new(NODE_EXPORTER)) {
        return Err(format!("{NODE_EXPORTER} not found"));
    }
    let version = shell::stdout_of(NODE_EXPORTER, &["--version"]).unwrap_or_default();
    let first_line = version.lines().next().unwrap_or_default().to_string();
    Ok(format!("{NODE_EXPORTER} ({first_line})"))
}

/// An executable at a fixed path; its version line as the detail.
fn check_executable(path: &str, version_args: &[&str]) -> Result<String, String> {
    if !shell::is_executable(Path::new(path)) {
        return Err(format!("{path} not found"));
    }
    let version = shell::stdout_of(path, version_args).unwrap_or_default();
    let first_line = version.lines().next().unwrap_or_default().to_string();
    Ok(format!("{path} ({first_line})"))
}

/// A module importable by Debian's python3 (`/usr/bin/python3`, which the tests run).
fn check_python_module(module: &str) -> Result<String, String> {
    let imported = Command::new("/usr/bin/python3")
        .args(["-c", &format!("import {module}")])
        .output()
        .is_ok_and(|output| output.status.success());
    if imported {
        Ok(format!("/usr/bin/python3: import {module}"))
    } else {
        Err(format!("/usr/bin/python3 cannot import {module}"))
    }
}

/// A cargo subcommand on `PATH` or where `cargo install` puts it.
fn check_cargo_subcommand(name: &str) -> Result<String, String> {
    let path = shell::find_in_path(name)
        .or_else(|| {
            let candidate = shell::cargo_home()?.join("bin").join(name);
            shell::is_executable(&candidate).then_some(candidate)
        })
        .ok_or_else(|| format!("{name} not found on PATH or in ~/.cargo/bin"))?;
    let version = shell::stdout_of(&path, &["--version"]).unwrap_or_default();
    Ok(format!("{} ({version})", path.display()))
}

/// Where [`Provider::PythonVenv`] puts a PyPI package: `target/tools/<package>/`, a venv of
/// its own (the packaging tests run `target/tools/kubernetes-validate/bin/kubernetes-validate`).
pub fn python_venv(package: &str) -> PathBuf {
    crate::workspace::Workspace::locate()
        .target
        .join("tools")
        .join(package)
}

fn check_kubernetes_validate() -> Result<String, String> {
    let program = python_venv("kubernetes-validate").join("bin/kubernetes-validate");
    let version = shell::stdout_of(&program, &["--version"])
        .ok_or_else(|| format!("{} not found", program.display()))?;
    if !version.contains(KUBERNETES_VALIDATE_VERSION) {
        return Err(format!(
            "{} is {version}, need {KUBERNETES_VALIDATE_VERSION}",
            program.display()
        ));
    }
    Ok(format!("{} ({version})", program.display()))
}

fn dpkg_installed(package: &str) -> bool {
    shell::stdout_of("dpkg-query", &["-W", "-f=${Status}", package])
        .is_some_and(|status| status == "install ok installed")
}

/// bpftrace's tracepoints need tracefs; raw tracepoints (the agent's) do not. Mounts it when
/// root; otherwise only warns, because building does not need it.
fn check_tracefs() {
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap_or_default();
    if let Some(mount_point) = tracefs_mount_point(&mounts) {
        print_line("tracefs", "found", &format!("mounted at {mount_point}"));
        return;
    }
    if !shell::is_root() {
        print_line(
            "tracefs",
            "WARNING",
            &format!("not mounted; bpftrace needs it (as root: mount -t tracefs nodev {TRACEFS})"),
        );
        return;
    }
    let mut mount = Command::new("mount");
    mount.args(["-t", "tracefs", "nodev", TRACEFS]);
    match shell::run(&mut mount) {
        Ok(()) => print_line("tracefs", "mounted", TRACEFS),
        Err(err) => print_line(
            "tracefs",
            "WARNING",
            &format!("could not mount it ({err:#}); bpftrace will not find tracepoints"),
        ),
    }
}

fn tracefs_mount_point(proc_mounts: &str) -> Option<&str> {
    proc_mounts.lines().find_map(|line| {
        let mut fields = line.split_whitespace();
        let (_device, mount_point, fs_type) = (fields.next()?, fields.next()?, fields.next()?);
        (fs_type == "tracefs").then_some(mount_point)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_parse_from_stable_and_nightly_releases() {
        assert_eq!(parse_version("1.96.0"), Some((1, 96)));
        assert_eq!(parse_version("1.97.0-nightly"), Some((1, 97)));
        assert_eq!(parse_version("garbage"), None);
    }

    #[test]
    fn rustc_verbose_version_fields_are_found_by_key() {
        let info = "rustc 1.96.0 (ac68faa20 2026-05-25)\nbinary: rustc\nrelease: 1.96.0\n\
                    LLVM version: 22.1.8";
        assert_eq!(field(info, "release"), Some("1.96.0"));
        assert_eq!(field(info, "LLVM version"), Some("22.1.8"));
        assert_eq!(field(info, "host"), None);
    }

    #[test]
    fn llvm_major_is_read_from_either_soname_style() {
        let debian = "\tlibLLVM.so.22.1 => /usr/lib/llvm-22/lib/libLLVM.so.22.1 (0x00007f)\n";
        assert_eq!(linked_llvm_major(debian), Some(22));
        let older = "\tlibLLVM-15.so.1 => /usr/lib/llvm-15/lib/libLLVM-15.so.1 (0x00007f)\n";
        assert_eq!(linked_llvm_major(older), Some(15));
        assert_eq!(linked_llvm_major("\tlibc.so.6 => /lib/libc.so.6\n"), None);
    }

    #[test]
    fn tracefs_is_found_only_when_mounted() {
        let mounted = "sysfs /sys sysfs rw 0 0\nnodev /sys/kernel/tracing tracefs rw 0 0\n";
        assert_eq!(tracefs_mount_point(mounted), Some("/sys/kernel/tracing"));
        assert_eq!(tracefs_mount_point("sysfs /sys sysfs rw 0 0\n"), None);
    }
}
