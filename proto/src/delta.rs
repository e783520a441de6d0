//! The stream-delta encoding of a batch's samples and histograms (`Batch.delta`,
//! docs/protocol.md "Delta encoding"), shared by the agent (encoder) and the aggregator
//! (decoder).
//!
//! Compressing each message alone, as gRPC does, cannot see that a reading is its previous
//! reading plus a little: every batch pays for whole doubles and whole running totals again.
//! Here each value is coded against the same series' previous value on the same stream
//! (unchanged, an integer or decimal difference, or XOR'd bits), a histogram's buckets are sent
//! as their deviation from their usual share of its new observations, and the result goes in
//! columns that zstd shrinks well.
//!
//! Both ends keep the same state, built from the batches of one stream in order: a gRPC stream is
//! ordered and reliable, and a new stream starts from nothing, so a resend after a reconnect is
//! coded against what that new stream carried. The decoder must therefore see every Batch of a
//! stream, whatever it then does with it (a duplicate is still decoded). A series not seen for
//! [`FORGET_AFTER_BATCHES`] batches is forgotten by both ends at the same moment, so the state
//! stays as small as the set of live series.

use std::collections::HashMap;

use crate::v1::{Batch, DeltaBlock, Histogram, Sample};

/// What an aggregator lists in the `vigil-stream-encodings` response header, and an agent in
/// `Hello.capabilities`, to use this encoding.
pub const DELTA_V1: &str = "delta-v1";
/// The response header in which the aggregator offers stream encodings (comma-separated).
pub const ENCODINGS_HEADER: &str = "vigil-stream-encodings";

/// Puts the aggregator's offer of this encoding in a stream's response headers.
pub fn offer(headers: &mut tonic::metadata::MetadataMap) {
    headers.insert(
        ENCODINGS_HEADER,
        tonic::metadata::MetadataValue::from_static(DELTA_V1),
    );
}

/// Whether a stream's response headers offer this encoding.
pub fn offered(headers: &tonic::metadata::MetadataMap) -> bool {
    headers
        .get(ENCODINGS_HEADER)
        .and_then(|value| value.to_str().ok())
        .is_some_and(|value| value.split(',').any(|e| e.trim() == DELTA_V1))
}

/// A series absent from this many consecutive batches of a stream is forgotten by both ends (its
/// next value is coded against 0, as a new series' is).
pub const FORGET_AFTER_BATCHES: u64 = 1024;
/// Both ends look for series to forget after every this many batches.
const SWEEP_EVERY: u64 = 256;
/// The highest bucket index a delta block may name (Vigil's histograms have far fewer buckets;
/// the aggregator's validation has the exact bound). Bounds the decoder's memory.
pub const MAX_BUCKET_INDEX: u32 = 1 << 16;

/// Value codes (`sample_kinds`, `histogram_sum_kinds`).
mod code {
    /// Bit-identical to the previous value; no payload.
    pub const SAME: u8 = 0;
    /// `1 + k` for k in 0..=9: both values are `n / 10^k` for integers `n` (|n| <= 2^53);
    /// payload zigzag(n - n_previous).
    pub const SCALED_FIRST: u8 = 1;
    pub const SCALED_LAST: u8 = 10;
    /// payload varint(bits ^ previous bits), when that is below 2^56.
    pub const XOR: u8 = 11;
    /// payload the 8 bytes of the value's bits, little-endian.
    pub const RAW: u8 = 12;
}

const POWERS_OF_TEN: [f64; 10] = [1.0, 1e1, 1e2, 1e3, 1e4, 1e5, 1e6, 1e7, 1e8, 1e9];
const EXACT_INTEGERS: f64 = 9_007_199_254_740_992.0; // 2^53

/// A block that cannot be decoded. The stream's state is then unknown: the stream must end (the
/// agent reconnects and resends from its spool, coded afresh).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeltaError(pub String);

impl std::fmt::Display for DeltaError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "undecodable delta block: {}", self.0)
    }
}

impl std::error::Error for DeltaError {}

#[derive(Debug, Clone, Copy)]
struct ValueState {
    value: f64,
    used: u64,
}

#[derive(Debug, Clone, Default)]
struct HistogramState {
    count: u64,
    sum: f64,
    /// Non-empty buckets, ascending by index.
    buckets: Vec<Bucket>,
    used: u64,
}

