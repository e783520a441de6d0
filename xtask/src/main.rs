//! `cargo xtask`: Vigil's build, test and benchmark tasks.
//!
//! The eBPF programs (`agent-ebpf/`) must be built for `bpfel-unknown-none` with `-Z build-std=core`,
//! which the stable toolchain that builds everything else cannot do. These tasks find or install a
//! toolchain that can (`setup`), build the object (`build-ebpf`) and hand its path to the agent's
//! build script through `VIGIL_BPF_OBJECT`, which embeds it.
//!
//! Progress goes to stderr, so that stdout carries only results: the agent's own output for
//! `run` (e.g. a JSON snapshot to pipe into jq) and the benchmark's report.

mod bench;
mod demo;
mod ebpf;
mod gpu_check;
mod package;
mod setup;
mod shell;
mod workspace;

use std::ffi::OsString;
use std::os::unix::process::CommandExt;
use std::process::{ExitCode, Stdio};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};

use crate::workspace::Workspace;

#[derive(Parser)]
#[command(
    name = "cargo xtask",
    about = "Vigil's build, test and benchmark tasks"
)]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Find, or install (as root, with apt-get), what the eBPF build, the tests and the
    /// benchmark need. Idempotent; fast when everything is present.
    Setup,
    /// Build the eBPF programs into target/bpf/vigil-syscalls.bpf.o.
    BuildEbpf,
    /// Build the eBPF object, then the whole workspace in release mode.
    Build,
    /// Run the whole test suite: eBPF build, rustfmt, clippy and every test, one at a time.
    /// Run it as root: the eBPF tests load programs into the kernel.
    Test,
    /// Build, then run target/release/vigil-agent with ARGS,
    /// e.g. `cargo xtask run -- snapshot --duration 10s --format json`.
    Run {
        #[arg(
            trailing_var_arg = true,
            allow_hyphen_values = true,
            value_name = "ARGS"
        )]
        args: Vec<OsString>,
    },
    /// Build, then run a benchmark and write its figures under target/bench/.
    Bench(bench::BenchArgs),
    /// Build, then the .deb and .rpm packages of both binaries and an OCI image, into
    /// target/packages/ (packages.json lists them).
    Package,
    /// Build, then run the aggregator, an agent on this node and (when no real model server
    /// runs) a synthetic model server, and print the dashboard's URL. Ctrl-C stops it all.
    Demo(demo::DemoArgs),
    /// On a machine with an NVIDIA GPU: compare the agent's GPU readings with nvidia-smi.
    GpuCheck {
        /// Use this agent binary instead of building one (a GPU machine may lack the toolchain).
        #[arg(long)]
        agent: Option<std::path::PathBuf>,
        /// How long the snapshot collects.
        #[arg(long, default_value = "3s")]
        duration: String,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run_task(cli.task) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            // The whole chain on one line, without a backtrace: the failing step says enough.
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn run_task(task: Task) -> Result<()> {
    let ws = Workspace::locate();
    match task {
        Task::Setup => setup::ensure().map(drop),
        Task::BuildEbpf => ebpf::build(&ws).map(drop),
        Task::Build => build(&ws),
        Task::Test => test(&ws),
        Task::Run { args } => run(&ws, args),
        Task::Bench(args) => {
            build(&ws)?;
            bench::run(&ws, &args)
        }
        Task::Package => package::run(&ws).map(drop),
        Task::Demo(args) => demo::run(&ws, &args),
        Task::GpuCheck { agent, duration } => {
            let agent = match agent {
                Some(agent) => agent,
                None => {
                    build(&ws)?;
                    ws.agent_binary()
                }
            };
            gpu_check::run(&agent, &duration)
        }
    }
}

/// The eBPF object, then the release build of every workspace crate, which embeds it.
fn build(ws: &Workspace) -> Result<()> {
    let object = ebpf::build(ws)?;
    let mut cargo = ws.cargo(&object);
    cargo.args(["build", "--release", "--workspace"]);
    shell::run(&mut cargo)
}

fn test(ws: &Workspace) -> Result<()> {
    if !shell::is_root() {
        eprintln!(
            "test: WARNING: not running as root; the eBPF tests need root (CAP_BPF + CAP_PERFMON) \
             and will fail. Run `sudo -E cargo xtask test` or run it as root."
        );
    }
    let started = Instant::now();
    let object = ebpf::build(ws).context("test: FAILED at step build-ebpf")?;
    for (subcommand, component) in [("fmt", "rustfmt"), ("clippy", "clippy")] {
        ensure_cargo_subcommand(ws, &object, subcommand, component)?;
    }

    let steps: [(&str, &[&str]); 4] = [
        ("fmt", &["fmt", "--all", "--", "--check"]),
        // agent-ebpf is its own workspace, so `--all` does not reach it.
        (
            "fmt",
            &[
                "fmt",
                "--manifest-path",
                "agent-ebpf/Cargo.toml",
                "--",
                "--check",
            ],
        ),
        (
            "clippy",
            &[
                "clippy",
                "--workspace",
                "--all-targets",
                "--",
                "-D",
                "warnings",
            ],
        ),
        // The eBPF tests share kernel state (tracepoints, maps), so they run one at a time.
        ("test", &["test", "--workspace", "--", "--test-threads=1"]),
    ];
    let mut totals = TestTotals::default();
    for (name, args) in steps {
        let mut cargo = ws.cargo(&object);
        cargo.args(args);
        let result = if name == "test" {
            run_counting_tests(&mut cargo, &mut totals)
        } else {
            shell::run(&mut cargo)
        };
        if let Err(err) = result {
            eprintln!("test: FAILED at step {name}");
            println!("{}", totals.closing_line());
            return Err(err);
        }
    }
    eprintln!(
        "test: all steps passed (build-ebpf, fmt, clippy, test) in {:.0?}",
        started.elapsed()
    );
    // The last line: every test of the run, in the plain form CI reads.
    println!("{}", totals.closing_line());
    Ok(())
}

/// Tests passed, failed and ignored over every test binary of a `cargo test` run.
#[derive(Debug, Default, PartialEq)]
struct TestTotals {
    passed: u64,
    failed: u64,
    ignored: u64,
}

impl TestTotals {
    /// Adds a libtest summary line (`test result: ok. 5 passed; 0 failed; 1 ignored; ...`).
    fn add_summary(&mut self, line: &str) {
        let Some(rest) = line.strip_prefix("test result: ") else {
            return;
        };
        for part in rest.split(';') {
            let mut words = part.split_whitespace().rev();
            let (Some(kind), Some(count)) = (words.next(), words.next()) else {
                continue;
            };
            let Ok(count) = count.parse::<u64>() else {
                continue;
            };
            match kind {
                "passed" => self.passed += count,
                "failed" => self.failed += count,
                "ignored" => self.ignored += count,
                _ => {}
            }
        }
    }

    fn closing_line(&self) -> String {
        let mut line = format!("tests: {} passed, {} failed", self.passed, self.failed);
        if self.ignored > 0 {
            line.push_str(&format!(", {} skipped", self.ignored));
        }
        line
    }
}

/// Runs `cargo test`, passing its output through while adding up the summary lines.
fn run_counting_tests(cargo: &mut std::process::Command, totals: &mut TestTotals) -> Result<()> {
    use std::io::BufRead;
    eprintln!("$ {}", shell::describe(cargo));
    let mut child = cargo
        .stdout(Stdio::piped())
        .spawn()
        .context("could not start cargo test")?;
    let stdout = child.stdout.take().expect("stdout is piped");
    for line in std::io::BufReader::new(stdout).lines() {
        let line = line.context("reading cargo test's output")?;
        totals.add_summary(&line);
        println!("{line}");
    }
    let status = child.wait()?;
    if !status.success() {
        bail!("cargo test failed ({status})");
    }
    Ok(())
}

/// A minimal rustup profile lacks rustfmt and clippy; add them to the toolchain running us.
fn ensure_cargo_subcommand(
    ws: &Workspace,
    object: &std::path::Path,
    subcommand: &str,
    component: &str,
) -> Result<()> {
    let mut probe = ws.cargo(object);
    probe
        .args([subcommand, "--version"])
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    if probe.status().is_ok_and(|status| status.success()) {
        return Ok(());
    }
    if shell::find_in_path("rustup").is_none() {
        bail!("`cargo {subcommand}` is not available; install {component} for your toolchain");
    }
    let mut rustup = std::process::Command::new("rustup");
    rustup.args(["component", "add", component]);
    shell::run(&mut rustup).with_context(|| format!("`cargo {subcommand}` is not available"))
}

fn run(ws: &Workspace, args: Vec<OsString>) -> Result<()> {
    build(ws)?;
    let agent = ws.agent_binary();
    let mut command = std::process::Command::new(&agent);
    command.args(&args);
    shell::scrub_outer_cargo_env(&mut command, ws);
    // `exec` only returns on failure.
    let err = command.exec();
    bail!("could not execute {}: {err}", agent.display())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summary_lines_add_up_into_the_closing_line() {
        let mut totals = TestTotals::default();
        totals.add_summary(
            "test result: ok. 5 passed; 0 failed; 1 ignored; 0 measured; 0 filtered out; finished in 0.01s",
        );
        totals.add_summary(
            "test result: FAILED. 3 passed; 2 failed; 0 ignored; 0 measured; 0 filtered out; finished in 1.00s",
        );
        totals.add_summary("test scenario::tests::x ... ok");
        assert_eq!(
            totals,
            TestTotals {
                passed: 8,
                failed: 2,
                ignored: 1
            }
        );
        assert_eq!(
            totals.closing_line(),
            "tests: 8 passed, 2 failed, 1 skipped"
        );
        assert_eq!(
            TestTotals::default().closing_line(),
            "tests: 0 passed, 0 failed"
        );
    }
}
