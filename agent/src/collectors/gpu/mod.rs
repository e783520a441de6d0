//! `gpu` collector: NVIDIA GPU telemetry through NVML, loaded at run time from the driver's
//! `libnvidia-ml.so.1` (or `gpu.nvml_library`).
//!
//! Each collection pass reads every device's gauges and counters (`device.rs`) and the GPU
//! processes of the tracked model servers (`processes.rs`); health events (XID errors, ECC,
//! clock-event reason changes, a device falling off the bus) arrive on a thread of their own
//! (`health.rs`) and become events the moment NVML reports them (clock-event reason changes of
//! devices without NVML clock events are noticed by the pass instead). Without a driver the
//! collector says why in its status and retries NVML init at a slow interval, so a driver
//! installed or reloaded later is picked up without restarting the agent; for the same reason
//! it starts NVML afresh (at that interval) when every GPU has fallen off the bus.

mod device;
mod health;
mod processes;

use std::{
    collections::HashMap,
    ffi::OsStr,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use nvml_wrapper::{Nvml, error::NvmlError};
use serde::Deserialize;

use self::{
    device::{DeviceState, PcieSampler},
    health::{HealthState, HealthWatcher},
    processes::ProcessTable,
};
use crate::{
    collectors::{Collector, CollectorStatus, UnavailableCollector},
    sample::{Event, Labels, Sample, SampleValue},
    selection::PassSelection,
};

pub use self::health::{Doorbell, HEALTH_EVENTS, xid_meaning};

/// The collector's name in snapshots.
pub const NAME: &str = "gpu";

/// The driver's NVML library, found through the dynamic loader's search path.
pub const DEFAULT_NVML_LIBRARY: &str = "libnvidia-ml.so.1";

pub const UP_METRIC: &str = "vigil_gpu_up";
pub const UTILIZATION_METRIC: &str = "vigil_gpu_utilization_ratio";
pub const MEMORY_UTILIZATION_METRIC: &str = "vigil_gpu_memory_utilization_ratio";
pub const MEMORY_USED_METRIC: &str = "vigil_gpu_memory_used_bytes";
pub const MEMORY_FREE_METRIC: &str = "vigil_gpu_memory_free_bytes";
pub const MEMORY_TOTAL_METRIC: &str = "vigil_gpu_memory_total_bytes";
pub const POWER_METRIC: &str = "vigil_gpu_power_watts";
pub const POWER_LIMIT_METRIC: &str = "vigil_gpu_power_limit_watts";
pub const ENERGY_METRIC: &str = "vigil_gpu_energy_joules_total";
pub const TEMPERATURE_METRIC: &str = "vigil_gpu_temperature_celsius";
pub const FAN_SPEED_METRIC: &str = "vigil_gpu_fan_speed_ratio";
pub const CLOCK_METRIC: &str = "vigil_gpu_clock_hertz";
pub const PERFORMANCE_STATE_METRIC: &str = "vigil_gpu_performance_state";
pub const ENCODER_UTILIZATION_METRIC: &str = "vigil_gpu_encoder_utilization_ratio";
pub const DECODER_UTILIZATION_METRIC: &str = "vigil_gpu_decoder_utilization_ratio";
pub const PCIE_TX_METRIC: &str = "vigil_gpu_pcie_tx_bytes_per_second";
pub const PCIE_RX_METRIC: &str = "vigil_gpu_pcie_rx_bytes_per_second";
pub const THROTTLE_REASON_METRIC: &str = "vigil_gpu_throttle_reason";
pub const ECC_ERRORS_METRIC: &str = "vigil_gpu_ecc_errors_total";
/// Rows remapped after memory errors (Ampere and newer), `cause` = correctable|uncorrectable.
pub const REMAPPED_ROWS_METRIC: &str = "vigil_gpu_remapped_rows_total";
/// 1 while a row remapping waits for a GPU reset.
pub const ROW_REMAP_PENDING_METRIC: &str = "vigil_gpu_row_remap_pending";
/// 1 once a row remapping has failed (the GPU needs service).
pub const ROW_REMAP_FAILED_METRIC: &str = "vigil_gpu_row_remap_failed";
/// Per NVLink (`link` label): 1 when active.
pub const NVLINK_ACTIVE_METRIC: &str = "vigil_gpu_nvlink_active";
/// Per NVLink, `counter` = replay|recovery|crc_flit|crc_data.
pub const NVLINK_ERRORS_METRIC: &str = "vigil_gpu_nvlink_errors_total";
/// 1 when MIG mode is on (GPUs that support MIG only).
pub const MIG_ENABLED_METRIC: &str = "vigil_gpu_mig_enabled";
/// Memory of each MIG device (compute instance), labelled `gpu_instance`, `compute_instance`,
/// `mig_uuid` and `mig_profile` besides its GPU's labels.
pub const MIG_MEMORY_TOTAL_METRIC: &str = "vigil_gpu_mig_memory_total_bytes";
pub const MIG_MEMORY_USED_METRIC: &str = "vigil_gpu_mig_memory_used_bytes";
pub const XID_ERRORS_METRIC: &str = "vigil_gpu_xid_errors_total";
pub const ECC_ERROR_EVENTS_METRIC: &str = "vigil_gpu_ecc_error_events_total";
/// The counters the health-event thread keeps current between passes: what a batch of health
/// events carries besides the events (`vigil-agent run`).
pub const HEALTH_EVENT_METRICS: [&str; 2] = [XID_ERRORS_METRIC, ECC_ERROR_EVENTS_METRIC];
pub const PROCESS_MEMORY_METRIC: &str = "vigil_gpu_process_memory_used_bytes";
pub const PROCESS_SM_UTILIZATION_METRIC: &str = "vigil_gpu_process_sm_utilization_ratio";
pub const PROCESS_MEMORY_UTILIZATION_METRIC: &str = "vigil_gpu_process_memory_utilization_ratio";
pub const PROCESS_ENCODER_UTILIZATION_METRIC: &str = "vigil_gpu_process_encoder_utilization_ratio";
pub const PROCESS_DECODER_UTILIZATION_METRIC: &str = "vigil_gpu_process_decoder_utilization_ratio";
/// GPU memory of processes that are not tracked model servers, summed per device.
pub const UNTRACKED_PROCESS_MEMORY_METRIC: &str = "vigil_gpu_untracked_process_memory_used_bytes";

/// `[gpu]` in the agent config.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GpuConfig {
    /// Collect NVIDIA GPU telemetry through NVML (default true). Nodes without a driver report
    /// the collector unavailable; they need not turn it off.
    pub enabled: bool,
    /// The NVML library to load (default `libnvidia-ml.so.1`, found through the dynamic
    /// loader's search path). Set an absolute path when the driver lives elsewhere, e.g. in a
    /// container that mounts it from the host.
    pub nvml_library: String,
    /// Seconds between NVML init attempts while it fails (default 30), so a driver installed
    /// or reloaded later is picked up; 0 retries on every collection pass.
    pub init_retry_seconds: u64,
}

