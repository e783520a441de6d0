//! Per-device readings: one set of gauges and counters per GPU and collection pass, labelled
//! `gpu` (index), `uuid`, `model` and `pci_bus_id`.
//!
//! A reading the device does not support (NVML `NotSupported`) is left out from then on and
//! named once in the collector status. PCIe throughput blocks for ~20 ms per counter in NVML,
//! so a thread of its own samples it and the pass takes the latest value.

use std::{
    collections::BTreeSet,
    sync::{Arc, Mutex, mpsc},
    thread::JoinHandle,
    time::Duration,
};

use nvml_wrapper::{
    Device, Nvml,
    bitmasks::device::ThrottleReasons,
    enum_wrappers::{
        device::{Clock, EccCounter, MemoryError, PcieUtilCounter, TemperatureSensor},
        nv_link::ErrorCounter,
    },
    error::{NvmlError, nvml_sym, nvml_try},
};

use super::{
    CLOCK_METRIC, DECODER_UTILIZATION_METRIC, ECC_ERRORS_METRIC, ENCODER_UTILIZATION_METRIC,
    ENERGY_METRIC, FAN_SPEED_METRIC, MEMORY_FREE_METRIC, MEMORY_TOTAL_METRIC, MEMORY_USED_METRIC,
    MEMORY_UTILIZATION_METRIC, MIG_ENABLED_METRIC, MIG_MEMORY_TOTAL_METRIC, MIG_MEMORY_USED_METRIC,
    NVLINK_ACTIVE_METRIC, NVLINK_ERRORS_METRIC, PCIE_RX_METRIC, PCIE_TX_METRIC,
    PERFORMANCE_STATE_METRIC, POWER_LIMIT_METRIC, POWER_METRIC, REMAPPED_ROWS_METRIC,
    ROW_REMAP_FAILED_METRIC, ROW_REMAP_PENDING_METRIC, TEMPERATURE_METRIC, THROTTLE_REASON_METRIC,
    UP_METRIC, UTILIZATION_METRIC,
    health::{self, HealthState},
    value_sample,
};
use crate::sample::{Event, Labels, Sample};

/// Clock-event (throttle) reasons, each reported as its own 0/1 series.
const THROTTLE_REASONS: [(ThrottleReasons, &str); 9] = [
    (ThrottleReasons::GPU_IDLE, "gpu_idle"),
    (
        ThrottleReasons::APPLICATIONS_CLOCKS_SETTING,
        "applications_clocks_setting",
    ),
    (ThrottleReasons::SW_POWER_CAP, "sw_power_cap"),
    (ThrottleReasons::HW_SLOWDOWN, "hw_slowdown"),
    (ThrottleReasons::SYNC_BOOST, "sync_boost"),
    (ThrottleReasons::SW_THERMAL_SLOWDOWN, "sw_thermal_slowdown"),
    (ThrottleReasons::HW_THERMAL_SLOWDOWN, "hw_thermal_slowdown"),
    (
        ThrottleReasons::HW_POWER_BRAKE_SLOWDOWN,
        "hw_power_brake_slowdown",
    ),
    (
        ThrottleReasons::DISPLAY_CLOCK_SETTING,
        "display_clock_setting",
    ),
];

/// NVML reports PCIe throughput in KB/s.
const PCIE_BYTES_PER_KB: f64 = 1024.0;

/// One GPU: who it is, what it cannot report, and whether it is still on the bus.
pub(super) struct DeviceState {
    pub index: u32,
    pub uuid: String,
    pub model: String,
    pub pci_bus_id: String,
    /// Readings NVML says this device does not support; never asked for again.
    pub not_supported: BTreeSet<&'static str>,
    lost: bool,
    supported_throttle_reasons: Option<ThrottleReasons>,
    /// NVLinks found in the first pass.
    nvlinks: Option<u32>,
}

/// What one pass over one device found besides samples (its events go to the health state).
#[derive(Default)]
pub(super) struct DevicePass {
    pub errors: Vec<String>,
    /// The device answered "GPU is lost" for the first time in this pass.
    pub newly_lost: bool,
}

