//! A stand-in for the NVIDIA driver's `libnvidia-ml.so.1`, so the agent's `gpu` collector is
//! tested without a GPU, through the same loading path (`nvml-wrapper`, `dlopen`) as on a real
//! node.
//!
//! The library exports the NVML C functions the agent calls, and answers them from a JSON
//! scenario file: which devices exist, what they read at each moment since `nvmlInit_v2`, which
//! processes use them, and which health events happen when. Functions the scenario does not
//! model are not exported, so a new NVML call in the agent fails loudly in the tests
//! (`FailedToLoadSymbol`) until this library learns it.
//!
//! # Where the scenario comes from
//!
//! `nvmlInit_v2` reads the file named by the environment variable `FAKE_NVML_SCENARIO`; when it
//! is unset, `fake-nvml-scenario.json` in the folder this library was loaded from. The second
//! form lets tests copy the library into folders of their own: each copy is a separate library
//! to the dynamic loader, with its own state, so tests run in parallel without sharing the
//! process environment. The file is read again on every first `nvmlInit_v2` (after a full
//! `nvmlShutdown`), so a test can "install a driver" by rewriting it. A file that cannot be read
//! or parsed makes `nvmlInit_v2` fail with `NVML_ERROR_UNKNOWN` and a message on stderr.
//!
//! # Scenario format
//!
//! ```json
//! {
//!   "driver_version": "560.35.03",        // default; nvmlSystemGetDriverVersion
//!   "nvml_version": "12.560.35.03",       // default; nvmlSystemGetNVMLVersion
//!   "init_error": null,                   // or a whole-library fault, see below
//!   "devices": [{
//!     "uuid": "GPU-5a1c0d3e-0000-0000-0000-000000000001",
//!     "name": "NVIDIA H100 80GB HBM3",
//!     "pci_bus_id": "00000000:17:00.0",
//!     "memory_total_bytes": 85520809984,
//!     "power_limit_mw": 700000,           // nvmlDeviceGetEnforcedPowerLimit
//!     "not_supported": ["fan_speed", "encoder_utilization"],
//!     "timeline": [
//!       {"at_s": 0, "gpu_util": 10, "mem_util": 5, "memory_used_bytes": 1073741824,
//!        "power_mw": 95000, "energy_mj": 1000000, "temperature_c": 35, "fan_speed_pct": 30,
//!        "sm_clock_mhz": 1980, "memory_clock_mhz": 2619, "graphics_clock_mhz": 1980,
//!        "performance_state": 0, "encoder_util": 0, "decoder_util": 0,
//!        "pcie_tx_kbps": 1000, "pcie_rx_kbps": 2000, "throttle_reasons": ["gpu_idle"],
//!        "ecc_corrected_volatile": 0, "ecc_uncorrected_volatile": 0,
//!        "ecc_corrected_aggregate": 0, "ecc_uncorrected_aggregate": 0,
//!        "remapped_rows_correctable": 0, "remapped_rows_uncorrectable": 0,
//!        "remapped_rows_pending": false, "remapped_rows_failure": false},
//!       {"at_s": 2.5, "gpu_util": 97, "throttle_reasons": ["sw_power_cap"]}
//!     ],
//!     "processes": [
//!       {"pid": 4242, "kind": "compute", "used_memory_bytes": 2147483648,
//!        "sm_util": 80, "mem_util": 40, "enc_util": 0, "dec_util": 0,
//!        "from_s": 0, "until_s": 10, "gpu_instance": 1, "compute_instance": 0}
//!     ],
//!     "events": [
//!       {"at_s": 1.0, "type": "xid", "xid": 79},
//!       {"at_s": 1.5, "type": "ecc_single_bit"},
//!       {"at_s": 2.0, "type": "ecc_double_bit"},
//!       {"at_s": 3.0, "type": "device_lost"}
//!     ],
//!     "nvlinks": [
//!       {"active": true, "replay_errors": 0, "recovery_errors": 0, "crc_flit_errors": 0,
//!        "crc_data_errors": 0}
//!     ],
//!     "mig": {"enabled": true, "devices": [
//!       {"uuid": "MIG-0c6b3d1e-0000-4000-8000-000000000001",
//!        "name": "NVIDIA H100 80GB HBM3 MIG 3g.40gb", "gpu_instance": 1,
//!        "compute_instance": 0, "memory_total_bytes": 42949672960,
//!        "memory_used_bytes": 1073741824}
//!     ]}
//!   }]
//! }
//! ```
//!
//! (The comments above are for this page only; the file is plain JSON. Unknown keys are
//! errors.)
//!
//! - **Time** is seconds since the first successful `nvmlInit_v2`.
//! - **`timeline`**: each entry changes the fields it names from `at_s` on; absent fields keep
//!   their earlier value, and a field no entry has set yet reads 0. Units as NVML reports them:
//!   percent, bytes, milliwatts, millijoules (total since driver load), °C, MHz, KB/s.
//!   `throttle_reasons` lists the active clock-event reasons: `gpu_idle`,
//!   `applications_clocks_setting`, `sw_power_cap`, `hw_slowdown`, `sync_boost`,
//!   `sw_thermal_slowdown`, `hw_thermal_slowdown`, `hw_power_brake_slowdown`,
//!   `display_clock_setting`. Memory free is `memory_total_bytes - memory_used_bytes`.
//! - **`not_supported`**: capabilities whose calls return `NVML_ERROR_NOT_SUPPORTED`:
//!   `utilization`, `memory`, `power_usage`, `power_limit`, `energy`, `temperature`,
//!   `fan_speed`, `clock_sm`, `clock_memory`, `clock_graphics`, `performance_state`,
//!   `encoder_utilization`, `decoder_utilization`, `pcie_throughput`, `throttle_reasons`,
//!   `ecc`, `remapped_rows`, `processes`, `process_utilization`, `events`, `clock_events`,
//!   `mig`. `events` takes every event type away; `clock_events` only the clock-change one
//!   (`nvmlEventTypeClock`, see below): `nvmlDeviceGetSupportedEventTypes` leaves its bit out
//!   and `nvmlDeviceRegisterEvents` with it returns `NVML_ERROR_NOT_SUPPORTED`.
//! - **`nvlinks`**: `nvmlDeviceGetNvLinkState` and `nvmlDeviceGetNvLinkErrorCounter` (DL
//!   replay, recovery, CRC flit, CRC data) per link; links past the list are
//!   `NVML_ERROR_INVALID_ARGUMENT`, and a device with none answers `NVML_ERROR_NOT_SUPPORTED`.
//! - **`mig`**: without it a device is MIG-capable with MIG off (`nvmlDeviceGetMigMode` says
//!   0/0). With it, the mode is `enabled`, `nvmlDeviceGetMaxMigDeviceCount` is 7, and
//!   `nvmlDeviceGetMigDeviceHandleByIndex` gives one MIG device per entry (`NVML_ERROR_NOT_FOUND`
//!   for the other indices) answering `nvmlDeviceGetUUID`, `nvmlDeviceGetName`,
//!   `nvmlDeviceGetMemoryInfo_v2`, `nvmlDeviceGetGpuInstanceId` and
//!   `nvmlDeviceGetComputeInstanceId`. A process's `gpu_instance` / `compute_instance` appear in
//!   the running-process lists.
//! - **`processes`** run from `from_s` (default 0) until `until_s` (default: for ever).
//!   `nvmlDeviceGetComputeRunningProcesses_v3` / `...Graphics...` list them by `kind`;
//!   `nvmlDeviceGetProcessUtilization` reports one sample per running process, stamped with
//!   the latest 100 ms tick (wall-clock microseconds, as NVML does), and only when that stamp is
//!   newer than the caller's `lastSeenTimeStamp`.
//! - **`events`** are delivered by `nvmlEventSetWait_v2` once `at_s` has passed, in time
//!   order, to each event set the device was registered in before `at_s` with the matching
//!   type (`xid`: critical XID error with `xid` as its data; `ecc_single_bit`,
//!   `ecc_double_bit`). `device_lost` makes every later call on the device return
//!   `NVML_ERROR_GPU_IS_LOST`, and `nvmlEventSetWait_v2` return it once per event set; the
//!   device's events after its loss are never delivered (those at the same moment are).
//! - **Clock events** come from the timeline, not from `events`: a set the device was
//!   registered in for `nvmlEventTypeClock` (0x10) gets one (event data 0) at each `at_s` > 0
//!   where a timeline entry changes the active `throttle_reasons` (as a set: an entry repeating
//!   the current reasons is no change), in time order with the device's other events and under
//!   the same rules (registered before `at_s`, none after the device's loss). Supported unless
//!   `not_supported` lists `clock_events` (or `events`).
//! - **Event log**: when the environment variable `VIGIL_FAKE_NVML_EVENT_LOG` names a file,
//!   every event `nvmlEventSetWait_v2` returns is appended to it as one line,
//!   `UNIX_NS GPU TYPE DATA` (the wall-clock nanoseconds of the return, the device index,
//!   `xid` / `ecc_single_bit` / `ecc_double_bit` / `clock`, and the event data, the XID for
//!   `xid`): the moment the "driver" delivered it, which `cargo xtask bench alert-latency`
//!   measures from.
//! - **`init_error`** is a whole-library fault: `nvmlInit_v2` returns `driver_not_loaded`
//!   (`NVML_ERROR_DRIVER_NOT_LOADED`), `lib_rm_version_mismatch` (driver and library versions
//!   differ, `NVML_ERROR_LIB_RM_VERSION_MISMATCH`), `no_permission` or `unknown`.

