//! What `cargo xtask package` ships, checked the way users meet it:
//!
//! - the .debs install with `dpkg -i`, both binaries run from the installed paths (the agent
//!   takes a snapshot with the installed config, the aggregator starts as its own user on its
//!   data directory), the units pass `systemd-analyze verify`, nothing is enabled, a changed
//!   config survives reinstalling, and `dpkg --purge` removes it all;
//! - lintian finds no errors in the debs and rpmlint none in the rpms, whose config files,
//!   scriptlets and payload are what they should be;
//! - every Kubernetes manifest validates offline against the API schemas
//!   (`kubernetes-validate --strict`), with the least-privilege settings the agent relies on and
//!   configs the binaries accept;
//! - the OCI image unpacks with umoci and its binaries run from its root filesystem;
//! - every query of the Grafana dashboards returns data from the shipped aggregator config fed
//!   by a real `vigil-agent run` (with the NVML stand-in, so the GPU panels have data too).
//!
//! `cargo xtask package` runs once per test binary (it builds the release binaries, so the
//! first test takes minutes); an exclusive file lock serializes it with other test processes,
//! and a shared one keeps its outputs in place while this process uses them. Runs as root
//! (dpkg, chroot, the agent's eBPF probes), like the rest of the suite; it installs and then
//! purges the vigil-agent and vigil-aggregator packages of the machine it runs on, so run it
//! on test machines, not on a host that has Vigil installed.

use std::{
    collections::BTreeMap,
    io::{BufRead, BufReader, Read, Write},
    net::{SocketAddr, TcpStream},
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
    process::{Child, ChildStdin, Command, Output, Stdio},
    sync::OnceLock,
    time::{Duration, Instant},
};

use serde_json::{Value, json};

const BINARIES: [&str; 2] = ["vigil-agent", "vigil-aggregator"];
const KUBERNETES_VALIDATE: &str = "tools/kubernetes-validate/bin/kubernetes-validate";
/// The oldest Kubernetes the manifests are checked against, besides kubernetes-validate's
/// newest.
const OLDEST_KUBERNETES: &str = "1.29.0";

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ is one level below the workspace root")
        .to_path_buf()
}

fn target_dir() -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) if !dir.is_empty() => workspace_root().join(dir),
        _ => workspace_root().join("target"),
    }
}

/// What `cargo xtask package` wrote (its `target/packages/packages.json`).
struct Packages {
    version: String,
    binaries: BTreeMap<String, PathBuf>,
    deb: BTreeMap<String, PathBuf>,
    rpm: BTreeMap<String, PathBuf>,
    /// The public key of the development key the rpms are signed with.
    rpm_public_key: PathBuf,
    oci_layout: PathBuf,
    oci_tag: String,
    /// Holds a shared lock on `target/packages.lock` for the life of the process.
    _lock: std::fs::File,
}

fn packages() -> &'static Packages {
    static PACKAGES: OnceLock<Packages> = OnceLock::new();
    PACKAGES.get_or_init(build_packages)
}

fn flock(file: &std::fs::File, operation: i32) {
    use std::os::fd::AsRawFd;
    // SAFETY: flock on a file descriptor we own.
    let rc = unsafe { libc::flock(file.as_raw_fd(), operation) };
    assert_eq!(rc, 0, "flock: {}", std::io::Error::last_os_error());
}

fn build_packages() -> Packages {
    assert!(
        unsafe { libc::geteuid() } == 0,
        "the packaging tests install packages and chroot: run them as root"
    );
    std::fs::create_dir_all(target_dir()).unwrap();
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(target_dir().join("packages.lock"))
        .unwrap();
    flock(&lock, libc::LOCK_EX);
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let started = Instant::now();
    let output = Command::new(cargo)
        .current_dir(workspace_root())
        .args(["run", "--quiet", "-p", "xtask", "--", "package"])
        .stdin(Stdio::null())
        .output()
        .expect("run cargo xtask package");
    assert!(
        output.status.success(),
        "cargo xtask package failed ({}):\n{}",
        output.status,
        tail(&output.stderr, 6000)
    );
    eprintln!(
        "cargo xtask package took {:.0} s",
        started.elapsed().as_secs_f64()
    );
    // Keep the outputs in place while this process uses them; another process packaging
    // waits for the exclusive lock until we exit.
    flock(&lock, libc::LOCK_SH);

    let manifest = target_dir().join("packages/packages.json");
    let manifest: Value = serde_json::from_str(&std::fs::read_to_string(&manifest).unwrap())
        .expect("packages.json is JSON");
    let paths = |key: &str| -> BTreeMap<String, PathBuf> {
        BINARIES
            .iter()
            .map(|binary| {
                let path = PathBuf::from(
                    manifest[key][binary]
                        .as_str()
                        .unwrap_or_else(|| panic!("packages.json has no {key}.{binary}")),
                );
                assert!(path.is_file(), "{} is missing", path.display());
                (binary.to_string(), path)
            })
            .collect()
    };
    Packages {
        version: manifest["version"].as_str().unwrap().to_string(),
        binaries: paths("binaries"),
        deb: paths("deb"),
        rpm: paths("rpm"),
        rpm_public_key: PathBuf::from(
            manifest["rpm_signing_key"]["public"].as_str().expect(
                "the rpms are signed with the development key (VIGIL_RPM_SIGNING_KEY unset)",
            ),
        ),
        oci_layout: PathBuf::from(manifest["oci"]["layout"].as_str().unwrap()),
        oci_tag: manifest["oci"]["tag"].as_str().unwrap().to_string(),
        _lock: lock,
    }
}

fn tail(bytes: &[u8], max: usize) -> String {
    let text = String::from_utf8_lossy(bytes);
    let start = text.len().saturating_sub(max);
    let start = (start..text.len())
        .find(|&i| text.is_char_boundary(i))
        .unwrap_or(text.len());
    text[start..].to_string()
}

