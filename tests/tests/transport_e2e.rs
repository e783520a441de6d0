//! The real `vigil-agent run` streaming to the real `vigil-aggregator`, with the outages the
//! transport exists for: the aggregator down when the agent starts, the agent killed with
//! SIGKILL mid-stream, the aggregator killed with SIGKILL mid-stream. In every case each batch
//! the agent spooled is stored exactly once.
//!
//! Each test's agent runs only the host and process collectors (no probes, no GPU), a pass
//! every 250 ms, and the aggregator listens on a free 127.0.0.1 port.

use std::{
    io::{BufRead, BufReader},
    net::TcpListener,
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::Duration,
};

use vigil_agent::transport::spool::Spool;
use vigil_aggregator::config::AggregatorConfig;

/// `target/<profile>/NAME`: built by `cargo test --workspace` for the packages' own tests.
fn binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let path = exe.parent().unwrap().parent().unwrap().join(name);
    assert!(
        path.exists(),
        "{} is missing: run the tests with `cargo test --workspace` (or `cargo xtask test`)",
        path.display()
    );
    path
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

struct Setup {
    dir: tempfile::TempDir,
    port: u16,
}

/// The test PKI of the agent's TLS tests: a CA and a certificate for 127.0.0.1.
fn pki(file: &str) -> String {
    format!(
        "{}/../agent/tests/tls-pki/{file}",
        env!("CARGO_MANIFEST_DIR")
    )
}

const TOKEN: &str = "vigil-e2e-token-0123456789abcdef";

impl Setup {
    /// Plaintext on loopback, no authentication.
    fn new() -> Self {
        Self::with(
            "[tls]\nplaintext = true\n",
            "endpoints = [\"http://127.0.0.1:PORT\"]\nplaintext = true\n",
        )
    }

    /// TLS, and a bearer token for this node (`agent_token` is what the agent sends).
    fn tls_with_token(agent_token: &str) -> Self {
        let setup = Self::with(
            &format!(
                "[tls]\ncert_file = \"{}\"\nkey_file = \"{}\"\n[auth]\ntokens_file = \"TOKENS\"\n",
                pki("aggregator.crt"),
                pki("aggregator.key")
            ),
            &format!(
                "endpoints = [\"https://127.0.0.1:PORT\"]\nca_file = \"{}\"\n\
                 token_file = \"AGENT_TOKEN\"\n",
                pki("ca.crt")
            ),
        );
        let node = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap();
        std::fs::write(
            setup.path("tokens.toml"),
            format!(
                "[[tokens]]\nname = \"e2e-agent\"\ntoken = \"{TOKEN}\"\nrole = \"agent\"\n\
                 node = \"{}\"\n",
                node.trim()
            ),
        )
        .unwrap();
        std::fs::write(setup.path("agent.token"), agent_token).unwrap();
        setup
    }

