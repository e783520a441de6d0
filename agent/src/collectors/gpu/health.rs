//! GPU health events as they happen: XID critical errors, single- and double-bit ECC errors,
//! clock-event (throttle) reason changes, and devices falling off the bus, from an NVML event
//! set waited on by a thread of its own.
//!
//! Each event is queued for the collector's `take_events` the moment NVML reports it, and
//! bumps a counter (`vigil_gpu_xid_errors_total{xid}`, `vigil_gpu_ecc_error_events_total{type}`).
//! On an NVML clock event the thread reads the device's active clock-event reasons at once and
//! reports them if they changed. Devices without clock events (NVML documents them for few
//! GPUs) have their changes noticed by the collection pass instead; both record the reasons
//! they read here ([`HealthState::clock_event_reasons`]), so a change is reported once
//! whichever path sees it first.
//!
//! Queuing an event rings [`HEALTH_EVENTS`], which `vigil-agent run` waits on between passes:
//! it sends the events (with the health counters) in a batch of their own at once, so an XID
//! reaches the aggregator in milliseconds rather than with the next pass.

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::{
        Arc, Condvar, Mutex, MutexGuard,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use nvml_wrapper::{
    Device, Nvml,
    bitmasks::{device::ThrottleReasons, event::EventTypes},
    enums::event::XidError,
    error::NvmlError,
    event::EventSet,
};

use super::{
    ECC_ERROR_EVENTS_METRIC, XID_ERRORS_METRIC,
    device::{DeviceState, clock_event_reasons_changed},
    value_sample,
};
use crate::sample::{Event, Labels, Sample};

/// How long one wait for events lasts; bounds how long stopping the thread takes, not how
/// late an event is (a wait returns as soon as one arrives). Also how often the clock-event
/// reasons of devices without clock events are read, so their changes are that late at most.
const WAIT_MS: u32 = 200;

/// Rung when the health-event thread queues events; see [`Doorbell`].
pub static HEALTH_EVENTS: Doorbell = Doorbell::new();

/// A wake-up for threads that wait between collection passes: a generation count, so every
/// waiter sees every ring (however many wait), and a ring between two waits is not lost.
#[derive(Debug)]
pub struct Doorbell {
    rings: Mutex<u64>,
    bell: Condvar,
}

impl Default for Doorbell {
    fn default() -> Self {
        Self::new()
    }
}

impl Doorbell {
    pub const fn new() -> Self {
        Self {
            rings: Mutex::new(0),
            bell: Condvar::new(),
        }
    }

    pub fn ring(&self) {
        *self.rings.lock().unwrap_or_else(|p| p.into_inner()) += 1;
        self.bell.notify_all();
    }

    /// How many rings so far: what a waiter starts from.
    pub fn rings(&self) -> u64 {
        *self.rings.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Waits up to `timeout` for a ring after `seen` (which it then moves to the latest);
    /// whether one came.
    pub fn wait(&self, seen: &mut u64, timeout: Duration) -> bool {
        let rings = self.rings.lock().unwrap_or_else(|p| p.into_inner());
        let (rings, _) = self
            .bell
            .wait_timeout_while(rings, timeout, |rings| *rings == *seen)
            .unwrap_or_else(|p| p.into_inner());
        let rung = *rings != *seen;
        *seen = *rings;
        rung
    }
}

/// What the common XIDs mean, in a few words (NVIDIA's XID catalog has the rest).
pub fn xid_meaning(xid: u64) -> Option<&'static str> {
    Some(match xid {
        13 => "graphics engine exception (often an application fault, e.g. an illegal access)",
        31 => "GPU memory page fault (usually an application's illegal address)",
        43 => "GPU stopped processing (a channel was reset after an application fault)",
        45 => "preemptive cleanup after earlier errors (a process was killed or ended)",
        48 => "double-bit ECC error (uncorrectable memory error)",
        63 => "ECC page retirement or row remapping recorded",
        64 => "ECC page retirement or row remapping failed",
        74 => "NVLink error",
        79 => "GPU has fallen off the bus",
        92 => "high single-bit ECC error rate",
        94 => "contained ECC error (the affected application must restart)",
        95 => "uncontained ECC error (all applications on the GPU are affected; reset the GPU)",
        _ => return None,
    })
}

/// What the event thread found, shared with the collector.
#[derive(Default)]
pub(super) struct HealthState {
    /// Events not yet taken.
    pub events: Vec<Event>,
    /// Devices that fell off the bus.
    pub lost: BTreeSet<u32>,
    /// Why events are not (all) watched, if they are not.
    pub error: Option<String>,
    /// (gpu, xid) -> count.
    xid_errors: BTreeMap<(u32, u64), u64>,
    /// (gpu, "single_bit" | "double_bit") -> count.
    ecc_events: BTreeMap<(u32, &'static str), u64>,
    /// Device labels by index, for the events.
    labels: BTreeMap<u32, (Labels, String)>,
    /// gpu -> (clock-event reasons it supports, active ones last recorded), by either path.
    clock_reasons: BTreeMap<u32, (ThrottleReasons, Option<ThrottleReasons>)>,
}

impl HealthState {
    /// Records a device falling off the bus (once), however it was noticed.
    pub fn device_lost(&mut self, index: u32, labels: Labels, noticed_by: &str) {
        if !self.lost.insert(index) {
            return;
        }
        let uuid = labels.get("uuid").cloned().unwrap_or_default();
        self.events.push(Event::now(
            "gpu_lost",
            labels,
            format!(
                "gpu {index} ({uuid}) fell off the bus: NVML answers \"GPU is lost\" \
                 (noticed by {noticed_by}); reload the driver or reboot the node"
            ),
        ));
    }

    fn xid(&mut self, index: u32, xid: Option<u64>) {
        let (mut labels, model) = self.labels.get(&index).cloned().unwrap_or_default();
        let number = xid.map_or_else(|| "unknown".to_string(), |x| x.to_string());
        let meaning = xid
            .and_then(xid_meaning)
            .unwrap_or("see NVIDIA's XID catalog");
        if let Some(xid) = xid {
            *self.xid_errors.entry((index, xid)).or_default() += 1;
        }
        labels.insert("xid".into(), number.clone());
        self.events.push(Event::now(
            "gpu_xid",
            labels,
            format!("gpu {index} ({model}) XID {number}: {meaning}"),
        ));
    }

    fn ecc(&mut self, index: u32, kind: &'static str) {
        let (mut labels, model) = self.labels.get(&index).cloned().unwrap_or_default();
        *self.ecc_events.entry((index, kind)).or_default() += 1;
        let what = match kind {
            "single_bit" => "single-bit ECC error (corrected)",
            _ => "double-bit ECC error (uncorrected)",
        };
        labels.insert("type".into(), kind.into());
        self.events.push(Event::now(
            "gpu_ecc_error",
            labels,
            format!("gpu {index} ({model}) {what}"),
        ));
    }

    /// Records the clock-event reasons active on device `index`, just read (with this state
    /// locked, so readings are recorded in the order they were taken); an event when they
    /// differ from those recorded before. The first recording is the baseline.
    pub fn clock_event_reasons(
        &mut self,
        index: u32,
        supported: ThrottleReasons,
        active: ThrottleReasons,
    ) {
        let (known, last) = self.clock_reasons.entry(index).or_insert((supported, None));
        *known = supported;
        let before = last.replace(active);
        if before.is_none_or(|before| before == active) {
            return;
        }
        let (labels, model) = self.labels.get(&index).cloned().unwrap_or_default();
        self.events.push(clock_event_reasons_changed(
            index, labels, &model, supported, active,
        ));
    }

    /// An NVML clock event on device `index`: reads its active clock-event reasons now.
    fn clock_changed(&mut self, index: u32, device: &Device) {
        let Some(&(supported, _)) = self.clock_reasons.get(&index) else {
            return;
        };
        match device.current_throttle_reasons() {
            Ok(active) => self.clock_event_reasons(index, supported, active),
            Err(NvmlError::GpuLost) => {
                let labels = self.labels.get(&index).cloned().unwrap_or_default().0;
                self.device_lost(index, labels, "the health-event thread");
            }
            // The next pass reads them too, and says in the status why it could not.
            Err(error) => tracing::debug!(
                gpu = index,
                "clock event, but the clock-event reasons could not be read: {}",
                crate::collectors::error_chain(&error)
            ),
        }
    }

    /// The health counters: XIDs seen, and ECC error events per type (0 until one happens).
    pub fn samples(&self, devices: &[DeviceState], out: &mut Vec<Sample>) {
        for device in devices {
            for kind in ["single_bit", "double_bit"] {
                let mut labels = device.labels();
                labels.insert("type".into(), kind.into());
                let count = self.ecc_events.get(&(device.index, kind)).copied();
                out.push(value_sample(
                    ECC_ERROR_EVENTS_METRIC,
                    labels,
                    count.unwrap_or(0) as f64,
                ));
            }
            for (&(_, xid), &count) in self
                .xid_errors
                .range((device.index, 0)..=(device.index, u64::MAX))
            {
                let mut labels = device.labels();
                labels.insert("xid".into(), xid.to_string());
                out.push(value_sample(XID_ERRORS_METRIC, labels, count as f64));
            }
        }
    }
}

/// The shared state, even if a thread panicked while holding it (it stays consistent: every
/// update is a single insert or push).
pub(super) fn lock(state: &Mutex<HealthState>) -> MutexGuard<'_, HealthState> {
    state
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The thread waiting on NVML's event set.
pub(super) struct HealthWatcher {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    /// Why the thread did not start.
    pub start_error: Option<String>,
}

/// The error events watched, where a device supports them.
fn wanted_events() -> EventTypes {
    EventTypes::CRITICAL_XID_ERROR
        | EventTypes::SINGLE_BIT_ECC_ERROR
        | EventTypes::DOUBLE_BIT_ECC_ERROR
}

/// Records the baseline of a device's clock-event reasons; whether it could be read (and so
/// whether its clock events are worth watching).
fn clock_baseline(nvml: &Nvml, index: u32, state: &mut HealthState) -> bool {
    let reasons = nvml.device_by_index(index).and_then(|device| {
        Ok((
            device.supported_throttle_reasons()?,
            device.current_throttle_reasons()?,
        ))
    });
    match reasons {
        Ok((supported, active)) => {
            state.clock_event_reasons(index, supported, active);
            true
        }
        // The pass finds out, and says so in the status where it matters.
        Err(_) => false,
    }
}

impl HealthWatcher {
    /// Registers every device for the health events it supports (devices with no error events
    /// get `events` in their not-supported list; clock events are watched where supported, and
    /// left to the collection pass elsewhere without a word) and starts waiting for them.
    pub fn start(
        nvml: Arc<Nvml>,
        devices: &mut [DeviceState],
        shared: Arc<Mutex<HealthState>>,
    ) -> Self {
        let mut registrations = Vec::new();
        // Devices whose clock-event reasons the thread reads itself every WAIT_MS, because they
        // send no clock events (every GPU since Kepler, says nvml.h).
        let mut polled = Vec::new();
        {
            let mut state = lock(&shared);
            // From an earlier NVML, if any: its readings say nothing about this one's devices.
            state.clock_reasons.clear();
            for device in devices.iter_mut() {
                state
                    .labels
                    .insert(device.index, (device.labels(), device.model.clone()));
                let supported = nvml
                    .device_by_index(device.index)
                    .and_then(|d| d.supported_event_types());
                match supported {
                    Ok(types) => {
                        let mut watched = types & wanted_events();
                        if watched.is_empty() {
                            device.not_supported.insert("events");
                        }
                        if clock_baseline(&nvml, device.index, &mut state) {
                            if types.contains(EventTypes::CLOCK_CHANGE) {
                                watched |= EventTypes::CLOCK_CHANGE;
                            } else {
                                polled.push(device.index);
                            }
                        }
                        if !watched.is_empty() {
                            registrations.push((device.index, watched));
                        }
                    }
                    Err(NvmlError::NotSupported) => {
                        device.not_supported.insert("events");
                        if clock_baseline(&nvml, device.index, &mut state) {
                            polled.push(device.index);
                        }
                    }
                    Err(error) => {
                        state.error = Some(format!(
                            "gpu {}: health events not watched: {}",
                            device.index,
                            crate::collectors::error_chain(&error)
                        ));
                    }
                }
            }
        }
        let stop = Arc::new(AtomicBool::new(false));
        let thread_stop = Arc::clone(&stop);
        let spawned = std::thread::Builder::new()
            .name("vigil-gpu-health".into())
            .spawn(move || watch(&nvml, registrations, polled, &shared, &thread_stop));
        match spawned {
            Ok(thread) => Self {
                stop,
                thread: Some(thread),
                start_error: None,
            },
            Err(error) => Self {
                stop,
                thread: None,
                start_error: Some(format!("health-event thread did not start: {error}")),
            },
        }
    }

    pub fn stop(mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// An event set with every device of `registrations` that has not fallen off the bus.
fn event_set<'n>(
    nvml: &'n Nvml,
    registrations: &[(u32, EventTypes)],
    shared: &Mutex<HealthState>,
) -> Result<EventSet<'n>, NvmlError> {
    let mut set = nvml.create_event_set()?;
    for &(index, types) in registrations {
        if lock(shared).lost.contains(&index) {
            continue;
        }
        let registered = nvml
            .device_by_index(index)
            .map_err(Into::into)
            .and_then(|device| device.register_events(types, set));
        set = match registered {
            Ok(set) => set,
            // Registering failed and took the set with it: start over without this device.
            Err(error) => {
                if matches!(error.error, NvmlError::GpuLost) {
                    let labels = device_labels(shared, index);
                    lock(shared).device_lost(index, labels, "the health-event thread");
                } else {
                    lock(shared).error = Some(format!(
                        "gpu {index}: health events not watched: {}",
                        crate::collectors::error_chain(&error)
                    ));
                }
                let rest: Vec<_> = registrations
                    .iter()
                    .copied()
                    .filter(|(other, _)| *other != index)
                    .collect();
                return event_set(nvml, &rest, shared);
            }
        };
    }
    Ok(set)
}

fn device_labels(shared: &Mutex<HealthState>, index: u32) -> Labels {
    lock(shared)
        .labels
        .get(&index)
        .map(|(labels, _)| labels.clone())
        .unwrap_or_default()
}

/// Reads the clock-event reasons of the `polled` devices, which send no clock events.
fn poll_clock_event_reasons(nvml: &Nvml, polled: &[u32], shared: &Mutex<HealthState>) {
    for &index in polled {
        if let Ok(device) = nvml.device_by_index(index) {
            lock(shared).clock_changed(index, &device);
        }
    }
}

/// The event set for `registrations`, or `None` once the reason it could not be made is
/// recorded for the status.
fn watched_event_set<'n>(
    nvml: &'n Nvml,
    registrations: &[(u32, EventTypes)],
    shared: &Mutex<HealthState>,
) -> Option<EventSet<'n>> {
    event_set(nvml, registrations, shared)
        .map_err(|error| {
            lock(shared).error = Some(format!(
                "health events not watched: {}",
                crate::collectors::error_chain(&error)
            ));
        })
        .ok()
}