/// Runs `program args`; panics with its output unless it exits 0.
fn run(program: impl AsRef<std::ffi::OsStr>, args: &[&str]) -> Output {
    let program = program.as_ref();
    let output = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", program.to_string_lossy()));
    assert!(
        output.status.success(),
        "`{} {}` failed ({}):\nstdout: {}\nstderr: {}",
        program.to_string_lossy(),
        args.join(" "),
        output.status,
        tail(&output.stdout, 4000),
        tail(&output.stderr, 4000)
    );
    output
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn path_str(path: &Path) -> &str {
    path.to_str().expect("UTF-8 path")
}

// ---- deb ----

/// Removes the packages, and what a purge removes, whatever state a failed run left.
fn purge_debs() {
    run("dpkg", &["--purge", "vigil-agent", "vigil-aggregator"]);
}

#[test]
fn debs_install_run_verify_and_purge() {
    let packages = packages();
    purge_debs();
    let debs: Vec<&str> = BINARIES
        .iter()
        .map(|b| path_str(&packages.deb[*b]))
        .collect();
    let mut install = vec!["-i"];
    install.extend(&debs);
    run("dpkg", &install);

    // Both binaries from the installed paths.
    for binary in BINARIES {
        let version = stdout(&run(format!("/usr/bin/{binary}"), &["--version"]));
        assert_eq!(version.trim(), format!("{binary} {}", packages.version));
    }

    // A short snapshot with the installed default config.
    let snapshot = run(
        "/usr/bin/vigil-agent",
        &[
            "snapshot",
            "--config",
            "/etc/vigil/agent.toml",
            "--duration",
            "1s",
            "--format",
            "json",
        ],
    );
    let snapshot: Value = serde_json::from_slice(&snapshot.stdout).expect("snapshot is JSON");
    assert!(!snapshot["node"].as_str().unwrap_or_default().is_empty());
    for collector in ["syscalls", "gpu", "process", "host"] {
        assert!(
            snapshot["collectors"][collector]["status"].is_string(),
            "collector {collector} missing from {}",
            snapshot["collectors"]
        );
    }
    assert_eq!(snapshot["collectors"]["host"]["status"], "ok");
    assert!(
        snapshot["samples"].as_array().is_some_and(|samples| samples
            .iter()
            .any(|s| s["name"] == "vigil_host_uptime_seconds")),
        "the snapshot has host samples"
    );

    // The system user, the directories and their owners.
    let passwd = stdout(&run("getent", &["passwd", "vigil-aggregator"]));
    let fields: Vec<&str> = passwd.trim().split(':').collect();
    assert_eq!(fields.len(), 7, "{passwd}");
    assert_eq!(fields[5], "/var/lib/vigil-aggregator");
    assert_eq!(fields[6], "/usr/sbin/nologin");
    let uid: u32 = fields[2].parse().unwrap();
    assert!(uid != 0 && uid < 1000, "a system uid, not {uid}");
    let data = std::fs::metadata("/var/lib/vigil-aggregator").unwrap();
    assert_eq!(data.uid(), uid);
    assert_eq!(data.mode() & 0o7777, 0o750);
    let spool = std::fs::metadata("/var/lib/vigil/spool").unwrap();
    assert_eq!((spool.uid(), spool.mode() & 0o7777), (0, 0o700));

    // The aggregator starts with the installed config, as its user, on its data directory.
    let logs = tempfile::tempdir().unwrap();
    let (log, log_handle) = log_file(logs.path(), "aggregator.log");
    let mut aggregator = Command::new("setpriv")
        .args([
            "--reuid=vigil-aggregator",
            "--regid=vigil-aggregator",
            "--clear-groups",
            "--inh-caps=-all",
            "--bounding-set=-all",
            "/usr/bin/vigil-aggregator",
            "--config",
            "/etc/vigil/aggregator.toml",
            "--grpc-listen",
            "127.0.0.1:0",
            "--http-listen",
            "127.0.0.1:0",
        ])
        .stdout(Stdio::piped())
        .stderr(log_handle)
        .spawn()
        .expect("start the installed aggregator");
    let addresses = listening_addresses(&mut aggregator, &log);
    assert_eq!(
        http_get(addresses.http, "/-/healthy").map(|(status, _)| status),
        Ok(200)
    );
    stop(aggregator);
    assert!(
        Path::new("/var/lib/vigil-aggregator/wal").is_dir(),
        "the aggregator wrote its WAL under its data directory"
    );

    // Config files are conffiles, kept across a reinstall when changed.
    for (package, config) in [
        ("vigil-agent", "/etc/vigil/agent.toml"),
        ("vigil-aggregator", "/etc/vigil/aggregator.toml"),
    ] {
        let conffiles = stdout(&run("dpkg-query", &["-W", "-f=${Conffiles}", package]));
        assert!(conffiles.contains(config), "{package}: {conffiles}");
    }
    let mut changed = std::fs::read_to_string("/etc/vigil/agent.toml").unwrap();
    changed.push_str("# changed by the packaging test\n");
    std::fs::write("/etc/vigil/agent.toml", &changed).unwrap();
    run("dpkg", &install);
    assert_eq!(
        std::fs::read_to_string("/etc/vigil/agent.toml").unwrap(),
        changed
    );

    // The units: valid, hardened, installed but neither enabled nor started.
    for binary in BINARIES {
        let unit = format!("/usr/lib/systemd/system/{binary}.service");
        let verify = Command::new("systemd-analyze")
            .args(["verify", &unit])
            .output()
            .expect("systemd-analyze is installed (package systemd)");
        let said = format!(
            "{}{}",
            String::from_utf8_lossy(&verify.stdout),
            String::from_utf8_lossy(&verify.stderr)
        );
        assert!(
            verify.status.success() && said.trim().is_empty(),
            "systemd-analyze verify {unit}: {}\n{said}",
            verify.status
        );
        for wants in [
            "/etc/systemd/system/multi-user.target.wants",
            "/usr/lib/systemd/system/multi-user.target.wants",
        ] {
            assert!(
                !Path::new(wants).join(format!("{binary}.service")).exists(),
                "{binary} must not be enabled on install"
            );
        }
        let text = std::fs::read_to_string(&unit).unwrap();
        for setting in [
            "NoNewPrivileges=yes",
            "ProtectSystem=strict",
            "CapabilityBoundingSet=",
        ] {
            assert!(text.contains(setting), "{unit} lacks {setting}");
        }
    }
    let agent_unit =
        std::fs::read_to_string("/usr/lib/systemd/system/vigil-agent.service").unwrap();
    assert!(agent_unit.contains(
        "CapabilityBoundingSet=CAP_BPF CAP_PERFMON CAP_SYS_RESOURCE CAP_SYS_PTRACE \
         CAP_DAC_READ_SEARCH\n"
    ));
    assert!(!agent_unit.contains("PrivateDevices=yes"));
    let aggregator_unit =
        std::fs::read_to_string("/usr/lib/systemd/system/vigil-aggregator.service").unwrap();
    assert!(aggregator_unit.contains("User=vigil-aggregator\n"));
    assert!(aggregator_unit.contains("CapabilityBoundingSet=\n"));

    purge_debs();
    for gone in [
        "/usr/bin/vigil-agent",
        "/usr/bin/vigil-aggregator",
        "/etc/vigil/agent.toml",
        "/etc/vigil/aggregator.toml",
        "/usr/lib/systemd/system/vigil-agent.service",
        "/var/lib/vigil-aggregator",
        "/var/lib/vigil/spool",
    ] {
        assert!(!Path::new(gone).exists(), "{gone} survived the purge");
    }
}

#[test]
fn lintian_finds_no_errors_in_the_debs() {
    // The only overrides shipped are lintian's embedded-library for Rust translations compiled
    // into the binary (packaging/deb/*.lintian-overrides says which and why); nothing else may
    // be silenced that way.
    for entry in std::fs::read_dir(workspace_root().join("packaging/deb")).unwrap() {
        let path = entry.unwrap().path();
        if path
            .extension()
            .is_none_or(|ext| ext != "lintian-overrides")
        {
            continue;
        }
        let text = std::fs::read_to_string(&path).unwrap();
        for line in text
            .lines()
            .filter(|l| !l.trim().is_empty() && !l.starts_with('#'))
        {
            assert!(
                line.contains(": embedded-library "),
                "{}: only embedded-library may be overridden, not {line}",
                path.display()
            );
        }
    }
    let packages = packages();
    for binary in BINARIES {
        let deb = &packages.deb[binary];
        let output = Command::new("/usr/bin/lintian")
            .args(["--tag-display-limit", "0"])
            .arg(deb)
            .output()
            .expect("lintian is installed (cargo xtask setup)");
        let said = stdout(&output);
        let errors: Vec<&str> = said.lines().filter(|l| l.starts_with("E: ")).collect();
        eprintln!("lintian {}:\n{said}", deb.display());
        assert!(
            errors.is_empty(),
            "lintian errors in {}:\n{}",
            deb.display(),
            errors.join("\n")
        );
        // lintian exits 0 without errors (its default --fail-on is error); anything else means
        // it did not check the package.
        assert!(
            output.status.success(),
            "lintian failed ({}): {}",
            output.status,
            tail(&output.stderr, 2000)
        );
    }
}

/// Errors rpmlint reports for header tags cargo-generate-rpm cannot write; filtered by
/// packaging/rpm/rpmlint.toml, and the only errors allowed without it.
const RPMLINT_FILTERED: [&str; 4] = [
    "no-packager-tag",
    "no-group-tag",
    "no-buildhost-tag",
    "no-changelogname-tag",
];

/// rpmlint's output and its error count.
fn rpmlint(home: &Path, config: Option<&Path>, rpm: &str) -> (String, u64) {
    let mut command = Command::new("/usr/bin/rpmlint");
    // Its signature check runs `rpm -Kv`, which reads the keyring named in ~/.rpmmacros.
    command.env("HOME", home);
    if let Some(config) = config {
        command.arg("-c").arg(config);
    }
    let output = command
        .arg(rpm)
        .output()
        .expect("rpmlint is installed (cargo xtask setup)");
    let said = stdout(&output);
    let summary = said
        .lines()
        .find(|line| line.contains("packages and") && line.contains("errors"))
        .unwrap_or_else(|| {
            panic!(
                "no rpmlint summary in:\n{said}{}",
                tail(&output.stderr, 2000)
            )
        });
    let errors = summary
        .split(';')
        .nth(1)
        .and_then(|part| part.split_whitespace().next())
        .and_then(|count| count.parse().ok())
        .unwrap_or_else(|| panic!("cannot read the error count of {summary:?}"));
    (said, errors)
}

#[test]
fn rpmlint_finds_no_errors_and_the_rpms_hold_what_they_should() {
    let packages = packages();
    // A keyring holding the signing key, as a user's after `rpm --import`.
    let home = tempfile::tempdir().unwrap();
    let rpmdb = home.path().join("rpmdb");
    std::fs::write(
        home.path().join(".rpmmacros"),
        format!("%_dbpath {}\n", rpmdb.display()),
    )
    .unwrap();
    run(
        "rpm",
        &[
            "--dbpath",
            path_str(&rpmdb),
            "--import",
            path_str(&packages.rpm_public_key),
        ],
    );
    let config = workspace_root().join("packaging/rpm/rpmlint.toml");
    for binary in BINARIES {
        let rpm = path_str(&packages.rpm[binary]);
        let checked = stdout(&run("rpm", &["--dbpath", path_str(&rpmdb), "-K", rpm]));
        assert!(
            checked.trim_end().ends_with("digests signatures OK"),
            "{checked}"
        );

        let (said, errors) = rpmlint(home.path(), Some(&config), rpm);
        eprintln!("rpmlint {rpm}:\n{said}");
        assert_eq!(errors, 0, "rpmlint errors in {rpm}:\n{said}");
        // Without the filters, the only errors are the header tags they name.
        let (unfiltered, _) = rpmlint(home.path(), None, rpm);
        for line in unfiltered.lines().filter(|line| line.contains(": E: ")) {
            assert!(
                RPMLINT_FILTERED
                    .iter()
                    .any(|tag| line.trim_end().ends_with(&format!(" {tag}"))),
                "rpmlint error the config must not hide: {line}"
            );
        }

        let config = format!("/etc/vigil/{}.toml", binary.trim_start_matches("vigil-"));
        let flags = stdout(&run(
            "rpm",
            &["-qp", "--qf", "[%{FILENAMES} %{FILEFLAGS:fflags}\\n]", rpm],
        ));
        assert!(
            flags.lines().any(|line| line == format!("{config} cn")),
            "{config} is a %config(noreplace) file:\n{flags}"
        );
        let files = stdout(&run("rpm", &["-qlp", rpm]));
        for file in [
            format!("/usr/bin/{binary}"),
            format!("/usr/lib/systemd/system/{binary}.service"),
        ] {
            assert!(files.lines().any(|line| line == file), "{file}:\n{files}");
        }
        let scripts = stdout(&run("rpm", &["-qp", "--scripts", rpm]));
        assert!(scripts.contains("systemctl daemon-reload"), "{scripts}");
        assert!(!scripts.contains("enable --now"), "{scripts}");
        if binary == "vigil-aggregator" {
            assert!(scripts.contains("useradd -r"), "{scripts}");
        } else {
            assert!(
                scripts.contains("install -d -m 0700 -o root -g root /var/lib/vigil/spool"),
                "{scripts}"
            );
        }

        // The payload installs into a scratch root, and the binary in it runs. (Debian's rpm
        // refuses to install without --force-debian; other distributions' rpm lacks the flag.)
        let root = tempfile::tempdir().unwrap();
        let mut install = vec![
            "--root",
            path_str(root.path()),
            "-i",
            "--nodeps",
            "--noscripts",
        ];
        if stdout(&run("rpm", &["--help"])).contains("--force-debian") {
            install.push("--force-debian");
        }
        install.push(rpm);
        run("rpm", &install);
        let installed = root.path().join("usr/bin").join(binary);
        let version = stdout(&run(&installed, &["--version"]));
        assert_eq!(version.trim(), format!("{binary} {}", packages.version));
    }
}

// ---- Kubernetes ----

fn manifests() -> Vec<PathBuf> {
    let dir = workspace_root().join("packaging/kubernetes");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "yaml"))
        .collect();
    files.sort();
    assert!(
        files.len() >= 5,
        "manifests in {}: {files:?}",
        dir.display()
    );
    files
}