impl DeviceState {
    /// Reads the identity of device `index` (the labels of all its series).
    pub fn identify(nvml: &Nvml, index: u32) -> Result<Self, NvmlError> {
        let device = nvml.device_by_index(index)?;
        Ok(Self {
            index,
            uuid: device.uuid()?,
            model: device.name()?,
            pci_bus_id: device.pci_info()?.bus_id,
            not_supported: BTreeSet::new(),
            lost: false,
            supported_throttle_reasons: None,
            nvlinks: None,
        })
    }

    pub fn labels(&self) -> Labels {
        Labels::from([
            ("gpu".to_string(), self.index.to_string()),
            ("uuid".to_string(), self.uuid.clone()),
            ("model".to_string(), self.model.clone()),
            ("pci_bus_id".to_string(), self.pci_bus_id.clone()),
        ])
    }

    fn labels_with(&self, name: &str, value: &str) -> Labels {
        let mut labels = self.labels();
        labels.insert(name.to_string(), value.to_string());
        labels
    }

    pub fn is_lost(&self) -> bool {
        self.lost
    }

    /// The health thread saw the device fall off the bus.
    pub fn mark_lost(&mut self) {
        self.lost = true;
    }

    /// What the status should say about this device (nothing when all is well).
    pub fn problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        if self.lost {
            problems.push(format!(
                "gpu {} ({}, {}) fell off the bus (NVML: GPU is lost): no metrics from it until \
                 the driver is reloaded or the node rebooted",
                self.index, self.uuid, self.pci_bus_id
            ));
        }
        if !self.not_supported.is_empty() {
            let fields: Vec<&str> = self.not_supported.iter().copied().collect();
            problems.push(format!(
                "gpu {} ({}) does not support: {}",
                self.index,
                self.model,
                fields.join(", ")
            ));
        }
        problems
    }

    /// One pass: every supported reading of this device into `out`; a change of its
    /// clock-event reasons becomes an event in `health` (unless the health thread reported it
    /// already).
    pub fn read(
        &mut self,
        nvml: &Nvml,
        pcie: Option<&PcieReading>,
        health: &Mutex<HealthState>,
        out: &mut Vec<Sample>,
    ) -> DevicePass {
        let mut pass = DevicePass::default();
        let was_lost = self.lost;
        if !self.lost {
            match nvml.device_by_index(self.index) {
                Ok(device) => self.read_device(nvml, &device, pcie, health, out, &mut pass),
                Err(NvmlError::GpuLost) => self.lost = true,
                Err(error) => pass
                    .errors
                    .push(format!("gpu {}: {}", self.index, describe(&error))),
            }
        }
        pass.newly_lost = self.lost && !was_lost;
        if self.lost {
            // Readings taken before it fell off in this pass are stale already.
            out.retain(|s| s.labels.get("uuid") != Some(&self.uuid));
        }
        out.push(value_sample(
            UP_METRIC,
            self.labels(),
            if self.lost { 0.0 } else { 1.0 },
        ));
        pass
    }

    fn read_device(
        &mut self,
        nvml: &Nvml,
        device: &Device,
        pcie: Option<&PcieReading>,
        health: &Mutex<HealthState>,
        out: &mut Vec<Sample>,
        pass: &mut DevicePass,
    ) {
        let labels = self.labels();
        let mut read = FieldReader {
            state: self,
            errors: &mut pass.errors,
        };
        if let Some(u) = read.field("utilization", || device.utilization_rates()) {
            out.push(value_sample(
                UTILIZATION_METRIC,
                labels.clone(),
                ratio(u.gpu),
            ));
            out.push(value_sample(
                MEMORY_UTILIZATION_METRIC,
                labels.clone(),
                ratio(u.memory),
            ));
        }
        if let Some(m) = read.field("memory", || device.memory_info()) {
            out.push(value_sample(
                MEMORY_USED_METRIC,
                labels.clone(),
                m.used as f64,
            ));
            out.push(value_sample(
                MEMORY_FREE_METRIC,
                labels.clone(),
                m.free as f64,
            ));
            out.push(value_sample(
                MEMORY_TOTAL_METRIC,
                labels.clone(),
                m.total as f64,
            ));
        }
        if let Some(mw) = read.field("power_usage", || device.power_usage()) {
            out.push(value_sample(POWER_METRIC, labels.clone(), mw as f64 / 1e3));
        }
        if let Some(mw) = read.field("power_limit", || device.enforced_power_limit()) {
            out.push(value_sample(
                POWER_LIMIT_METRIC,
                labels.clone(),
                mw as f64 / 1e3,
            ));
        }
        if let Some(mj) = read.field("energy", || device.total_energy_consumption()) {
            out.push(value_sample(ENERGY_METRIC, labels.clone(), mj as f64 / 1e3));
        }
        if let Some(c) = read.field("temperature", || device.temperature(TemperatureSensor::Gpu)) {
            out.push(value_sample(TEMPERATURE_METRIC, labels.clone(), c as f64));
        }
        if let Some(fans) = read.field("fan_speed", || device.num_fans()) {
            for fan in 0..fans {
                if let Some(pct) = read.field("fan_speed", || device.fan_speed(fan)) {
                    let labels = read.state.labels_with("fan", &fan.to_string());
                    out.push(value_sample(FAN_SPEED_METRIC, labels, ratio(pct)));
                }
            }
        }
        for (clock, field, name) in [
            (Clock::SM, "clock_sm", "sm"),
            (Clock::Memory, "clock_memory", "memory"),
            (Clock::Graphics, "clock_graphics", "graphics"),
        ] {
            if let Some(mhz) = read.field(field, || device.clock_info(clock)) {
                let labels = read.state.labels_with("clock", name);
                out.push(value_sample(CLOCK_METRIC, labels, mhz as f64 * 1e6));
            }
        }
        if let Some(state) = read.field("performance_state", || device.performance_state()) {
            let number = state.as_c();
            // 32 is NVML_PSTATE_UNKNOWN.
            if number <= 15 {
                out.push(value_sample(
                    PERFORMANCE_STATE_METRIC,
                    labels.clone(),
                    number as f64,
                ));
            }
        }
        if let Some(u) = read.field("encoder_utilization", || device.encoder_utilization()) {
            out.push(value_sample(
                ENCODER_UTILIZATION_METRIC,
                labels.clone(),
                ratio(u.utilization),
            ));
        }
        if let Some(u) = read.field("decoder_utilization", || device.decoder_utilization()) {
            out.push(value_sample(
                DECODER_UTILIZATION_METRIC,
                labels.clone(),
                ratio(u.utilization),
            ));
        }
        match pcie {
            Some(PcieReading::Kbps { tx, rx }) => {
                out.push(value_sample(
                    PCIE_TX_METRIC,
                    labels.clone(),
                    *tx as f64 * PCIE_BYTES_PER_KB,
                ));
                out.push(value_sample(
                    PCIE_RX_METRIC,
                    labels.clone(),
                    *rx as f64 * PCIE_BYTES_PER_KB,
                ));
            }
            Some(PcieReading::NotSupported) => {
                read.field::<()>("pcie_throughput", || Err(NvmlError::NotSupported));
            }
            Some(PcieReading::Failed(error)) => read
                .errors
                .push(format!("gpu {} pcie_throughput: {error}", read.state.index)),
            None => {}
        }
        self.read_throttle_reasons(device, &labels, health, out, pass);
        let mut read = FieldReader {
            state: self,
            errors: &mut pass.errors,
        };
        for (error_type, type_name) in [
            (MemoryError::Corrected, "corrected"),
            (MemoryError::Uncorrected, "uncorrected"),
        ] {
            for (counter, counter_name) in [
                (EccCounter::Volatile, "volatile"),
                (EccCounter::Aggregate, "aggregate"),
            ] {
                let count = read.field("ecc", || device.total_ecc_errors(error_type, counter));
                if let Some(count) = count {
                    let mut labels = labels.clone();
                    labels.insert("type".into(), type_name.into());
                    labels.insert("counter".into(), counter_name.into());
                    out.push(value_sample(ECC_ERRORS_METRIC, labels, count as f64));
                }
            }
        }
        if let Some(mode) = read.field("mig", || device.mig_mode()) {
            let enabled = mode.current == 1;
            let flag = if enabled { 1.0 } else { 0.0 };
            out.push(value_sample(MIG_ENABLED_METRIC, labels.clone(), flag));
            if enabled {
                read_mig_devices(nvml, device, &labels, &mut read, out);
            }
        }
        if let Some(rows) = read.field("remapped_rows", || remapped_rows(nvml, device)) {
            for (cause, count) in [
                ("correctable", rows.correctable),
                ("uncorrectable", rows.uncorrectable),
            ] {
                let mut labels = labels.clone();
                labels.insert("cause".into(), cause.into());
                out.push(value_sample(REMAPPED_ROWS_METRIC, labels, count as f64));
            }
            let flag = |on: bool| if on { 1.0 } else { 0.0 };
            out.push(value_sample(
                ROW_REMAP_PENDING_METRIC,
                labels.clone(),
                flag(rows.pending),
            ));
            out.push(value_sample(
                ROW_REMAP_FAILED_METRIC,
                labels.clone(),
                flag(rows.failed),
            ));
        }
        self.read_nvlinks(device, &labels, out, pass);
    }

    /// Each NVLink's state and error counters. How many links there are is learnt in the first
    /// pass: NVML has no count, so links are asked for until one is refused.
    fn read_nvlinks(
        &mut self,
        device: &Device,
        labels: &Labels,
        out: &mut Vec<Sample>,
        pass: &mut DevicePass,
    ) {
        if self.lost || self.not_supported.contains("nvlink") {
            return;
        }
        let mut found = 0;
        for link in 0..self.nvlinks.unwrap_or(NVLINK_MAX_LINKS) {
            let nvlink = device.link_wrapper_for(link);
            let active = match nvlink.is_active() {
                Ok(active) => active,
                Err(NvmlError::NotSupported) if link == 0 => {
                    tracing::info!(gpu = self.index, uuid = self.uuid, "GPU has no NVLink");
                    self.not_supported.insert("nvlink");
                    return;
                }
                Err(NvmlError::GpuLost) => {
                    self.lost = true;
                    return;
                }
                // Past the last link.
                Err(NvmlError::NotSupported | NvmlError::InvalidArg) => break,
                Err(error) => {
                    pass.errors.push(format!(
                        "gpu {} nvlink {link}: {}",
                        self.index,
                        describe(&error)
                    ));
                    break;
                }
            };
            found = link + 1;
            let link_name = link.to_string();
            let mut link_labels = labels.clone();
            link_labels.insert("link".into(), link_name);
            out.push(value_sample(
                NVLINK_ACTIVE_METRIC,
                link_labels.clone(),
                if active { 1.0 } else { 0.0 },
            ));
            for (counter, name) in [
                (ErrorCounter::DlReplay, "replay"),
                (ErrorCounter::DlRecovery, "recovery"),
                (ErrorCounter::DlCrcFlit, "crc_flit"),
                (ErrorCounter::DlCrcData, "crc_data"),
            ] {
                match nvlink.error_counter(counter) {
                    Ok(count) => {
                        let mut labels = link_labels.clone();
                        labels.insert("counter".into(), name.into());
                        out.push(value_sample(NVLINK_ERRORS_METRIC, labels, count as f64));
                    }
                    Err(NvmlError::NotSupported) => {}
                    Err(NvmlError::GpuLost) => {
                        self.lost = true;
                        return;
                    }
                    Err(error) => pass.errors.push(format!(
                        "gpu {} nvlink {link} {name} errors: {}",
                        self.index,
                        describe(&error)
                    )),
                }
            }
        }
        self.nvlinks.get_or_insert(found);
    }

    /// Each supported clock-event reason as a 0/1 series, and an event when the set of active
    /// reasons differs from the one last recorded, by a pass or by the health thread on an
    /// NVML clock event (where the device has them, it usually gets there first). The reasons
    /// are read under the health state's lock, so the two never record them out of order and a
    /// change is reported once.
    fn read_throttle_reasons(
        &mut self,
        device: &Device,
        labels: &Labels,
        health: &Mutex<HealthState>,
        out: &mut Vec<Sample>,
        pass: &mut DevicePass,
    ) {
        let mut read = FieldReader {
            state: self,
            errors: &mut pass.errors,
        };
        let supported = match read.state.supported_throttle_reasons {
            Some(supported) => Some(supported),
            None => read.field("throttle_reasons", || device.supported_throttle_reasons()),
        };
        let Some(supported) = supported else {
            return;
        };
        read.state.supported_throttle_reasons = Some(supported);
        let mut health = health::lock(health);
        let Some(active) = read.field("throttle_reasons", || device.current_throttle_reasons())
        else {
            return;
        };
        health.clock_event_reasons(self.index, supported, active);
        drop(health);
        for (reason, name) in THROTTLE_REASONS {
            if !supported.contains(reason) {
                continue;
            }
            let on = active.contains(reason);
            let mut labels = labels.clone();
            labels.insert("reason".into(), name.into());
            out.push(value_sample(
                THROTTLE_REASON_METRIC,
                labels,
                if on { 1.0 } else { 0.0 },
            ));
        }
    }
}

