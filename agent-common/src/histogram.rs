//! Log-linear latency buckets: each power of two is split into `2^GROUPING_POWER` equal buckets.
//!
//! The same bucket layout is used in the kernel, the agent, on the wire and in the store, so
//! histograms from many processes and nodes merge by adding bucket counts.
//!
//! Values are nanoseconds. Bucket `i` holds values `v` with `lower(i) < v <= upper(i)` (Prometheus'
//! `le` semantics). With `GROUPING_POWER = 4` a bucket is 1/16 of its power of two wide, so any
//! value is at most 6.25% below its bucket's upper bound. Values up to `2^MIN_POWER` ns (64 ns)
//! share bucket 0; values above `2^MAX_POWER` ns (~137 s) land in the overflow bucket.

/// Each power of two is split into `2^GROUPING_POWER` buckets.
pub const GROUPING_POWER: u32 = 4;
/// Buckets per power of two.
pub const BUCKETS_PER_POWER: u32 = 1 << GROUPING_POWER;
/// Values `<= 2^MIN_POWER` ns share the first bucket.
pub const MIN_POWER: u32 = 6;
/// Values `> 2^MAX_POWER` ns (137.4 s) land in the overflow bucket.
pub const MAX_POWER: u32 = 37;
/// Bucket 0 (`<= 64 ns`), the log-linear buckets, and the overflow bucket.
pub const BUCKET_COUNT: usize = 2 + ((MAX_POWER - MIN_POWER) * BUCKETS_PER_POWER) as usize;
/// Index of the overflow bucket (values above `2^MAX_POWER` ns).
pub const OVERFLOW_BUCKET: usize = BUCKET_COUNT - 1;

/// Returns the bucket that holds `value_ns`.
///
/// Written without loops or tables so the BPF verifier accepts it on the hot path.
#[inline(always)]
pub fn bucket_index(value_ns: u64) -> usize {
    if value_ns <= 1 << MIN_POWER {
        return 0;
    }
    if value_ns > 1 << MAX_POWER {
        return OVERFLOW_BUCKET;
    }
    // Shift by one so that exact powers of two close a bucket instead of opening one:
    // `(lower, upper]` intervals.
    let v = value_ns - 1;
    let power = floor_log2(v); // MIN_POWER..MAX_POWER-1
    let sub = (v >> (power - GROUPING_POWER)) & (BUCKETS_PER_POWER as u64 - 1);
    1 + ((power - MIN_POWER) * BUCKETS_PER_POWER) as usize + sub as usize
}

/// `floor(log2(v))` for `v > 0`.
#[inline(always)]
pub fn floor_log2(v: u64) -> u32 {
    #[cfg(target_arch = "bpf")]
    {
        floor_log2_by_halving(v)
    }
    #[cfg(not(target_arch = "bpf"))]
    {
        63 - v.leading_zeros()
    }
}

/// `floor(log2(v))` in six compares. BPF has no count-leading-zeros instruction, and LLVM's
/// generic expansion of `leading_zeros` is ~55 instructions on the per-syscall hot path.
#[inline(always)]
pub fn floor_log2_by_halving(mut v: u64) -> u32 {
    let mut log = 0;
    if v >= 1 << 32 {
        v >>= 32;
        log += 32;
    }
    if v >= 1 << 16 {
        v >>= 16;
        log += 16;
    }
    if v >= 1 << 8 {
        v >>= 8;
        log += 8;
    }
    if v >= 1 << 4 {
        v >>= 4;
        log += 4;
    }
    if v >= 1 << 2 {
        v >>= 2;
        log += 2;
    }
    if v >= 1 << 1 {
        log += 1;
    }
    log
}