fn kubernetes_validate(args: &[&str], files: &[PathBuf]) -> Output {
    let program = target_dir().join(KUBERNETES_VALIDATE);
    Command::new(&program)
        .args(args)
        .args(files)
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "cannot run {} ({e}); `cargo xtask setup` installs it",
                program.display()
            )
        })
}

/// Every document of the YAML files, as JSON (the YAML parser of kubernetes-validate's venv).
fn documents(files: &[PathBuf]) -> Vec<Value> {
    let python = target_dir().join("tools/kubernetes-validate/bin/python");
    let script = "import json, sys, yaml\n\
                  docs = []\n\
                  for name in sys.argv[1:]:\n\
                  \x20   with open(name) as f:\n\
                  \x20       docs.extend(d for d in yaml.safe_load_all(f) if d is not None)\n\
                  print(json.dumps(docs))\n";
    let output = Command::new(python)
        .arg("-c")
        .arg(script)
        .args(files)
        .output()
        .expect("kubernetes-validate's python");
    assert!(output.status.success(), "{}", tail(&output.stderr, 2000));
    serde_json::from_slice::<Vec<Value>>(&output.stdout).unwrap()
}

fn find<'a>(docs: &'a [Value], kind: &str, name: &str) -> &'a Value {
    docs.iter()
        .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name} in packaging/kubernetes"))
}