/// The event for a device whose active clock-event reasons changed to `active` (of those it
/// supports), whichever path noticed.
pub(super) fn clock_event_reasons_changed(
    index: u32,
    labels: Labels,
    model: &str,
    supported: ThrottleReasons,
    active: ThrottleReasons,
) -> Event {
    let names: Vec<&str> = THROTTLE_REASONS
        .iter()
        .filter(|(reason, _)| supported.contains(*reason) && active.contains(*reason))
        .map(|(_, name)| *name)
        .collect();
    let now = if names.is_empty() {
        "none".to_string()
    } else {
        names.join(", ")
    };
    Event::now(
        "gpu_clock_event_reasons_changed",
        labels,
        format!("gpu {index} ({model}) clock-event reasons now: {now}"),
    )
}

/// MIG devices (one per compute instance) with their GPU and compute instance and memory.
fn read_mig_devices(
    nvml: &Nvml,
    device: &Device,
    labels: &Labels,
    read: &mut FieldReader,
    out: &mut Vec<Sample>,
) {
    let Some(slots) = read.field("mig", || device.mig_device_count()) else {
        return;
    };
    for slot in 0..slots {
        let mig = match device.mig_device_by_index(slot) {
            Ok(mig) => mig,
            // An empty slot.
            Err(NvmlError::NotFound) => continue,
            Err(error) => {
                read.field::<()>("mig", || Err(error));
                continue;
            }
        };
        let described = read.field("mig", || {
            Ok((
                mig.uuid()?,
                mig.name()?,
                instance_ids(nvml, &mig)?,
                mig.memory_info()?,
            ))
        });
        let Some((uuid, name, (gpu_instance, compute_instance), memory)) = described else {
            continue;
        };
        let mut labels = labels.clone();
        labels.insert("gpu_instance".into(), gpu_instance.to_string());
        labels.insert("compute_instance".into(), compute_instance.to_string());
        labels.insert("mig_uuid".into(), uuid);
        let profile = name.split_once(" MIG ").map_or(name.as_str(), |(_, p)| p);
        labels.insert("mig_profile".into(), profile.to_string());
        out.push(value_sample(
            MIG_MEMORY_TOTAL_METRIC,
            labels.clone(),
            memory.total as f64,
        ));
        out.push(value_sample(
            MIG_MEMORY_USED_METRIC,
            labels,
            memory.used as f64,
        ));
    }
}