#[derive(Debug, Clone, Copy, PartialEq)]
struct Bucket {
    index: u32,
    /// Running count.
    count: u64,
    /// The bucket's usual share of the histogram's new observations, in 1/2^SHARE_BITS: an
    /// average over recent batches, from which both ends predict its next change.
    share: u32,
}

/// Fixed-point precision of [`Bucket::share`]. Integer arithmetic, so both ends compute the
/// same predictions bit for bit.
const SHARE_BITS: u32 = 20;

/// A bucket's predicted change when the histogram gained `total` observations.
fn predict(total: i64, share: u32) -> i64 {
    if total <= 0 {
        return 0;
    }
    ((total as u128 * u128::from(share)) >> SHARE_BITS) as i64
}

/// The bucket's share after it changed by `change` of the histogram's `total`: a moving
/// average with weight 1/4 on the newest batch (`previous` is None for a new bucket).
fn next_share(previous: Option<u32>, change: i64, total: i64) -> u32 {
    if total <= 0 {
        return previous.unwrap_or(0);
    }
    let observed = ((change.clamp(0, total) as u128) << SHARE_BITS) / total as u128;
    let observed = observed as i64;
    match previous {
        None => observed as u32,
        Some(previous) => {
            let previous = i64::from(previous);
            (previous + (observed - previous) / 4) as u32
        }
    }
}

/// The state both ends keep for one stream.
#[derive(Debug, Default)]
struct StreamState {
    values: HashMap<u64, ValueState>,
    histograms: HashMap<u64, HistogramState>,
    /// Batches seen on this stream.
    batches: u64,
}

impl StreamState {
    /// Called once per Batch, after it: counts it and, now and then, forgets quiet series.
    fn end_batch(&mut self) {
        self.batches += 1;
        if self.batches.is_multiple_of(SWEEP_EVERY) {
            let now = self.batches;
            let live = |used: u64| used + FORGET_AFTER_BATCHES > now;
            self.values.retain(|_, state| live(state.used));
            self.histograms.retain(|_, state| live(state.used));
        }
    }

    fn series_count(&self) -> usize {
        self.values.len() + self.histograms.len()
    }
}

// ---------------------------------------------------------------------------------------------
// Encoding (the agent).

/// Codes the samples and histograms of one stream's batches. One per stream: create a new one
/// for every new stream.
#[derive(Debug, Default)]
pub struct DeltaEncoder {
    state: StreamState,
}

impl DeltaEncoder {
    pub fn new() -> Self {
        Self::default()
    }

    /// Moves `batch.samples` and `batch.histograms` into `batch.delta`. Call it for every batch
    /// sent on the stream, in order, empty ones included. A histogram whose bucket lists the
    /// encoding cannot carry faithfully (lists of different lengths, indexes not ascending, a
    /// listed count of 0) stays in `histograms`, for the aggregator to reject as before.
    pub fn encode(&mut self, batch: &mut Batch) {
        let generation = self.state.batches + 1;
        let mut block = DeltaBlock::default();
        let mut previous_id = 0u64;
        for sample in std::mem::take(&mut batch.samples) {
            put_zigzag(
                &mut block.sample_series,
                sample.series_id.wrapping_sub(previous_id) as i64,
            );
            previous_id = sample.series_id;
            put_zigzag(&mut block.sample_times, sample.time_delta_ms);
            let state = self
                .state
                .values
                .entry(sample.series_id)
                .or_insert(ValueState {
                    value: 0.0,
                    used: generation,
                });
            put_value(
                &mut block.sample_kinds,
                &mut block.sample_payloads,
                state.value,
                sample.value,
            );
            state.value = sample.value;
            state.used = generation;
            block.sample_count += 1;
        }
        let mut plain = Vec::new();
        let mut previous_id = 0u64;
        for histogram in std::mem::take(&mut batch.histograms) {
            let Some(buckets) = absolute_buckets(&histogram) else {
                plain.push(histogram);
                continue;
            };
            put_zigzag(
                &mut block.histogram_series,
                histogram.series_id.wrapping_sub(previous_id) as i64,
            );
            previous_id = histogram.series_id;
            put_zigzag(&mut block.histogram_times, histogram.time_delta_ms);
            let state = self
                .state
                .histograms
                .entry(histogram.series_id)
                .or_default();
            let (total, next) = put_bucket_changes(&mut block, &state.buckets, &buckets);
            put_zigzag(
                &mut block.histogram_counts,
                histogram
                    .count
                    .wrapping_sub(state.count)
                    .wrapping_sub(total as u64) as i64,
            );
            put_value(
                &mut block.histogram_sum_kinds,
                &mut block.histogram_sum_payloads,
                state.sum,
                histogram.sum_seconds,
            );
            *state = HistogramState {
                count: histogram.count,
                sum: histogram.sum_seconds,
                buckets: next,
                used: generation,
            };
            block.histogram_count += 1;
        }
        batch.histograms = plain;
        if block.sample_count > 0 || block.histogram_count > 0 {
            batch.delta = Some(Box::new(block));
        }
        self.state.end_batch();
    }
}