fn mount<'a>(container: &'a Value, path: &str) -> &'a Value {
    container["volumeMounts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["mountPath"] == path)
        .unwrap_or_else(|| panic!("no mount at {path}"))
}

fn volume<'a>(pod: &'a Value, name: &Value) -> &'a Value {
    pod["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| &v["name"] == name)
        .unwrap_or_else(|| panic!("no volume {name}"))
}

#[test]
fn kubernetes_manifests_validate_offline_with_least_privilege() {
    let files = manifests();
    for version in [None, Some(OLDEST_KUBERNETES)] {
        let mut args = vec!["--strict"];
        if let Some(version) = version {
            args.extend(["-k", version]);
        }
        let output = kubernetes_validate(&args, &files);
        let said = format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        assert!(
            output.status.success(),
            "kubernetes-validate {args:?}:\n{said}"
        );
        let passed = said.lines().filter(|l| l.contains(" passed ")).count();
        let docs = documents(&files).len();
        assert_eq!(passed, docs, "every resource passed:\n{said}");
    }
    // The validator is strict: a misspelt field fails.
    let dir = tempfile::tempdir().unwrap();
    let daemonset = workspace_root().join("packaging/kubernetes/11-agent-daemonset.yaml");
    let broken = std::fs::read_to_string(&daemonset)
        .unwrap()
        .replace("hostPID: true", "hostPid: true");
    let broken_file = dir.path().join("broken.yaml");
    std::fs::write(&broken_file, broken).unwrap();
    assert!(
        !kubernetes_validate(&["--strict"], &[broken_file])
            .status
            .success(),
        "kubernetes-validate accepted a misspelt field"
    );

    let docs = documents(&files);
    // The agent: host PID namespace, capabilities instead of privileged, read-only host mounts.
    let daemonset = find(&docs, "DaemonSet", "vigil-agent");
    let pod = &daemonset["spec"]["template"]["spec"];
    assert_eq!(pod["hostPID"], true);
    assert!(
        pod["nodeSelector"]
            .as_object()
            .is_some_and(|s| !s.is_empty())
    );
    assert!(pod["tolerations"].as_array().is_some_and(|t| !t.is_empty()));
    find(
        &docs,
        "PriorityClass",
        pod["priorityClassName"].as_str().unwrap(),
    );
    find(
        &docs,
        "ServiceAccount",
        pod["serviceAccountName"].as_str().unwrap(),
    );
    let container = &pod["containers"][0];
    let security = &container["securityContext"];
    assert_ne!(security["privileged"], true);
    assert_eq!(security["allowPrivilegeEscalation"], false);
    assert_eq!(security["readOnlyRootFilesystem"], true);
    assert_eq!(security["capabilities"]["drop"], json!(["ALL"]));
    assert_eq!(
        security["capabilities"]["add"],
        json!([
            "BPF",
            "PERFMON",
            "SYS_RESOURCE",
            "SYS_PTRACE",
            "DAC_READ_SEARCH"
        ])
    );
    for (path, host_path) in [
        ("/sys/kernel/btf", "/sys/kernel/btf"),
        ("/host/proc", "/proc"),
        ("/host/sys/fs/cgroup", "/sys/fs/cgroup"),
    ] {
        let mount = mount(container, path);
        assert_eq!(mount["readOnly"], true, "{path} is mounted read-only");
        assert_eq!(volume(pod, &mount["name"])["hostPath"]["path"], host_path);
    }
    let spool = mount(container, "/var/lib/vigil/spool");
    assert_ne!(spool["readOnly"], true);
    assert!(volume(pod, &spool["name"])["hostPath"].is_object());
    let env: BTreeMap<&str, &Value> = container["env"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| (e["name"].as_str().unwrap(), &e["value"]))
        .collect();
    assert_eq!(env["NVIDIA_VISIBLE_DEVICES"], "all");
    assert_eq!(env["NVIDIA_DRIVER_CAPABILITIES"], "utility");
    for probe in ["livenessProbe", "readinessProbe"] {
        assert!(container[probe].is_object(), "agent {probe}");
    }
    for kind in ["requests", "limits"] {
        assert!(container["resources"][kind]["memory"].is_string());
    }
    // RBAC: listing pods, nothing more.
    let role = find(&docs, "ClusterRole", "vigil-agent-pod-reader");
    assert_eq!(
        role["rules"],
        json!([{"apiGroups": [""], "resources": ["pods"], "verbs": ["list"]}])
    );
    // The aggregator: non-root with its data on a claim.
    let statefulset = find(&docs, "StatefulSet", "vigil-aggregator");
    assert_eq!(
        statefulset["spec"]["template"]["spec"]["securityContext"]["runAsNonRoot"],
        true
    );
    assert!(statefulset["spec"]["volumeClaimTemplates"][0]["spec"].is_object());
    find(&docs, "Service", "vigil-aggregator");
    find(&docs, "NetworkPolicy", "vigil-aggregator");
    find(&docs, "Secret", "vigil-aggregator-tokens");

    // The embedded configs are ones the binaries accept.
    let dir = tempfile::tempdir().unwrap();
    let agent_toml = find(&docs, "ConfigMap", "vigil-agent-config")["data"]["agent.toml"]
        .as_str()
        .unwrap();
    let agent_path = dir.path().join("agent.toml");
    std::fs::write(&agent_path, agent_toml).unwrap();
    let agent = vigil_agent::config::AgentConfig::from_file(&agent_path)
        .expect("the DaemonSet's agent.toml parses");
    agent
        .transport
        .validate()
        .expect("the DaemonSet's [transport] is complete");
    assert_eq!(
        agent.transport.ca_file.as_deref(),
        Some(Path::new("/etc/vigil/tls/ca.crt"))
    );
    let aggregator_toml =
        find(&docs, "ConfigMap", "vigil-aggregator-config")["data"]["aggregator.toml"]
            .as_str()
            .unwrap();
    let aggregator = vigil_aggregator::config::AggregatorConfig::parse(aggregator_toml)
        .expect("the StatefulSet's aggregator.toml parses");
    assert!(!aggregator.tls.plaintext && aggregator.tls.cert_file.is_some());
    assert!(aggregator.auth.tokens_file.is_some());
}

