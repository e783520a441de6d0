//! Per-series adaptive baselines and an anomaly score, computed as samples arrive.
//!
//! Each series keeps a few numbers (about 100 floats, fixed) and does O(1) work per sample:
//!
//! - a **seasonal profile**: the series' typical offset at each hour of the day, learnt over
//!   days in 15-minute slots and interpolated between them, removed from each value before the rest sees it
//!   (only once a full day has been seen; before that the profile is zero);
//! - a **fast baseline** (level and scale, half-life `fast_half_life`): the level is an
//!   exponentially weighted mean, the scale an exponentially weighted root mean square of the residuals (clipped to
//!   5 scales: a standard deviation that heavy-tailed noise cannot hide from). Both learn from residuals
//!   clipped to 3 scales (a Huber-style update), so one outlier moves neither much;
//! - a **slow baseline** (half-life `slow_half_life`), the level the fast one is compared with.
//!
//! Two detectors read them:
//!
//! - **spike**: how many scales the value is from the fast level, divided by the spike
//!   threshold: at least `spike_threshold`, higher for series whose noise has heavy tails.
//!   The threshold comes from a model of the series' own tail (peaks over threshold: how
//!   often a residual passes 4 scales and by how much on average, an exponential tail beyond),
//!   set where that tail would make `spike_false_alarms_per_day` false spikes a day;
//! - **shift/drift**: a two-sided CUSUM of the fast level's distance from the slow level (in
//!   scales, minus the allowance `cusum_allowance`), accumulated over time and divided by
//!   `cusum_threshold` (scale-seconds). A level shift builds it up within minutes, a slow
//!   drift as it moves away from where the series used to be.
//!
//! The score is the larger of the two: **1 or more means anomalous**. It is recorded as
//! `vigil_anomaly_score` so rules can alert on it with `for:` as on anything else.

/// Tuning of [`Detector`]. The defaults are what `docs/benchmarks.md` measured.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DetectorConfig {
    /// Half-life of the fast baseline, seconds.
    pub fast_half_life_s: f64,
    /// Half-life of the slow baseline, seconds.
    pub slow_half_life_s: f64,
    /// Scales from the fast level at which a single value is anomalous, at least; series with
    /// heavier tails get a higher threshold (see `spike_false_alarms_per_day`).
    pub spike_threshold: f64,
    /// The spike threshold is raised until the series' own tail makes at most this many
    /// false spikes a day.
    pub spike_false_alarms_per_day: f64,
    /// Scales of fast-vs-slow distance that do not accumulate.
    pub cusum_allowance: f64,
    /// Accumulated scale-seconds beyond the allowance at which the level is anomalous.
    pub cusum_threshold: f64,
    /// Seconds of data before any score other than 0 (the baselines settle).
    pub warmup_s: f64,
    /// Smallest scale, relative to the level's magnitude, so that a constant series does not
    /// make every tiny change infinitely anomalous.
    pub min_relative_scale: f64,
    /// Smallest scale in the series' own unit.
    pub min_absolute_scale: f64,
    /// Weight one day of data has in the seasonal profile.
    pub seasonal_day_weight: f64,
}

impl Default for DetectorConfig {
    fn default() -> Self {
        DetectorConfig {
            fast_half_life_s: 300.0,
            slow_half_life_s: 6.0 * 3600.0,
            spike_threshold: 6.0,
            spike_false_alarms_per_day: 0.1,
            cusum_allowance: 2.0,
            cusum_threshold: 900.0,
            warmup_s: 3600.0,
            min_relative_scale: 1e-6,
            min_absolute_scale: 1e-9,
            seasonal_day_weight: 0.3,
        }
    }
}

const DAY_S: f64 = 86_400.0;
/// The seasonal profile's resolution: 15-minute slots, so that ramps such as the start of
/// business hours are followed, not smeared over an hour.
const SLOTS: usize = 96;
const SLOT_S: f64 = DAY_S / SLOTS as f64;
/// Residuals beyond this many scales are clipped before they update anything.
const CLIP: f64 = 3.0;
/// Residuals beyond this many scales count as this many in the scale (a root mean square):
/// wide enough that heavy-tailed noise gets its real width, narrow enough that an outlier
/// inflates it little.
const SCALE_CLIP: f64 = 5.0;
/// Where the tail model starts, in scales.
const TAIL_START: f64 = 4.0;
/// Normal noise: P(|z| > 4) and the mean of |z| - 4 beyond it.
const NORMAL_TAIL_RATE: f64 = 6.3e-5;
const NORMAL_TAIL_EXCESS: f64 = 0.24;
/// Excess beyond this counts as this in the tail model (a huge spike says little about
/// the tail).
const TAIL_EXCESS_CAP: f64 = 8.0;