/// A histogram's buckets as (index, count), or None when the lists are not a faithful sparse
/// list (see [`DeltaEncoder::encode`]).
fn absolute_buckets(histogram: &Histogram) -> Option<Vec<(u32, u64)>> {
    if histogram.bucket_index_deltas.len() != histogram.bucket_counts.len() {
        return None;
    }
    let mut buckets = Vec::with_capacity(histogram.bucket_counts.len());
    let mut index = 0u32;
    for (k, (&delta, &count)) in histogram
        .bucket_index_deltas
        .iter()
        .zip(&histogram.bucket_counts)
        .enumerate()
    {
        if (k > 0 && delta == 0) || count == 0 {
            return None;
        }
        index = index.checked_add(delta)?;
        if index > MAX_BUCKET_INDEX {
            return None;
        }
        buckets.push((index, count));
    }
    Some(buckets)
}

/// One histogram's bucket changes from `previous` (the state) to `next` (ascending, no zero
/// counts): the total change (`histogram_totals`), then for every previous bucket its change
/// minus the change its share predicts (`histogram_bucket_changes`), then the buckets new to
/// the histogram (`histogram_bucket_gaps`: their number and index gaps; their counts follow in
/// `histogram_bucket_changes`). Returns the total and the next state's buckets.
fn put_bucket_changes(
    block: &mut DeltaBlock,
    previous: &[Bucket],
    next: &[(u32, u64)],
) -> (i64, Vec<Bucket>) {
    // Each previous bucket's change (its next count is 0 when `next` lacks it), and the buckets
    // only `next` has.
    let mut changes = Vec::with_capacity(previous.len());
    let mut new = Vec::new();
    let mut j = 0;
    for bucket in previous {
        while j < next.len() && next[j].0 < bucket.index {
            new.push(next[j]);
            j += 1;
        }
        let count = match next.get(j) {
            Some(&(index, count)) if index == bucket.index => {
                j += 1;
                count
            }
            _ => 0,
        };
        changes.push(count.wrapping_sub(bucket.count) as i64);
    }
    new.extend_from_slice(&next[j..]);
    let total = changes
        .iter()
        .copied()
        .chain(new.iter().map(|&(_, count)| count as i64))
        .fold(0i64, i64::wrapping_add);

    put_zigzag(&mut block.histogram_totals, total);
    for (bucket, &change) in previous.iter().zip(&changes) {
        put_zigzag(
            &mut block.histogram_bucket_changes,
            change.wrapping_sub(predict(total, bucket.share)),
        );
    }
    put_varint(&mut block.histogram_bucket_gaps, new.len() as u64);
    let mut previous_index = None;
    for &(index, count) in &new {
        let gap = match previous_index {
            None => index,
            Some(p) => index - p - 1,
        };
        put_varint(&mut block.histogram_bucket_gaps, u64::from(gap));
        put_varint(&mut block.histogram_bucket_changes, count);
        previous_index = Some(index);
    }
    (total, next_buckets(previous, &changes, &new, total))
}

/// The state's buckets after `changes` (one per previous bucket) and the `new` ones: those left
/// with a count, ascending, each with its updated share. Both ends build it the same way.
fn next_buckets(
    previous: &[Bucket],
    changes: &[i64],
    new: &[(u32, u64)],
    total: i64,
) -> Vec<Bucket> {
    let mut buckets = Vec::with_capacity(previous.len() + new.len());
    let mut new = new.iter().peekable();
    for (bucket, &change) in previous.iter().zip(changes) {
        while let Some(&&(index, count)) = new.peek()
            && index < bucket.index
        {
            buckets.push(Bucket {
                index,
                count,
                share: next_share(None, count as i64, total),
            });
            new.next();
        }
        let count = bucket.count.wrapping_add(change as u64);
        if count != 0 {
            buckets.push(Bucket {
                index: bucket.index,
                count,
                share: next_share(Some(bucket.share), change, total),
            });
        }
    }
    for &(index, count) in new {
        buckets.push(Bucket {
            index,
            count,
            share: next_share(None, count as i64, total),
        });
    }
    buckets
}