mod scenario;

use std::{
    ffi::{CStr, c_char, c_uint, c_ulonglong},
    os::unix::ffi::OsStrExt,
    path::{Path, PathBuf},
    sync::{Mutex, MutexGuard},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use nvml_wrapper_sys::bindings::{
    nvmlDevice_st, nvmlDevice_t, nvmlEventData_t, nvmlEventSet_st, nvmlEventSet_t, nvmlMemory_v2_t,
    nvmlPciInfo_t, nvmlProcessInfo_t, nvmlProcessUtilizationSample_t, nvmlReturn_t,
    nvmlUtilization_t,
};

pub use scenario::{Capability, EventKind, InitError, Scenario, ThrottleReason};

const SUCCESS: nvmlReturn_t = 0;
const UNINITIALIZED: nvmlReturn_t = 1;
const INVALID_ARGUMENT: nvmlReturn_t = 2;
const NOT_SUPPORTED: nvmlReturn_t = 3;
const NO_PERMISSION: nvmlReturn_t = 4;
const NOT_FOUND: nvmlReturn_t = 6;
const INSUFFICIENT_SIZE: nvmlReturn_t = 7;
const DRIVER_NOT_LOADED: nvmlReturn_t = 9;
const TIMEOUT: nvmlReturn_t = 10;
const GPU_IS_LOST: nvmlReturn_t = 15;
const LIB_RM_VERSION_MISMATCH: nvmlReturn_t = 18;
const UNKNOWN: nvmlReturn_t = 999;

const EVENT_SINGLE_BIT_ECC: u64 = 0x1;
const EVENT_DOUBLE_BIT_ECC: u64 = 0x2;
const EVENT_PSTATE: u64 = 0x4;
const EVENT_XID: u64 = 0x8;
const EVENT_CLOCK: u64 = 0x10;
const SUPPORTED_EVENTS: u64 =
    EVENT_SINGLE_BIT_ECC | EVENT_DOUBLE_BIT_ECC | EVENT_PSTATE | EVENT_XID | EVENT_CLOCK;

/// Process utilization samples are stamped with the latest tick of this period.
const PROCESS_SAMPLE_PERIOD_US: u64 = 100_000;

/// The scenario file's name next to the library when `FAKE_NVML_SCENARIO` is unset.
pub const SCENARIO_FILE_NAME: &str = "fake-nvml-scenario.json";

/// Reads and checks a scenario file.
pub fn load_scenario(path: &Path) -> Result<Scenario, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read scenario {}: {e}", path.display()))?;
    let scenario: Scenario = serde_json::from_str(&text)
        .map_err(|e| format!("invalid scenario {}: {e}", path.display()))?;
    for device in &scenario.devices {
        for event in &device.events {
            if (event.kind == EventKind::Xid) != event.xid.is_some() {
                return Err(format!(
                    "invalid scenario {}: device {}: `xid` goes with (and only with) \
                     events of type `xid`",
                    path.display(),
                    device.uuid
                ));
            }
        }
    }
    Ok(scenario)
}

/// The library's state between `nvmlInit_v2` and the last `nvmlShutdown`.
struct Session {
    scenario: Scenario,
    started: Instant,
    /// Wall clock at `started`, in microseconds since the epoch.
    started_unix_us: u64,
    init_count: u32,
    /// Event sets by handle - 1; `None` once freed.
    event_sets: Vec<Option<EventSetState>>,
}

#[derive(Default)]
struct EventSetState {
    /// (device index, event types, seconds since init) registered in the set.
    registrations: Vec<(usize, u64, f64)>,
    /// (device index, where the event comes from) already delivered.
    delivered: Vec<(usize, Source)>,
}