impl Default for GpuConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            nvml_library: DEFAULT_NVML_LIBRARY.to_string(),
            init_retry_seconds: 30,
        }
    }
}

/// The `gpu` collector for this config: the NVML one (which may be waiting for a driver), or
/// one that says it is disabled.
pub fn start(config: &GpuConfig) -> Box<dyn Collector> {
    if !config.enabled {
        return Box::new(UnavailableCollector {
            name: NAME,
            reason: "disabled in the config (gpu.enabled = false)".into(),
        });
    }
    Box::new(GpuCollector::start(config))
}

/// NVML, once init has succeeded, and what hangs off it.
struct Running {
    nvml: Arc<Nvml>,
    devices: Vec<DeviceState>,
    /// Devices NVML counts but could not name (lost before the agent started, say): why.
    unidentified: Vec<String>,
    processes: ProcessTable,
    health: HealthWatcher,
    pcie: PcieSampler,
}

/// Reads NVIDIA GPUs through NVML; see the module docs.
pub struct GpuCollector {
    config: GpuConfig,
    running: Option<Running>,
    /// Why NVML is not running, and when to try again (never, if that is too far to say).
    init_failure: Option<(String, Option<Instant>)>,
    health: Arc<Mutex<HealthState>>,
    samples: Vec<Sample>,
    events: Vec<Event>,
    /// Problems of the latest pass (calls that failed for reasons other than NotSupported).
    pass_errors: Vec<String>,
    /// Since when no GPU has been on the bus.
    no_gpu_left_since: Option<Instant>,
}

