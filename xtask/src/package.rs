//! `cargo xtask package`: the release artefacts of both binaries, in `target/packages/`.
//!
//! - `vigil-agent_<version>-1_<arch>.deb` and `vigil-aggregator_...deb`, made by cargo-deb from
//!   the `[package.metadata.deb]` sections of `agent/Cargo.toml` and `aggregator/Cargo.toml`:
//!   the binary, its hardened systemd unit (`packaging/systemd/`), its default config under
//!   `/etc/vigil/` (a conffile, kept on upgrade) and maintainer scripts (`packaging/deb/`).
//! - `vigil-agent-<version>-1.<arch>.rpm` and `vigil-aggregator-...rpm`, made by
//!   cargo-generate-rpm from `[package.metadata.generate-rpm]`, with the same files and the
//!   scriptlets of `packaging/rpm/`.
//! - `vigil-oci/`: an OCI image layout, tag `<version>`, holding both binaries with the shared
//!   libraries they load (so the image needs no base image), built with umoci: no container
//!   daemon involved.
//! - `packages.json`: the paths of all of the above, for tests and CI.
//!
//! The rpms are signed. A release sets `VIGIL_RPM_SIGNING_KEY` to an ASCII-armored,
//! passphrase-less OpenPGP secret key (and publishes its public key); without it, a development
//! key is made once with gpg under `target/rpm-dev-key/` and its public half is written to
//! `target/packages/RPM-GPG-KEY-vigil-dev`, so `rpm --import` + `rpm -K` work on test machines.
//!
//! The package tools take the binaries from `target/packages/stage/release/`, copies of the
//! release build stripped of debug info (the release profile keeps line tables for the build
//! tree's backtraces, which would double the packages' size): cargo-deb finds them through
//! `CARGO_TARGET_DIR`, cargo-generate-rpm through `--target-dir`.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};
use serde_json::json;

use crate::shell;
use crate::workspace::Workspace;

/// The binaries packaged: each is a workspace package of the same name with one binary.
pub const BINARIES: [&str; 2] = ["vigil-agent", "vigil-aggregator"];
/// The Debian revision cargo-deb appends (`0.1.0` -> `0.1.0-1`) and the rpm release.
const REVISION: &str = "1";
/// glibc libraries the driver's NVML links besides those of our binaries.
const NVML_GLIBC_LIBRARIES: [&str; 4] =
    ["libdl.so.2", "libpthread.so.0", "librt.so.1", "libm.so.6"];
/// The uid and gid the aggregator runs as in the image (`runAsUser` in its StatefulSet).
const IMAGE_AGGREGATOR_UID: u32 = 65532;

