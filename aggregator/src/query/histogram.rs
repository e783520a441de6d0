//! Histogram arithmetic and quantiles: classic `le` buckets with Prometheus's interpolation
//! (`bucketQuantile`, with its monotonicity fix), and our log-linear histogram samples, which
//! add bucket-wise (the layout is the same everywhere) and interpolate linearly inside the
//! bucket the rank falls in.

use vigil_agent_common::histogram::{
    OVERFLOW_BUCKET, bucket_lower_bound_ns, bucket_upper_bound_ns,
};

use super::value::FloatHistogram;
use crate::storage::HistogramPoint;

/// `acc += factor * other`, bucket-wise.
pub fn add_into(acc: &mut FloatHistogram, other: &FloatHistogram, factor: f64) {
    acc.count += factor * other.count;
    acc.sum_seconds += factor * other.sum_seconds;
    // Series of one process usually keep the same buckets: add in place.
    if acc.buckets.len() == other.buckets.len()
        && acc
            .buckets
            .iter()
            .zip(&other.buckets)
            .all(|(a, b)| a.0 == b.0)
    {
        for (a, b) in acc.buckets.iter_mut().zip(&other.buckets) {
            a.1 += factor * b.1;
        }
        return;
    }
    let mut merged = Vec::with_capacity(acc.buckets.len().max(other.buckets.len()));
    let (mut i, mut j) = (0, 0);
    while i < acc.buckets.len() || j < other.buckets.len() {
        match (acc.buckets.get(i), other.buckets.get(j)) {
            (Some(&(a, x)), Some(&(b, y))) if a == b => {
                merged.push((a, x + factor * y));
                i += 1;
                j += 1;
            }
            (Some(&(a, x)), Some(&(b, _))) if a < b => {
                merged.push((a, x));
                i += 1;
            }
            (Some(&(a, x)), None) => {
                merged.push((a, x));
                i += 1;
            }
            (_, Some(&(b, y))) => {
                merged.push((b, factor * y));
                j += 1;
            }
            (None, None) => unreachable!("the loop condition holds"),
        }
    }
    acc.buckets = merged;
}

pub fn scale(histogram: &mut FloatHistogram, factor: f64) {
    histogram.count *= factor;
    histogram.sum_seconds *= factor;
    for (_, count) in &mut histogram.buckets {
        *count *= factor;
    }
}

/// `acc += factor * point`, bucket-wise, straight from a stored sample (no conversion: the
/// rate of every series at every step goes through here).
pub fn add_point_into(acc: &mut FloatHistogram, point: &HistogramPoint, factor: f64) {
    acc.count += factor * point.count as f64;
    acc.sum_seconds += factor * point.sum_seconds;
    if acc.buckets.len() == point.buckets.len()
        && acc
            .buckets
            .iter()
            .zip(&point.buckets)
            .all(|(a, b)| a.0 == b.0)
    {
        for (a, b) in acc.buckets.iter_mut().zip(&point.buckets) {
            a.1 += factor * b.1 as f64;
        }
        return;
    }
    let mut merged = Vec::with_capacity(acc.buckets.len().max(point.buckets.len()));
    let (mut i, mut j) = (0, 0);
    while i < acc.buckets.len() || j < point.buckets.len() {
        match (acc.buckets.get(i), point.buckets.get(j)) {
            (Some(&(a, x)), Some(&(b, y))) if a == b => {
                merged.push((a, x + factor * y as f64));
                i += 1;
                j += 1;
            }
            (Some(&(a, x)), Some(&(b, _))) if a < b => {
                merged.push((a, x));
                i += 1;
            }
            (Some(&(a, x)), None) => {
                merged.push((a, x));
                i += 1;
            }
            (_, Some(&(b, y))) => {
                merged.push((b, factor * y as f64));
                j += 1;
            }
            (None, None) => unreachable!("the loop condition holds"),
        }
    }
    acc.buckets = merged;
}

/// Whether `next` cannot follow `previous` in a counter histogram: its count, or any bucket,
/// went down (the process restarted). Both bucket lists are in index order.
pub fn is_reset(previous: &HistogramPoint, next: &HistogramPoint) -> bool {
    if next.count < previous.count {
        return true;
    }
    let mut later = next.buckets.iter().peekable();
    for (index, count) in &previous.buckets {
        while later.next_if(|(other, _)| other < index).is_some() {}
        match later.peek() {
            Some((other, now)) if other == index => {
                if now < count {
                    return true;
                }
            }
            // The bucket vanished: it went down to zero.
            _ => {
                if *count > 0 {
                    return true;
                }
            }
        }
    }
    false
}