impl GpuCollector {
    /// Loads NVML and starts the health-event thread; when NVML cannot start, the collector
    /// reports why and tries again every `init_retry_seconds`.
    pub fn start(config: &GpuConfig) -> Self {
        let mut collector = Self {
            config: config.clone(),
            running: None,
            init_failure: None,
            health: Arc::new(Mutex::new(HealthState::default())),
            samples: Vec::new(),
            events: Vec::new(),
            pass_errors: Vec::new(),
            no_gpu_left_since: None,
        };
        collector.try_init();
        collector
    }

    fn try_init(&mut self) {
        match self.init() {
            Ok(running) => {
                tracing::info!(
                    devices = running.devices.len(),
                    library = self.config.nvml_library,
                    "NVML initialized"
                );
                // Say so when GPUs are back, not on every fruitless restart.
                if self.init_failure.take().is_some() && !running.no_gpu_left() {
                    self.events.push(Event::now(
                        "gpu_nvml_available",
                        Labels::new(),
                        format!(
                            "NVML ({}) initialized with {} GPUs; GPU metrics enabled",
                            self.config.nvml_library,
                            running.devices.len()
                        ),
                    ));
                }
                self.running = Some(running);
            }
            Err(error) => {
                let reason = init_failure_reason(&self.config, &error);
                if self
                    .init_failure
                    .as_ref()
                    .is_none_or(|(old, _)| *old != reason)
                {
                    tracing::warn!("gpu collector unavailable: {reason}");
                }
                let retry =
                    Instant::now().checked_add(Duration::from_secs(self.config.init_retry_seconds));
                self.init_failure = Some((reason, retry));
            }
        }
    }

    fn init(&self) -> Result<Running, NvmlError> {
        let nvml = Arc::new(
            Nvml::builder()
                .lib_path(OsStr::new(&self.config.nvml_library))
                .init()?,
        );
        let count = nvml.device_count()?;
        let mut devices = Vec::with_capacity(count as usize);
        let mut unidentified = Vec::new();
        for index in 0..count {
            // One GPU that cannot be named must not hide the others.
            match DeviceState::identify(&nvml, index) {
                Ok(device) => devices.push(device),
                Err(error) => unidentified.push(format!(
                    "gpu {index} cannot be identified, so it is not watched: {}",
                    match error {
                        NvmlError::GpuLost =>
                            "it has fallen off the bus (NVML: GPU is lost)".into(),
                        other => crate::collectors::error_chain(&other),
                    }
                )),
            }
        }
        let health =
            HealthWatcher::start(Arc::clone(&nvml), &mut devices, Arc::clone(&self.health));
        let pcie = PcieSampler::start(Arc::clone(&nvml), count);
        Ok(Running {
            processes: ProcessTable::new(count as usize, "/proc".into()),
            nvml,
            devices,
            unidentified,
            health,
            pcie,
        })
    }