/// `value` as `n / 10^k` for an integer n (|n| <= 2^53), when that is exactly what dividing
/// gives back (bit for bit, so -0.0 does not qualify).
fn scaled(value: f64, scale: f64) -> Option<i64> {
    let n = (value * scale).round();
    if n.abs() > EXACT_INTEGERS {
        return None;
    }
    let n = n as i64;
    ((n as f64 / scale).to_bits() == value.to_bits()).then_some(n)
}

fn put_value(kinds: &mut Vec<u8>, payloads: &mut Vec<u8>, previous: f64, value: f64) {
    if value.to_bits() == previous.to_bits() {
        kinds.push(code::SAME);
        return;
    }
    // The smallest scale at which both are exact gives the smallest difference.
    for (k, &scale) in POWERS_OF_TEN.iter().enumerate() {
        if let (Some(n), Some(p)) = (scaled(value, scale), scaled(previous, scale)) {
            kinds.push(code::SCALED_FIRST + k as u8);
            put_zigzag(payloads, n - p);
            return;
        }
    }
    let xor = value.to_bits() ^ previous.to_bits();
    if xor < 1 << 56 {
        kinds.push(code::XOR);
        put_varint(payloads, xor);
    } else {
        kinds.push(code::RAW);
        payloads.extend_from_slice(&value.to_bits().to_le_bytes());
    }
}

