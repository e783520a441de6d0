//! The dashboard in a real browser: headless Chromium (Debian's `chromium`, driven through
//! `chromedriver`'s WebDriver HTTP API) against the real `vigil-aggregator` fed by the real
//! `vigil-agent run`, which tracks the synthetic model server of `cargo xtask demo`
//! (`packaging/demo/vigil-demo-model-server`) and reads its GPUs from the NVML stand-in with a
//! scenario of constant readings, so the charts can be checked against what was sent.
//!
//! Every page is loaded with the reader token in its fragment; the test checks what the
//! charts and tables hold (the page exposes it in `window.__vigil`), that live updates arrive
//! and move the charts, that no console error or uncaught exception happened
//! (`window.__vigilErrors`, collected by the page before anything else runs) and no API call
//! failed, and saves a screenshot of each page under `target/test-artifacts/`.
//!
//! Needs `/usr/bin/chromium` and `/usr/bin/chromedriver` (`cargo xtask setup` installs them)
//! and the workspace's binaries (`cargo test --workspace` builds them). As root the agent's
//! syscall probes run and the latency heatmap is checked for data; otherwise the test checks
//! that the page says why it is empty.

use std::{
    io::{BufRead, BufReader},
    net::TcpListener,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use base64::Engine as _;
use serde_json::{Value, json};

const CHROMIUM: &str = "/usr/bin/chromium";
const CHROMEDRIVER: &str = "/usr/bin/chromedriver";
const AGENT_TOKEN: &str = "dashboard-test-agent-0123456789";
const READER_TOKEN: &str = "dashboard-test-reader-0123456789";
const SERVER: &str = "demo-model-server";

/// The stand-in GPUs' constant readings: what the charts must show.
const GPU0_UTIL: f64 = 0.73;
const GPU0_TEMPERATURE: f64 = 61.0;
const SERVER_GPU_MEMORY: f64 = 3_221_225_472.0;

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

fn fake_nvml() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let deps = exe.parent().unwrap();
    [
        deps.join("libfake_nvml.so"),
        deps.join("../libfake_nvml.so"),
    ]
    .into_iter()
    .find(|path| path.exists())
    .expect(
        "libfake_nvml.so not built (a dev-dependency of this crate: `cargo test -p vigil-tests`)",
    )
}

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// A child process stopped (SIGTERM, then SIGKILL) when the test ends, however it ends.
struct Process {
    name: &'static str,
    child: Child,
}

impl Process {
    fn spawn(name: &'static str, command: &mut Command) -> Process {
        let child = command
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
        Process { name, child }
    }