    fn with(aggregator: &str, transport: &str) -> Self {
        let setup = Self {
            dir: tempfile::tempdir().unwrap(),
            port: free_port(),
        };
        let fill = |text: &str| {
            text.replace("PORT", &setup.port.to_string())
                .replace(
                    "AGENT_TOKEN",
                    &setup.path("agent.token").display().to_string(),
                )
                .replace("TOKENS", &setup.path("tokens.toml").display().to_string())
        };
        std::fs::write(setup.path("aggregator.toml"), fill(aggregator)).unwrap();
        std::fs::write(
            setup.path("agent.toml"),
            format!(
                "[syscalls]\nenabled = false\n[gpu]\nenabled = false\n[transport]\n{}\
                 spool_dir = \"{}\"\ninterval = \"250ms\"\n",
                fill(transport),
                setup.path("spool").display()
            ),
        )
        .unwrap();
        setup
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Starts the aggregator on the fixed port and waits until it listens.
    fn aggregator(&self) -> Child {
        let mut child = Command::new(binary("vigil-aggregator"))
            .arg("--config")
            .arg(self.path("aggregator.toml"))
            .arg("--data-dir")
            .arg(self.path("data"))
            .args(["--grpc-listen", &format!("127.0.0.1:{}", self.port)])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("start vigil-aggregator");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert!(line.contains("grpc listening on"), "{line:?}");
        child
    }

    fn agent(&self) -> Child {
        Command::new(binary("vigil-agent"))
            .arg("run")
            .arg("--config")
            .arg(self.path("agent.toml"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start vigil-agent run")
    }

    /// What the agent's spool says: (batches made, batches acked, batches dropped).
    fn spool(&self) -> (u64, u64, u64, String) {
        let spool = Spool::open(&self.path("spool"), 1 << 30).expect("open the agent's spool");
        (
            spool.next_sequence() - 1,
            spool.acked(),
            spool.dropped_batches(),
            spool.agent_instance().to_string(),
        )
    }

    /// Replays the aggregator's data dir and returns, for one series every pass carries, the
    /// times of its stored points, and the highest sequence stored for the agent.
    fn stored(&self, instance: &str) -> (Vec<i64>, Option<u64>) {
        let mut config = AggregatorConfig::parse("[tls]\nplaintext = true\n").unwrap();
        config.audit.path = Some(self.path("replay-audit.log"));
        config.data_dir = self.path("data");
        config.grpc.listen = "127.0.0.1:0".parse().unwrap();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async {
            let aggregator = vigil_aggregator::start(&config).await.expect("replay");
            let store = aggregator.store().clone();
            let node = store
                .series()
                .first()
                .map(|s| s.node.clone())
                .expect("something stored");
            let uptime = store
                .find_series(&node, "vigil_host_uptime_seconds", &[])
                .expect("the uptime series");
            let times = store.samples_of(uptime).iter().map(|p| p.time_ms).collect();
            let high_water = store.high_water(&node, instance);
            aggregator.shutdown().await;
            (times, high_water)
        })
    }
}

fn terminate(mut child: Child) {
    // SAFETY: signals our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let status = child.wait().unwrap();
    assert!(status.success(), "exited with {status}");
}

fn kill_9(mut child: Child) {
    child.kill().unwrap();
    child.wait().unwrap();
}

/// Every batch made was acked and is stored exactly once: one point per batch for a series
/// that every pass carries, at distinct times.
fn assert_stored_exactly_once(setup: &Setup) {
    let (made, acked, dropped, instance) = setup.spool();
    assert!(made >= 4, "only {made} batches were made");
    assert_eq!(dropped, 0);
    assert_eq!(acked, made, "every batch made was acked");
    let (times, high_water) = setup.stored(&instance);
    assert_eq!(high_water, Some(made));
    let mut distinct = times.clone();
    distinct.sort_unstable();
    distinct.dedup();
    assert_eq!(
        distinct.len(),
        times.len(),
        "a batch was stored twice: {times:?}"
    );
    assert_eq!(times.len() as u64, made, "one point per batch: {times:?}");
}

fn pause(ms: u64) {
    std::thread::sleep(Duration::from_millis(ms));
}

#[test]
fn an_aggregator_down_when_the_agent_starts_gets_everything_once_when_it_comes_up() {
    let setup = Setup::new();
    let agent = setup.agent();
    pause(1500); // batches pile up in the spool
    let aggregator = setup.aggregator();
    pause(2500); // the agent reconnects (backoff <= 2 s by then) and resends
    terminate(agent);
    terminate(aggregator);
    assert_stored_exactly_once(&setup);
}

#[test]
fn an_agent_killed_mid_stream_loses_no_spooled_batch() {
    let setup = Setup::new();
    let aggregator = setup.aggregator();
    let agent = setup.agent();
    pause(1500);
    kill_9(agent);
    let agent = setup.agent(); // same spool: resends what was not acked, then goes on
    pause(1500);
    terminate(agent);
    terminate(aggregator);
    assert_stored_exactly_once(&setup);
}

#[test]
fn an_aggregator_killed_mid_stream_stores_every_batch_once_after_restart() {
    let setup = Setup::new();
    let aggregator = setup.aggregator();
    let agent = setup.agent();
    pause(1500);
    kill_9(aggregator);
    pause(1000); // batches pile up while it is down
    let aggregator = setup.aggregator(); // WAL replay, then the agent resends
    pause(3000);
    terminate(agent);
    terminate(aggregator);
    assert_stored_exactly_once(&setup);
}

#[test]
fn an_agent_streams_over_tls_with_its_token_and_the_aggregator_audits_it() {
    let setup = Setup::tls_with_token(TOKEN);
    let aggregator = setup.aggregator();
    let agent = setup.agent();
    pause(2000);
    terminate(agent);
    terminate(aggregator);
    assert_stored_exactly_once(&setup);
    let audit = std::fs::read_to_string(setup.path("data/audit.log")).unwrap();
    assert!(
        audit.contains("\"outcome\":\"accepted\"") && audit.contains("token:e2e-agent"),
        "{audit}"
    );
    assert!(!audit.contains(TOKEN), "the token must never be logged");
}

#[test]
fn an_agent_with_a_wrong_token_stores_nothing_keeps_its_spool_and_is_audited() {
    let setup = Setup::tls_with_token("not-the-token-0123456789abcdef");
    let aggregator = setup.aggregator();
    let agent = setup.agent();
    pause(1500);
    terminate(agent);
    terminate(aggregator);
    let (made, acked, _, _) = setup.spool();
    assert!(made >= 3, "batches are still made and spooled: {made}");
    assert_eq!(acked, 0);
    let audit = std::fs::read_to_string(setup.path("data/audit.log")).unwrap();
    assert!(
        audit.contains("\"outcome\":\"denied\"") && audit.contains("unauthenticated"),
        "{audit}"
    );
    assert!(!audit.contains("not-the-token"), "tokens are never logged");
}