    /// When every GPU has fallen off the bus, NVML is started afresh (at the init retry
    /// interval), so GPUs that come back after a reset or a driver reload are picked up.
    fn restart_when_no_gpu_is_left(&mut self) {
        if !self.running.as_ref().is_some_and(Running::no_gpu_left) {
            self.no_gpu_left_since = None;
            return;
        }
        let since = *self.no_gpu_left_since.get_or_insert_with(Instant::now);
        let retry = Duration::from_secs(self.config.init_retry_seconds);
        if since.elapsed() < retry {
            return;
        }
        self.no_gpu_left_since = None;
        if let Some(running) = self.running.take() {
            running.stop();
        }
        health::lock(&self.health).lost.clear();
        let reason = format!(
            "every GPU fell off the bus; restarting NVML ({})",
            self.config.nvml_library
        );
        tracing::info!("{reason}");
        self.init_failure = Some((reason, None));
        self.try_init();
    }

    /// One collection pass: every device's readings and the tracked processes' GPU use.
    pub fn collect(&mut self, selection: &PassSelection) {
        self.pass_errors.clear();
        self.restart_when_no_gpu_is_left();
        let retry_due = self
            .init_failure
            .as_ref()
            .is_some_and(|(_, retry)| retry.is_some_and(|at| Instant::now() >= at));
        if self.running.is_none() && retry_due {
            self.try_init();
        }
        let Some(running) = self.running.as_mut() else {
            return;
        };
        let lost = health::lock(&self.health).lost.clone();
        let pcie = running.pcie.latest();
        let mut samples = Vec::new();
        for device in &mut running.devices {
            if lost.contains(&device.index) {
                device.mark_lost();
            }
            let reading = pcie.get(device.index as usize).and_then(Option::as_ref);
            let pass = device.read(&running.nvml, reading, &self.health, &mut samples);
            self.pass_errors.extend(pass.errors);
            if pass.newly_lost {
                health::lock(&self.health).device_lost(
                    device.index,
                    device.labels(),
                    "a collection pass",
                );
            }
        }
        running.processes.read(
            &running.nvml,
            &mut running.devices,
            &selection.tracked,
            &mut samples,
            &mut self.pass_errors,
        );
        self.samples = samples;
    }

    pub fn status(&self) -> CollectorStatus {
        if self.running.is_none() {
            let reason = self
                .init_failure
                .as_ref()
                .map_or_else(|| "NVML is not initialized".to_string(), |(r, _)| r.clone());
            return CollectorStatus::Unavailable(reason);
        }
        let mut problems = Vec::new();
        if let Some(running) = &self.running {
            problems.extend(running.unidentified.iter().cloned());
            if let Some(error) = &running.health.start_error {
                problems.push(error.clone());
            }
            for device in &running.devices {
                problems.extend(device.problems());
            }
        }
        if let Some(error) = &health::lock(&self.health).error {
            problems.push(error.clone());
        }
        problems.extend(self.pass_errors.iter().cloned());
        if problems.is_empty() {
            CollectorStatus::Ok
        } else {
            CollectorStatus::Degraded(problems.join("; "))
        }
    }

    /// Samples of the latest pass, plus the health-event counters as they are now (they do not
    /// wait for a pass either).
    pub fn samples(&self) -> Vec<Sample> {
        let mut samples = self.samples.clone();
        if let Some(running) = &self.running {
            health::lock(&self.health).samples(&running.devices, &mut samples);
        }
        samples
    }

    /// Events since the last call, health events included as soon as NVML reports them (they
    /// do not wait for a collection pass).
    pub fn take_events(&mut self) -> Vec<Event> {
        let mut events = std::mem::take(&mut self.events);
        events.append(&mut health::lock(&self.health).events);
        events
    }
}

impl Drop for GpuCollector {
    fn drop(&mut self) {
        if let Some(running) = self.running.take() {
            running.stop();
        }
    }
}

impl Running {
    /// Stops the threads; dropping the last `Nvml` then shuts NVML down.
    fn stop(self) {
        self.health.stop();
        self.pcie.stop();
    }

    /// NVML counted GPUs, and none of them is on the bus any more.
    fn no_gpu_left(&self) -> bool {
        let counted = self.devices.len() + self.unidentified.len();
        counted > 0 && self.devices.iter().all(DeviceState::is_lost)
    }
}

