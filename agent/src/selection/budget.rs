//! The cardinality budget: at most `selection.max_tracked_processes` model-server processes get
//! series of their own; the rest are folded into `server="other"` aggregates.
//!
//! A node running hundreds of worker processes would otherwise create hundreds of series per
//! metric, and a fresh set each time workers restart. The budget keeps the processes that matter
//! most right now, the busiest ones, and folds the rest.
//!
//! How busy a process is, for ranking only:
//!
//! ```text
//! score = cpu_share + gpu_share
//! cpu_share = (utime + stime ticks since the previous pass) / (the same, summed over all candidates)
//! gpu_share = the GPU collector's utilization share for the pid, clamped to 0..1 (0 when absent)
//! ```
//!
//! Both terms are shares in 0..1, so neither needs a clock or a per-node scale, and a process
//! that keeps a GPU busy while its CPU threads mostly wait ranks as high as one that keeps a
//! large share of the CPU busy. A process seen for the first time (pid and start time) counts
//! with all its CPU time so far. Equal scores go to the lower pid, so the choice is deterministic.
//!
//! CPU time is read only while the node is over the budget; under it, every process is tracked
//! and the previous readings are dropped, so the next over-budget pass ranks by totals.

use std::collections::HashMap;
use std::io::Read;

use super::{ModelServerProcess, PassSelection, SelectionConfig};

/// Splits each pass's model servers into tracked and folded ones.
#[derive(Debug)]
pub struct ProcessBudget {
    max_tracked: usize,
    /// utime + stime ticks at the previous over-budget pass, by pid and start time.
    previous_cpu_ticks: HashMap<(u32, u64), u64>,
}

impl ProcessBudget {
    pub fn new(config: &SelectionConfig) -> Self {
        Self::with_max_tracked(config.max_tracked_processes)
    }

    pub fn with_max_tracked(max_tracked: usize) -> Self {
        Self {
            max_tracked,
            previous_cpu_ticks: HashMap::new(),
        }
    }

    /// Applies the budget to one pass's scan, reading CPU time from `/proc/PID/stat`.
    ///
    /// `gpu_use` maps pid to its share of GPU utilization (0..1) as the GPU collector last saw
    /// it; pass an empty map when there is none.
    pub fn apply(
        &mut self,
        scanned: Vec<ModelServerProcess>,
        gpu_use: &HashMap<u32, f64>,
    ) -> PassSelection {
        self.apply_with_cpu_ticks(scanned, gpu_use, proc_cpu_ticks)
    }

    /// Like [`apply`](Self::apply), with CPU time (utime + stime, in clock ticks) from
    /// `cpu_ticks`; `None` means the process is gone and counts as idle.
    pub fn apply_with_cpu_ticks(
        &mut self,
        scanned: Vec<ModelServerProcess>,
        gpu_use: &HashMap<u32, f64>,
        mut cpu_ticks: impl FnMut(&ModelServerProcess) -> Option<u64>,
    ) -> PassSelection {
        if scanned.len() <= self.max_tracked {
            self.previous_cpu_ticks.clear();
            return PassSelection {
                tracked: scanned,
                folded: Vec::new(),
            };
        }

        let mut current = HashMap::with_capacity(scanned.len());
        let recent: Vec<u64> = scanned
            .iter()
            .map(|process| {
                let key = (process.pid, process.start_time_ticks);
                let Some(now) = cpu_ticks(process) else {
                    return 0;
                };
                current.insert(key, now);
                match self.previous_cpu_ticks.get(&key) {
                    Some(&before) => now.saturating_sub(before),
                    None => now,
                }
            })
            .collect();
        self.previous_cpu_ticks = current;

        let total: u64 = recent.iter().sum();
        let mut ranked: Vec<(f64, ModelServerProcess)> = scanned
            .into_iter()
            .zip(recent)
            .map(|(process, recent)| {
                let cpu_share = if total == 0 {
                    0.0
                } else {
                    recent as f64 / total as f64
                };
                let gpu_share = gpu_use
                    .get(&process.pid)
                    .copied()
                    .filter(|share| share.is_finite())
                    .unwrap_or(0.0)
                    .clamp(0.0, 1.0);
                (cpu_share + gpu_share, process)
            })
            .collect();
        ranked.sort_by(|(score_a, a), (score_b, b)| {
            score_b.total_cmp(score_a).then(a.pid.cmp(&b.pid))
        });

        let mut folded: Vec<ModelServerProcess> = ranked
            .split_off(self.max_tracked)
            .into_iter()
            .map(|(_, process)| process)
            .collect();
        let mut tracked: Vec<ModelServerProcess> =
            ranked.into_iter().map(|(_, process)| process).collect();
        tracked.sort_by_key(|process| process.pid);
        folded.sort_by_key(|process| process.pid);
        PassSelection { tracked, folded }
    }
}