// ---- OCI image ----

#[test]
fn the_oci_image_unpacks_and_its_binaries_run_from_its_root_filesystem() {
    let packages = packages();
    let dir = tempfile::tempdir().unwrap();
    let bundle = dir.path().join("bundle");
    let image = format!("{}:{}", packages.oci_layout.display(), packages.oci_tag);
    run(
        "/usr/bin/umoci",
        &["unpack", "--image", &image, path_str(&bundle)],
    );
    let rootfs = bundle.join("rootfs");
    let config: Value =
        serde_json::from_str(&std::fs::read_to_string(bundle.join("config.json")).unwrap())
            .unwrap();
    assert_eq!(
        config["process"]["args"],
        json!([
            "/usr/bin/vigil-agent",
            "run",
            "--config",
            "/etc/vigil/agent.toml"
        ])
    );
    // A small image: the two binaries and the few libraries they load, no distribution.
    let size = directory_size(&rootfs);
    assert!(
        size < 200 << 20,
        "the image's root filesystem is {size} bytes"
    );

    for binary in BINARIES {
        let version = stdout(&run(
            "chroot",
            &[
                path_str(&rootfs),
                &format!("/usr/bin/{binary}"),
                "--version",
            ],
        ));
        assert_eq!(version.trim(), format!("{binary} {}", packages.version));
    }
    // NVML's glibc dependencies are in the image, beside libc.
    for stub in ["libdl.so.2", "libpthread.so.0", "librt.so.1"] {
        assert!(
            rootfs.join("lib/x86_64-linux-gnu").join(stub).exists()
                || rootfs.join("usr/lib/x86_64-linux-gnu").join(stub).exists(),
            "{stub} is missing from the image"
        );
    }

    // The agent inside the image, with the host's /proc and /sys as a container runtime would
    // mount them (in a mount namespace of its own, so nothing outlives the command), takes a
    // snapshot with every collector working: eBPF, host, process, and GPU through the NVML
    // stand-in loaded by the image's own C library.
    std::fs::create_dir_all(rootfs.join("proc")).unwrap();
    std::fs::create_dir_all(rootfs.join("sys")).unwrap();
    let nvml = rootfs.join("tmp/nvml");
    std::fs::create_dir_all(&nvml).unwrap();
    std::fs::copy(fake_nvml_library(), nvml.join("libnvidia-ml.so.1")).unwrap();
    std::fs::write(
        nvml.join("fake-nvml-scenario.json"),
        json!({"devices": [{"uuid": "GPU-5a1c0d3e-0000-4000-8000-0000000000c1",
            "name": "NVIDIA H100 80GB HBM3", "pci_bus_id": "00000000:17:00.0",
            "memory_total_bytes": 85_520_809_984_u64,
            "timeline": [{"at_s": 0, "gpu_util": 50, "memory_used_bytes": 1_000_000_000_u64}],
            "nvlinks": [{"active": true, "replay_errors": 0, "recovery_errors": 0,
                "crc_flit_errors": 0, "crc_data_errors": 0}]}]})
        .to_string(),
    )
    .unwrap();
    let root = path_str(&rootfs);
    let script = format!(
        "mount --bind /proc {root}/proc && mount --rbind /sys {root}/sys && \
         exec chroot {root} /usr/bin/vigil-agent snapshot --config /etc/vigil/agent.toml \
         --duration 1s --format json --nvml-library /tmp/nvml/libnvidia-ml.so.1"
    );
    let snapshot = run("unshare", &["--mount", "--fork", "sh", "-c", &script]);
    let snapshot: Value = serde_json::from_slice(&snapshot.stdout).expect("snapshot is JSON");
    for collector in ["syscalls", "gpu", "process", "host"] {
        assert_eq!(
            snapshot["collectors"][collector]["status"], "ok",
            "{collector} in the image: {}",
            snapshot["collectors"]
        );
    }
    assert!(
        snapshot["samples"]
            .as_array()
            .unwrap()
            .iter()
            .any(|s| s["name"] == "vigil_gpu_utilization_ratio"),
        "GPU samples from NVML loaded inside the image"
    );

    // The aggregator inside the image serves, with the image's default config.
    let mut aggregator = Command::new("chroot")
        .args([
            path_str(&rootfs),
            "/usr/bin/vigil-aggregator",
            "--config",
            "/etc/vigil/aggregator.toml",
            "--data-dir",
            "/tmp/data",
            "--grpc-listen",
            "127.0.0.1:0",
            "--http-listen",
            "127.0.0.1:0",
        ])
        .stdout(Stdio::piped())
        .stderr(log_file(dir.path(), "aggregator.log").1)
        .spawn()
        .unwrap();
    let addresses = listening_addresses(&mut aggregator, &dir.path().join("aggregator.log"));
    assert_eq!(
        http_get(addresses.http, "/-/ready").map(|(status, _)| status),
        Ok(200)
    );
    stop(aggregator);
    assert!(rootfs.join("tmp/data/wal").is_dir());
}