/// Where an event of a device comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Source {
    /// Its `events` entry with this index.
    Event(usize),
    /// A change of the active clock-event reasons at its timeline entry with this index.
    Clock(usize),
}

impl Session {
    fn elapsed_s(&self) -> f64 {
        self.started.elapsed().as_secs_f64()
    }

    fn is_lost(&self, index: usize, elapsed_s: f64) -> bool {
        self.scenario.devices[index]
            .lost_at_s()
            .is_some_and(|at| at <= elapsed_s)
    }
}

static SESSION: Mutex<Option<Session>> = Mutex::new(None);

fn session() -> MutexGuard<'static, Option<Session>> {
    SESSION
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// `FAKE_NVML_SCENARIO`, else the scenario file next to this library.
fn scenario_path() -> Result<PathBuf, String> {
    if let Some(path) = std::env::var_os("FAKE_NVML_SCENARIO") {
        return Ok(PathBuf::from(path));
    }
    let mut info = libc::Dl_info {
        dli_fname: std::ptr::null(),
        dli_fbase: std::ptr::null_mut(),
        dli_sname: std::ptr::null(),
        dli_saddr: std::ptr::null_mut(),
    };
    let address = nvmlInit_v2 as *const libc::c_void;
    // SAFETY: `address` is a function in this library and `info` a valid out-parameter.
    let found = unsafe { libc::dladdr(address, &mut info) } != 0;
    if !found || info.dli_fname.is_null() {
        return Err("FAKE_NVML_SCENARIO is unset and the library's own path is unknown".into());
    }
    // SAFETY: dladdr succeeded, so `dli_fname` is a NUL-terminated path owned by the loader.
    let library = unsafe { CStr::from_ptr(info.dli_fname) };
    let library = Path::new(std::ffi::OsStr::from_bytes(library.to_bytes()));
    Ok(library.with_file_name(SCENARIO_FILE_NAME))
}

fn init_error_code(error: InitError) -> nvmlReturn_t {
    match error {
        InitError::DriverNotLoaded => DRIVER_NOT_LOADED,
        InitError::LibRmVersionMismatch => LIB_RM_VERSION_MISMATCH,
        InitError::NoPermission => NO_PERMISSION,
        InitError::Unknown => UNKNOWN,
    }
}

#[unsafe(no_mangle)]
extern "C" fn nvmlInit_v2() -> nvmlReturn_t {
    let mut session = session();
    if let Some(session) = session.as_mut() {
        session.init_count += 1;
        return SUCCESS;
    }
    let scenario = match scenario_path().and_then(|path| load_scenario(&path)) {
        Ok(scenario) => scenario,
        Err(message) => {
            eprintln!("fake-nvml: {message}");
            return UNKNOWN;
        }
    };
    if let Some(error) = scenario.init_error {
        return init_error_code(error);
    }
    let started_unix_us = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_micros() as u64;
    *session = Some(Session {
        scenario,
        started: Instant::now(),
        started_unix_us,
        init_count: 1,
        event_sets: Vec::new(),
    });
    SUCCESS
}

#[unsafe(no_mangle)]
extern "C" fn nvmlShutdown() -> nvmlReturn_t {
    let mut guard = session();
    let Some(session) = guard.as_mut() else {
        return UNINITIALIZED;
    };
    session.init_count -= 1;
    if session.init_count == 0 {
        *guard = None;
    }
    SUCCESS
}

#[unsafe(no_mangle)]
extern "C" fn nvmlErrorString(result: nvmlReturn_t) -> *const c_char {
    let text: &'static CStr = match result {
        SUCCESS => c"Success",
        UNINITIALIZED => c"Uninitialized",
        INVALID_ARGUMENT => c"Invalid Argument",
        NOT_SUPPORTED => c"Not Supported",
        NO_PERMISSION => c"Insufficient Permissions",
        INSUFFICIENT_SIZE => c"Insufficient Size",
        DRIVER_NOT_LOADED => c"Driver Not Loaded",
        TIMEOUT => c"Timeout",
        GPU_IS_LOST => c"GPU is lost",
        LIB_RM_VERSION_MISMATCH => c"Driver/library version mismatch",
        _ => c"Unknown Error",
    };
    text.as_ptr()
}

/// Copies `text` into a caller's buffer of `length` bytes, NUL-terminated.
///
/// # Safety
///
/// `buffer` is null or points to `length` writable bytes.
unsafe fn put_string(buffer: *mut c_char, length: c_uint, text: &str) -> nvmlReturn_t {
    if buffer.is_null() {
        return INVALID_ARGUMENT;
    }
    if text.len() + 1 > length as usize {
        return INSUFFICIENT_SIZE;
    }
    // SAFETY: the caller guarantees `length` writable bytes, and text + NUL fits in them.
    unsafe {
        std::ptr::copy_nonoverlapping(text.as_ptr().cast::<c_char>(), buffer, text.len());
        buffer.add(text.len()).write(0);
    }
    SUCCESS
}

/// Writes one value through a caller's out-pointer.
///
/// # Safety
///
/// `out` is null or points to writable memory for a `T`.
unsafe fn put<T>(out: *mut T, value: T) -> nvmlReturn_t {
    if out.is_null() {
        return INVALID_ARGUMENT;
    }
    // SAFETY: non-null, and the caller guarantees it is writable for a `T`.
    unsafe { out.write(value) };
    SUCCESS
}

/// Runs `read` with the session (for library-wide calls).
fn with_session(read: impl FnOnce(&mut Session) -> nvmlReturn_t) -> nvmlReturn_t {
    match session().as_mut() {
        Some(session) => read(session),
        None => UNINITIALIZED,
    }
}

#[unsafe(no_mangle)]
unsafe extern "C" fn nvmlSystemGetDriverVersion(
    version: *mut c_char,
    length: c_uint,
) -> nvmlReturn_t {
    with_session(|session| {
        // SAFETY: nvml.h: `version` holds `length` bytes.
        unsafe { put_string(version, length, &session.scenario.driver_version) }
    })
}

#[unsafe(no_mangle)]
unsafe extern "C" fn nvmlSystemGetNVMLVersion(
    version: *mut c_char,
    length: c_uint,
) -> nvmlReturn_t {
    with_session(|session| {
        // SAFETY: nvml.h: `version` holds `length` bytes.
        unsafe { put_string(version, length, &session.scenario.nvml_version) }
    })
}

#[unsafe(no_mangle)]
unsafe extern "C" fn nvmlDeviceGetCount_v2(count: *mut c_uint) -> nvmlReturn_t {
    with_session(|session| {
        // SAFETY: nvml.h: `count` is an out-parameter.
        unsafe { put(count, session.scenario.devices.len() as c_uint) }
    })
}