/// One series' baselines and detector state.
#[derive(Debug, Clone)]
pub struct Detector {
    config: DetectorConfig,
    first_s: Option<f64>,
    last_s: f64,
    fast_level: f64,
    scale: f64,
    slow_level: f64,
    /// The noise's width learnt as slowly as the slow level: what the fast-vs-slow distance
    /// is measured in, so that a shift does not widen its own yardstick before it is noticed.
    slow_scale: f64,
    /// The level over about a day (half-life 24 h), which the seasonal profile is learnt
    /// against: slow enough to keep only a tenth of a daily pattern.
    day_level: f64,
    cusum_up: f64,
    cusum_down: f64,
    /// Offset from the slow level per 15 minutes of the day (UTC), at the slot's middle.
    profile: [f32; SLOTS],
    /// How often a residual is beyond TAIL_START scales (per sample, averaged over about a
    /// day), and by how much on average: an exponential model of the series' tail.
    tail_rate: f64,
    tail_excess: f64,
    /// Whether the last residual was beyond TAIL_START.
    in_tail: bool,
    /// Whether the seasonal profile is being applied (after a day of data).
    seasonal_on: bool,
    /// Seconds of data seen (the profile is used once a full day is in it).
    seen_s: f64,
}

/// What one sample did to a detector.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Observation {
    /// max(spike, shift); >= 1 is anomalous.
    pub score: f64,
    pub spike: f64,
    pub shift: f64,
    /// The value the baselines expected (fast level plus the seasonal offset).
    pub expected: f64,
}

impl Detector {
    pub fn new(config: DetectorConfig) -> Detector {
        Detector {
            config,
            first_s: None,
            last_s: 0.0,
            fast_level: 0.0,
            scale: 0.0,
            slow_level: 0.0,
            slow_scale: 0.0,
            day_level: 0.0,
            cusum_up: 0.0,
            cusum_down: 0.0,
            profile: [0.0; SLOTS],
            seen_s: 0.0,
            seasonal_on: false,
            // Until the series shows otherwise, normal noise's tail.
            tail_rate: NORMAL_TAIL_RATE,
            tail_excess: NORMAL_TAIL_EXCESS,
            in_tail: false,
        }
    }

    /// The two profile slots around this time and the weight of the second.
    fn slots(time_s: f64) -> (usize, usize, f64) {
        let position = (time_s.rem_euclid(DAY_S) / SLOT_S - 0.5).rem_euclid(SLOTS as f64);
        let below = position.floor() as usize % SLOTS;
        (below, (below + 1) % SLOTS, position - position.floor())
    }

    /// The seasonal offset at this time: the profile interpolated between slot middles, once
    /// a full day has been seen.
    fn seasonal(&self, time_s: f64) -> f64 {
        if self.seen_s < DAY_S {
            return 0.0;
        }
        let (below, above, within) = Self::slots(time_s);
        f64::from(self.profile[below]) * (1.0 - within) + f64::from(self.profile[above]) * within
    }