/// Rings [`HEALTH_EVENTS`] when dropped if events were queued meanwhile (with the state
/// unlocked by then, so the woken sender can take them at once).
struct RingWhenQueued<'a> {
    shared: &'a Mutex<HealthState>,
    queued_before: usize,
}

impl<'a> RingWhenQueued<'a> {
    fn new(shared: &'a Mutex<HealthState>) -> Self {
        let queued_before = lock(shared).events.len();
        Self {
            shared,
            queued_before,
        }
    }
}

impl Drop for RingWhenQueued<'_> {
    fn drop(&mut self) {
        if lock(self.shared).events.len() > self.queued_before {
            HEALTH_EVENTS.ring();
        }
    }
}

fn watch(
    nvml: &Nvml,
    registrations: Vec<(u32, EventTypes)>,
    polled: Vec<u32>,
    shared: &Mutex<HealthState>,
    stop: &AtomicBool,
) {
    if registrations.is_empty() {
        // Nothing to wait on: only the clock-event reasons to poll.
        while !polled.is_empty() && !stop.load(Ordering::Relaxed) {
            std::thread::sleep(Duration::from_millis(WAIT_MS.into()));
            poll_clock_event_reasons(nvml, &polled, shared);
        }
        return;
    }
    let Some(mut set) = watched_event_set(nvml, &registrations, shared) else {
        return;
    };
    let mut polled_at = Instant::now();
    // Events name their device by handle. Asking NVML for its index fails once the device is
    // lost, which is exactly when its last XID (79) matters, so compare handles instead.
    let handles: Vec<(usize, u32)> = registrations
        .iter()
        .filter_map(|&(index, _)| {
            let device = nvml.device_by_index(index).ok()?;
            // SAFETY: the raw handle is only compared, never used to make another `Device`.
            Some((unsafe { device.handle() }.addr(), index))
        })
        .collect();
    while !stop.load(Ordering::Relaxed) {
        if polled_at.elapsed() >= Duration::from_millis(WAIT_MS.into()) {
            poll_clock_event_reasons(nvml, &polled, shared);
            polled_at = Instant::now();
        }
        match set.wait(WAIT_MS) {
            Ok(data) => {
                // SAFETY: as above, only compared.
                let handle = unsafe { data.device.handle() }.addr();
                let Some(&(_, index)) = handles.iter().find(|(h, _)| *h == handle) else {
                    continue;
                };
                let _ring = RingWhenQueued::new(shared);
                let mut state = lock(shared);
                if data.event_type.contains(EventTypes::CRITICAL_XID_ERROR) {
                    let xid = match data.event_data {
                        Some(XidError::Value(xid)) => Some(xid),
                        _ => None,
                    };
                    state.xid(index, xid);
                }
                if data.event_type.contains(EventTypes::SINGLE_BIT_ECC_ERROR) {
                    state.ecc(index, "single_bit");
                }
                if data.event_type.contains(EventTypes::DOUBLE_BIT_ECC_ERROR) {
                    state.ecc(index, "double_bit");
                }
                if data.event_type.contains(EventTypes::CLOCK_CHANGE) {
                    state.clock_changed(index, &data.device);
                }
            }
            Err(NvmlError::Timeout) => {}
            Err(NvmlError::GpuLost) => {
                let _ring = RingWhenQueued::new(shared);
                // Some device in the set fell off the bus: find which, and wait on the others.
                let mut found = false;
                for &(index, _) in &registrations {
                    let answer = nvml.device_by_index(index).and_then(|d| d.uuid());
                    if matches!(answer, Err(NvmlError::GpuLost)) {
                        let labels = device_labels(shared, index);
                        lock(shared).device_lost(index, labels, "the health-event thread");
                        found = true;
                    }
                }
                if !found {
                    // No device admits it yet: do not spin on the set.
                    std::thread::sleep(Duration::from_secs(1));
                }
                drop(set);
                set = match watched_event_set(nvml, &registrations, shared) {
                    Some(set) => set,
                    None => return,
                };
            }
            Err(error) => {
                lock(shared).error = Some(format!(
                    "waiting for health events failed: {}",
                    crate::collectors::error_chain(&error)
                ));
                std::thread::sleep(Duration::from_secs(1));
            }
        }
    }
}