fn directory_size(dir: &Path) -> u64 {
    let mut total = 0;
    for entry in std::fs::read_dir(dir).unwrap() {
        let entry = entry.unwrap();
        let meta = entry.path().symlink_metadata().unwrap();
        if meta.is_dir() {
            total += directory_size(&entry.path());
        } else {
            total += meta.len();
        }
    }
    total
}

// ---- Grafana ----

struct Addresses {
    grpc: SocketAddr,
    http: SocketAddr,
}

/// Where a child's stderr goes: a file, so a chatty child never blocks on a full pipe, read
/// back when something fails.
fn log_file(dir: &Path, name: &str) -> (PathBuf, std::fs::File) {
    let path = dir.join(name);
    let file = std::fs::File::create(&path).unwrap();
    (path, file)
}

/// Reads the aggregator's `... listening on ADDR` lines from its stdout.
fn listening_addresses(child: &mut Child, stderr: &Path) -> Addresses {
    let stdout = child.stdout.take().unwrap();
    let mut lines = BufReader::new(stdout).lines();
    let mut grpc = None;
    let mut http = None;
    while grpc.is_none() || http.is_none() {
        let Some(Ok(line)) = lines.next() else {
            let _ = child.kill();
            let _ = child.wait();
            let said = std::fs::read_to_string(stderr).unwrap_or_default();
            panic!("the aggregator stopped before listening: {said}");
        };
        let address = |prefix: &str| {
            line.strip_prefix(prefix)
                .map(|addr| addr.trim().parse::<SocketAddr>().unwrap())
        };
        grpc = grpc.or_else(|| address("vigil-aggregator: grpc listening on "));
        http = http.or_else(|| address("vigil-aggregator: http listening on "));
    }
    Addresses {
        grpc: grpc.unwrap(),
        http: http.unwrap(),
    }
}