/// Builds everything into `target/packages/` and returns the path of `packages.json`.
pub fn run(ws: &Workspace) -> Result<PathBuf> {
    let version = workspace_version(ws)?;
    check_tools()?;
    check_changelogs(ws, &version)?;
    crate::build(ws)?;

    let out = ws.target.join("packages");
    fs::create_dir_all(&out).with_context(|| format!("cannot create {}", out.display()))?;
    clean(&out)?;
    let stage = out.join("stage");
    let staged = stage_binaries(ws, &stage)?;

    let signing = rpm_signing_key(ws, &out)?;
    let mut debs = serde_json::Map::new();
    let mut rpms = serde_json::Map::new();
    for binary in BINARIES {
        let deb = out.join(format!("{binary}_{version}-{REVISION}_{}.deb", deb_arch()?));
        let mut cargo_deb = tool_cargo(ws);
        cargo_deb
            .env("CARGO_TARGET_DIR", &stage)
            .args(["deb", "-p", binary, "--no-build", "--no-strip", "--output"])
            .arg(&deb);
        shell::run(&mut cargo_deb)?;
        require_file(&deb, "cargo deb")?;
        debs.insert(binary.to_string(), json!(deb));

        let rpm = out.join(format!(
            "{binary}-{version}-{REVISION}.{}.rpm",
            std::env::consts::ARCH
        ));
        let mut cargo_rpm = tool_cargo(ws);
        cargo_rpm
            .args(["generate-rpm", "-p", &crate_dir_of(binary), "--target-dir"])
            .arg(&stage)
            .arg("--output")
            .arg(&rpm)
            .arg("--signing-key")
            .arg(&signing.secret);
        shell::run(&mut cargo_rpm)?;
        require_file(&rpm, "cargo generate-rpm")?;
        rpms.insert(binary.to_string(), json!(rpm));
    }

    let layout = out.join("vigil-oci");
    build_oci_image(ws, &layout, &version, &staged, &out)?;

    let manifest = json!({
        "version": version,
        "revision": REVISION,
        "binaries": staged,
        "deb": debs,
        "rpm": rpms,
        "rpm_signing_key": {
            "public": signing.public,
            "development": signing.development,
        },
        "oci": { "layout": layout, "tag": version },
    });
    let manifest_path = out.join("packages.json");
    fs::write(
        &manifest_path,
        serde_json::to_string_pretty(&manifest)? + "\n",
    )
    .with_context(|| format!("cannot write {}", manifest_path.display()))?;
    eprintln!("package: wrote {}", manifest_path.display());
    for line in serde_json::to_string_pretty(&manifest)?.lines() {
        eprintln!("package:   {line}");
    }
    Ok(manifest_path)
}

/// The key the rpms are signed with.
struct SigningKey {
    /// ASCII-armored secret key, as cargo-generate-rpm's `--signing-key` takes it.
    secret: PathBuf,
    /// Its public half for `rpm --import`, when we have it (the development key).
    public: Option<PathBuf>,
    development: bool,
}

/// `VIGIL_RPM_SIGNING_KEY`, or the development key (made with gpg on first use).
fn rpm_signing_key(ws: &Workspace, out: &Path) -> Result<SigningKey> {
    if let Some(secret) = std::env::var_os("VIGIL_RPM_SIGNING_KEY").filter(|v| !v.is_empty()) {
        let secret = PathBuf::from(secret);
        if !secret.is_file() {
            bail!(
                "VIGIL_RPM_SIGNING_KEY={} is not a file (an ASCII-armored OpenPGP secret key)",
                secret.display()
            );
        }
        eprintln!("package: signing the rpms with {}", secret.display());
        return Ok(SigningKey {
            secret,
            public: None,
            development: false,
        });
    }
    let dir = ws.target.join("rpm-dev-key");
    let secret = dir.join("secret.asc");
    let public = dir.join("public.asc");
    if !(secret.is_file() && public.is_file()) {
        make_development_key(&dir, &secret, &public)?;
    }
    eprintln!(
        "package: signing the rpms with the DEVELOPMENT key {} (set VIGIL_RPM_SIGNING_KEY for \
         a release)",
        secret.display()
    );
    let published = out.join("RPM-GPG-KEY-vigil-dev");
    fs::copy(&public, &published)
        .with_context(|| format!("cannot write {}", published.display()))?;
    Ok(SigningKey {
        secret,
        public: Some(published),
        development: true,
    })
}