/// The `q`-quantile of a log-linear histogram, in seconds.
pub fn native_quantile(q: f64, histogram: &FloatHistogram) -> f64 {
    if q.is_nan() {
        return f64::NAN;
    }
    if q < 0.0 {
        return f64::NEG_INFINITY;
    }
    if q > 1.0 {
        return f64::INFINITY;
    }
    let total: f64 = histogram.buckets.iter().map(|(_, count)| *count).sum();
    if total.is_nan() || total <= 0.0 {
        return f64::NAN;
    }
    let rank = q * total;
    let mut below = 0.0;
    for (index, count) in &histogram.buckets {
        let index = *index as usize;
        if *count <= 0.0 {
            continue;
        }
        if below + count >= rank {
            let lower = bucket_lower_bound_ns(index) as f64 / 1e9;
            if index >= OVERFLOW_BUCKET {
                // The overflow bucket has no upper bound: answer its lower bound, as
                // Prometheus answers the highest finite bound for the +Inf bucket.
                return lower;
            }
            let upper = bucket_upper_bound_ns(index) as f64 / 1e9;
            return lower + (upper - lower) * ((rank - below) / count);
        }
        below += count;
    }
    histogram
        .buckets
        .last()
        .map(|(index, _)| bucket_upper_bound_ns(*index as usize) as f64 / 1e9)
        .unwrap_or(f64::NAN)
}

/// One classic bucket: its upper bound and cumulative count.
#[derive(Debug, Clone, Copy)]
pub struct Bucket {
    pub upper: f64,
    pub count: f64,
}

/// Prometheus's `bucketQuantile` over classic cumulative buckets.
pub fn bucket_quantile(q: f64, mut buckets: Vec<Bucket>) -> f64 {
    if q < 0.0 {
        return f64::NEG_INFINITY;
    }
    if q > 1.0 {
        return f64::INFINITY;
    }
    buckets.sort_by(|a, b| a.upper.total_cmp(&b.upper));
    match buckets.last() {
        Some(last) if last.upper == f64::INFINITY => {}
        _ => return f64::NAN,
    }
    // Buckets with the same bound (from differently spelled `le`) count as one.
    let mut coalesced: Vec<Bucket> = Vec::with_capacity(buckets.len());
    for bucket in buckets {
        match coalesced.last_mut() {
            Some(last) if last.upper == bucket.upper => last.count += bucket.count,
            _ => coalesced.push(bucket),
        }
    }
    let mut buckets = coalesced;
    // Rates of buckets scraped at slightly different times can make the cumulative counts
    // dip; Prometheus raises each count to the running maximum.
    let mut max = f64::NEG_INFINITY;
    for bucket in &mut buckets {
        if bucket.count > max {
            max = bucket.count;
        } else if bucket.count < max {
            bucket.count = max;
        }
    }
    if buckets.len() < 2 {
        return f64::NAN;
    }
    let observations = buckets[buckets.len() - 1].count;
    if observations == 0.0 {
        return f64::NAN;
    }
    let mut rank = q * observations;
    // sort.Search over all but the +Inf bucket: the first whose count reaches the rank.
    let b = buckets[..buckets.len() - 1].partition_point(|bucket| {
        matches!(
            bucket.count.partial_cmp(&rank),
            Some(std::cmp::Ordering::Less) | None
        )
    });
    if b == buckets.len() - 1 {
        return buckets[buckets.len() - 2].upper;
    }
    if b == 0 && buckets[0].upper <= 0.0 {
        return buckets[0].upper;
    }
    let mut start = 0.0;
    let end = buckets[b].upper;
    let mut count = buckets[b].count;
    if b > 0 {
        start = buckets[b - 1].upper;
        count -= buckets[b - 1].count;
        rank -= buckets[b - 1].count;
    }
    start + (end - start) * (rank / count)
}

#[cfg(test)]
mod tests {
    use super::*;
    use vigil_agent_common::histogram::bucket_index;