/// Whether process `pid` handles SIGTERM (the `SigCgt` mask of /proc/PID/status).
fn catches_sigterm(pid: u32) -> bool {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|line| line.strip_prefix("SigCgt:"))
        .and_then(|mask| u64::from_str_radix(mask.trim(), 16).ok())
        .is_some_and(|mask| mask & (1 << (libc::SIGTERM - 1)) != 0)
}

/// SIGTERM, then a clean exit. The binaries install their SIGTERM handler just after they
/// print that they listen, so wait for it first: a signal before that would kill them.
fn stop(mut child: Child) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !catches_sigterm(child.id()) {
        assert!(
            Instant::now() < deadline,
            "process {} never installed a SIGTERM handler",
            child.id()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // SAFETY: signals our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let status = child.wait().unwrap();
    assert!(status.success(), "exited with {status}");
}

/// `GET path` over HTTP/1.0: the status code and the body.
fn http_get(address: SocketAddr, path: &str) -> Result<(u16, String), String> {
    let mut stream = TcpStream::connect_timeout(&address, Duration::from_secs(2))
        .map_err(|e| format!("connect {address}: {e}"))?;
    stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .map_err(|e| e.to_string())?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {address}\r\n\r\n")
        .map_err(|e| format!("send to {address}: {e}"))?;
    let mut response = Vec::new();
    stream
        .read_to_end(&mut response)
        .map_err(|e| format!("read from {address}: {e}"))?;
    let text = String::from_utf8(response).map_err(|e| e.to_string())?;
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| format!("no HTTP header in {text:?}"))?;
    let status = head
        .lines()
        .next()
        .and_then(|line| line.split_whitespace().nth(1))
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| format!("no status in {head:?}"))?;
    Ok((status, body.to_string()))
}

/// Percent-encodes a query-string value.
fn encode(value: &str) -> String {
    value
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// `GET /api/v1/...`, which must answer 200 with `"status": "success"`; its `data`.
fn api(address: SocketAddr, path_and_query: &str) -> Value {
    let (status, body) = http_get(address, path_and_query).unwrap();
    let answer: Value = serde_json::from_str(&body)
        .unwrap_or_else(|e| panic!("GET {path_and_query}: not JSON ({e}): {body}"));
    assert!(
        status == 200 && answer["status"] == "success",
        "GET {path_and_query}: {status} {body}"
    );
    answer["data"].clone()
}

/// A model server for the agent to track: the suite's syscall workload, making a burst of
/// `nanosleep`s (or failing `read`s) for each line it reads.
struct Workload {
    child: Child,
    stdin: ChildStdin,
}

impl Workload {
    fn start(mode: &str, count: &str, millis: &str) -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_syscall-workload"))
            .args([mode, count, millis])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .expect("start syscall-workload");
        let stdin = child.stdin.take().unwrap();
        Workload { child, stdin }
    }

    fn poke(&mut self) {
        self.stdin.write_all(b"go\n").unwrap();
    }
}

impl Drop for Workload {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The NVML stand-in of the GPU tests, built next to this test binary.
fn fake_nvml_library() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let deps = exe.parent().unwrap();
    [
        deps.join("libfake_nvml.so"),
        deps.join("../libfake_nvml.so"),
    ]
    .into_iter()
    .find(|path| path.exists())
    .expect("libfake_nvml.so (a dev-dependency of this crate) is built")
}

/// `label_values(SELECTOR, LABEL)` of a Grafana query variable.
fn label_values_query(definition: &str) -> (String, String) {
    let inner = definition
        .trim()
        .strip_prefix("label_values(")
        .and_then(|rest| rest.strip_suffix(')'))
        .unwrap_or_else(|| panic!("variable query {definition:?} is not label_values(...)"));
    let (selector, label) = inner
        .rsplit_once(',')
        .unwrap_or_else(|| panic!("{definition:?} names no label"));
    (selector.trim().to_string(), label.trim().to_string())
}

fn substitute(expr: &str, values: &BTreeMap<String, String>) -> String {
    // Grafana's built-ins, at what they are for a short time range.
    let mut expr = expr
        .replace("$__rate_interval", "1m")
        .replace("$__interval", "15s")
        .replace("$__range", "1h");
    // Longest names first, so `$node` does not eat the start of a `$nodes`.
    let mut names: Vec<&String> = values.keys().collect();
    names.sort_by_key(|name| std::cmp::Reverse(name.len()));
    for name in names {
        expr = expr
            .replace(&format!("${{{name}}}"), &values[name])
            .replace(&format!("${name}"), &values[name]);
    }
    assert!(!expr.contains('$'), "a variable is left in {expr}");
    expr
}