/// An RSA signing key without passphrase, from gpg in a throw-away home directory.
fn make_development_key(dir: &Path, secret: &Path, public: &Path) -> Result<()> {
    fs::create_dir_all(dir)?;
    fs::set_permissions(dir, fs::Permissions::from_mode(0o700))?;
    // gpg-agent's socket lives in the home directory, whose path must stay short.
    let home = std::env::temp_dir().join(format!("vigil-gnupg-{}", std::process::id()));
    fs::create_dir_all(&home)?;
    fs::set_permissions(&home, fs::Permissions::from_mode(0o700))?;
    let gpg = |args: &[&str]| -> Result<Vec<u8>> {
        let output = Command::new("gpg")
            .arg("--homedir")
            .arg(&home)
            .args([
                "--batch",
                "--quiet",
                "--pinentry-mode",
                "loopback",
                "--passphrase",
                "",
            ])
            .args(args)
            .output()
            .context("gpg (package gnupg) is needed to make the development signing key")?;
        if !output.status.success() {
            bail!(
                "gpg {} failed: {}",
                args.join(" "),
                String::from_utf8_lossy(&output.stderr)
            );
        }
        Ok(output.stdout)
    };
    let made = (|| -> Result<()> {
        gpg(&[
            "--quick-gen-key",
            "Vigil development packages (not for production) <vigil@example.org>",
            "rsa3072",
            "sign",
            "never",
        ])?;
        fs::write(secret, gpg(&["--armor", "--export-secret-keys"])?)?;
        fs::set_permissions(secret, fs::Permissions::from_mode(0o600))?;
        fs::write(public, gpg(&["--armor", "--export"])?)?;
        Ok(())
    })();
    let _ = Command::new("gpgconf")
        .arg("--homedir")
        .arg(&home)
        .args(["--kill", "gpg-agent"])
        .status();
    let _ = fs::remove_dir_all(&home);
    made.context("making the development rpm signing key")
}