fn handle_of(index: usize) -> nvmlDevice_t {
    std::ptr::without_provenance_mut::<nvmlDevice_st>(index + 1)
}

#[unsafe(no_mangle)]
unsafe extern "C" fn nvmlDeviceGetHandleByIndex_v2(
    index: c_uint,
    device: *mut nvmlDevice_t,
) -> nvmlReturn_t {
    with_session(|session| {
        if index as usize >= session.scenario.devices.len() {
            return INVALID_ARGUMENT;
        }
        // SAFETY: nvml.h: `device` is an out-parameter.
        unsafe { put(device, handle_of(index as usize)) }
    })
}

/// One device's state at the moment of a call.
struct DeviceView<'a> {
    index: usize,
    device: &'a scenario::Device,
    values: scenario::Values,
    elapsed_s: f64,
    started_unix_us: u64,
}

/// Answers a call on one device: checks the handle, whether the device is lost and whether it
/// supports `capability`, then runs `answer`.
fn with_device(
    handle: nvmlDevice_t,
    capability: Option<Capability>,
    answer: impl FnOnce(&DeviceView) -> nvmlReturn_t,
) -> nvmlReturn_t {
    with_session(|session| {
        let index = handle.addr().wrapping_sub(1);
        let Some(device) = session.scenario.devices.get(index) else {
            return INVALID_ARGUMENT;
        };
        let elapsed_s = session.elapsed_s();
        if session.is_lost(index, elapsed_s) {
            return GPU_IS_LOST;
        }
        if capability.is_some_and(|c| device.not_supported.contains(&c)) {
            return NOT_SUPPORTED;
        }
        answer(&DeviceView {
            index,
            device,
            values: device.values_at(elapsed_s),
            elapsed_s,
            started_unix_us: session.started_unix_us,
        })
    })
}

/// Defines an exported device getter that writes one value.
macro_rules! device_getter {
    ($name:ident, $capability:expr, $out_type:ty, |$view:ident| $value:expr) => {
        #[unsafe(no_mangle)]
        unsafe extern "C" fn $name(device: nvmlDevice_t, out: *mut $out_type) -> nvmlReturn_t {
            with_device(device, $capability, |$view| {
                // SAFETY: nvml.h: the last argument is an out-parameter.
                unsafe { put(out, $value) }
            })
        }
    };
}

device_getter!(nvmlDeviceGetIndex, None, c_uint, |view| view.index
    as c_uint);
device_getter!(
    nvmlDeviceGetUtilizationRates,
    Some(Capability::Utilization),
    nvmlUtilization_t,
    |view| nvmlUtilization_t {
        gpu: view.values.gpu_util.unwrap_or(0),
        memory: view.values.mem_util.unwrap_or(0),
    }
);
device_getter!(
    nvmlDeviceGetPowerUsage,
    Some(Capability::PowerUsage),
    c_uint,
    |view| view.values.power_mw.unwrap_or(0)
);
device_getter!(
    nvmlDeviceGetEnforcedPowerLimit,
    Some(Capability::PowerLimit),
    c_uint,
    |view| view.device.power_limit_mw
);
device_getter!(
    nvmlDeviceGetTotalEnergyConsumption,
    Some(Capability::Energy),
    c_ulonglong,
    |view| view.values.energy_mj.unwrap_or(0)
);
device_getter!(
    nvmlDeviceGetPerformanceState,
    Some(Capability::PerformanceState),
    nvml_wrapper_sys::bindings::nvmlPstates_t,
    |view| view.values.performance_state.unwrap_or(0) as _
);
device_getter!(
    nvmlDeviceGetCurrentClocksThrottleReasons,
    Some(Capability::ThrottleReasons),
    c_ulonglong,
    |view| scenario::throttle_bits(&view.values)
);
device_getter!(
    nvmlDeviceGetSupportedClocksThrottleReasons,
    Some(Capability::ThrottleReasons),
    c_ulonglong,
    |_view| 0x1ff
);
device_getter!(
    nvmlDeviceGetNumFans,
    Some(Capability::FanSpeed),
    c_uint,
    |_view| 1
);
device_getter!(
    nvmlDeviceGetSupportedEventTypes,
    Some(Capability::Events),
    c_ulonglong,
    |view| supported_events(view.device)
);

/// The event types `device` supports (once `events` is known to be).
fn supported_events(device: &scenario::Device) -> u64 {
    if device.not_supported.contains(&Capability::ClockEvents) {
        SUPPORTED_EVENTS & !EVENT_CLOCK
    } else {
        SUPPORTED_EVENTS
    }
}

#[unsafe(no_mangle)]
unsafe extern "C" fn nvmlDeviceGetUUID(
    device: nvmlDevice_t,
    uuid: *mut c_char,
    length: c_uint,
) -> nvmlReturn_t {
    if handle_is_mig(device) {
        return with_mig_device(device, |mig| {
            // SAFETY: nvml.h: `uuid` holds `length` bytes.
            unsafe { put_string(uuid, length, &mig.uuid) }
        })
        .unwrap_or(INVALID_ARGUMENT);
    }
    with_device(device, None, |view| {
        // SAFETY: nvml.h: `uuid` holds `length` bytes.
        unsafe { put_string(uuid, length, &view.device.uuid) }
    })
}

#[unsafe(no_mangle)]
unsafe extern "C" fn nvmlDeviceGetName(
    device: nvmlDevice_t,
    name: *mut c_char,
    length: c_uint,
) -> nvmlReturn_t {
    if handle_is_mig(device) {
        return with_mig_device(device, |mig| {
            // SAFETY: nvml.h: `name` holds `length` bytes.
            unsafe { put_string(name, length, &mig.name) }
        })
        .unwrap_or(INVALID_ARGUMENT);
    }
    with_device(device, None, |view| {
        // SAFETY: nvml.h: `name` holds `length` bytes.
        unsafe { put_string(name, length, &view.device.name) }
    })
}

/// `domain:bus:device.function` (hex) as NVML's PCI info.
fn pci_info(bus_id: &str) -> Option<nvmlPciInfo_t> {
    let (domain, rest) = bus_id.split_once(':')?;
    let (bus, rest) = rest.split_once(':')?;
    let (device, _function) = rest.split_once('.')?;
    let mut info = nvmlPciInfo_t {
        busIdLegacy: [0; 16],
        domain: u32::from_str_radix(domain, 16).ok()?,
        bus: u32::from_str_radix(bus, 16).ok()?,
        device: u32::from_str_radix(device, 16).ok()?,
        pciDeviceId: 0x2330_10de,
        pciSubSystemId: 0x16c1_10de,
        busId: [0; 32],
    };
    let legacy = format!("{:04x}:{bus}:{rest}", info.domain);
    for (slot, byte) in info.busId.iter_mut().zip(bus_id.bytes().take(31)) {
        *slot = byte as c_char;
    }
    for (slot, byte) in info.busIdLegacy.iter_mut().zip(legacy.bytes().take(15)) {
        *slot = byte as c_char;
    }
    Some(info)
}