/// NVML's `NVML_NVLINK_MAX_LINKS`.
const NVLINK_MAX_LINKS: u32 = 18;

/// Row remapping state (`nvmlDeviceGetRemappedRows`).
struct RemappedRows {
    correctable: u32,
    uncorrectable: u32,
    pending: bool,
    failed: bool,
}

/// Row remapping state (nvml-wrapper has no call for it).
fn remapped_rows(nvml: &Nvml, device: &Device) -> Result<RemappedRows, NvmlError> {
    let call = nvml_sym(nvml.lib().nvmlDeviceGetRemappedRows.as_ref())?;
    let (mut correctable, mut uncorrectable, mut pending, mut failed) = (0, 0, 0, 0);
    // SAFETY: a C call with the signature of nvml.h: the handle is a live device handle of
    // this NVML instance (used only for this call), and the four counts are out-parameters
    // that outlive it.
    nvml_try(unsafe {
        call(
            device.handle(),
            &mut correctable,
            &mut uncorrectable,
            &mut pending,
            &mut failed,
        )
    })?;
    Ok(RemappedRows {
        correctable,
        uncorrectable,
        pending: pending != 0,
        failed: failed != 0,
    })
}

/// A MIG device's GPU instance and compute instance ids (nvml-wrapper has no call for them).
fn instance_ids(nvml: &Nvml, mig: &Device) -> Result<(u32, u32), NvmlError> {
    let lib = nvml.lib();
    let gpu_instance_id = nvml_sym(lib.nvmlDeviceGetGpuInstanceId.as_ref())?;
    let compute_instance_id = nvml_sym(lib.nvmlDeviceGetComputeInstanceId.as_ref())?;
    let (mut gpu_instance, mut compute_instance) = (0, 0);
    // SAFETY: C calls with the signatures of nvml.h: the handle is a live MIG device handle of
    // this NVML instance (used only for these calls, never to make another `Device`), and the
    // ids are out-parameters that outlive the calls.
    unsafe {
        let handle = mig.handle();
        nvml_try(gpu_instance_id(handle, &mut gpu_instance))?;
        nvml_try(compute_instance_id(handle, &mut compute_instance))?;
    }
    Ok((gpu_instance, compute_instance))
}

