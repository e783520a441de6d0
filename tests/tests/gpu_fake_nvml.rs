//! The `gpu` collector against the stand-in driver (`tests/fake-nvml`), loaded through
//! nvml-wrapper's real loading path: what the agent reports equals what the scenario says at
//! that moment, health events arrive within a second, NotSupported readings are left out,
//! a device can fall off the bus mid-run, and NVML init can fail and recover.
//!
//! Each test copies the stand-in into a folder of its own with its scenario next to it
//! (`fake-nvml-scenario.json`), so the copies are separate libraries with separate state and
//! the tests run in parallel.

use std::{
    path::PathBuf,
    process::Command,
    time::{Duration, Instant},
};

use serde_json::{Value, json};
use vigil_agent::{
    collectors::{
        CollectorStatus,
        gpu::{
            CLOCK_METRIC, DECODER_UTILIZATION_METRIC, ECC_ERROR_EVENTS_METRIC, ECC_ERRORS_METRIC,
            ENCODER_UTILIZATION_METRIC, ENERGY_METRIC, FAN_SPEED_METRIC, GpuCollector, GpuConfig,
            MEMORY_FREE_METRIC, MEMORY_TOTAL_METRIC, MEMORY_USED_METRIC, MEMORY_UTILIZATION_METRIC,
            MIG_ENABLED_METRIC, MIG_MEMORY_TOTAL_METRIC, MIG_MEMORY_USED_METRIC,
            NVLINK_ACTIVE_METRIC, NVLINK_ERRORS_METRIC, PCIE_RX_METRIC, PCIE_TX_METRIC,
            PERFORMANCE_STATE_METRIC, POWER_LIMIT_METRIC, POWER_METRIC,
            PROCESS_DECODER_UTILIZATION_METRIC, PROCESS_ENCODER_UTILIZATION_METRIC,
            PROCESS_MEMORY_METRIC, PROCESS_MEMORY_UTILIZATION_METRIC,
            PROCESS_SM_UTILIZATION_METRIC, REMAPPED_ROWS_METRIC, ROW_REMAP_FAILED_METRIC,
            ROW_REMAP_PENDING_METRIC, TEMPERATURE_METRIC, THROTTLE_REASON_METRIC,
            UNTRACKED_PROCESS_MEMORY_METRIC, UP_METRIC, UTILIZATION_METRIC, XID_ERRORS_METRIC,
        },
    },
    sample::{Event, Sample, SampleValue},
    selection::{ModelServerProcess, PassSelection},
};

const UUID_0: &str = "GPU-5a1c0d3e-0000-4000-8000-000000000000";
const UUID_1: &str = "GPU-5a1c0d3e-0000-4000-8000-000000000001";
const MODEL: &str = "NVIDIA H100 80GB HBM3";
const MEMORY_TOTAL: u64 = 85_520_809_984;

/// The stand-in library cargo built for this test run: a dev-dependency of this crate, so its
/// `cdylib` lands in `target/<profile>/deps/`, next to this test binary.
fn built_fake_library() -> PathBuf {
    let exe = std::env::current_exe().expect("test binary path");
    let deps = exe.parent().expect("test binary folder");
    let candidates = [
        deps.join("libfake_nvml.so"),
        deps.join("../libfake_nvml.so"),
    ];
    candidates
        .iter()
        .find(|path| path.exists())
        .cloned()
        .unwrap_or_else(|| {
            panic!(
                "libfake_nvml.so not found in {candidates:?}; build it with \
                 `cargo build -p fake-nvml`"
            )
        })
}

/// A copy of the stand-in driver with a scenario of its own.
struct FakeDriver {
    dir: tempfile::TempDir,
    library: PathBuf,
}

impl FakeDriver {
    fn new(scenario: Value) -> Self {
        assert!(
            std::env::var_os("FAKE_NVML_SCENARIO").is_none(),
            "unset FAKE_NVML_SCENARIO: these tests give each copy of the library its own scenario"
        );
        let dir = tempfile::tempdir().unwrap();
        let library = dir.path().join("libnvidia-ml.so.1");
        std::fs::copy(built_fake_library(), &library).unwrap();
        let driver = Self { dir, library };
        driver.set_scenario(scenario);
        driver
    }

    /// Takes effect at the next first `nvmlInit_v2`.
    fn set_scenario(&self, scenario: Value) {
        std::fs::write(
            self.dir.path().join(fake_nvml::SCENARIO_FILE_NAME),
            serde_json::to_vec_pretty(&scenario).unwrap(),
        )
        .unwrap();
    }

    fn config(&self) -> GpuConfig {
        GpuConfig {
            nvml_library: self.library.to_str().unwrap().to_string(),
            init_retry_seconds: 0,
            ..Default::default()
        }
    }
}

/// A running collector and the moment it started (no later than the stand-in's time 0).
struct Run {
    collector: GpuCollector,
    started: Instant,
}

impl Run {
    fn start(driver: &FakeDriver) -> Self {
        let started = Instant::now();
        let collector = GpuCollector::start(&driver.config());
        Self { collector, started }
    }

    fn sleep_until(&self, seconds: f64) {
        let at = self.started + Duration::from_secs_f64(seconds);
        let now = Instant::now();
        if at > now {
            std::thread::sleep(at - now);
        }
    }