#[unsafe(no_mangle)]
unsafe extern "C" fn nvmlDeviceGetPciInfo_v3(
    device: nvmlDevice_t,
    pci: *mut nvmlPciInfo_t,
) -> nvmlReturn_t {
    with_device(device, None, |view| {
        match pci_info(&view.device.pci_bus_id) {
            // SAFETY: nvml.h: `pci` is an out-parameter.
            Some(info) => unsafe { put(pci, info) },
            None => UNKNOWN,
        }
    })
}

#[unsafe(no_mangle)]
unsafe extern "C" fn nvmlDeviceGetMemoryInfo_v2(
    device: nvmlDevice_t,
    memory: *mut nvmlMemory_v2_t,
) -> nvmlReturn_t {
    if memory.is_null() {
        return INVALID_ARGUMENT;
    }
    // SAFETY: non-null; nvml.h: the caller sets `version` before the call.
    let version = unsafe { (*memory).version };
    let info = |total: u64, used: u64| nvmlMemory_v2_t {
        version,
        total,
        reserved: 0,
        free: total - used.min(total),
        used: used.min(total),
    };
    if handle_is_mig(device) {
        return with_mig_device(device, |mig| {
            // SAFETY: nvml.h: `memory` is an out-parameter.
            unsafe { put(memory, info(mig.memory_total_bytes, mig.memory_used_bytes)) }
        })
        .unwrap_or(INVALID_ARGUMENT);
    }
    with_device(device, Some(Capability::Memory), |view| {
        let total = view.device.memory_total_bytes;
        let used = view.values.memory_used_bytes.unwrap_or(0);
        // SAFETY: nvml.h: `memory` is an out-parameter.
        unsafe { put(memory, info(total, used)) }
    })
}

#[unsafe(no_mangle)]
unsafe extern "C" fn nvmlDeviceGetTemperature(
    device: nvmlDevice_t,
    sensor: nvml_wrapper_sys::bindings::nvmlTemperatureSensors_t,
    temperature: *mut c_uint,
) -> nvmlReturn_t {
    with_device(device, Some(Capability::Temperature), |view| {
        if sensor != 0 {
            return INVALID_ARGUMENT;
        }
        // SAFETY: nvml.h: `temperature` is an out-parameter.
        unsafe { put(temperature, view.values.temperature_c.unwrap_or(0)) }
    })
}

#[unsafe(no_mangle)]
unsafe extern "C" fn nvmlDeviceGetFanSpeed_v2(
    device: nvmlDevice_t,
    fan: c_uint,
    speed: *mut c_uint,
) -> nvmlReturn_t {
    with_device(device, Some(Capability::FanSpeed), |view| {
        if fan != 0 {
            return INVALID_ARGUMENT;
        }
        // SAFETY: nvml.h: `speed` is an out-parameter.
        unsafe { put(speed, view.values.fan_speed_pct.unwrap_or(0)) }
    })
}

#[unsafe(no_mangle)]
unsafe extern "C" fn nvmlDeviceGetClockInfo(
    device: nvmlDevice_t,
    clock_type: nvml_wrapper_sys::bindings::nvmlClockType_t,
    clock: *mut c_uint,
) -> nvmlReturn_t {
    let (capability, pick): (_, fn(&scenario::Values) -> Option<u32>) = match clock_type {
        0 => (Capability::ClockGraphics, |v| v.graphics_clock_mhz),
        1 => (Capability::ClockSm, |v| v.sm_clock_mhz),
        2 => (Capability::ClockMemory, |v| v.memory_clock_mhz),
        _ => return NOT_SUPPORTED,
    };
    with_device(device, Some(capability), |view| {
        // SAFETY: nvml.h: `clock` is an out-parameter.
        unsafe { put(clock, pick(&view.values).unwrap_or(0)) }
    })
}

/// Encoder and decoder utilization: percent, and the sampling period in microseconds.
///
/// # Safety
///
/// Both pointers are null or out-parameters.
unsafe fn put_codec_utilization(
    percent: Option<u32>,
    utilization: *mut c_uint,
    period_us: *mut c_uint,
) -> nvmlReturn_t {
    // SAFETY: the caller passes out-parameters.
    match unsafe { put(period_us, 167_000) } {
        SUCCESS => {
            // SAFETY: as above.
            unsafe { put(utilization, percent.unwrap_or(0)) }
        }
        error => error,
    }
}

#[unsafe(no_mangle)]
unsafe extern "C" fn nvmlDeviceGetEncoderUtilization(
    device: nvmlDevice_t,
    utilization: *mut c_uint,
    period_us: *mut c_uint,
) -> nvmlReturn_t {
    with_device(device, Some(Capability::EncoderUtilization), |view| {
        // SAFETY: nvml.h: both are out-parameters.
        unsafe { put_codec_utilization(view.values.encoder_util, utilization, period_us) }
    })
}

#[unsafe(no_mangle)]
unsafe extern "C" fn nvmlDeviceGetDecoderUtilization(
    device: nvmlDevice_t,
    utilization: *mut c_uint,
    period_us: *mut c_uint,
) -> nvmlReturn_t {
    with_device(device, Some(Capability::DecoderUtilization), |view| {
        // SAFETY: nvml.h: both are out-parameters.
        unsafe { put_codec_utilization(view.values.decoder_util, utilization, period_us) }
    })
}

#[unsafe(no_mangle)]
unsafe extern "C" fn nvmlDeviceGetPcieThroughput(
    device: nvmlDevice_t,
    counter: nvml_wrapper_sys::bindings::nvmlPcieUtilCounter_t,
    value: *mut c_uint,
) -> nvmlReturn_t {
    with_device(device, Some(Capability::PcieThroughput), |view| {
        let kbps = match counter {
            0 => view.values.pcie_tx_kbps,
            1 => view.values.pcie_rx_kbps,
            _ => return INVALID_ARGUMENT,
        };
        // SAFETY: nvml.h: `value` is an out-parameter.
        unsafe { put(value, kbps.unwrap_or(0)) }
    })
}