fn put_varint(out: &mut Vec<u8>, mut value: u64) {
    while value >= 0x80 {
        out.push(value as u8 | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

fn put_zigzag(out: &mut Vec<u8>, value: i64) {
    put_varint(out, ((value << 1) ^ (value >> 63)) as u64);
}

// ---------------------------------------------------------------------------------------------
// Decoding (the aggregator).

/// Decodes the delta blocks of one stream's batches. One per stream.
#[derive(Debug)]
pub struct DeltaDecoder {
    state: StreamState,
    max_series: usize,
}

impl DeltaDecoder {
    /// `max_series`: how many series the stream's state may hold (more is an error, which bounds
    /// the memory one stream can make the aggregator spend).
    pub fn new(max_series: usize) -> Self {
        Self {
            state: StreamState::default(),
            max_series,
        }
    }

    /// Appends the samples and histograms of `batch.delta` to `batch.samples` and
    /// `batch.histograms`. Call it for every batch received on the stream, in order. After an
    /// error the decoder's state no longer matches the agent's: end the stream.
    pub fn decode(&mut self, batch: &mut Batch) -> Result<(), DeltaError> {
        let generation = self.state.batches + 1;
        if let Some(block) = batch.delta.take() {
            self.decode_samples(&block, generation, &mut batch.samples)?;
            self.decode_histograms(&block, generation, &mut batch.histograms)?;
        }
        self.state.end_batch();
        Ok(())
    }

    fn check_room(&self, adding: bool) -> Result<(), DeltaError> {
        if adding && self.state.series_count() >= self.max_series {
            return Err(DeltaError(format!(
                "the stream's delta state would exceed {} series",
                self.max_series
            )));
        }
        Ok(())
    }

    fn decode_samples(
        &mut self,
        block: &DeltaBlock,
        generation: u64,
        out: &mut Vec<Sample>,
    ) -> Result<(), DeltaError> {
        let count = block.sample_count as usize;
        // Every sample takes at least one byte of each column: a count beyond them is a lie
        // (checked before reserving memory for it).
        if count > block.sample_kinds.len() {
            return Err(DeltaError(format!(
                "sample_count {count} but {} value codes",
                block.sample_kinds.len()
            )));
        }
        let mut series = Reader::new(&block.sample_series, "sample_series");
        let mut times = Reader::new(&block.sample_times, "sample_times");
        let mut payloads = Reader::new(&block.sample_payloads, "sample_payloads");
        out.reserve(count);
        let mut series_id = 0u64;
        for (k, &kind) in block.sample_kinds[..count].iter().enumerate() {
            let at = |e: DeltaError| DeltaError(format!("sample {k}: {}", e.0));
            series_id = series_id.wrapping_add(series.zigzag().map_err(at)? as u64);
            let time_delta_ms = times.zigzag().map_err(at)?;
            self.check_room(!self.state.values.contains_key(&series_id))
                .map_err(at)?;
            let state = self.state.values.entry(series_id).or_insert(ValueState {
                value: 0.0,
                used: generation,
            });
            let value = read_value(kind, state.value, &mut payloads).map_err(at)?;
            state.value = value;
            state.used = generation;
            out.push(Sample {
                series_id,
                time_delta_ms,
                value,
            });
        }
        if block.sample_kinds.len() != count {
            return Err(DeltaError(format!(
                "{} value codes for {count} samples",
                block.sample_kinds.len()
            )));
        }
        series.finish()?;
        times.finish()?;
        payloads.finish()
    }

    fn decode_histograms(
        &mut self,
        block: &DeltaBlock,
        generation: u64,
        out: &mut Vec<Histogram>,
    ) -> Result<(), DeltaError> {
        let count = block.histogram_count as usize;
        if count > block.histogram_sum_kinds.len() {
            return Err(DeltaError(format!(
                "histogram_count {count} but {} sum codes",
                block.histogram_sum_kinds.len()
            )));
        }
        let mut series = Reader::new(&block.histogram_series, "histogram_series");
        let mut times = Reader::new(&block.histogram_times, "histogram_times");
        let mut counts = Reader::new(&block.histogram_counts, "histogram_counts");
        let mut sums = Reader::new(&block.histogram_sum_payloads, "histogram_sum_payloads");
        let mut totals = Reader::new(&block.histogram_totals, "histogram_totals");
        let mut gaps = Reader::new(&block.histogram_bucket_gaps, "histogram_bucket_gaps");
        let mut changes = Reader::new(&block.histogram_bucket_changes, "histogram_bucket_changes");
        out.reserve(count);
        let mut series_id = 0u64;
        for (k, &sum_kind) in block.histogram_sum_kinds[..count].iter().enumerate() {
            let at = |e: DeltaError| DeltaError(format!("histogram {k}: {}", e.0));
            series_id = series_id.wrapping_add(series.zigzag().map_err(at)? as u64);
            let time_delta_ms = times.zigzag().map_err(at)?;
            self.check_room(!self.state.histograms.contains_key(&series_id))
                .map_err(at)?;
            let state = self.state.histograms.entry(series_id).or_default();
            let (next, total) =
                apply_bucket_changes(&state.buckets, &mut totals, &mut gaps, &mut changes)
                    .map_err(at)?;
            let count = state
                .count
                .wrapping_add(total as u64)
                .wrapping_add(counts.zigzag().map_err(at)? as u64);
            let sum_seconds = read_value(sum_kind, state.sum, &mut sums).map_err(at)?;
            let mut bucket_index_deltas = Vec::with_capacity(next.len());
            let mut bucket_counts = Vec::with_capacity(next.len());
            let mut previous_index = 0;
            for bucket in &next {
                bucket_index_deltas.push(bucket.index - previous_index);
                bucket_counts.push(bucket.count);
                previous_index = bucket.index;
            }
            *state = HistogramState {
                count,
                sum: sum_seconds,
                buckets: next,
                used: generation,
            };
            out.push(Histogram {
                series_id,
                time_delta_ms,
                count,
                sum_seconds,
                bucket_index_deltas,
                bucket_counts,
            });
        }
        if block.histogram_sum_kinds.len() != count {
            return Err(DeltaError(format!(
                "{} sum codes for {count} histograms",
                block.histogram_sum_kinds.len()
            )));
        }
        series.finish()?;
        times.finish()?;
        counts.finish()?;
        sums.finish()?;
        totals.finish()?;
        gaps.finish()?;
        changes.finish()
    }
}

fn read_value(kind: u8, previous: f64, payloads: &mut Reader<'_>) -> Result<f64, DeltaError> {
    match kind {
        code::SAME => Ok(previous),
        code::SCALED_FIRST..=code::SCALED_LAST => {
            let scale = POWERS_OF_TEN[usize::from(kind - code::SCALED_FIRST)];
            let p = scaled(previous, scale).ok_or_else(|| {
                DeltaError(format!(
                    "value code {kind} but the previous value {previous} is not a multiple of 1/{scale}"
                ))
            })?;
            let n = p
                .checked_add(payloads.zigzag()?)
                .filter(|n| n.unsigned_abs() <= EXACT_INTEGERS as u64)
                .ok_or_else(|| DeltaError("scaled value out of range".into()))?;
            Ok(n as f64 / scale)
        }
        code::XOR => Ok(f64::from_bits(previous.to_bits() ^ payloads.varint()?)),
        code::RAW => {
            let bytes = payloads.bytes(8)?;
            Ok(f64::from_bits(u64::from_le_bytes(
                bytes.try_into().expect("8 bytes"),
            )))
        }
        other => Err(DeltaError(format!("unknown value code {other}"))),
    }
}

/// The buckets after one histogram's changes (see [`put_bucket_changes`]), and its total
/// change.
fn apply_bucket_changes(
    previous: &[Bucket],
    totals: &mut Reader<'_>,
    gaps: &mut Reader<'_>,
    deltas: &mut Reader<'_>,
) -> Result<(Vec<Bucket>, i64), DeltaError> {
    let total = totals.zigzag()?;
    // Every previous bucket has a change, of at least one byte.
    if previous.len() > deltas.remaining() {
        return Err(DeltaError(format!(
            "{} bucket changes but {} bytes left",
            previous.len(),
            deltas.remaining()
        )));
    }
    let mut changes = Vec::with_capacity(previous.len());
    let mut sum = 0i64;
    for bucket in previous {
        let change = predict(total, bucket.share).wrapping_add(deltas.zigzag()?);
        sum = sum.wrapping_add(change);
        changes.push(change);
    }
    let new_count = gaps.varint()?;
    // Each new bucket takes at least one byte of each column.
    if new_count > gaps.remaining().min(deltas.remaining()) as u64 {
        return Err(DeltaError(format!(
            "{new_count} new buckets but {} gap and {} change bytes left",
            gaps.remaining(),
            deltas.remaining()
        )));
    }
    let mut new = Vec::with_capacity(new_count as usize);
    let mut previous_index: Option<u32> = None;
    let mut known = previous.iter().map(|bucket| bucket.index).peekable();
    for _ in 0..new_count {
        let gap = gaps.varint()?;
        let index = match previous_index {
            None => gap,
            Some(p) => u64::from(p) + 1 + gap,
        };
        if index > u64::from(MAX_BUCKET_INDEX) {
            return Err(DeltaError(format!(
                "bucket index {index} beyond {MAX_BUCKET_INDEX}"
            )));
        }
        let index = index as u32;
        while known.next_if(|&k| k < index).is_some() {}
        if known.peek() == Some(&index) {
            return Err(DeltaError(format!(
                "bucket {index} is listed as new but the histogram has it"
            )));
        }
        let count = deltas.varint()?;
        if count == 0 {
            return Err(DeltaError(format!("new bucket {index} with count 0")));
        }
        sum = sum.wrapping_add(count as i64);
        new.push((index, count));
        previous_index = Some(index);
    }
    if sum != total {
        return Err(DeltaError(format!(
            "bucket changes add up to {sum}, not the total {total}"
        )));
    }
    Ok((next_buckets(previous, &changes, &new, total), total))
}

/// Reads one column.
struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
    column: &'static str,
}

impl<'a> Reader<'a> {
    fn new(bytes: &'a [u8], column: &'static str) -> Self {
        Self {
            bytes,
            at: 0,
            column,
        }
    }

    fn remaining(&self) -> usize {
        self.bytes.len() - self.at
    }

    fn varint(&mut self) -> Result<u64, DeltaError> {
        let mut value = 0u64;
        for shift in (0..64).step_by(7) {
            let Some(&byte) = self.bytes.get(self.at) else {
                return Err(DeltaError(format!("{} ends early", self.column)));
            };
            self.at += 1;
            value |= u64::from(byte & 0x7f) << shift;
            if byte < 0x80 {
                return Ok(value);
            }
        }
        Err(DeltaError(format!("{}: varint too long", self.column)))
    }

    fn zigzag(&mut self) -> Result<i64, DeltaError> {
        let raw = self.varint()?;
        Ok((raw >> 1) as i64 ^ -((raw & 1) as i64))
    }

    fn bytes(&mut self, n: usize) -> Result<&'a [u8], DeltaError> {
        let end = self
            .at
            .checked_add(n)
            .filter(|&end| end <= self.bytes.len());
        let Some(end) = end else {
            return Err(DeltaError(format!("{} ends early", self.column)));
        };
        let slice = &self.bytes[self.at..end];
        self.at = end;
        Ok(slice)
    }

    /// A column with bytes left over does not describe the batch it came with.
    fn finish(&self) -> Result<(), DeltaError> {
        if self.at != self.bytes.len() {
            return Err(DeltaError(format!(
                "{} has {} bytes left over",
                self.column,
                self.bytes.len() - self.at
            )));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