/// Reads one field, remembering what the device does not support and noticing a lost device.
struct FieldReader<'a> {
    state: &'a mut DeviceState,
    errors: &'a mut Vec<String>,
}

impl FieldReader<'_> {
    fn field<T>(
        &mut self,
        name: &'static str,
        read: impl FnOnce() -> Result<T, NvmlError>,
    ) -> Option<T> {
        if self.state.lost || self.state.not_supported.contains(name) {
            return None;
        }
        match read() {
            Ok(value) => Some(value),
            Err(NvmlError::NotSupported) => {
                tracing::info!(
                    gpu = self.state.index,
                    uuid = self.state.uuid,
                    "GPU does not support {name}; not reported"
                );
                self.state.not_supported.insert(name);
                None
            }
            Err(NvmlError::GpuLost) => {
                self.state.lost = true;
                None
            }
            Err(error) => {
                self.errors.push(format!(
                    "gpu {} {name}: {}",
                    self.state.index,
                    describe(&error)
                ));
                None
            }
        }
    }
}

fn ratio(percent: u32) -> f64 {
    percent as f64 / 100.0
}

fn describe(error: &NvmlError) -> String {
    crate::collectors::error_chain(error)
}

/// The latest PCIe throughput of one device.
#[derive(Debug, Clone, PartialEq)]
pub(super) enum PcieReading {
    Kbps { tx: u32, rx: u32 },
    NotSupported,
    Failed(String),
}