#[unsafe(no_mangle)]
unsafe extern "C" fn nvmlDeviceGetTotalEccErrors(
    device: nvmlDevice_t,
    error_type: nvml_wrapper_sys::bindings::nvmlMemoryErrorType_t,
    counter_type: nvml_wrapper_sys::bindings::nvmlEccCounterType_t,
    count: *mut c_ulonglong,
) -> nvmlReturn_t {
    with_device(device, Some(Capability::Ecc), |view| {
        let v = &view.values;
        let value = match (error_type, counter_type) {
            (0, 0) => v.ecc_corrected_volatile,
            (1, 0) => v.ecc_uncorrected_volatile,
            (0, 1) => v.ecc_corrected_aggregate,
            (1, 1) => v.ecc_uncorrected_aggregate,
            _ => return INVALID_ARGUMENT,
        };
        // SAFETY: nvml.h: `count` is an out-parameter.
        unsafe { put(count, value.unwrap_or(0)) }
    })
}

#[unsafe(no_mangle)]
unsafe extern "C" fn nvmlDeviceGetRemappedRows(
    device: nvmlDevice_t,
    correctable: *mut c_uint,
    uncorrectable: *mut c_uint,
    pending: *mut c_uint,
    failure: *mut c_uint,
) -> nvmlReturn_t {
    with_device(device, Some(Capability::RemappedRows), |view| {
        let v = &view.values;
        let answers = [
            (correctable, v.remapped_rows_correctable.unwrap_or(0)),
            (uncorrectable, v.remapped_rows_uncorrectable.unwrap_or(0)),
            (pending, v.remapped_rows_pending.unwrap_or(false) as c_uint),
            (failure, v.remapped_rows_failure.unwrap_or(false) as c_uint),
        ];
        for (out, value) in answers {
            // SAFETY: nvml.h: all four are out-parameters.
            let code = unsafe { put(out, value) };
            if code != SUCCESS {
                return code;
            }
        }
        SUCCESS
    })
}

/// Answers a call on one NVLink of a device.
fn with_nvlink(
    device: nvmlDevice_t,
    link: c_uint,
    answer: impl FnOnce(&scenario::NvLink) -> nvmlReturn_t,
) -> nvmlReturn_t {
    with_device(device, None, |view| {
        if view.device.nvlinks.is_empty() {
            return NOT_SUPPORTED;
        }
        match view.device.nvlinks.get(link as usize) {
            Some(nvlink) => answer(nvlink),
            None => INVALID_ARGUMENT,
        }
    })
}

#[unsafe(no_mangle)]
unsafe extern "C" fn nvmlDeviceGetNvLinkState(
    device: nvmlDevice_t,
    link: c_uint,
    active: *mut nvml_wrapper_sys::bindings::nvmlEnableState_t,
) -> nvmlReturn_t {
    with_nvlink(device, link, |nvlink| {
        // SAFETY: nvml.h: `active` is an out-parameter.
        unsafe { put(active, nvlink.active as _) }
    })
}

#[unsafe(no_mangle)]
unsafe extern "C" fn nvmlDeviceGetNvLinkErrorCounter(
    device: nvmlDevice_t,
    link: c_uint,
    counter: nvml_wrapper_sys::bindings::nvmlNvLinkErrorCounter_t,
    value: *mut c_ulonglong,
) -> nvmlReturn_t {
    with_nvlink(device, link, |nvlink| {
        let count = match counter {
            0 => nvlink.replay_errors,
            1 => nvlink.recovery_errors,
            2 => nvlink.crc_flit_errors,
            3 => nvlink.crc_data_errors,
            _ => return NOT_SUPPORTED,
        };
        // SAFETY: nvml.h: `value` is an out-parameter.
        unsafe { put(value, count) }
    })
}

#[unsafe(no_mangle)]
unsafe extern "C" fn nvmlDeviceGetMigMode(
    device: nvmlDevice_t,
    current: *mut c_uint,
    pending: *mut c_uint,
) -> nvmlReturn_t {
    with_device(device, Some(Capability::Mig), |view| {
        let mode = view.device.mig.as_ref().is_some_and(|mig| mig.enabled) as c_uint;
        // SAFETY: nvml.h: both are out-parameters.
        match unsafe { put(current, mode) } {
            // SAFETY: as above.
            SUCCESS => unsafe { put(pending, mode) },
            error => error,
        }
    })
}

/// MIG device slots per GPU, as on an A100 or H100.
const MIG_SLOTS: usize = 7;

/// MIG device handles live above GPU handles: 0x10000 + (GPU index << 8) + MIG index.
const MIG_HANDLE_BASE: usize = 0x10000;

fn mig_handle(gpu: usize, mig: usize) -> nvmlDevice_t {
    std::ptr::without_provenance_mut::<nvmlDevice_st>(MIG_HANDLE_BASE + (gpu << 8) + mig)
}

/// Answers a call on a MIG device handle; `None` when `handle` is not one.
fn with_mig_device(
    handle: nvmlDevice_t,
    answer: impl FnOnce(&scenario::MigDevice) -> nvmlReturn_t,
) -> Option<nvmlReturn_t> {
    let offset = handle.addr().checked_sub(MIG_HANDLE_BASE)?;
    let (gpu, mig) = (offset >> 8, offset & 0xff);
    Some(with_session(|session| {
        let Some(device) = session.scenario.devices.get(gpu) else {
            return INVALID_ARGUMENT;
        };
        if session.is_lost(gpu, session.elapsed_s()) {
            return GPU_IS_LOST;
        }
        match device.mig.as_ref().and_then(|m| m.devices.get(mig)) {
            Some(mig) => answer(mig),
            None => INVALID_ARGUMENT,
        }
    }))
}

device_getter!(
    nvmlDeviceGetMaxMigDeviceCount,
    Some(Capability::Mig),
    c_uint,
    |_view| MIG_SLOTS as c_uint
);

#[unsafe(no_mangle)]
unsafe extern "C" fn nvmlDeviceGetMigDeviceHandleByIndex(
    device: nvmlDevice_t,
    index: c_uint,
    mig_device: *mut nvmlDevice_t,
) -> nvmlReturn_t {
    with_device(device, Some(Capability::Mig), |view| {
        let index = index as usize;
        let populated = view
            .device
            .mig
            .as_ref()
            .filter(|mig| mig.enabled)
            .is_some_and(|mig| index < mig.devices.len());
        match (populated, index < MIG_SLOTS) {
            // SAFETY: nvml.h: `mig_device` is an out-parameter.
            (true, _) => unsafe { put(mig_device, mig_handle(view.index, index)) },
            (false, true) => NOT_FOUND,
            (false, false) => INVALID_ARGUMENT,
        }
    })
}