/// The version of the packaged crates (they inherit the workspace's), from `cargo metadata`.
fn workspace_version(ws: &Workspace) -> Result<String> {
    let mut metadata = tool_cargo(ws);
    metadata.args(["metadata", "--no-deps", "--format-version", "1"]);
    let output = metadata.output().context("could not run cargo metadata")?;
    if !output.status.success() {
        bail!(
            "cargo metadata failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let metadata: serde_json::Value = serde_json::from_slice(&output.stdout)?;
    let versions: Vec<&str> = BINARIES
        .iter()
        .map(|name| {
            metadata["packages"]
                .as_array()
                .and_then(|packages| packages.iter().find(|p| p["name"] == *name))
                .and_then(|p| p["version"].as_str())
                .with_context(|| format!("cargo metadata lists no package {name}"))
        })
        .collect::<Result<_>>()?;
    if versions[0] != versions[1] {
        bail!(
            "vigil-agent is {} but vigil-aggregator is {}: the packages share one version",
            versions[0],
            versions[1]
        );
    }
    Ok(versions[0].to_string())
}

/// cargo-deb, cargo-generate-rpm and umoci, or what to run to get them.
fn check_tools() -> Result<()> {
    let mut missing = Vec::new();
    for subcommand in ["cargo-deb", "cargo-generate-rpm"] {
        let found = shell::find_in_path(subcommand).is_some()
            || shell::cargo_home()
                .is_some_and(|home| shell::is_executable(&home.join("bin").join(subcommand)));
        if !found {
            missing.push(subcommand);
        }
    }
    if !shell::is_executable(Path::new(UMOCI)) && shell::find_in_path("umoci").is_none() {
        missing.push("umoci");
    }
    if !missing.is_empty() {
        bail!(
            "package: {} not found; `cargo xtask setup` installs them (as root), or: \
             cargo install --locked cargo-deb cargo-generate-rpm; apt-get install umoci",
            missing.join(", ")
        );
    }
    Ok(())
}

const UMOCI: &str = "/usr/bin/umoci";

/// `umoci SUBCOMMAND`.
fn umoci(subcommand: &str) -> Command {
    let program = if shell::is_executable(Path::new(UMOCI)) {
        PathBuf::from(UMOCI)
    } else {
        PathBuf::from("umoci")
    };
    let mut command = Command::new(program);
    command.arg(subcommand);
    // As non-root, umoci cannot give unpacked files other owners; rootless mode keeps them as
    // the caller's and records the image's owners instead.
    if !shell::is_root() && matches!(subcommand, "unpack" | "repack") {
        command.arg("--rootless");
    }
    command
}

/// The first entry of each Debian changelog must be this version, or lintian and users see a
/// package whose changelog is about another release.
fn check_changelogs(ws: &Workspace, version: &str) -> Result<()> {
    for binary in BINARIES {
        let path = ws
            .root
            .join("packaging/deb")
            .join(format!("{binary}.changelog"));
        let text =
            fs::read_to_string(&path).with_context(|| format!("cannot read {}", path.display()))?;
        let expected = format!("{binary} ({version}-{REVISION}) ");
        if !text.starts_with(&expected) {
            bail!(
                "{} must start with an entry for this release, `{expected}...`; add one \
                 (the version in Cargo.toml changed)",
                path.display()
            );
        }
    }
    Ok(())
}

/// Removes what an earlier run left, so `target/packages/` holds only this run's artefacts.
fn clean(out: &Path) -> Result<()> {
    for entry in fs::read_dir(out)? {
        let path = entry?.path();
        let name = path
            .file_name()
            .and_then(|name| name.to_str())
            .unwrap_or_default();
        let ours = name.ends_with(".deb")
            || name.ends_with(".rpm")
            || matches!(
                name,
                "vigil-oci" | "stage" | "oci-bundle" | "packages.json" | "RPM-GPG-KEY-vigil-dev"
            );
        if !ours {
            continue;
        }
        if path.is_dir() {
            fs::remove_dir_all(&path)
        } else {
            fs::remove_file(&path)
        }
        .with_context(|| format!("cannot remove {}", path.display()))?;
    }
    Ok(())
}

/// Copies the release binaries into `<stage>/release/` without their debug info.
fn stage_binaries(ws: &Workspace, stage: &Path) -> Result<serde_json::Value> {
    let release = stage.join("release");
    fs::create_dir_all(&release)?;
    let mut staged = serde_json::Map::new();
    for binary in BINARIES {
        let built = ws.target.join("release").join(binary);
        let copy = release.join(binary);
        let mut strip = Command::new("strip");
        strip
            .args([
                "--strip-debug",
                "--strip-unneeded",
                "--remove-section=.comment",
                "-o",
            ])
            .arg(&copy)
            .arg(&built);
        shell::run(&mut strip).context("strip (binutils) is needed to stage the binaries")?;
        fs::set_permissions(&copy, fs::Permissions::from_mode(0o755))?;
        staged.insert(binary.to_string(), json!(copy));
    }
    Ok(serde_json::Value::Object(staged))
}

/// The host cargo for a package tool, without what `cargo run` set for this xtask.
fn tool_cargo(ws: &Workspace) -> Command {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut command = Command::new(cargo);
    shell::scrub_outer_cargo_env(&mut command, ws);
    command.current_dir(&ws.root);
    command
}

/// `vigil-agent` -> `agent` (cargo-generate-rpm's `-p` takes the package's folder).
fn crate_dir_of(binary: &str) -> String {
    binary.trim_start_matches("vigil-").to_string()
}

/// Debian's name of this machine's architecture (`amd64`, `arm64`), as cargo-deb names files.
fn deb_arch() -> Result<&'static str> {
    Ok(match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => bail!("package: no Debian architecture name known for {other}"),
    })
}

fn require_file(path: &Path, tool: &str) -> Result<()> {
    if !path.is_file() {
        bail!("{tool} reported success but {} is missing", path.display());
    }
    Ok(())
}