/// utime + stime of a process from `/proc/PID/stat`, if it still runs with the same start time.
fn proc_cpu_ticks(process: &ModelServerProcess) -> Option<u64> {
    let mut text = String::with_capacity(512);
    std::fs::File::open(format!("/proc/{}/stat", process.pid))
        .ok()?
        .read_to_string(&mut text)
        .ok()?;
    let (cpu_ticks, start_time_ticks) = parse_cpu_and_start_time(&text)?;
    (start_time_ticks == process.start_time_ticks).then_some(cpu_ticks)
}

/// (utime + stime, starttime) from a `/proc/PID/stat` line. comm may contain spaces and
/// parentheses, so fields are counted from the last `)`.
fn parse_cpu_and_start_time(stat: &str) -> Option<(u64, u64)> {
    let mut fields = stat.get(stat.rfind(')')? + 1..)?.split_ascii_whitespace();
    // Field 3 (state) is the first after comm; utime is field 14, stime 15, starttime 22.
    let utime: u64 = fields.nth(14 - 3)?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    let start_time: u64 = fields.nth(22 - 16)?.parse().ok()?;
    Some((utime + stime, start_time))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn process(pid: u32) -> ModelServerProcess {
        ModelServerProcess {
            pid,
            start_time_ticks: 1_000 + u64::from(pid),
            comm: format!("worker{pid}"),
            server: "vllm".to_owned(),
        }
    }

    fn processes(pids: &[u32]) -> Vec<ModelServerProcess> {
        pids.iter().copied().map(process).collect()
    }

    fn pids(list: &[ModelServerProcess]) -> Vec<u32> {
        list.iter().map(|p| p.pid).collect()
    }

    /// One pass with CPU totals given per pid (pids missing from `ticks` have vanished).
    fn pass(
        budget: &mut ProcessBudget,
        scanned: &[u32],
        ticks: &[(u32, u64)],
        gpu_use: &[(u32, f64)],
    ) -> (Vec<u32>, Vec<u32>) {
        let ticks: HashMap<u32, u64> = ticks.iter().copied().collect();
        let gpu_use: HashMap<u32, f64> = gpu_use.iter().copied().collect();
        let selection = budget
            .apply_with_cpu_ticks(processes(scanned), &gpu_use, |p| ticks.get(&p.pid).copied());
        (pids(&selection.tracked), pids(&selection.folded))
    }

    #[test]
    fn within_the_budget_every_process_is_tracked_and_cpu_is_not_read() {
        let mut budget = ProcessBudget::with_max_tracked(3);
        let selection =
            budget.apply_with_cpu_ticks(processes(&[10, 20, 30]), &HashMap::new(), |_| {
                panic!("CPU time read although the pass is within the budget")
            });
        assert_eq!(pids(&selection.tracked), [10, 20, 30]);
        assert_eq!(pids(&selection.folded), Vec::<u32>::new());
    }

    #[test]
    fn over_the_budget_the_busiest_by_cpu_are_tracked_and_the_rest_folded() {
        let mut budget = ProcessBudget::with_max_tracked(2);
        let (tracked, folded) = pass(
            &mut budget,
            &[10, 20, 30, 40],
            &[(10, 5), (20, 500), (30, 50), (40, 400)],
            &[],
        );
        assert_eq!(tracked, [20, 40]);
        assert_eq!(folded, [10, 30]);
    }

    #[test]
    fn ranking_uses_cpu_since_the_previous_pass_not_the_lifetime_total() {
        let mut budget = ProcessBudget::with_max_tracked(1);
        assert_eq!(
            pass(&mut budget, &[10, 20], &[(10, 10_000), (20, 100)], &[]),
            (vec![10], vec![20])
        );
        // pid 10 was busy long ago and is idle now; pid 20 has used 50 ticks since.
        assert_eq!(
            pass(&mut budget, &[10, 20], &[(10, 10_001), (20, 150)], &[]),
            (vec![20], vec![10])
        );
    }

    #[test]
    fn a_new_process_counts_with_its_cpu_total_so_far() {
        let mut budget = ProcessBudget::with_max_tracked(1);
        pass(&mut budget, &[10, 20], &[(10, 1_000), (20, 100)], &[]);
        // 10 used 40 ticks since the last pass; 30 is new with 60 ticks in all.
        assert_eq!(
            pass(
                &mut budget,
                &[10, 20, 30],
                &[(10, 1_040), (20, 100), (30, 60)],
                &[]
            ),
            (vec![30], vec![10, 20])
        );
    }

    #[test]
    fn a_reused_pid_with_a_new_start_time_is_a_new_process() {
        let mut budget = ProcessBudget::with_max_tracked(1);
        pass(&mut budget, &[10, 20], &[(10, 500), (20, 100)], &[]);
        // pid 10 is now a different process (start time differs) with 30 ticks in all: as a
        // new process it counts 30, not 30 - 500.
        let mut scanned = processes(&[10, 20]);
        scanned[0].start_time_ticks += 7;
        let ticks = HashMap::from([(10, 30), (20, 120)]);
        let selection =
            budget.apply_with_cpu_ticks(scanned, &HashMap::new(), |p| ticks.get(&p.pid).copied());
        assert_eq!(pids(&selection.tracked), [10]);
        assert_eq!(pids(&selection.folded), [20]);
    }

    #[test]
    fn gpu_use_adds_to_the_cpu_share() {
        let mut budget = ProcessBudget::with_max_tracked(1);
        // CPU shares 0.6 and 0.4; pid 20's GPU share 0.3 lifts it to 0.7.
        assert_eq!(
            pass(&mut budget, &[10, 20], &[(10, 60), (20, 40)], &[(20, 0.3)]),
            (vec![20], vec![10])
        );
        // The next pass: CPU shares 0.6 and 0.4 again; GPU 0.1 is not enough (0.5 < 0.6).
        assert_eq!(
            pass(&mut budget, &[10, 20], &[(10, 120), (20, 80)], &[(20, 0.1)]),
            (vec![10], vec![20])
        );
    }

    #[test]
    fn a_gpu_busy_process_with_no_cpu_is_tracked_over_idle_ones() {
        let mut budget = ProcessBudget::with_max_tracked(1);
        assert_eq!(
            pass(
                &mut budget,
                &[10, 20, 30],
                &[(10, 0), (20, 0), (30, 0)],
                &[(30, 0.9)]
            ),
            (vec![30], vec![10, 20])
        );
    }

    #[test]
    fn out_of_range_gpu_shares_are_clamped() {
        let mut budget = ProcessBudget::with_max_tracked(1);
        // Unclamped, 20's 5.0 would beat 10's full CPU share plus 0.5 GPU.
        assert_eq!(
            pass(
                &mut budget,
                &[10, 20, 30],
                &[(10, 100), (20, 0), (30, 0)],
                &[(10, 0.5), (20, 5.0), (30, f64::NAN)]
            ),
            (vec![10], vec![20, 30])
        );
    }

    #[test]
    fn equal_scores_go_to_the_lower_pid() {
        let mut budget = ProcessBudget::with_max_tracked(2);
        assert_eq!(
            pass(
                &mut budget,
                &[40, 10, 30, 20],
                &[(10, 7), (20, 7), (30, 7), (40, 7)],
                &[]
            ),
            (vec![10, 20], vec![30, 40])
        );
    }

    #[test]
    fn a_vanished_process_counts_as_idle() {
        let mut budget = ProcessBudget::with_max_tracked(1);
        assert_eq!(
            pass(&mut budget, &[10, 20], &[(20, 1)], &[]),
            (vec![20], vec![10])
        );
    }

    #[test]
    fn a_zero_budget_folds_every_process() {
        let mut budget = ProcessBudget::with_max_tracked(0);
        assert_eq!(
            pass(&mut budget, &[10, 20], &[(10, 5), (20, 6)], &[]),
            (vec![], vec![10, 20])
        );
    }

    #[test]
    fn dropping_back_under_the_budget_forgets_old_readings() {
        let mut budget = ProcessBudget::with_max_tracked(2);
        pass(
            &mut budget,
            &[10, 20, 30],
            &[(10, 900), (20, 10), (30, 10)],
            &[],
        );
        pass(&mut budget, &[10, 20], &[], &[]);
        // Over again: ranking starts from totals, so 10's 950 beats 20's 200 and 30's 100 even
        // though 20 gained more since the first pass.
        assert_eq!(
            pass(
                &mut budget,
                &[10, 20, 30],
                &[(10, 950), (20, 200), (30, 100)],
                &[]
            ),
            (vec![10, 20], vec![30])
        );
        // From here on, deltas: 30 gained 300, 20 gained 10, 10 gained 0.
        assert_eq!(
            pass(
                &mut budget,
                &[10, 20, 30],
                &[(10, 950), (20, 210), (30, 400)],
                &[]
            ),
            (vec![20, 30], vec![10])
        );
    }

    #[test]
    fn stat_parsing_counts_fields_from_the_last_parenthesis() {
        let stat = "4242 (rank) S 7 (v2) R 1 4242 4242 0 -1 4194560 2405 0 12 0 130 41 0 0 \
                    20 0 24 0 987654 9061220352 412345 18446744073709551615";
        assert_eq!(parse_cpu_and_start_time(stat), Some((171, 987_654)));
        assert_eq!(parse_cpu_and_start_time("4242 (rank) R 1 4242"), None);
    }

    #[test]
    fn cpu_of_this_process_is_read_from_proc_and_a_wrong_start_time_reads_as_gone() {
        let stat = std::fs::read_to_string("/proc/self/stat").unwrap();
        let (_, start_time_ticks) = parse_cpu_and_start_time(&stat).unwrap();
        let mut me = ModelServerProcess {
            pid: std::process::id(),
            start_time_ticks,
            comm: String::new(),
            server: String::new(),
        };
        assert!(proc_cpu_ticks(&me).is_some());
        me.start_time_ticks += 1;
        assert_eq!(proc_cpu_ticks(&me), None);
    }
}