#[unsafe(no_mangle)]
unsafe extern "C" fn nvmlDeviceIsMigDeviceHandle(
    device: nvmlDevice_t,
    is_mig: *mut c_uint,
) -> nvmlReturn_t {
    let mig = handle_is_mig(device) as c_uint;
    // SAFETY: nvml.h: `is_mig` is an out-parameter.
    unsafe { put(is_mig, mig) }
}

fn handle_is_mig(handle: nvmlDevice_t) -> bool {
    handle.addr() >= MIG_HANDLE_BASE
}

#[unsafe(no_mangle)]
unsafe extern "C" fn nvmlDeviceGetGpuInstanceId(
    device: nvmlDevice_t,
    id: *mut c_uint,
) -> nvmlReturn_t {
    with_mig_device(device, |mig| {
        // SAFETY: nvml.h: `id` is an out-parameter.
        unsafe { put(id, mig.gpu_instance) }
    })
    .unwrap_or(INVALID_ARGUMENT)
}

#[unsafe(no_mangle)]
unsafe extern "C" fn nvmlDeviceGetComputeInstanceId(
    device: nvmlDevice_t,
    id: *mut c_uint,
) -> nvmlReturn_t {
    with_mig_device(device, |mig| {
        // SAFETY: nvml.h: `id` is an out-parameter.
        unsafe { put(id, mig.compute_instance) }
    })
    .unwrap_or(INVALID_ARGUMENT)
}

/// Fills a caller's array from `items`, NVML style: with a null array or too small a
/// `count`, returns `NVML_ERROR_INSUFFICIENT_SIZE` and the needed count (or success and 0).
///
/// # Safety
///
/// `count` is an in/out parameter; `array` is null or holds `*count` elements.
unsafe fn put_array<T>(items: Vec<T>, count: *mut c_uint, array: *mut T) -> nvmlReturn_t {
    if count.is_null() {
        return INVALID_ARGUMENT;
    }
    // SAFETY: non-null in/out parameter.
    let capacity = unsafe { *count } as usize;
    // SAFETY: as above.
    unsafe { *count = items.len() as c_uint };
    if items.is_empty() {
        return SUCCESS;
    }
    if array.is_null() || capacity < items.len() {
        return INSUFFICIENT_SIZE;
    }
    for (offset, item) in items.into_iter().enumerate() {
        // SAFETY: the caller's array holds `capacity` >= items.len() elements.
        unsafe { array.add(offset).write(item) };
    }
    SUCCESS
}

/// # Safety
///
/// As [`put_array`].
unsafe fn running_processes(
    device: nvmlDevice_t,
    kind: scenario::ProcessKind,
    count: *mut c_uint,
    infos: *mut nvmlProcessInfo_t,
) -> nvmlReturn_t {
    with_device(device, Some(Capability::Processes), |view| {
        let items = view
            .device
            .processes
            .iter()
            .filter(|p| p.kind == kind && p.running_at(view.elapsed_s))
            .map(|p| nvmlProcessInfo_t {
                pid: p.pid,
                usedGpuMemory: p.used_memory_bytes,
                gpuInstanceId: p.gpu_instance.unwrap_or(u32::MAX),
                computeInstanceId: p.compute_instance.unwrap_or(u32::MAX),
            })
            .collect();
        // SAFETY: the caller passes NVML's count/array pair.
        unsafe { put_array(items, count, infos) }
    })
}

#[unsafe(no_mangle)]
unsafe extern "C" fn nvmlDeviceGetComputeRunningProcesses_v3(
    device: nvmlDevice_t,
    count: *mut c_uint,
    infos: *mut nvmlProcessInfo_t,
) -> nvmlReturn_t {
    // SAFETY: nvml.h: count/array pair.
    unsafe { running_processes(device, scenario::ProcessKind::Compute, count, infos) }
}

#[unsafe(no_mangle)]
unsafe extern "C" fn nvmlDeviceGetGraphicsRunningProcesses_v3(
    device: nvmlDevice_t,
    count: *mut c_uint,
    infos: *mut nvmlProcessInfo_t,
) -> nvmlReturn_t {
    // SAFETY: nvml.h: count/array pair.
    unsafe { running_processes(device, scenario::ProcessKind::Graphics, count, infos) }
}

#[unsafe(no_mangle)]
unsafe extern "C" fn nvmlDeviceGetProcessUtilization(
    device: nvmlDevice_t,
    samples: *mut nvmlProcessUtilizationSample_t,
    count: *mut c_uint,
    last_seen_us: c_ulonglong,
) -> nvmlReturn_t {
    with_device(device, Some(Capability::ProcessUtilization), |view| {
        let elapsed_us = (view.elapsed_s * 1e6) as u64;
        let stamp =
            view.started_unix_us + elapsed_us / PROCESS_SAMPLE_PERIOD_US * PROCESS_SAMPLE_PERIOD_US;
        let items = if stamp > last_seen_us {
            view.device
                .processes
                .iter()
                .filter(|p| p.running_at(view.elapsed_s))
                .map(|p| nvmlProcessUtilizationSample_t {
                    pid: p.pid,
                    timeStamp: stamp,
                    smUtil: p.sm_util,
                    memUtil: p.mem_util,
                    encUtil: p.enc_util,
                    decUtil: p.dec_util,
                })
                .collect()
        } else {
            Vec::new()
        };
        // SAFETY: nvml.h: count/array pair.
        unsafe { put_array(items, count, samples) }
    })
}

fn set_handle(index: usize) -> nvmlEventSet_t {
    std::ptr::without_provenance_mut::<nvmlEventSet_st>(index + 1)
}

#[unsafe(no_mangle)]
unsafe extern "C" fn nvmlEventSetCreate(set: *mut nvmlEventSet_t) -> nvmlReturn_t {
    with_session(|session| {
        session.event_sets.push(Some(EventSetState::default()));
        // SAFETY: nvml.h: `set` is an out-parameter.
        unsafe { put(set, set_handle(session.event_sets.len() - 1)) }
    })
}

#[unsafe(no_mangle)]
extern "C" fn nvmlEventSetFree(set: nvmlEventSet_t) -> nvmlReturn_t {
    with_session(
        |session| match session.event_sets.get_mut(set.addr().wrapping_sub(1)) {
            Some(slot @ Some(_)) => {
                *slot = None;
                SUCCESS
            }
            _ => INVALID_ARGUMENT,
        },
    )
}