/// The OCI image: an empty image from umoci, its root filesystem filled with the staged
/// binaries, the libraries they load, default configs and the directories they write, then
/// repacked as one layer with the image config set.
fn build_oci_image(
    ws: &Workspace,
    layout: &Path,
    version: &str,
    staged: &serde_json::Value,
    out: &Path,
) -> Result<()> {
    let image = format!("{}:{version}", layout.display());
    let mut init = umoci("init");
    init.arg("--layout").arg(layout);
    shell::run(&mut init)?;
    let mut new = umoci("new");
    new.args(["--image", &image]);
    shell::run(&mut new)?;
    let bundle = out.join("oci-bundle");
    let mut unpack = umoci("unpack");
    unpack.args(["--image", &image]).arg(&bundle);
    shell::run(&mut unpack)?;

    let rootfs = bundle.join("rootfs");
    fill_rootfs(ws, &rootfs, staged)?;

    let mut repack = umoci("repack");
    repack
        .args(["--image", &image])
        .args(["--history.created_by", "cargo xtask package"])
        .arg(&bundle);
    shell::run(&mut repack)?;

    let mut config = umoci("config");
    config.args([
        "--image",
        &image,
        "--os",
        "linux",
        "--architecture",
        oci_arch()?,
        "--author",
        "Vigil maintainers",
        "--config.workingdir",
        "/",
        "--config.env",
        "PATH=/usr/bin",
    ]);
    // `vigil-agent run` with the shipped config; the Kubernetes manifests give each container
    // its own command.
    for arg in [
        "/usr/bin/vigil-agent",
        "run",
        "--config",
        "/etc/vigil/agent.toml",
    ] {
        config.args(["--config.cmd", arg]);
    }
    for (key, value) in [
        ("org.opencontainers.image.title", "vigil"),
        (
            "org.opencontainers.image.description",
            "Vigil's agent and aggregator: telemetry for GPU model-serving fleets",
        ),
        ("org.opencontainers.image.version", version),
        ("org.opencontainers.image.licenses", "Apache-2.0"),
        (
            "org.opencontainers.image.source",
            "https://example.invalid/vigil",
        ),
    ] {
        config.args(["--config.label", &format!("{key}={value}")]);
    }
    shell::run(&mut config)?;
    let mut gc = umoci("gc");
    gc.arg("--layout").arg(layout);
    shell::run(&mut gc)?;
    fs::remove_dir_all(&bundle).with_context(|| format!("cannot remove {}", bundle.display()))?;
    Ok(())
}

fn oci_arch() -> Result<&'static str> {
    // OCI uses Go's names, which match Debian's for these two.
    deb_arch()
}

fn fill_rootfs(ws: &Workspace, rootfs: &Path, staged: &serde_json::Value) -> Result<()> {
    let usr_bin = rootfs.join("usr/bin");
    fs::create_dir_all(&usr_bin)?;
    let mut libraries = Vec::new();
    for binary in BINARIES {
        let source = PathBuf::from(
            staged[binary]
                .as_str()
                .context("staged binary path missing")?,
        );
        let target = usr_bin.join(binary);
        fs::copy(&source, &target)
            .with_context(|| format!("cannot copy {} into the image", source.display()))?;
        fs::set_permissions(&target, fs::Permissions::from_mode(0o755))?;
        for library in shared_libraries(&source)? {
            if !libraries.contains(&library) {
                libraries.push(library);
            }
        }
    }
    // NVML (libnvidia-ml.so.1, which the NVIDIA container toolkit mounts into the container at
    // run time) links glibc's compatibility stubs, which our binaries do not: ship them beside
    // libc so it loads.
    let libc_dir = libraries
        .iter()
        .find(|library| library.file_name().is_some_and(|name| name == "libc.so.6"))
        .and_then(|libc| libc.parent())
        .map(Path::to_path_buf)
        .context("ldd lists no libc.so.6: the binaries are not linked against glibc")?;
    for stub in NVML_GLIBC_LIBRARIES {
        let library = libc_dir.join(stub);
        if !library.exists() {
            bail!(
                "{} not found (NVML needs it in the image)",
                library.display()
            );
        }
        if !libraries.contains(&library) {
            libraries.push(library);
        }
    }
    // The same paths as on the build host, where the binaries' interpreter and the dynamic
    // loader's default search path point. The NVIDIA container toolkit adds NVML beside them.
    for library in &libraries {
        let relative = library.strip_prefix("/").unwrap_or(library);
        let target = rootfs.join(relative);
        fs::create_dir_all(target.parent().expect("a library path has a folder"))?;
        fs::copy(library, &target)
            .with_context(|| format!("cannot copy {} into the image", library.display()))?;
    }

    let etc = rootfs.join("etc");
    fs::create_dir_all(etc.join("vigil"))?;
    for config in ["agent.toml", "aggregator.toml"] {
        fs::copy(
            ws.root.join("packaging/config").join(config),
            etc.join("vigil").join(config),
        )?;
    }
    // Names for the two users the containers run as (root for the agent).
    let uid = IMAGE_AGGREGATOR_UID;
    fs::write(
        etc.join("passwd"),
        format!(
            "root:x:0:0:root:/root:/sbin/nologin\n\
             vigil-aggregator:x:{uid}:{uid}:Vigil aggregator:/var/lib/vigil-aggregator:/sbin/nologin\n"
        ),
    )?;
    fs::write(
        etc.join("group"),
        format!("root:x:0:\nvigil-aggregator:x:{uid}:\n"),
    )?;

    let directory = |path: &str, mode: u32| -> Result<PathBuf> {
        let dir = rootfs.join(path);
        fs::create_dir_all(&dir)?;
        fs::set_permissions(&dir, fs::Permissions::from_mode(mode))?;
        Ok(dir)
    };
    directory("tmp", 0o1777)?;
    directory("var/lib/vigil/spool", 0o700)?;
    let data = directory("var/lib/vigil-aggregator", 0o750)?;
    if shell::is_root() {
        std::os::unix::fs::chown(&data, Some(uid), Some(uid))
            .with_context(|| format!("cannot chown {}", data.display()))?;
    }
    Ok(())
}

