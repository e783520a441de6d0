//! One collection pass: select this pass's model servers, then run every collector over them.
//! The snapshot runs passes for a while; `collect-bench` times them.

use std::{collections::HashMap, time::Duration};

use crate::{
    attribution::AttributionConfigError,
    collectors::{Collector, CollectorConfigError, start_collectors},
    config::AgentConfig,
    selection::{ProcessSelector, SelectionError, budget::ProcessBudget},
};

/// Input no pass can run with (as opposed to a collector that cannot run, which is reported in
/// its status).
#[derive(Debug, thiserror::Error)]
pub enum PassSetupError {
    #[error(transparent)]
    Selection(#[from] SelectionError),
    #[error(transparent)]
    CollectorConfig(#[from] CollectorConfigError),
    #[error(transparent)]
    Attribution(#[from] AttributionConfigError),
}

/// CPU time (of the thread running the pass) spent in each part of one pass.
#[derive(Debug, Clone, Default)]
pub struct PassCost {
    /// Model servers tracked and folded (over the budget) in this pass.
    pub tracked: usize,
    pub folded: usize,
    pub selection: Duration,
    pub collectors: Vec<(&'static str, Duration)>,
}

impl PassCost {
    pub fn total(&self) -> Duration {
        self.selection + self.collectors.iter().map(|(_, d)| *d).sum::<Duration>()
    }
}

pub struct CollectionPass {
    selector: ProcessSelector,
    budget: ProcessBudget,
    collectors: Vec<Box<dyn Collector>>,
}

impl CollectionPass {
    /// Builds the selection from the config and `--track` patterns and starts every collector.
    pub fn new(config: &AgentConfig, track: &[String]) -> Result<Self, PassSetupError> {
        config.attribution.validate()?;
        Ok(Self {
            selector: ProcessSelector::new(&config.selection, track)?,
            budget: ProcessBudget::new(&config.selection),
            collectors: start_collectors(config)?,
        })
    }

    /// Keeps only the named collectors (for benchmarks of some of them).
    pub fn retain_collectors(&mut self, names: &[String]) {
        self.collectors
            .retain(|c| names.iter().any(|n| n == c.name()));
    }

    pub fn collectors(&self) -> &[Box<dyn Collector>] {
        &self.collectors
    }

    pub fn collectors_mut(&mut self) -> &mut [Box<dyn Collector>] {
        &mut self.collectors
    }

    /// Runs one pass and returns what each part cost in CPU time.
    pub fn run(&mut self) -> PassCost {
        let started = thread_cpu_time();
        // The budget ranks by CPU and by GPU use (as of the previous pass).
        let mut gpu_use = HashMap::new();
        for collector in &self.collectors {
            gpu_use.extend(collector.gpu_use_by_pid());
        }
        let selection = self.budget.apply(self.selector.scan(), &gpu_use);
        let mut cost = PassCost {
            tracked: selection.tracked.len(),
            folded: selection.folded.len(),
            selection: thread_cpu_time().saturating_sub(started),
            collectors: Vec::with_capacity(self.collectors.len()),
        };
        for collector in self.collectors.iter_mut() {
            let started = thread_cpu_time();
            collector.collect(&selection);
            cost.collectors
                .push((collector.name(), thread_cpu_time().saturating_sub(started)));
        }
        cost
    }
}

/// CPU time this thread has used.
fn thread_cpu_time() -> Duration {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the timespec we pass; the clock id is valid on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut now) };
    Duration::new(now.tv_sec as u64, now.tv_nsec as u32)
}