    /// Feeds one sample (time in seconds since the epoch); non-finite values and samples not
    /// newer than the last are ignored (`None`).
    pub fn observe(&mut self, time_s: f64, value: f64) -> Option<Observation> {
        if !value.is_finite() || !time_s.is_finite() {
            return None;
        }
        let Some(first) = self.first_s else {
            self.first_s = Some(time_s);
            self.last_s = time_s;
            self.fast_level = value;
            self.slow_level = value;
            self.day_level = value;
            self.scale = self.scale_floor(value);
            self.slow_scale = self.scale;
            return Some(Observation {
                score: 0.0,
                spike: 0.0,
                shift: 0.0,
                expected: value,
            });
        };
        let dt = time_s - self.last_s;
        if dt <= 0.0 {
            return None;
        }
        self.last_s = time_s;
        // Gaps (the agent was down) count as at most 10 minutes of learning.
        let dt_learn = dt.min(600.0);
        self.seen_s += dt_learn;
        let config = self.config;

        let seasonal = self.seasonal(time_s);
        if seasonal != 0.0 && !self.seasonal_on {
            // The profile starts to apply: the levels, which followed the daily pattern so
            // far, restart from the deseasonalised value.
            self.seasonal_on = true;
            self.fast_level -= seasonal;
            self.slow_level = self.fast_level;
            self.cusum_up = 0.0;
            self.cusum_down = 0.0;
        }
        let x = value - seasonal;
        let residual = x - self.fast_level;
        let scale = self.scale.max(self.scale_floor(self.fast_level));
        let z = residual.abs() / scale;
        let spike = z / self.spike_threshold(dt_learn);

        // The fast level's distance from the slow one accumulates beyond the allowance.
        let slow_scale = self.slow_scale.max(self.scale_floor(self.fast_level));
        let distance = (self.fast_level - self.slow_level) / slow_scale;
        self.cusum_up = (self.cusum_up + (distance - config.cusum_allowance) * dt_learn).max(0.0);
        self.cusum_down =
            (self.cusum_down + (-distance - config.cusum_allowance) * dt_learn).max(0.0);
        let shift = self.cusum_up.max(self.cusum_down) / config.cusum_threshold;

        // Learn, from residuals clipped to CLIP scales.
        let clipped = residual.clamp(-CLIP * scale, CLIP * scale);
        let fast = alpha(dt_learn, config.fast_half_life_s);
        self.fast_level += fast * clipped;
        let for_scale = residual.clamp(-SCALE_CLIP * scale, SCALE_CLIP * scale);
        let variance = self.scale * self.scale;
        self.scale = (variance + fast * (for_scale * for_scale - variance)).sqrt();
        let slow = alpha(dt_learn, config.slow_half_life_s);
        let slow_variance = self.slow_scale * self.slow_scale;
        // Early on the slow scale learns as fast as the fast one, or it would stay at its
        // first guess for hours.
        let slow_weight = slow.max(fast / (1.0 + self.seen_s / config.fast_half_life_s));
        self.slow_scale =
            (slow_variance + slow_weight * (for_scale * for_scale - slow_variance)).sqrt();
        let slow_residual = (x - self.slow_level).clamp(-CLIP * scale, CLIP * scale);
        self.slow_level += slow * slow_residual;
        let day_residual = (value - self.day_level).clamp(
            -(CLIP * scale + seasonal.abs()),
            CLIP * scale + seasonal.abs(),
        );
        self.day_level += alpha(dt_learn, DAY_S) * day_residual;
        self.learn_season(time_s, value - self.day_level, scale, dt_learn);

        self.learn_tail(z, dt_learn);

        let warm = time_s - first >= config.warmup_s;
        let (spike, shift) = if warm { (spike, shift) } else { (0.0, 0.0) };
        Some(Observation {
            score: spike.max(shift),
            spike,
            shift,
            expected: self.fast_level + seasonal,
        })
    }

    /// Moves the profile's two nearest slots toward this offset (clipped, so anomalies teach
    /// it little). The first day sets the profile, later days average in with a weight that
    /// falls to `seasonal_day_weight`.
    fn learn_season(&mut self, time_s: f64, offset: f64, scale: f64, dt: f64) {
        let days = (self.seen_s / DAY_S).floor();
        // The first day draws the profile as it is; later days may move it by a few scales.
        let bound = if days < 1.0 {
            f64::INFINITY
        } else {
            CLIP * scale
        };
        let day_weight = (1.0 / (days + 1.0)).max(self.config.seasonal_day_weight);
        let (below, above, within) = Self::slots(time_s);
        for (slot, weight) in [(below, 1.0 - within), (above, within)] {
            // A slot sees about SLOT_S seconds of samples a day; spread the day's weight over
            // them (the first day's weight of 1 makes this a running mean).
            let rate = if day_weight >= 1.0 {
                (dt * weight / SLOT_S).min(1.0)
            } else {
                1.0 - (1.0 - day_weight).powf(dt * weight / SLOT_S)
            };
            let current = f64::from(self.profile[slot]);
            let target = offset.clamp(current - bound, current + bound);
            self.profile[slot] = (current + rate * (target - current)) as f32;
        }
    }

    /// The spike threshold for a sample `dt` seconds after the last: where the tail model
    /// P(z > k) = rate * exp(-(k - TAIL_START) / excess) (peaks over threshold, with an
    /// exponential tail) falls to the false-alarm budget per sample, and never below the
    /// configured minimum.
    fn spike_threshold(&self, dt: f64) -> f64 {
        let budget = self.config.spike_false_alarms_per_day * dt / DAY_S;
        let k = TAIL_START + self.tail_excess * (self.tail_rate / budget).max(1.0).ln();
        k.max(self.config.spike_threshold)
    }