/// The shared libraries `binary` loads, with its ELF interpreter, as `ldd` resolves them.
fn shared_libraries(binary: &Path) -> Result<Vec<PathBuf>> {
    let output = Command::new("ldd")
        .arg(binary)
        .output()
        .context("ldd is needed to find the libraries the image must hold")?;
    if !output.status.success() {
        bail!(
            "ldd {} failed: {}",
            binary.display(),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    parse_ldd(&String::from_utf8_lossy(&output.stdout))
}

/// Paths from `ldd` output lines: `libc.so.6 => /lib/.../libc.so.6 (0x...)` and the
/// interpreter's `/lib64/ld-linux-x86-64.so.2 (0x...)`; the kernel's vDSO has no file.
fn parse_ldd(text: &str) -> Result<Vec<PathBuf>> {
    let mut libraries = Vec::new();
    for line in text.lines().map(str::trim).filter(|line| !line.is_empty()) {
        if line.contains("not found") {
            bail!("a library of the binary is missing: {line}");
        }
        let path = match line.split_once("=>") {
            Some((_, rest)) => rest.split_whitespace().next(),
            None => line.split_whitespace().next(),
        };
        match path {
            Some(path) if path.starts_with('/') => libraries.push(PathBuf::from(path)),
            _ => {} // linux-vdso.so.1 and the like
        }
    }
    Ok(libraries)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ldd_output_gives_the_libraries_and_the_interpreter_but_not_the_vdso() {
        let text = "\tlinux-vdso.so.1 (0x00007ffd)\n\
                    \tlibgcc_s.so.1 => /lib/x86_64-linux-gnu/libgcc_s.so.1 (0x00007f1)\n\
                    \tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f2)\n\
                    \t/lib64/ld-linux-x86-64.so.2 (0x00007f3)\n";
        assert_eq!(
            parse_ldd(text).unwrap(),
            [
                PathBuf::from("/lib/x86_64-linux-gnu/libgcc_s.so.1"),
                PathBuf::from("/lib/x86_64-linux-gnu/libc.so.6"),
                PathBuf::from("/lib64/ld-linux-x86-64.so.2"),
            ]
        );
        let missing = "\tlibfoo.so.1 => not found\n";
        assert!(
            parse_ldd(missing)
                .unwrap_err()
                .to_string()
                .contains("libfoo")
        );
    }

    #[test]
    fn rpm_package_folders_follow_the_binary_names() {
        assert_eq!(crate_dir_of("vigil-agent"), "agent");
        assert_eq!(crate_dir_of("vigil-aggregator"), "aggregator");
    }
}
