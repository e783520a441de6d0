//! The scenario file: what the stand-in driver reports, and when (format in the crate docs).

use std::collections::BTreeSet;

use serde::Deserialize;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Scenario {
    #[serde(default = "default_driver_version")]
    pub driver_version: String,
    #[serde(default = "default_nvml_version")]
    pub nvml_version: String,
    /// A whole-library fault: `nvmlInit_v2` returns this error and nothing else works.
    #[serde(default)]
    pub init_error: Option<InitError>,
    #[serde(default)]
    pub devices: Vec<Device>,
}

fn default_driver_version() -> String {
    "560.35.03".into()
}

fn default_nvml_version() -> String {
    "12.560.35.03".into()
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum InitError {
    /// No kernel driver (`NVML_ERROR_DRIVER_NOT_LOADED`).
    DriverNotLoaded,
    /// Kernel driver and user-space library from different releases
    /// (`NVML_ERROR_LIB_RM_VERSION_MISMATCH`), as after a driver upgrade without a reboot.
    LibRmVersionMismatch,
    /// `NVML_ERROR_NO_PERMISSION`.
    NoPermission,
    /// `NVML_ERROR_UNKNOWN`.
    Unknown,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Device {
    pub uuid: String,
    pub name: String,
    /// `domain:bus:device.function`, e.g. `00000000:17:00.0`.
    pub pci_bus_id: String,
    pub memory_total_bytes: u64,
    #[serde(default)]
    pub power_limit_mw: u32,
    /// Capabilities whose NVML calls return `NVML_ERROR_NOT_SUPPORTED`.
    #[serde(default)]
    pub not_supported: BTreeSet<Capability>,
    /// Values over time; each entry changes the fields it names from `at_s` on.
    #[serde(default)]
    pub timeline: Vec<Values>,
    #[serde(default)]
    pub processes: Vec<Process>,
    #[serde(default)]
    pub events: Vec<Event>,
    /// MIG mode and layout; absent: MIG-capable with MIG off.
    #[serde(default)]
    pub mig: Option<Mig>,
    /// NVLink links in link order; none: NVLink calls return `NVML_ERROR_NOT_SUPPORTED`.
    #[serde(default)]
    pub nvlinks: Vec<NvLink>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NvLink {
    pub active: bool,
    pub replay_errors: u64,
    pub recovery_errors: u64,
    pub crc_flit_errors: u64,
    pub crc_data_errors: u64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Mig {
    /// Current MIG mode (the pending mode reads the same).
    pub enabled: bool,
    /// One MIG device per compute instance, in MIG device index order.
    #[serde(default)]
    pub devices: Vec<MigDevice>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MigDevice {
    pub uuid: String,
    /// As NVML names it, e.g. `NVIDIA H100 80GB HBM3 MIG 3g.40gb`.
    pub name: String,
    pub gpu_instance: u32,
    pub compute_instance: u32,
    pub memory_total_bytes: u64,
    #[serde(default)]
    pub memory_used_bytes: u64,
}

/// What a device may lack; each names the NVML calls it governs.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, PartialOrd, Ord)]
#[serde(rename_all = "snake_case")]
pub enum Capability {
    Utilization,
    Memory,
    PowerUsage,
    PowerLimit,
    Energy,
    Temperature,
    FanSpeed,
    ClockSm,
    ClockMemory,
    ClockGraphics,
    PerformanceState,
    EncoderUtilization,
    DecoderUtilization,
    PcieThroughput,
    ThrottleReasons,
    Ecc,
    Processes,
    ProcessUtilization,
    Events,
    /// Clock-change events (`nvmlEventTypeClock`) only: `nvmlDeviceGetSupportedEventTypes`
    /// leaves the bit out and registering for it fails; the other events are unaffected.
    ClockEvents,
    Mig,
    RemappedRows,
}

/// Device readings from `at_s` on. Every field is optional; absent ones keep their earlier
/// value (none before any entry sets them).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Values {
    #[serde(default)]
    pub at_s: f64,
    pub gpu_util: Option<u32>,
    pub mem_util: Option<u32>,
    pub memory_used_bytes: Option<u64>,
    pub power_mw: Option<u32>,
    pub energy_mj: Option<u64>,
    pub temperature_c: Option<u32>,
    pub fan_speed_pct: Option<u32>,
    pub sm_clock_mhz: Option<u32>,
    pub memory_clock_mhz: Option<u32>,
    pub graphics_clock_mhz: Option<u32>,
    pub performance_state: Option<u32>,
    pub encoder_util: Option<u32>,
    pub decoder_util: Option<u32>,
    pub pcie_tx_kbps: Option<u32>,
    pub pcie_rx_kbps: Option<u32>,
    pub throttle_reasons: Option<Vec<ThrottleReason>>,
    pub ecc_corrected_volatile: Option<u64>,
    pub ecc_uncorrected_volatile: Option<u64>,
    pub ecc_corrected_aggregate: Option<u64>,
    pub ecc_uncorrected_aggregate: Option<u64>,
    pub remapped_rows_correctable: Option<u32>,
    pub remapped_rows_uncorrectable: Option<u32>,
    pub remapped_rows_pending: Option<bool>,
    pub remapped_rows_failure: Option<bool>,
}

impl Values {
    fn apply(&mut self, newer: &Values) {
        macro_rules! carry {
            ($($field:ident),*) => {$(
                if newer.$field.is_some() {
                    self.$field = newer.$field.clone();
                }
            )*};
        }
        carry!(
            gpu_util,
            mem_util,
            memory_used_bytes,
            power_mw,
            energy_mj,
            temperature_c,
            fan_speed_pct,
            sm_clock_mhz,
            memory_clock_mhz,
            graphics_clock_mhz,
            performance_state,
            encoder_util,
            decoder_util,
            pcie_tx_kbps,
            pcie_rx_kbps,
            throttle_reasons,
            ecc_corrected_volatile,
            ecc_uncorrected_volatile,
            ecc_corrected_aggregate,
            ecc_uncorrected_aggregate,
            remapped_rows_correctable,
            remapped_rows_uncorrectable,
            remapped_rows_pending,
            remapped_rows_failure
        );
    }
}

/// NVML's clock-event (throttle) reasons, with their `nvmlClocksEventReason*` bits.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum ThrottleReason {
    GpuIdle,
    ApplicationsClocksSetting,
    SwPowerCap,
    HwSlowdown,
    SyncBoost,
    SwThermalSlowdown,
    HwThermalSlowdown,
    HwPowerBrakeSlowdown,
    DisplayClockSetting,
}

impl ThrottleReason {
    pub fn bit(self) -> u64 {
        match self {
            Self::GpuIdle => 0x1,
            Self::ApplicationsClocksSetting => 0x2,
            Self::SwPowerCap => 0x4,
            Self::HwSlowdown => 0x8,
            Self::SyncBoost => 0x10,
            Self::SwThermalSlowdown => 0x20,
            Self::HwThermalSlowdown => 0x40,
            Self::HwPowerBrakeSlowdown => 0x80,
            Self::DisplayClockSetting => 0x100,
        }
    }
}

/// The clock-event reasons of `values` as NVML's bitmask (0 when none is set).
pub fn throttle_bits(values: &Values) -> u64 {
    values
        .throttle_reasons
        .iter()
        .flatten()
        .fold(0, |bits, reason| bits | reason.bit())
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Process {
    pub pid: u32,
    #[serde(default)]
    pub kind: ProcessKind,
    pub used_memory_bytes: u64,
    #[serde(default)]
    pub sm_util: u32,
    #[serde(default)]
    pub mem_util: u32,
    #[serde(default)]
    pub enc_util: u32,
    #[serde(default)]
    pub dec_util: u32,
    /// Runs from this offset (default 0) ...
    #[serde(default)]
    pub from_s: f64,
    /// ... until this one (default: for ever).
    #[serde(default)]
    pub until_s: Option<f64>,
    /// MIG GPU and compute instance the process runs in, if any.
    #[serde(default)]
    pub gpu_instance: Option<u32>,
    #[serde(default)]
    pub compute_instance: Option<u32>,
}

impl Process {
    pub fn running_at(&self, elapsed_s: f64) -> bool {
        self.from_s <= elapsed_s && self.until_s.is_none_or(|until| elapsed_s < until)
    }
}

#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum ProcessKind {
    #[default]
    Compute,
    Graphics,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Event {
    pub at_s: f64,
    #[serde(rename = "type")]
    pub kind: EventKind,
    /// The XID number of an `xid` event.
    #[serde(default)]
    pub xid: Option<u64>,
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    /// An XID critical error; `xid` gives its number.
    Xid,
    EccSingleBit,
    EccDoubleBit,
    /// The device falls off the bus: from now on its calls return `NVML_ERROR_GPU_IS_LOST`,
    /// and so does `nvmlEventSetWait_v2` on a set it is registered in (once).
    DeviceLost,
}

impl Device {
    /// Readings at `elapsed_s` seconds after `nvmlInit_v2`.
    pub fn values_at(&self, elapsed_s: f64) -> Values {
        let mut values = Values::default();
        for entry in self.timeline.iter().filter(|e| e.at_s <= elapsed_s) {
            values.apply(entry);
        }
        values
    }

    /// The active clock-event (throttle) reasons at `elapsed_s`, as NVML's bitmask.
    pub fn throttle_bits_at(&self, elapsed_s: f64) -> u64 {
        throttle_bits(&self.values_at(elapsed_s))
    }

    /// When the active clock-event reasons change, in time order: each moment after 0 at which
    /// a timeline entry sets `throttle_reasons` to a set other than the one just before, with
    /// the index of the (first) entry at that moment.
    pub fn clock_changes(&self) -> Vec<(f64, usize)> {
        let sorted = self.timeline.windows(2).all(|w| w[0].at_s <= w[1].at_s);
        if !sorted {
            return self.clock_changes_unsorted();
        }
        // One pass over the moments: `nvmlEventSetWait_v2` asks for this on every call, and
        // a day-long timeline (the demo's 8,640 entries) made the quadratic way take seconds
        // under the session lock, stalling every other call.
        let mut changes = Vec::new();
        let mut before = Values::default();
        let mut group_start = 0;
        while group_start < self.timeline.len() {
            let at_s = self.timeline[group_start].at_s;
            let group_end = group_start
                + self.timeline[group_start..]
                    .iter()
                    .take_while(|e| e.at_s == at_s)
                    .count();
            let mut after = before.clone();
            for entry in &self.timeline[group_start..group_end] {
                after.apply(entry);
            }
            let first_setting =
                (group_start..group_end).find(|&i| self.timeline[i].throttle_reasons.is_some());
            if let Some(entry_index) = first_setting
                && at_s > 0.0
                && throttle_bits(&before) != throttle_bits(&after)
            {
                changes.push((at_s, entry_index));
            }
            before = after;
            group_start = group_end;
        }
        changes
    }

    /// [`Device::clock_changes`] for a timeline not in time order: entries apply in the order
    /// they are listed among those due, so each moment is worked out from the whole list.
    fn clock_changes_unsorted(&self) -> Vec<(f64, usize)> {
        let mut changes: Vec<(f64, usize)> = Vec::new();
        for (entry_index, entry) in self.timeline.iter().enumerate() {
            if entry.at_s <= 0.0
                || entry.throttle_reasons.is_none()
                || changes.iter().any(|&(at, _)| at == entry.at_s)
            {
                continue;
            }
            let mut before = Values::default();
            for earlier in self.timeline.iter().filter(|e| e.at_s < entry.at_s) {
                before.apply(earlier);
            }
            if throttle_bits(&before) != self.throttle_bits_at(entry.at_s) {
                changes.push((entry.at_s, entry_index));
            }
        }
        changes.sort_by(|a, b| a.0.total_cmp(&b.0));
        changes
    }

    /// When the device falls off the bus, if it does.
    pub fn lost_at_s(&self) -> Option<f64> {
        self.events
            .iter()
            .filter(|e| e.kind == EventKind::DeviceLost)
            .map(|e| e.at_s)
            .reduce(f64::min)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timeline_entries_change_only_the_fields_they_name() {
        let device: Device = serde_json::from_str(
            r#"{"uuid": "GPU-1", "name": "T", "pci_bus_id": "00000000:01:00.0",
                "memory_total_bytes": 100,
                "timeline": [{"at_s": 0, "gpu_util": 10, "power_mw": 5000},
                             {"at_s": 2, "gpu_util": 90}]}"#,
        )
        .unwrap();
        assert_eq!(device.values_at(1.0).gpu_util, Some(10));
        assert_eq!(device.values_at(2.5).gpu_util, Some(90));
        assert_eq!(device.values_at(2.5).power_mw, Some(5000));
        assert_eq!(device.values_at(2.5).temperature_c, None);
    }

    #[test]
    fn clock_changes_are_the_moments_the_active_reasons_change() {
        let device: Device = serde_json::from_str(
            r#"{"uuid": "GPU-1", "name": "T", "pci_bus_id": "00000000:01:00.0",
                "memory_total_bytes": 100,
                "timeline": [{"at_s": 0, "throttle_reasons": ["gpu_idle"]},
                             {"at_s": 1.5, "throttle_reasons": ["gpu_idle"]},
                             {"at_s": 2, "throttle_reasons": ["sw_power_cap", "hw_slowdown"]},
                             {"at_s": 2, "gpu_util": 10},
                             {"at_s": 2.5, "throttle_reasons": ["hw_slowdown", "sw_power_cap"]},
                             {"at_s": 3, "throttle_reasons": []},
                             {"at_s": 1, "gpu_util": 90}]}"#,
        )
        .unwrap();
        assert_eq!(device.clock_changes(), [(2.0, 2), (3.0, 5)]);
        assert_eq!(device.throttle_bits_at(2.2), 0xc);

        // Reasons set from the start are no change; a first set after 0 is one, unless empty.
        let device: Device = serde_json::from_str(
            r#"{"uuid": "GPU-1", "name": "T", "pci_bus_id": "00000000:01:00.0",
                "memory_total_bytes": 100,
                "timeline": [{"at_s": 0.5, "throttle_reasons": []},
                             {"at_s": 1, "throttle_reasons": ["sync_boost"]}]}"#,
        )
        .unwrap();
        assert_eq!(device.clock_changes(), [(1.0, 1)]);
    }

    #[test]
    fn the_one_pass_clock_changes_agree_with_the_whole_list_way() {
        // A sorted timeline with repeated moments, reasons toggling and other fields between.
        let reasons = [r#"[]"#, r#"["gpu_idle"]"#, r#"["sw_power_cap"]"#];
        let mut entries = Vec::new();
        let mut state = 7u64;
        for k in 0..300 {
            state = state.wrapping_mul(6364136223846793005).wrapping_add(1);
            let at_s = (k / 2) as f64 * 0.5;
            entries.push(match state >> 62 {
                0 => format!(r#"{{"at_s": {at_s}, "gpu_util": {}}}"#, k % 100),
                r => format!(
                    r#"{{"at_s": {at_s}, "throttle_reasons": {}}}"#,
                    reasons[(r as usize + k) % 3]
                ),
            });
        }
        let device: Device = serde_json::from_str(&format!(
            r#"{{"uuid": "GPU-1", "name": "T", "pci_bus_id": "00000000:01:00.0",
                "memory_total_bytes": 100, "timeline": [{}]}}"#,
            entries.join(",")
        ))
        .unwrap();
        let fast = device.clock_changes();
        assert!(fast.len() > 10, "{fast:?}");
        assert_eq!(fast, device.clock_changes_unsorted());
    }

    #[test]
    fn unknown_fields_are_errors() {
        let error = serde_json::from_str::<Scenario>(r#"{"devcies": []}"#).unwrap_err();
        assert!(
            error.to_string().contains("unknown field `devcies`"),
            "{error}"
        );
    }
}