    /// A pass at `seconds` after start, with these tracked processes; its samples.
    fn pass_at(&mut self, seconds: f64, tracked: &[ModelServerProcess]) -> Vec<Sample> {
        self.sleep_until(seconds);
        let selection = PassSelection {
            tracked: tracked.to_vec(),
            folded: Vec::new(),
        };
        self.collector.collect(&selection);
        self.collector.samples()
    }

    /// Events as they are taken, polled every 10 ms until `count` arrived or `until_s` passed,
    /// each with the seconds since start at which it was first seen.
    fn events_until(&mut self, count: usize, until_s: f64) -> Vec<(f64, Event)> {
        let mut seen = Vec::new();
        while seen.len() < count && self.started.elapsed().as_secs_f64() < until_s {
            for event in self.collector.take_events() {
                seen.push((self.started.elapsed().as_secs_f64(), event));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        seen
    }
}

fn device(uuid: &str, bus: &str, extra: Value) -> Value {
    let mut device = json!({
        "uuid": uuid,
        "name": MODEL,
        "pci_bus_id": bus,
        "memory_total_bytes": MEMORY_TOTAL,
        "power_limit_mw": 700_000,
        "timeline": [{"at_s": 0, "gpu_util": 10}],
        "nvlinks": [{"active": true}, {"active": true}],
    });
    device
        .as_object_mut()
        .unwrap()
        .extend(extra.as_object().unwrap().clone());
    device
}

/// The value of the one sample named `name` on gpu `gpu` whose labels include `labels`.
fn value(samples: &[Sample], name: &str, gpu: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let matching: Vec<f64> = samples
        .iter()
        .filter(|s| s.name == name && s.labels.get("gpu").map(String::as_str) == Some(gpu))
        .filter(|s| {
            labels
                .iter()
                .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
        })
        .map(|s| match s.value {
            SampleValue::Value(v) => v,
            SampleValue::Histogram(_) => panic!("{name} is a histogram"),
        })
        .collect();
    assert!(matching.len() <= 1, "{name} {labels:?}: {matching:?}");
    matching.first().copied()
}

/// Readings of one device at one moment, in NVML's units, as the scenario states them.
struct Readings {
    gpu_util: u32,
    mem_util: u32,
    memory_used: u64,
    power_mw: u32,
    energy_mj: u64,
    temperature_c: u32,
    fan_pct: u32,
    sm_mhz: u32,
    memory_mhz: u32,
    graphics_mhz: u32,
    pstate: u32,
    encoder: u32,
    decoder: u32,
    pcie_tx_kbps: u32,
    pcie_rx_kbps: u32,
    throttle: &'static [&'static str],
    ecc_corrected_volatile: u64,
    ecc_uncorrected_aggregate: u64,
    remapped_correctable: u32,
    remap_pending: bool,
}

impl Readings {
    fn timeline_entry(&self, at_s: f64) -> Value {
        json!({
            "at_s": at_s, "gpu_util": self.gpu_util, "mem_util": self.mem_util,
            "memory_used_bytes": self.memory_used, "power_mw": self.power_mw,
            "energy_mj": self.energy_mj, "temperature_c": self.temperature_c,
            "fan_speed_pct": self.fan_pct, "sm_clock_mhz": self.sm_mhz,
            "memory_clock_mhz": self.memory_mhz, "graphics_clock_mhz": self.graphics_mhz,
            "performance_state": self.pstate, "encoder_util": self.encoder,
            "decoder_util": self.decoder, "pcie_tx_kbps": self.pcie_tx_kbps,
            "pcie_rx_kbps": self.pcie_rx_kbps, "throttle_reasons": self.throttle,
            "ecc_corrected_volatile": self.ecc_corrected_volatile,
            "ecc_uncorrected_aggregate": self.ecc_uncorrected_aggregate,
            "remapped_rows_correctable": self.remapped_correctable,
            "remapped_rows_pending": self.remap_pending,
        })
    }