#[unsafe(no_mangle)]
extern "C" fn nvmlDeviceRegisterEvents(
    device: nvmlDevice_t,
    types: c_ulonglong,
    set: nvmlEventSet_t,
) -> nvmlReturn_t {
    let checked = with_device(device, Some(Capability::Events), |view| {
        if types & !supported_events(view.device) != 0 {
            NOT_SUPPORTED
        } else {
            SUCCESS
        }
    });
    if checked != SUCCESS {
        return checked;
    }
    with_session(|session| {
        let now = session.elapsed_s();
        match session.event_sets.get_mut(set.addr().wrapping_sub(1)) {
            Some(Some(state)) => {
                state.registrations.push((device.addr() - 1, types, now));
                SUCCESS
            }
            _ => INVALID_ARGUMENT,
        }
    })
}

/// What `nvmlEventSetWait_v2` finds in a set now.
enum Due {
    Event(nvmlEventData_t),
    Lost,
    /// Nothing yet; the next event (if any) is due this long from now.
    Later(Option<Duration>),
}

fn next_due(session: &mut Session, set: usize) -> Option<Due> {
    let elapsed_s = session.elapsed_s();
    let devices = &session.scenario.devices;
    let state = session.event_sets.get_mut(set)?.as_mut()?;
    let mut earliest: Option<(f64, usize, Source)> = None;
    for &(device_index, types, registered_at_s) in &state.registrations {
        let device = &devices[device_index];
        let lost_at = device.lost_at_s();
        let scenario_events = device
            .events
            .iter()
            .enumerate()
            .filter(|(_, event)| match event.kind {
                EventKind::Xid => types & EVENT_XID != 0,
                EventKind::EccSingleBit => types & EVENT_SINGLE_BIT_ECC != 0,
                EventKind::EccDoubleBit => types & EVENT_DOUBLE_BIT_ECC != 0,
                EventKind::DeviceLost => lost_at == Some(event.at_s),
            })
            .map(|(index, event)| {
                let lost = event.kind == EventKind::DeviceLost;
                (event.at_s, Source::Event(index), lost)
            });
        let clock_changes = if types & EVENT_CLOCK != 0 {
            device.clock_changes()
        } else {
            Vec::new()
        };
        let clock_events = clock_changes
            .into_iter()
            .map(|(at_s, entry)| (at_s, Source::Clock(entry), false));
        for (at_s, source, is_loss) in scenario_events.chain(clock_events) {
            let after_loss = !is_loss && lost_at.is_some_and(|lost| lost < at_s);
            if after_loss
                || at_s < registered_at_s
                || state.delivered.contains(&(device_index, source))
            {
                continue;
            }
            if earliest.is_none_or(|(at, _, _)| at_s < at) {
                earliest = Some((at_s, device_index, source));
            }
        }
    }
    let Some((at_s, device_index, source)) = earliest else {
        return Some(Due::Later(None));
    };
    if at_s > elapsed_s {
        return Some(Due::Later(Some(Duration::from_secs_f64(at_s - elapsed_s))));
    }
    state.delivered.push((device_index, source));
    let (event_type, data) = match source {
        Source::Clock(_) => (EVENT_CLOCK, 0),
        Source::Event(event_index) => {
            let event = &devices[device_index].events[event_index];
            match event.kind {
                EventKind::Xid => (EVENT_XID, event.xid.unwrap_or(0)),
                EventKind::EccSingleBit => (EVENT_SINGLE_BIT_ECC, 0),
                EventKind::EccDoubleBit => (EVENT_DOUBLE_BIT_ECC, 0),
                EventKind::DeviceLost => return Some(Due::Lost),
            }
        }
    };
    Some(Due::Event(nvmlEventData_t {
        device: handle_of(device_index),
        eventType: event_type,
        eventData: data,
        gpuInstanceId: u32::MAX,
        computeInstanceId: u32::MAX,
    }))
}

/// Appends a delivered event to `VIGIL_FAKE_NVML_EVENT_LOG`, if set (see the module docs).
fn log_event(event: &nvmlEventData_t) {
    let Some(path) = std::env::var_os("VIGIL_FAKE_NVML_EVENT_LOG") else {
        return;
    };
    let unix_ns = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos();
    let kind = match event.eventType {
        EVENT_XID => "xid",
        EVENT_SINGLE_BIT_ECC => "ecc_single_bit",
        EVENT_DOUBLE_BIT_ECC => "ecc_double_bit",
        _ => "clock",
    };
    let line = format!(
        "{unix_ns} {} {kind} {}\n",
        event.device.addr().wrapping_sub(1),
        event.eventData
    );
    let written = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .and_then(|mut file| std::io::Write::write_all(&mut file, line.as_bytes()));
    if let Err(error) = written {
        eprintln!(
            "fake-nvml: cannot append to VIGIL_FAKE_NVML_EVENT_LOG {}: {error}",
            std::path::Path::new(&path).display()
        );
    }
}

#[unsafe(no_mangle)]
unsafe extern "C" fn nvmlEventSetWait_v2(
    set: nvmlEventSet_t,
    data: *mut nvmlEventData_t,
    timeout_ms: c_uint,
) -> nvmlReturn_t {
    let deadline = Instant::now() + Duration::from_millis(timeout_ms.into());
    loop {
        let due = match session().as_mut() {
            None => return UNINITIALIZED,
            Some(session) => next_due(session, set.addr().wrapping_sub(1)),
        };
        let wait = match due {
            None => return INVALID_ARGUMENT,
            Some(Due::Event(event)) => {
                log_event(&event);
                // SAFETY: nvml.h: `data` is an out-parameter.
                return unsafe { put(data, event) };
            }
            Some(Due::Lost) => return GPU_IS_LOST,
            Some(Due::Later(wait)) => wait,
        };
        let now = Instant::now();
        if now >= deadline {
            return TIMEOUT;
        }
        // Sleep until the next event is due or the timeout, whichever comes first; never hold
        // the lock while waiting.
        let left = deadline - now;
        std::thread::sleep(wait.map_or(left, |wait| wait.min(left)));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pci_bus_ids_parse_into_nvml_fields() {
        let info = pci_info("00000000:17:00.0").unwrap();
        assert_eq!((info.domain, info.bus, info.device), (0, 0x17, 0));
        // SAFETY: both buffers are NUL-terminated by construction.
        let (bus_id, legacy) = unsafe {
            (
                CStr::from_ptr(info.busId.as_ptr()),
                CStr::from_ptr(info.busIdLegacy.as_ptr()),
            )
        };
        assert_eq!(bus_id.to_str().unwrap(), "00000000:17:00.0");
        assert_eq!(legacy.to_str().unwrap(), "0000:17:00.0");
        assert!(pci_info("17:00.0").is_none());
    }
}