    #[test]
    fn classic_quantile_interpolates_inside_the_bucket() {
        let buckets = vec![
            Bucket {
                upper: 0.1,
                count: 10.0,
            },
            Bucket {
                upper: 0.2,
                count: 30.0,
            },
            Bucket {
                upper: f64::INFINITY,
                count: 40.0,
            },
        ];
        // rank 20 falls in (0.1, 0.2], half-way through its 20 observations.
        assert!((bucket_quantile(0.5, buckets.clone()) - 0.15).abs() < 1e-12);
        // In the +Inf bucket: the highest finite bound.
        assert_eq!(bucket_quantile(0.99, buckets.clone()), 0.2);
        assert_eq!(bucket_quantile(-1.0, buckets.clone()), f64::NEG_INFINITY);
        assert_eq!(bucket_quantile(2.0, buckets), f64::INFINITY);
        // No +Inf bucket: NaN.
        assert!(
            bucket_quantile(
                0.5,
                vec![Bucket {
                    upper: 1.0,
                    count: 1.0
                }]
            )
            .is_nan()
        );
    }

    #[test]
    fn classic_quantile_fixes_non_monotonic_buckets() {
        let buckets = vec![
            Bucket {
                upper: 1.0,
                count: 10.0,
            },
            Bucket {
                upper: 2.0,
                count: 8.0,
            },
            Bucket {
                upper: f64::INFINITY,
                count: 10.0,
            },
        ];
        // 2.0's count is raised to 10, so every rank up to 10 lies in (0, 1].
        assert!((bucket_quantile(0.5, buckets) - 0.5).abs() < 1e-12);
    }

    #[test]
    fn native_quantile_lies_in_the_bucket_of_the_rank() {
        let a = bucket_index(1_000_000) as u32; // 1 ms
        let b = bucket_index(10_000_000) as u32; // 10 ms
        let h = FloatHistogram {
            count: 100.0,
            sum_seconds: 0.0,
            buckets: vec![(a, 90.0), (b, 10.0)],
        };
        let p50 = native_quantile(0.5, &h);
        let lower_a = bucket_lower_bound_ns(a as usize) as f64 / 1e9;
        let upper_a = bucket_upper_bound_ns(a as usize) as f64 / 1e9;
        assert!(p50 > lower_a && p50 <= upper_a, "{p50}");
        let expected = lower_a + (upper_a - lower_a) * (50.0 / 90.0);
        assert!((p50 - expected).abs() < 1e-15);
        let p99 = native_quantile(0.99, &h);
        let lower_b = bucket_lower_bound_ns(b as usize) as f64 / 1e9;
        let upper_b = bucket_upper_bound_ns(b as usize) as f64 / 1e9;
        // Rank 99: 9 of the 10 observations in b's bucket.
        assert!(
            (p99 - (lower_b + (upper_b - lower_b) * 0.9)).abs() < 1e-15,
            "{p99}"
        );
        assert!(native_quantile(0.5, &FloatHistogram::default()).is_nan());
    }

    #[test]
    fn a_count_or_bucket_going_down_is_a_reset() {
        let p = |count, buckets: Vec<(u32, u64)>| HistogramPoint {
            count,
            sum_seconds: 0.0,
            buckets,
        };
        let before = p(3, vec![(1, 1), (4, 2)]);
        assert!(!is_reset(&before, &p(5, vec![(0, 1), (1, 1), (4, 3)])));
        assert!(is_reset(&before, &p(5, vec![(1, 4), (4, 1)])));
        assert!(is_reset(&before, &p(5, vec![(1, 5)])));
        assert!(is_reset(&p(3, vec![(1, 3)]), &p(2, vec![(1, 2)])));
    }

    #[test]
    fn adding_merges_bucket_lists() {
        let mut acc = FloatHistogram {
            count: 2.0,
            sum_seconds: 1.0,
            buckets: vec![(1, 1.0), (5, 1.0)],
        };
        let other = FloatHistogram {
            count: 3.0,
            sum_seconds: 2.0,
            buckets: vec![(0, 1.0), (5, 1.0), (9, 1.0)],
        };
        add_into(&mut acc, &other, 1.0);
        assert_eq!(acc.count, 5.0);
        assert_eq!(acc.buckets, vec![(0, 1.0), (1, 1.0), (5, 2.0), (9, 1.0)]);
        add_into(&mut acc, &other, -1.0);
        assert_eq!(acc.buckets, vec![(0, 0.0), (1, 1.0), (5, 1.0), (9, 0.0)]);
    }
}