/// Samples PCIe throughput off the collection pass: NVML blocks ~20 ms per counter to measure
/// it, which would stall a pass over 8 GPUs by a third of a second.
pub(super) struct PcieSampler {
    latest: Arc<Mutex<Vec<Option<PcieReading>>>>,
    stop: Option<mpsc::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

/// How often the PCIe sampler reads.
const PCIE_INTERVAL: Duration = Duration::from_secs(1);

impl PcieSampler {
    pub fn start(nvml: Arc<Nvml>, devices: u32) -> Self {
        let latest = Arc::new(Mutex::new(vec![None; devices as usize]));
        let (stop, stopped) = mpsc::channel::<()>();
        let shared = Arc::clone(&latest);
        let thread = std::thread::Builder::new()
            .name("vigil-gpu-pcie".into())
            .spawn(move || {
                loop {
                    for index in 0..devices {
                        let reading = read_pcie(&nvml, index);
                        let Some(reading) = reading else { continue };
                        shared.lock().unwrap_or_else(|p| p.into_inner())[index as usize] =
                            Some(reading);
                    }
                    match stopped.recv_timeout(PCIE_INTERVAL) {
                        Err(mpsc::RecvTimeoutError::Timeout) => {}
                        _ => break,
                    }
                }
            })
            .ok();
        Self {
            latest,
            stop: Some(stop),
            thread,
        }
    }

    pub fn latest(&self) -> Vec<Option<PcieReading>> {
        self.latest
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub fn stop(mut self) {
        self.stop.take();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// `None` when the device is lost (the collection pass reports that).
fn read_pcie(nvml: &Nvml, index: u32) -> Option<PcieReading> {
    let both = nvml.device_by_index(index).and_then(|device| {
        Ok((
            device.pcie_throughput(PcieUtilCounter::Send)?,
            device.pcie_throughput(PcieUtilCounter::Receive)?,
        ))
    });
    match both {
        Ok((tx, rx)) => Some(PcieReading::Kbps { tx, rx }),
        Err(NvmlError::NotSupported) => Some(PcieReading::NotSupported),
        Err(NvmlError::GpuLost) => None,
        Err(error) => Some(PcieReading::Failed(describe(&error))),
    }
}