    /// Asserts the agent's samples for gpu 0 say exactly this, in base units.
    fn assert_reported(&self, samples: &[Sample]) {
        let get = |name, labels: &[(&str, &str)]| {
            value(samples, name, "0", labels)
                .unwrap_or_else(|| panic!("no {name} {labels:?} in {samples:#?}"))
        };
        assert_eq!(get(UP_METRIC, &[]), 1.0);
        assert_eq!(get(UTILIZATION_METRIC, &[]), self.gpu_util as f64 / 100.0);
        assert_eq!(
            get(MEMORY_UTILIZATION_METRIC, &[]),
            self.mem_util as f64 / 100.0
        );
        assert_eq!(get(MEMORY_USED_METRIC, &[]), self.memory_used as f64);
        assert_eq!(
            get(MEMORY_FREE_METRIC, &[]),
            (MEMORY_TOTAL - self.memory_used) as f64
        );
        assert_eq!(get(MEMORY_TOTAL_METRIC, &[]), MEMORY_TOTAL as f64);
        assert_eq!(get(POWER_METRIC, &[]), self.power_mw as f64 / 1e3);
        assert_eq!(get(POWER_LIMIT_METRIC, &[]), 700.0);
        assert_eq!(get(ENERGY_METRIC, &[]), self.energy_mj as f64 / 1e3);
        assert_eq!(get(TEMPERATURE_METRIC, &[]), self.temperature_c as f64);
        assert_eq!(
            get(FAN_SPEED_METRIC, &[("fan", "0")]),
            self.fan_pct as f64 / 100.0
        );
        assert_eq!(
            get(CLOCK_METRIC, &[("clock", "sm")]),
            self.sm_mhz as f64 * 1e6
        );
        assert_eq!(
            get(CLOCK_METRIC, &[("clock", "memory")]),
            self.memory_mhz as f64 * 1e6
        );
        assert_eq!(
            get(CLOCK_METRIC, &[("clock", "graphics")]),
            self.graphics_mhz as f64 * 1e6
        );
        assert_eq!(get(PERFORMANCE_STATE_METRIC, &[]), self.pstate as f64);
        assert_eq!(
            get(ENCODER_UTILIZATION_METRIC, &[]),
            self.encoder as f64 / 100.0
        );
        assert_eq!(
            get(DECODER_UTILIZATION_METRIC, &[]),
            self.decoder as f64 / 100.0
        );
        assert_eq!(get(PCIE_TX_METRIC, &[]), self.pcie_tx_kbps as f64 * 1024.0);
        assert_eq!(get(PCIE_RX_METRIC, &[]), self.pcie_rx_kbps as f64 * 1024.0);
        for reason in [
            "gpu_idle",
            "applications_clocks_setting",
            "sw_power_cap",
            "hw_slowdown",
            "sync_boost",
            "sw_thermal_slowdown",
            "hw_thermal_slowdown",
            "hw_power_brake_slowdown",
            "display_clock_setting",
        ] {
            let on = self.throttle.contains(&reason);
            assert_eq!(
                get(THROTTLE_REASON_METRIC, &[("reason", reason)]),
                if on { 1.0 } else { 0.0 },
                "{reason}"
            );
        }
        let ecc = |kind, counter| get(ECC_ERRORS_METRIC, &[("type", kind), ("counter", counter)]);
        assert_eq!(
            ecc("corrected", "volatile"),
            self.ecc_corrected_volatile as f64
        );
        assert_eq!(ecc("uncorrected", "volatile"), 0.0);
        assert_eq!(ecc("corrected", "aggregate"), 0.0);
        assert_eq!(
            ecc("uncorrected", "aggregate"),
            self.ecc_uncorrected_aggregate as f64
        );
        assert_eq!(
            get(REMAPPED_ROWS_METRIC, &[("cause", "correctable")]),
            self.remapped_correctable as f64
        );
        assert_eq!(
            get(REMAPPED_ROWS_METRIC, &[("cause", "uncorrectable")]),
            0.0
        );
        assert_eq!(
            get(ROW_REMAP_PENDING_METRIC, &[]),
            if self.remap_pending { 1.0 } else { 0.0 }
        );
        assert_eq!(get(ROW_REMAP_FAILED_METRIC, &[]), 0.0);
    }
}

const IDLE: Readings = Readings {
    gpu_util: 3,
    mem_util: 1,
    memory_used: 1 << 30,
    power_mw: 95_250,
    energy_mj: 123_456_789,
    temperature_c: 34,
    fan_pct: 30,
    sm_mhz: 345,
    memory_mhz: 2619,
    graphics_mhz: 345,
    pstate: 8,
    encoder: 0,
    decoder: 0,
    pcie_tx_kbps: 1_000,
    pcie_rx_kbps: 2_000,
    throttle: &["gpu_idle"],
    ecc_corrected_volatile: 0,
    ecc_uncorrected_aggregate: 0,
    remapped_correctable: 0,
    remap_pending: false,
};

const BUSY: Readings = Readings {
    gpu_util: 97,
    mem_util: 61,
    memory_used: 71_000_000_000,
    power_mw: 688_500,
    energy_mj: 123_999_999,
    temperature_c: 79,
    fan_pct: 85,
    sm_mhz: 1980,
    memory_mhz: 2619,
    graphics_mhz: 1980,
    pstate: 0,
    encoder: 12,
    decoder: 7,
    pcie_tx_kbps: 5_500_000,
    pcie_rx_kbps: 21_000_000,
    throttle: &["sw_power_cap", "hw_thermal_slowdown"],
    ecc_corrected_volatile: 3,
    ecc_uncorrected_aggregate: 1,
    remapped_correctable: 1,
    remap_pending: true,
};

#[test]
fn device_readings_equal_the_scenario_at_each_moment() {
    let driver = FakeDriver::new(
        json!({"devices": [device(UUID_0, "00000000:17:00.0", json!({
            "timeline": [IDLE.timeline_entry(0.0), BUSY.timeline_entry(1.0)],
            "nvlinks": [
                {"active": true, "replay_errors": 2, "recovery_errors": 1,
                 "crc_flit_errors": 7, "crc_data_errors": 5},
                {"active": false},
            ],
        }))]}),
    );
    let mut run = Run::start(&driver);
    assert_eq!(run.collector.status(), CollectorStatus::Ok);

    let samples = run.pass_at(0.5, &[]);
    IDLE.assert_reported(&samples);
    let up = samples.iter().find(|s| s.name == UP_METRIC).unwrap();
    assert_eq!(
        up.labels,
        [
            ("gpu", "0"),
            ("uuid", UUID_0),
            ("model", MODEL),
            ("pci_bus_id", "00000000:17:00.0"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
    );
    assert!(run.collector.take_events().is_empty());
    let nvlink = |name, labels: &[(&str, &str)]| value(&samples, name, "0", labels);
    assert_eq!(nvlink(NVLINK_ACTIVE_METRIC, &[("link", "0")]), Some(1.0));
    assert_eq!(nvlink(NVLINK_ACTIVE_METRIC, &[("link", "1")]), Some(0.0));
    assert_eq!(nvlink(NVLINK_ACTIVE_METRIC, &[("link", "2")]), None);
    for (counter, count) in [
        ("replay", 2.0),
        ("recovery", 1.0),
        ("crc_flit", 7.0),
        ("crc_data", 5.0),
    ] {
        let labels = [("link", "0"), ("counter", counter)];
        assert_eq!(
            nvlink(NVLINK_ERRORS_METRIC, &labels),
            Some(count),
            "{counter}"
        );
        let labels = [("link", "1"), ("counter", counter)];
        assert_eq!(
            nvlink(NVLINK_ERRORS_METRIC, &labels),
            Some(0.0),
            "{counter}"
        );
    }

    // PCIe throughput is sampled off the pass once a second: by 2.5 s it has read after 1 s.
    let samples = run.pass_at(2.5, &[]);
    BUSY.assert_reported(&samples);
    assert_eq!(run.collector.status(), CollectorStatus::Ok);
    let events = run.collector.take_events();
    assert_eq!(events.len(), 1, "{events:#?}");
    assert_eq!(events[0].kind, "gpu_clock_event_reasons_changed");
    assert_eq!(
        events[0].message,
        format!("gpu 0 ({MODEL}) clock-event reasons now: sw_power_cap, hw_thermal_slowdown")
    );
}

#[test]
fn not_supported_readings_are_left_out_and_named_once_in_the_status() {
    let driver = FakeDriver::new(
        json!({"devices": [device(UUID_0, "00000000:17:00.0", json!({
            "not_supported": ["fan_speed", "encoder_utilization", "pcie_throughput", "ecc",
                              "events", "remapped_rows"],
            "timeline": [IDLE.timeline_entry(0.0)],
            "nvlinks": [],
        }))]}),
    );
    let mut run = Run::start(&driver);
    run.pass_at(0.5, &[]);
    let samples = run.pass_at(0.6, &[]);
    for missing in [
        FAN_SPEED_METRIC,
        ENCODER_UTILIZATION_METRIC,
        PCIE_TX_METRIC,
        PCIE_RX_METRIC,
        ECC_ERRORS_METRIC,
        REMAPPED_ROWS_METRIC,
        ROW_REMAP_PENDING_METRIC,
        NVLINK_ACTIVE_METRIC,
        NVLINK_ERRORS_METRIC,
    ] {
        assert!(
            samples.iter().all(|s| s.name != missing),
            "{missing} reported though not supported: {samples:#?}"
        );
    }
    assert_eq!(value(&samples, UTILIZATION_METRIC, "0", &[]), Some(0.03));
    assert_eq!(
        value(&samples, DECODER_UTILIZATION_METRIC, "0", &[]),
        Some(0.0)
    );
    assert_eq!(
        run.collector.status(),
        CollectorStatus::Degraded(format!(
            "gpu 0 ({MODEL}) does not support: ecc, encoder_utilization, events, fan_speed, \
             nvlink, pcie_throughput, remapped_rows"
        ))
    );
}

#[test]
fn health_events_arrive_within_a_second_without_waiting_for_a_pass() {
    let driver = FakeDriver::new(
        json!({"devices": [device(UUID_0, "00000000:17:00.0", json!({
            "events": [
                {"at_s": 0.5, "type": "xid", "xid": 13},
            {"at_s": 0.7, "type": "ecc_single_bit"},
                {"at_s": 1.0, "type": "ecc_double_bit"},
                {"at_s": 1.0, "type": "xid", "xid": 48},
                {"at_s": 1.5, "type": "xid", "xid": 13},
                {"at_s": 1.5, "type": "xid", "xid": 119},
            ],
        }))]}),
    );
    let mut run = Run::start(&driver);
    let events = run.events_until(6, 4.0);
    const XID_13: &str =
        "XID 13: graphics engine exception (often an application fault, e.g. an illegal access)";
    let expected = [
        (0.5, "gpu_xid", "13", XID_13),
        (0.7, "gpu_ecc_error", "", "single-bit ECC error (corrected)"),
        (
            1.0,
            "gpu_ecc_error",
            "",
            "double-bit ECC error (uncorrected)",
        ),
        (
            1.0,
            "gpu_xid",
            "48",
            "XID 48: double-bit ECC error (uncorrectable memory error)",
        ),
        (1.5, "gpu_xid", "13", XID_13),
        (1.5, "gpu_xid", "119", "XID 119: see NVIDIA's XID catalog"),
    ];
    assert_eq!(events.len(), expected.len(), "{events:#?}");
    for ((seen_at, event), (at_s, kind, xid, what)) in events.iter().zip(expected) {
        assert!(
            *seen_at >= at_s && *seen_at < at_s + 1.0,
            "{kind} due at {at_s} s seen at {seen_at:.3} s"
        );
        assert_eq!(event.kind, kind);
        assert_eq!(event.message, format!("gpu 0 ({MODEL}) {what}"));
        assert_eq!(event.labels.get("uuid").map(String::as_str), Some(UUID_0));
        if !xid.is_empty() {
            assert_eq!(event.labels.get("xid").map(String::as_str), Some(xid));
        }
    }
    // The counters are up to date without a pass.
    let samples = run.collector.samples();
    assert_eq!(
        value(&samples, XID_ERRORS_METRIC, "0", &[("xid", "13")]),
        Some(2.0)
    );
    assert_eq!(
        value(&samples, XID_ERRORS_METRIC, "0", &[("xid", "48")]),
        Some(1.0)
    );
    assert_eq!(
        value(&samples, XID_ERRORS_METRIC, "0", &[("xid", "119")]),
        Some(1.0)
    );
    assert_eq!(
        value(
            &samples,
            ECC_ERROR_EVENTS_METRIC,
            "0",
            &[("type", "double_bit")]
        ),
        Some(1.0)
    );
    assert_eq!(
        value(
            &samples,
            ECC_ERROR_EVENTS_METRIC,
            "0",
            &[("type", "single_bit")]
        ),
        Some(1.0)
    );
}

/// A device idle from the start whose clock-event reasons change at 1.0 s (and, if
/// `back_at` is given, go back to idle then).
fn throttled_at_one_second(back_at: Option<f64>, extra: Value) -> Value {
    let mut timeline = vec![
        IDLE.timeline_entry(0.0),
        json!({"at_s": 1.0, "throttle_reasons": ["sw_power_cap", "hw_thermal_slowdown"]}),
    ];
    if let Some(at_s) = back_at {
        timeline.push(json!({"at_s": at_s, "throttle_reasons": ["gpu_idle"]}));
    }
    let mut fields = json!({"timeline": timeline});
    fields
        .as_object_mut()
        .unwrap()
        .extend(extra.as_object().unwrap().clone());
    device(UUID_0, "00000000:17:00.0", fields)
}

const THROTTLED_MESSAGE: &str = "clock-event reasons now: sw_power_cap, hw_thermal_slowdown";

/// Asserts `event` is the clock-event reason change of gpu 0 to `now`, labelled as its series.
fn assert_clock_event(event: &Event, now: &str) {
    assert_eq!(event.kind, "gpu_clock_event_reasons_changed", "{event:#?}");
    assert_eq!(event.message, format!("gpu 0 ({MODEL}) {now}"));
    assert_eq!(
        event.labels,
        [
            ("gpu", "0"),
            ("uuid", UUID_0),
            ("model", MODEL),
            ("pci_bus_id", "00000000:17:00.0"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
    );
}

#[test]
fn clock_event_reason_changes_arrive_within_a_second_without_waiting_for_a_pass() {
    let driver = FakeDriver::new(json!({"devices": [throttled_at_one_second(None, json!({}))]}));
    let mut run = Run::start(&driver);
    let samples = run.pass_at(0.3, &[]);
    IDLE.assert_reported(&samples);
    assert!(run.collector.take_events().is_empty());

    // No pass from here on until the event has arrived: the health thread reports it.
    let events = run.events_until(1, 3.0);
    assert_eq!(events.len(), 1, "{events:#?}");
    let (seen_at, event) = &events[0];
    assert!(
        *seen_at >= 1.0 && *seen_at < 2.0,
        "clock event due at 1.0 s seen at {seen_at:.3} s"
    );
    assert_clock_event(event, THROTTLED_MESSAGE);

    // The next passes see the new reasons, and do not report the change again.
    for at in [2.0, 2.1] {
        let samples = run.pass_at(at, &[]);
        assert_eq!(
            value(
                &samples,
                THROTTLE_REASON_METRIC,
                "0",
                &[("reason", "sw_power_cap")]
            ),
            Some(1.0)
        );
        assert_eq!(
            value(
                &samples,
                THROTTLE_REASON_METRIC,
                "0",
                &[("reason", "gpu_idle")]
            ),
            Some(0.0)
        );
        let events = run.collector.take_events();
        assert!(events.is_empty(), "reported twice: {events:#?}");
    }
    assert_eq!(run.collector.status(), CollectorStatus::Ok);
}

#[test]
fn without_clock_events_the_health_thread_polls_and_reports_a_change_once() {
    let driver = FakeDriver::new(json!({"devices": [throttled_at_one_second(
        None,
        json!({"not_supported": ["clock_events"]}),
    )]}));
    let mut run = Run::start(&driver);
    run.pass_at(0.5, &[]);
    assert!(run.collector.take_events().is_empty());
    // No clock event comes, but the health thread reads the reasons every 200 ms.
    let events = run.events_until(1, 1.8);
    assert_eq!(events.len(), 1, "{events:#?}");
    let (seen_at, event) = &events[0];
    assert!(
        (1.0..1.5).contains(seen_at),
        "due at 1.0 s, seen at {seen_at:.3} s"
    );
    assert_clock_event(event, THROTTLED_MESSAGE);
    run.pass_at(2.0, &[]);
    run.pass_at(2.1, &[]);
    let events = run.collector.take_events();
    assert!(events.is_empty(), "reported twice: {events:#?}");
    assert_eq!(run.collector.status(), CollectorStatus::Ok);
}

#[test]
fn clock_event_reason_changes_are_reported_once_while_passes_race_the_health_thread() {
    let driver = FakeDriver::new(json!({"devices": [throttled_at_one_second(
        Some(1.5),
        json!({}),
    )]}));
    let mut run = Run::start(&driver);
    let mut events = Vec::new();
    let mut at = 0.5;
    while at < 2.6 {
        run.pass_at(at, &[]);
        for event in run.collector.take_events() {
            events.push((run.started.elapsed().as_secs_f64(), event));
        }
        at += 0.02;
    }
    assert_eq!(events.len(), 2, "{events:#?}");
    for ((seen_at, event), (due_at, now)) in events.iter().zip([
        (1.0, THROTTLED_MESSAGE),
        (1.5, "clock-event reasons now: gpu_idle"),
    ]) {
        assert!(
            *seen_at >= due_at && *seen_at < due_at + 1.0,
            "clock event due at {due_at} s seen at {seen_at:.3} s"
        );
        assert_clock_event(event, now);
    }
}

#[test]
fn a_device_lost_mid_run_is_reported_at_once_and_its_readings_stop() {
    let driver = FakeDriver::new(json!({"devices": [
        device(UUID_0, "00000000:17:00.0", json!({})),
        device(UUID_1, "00000000:18:00.0", json!({
            "timeline": [{"at_s": 0, "gpu_util": 55}],
            "events": [
                {"at_s": 1.0, "type": "xid", "xid": 79},
                {"at_s": 1.0, "type": "device_lost"},
            ],
        })),
    ]}));
    let mut run = Run::start(&driver);
    let samples = run.pass_at(0.3, &[]);
    assert_eq!(value(&samples, UP_METRIC, "1", &[]), Some(1.0));
    assert_eq!(value(&samples, UTILIZATION_METRIC, "1", &[]), Some(0.55));

    let events = run.events_until(2, 3.0);
    let kinds: Vec<&str> = events.iter().map(|(_, e)| e.kind).collect();
    assert_eq!(kinds, ["gpu_xid", "gpu_lost"], "{events:#?}");
    for (seen_at, event) in &events {
        assert!(
            *seen_at >= 1.0 && *seen_at < 2.0,
            "{} seen at {seen_at:.3} s",
            event.kind
        );
        assert_eq!(event.labels.get("gpu").map(String::as_str), Some("1"));
    }
    assert_eq!(
        events[0].1.message,
        format!("gpu 1 ({MODEL}) XID 79: GPU has fallen off the bus")
    );

    for at in [2.0, 2.1] {
        let samples = run.pass_at(at, &[]);
        assert_eq!(value(&samples, UP_METRIC, "1", &[]), Some(0.0));
        assert_eq!(value(&samples, UTILIZATION_METRIC, "1", &[]), None);
        assert_eq!(value(&samples, UP_METRIC, "0", &[]), Some(1.0));
        assert_eq!(value(&samples, UTILIZATION_METRIC, "0", &[]), Some(0.1));
        // The XID counter outlives the device's readings.
        assert_eq!(
            value(&samples, XID_ERRORS_METRIC, "1", &[("xid", "79")]),
            Some(1.0)
        );
    }
    assert!(run.collector.take_events().is_empty(), "lost reported once");
    assert_eq!(
        run.collector.status(),
        CollectorStatus::Degraded(format!(
            "gpu 1 ({UUID_1}, 00000000:18:00.0) fell off the bus (NVML: GPU is lost): no metrics \
             from it until the driver is reloaded or the node rebooted"
        ))
    );
}

#[test]
fn init_failure_is_unavailable_with_the_reason_and_retried_until_the_driver_loads() {
    let driver = FakeDriver::new(json!({"init_error": "driver_not_loaded", "devices": [
        device(UUID_0, "00000000:17:00.0", json!({})),
    ]}));
    let mut run = Run::start(&driver);
    let library = driver.library.display();
    let reason = format!(
        "NVML init failed ({library}): the NVIDIA kernel driver is not loaded \
         (NVML_ERROR_DRIVER_NOT_LOADED); load it (modprobe nvidia) or install the driver; GPU \
         metrics disabled (retrying every pass)"
    );
    assert_eq!(
        run.collector.status(),
        CollectorStatus::Unavailable(reason.clone())
    );
    assert!(run.pass_at(0.0, &[]).is_empty());
    assert_eq!(run.collector.status(), CollectorStatus::Unavailable(reason));

    // The driver is loaded: the next retry picks it up.
    driver.set_scenario(json!({"devices": [device(UUID_0, "00000000:17:00.0", json!({}))]}));
    let samples = run.pass_at(0.0, &[]);
    assert_eq!(run.collector.status(), CollectorStatus::Ok);
    assert_eq!(value(&samples, UTILIZATION_METRIC, "0", &[]), Some(0.1));
    let events = run.collector.take_events();
    assert_eq!(events.len(), 1, "{events:#?}");
    assert_eq!(events[0].kind, "gpu_nvml_available");
}

#[test]
fn a_gpu_lost_before_the_agent_starts_is_named_and_the_others_are_watched() {
    let driver = FakeDriver::new(json!({"devices": [
        device(UUID_0, "00000000:17:00.0", json!({"events": [{"at_s": 0, "type": "device_lost"}]})),
        device(UUID_1, "00000000:18:00.0", json!({})),
    ]}));
    let mut run = Run::start(&driver);
    let samples = run.pass_at(0.0, &[]);
    assert_eq!(value(&samples, UP_METRIC, "0", &[]), None);
    assert_eq!(value(&samples, UP_METRIC, "1", &[]), Some(1.0));
    assert_eq!(value(&samples, UTILIZATION_METRIC, "1", &[]), Some(0.1));
    assert_eq!(
        run.collector.status(),
        CollectorStatus::Degraded(
            "gpu 0 cannot be identified, so it is not watched: it has fallen off the bus \
             (NVML: GPU is lost)"
                .into()
        )
    );
}

#[test]
fn nvml_starts_afresh_when_every_gpu_has_fallen_off_the_bus() {
    let driver = FakeDriver::new(
        json!({"devices": [device(UUID_0, "00000000:17:00.0", json!({
            "events": [{"at_s": 0.3, "type": "device_lost"}],
        }))]}),
    );
    let mut run = Run::start(&driver);
    let events = run.events_until(1, 2.0);
    assert_eq!(events.len(), 1, "{events:#?}");
    assert_eq!(events[0].1.kind, "gpu_lost");
    let samples = run.pass_at(0.0, &[]);
    assert_eq!(value(&samples, UP_METRIC, "0", &[]), Some(0.0));

    // The GPU is reset (or the driver reloaded): the next pass starts NVML again and finds it.
    driver.set_scenario(json!({"devices": [device(UUID_0, "00000000:17:00.0", json!({}))]}));
    let samples = run.pass_at(0.0, &[]);
    assert_eq!(value(&samples, UP_METRIC, "0", &[]), Some(1.0));
    assert_eq!(value(&samples, UTILIZATION_METRIC, "0", &[]), Some(0.1));
    assert_eq!(run.collector.status(), CollectorStatus::Ok);
    let events = run.collector.take_events();
    let kinds: Vec<&str> = events.iter().map(|e| e.kind).collect();
    assert_eq!(kinds, ["gpu_nvml_available"], "{events:#?}");
}

#[test]
fn a_driver_library_version_mismatch_says_what_to_do() {
    let driver = FakeDriver::new(json!({"init_error": "lib_rm_version_mismatch"}));
    let run = Run::start(&driver);
    assert_eq!(
        run.collector.status(),
        CollectorStatus::Unavailable(format!(
            "NVML init failed ({}): NVML and the NVIDIA kernel driver are from different \
             releases (NVML_ERROR_LIB_RM_VERSION_MISMATCH), as after a driver upgrade without a \
             reboot; reboot or reload the nvidia kernel modules; GPU metrics disabled (retrying \
             every pass)",
            driver.library.display()
        ))
    );
}

#[test]
fn gpu_processes_are_joined_to_tracked_model_servers_by_pid() {
    let driver = FakeDriver::new(
        json!({"devices": [device(UUID_0, "00000000:17:00.0", json!({
            "processes": [
                {"pid": 4242, "used_memory_bytes": 2147483648u64, "sm_util": 80, "mem_util": 40,
                 "enc_util": 1, "dec_util": 2, "until_s": 1.0},
                {"pid": 5151, "kind": "graphics", "used_memory_bytes": 1073741824u64, "sm_util": 5},
                {"pid": 6060, "used_memory_bytes": 536870912u64},
            ],
        }))]}),
    );
    let tracked = [
        ModelServerProcess {
            pid: 4242,
            start_time_ticks: 1,
            comm: "tritonserver".into(),
            server: "triton".into(),
        },
        ModelServerProcess {
            pid: 7070,
            start_time_ticks: 1,
            comm: "vllm".into(),
            server: "vllm".into(),
        },
    ];
    let mut run = Run::start(&driver);
    // The second pass right after the first usually finds no utilization sample newer than
    // the last one seen (the stand-in stamps them every 100 ms): the last one still stands.
    for at in [0.25, 0.26] {
        let samples = run.pass_at(at, &tracked);
        let server = [
            ("pid", "4242"),
            ("comm", "tritonserver"),
            ("server", "triton"),
        ];
        assert_eq!(
            value(&samples, PROCESS_MEMORY_METRIC, "0", &server),
            Some(2147483648.0)
        );
        assert_eq!(
            value(&samples, PROCESS_SM_UTILIZATION_METRIC, "0", &server),
            Some(0.8)
        );
        assert_eq!(
            value(&samples, PROCESS_MEMORY_UTILIZATION_METRIC, "0", &server),
            Some(0.4)
        );
        assert_eq!(
            value(&samples, PROCESS_ENCODER_UTILIZATION_METRIC, "0", &server),
            Some(0.01)
        );
        assert_eq!(
            value(&samples, PROCESS_DECODER_UTILIZATION_METRIC, "0", &server),
            Some(0.02)
        );
        // Untracked processes only count towards the device's total; a tracked server
        // without GPU work gets no GPU series.
        let process_series: Vec<_> = samples
            .iter()
            .filter(|s| s.labels.contains_key("pid"))
            .map(|s| s.labels["pid"].as_str())
            .collect();
        assert!(
            process_series.iter().all(|pid| *pid == "4242"),
            "{process_series:?}"
        );
        assert_eq!(
            value(&samples, UNTRACKED_PROCESS_MEMORY_METRIC, "0", &[]),
            Some((1073741824u64 + 536870912) as f64)
        );
    }
    // pid 4242 has exited.
    let samples = run.pass_at(1.2, &tracked);
    assert!(
        samples.iter().all(|s| !s.labels.contains_key("pid")),
        "{samples:#?}"
    );
}

#[test]
fn gpu_use_of_every_process_tracked_or_not_is_offered_to_the_budget() {
    let driver = FakeDriver::new(json!({"devices": [
        device(UUID_0, "00000000:17:00.0", json!({"processes": [
            {"pid": 4242, "used_memory_bytes": 1024, "sm_util": 80},
            {"pid": 5151, "used_memory_bytes": 1024, "sm_util": 30},
        ]})),
        device(UUID_1, "00000000:18:00.0", json!({"processes": [
            {"pid": 4242, "used_memory_bytes": 1024, "sm_util": 50},
        ]})),
    ]}));
    let mut run = Run::start(&driver);
    // Nothing tracked: the budget must still see who uses the GPUs, to pick whom to track.
    run.pass_at(0.25, &[]);
    let gpu_use = vigil_agent::collectors::Collector::gpu_use_by_pid(&run.collector);
    assert_eq!(gpu_use.len(), 2);
    assert!((gpu_use[&4242] - 1.3).abs() < 1e-9, "{gpu_use:?}");
    assert!((gpu_use[&5151] - 0.3).abs() < 1e-9, "{gpu_use:?}");
}

#[test]
fn mig_instances_are_reported_with_their_memory_and_label_process_data() {
    let driver = FakeDriver::new(json!({"devices": [
        device(UUID_0, "00000000:17:00.0", json!({
            "not_supported": ["utilization"],
            "mig": {"enabled": true, "devices": [
                {"uuid": "MIG-0c6b3d1e-0000-4000-8000-000000000001",
                 "name": "NVIDIA H100 80GB HBM3 MIG 3g.40gb", "gpu_instance": 1,
                 "compute_instance": 0, "memory_total_bytes": 42949672960u64,
                 "memory_used_bytes": 3221225472u64},
                {"uuid": "MIG-0c6b3d1e-0000-4000-8000-000000000002",
                 "name": "NVIDIA H100 80GB HBM3 MIG 2g.20gb", "gpu_instance": 2,
                 "compute_instance": 0, "memory_total_bytes": 21474836480u64},
            ]},
            "processes": [
                {"pid": 4242, "used_memory_bytes": 3221225472u64, "sm_util": 50,
                 "gpu_instance": 1, "compute_instance": 0},
            ],
        })),
        device(UUID_1, "00000000:18:00.0", json!({"not_supported": ["mig"]})),
    ]}));
    let tracked = [ModelServerProcess {
        pid: 4242,
        start_time_ticks: 1,
        comm: "tritonserver".into(),
        server: "triton".into(),
    }];
    let mut run = Run::start(&driver);
    let samples = run.pass_at(0.2, &tracked);
    assert_eq!(value(&samples, MIG_ENABLED_METRIC, "0", &[]), Some(1.0));
    assert_eq!(value(&samples, MIG_ENABLED_METRIC, "1", &[]), None);
    let instance = |gi, profile| {
        [
            ("gpu_instance", gi),
            ("compute_instance", "0"),
            ("mig_profile", profile),
        ]
    };
    assert_eq!(
        value(
            &samples,
            MIG_MEMORY_TOTAL_METRIC,
            "0",
            &instance("1", "3g.40gb")
        ),
        Some(42949672960.0)
    );
    assert_eq!(
        value(
            &samples,
            MIG_MEMORY_USED_METRIC,
            "0",
            &instance("1", "3g.40gb")
        ),
        Some(3221225472.0)
    );
    assert_eq!(
        value(
            &samples,
            MIG_MEMORY_TOTAL_METRIC,
            "0",
            &instance("2", "2g.20gb")
        ),
        Some(21474836480.0)
    );
    assert_eq!(
        value(
            &samples,
            MIG_MEMORY_USED_METRIC,
            "0",
            &instance("2", "2g.20gb")
        ),
        Some(0.0)
    );
    assert_eq!(
        samples
            .iter()
            .filter(|s| s.name == MIG_MEMORY_TOTAL_METRIC)
            .count(),
        2
    );
    let in_instance = [
        ("pid", "4242"),
        ("server", "triton"),
        ("gpu_instance", "1"),
        ("compute_instance", "0"),
    ];
    assert_eq!(
        value(&samples, PROCESS_MEMORY_METRIC, "0", &in_instance),
        Some(3221225472.0)
    );
    assert_eq!(
        value(&samples, PROCESS_SM_UTILIZATION_METRIC, "0", &in_instance),
        Some(0.5)
    );
    assert_eq!(value(&samples, UTILIZATION_METRIC, "0", &[]), None);
    assert_eq!(
        run.collector.status(),
        CollectorStatus::Degraded(format!(
            "gpu 0 ({MODEL}) does not support: utilization; gpu 1 ({MODEL}) does not support: mig"
        ))
    );
}

/// `FAKE_NVML_SCENARIO` names the scenario, over the file next to the library. The variable is
/// process-wide, so the collector runs in a child: this test binary, running only this test.
#[test]
fn the_scenario_named_by_fake_nvml_scenario_wins_over_the_file_next_to_the_library() {
    const CHILD_LIBRARY: &str = "VIGIL_GPU_TEST_CHILD_LIBRARY";
    if let Some(library) = std::env::var_os(CHILD_LIBRARY) {
        let config = GpuConfig {
            nvml_library: library.into_string().unwrap(),
            ..Default::default()
        };
        let mut collector = GpuCollector::start(&config);
        collector.collect(&PassSelection::default());
        let up: Vec<_> = collector
            .samples()
            .into_iter()
            .filter(|s| s.name == UP_METRIC)
            .map(|s| s.labels["uuid"].clone())
            .collect();
        assert_eq!(up, [UUID_1]);
        return;
    }
    let driver =
        FakeDriver::new(json!({"devices": [device(UUID_0, "00000000:17:00.0", json!({}))]}));
    let named = driver.dir.path().join("named-by-env.json");
    let scenario = json!({"devices": [device(UUID_1, "00000000:18:00.0", json!({}))]});
    std::fs::write(&named, scenario.to_string()).unwrap();
    let output = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "the_scenario_named_by_fake_nvml_scenario_wins_over_the_file_next_to_the_library",
        ])
        .env(CHILD_LIBRARY, &driver.library)
        .env("FAKE_NVML_SCENARIO", &named)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success() && stdout.contains("1 passed"),
        "child: {}\n{stdout}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
}