#[test]
fn every_grafana_dashboard_query_returns_data_from_the_aggregator() {
    let packages = packages();
    let dir = tempfile::tempdir().unwrap();
    let root = workspace_root();

    // The shipped aggregator config, on free loopback ports.
    let mut aggregator = Command::new(&packages.binaries["vigil-aggregator"])
        .arg("--config")
        .arg(root.join("packaging/config/aggregator.toml"))
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .args([
            "--grpc-listen",
            "127.0.0.1:0",
            "--http-listen",
            "127.0.0.1:0",
        ])
        .stdout(Stdio::piped())
        .stderr(log_file(dir.path(), "aggregator.log").1)
        .spawn()
        .expect("start vigil-aggregator");
    let addresses = listening_addresses(&mut aggregator, &dir.path().join("aggregator.log"));

    // Two model servers: one sleeping in bursts (latency histograms), one failing reads
    // (error counters); the first also "uses the GPU" in the NVML stand-in's scenario.
    let mut sleeper = Workload::start("nanosleep", "20", "2");
    let mut failer = Workload::start("bad-read", "50", "0");
    let library = dir.path().join("libnvidia-ml.so.1");
    std::fs::copy(fake_nvml_library(), &library).unwrap();
    let scenario = json!({"devices": [{
        "uuid": "GPU-5a1c0d3e-0000-4000-8000-00000000d45b",
        "name": "NVIDIA H100 80GB HBM3",
        "pci_bus_id": "00000000:17:00.0",
        "memory_total_bytes": 85_520_809_984_u64,
        "power_limit_mw": 700_000,
        "timeline": [{"at_s": 0, "gpu_util": 60, "mem_util": 30,
            "memory_used_bytes": 20_000_000_000_u64, "power_mw": 350_000,
            "energy_mj": 1_000_000, "temperature_c": 55, "fan_speed_pct": 40,
            "sm_clock_mhz": 1980, "memory_clock_mhz": 2619, "graphics_clock_mhz": 1980,
            "performance_state": 0, "pcie_tx_kbps": 1000, "pcie_rx_kbps": 2000,
            "throttle_reasons": ["sw_power_cap"]}],
        "processes": [{"pid": sleeper.child.id(), "kind": "compute",
            "used_memory_bytes": 8_000_000_000_u64, "sm_util": 70, "mem_util": 30,
            "enc_util": 0, "dec_util": 0}],
        "events": [{"at_s": 0.5, "type": "xid", "xid": 79},
                   {"at_s": 0.7, "type": "ecc_single_bit"}],
        "nvlinks": [{"active": true, "replay_errors": 0, "recovery_errors": 0,
            "crc_flit_errors": 0, "crc_data_errors": 0}]
    }]});
    std::fs::write(
        dir.path().join("fake-nvml-scenario.json"),
        scenario.to_string(),
    )
    .unwrap();

    // The shipped agent config with a [transport] to this aggregator.
    let mut agent_toml = std::fs::read_to_string(root.join("packaging/config/agent.toml")).unwrap();
    agent_toml.push_str(&format!(
        "\n[transport]\nendpoints = [\"http://{}\"]\nplaintext = true\nspool_dir = \"{}\"\n\
         interval = \"1s\"\n",
        addresses.grpc,
        dir.path().join("spool").display()
    ));
    std::fs::write(dir.path().join("agent.toml"), agent_toml).unwrap();
    let agent = Command::new(&packages.binaries["vigil-agent"])
        .arg("run")
        .arg("--config")
        .arg(dir.path().join("agent.toml"))
        .args(["--track", "syscall-workload", "--nvml-library"])
        .arg(&library)
        .stdout(Stdio::null())
        .stderr(log_file(dir.path(), "agent.log").1)
        .spawn()
        .expect("start vigil-agent run");
    for _ in 0..16 {
        sleeper.poke();
        failer.poke();
        std::thread::sleep(Duration::from_millis(500));
    }
    stop(agent);

    let node = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .unwrap()
        .trim()
        .to_string();
    // What each dashboard variable is set to: this node, GPU 0, the sleeping workload's server
    // name (its comm, cut to 15 characters by the kernel).
    let wanted: BTreeMap<&str, &str> = [
        ("node", node.as_str()),
        ("gpu", "0"),
        ("server", "syscall-workloa"),
    ]
    .into();

    let dashboards_dir = root.join("packaging/grafana");
    let mut dashboards: Vec<PathBuf> = std::fs::read_dir(&dashboards_dir)
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "json"))
        .collect();
    dashboards.sort();
    assert!(dashboards.len() >= 3, "fleet, node and model-server views");
    let mut queries = 0;
    let mut failures = Vec::new();
    let agent_log = std::fs::read_to_string(dir.path().join("agent.log")).unwrap_or_default();
    for path in &dashboards {
        let dashboard: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap())
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        assert!(dashboard["uid"].is_string() && dashboard["title"].is_string());

        // Template variables: the data source is a Prometheus one; each query variable lists
        // the value the panels are checked with.
        let mut values = BTreeMap::new();
        for variable in dashboard["templating"]["list"].as_array().unwrap() {
            let var_name = variable["name"].as_str().unwrap().to_string();
            match variable["type"].as_str().unwrap() {
                "datasource" => {
                    assert_eq!(variable["query"], "prometheus", "{name}: {var_name}");
                    values.insert(var_name, "vigil".to_string());
                }
                "query" => {
                    let definition = variable["definition"].as_str().unwrap();
                    let (selector, label) = label_values_query(definition);
                    let selector = substitute(&selector, &values);
                    let listed = api(
                        addresses.http,
                        &format!("/api/v1/label/{label}/values?match[]={}", encode(&selector)),
                    );
                    let want = wanted
                        .get(var_name.as_str())
                        .unwrap_or_else(|| panic!("{name}: no test value for ${var_name}"));
                    assert!(
                        listed
                            .as_array()
                            .unwrap()
                            .iter()
                            .any(|value| value == *want),
                        "{name}: variable ${var_name} ({definition}) lists {listed}, not {want}"
                    );
                    values.insert(var_name, want.to_string());
                }
                other => panic!("{name}: variable {var_name} of unexpected type {other}"),
            }
        }

        for panel in dashboard["panels"].as_array().unwrap() {
            assert_eq!(
                panel["datasource"]["uid"], "${datasource}",
                "{name}: panel {} uses the dashboard's data source",
                panel["title"]
            );
            for target in panel["targets"].as_array().unwrap() {
                let expr = substitute(target["expr"].as_str().unwrap(), &values);
                queries += 1;
                let data = api(
                    addresses.http,
                    &format!("/api/v1/query?query={}", encode(&expr)),
                );
                let results = data["result"].as_array().map_or(0, Vec::len);
                if results == 0 {
                    failures.push(format!("{name}: {}: {expr}", panel["title"]));
                }
            }
        }
    }
    stop(aggregator);
    assert!(queries >= 40, "only {queries} queries in the dashboards");
    assert!(
        failures.is_empty(),
        "queries without data ({} of {queries}):\n{}\nthe agent said:\n{}",
        failures.len(),
        failures.join("\n"),
        tail(agent_log.as_bytes(), 4000)
    );
}