impl Collector for GpuCollector {
    fn name(&self) -> &'static str {
        NAME
    }

    fn collect(&mut self, selection: &PassSelection) {
        GpuCollector::collect(self, selection)
    }

    fn samples(&self) -> Vec<Sample> {
        GpuCollector::samples(self)
    }

    fn take_events(&mut self) -> Vec<Event> {
        GpuCollector::take_events(self)
    }

    fn status(&self) -> CollectorStatus {
        GpuCollector::status(self)
    }

    fn gpu_use_by_pid(&self) -> HashMap<u32, f64> {
        self.running
            .as_ref()
            .map(|running| running.processes.sm_use_by_pid())
            .unwrap_or_default()
    }
}

/// Why NVML did not start, and what to do about it.
fn init_failure_reason(config: &GpuConfig, error: &NvmlError) -> String {
    let library = &config.nvml_library;
    let retry = match config.init_retry_seconds {
        0 => "retrying every pass".to_string(),
        s => format!("retrying every {s} s"),
    };
    let what = match error {
        NvmlError::LibloadingError(_) => {
            return format!(
                "NVML not found ({library}): GPU metrics disabled; install the NVIDIA driver or \
                 set gpu.nvml_library ({retry})"
            );
        }
        NvmlError::FailedToLoadSymbol(symbol) => {
            format!("{library} lacks an NVML function the agent needs ({symbol}); is it NVML?")
        }
        NvmlError::DriverNotLoaded => {
            "the NVIDIA kernel driver is not loaded (NVML_ERROR_DRIVER_NOT_LOADED); load it \
             (modprobe nvidia) or install the driver"
                .to_string()
        }
        NvmlError::LibRmVersionMismatch => {
            "NVML and the NVIDIA kernel driver are from different releases \
             (NVML_ERROR_LIB_RM_VERSION_MISMATCH), as after a driver upgrade without a reboot; \
             reboot or reload the nvidia kernel modules"
                .to_string()
        }
        NvmlError::NoPermission => {
            "no permission to use the GPUs (NVML_ERROR_NO_PERMISSION); run the agent with \
             access to /dev/nvidia*"
                .to_string()
        }
        other => crate::collectors::error_chain(other),
    };
    format!("NVML init failed ({library}): {what}; GPU metrics disabled ({retry})")
}

/// A gauge or counter value for one device.
fn value_sample(name: &'static str, labels: Labels, value: f64) -> Sample {
    Sample {
        name,
        labels,
        value: SampleValue::Value(value),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_defaults_to_the_driver_library_and_rejects_unknown_keys() {
        let config: GpuConfig = toml::from_str("").unwrap();
        assert_eq!(config, GpuConfig::default());
        assert_eq!(config.nvml_library, "libnvidia-ml.so.1");
        assert!(config.enabled);
        let error = toml::from_str::<GpuConfig>("nvml_libary = \"x\"").unwrap_err();
        assert!(
            error.to_string().contains("unknown field `nvml_libary`"),
            "{error}"
        );
    }

    #[test]
    fn a_missing_library_is_unavailable_with_a_hint() {
        let config = GpuConfig {
            nvml_library: "/nonexistent/libnvidia-ml.so.1".into(),
            ..Default::default()
        };
        let collector = GpuCollector::start(&config);
        assert_eq!(
            collector.status(),
            CollectorStatus::Unavailable(
                "NVML not found (/nonexistent/libnvidia-ml.so.1): GPU metrics disabled; install \
                 the NVIDIA driver or set gpu.nvml_library (retrying every 30 s)"
                    .into()
            )
        );
        assert!(collector.samples().is_empty());
    }

    #[test]
    fn a_disabled_collector_says_so() {
        let config = GpuConfig {
            enabled: false,
            ..Default::default()
        };
        assert_eq!(
            start(&config).status(),
            CollectorStatus::Unavailable("disabled in the config (gpu.enabled = false)".into())
        );
    }
}