    fn learn_tail(&mut self, z: f64, dt: f64) {
        let weight = alpha(dt, DAY_S);
        // A run of exceedances (a level shift before its baseline follows, a burst) is one
        // event: the tail model is of isolated noise, which a burst is not.
        let beyond = z > TAIL_START;
        let counted = beyond && !self.in_tail;
        self.in_tail = beyond;
        self.tail_rate += weight * (f64::from(u8::from(counted)) - self.tail_rate);
        if counted {
            // The excess is learnt from exceedances only, as fast as a day of them would.
            let excess = (z - TAIL_START).min(TAIL_EXCESS_CAP);
            let per_exceedance = (weight / self.tail_rate.max(1e-9)).min(0.05);
            self.tail_excess += per_exceedance * (excess - self.tail_excess);
        }
    }

    fn scale_floor(&self, level: f64) -> f64 {
        (level.abs() * self.config.min_relative_scale).max(self.config.min_absolute_scale)
    }
}

/// The weight of a new sample `dt` seconds after the last for a given half-life.
fn alpha(dt: f64, half_life: f64) -> f64 {
    1.0 - (-dt * std::f64::consts::LN_2 / half_life).exp()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn normal(seed: &mut u64) -> f64 {
        // Sum of 12 uniforms minus 6: close enough to N(0, 1) for these tests.
        let mut sum = 0.0;
        for _ in 0..12 {
            *seed ^= *seed << 13;
            *seed ^= *seed >> 7;
            *seed ^= *seed << 17;
            sum += (*seed >> 11) as f64 / (1u64 << 53) as f64;
        }
        sum - 6.0
    }

    #[test]
    fn state_is_small_and_fixed() {
        assert!(std::mem::size_of::<Detector>() <= 640);
    }

    #[test]
    fn ignores_non_finite_values_and_old_timestamps() {
        let mut detector = Detector::new(DetectorConfig::default());
        assert!(detector.observe(100.0, 1.0).is_some());
        assert!(detector.observe(110.0, f64::NAN).is_none());
        assert!(detector.observe(120.0, f64::INFINITY).is_none());
        assert!(
            detector.observe(90.0, 1.0).is_none(),
            "not newer than the last"
        );
        assert!(detector.observe(130.0, 1.0).is_some());
    }

    #[test]
    fn noise_is_quiet_and_a_spike_and_a_shift_are_not() {
        let mut detector = Detector::new(DetectorConfig::default());
        let mut seed = 0x1234_5678_9abc_def1u64;
        let mut t = 0.0;
        let mut max_quiet: f64 = 0.0;
        // Six hours of noise around 50, sigma 2, at 10 s.
        for _ in 0..2160 {
            t += 10.0;
            let observation = detector.observe(t, 50.0 + 2.0 * normal(&mut seed)).unwrap();
            if t > 3600.0 {
                max_quiet = max_quiet.max(observation.score);
            }
        }
        assert!(max_quiet < 1.0, "noise scored {max_quiet}");
        t += 10.0;
        let spike = detector.observe(t, 50.0 + 2.0 * 12.0).unwrap();
        assert!(spike.spike >= 1.0, "a 12-sigma spike scored {spike:?}");
        // The spike taught the baseline little: the next normal value is quiet again.
        t += 10.0;
        let after = detector.observe(t, 50.0 + 2.0 * normal(&mut seed)).unwrap();
        assert!(after.score < 1.0, "{after:?}");
        // A 6-sigma level shift: not a spike, but the shift score passes 1 within 30 minutes (once the fast baseline has
        // followed it and the noise scale has settled back, the slow baseline is far away).
        let mut flagged_after = None;
        for step in 1..=180 {
            t += 10.0;
            let observation = detector.observe(t, 62.0 + 2.0 * normal(&mut seed)).unwrap();
            if observation.shift >= 1.0 {
                flagged_after = Some(step * 10);
                break;
            }
        }
        assert!(
            flagged_after.is_some(),
            "a 6-sigma shift went unnoticed for 30 minutes"
        );
    }

    #[test]
    fn a_constant_series_that_changes_is_anomalous() {
        let mut detector = Detector::new(DetectorConfig::default());
        let mut t = 0.0;
        for _ in 0..720 {
            t += 10.0;
            assert_eq!(detector.observe(t, 143_771_000_832.0).unwrap().score, 0.0);
        }
        t += 10.0;
        let changed = detector.observe(t, 143_000_000_000.0).unwrap();
        assert!(changed.score >= 1.0, "{changed:?}");
    }
}