    fn assert_running(&mut self) {
        if let Some(status) = self.child.try_wait().unwrap() {
            panic!("{} exited early: {status}", self.name);
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        // SAFETY: kill(2) on our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn scenario(server_pid: u32) -> Value {
    let constant = |util: u32, temperature: u32, used: u64| {
        json!([{"at_s": 0, "gpu_util": util, "mem_util": util / 2, "memory_used_bytes": used,
                "power_mw": 400_000, "energy_mj": 1_000_000, "temperature_c": temperature,
                "sm_clock_mhz": 1755, "memory_clock_mhz": 2619, "graphics_clock_mhz": 1755,
                "performance_state": 0, "pcie_tx_kbps": 1000, "pcie_rx_kbps": 2000,
                "throttle_reasons": ["sw_power_cap"]}])
    };
    json!({"devices": [
        {"uuid": "GPU-da5b0a4d-0000-4000-8000-000000000000", "name": "NVIDIA H100 80GB HBM3",
         "pci_bus_id": "00000000:17:00.0", "memory_total_bytes": 85_520_809_984u64,
         "power_limit_mw": 700_000, "not_supported": ["fan_speed"],
         "timeline": constant((GPU0_UTIL * 100.0) as u32, GPU0_TEMPERATURE as u32, 20_000_000_000),
         "processes": [{"pid": server_pid, "used_memory_bytes": SERVER_GPU_MEMORY as u64, "sm_util": 55, "mem_util": 20}],
         "events": [{"at_s": 1.0, "type": "xid", "xid": 63}]},
        {"uuid": "GPU-da5b0a4d-0000-4000-8000-000000000001", "name": "NVIDIA H100 80GB HBM3",
         "pci_bus_id": "00000000:18:00.0", "memory_total_bytes": 85_520_809_984u64,
         "power_limit_mw": 700_000, "not_supported": ["fan_speed"],
         "timeline": constant(0, 35, 536_870_912), "processes": [], "events": []}
    ]})
}

/// The aggregator's query API, as the reader.
struct Api {
    base: String,
}

impl Api {
    fn get(&self, path: &str, query: &[(&str, &str)]) -> Value {
        let mut request = ureq::get(&format!("{}{path}", self.base))
            .set("Authorization", &format!("Bearer {READER_TOKEN}"));
        for (name, value) in query {
            request = request.query(name, value);
        }
        match request.call() {
            Ok(response) => response.into_json().unwrap(),
            Err(ureq::Error::Status(code, response)) => {
                panic!("GET {path}: {code} {}", response.into_string().unwrap())
            }
            Err(error) => panic!("GET {path}: {error}"),
        }
    }

    fn vector(&self, expr: &str) -> Vec<Value> {
        self.get("/api/v1/query", &[("query", expr)])["data"]["result"]
            .as_array()
            .unwrap()
            .clone()
    }
}

/// A WebDriver session on chromedriver.
struct Browser {
    base: String,
    session: String,
    _driver: Process,
}

impl Browser {
    fn start(profile: &Path) -> Browser {
        let port = free_port();
        let driver = Process::spawn(
            "chromedriver",
            Command::new(CHROMEDRIVER)
                .arg(format!("--port={port}"))
                .stdout(Stdio::null())
                .stderr(Stdio::null()),
        );
        let base = format!("http://127.0.0.1:{port}");
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(response) = ureq::get(&format!("{base}/status")).call()
                && response.into_json::<Value>().unwrap()["value"]["ready"] == true
            {
                break;
            }
            assert!(Instant::now() < deadline, "chromedriver did not get ready");
            std::thread::sleep(Duration::from_millis(100));
        }
        let capabilities = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": CHROMIUM,
                "args": ["--headless=new", "--no-sandbox", "--disable-gpu",
                         "--disable-dev-shm-usage", "--window-size=1400,1700",
                         "--hide-scrollbars",
                         format!("--user-data-dir={}", profile.display())],
            },
        }}});
        let response = post(&format!("{base}/session"), &capabilities);
        let session = response["value"]["sessionId"]
            .as_str()
            .unwrap_or_else(|| panic!("no session: {response}"))
            .to_owned();
        Browser {
            base,
            session,
            _driver: driver,
        }
    }

    fn url(&self, path: &str) -> String {
        format!("{}/session/{}{path}", self.base, self.session)
    }

    fn open(&self, url: &str) {
        post(&self.url("/url"), &json!({"url": url}));
    }

    fn eval(&self, script: &str) -> Value {
        post(
            &self.url("/execute/sync"),
            &json!({"script": script, "args": []}),
        )["value"]
            .clone()
    }

    /// Polls `script` (an expression) until it is truthy.
    fn wait_for(&self, what: &str, script: &str, timeout: Duration) -> Value {
        let deadline = Instant::now() + timeout;
        loop {
            let value = self.eval(&format!("return ({script});"));
            if !(value.is_null() || value == false) {
                return value;
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}; page errors: {}",
                self.eval(
                    "return [window.__vigilErrors, window.__vigil && window.__vigil.apiErrors];"
                )
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    fn screenshot(&self, name: &str) -> PathBuf {
        let response = ureq::get(&self.url("/screenshot"))
            .call()
            .unwrap()
            .into_json::<Value>()
            .unwrap();
        let png = base64::engine::general_purpose::STANDARD
            .decode(response["value"].as_str().unwrap())
            .unwrap();
        let dir = workspace().join("target/test-artifacts");
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(format!("dashboard-{name}.png"));
        std::fs::write(&path, png).unwrap();
        path
    }

    /// No console error, uncaught exception or failed API call so far on this page.
    fn assert_no_errors(&self, page: &str) {
        let errors = self.eval("return window.__vigilErrors;");
        assert_eq!(errors, json!([]), "console errors on {page}");
        let api_errors = self.eval("return window.__vigil.apiErrors;");
        assert_eq!(api_errors, json!([]), "failed API calls on {page}");
    }

    fn chart(&self, id: &str) -> Value {
        self.eval(&format!("return window.__vigil.charts[{id:?}] || null;"))
    }

    fn text(&self, selector: &str) -> String {
        self.eval(&format!(
            "const e = document.querySelector({selector:?}); return e ? e.innerText : null;"
        ))
        .as_str()
        .unwrap_or_else(|| panic!("no element {selector}"))
        .to_owned()
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = ureq::delete(&format!("{}/session/{}", self.base, self.session)).call();
    }
}

fn post(url: &str, body: &Value) -> Value {
    match ureq::post(url).send_json(body.clone()) {
        Ok(response) => response.into_json().unwrap(),
        Err(ureq::Error::Status(code, response)) => {
            panic!("POST {url}: {code} {}", response.into_string().unwrap())
        }
        Err(error) => panic!("POST {url}: {error}"),
    }
}

/// The value a chart's series ends with.
fn last_of(chart: &Value, series: &str) -> f64 {
    chart["series"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == series)
        .unwrap_or_else(|| panic!("no series {series:?} in {chart}"))["last"]
        .as_f64()
        .unwrap_or_else(|| panic!("series {series:?} has no value: {chart}"))
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-6 * a.abs().max(b.abs()).max(1.0)
}

#[test]
fn every_page_shows_the_agents_data_live_without_console_errors() {
    for tool in [CHROMIUM, CHROMEDRIVER] {
        assert!(
            Path::new(tool).exists(),
            "{tool} is missing: `cargo xtask setup` installs chromium and chromium-driver"
        );
    }
    let dir = tempfile::tempdir().unwrap();
    let path = |name: &str| dir.path().join(name);
    let node = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .unwrap()
        .trim()
        .to_owned();

    // The model server: the demo's synthetic one, with short cycles.
    let mut workload = Process::spawn(
        "vigil-demo-model-server",
        Command::new("/usr/bin/python3")
            .arg(workspace().join("packaging/demo/vigil-demo-model-server"))
            .args(["--cycle", "20", "--duration", "600", "--workdir"])
            .arg(path("workload"))
            .stdout(Stdio::null()),
    );

    // The aggregator: tokens, the shipped alert rules, HTTP on a free port.
    std::fs::write(
        path("tokens.toml"),
        format!(
            "[[tokens]]\nname = \"agent\"\ntoken = \"{AGENT_TOKEN}\"\nrole = \"agent\"\nnode = \"*\"\n\
             [[tokens]]\nname = \"dashboard\"\ntoken = \"{READER_TOKEN}\"\nrole = \"reader\"\n"
        ),
    )
    .unwrap();
    std::fs::write(path("agent.token"), AGENT_TOKEN).unwrap();
    std::fs::write(
        path("aggregator.toml"),
        format!(
            "[tls]\nplaintext = true\n[auth]\ntokens_file = \"{}\"\n\
             [alerting]\nrule_files = [\"{}\"]\nevaluation_interval = \"1s\"\n",
            path("tokens.toml").display(),
            workspace().join("packaging/rules/*.yml").display()
        ),
    )
    .unwrap();
    let (grpc, http) = (free_port(), free_port());
    let mut aggregator = Process::spawn(
        "vigil-aggregator",
        Command::new(binary("vigil-aggregator"))
            .arg("--config")
            .arg(path("aggregator.toml"))
            .arg("--data-dir")
            .arg(path("data"))
            .args(["--grpc-listen", &format!("127.0.0.1:{grpc}")])
            .args(["--http-listen", &format!("127.0.0.1:{http}")])
            .stdout(Stdio::piped())
            .stderr(Stdio::null()),
    );
    let mut lines = BufReader::new(aggregator.child.stdout.take().unwrap()).lines();
    assert!(
        lines
            .by_ref()
            .take(3)
            .any(|line| line.unwrap().contains("http listening on")),
        "the aggregator did not start"
    );
    std::thread::spawn(move || lines.for_each(drop));

    // The agent, on the stand-in GPUs.
    std::fs::write(
        path("fake-nvml.json"),
        scenario(workload.child.id()).to_string(),
    )
    .unwrap();
    std::fs::write(
        path("agent.toml"),
        format!(
            "[[selection.rules]]\nserver = \"{SERVER}\"\npattern = \"vigil-demo-model-server\"\n\
             [transport]\nendpoints = [\"http://127.0.0.1:{grpc}\"]\nplaintext = true\n\
             token_file = \"{}\"\nspool_dir = \"{}\"\ninterval = \"500ms\"\n",
            path("agent.token").display(),
            path("spool").display()
        ),
    )
    .unwrap();
    let mut agent = Process::spawn(
        "vigil-agent",
        Command::new(binary("vigil-agent"))
            .arg("run")
            .arg("--config")
            .arg(path("agent.toml"))
            .arg("--nvml-library")
            .arg(fake_nvml())
            .env("FAKE_NVML_SCENARIO", path("fake-nvml.json"))
            .stdout(Stdio::null())
            .stderr(Stdio::null()),
    );

    // Wait until the aggregator holds every kind of data the pages show, and a verdict.
    let api = Api {
        base: format!("http://127.0.0.1:{http}"),
    };
    let server = format!("{{node=\"{node}\",server=\"{SERVER}\"}}");
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        workload.assert_running();
        aggregator.assert_running();
        agent.assert_running();
        let ready = !api.vector("vigil_gpu_utilization_ratio").is_empty()
            && !api
                .vector(&format!(
                    "rate(vigil_process_cpu_seconds_total{server}[30s])"
                ))
                .is_empty()
            && !api
                .vector(&format!("vigil_server_bottleneck{server} == 1"))
                .is_empty()
            && !api.vector("vigil_gpu_xid_errors_total").is_empty()
            && (!is_root()
                || !api
                    .vector(&format!("vigil_syscall_latency_seconds_count{server}"))
                    .is_empty());
        if ready {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the aggregator did not get the agent's data and a verdict within 90 s"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    // The pages need no token; the data behind them does.
    let page = ureq::get(&format!("{}/node/{node}", api.base))
        .call()
        .unwrap()
        .into_string()
        .unwrap();
    assert!(page.contains("/ui/app.js"), "{page}");
    for path in ["/api/vigil/v1/fleet", "/api/vigil/v1/live?events=1"] {
        match ureq::get(&format!("{}{path}", api.base)).call() {
            Err(ureq::Error::Status(401, _)) => {}
            other => panic!("{path} without a token: {other:?}"),
        }
    }
    // A few more passes, so rates and the heatmap have several points.
    std::thread::sleep(Duration::from_secs(4));

    let profile = tempfile::tempdir().unwrap();
    let browser = Browser::start(profile.path());
    let open = |page: &str| {
        browser.open(&format!(
            "http://127.0.0.1:{http}{page}{}range=300#token={READER_TOKEN}",
            if page.contains('?') { "&" } else { "?" }
        ));
        browser.wait_for(
            &format!("{page} to load"),
            "window.__vigil && window.__vigil.ready",
            Duration::from_secs(30),
        );
    };

    // Fleet.
    open("/");
    let nodes = browser.text("[data-table=nodes]");
    assert!(
        nodes.contains(&node) && nodes.contains("connected"),
        "{nodes}"
    );
    let gpus = browser.text("[data-table=gpus]");
    assert!(gpus.contains("73%") && gpus.contains("61 °C"), "{gpus}");
    let servers = browser.text("[data-table=servers]");
    assert!(servers.contains(SERVER), "{servers}");
    let kinds = [
        "gpu_bound",
        "cpu_starved",
        "kernel_blocked",
        "gpu_idle",
        "memory_pressure",
        "healthy",
    ];
    assert!(
        kinds.iter().any(|kind| servers.contains(kind)),
        "no verdict in the servers table: {servers}"
    );
    // The fleet chart averages the node's two GPUs: 73% and 0%.
    let fleet_gpu = browser.chart("fleet-gpu-utilization");
    assert!(
        close(last_of(&fleet_gpu, &node), GPU0_UTIL / 2.0),
        "{fleet_gpu}"
    );
    browser.assert_no_errors("/");
    browser.screenshot("fleet");

    // Node: the GPU charts hold the stand-in's readings; live updates move them on.
    open(&format!("/node/{node}"));
    let utilization = browser.chart("gpu-utilization");
    assert!(
        close(last_of(&utilization, "GPU 0"), GPU0_UTIL),
        "{utilization}"
    );
    assert!(close(last_of(&utilization, "GPU 1"), 0.0), "{utilization}");
    let temperature = browser.chart("gpu-temperature");
    assert!(
        close(last_of(&temperature, "GPU 0"), GPU0_TEMPERATURE),
        "{temperature}"
    );
    let host_cpu = browser.chart("host-cpu");
    assert!(
        host_cpu["series"]
            .as_array()
            .unwrap()
            .iter()
            .any(|s| s["points"].as_u64().unwrap() >= 2),
        "{host_cpu}"
    );
    let events = browser.text("[data-table=node-events]");
    assert!(
        events.contains("gpu_xid") && events.contains("XID 63"),
        "{events}"
    );
    let before = browser.eval(
        "return [window.__vigil.liveUpdates, window.__vigil.charts['gpu-utilization'].lastTime];",
    );
    browser.wait_for(
        "live updates to extend the GPU chart",
        &format!(
            "window.__vigil.liveUpdates > {} && window.__vigil.charts['gpu-utilization'].lastTime > {}",
            before[0], before[1]
        ),
        Duration::from_secs(15),
    );
    browser.assert_no_errors("/node");
    browser.screenshot("node");

    // Model server: process, GPU share, heatmap, verdict.
    open(&format!("/server/{node}/{SERVER}"));
    let rss = browser.chart("server-rss");
    // The workload's own pid: the server may have other processes (the chart has a series
    // per pid, and the API answers them in no particular order).
    let pid = workload.child.id();
    let stored_rss = api.vector(&format!(
        "vigil_process_resident_memory_bytes{{node=\"{node}\",server=\"{SERVER}\",pid=\"{pid}\"}}"
    ))[0]["value"][1]
        .as_str()
        .unwrap()
        .parse::<f64>()
        .unwrap();
    let pid_series = format!("pid {pid}");
    let shown_rss = last_of(&rss, &pid_series);
    assert!(
        (shown_rss - stored_rss).abs() <= 0.2 * stored_rss && shown_rss > 50e6,
        "RSS shown {shown_rss}, stored {stored_rss}"
    );
    let gpu_memory = browser.chart("server-gpu-memory");
    assert!(
        close(last_of(&gpu_memory, "GPU 0"), SERVER_GPU_MEMORY),
        "{gpu_memory}"
    );
    let cpu = browser.chart("server-cpu");
    assert!(
        !cpu["series"].as_array().unwrap().is_empty(),
        "no CPU series: {cpu}"
    );
    let heatmap = browser.chart("syscall-heatmap");
    if is_root() {
        assert!(
            heatmap["cells"].as_u64().unwrap() > 0,
            "empty heatmap as root: {heatmap}"
        );
        let table = browser.text("[data-table=syscalls]");
        assert!(
            table.contains("write") || table.contains("sendto"),
            "{table}"
        );
    } else {
        let panel = browser.text("[data-chart=syscall-heatmap]");
        assert!(panel.contains("needs root"), "{panel}");
    }
    let verdict = browser.wait_for(
        "the verdict",
        "document.querySelector('.verdict') && document.querySelector('.verdict').dataset.kind",
        Duration::from_secs(10),
    );
    assert!(
        kinds.contains(&verdict.as_str().unwrap()),
        "unknown verdict {verdict}"
    );
    assert!(browser.text("#verdict").contains("cpu cores"));
    browser.assert_no_errors("/server");
    browser.screenshot("server");

    // Alerts: the XID fired GPUXidError; the shipped rules are listed.
    open("/alerts");
    let rules = browser.text("[data-table=rules]");
    assert!(
        rules.contains("GPUXidError") && rules.contains("AgentSilent"),
        "{rules}"
    );
    browser.wait_for(
        "GPUXidError to show as firing",
        "(() => { const t = document.querySelector('[data-table=active]'); \
         return t && t.innerText.includes('GPUXidError') && t.innerText.includes('firing'); })()",
        Duration::from_secs(20),
    );
    browser.assert_no_errors("/alerts");
    browser.screenshot("alerts");

    // The agent again, now without an NVML to load: the node page says why the GPU data
    // stopped, in the agent's words. (The first agent stops first: they share the spool.)
    drop(agent);
    let mut agent = Process::spawn(
        "vigil-agent (no NVML)",
        Command::new(binary("vigil-agent"))
            .arg("run")
            .arg("--config")
            .arg(path("agent.toml"))
            .arg("--nvml-library")
            .arg(path("no-such-dir/libnvidia-ml.so.1"))
            .stdout(Stdio::null())
            .stderr(Stdio::null()),
    );
    open(&format!("/node/{node}"));
    let note = browser.wait_for(
        "the node page to say why the GPU collector stopped",
        "(() => { const n = document.querySelector('#gpu-status'); \
         return n && n.innerText.includes('unavailable') && n.innerText; })()",
        Duration::from_secs(30),
    );
    assert!(note.as_str().unwrap().contains("NVML"), "{note}");
    agent.assert_running();
    browser.assert_no_errors("/node without NVML");
    browser.screenshot("node-without-nvml");
}