/// Inclusive upper bound of bucket `index` in nanoseconds; `u64::MAX` for the overflow bucket.
pub fn bucket_upper_bound_ns(index: usize) -> u64 {
    if index == 0 {
        return 1 << MIN_POWER;
    }
    if index >= OVERFLOW_BUCKET {
        return u64::MAX;
    }
    let i = (index - 1) as u32;
    let power = MIN_POWER + i / BUCKETS_PER_POWER;
    let sub = (i % BUCKETS_PER_POWER) as u64;
    (BUCKETS_PER_POWER as u64 + sub + 1) << (power - GROUPING_POWER)
}

/// Exclusive lower bound of bucket `index` in nanoseconds (0 for the first bucket).
pub fn bucket_lower_bound_ns(index: usize) -> u64 {
    if index == 0 {
        0
    } else {
        bucket_upper_bound_ns(index - 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn covers_100ns_to_100s_with_at_most_6_25_percent_error() {
        assert!(bucket_index(100) > 0, "100 ns has its own bucket");
        assert!(bucket_upper_bound_ns(OVERFLOW_BUCKET - 1) >= 100_000_000_000);
        for index in 2..OVERFLOW_BUCKET {
            let (lo, hi) = (bucket_lower_bound_ns(index), bucket_upper_bound_ns(index));
            let relative_width = (hi - lo) as f64 / hi as f64;
            assert!(
                relative_width <= 0.0625,
                "bucket {index} ({lo}, {hi}] is {relative_width}"
            );
        }
    }

    #[test]
    fn the_kernel_log2_agrees_with_leading_zeros() {
        for shift in 0..64 {
            for v in [
                1u64 << shift,
                (1u64 << shift) | 1,
                (1u64 << shift).wrapping_sub(1).max(1),
            ] {
                assert_eq!(floor_log2_by_halving(v), 63 - v.leading_zeros(), "{v}");
            }
        }
        assert_eq!(floor_log2_by_halving(u64::MAX), 63);
    }

    #[test]
    fn bucket_boundaries_are_inclusive_upper_bounds() {
        assert_eq!(bucket_index(0), 0);
        assert_eq!(bucket_index(64), 0);
        assert_eq!(bucket_index(65), 1);
        assert_eq!(bucket_upper_bound_ns(1), 68);
        assert_eq!(bucket_index(68), 1);
        assert_eq!(bucket_index(69), 2);
        assert_eq!(bucket_index(128), 16);
        assert_eq!(bucket_upper_bound_ns(16), 128);
        assert_eq!(bucket_index(129), 17);
        assert_eq!(bucket_upper_bound_ns(17), 136);
        // 2 ms = 2_000_000 ns lies in (1_966_080, 2_031_616]
        let i = bucket_index(2_000_000);
        assert_eq!(bucket_lower_bound_ns(i), 1_966_080);
        assert_eq!(bucket_upper_bound_ns(i), 2_031_616);
    }

    #[test]
    fn every_value_lies_within_its_bucket_bounds() {
        let mut v = 1u64;
        while v < 1 << 40 {
            for probe in [v - 1, v, v + 1, v + v / 3] {
                let i = bucket_index(probe);
                assert!(
                    probe <= bucket_upper_bound_ns(i),
                    "{probe} above bucket {i}"
                );
                assert!(
                    probe > bucket_lower_bound_ns(i) || i == 0,
                    "{probe} below bucket {i}"
                );
            }
            v = v * 17 / 16 + 1;
        }
    }

    #[test]
    fn largest_values_land_in_the_overflow_bucket() {
        assert_eq!(bucket_index(1 << MAX_POWER), OVERFLOW_BUCKET - 1);
        assert_eq!(bucket_index((1 << MAX_POWER) + 1), OVERFLOW_BUCKET);
        assert_eq!(bucket_index(u64::MAX), OVERFLOW_BUCKET);
        assert_eq!(bucket_upper_bound_ns(OVERFLOW_BUCKET), u64::MAX);
        assert_eq!(BUCKET_COUNT, 498);
    }

    #[test]
    fn bucket_indices_increase_monotonically() {
        let mut last = 0;
        for v in (0..5_000_000u64).step_by(7) {
            let i = bucket_index(v);
            assert!(i >= last);
            last = i;
        }
    }
}
