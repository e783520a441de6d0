//! The chunk codec: one series' points, encoded incrementally in the Gorilla style.
//!
//! Timestamps: the first as 64 raw bits, then the delta-of-delta of each one (`0` for a
//! regular interval; `10`+3 bits, `110`+10, `1110`+20, two's complement, else `1111` + a
//! zig-zag varint).
//! The small classes are narrower than Gorilla's because timestamps are milliseconds and 1 s
//! passes jitter by a few of them. Arithmetic wraps, so any i64 (also out of order)
//! round-trips.
//!
//! Floats: the first as 64 raw bits, then the XOR with the previous value (`0` when equal;
//! `10` + the meaningful bits when they fit the previous leading/trailing-zero window; `11` +
//! 5 bits leading zeros + 6 bits length + the bits otherwise). Bit patterns round-trip exactly
//! (every NaN payload too).
//!
//! Sealed float chunks are re-encoded as scaled integers when that is smaller: when every
//! value is exactly `n / 10^k` for one small `k` (NVML's milliwatts, percentages, integer
//! counts), the integers' deltas or deltas-of-deltas take a few bits where an XOR of their
//! mantissas takes dozens (`FloatDecimal`: 4 bits `k`, 1 bit mode (delta or delta-of-delta),
//! 2 bits class set, then per point the timestamp as above and the first integer as a zig-zag
//! varint, the others in prefix classes of 3/9/16, 6/13/20 or 10/18/28 bits or a varint,
//! whichever set and mode make the chunk smallest).
//!
//! Histograms: per point the count's delta (zig-zag varint), the sum's XOR as for floats, then
//! the non-empty buckets: how many, and for each its index gap from the previous bucket of the
//! point and its count's delta against the same bucket of the previous point (zig-zag varints).
//!
//! A chunk as stored (disk and head snapshots): a format byte (the kind), varints of the point
//! count, the minimum and maximum timestamps (zig-zag), then the payload.

use std::sync::Arc;

use super::{HistogramPoint, Point, PointValue};

/// What a chunk holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChunkKind {
    Float = 1,
    Histogram = 2,
    /// Floats stored as scaled integers (sealed chunks only).
    FloatDecimal = 3,
    /// Floats stored as scaled integers plus, per value, the difference of its bits from the
    /// integer's quotient (sealed chunks only): counters summed from decimal steps in floating
    /// point (5001.969999999999) are a few ulps off a decimal.
    FloatNearDecimal = 4,
}

impl ChunkKind {
    /// The kind of the encoder that appends to (or re-encodes) a chunk of this kind.
    pub fn open_kind(self) -> ChunkKind {
        match self {
            ChunkKind::FloatDecimal | ChunkKind::FloatNearDecimal => ChunkKind::Float,
            kind => kind,
        }
    }
}

/// Why stored chunk bytes cannot be decoded.
#[derive(Debug, thiserror::Error, PartialEq)]
#[error("corrupt chunk: {0}")]
pub struct ChunkError(pub String);

#[derive(Debug, Clone, Default)]
struct BitWriter {
    bytes: Vec<u8>,
    /// Bits used in the last byte (0 = the last byte is full or there is none).
    used: u8,
}

impl BitWriter {
    fn bit(&mut self, bit: bool) {
        if self.used == 0 {
            self.bytes.push(0);
        }
        if bit {
            *self.bytes.last_mut().expect("pushed") |= 0x80 >> self.used;
        }
        self.used = (self.used + 1) % 8;
    }

    /// The low `n` (at most 64) bits of `value`, most significant first: one 16-byte window
    /// per call rather than a loop over bytes (every sample of ingest comes through here).
    fn bits(&mut self, value: u64, n: u8) {
        if n == 0 {
            return;
        }
        let value = if n >= 64 {
            value
        } else {
            value & ((1u64 << n) - 1)
        };
        let used = u32::from(self.used);
        // Bits from the start of the last, partly filled byte (if any) to the end of `value`.
        let total = used + u32::from(n);
        let mut window = u128::from(value) << (128 - total);
        if used > 0 {
            let last = self.bytes.pop().expect("a partly filled byte");
            window |= u128::from(last) << 120;
        }
        let bytes = total.div_ceil(8) as usize;
        self.bytes.extend_from_slice(&window.to_be_bytes()[..bytes]);
        self.used = (total % 8) as u8;
    }

    fn varint(&mut self, mut value: u64) {
        loop {
            let group = value & 0x7f;
            value >>= 7;
            let byte = group | if value > 0 { 0x80 } else { 0 };
            if self.used == 0 {
                self.bytes.push(byte as u8);
            } else {
                self.bits(byte, 8);
            }
            if value == 0 {
                return;
            }
        }
    }
}

struct BitReader<'a> {
    bytes: &'a [u8],
    position: usize,
}

impl BitReader<'_> {
    fn bit(&mut self) -> Result<bool, ChunkError> {
        Ok(self.bits(1)? == 1)
    }

    /// The next `n` (at most 64) bits, most significant first: one 16-byte window per call
    /// rather than a loop over bytes (reads are the hot path of queries).
    fn bits(&mut self, n: u8) -> Result<u64, ChunkError> {
        if n == 0 {
            return Ok(0);
        }
        let end = self.position + n as usize;
        if end > self.bytes.len() * 8 {
            return Err(ChunkError("payload ends early".into()));
        }
        let first = self.position / 8;
        let mut window = [0u8; 16];
        let take = (self.bytes.len() - first).min(16);
        window[..take].copy_from_slice(&self.bytes[first..first + take]);
        let word = u128::from_be_bytes(window) << (self.position % 8);
        self.position = end;
        Ok((word >> (128 - n as u32)) as u64)
    }

    fn varint(&mut self) -> Result<u64, ChunkError> {
        let mut value = 0u64;
        for shift in (0..64).step_by(7) {
            let group = self.bits(8)?;
            value |= (group & 0x7f) << shift;
            if group & 0x80 == 0 {
                return Ok(value);
            }
        }
        Err(ChunkError("varint longer than 64 bits".into()))
    }
}

fn zigzag(value: i64) -> u64 {
    ((value << 1) ^ (value >> 63)) as u64
}

fn unzigzag(value: u64) -> i64 {
    ((value >> 1) as i64) ^ -((value & 1) as i64)
}

/// Sign-extends the low `n` bits.
fn sign_extend(value: u64, n: u8) -> i64 {
    let shift = 64 - n as u32;
    ((value << shift) as i64) >> shift
}

/// A signed integer in the prefix classes `0`, `10`, `110`, `1110`, `1111` with `widths` bits
/// each (the last is 64).
fn write_classed(out: &mut BitWriter, value: i64, widths: [u8; 3]) {
    if value == 0 {
        out.bit(false);
        return;
    }
    for (n, width) in widths.into_iter().enumerate() {
        let half = 1i64 << (width - 1);
        if (-half..half).contains(&value) {
            let prefix = (1u64 << (n + 2)) - 2; // 10, 110, 1110
            out.bits(prefix, n as u8 + 2);
            out.bits(value as u64, width);
            return;
        }
    }
    // Rare large steps (a random counter's jumps): a zig-zag varint, not 64 bits.
    out.bits(0b1111, 4);
    out.varint(zigzag(value));
}

fn read_classed(input: &mut BitReader<'_>, widths: [u8; 3]) -> Result<i64, ChunkError> {
    let mut class = 0;
    while class < 4 && input.bit()? {
        class += 1;
    }
    Ok(match class {
        0 => 0,
        1..=3 => {
            let width = widths[class - 1];
            sign_extend(input.bits(width)?, width)
        }
        _ => unzigzag(input.varint()?),
    })
}

const TIME_CLASSES: [u8; 3] = [3, 10, 20];
/// The class widths a decimal chunk may use (2 bits in its header say which): narrow for
/// quantised random walks (percent steps, whole degrees), wider for noisy rates.
const INT_CLASS_SETS: [[u8; 3]; 3] = [[3, 9, 16], [6, 13, 20], [10, 18, 28]];
/// Largest scale tried for decimal chunks (10^6: micro-units).
const MAX_DECIMAL_SCALE: u32 = 6;

/// Delta-of-delta timestamp state.
#[derive(Debug, Clone, Default)]
struct TimeState {
    previous: i64,
    delta: i64,
}

impl TimeState {
    fn write(&mut self, out: &mut BitWriter, first: bool, time: i64) {
        if first {
            out.bits(time as u64, 64);
        } else {
            let delta = time.wrapping_sub(self.previous);
            write_classed(out, delta.wrapping_sub(self.delta), TIME_CLASSES);
            self.delta = delta;
        }
        self.previous = time;
    }

    fn read(&mut self, input: &mut BitReader<'_>, first: bool) -> Result<i64, ChunkError> {
        let time = if first {
            input.bits(64)? as i64
        } else {
            let dod = read_classed(input, TIME_CLASSES)?;
            self.delta = self.delta.wrapping_add(dod);
            self.previous.wrapping_add(self.delta)
        };
        self.previous = time;
        Ok(time)
    }
}

/// Gorilla XOR float state.
#[derive(Debug, Clone, Default)]
struct XorState {
    previous: u64,
    leading: u8,
    trailing: u8,
    /// Whether a leading/trailing window has been written yet.
    window: bool,
}

impl XorState {
    fn write(&mut self, out: &mut BitWriter, first: bool, value: f64) {
        let bits = value.to_bits();
        if first {
            out.bits(bits, 64);
        } else {
            let xor = bits ^ self.previous;
            if xor == 0 {
                out.bit(false);
            } else {
                let leading = (xor.leading_zeros() as u8).min(31);
                let trailing = xor.trailing_zeros() as u8;
                if self.window && leading >= self.leading && trailing >= self.trailing {
                    out.bits(0b10, 2);
                    let length = 64 - self.leading - self.trailing;
                    out.bits(xor >> self.trailing, length);
                } else {
                    out.bits(0b11, 2);
                    let length = 64 - leading - trailing;
                    out.bits(leading as u64, 5);
                    // 64 does not fit 6 bits; it is written as 0 (a length of 0 never occurs).
                    out.bits((length % 64) as u64, 6);
                    out.bits(xor >> trailing, length);
                    self.leading = leading;
                    self.trailing = trailing;
                    self.window = true;
                }
            }
        }
        self.previous = bits;
    }

    fn read(&mut self, input: &mut BitReader<'_>, first: bool) -> Result<f64, ChunkError> {
        let bits = if first {
            input.bits(64)?
        } else if !input.bit()? {
            self.previous
        } else {
            if input.bit()? {
                let leading = input.bits(5)? as u8;
                let length = match input.bits(6)? as u8 {
                    0 => 64,
                    length => length,
                };
                if leading as u32 + length as u32 > 64 {
                    return Err(ChunkError("float window wider than 64 bits".into()));
                }
                self.leading = leading;
                self.trailing = 64 - leading - length;
                self.window = true;
            } else if !self.window {
                return Err(ChunkError("float window reused before one was set".into()));
            }
            let length = 64 - self.leading - self.trailing;
            let meaningful = input.bits(length)?;
            self.previous ^ (meaningful << self.trailing)
        };
        self.previous = bits;
        Ok(f64::from_bits(bits))
    }
}

/// The open chunk of a series: points are appended and encoded as they come.
#[derive(Debug, Clone)]
pub struct ChunkEncoder {
    kind: ChunkKind,
    count: u32,
    min_time: i64,
    max_time: i64,
    out: BitWriter,
    time: TimeState,
    value: XorState,
    /// Histograms: the previous point's count and buckets.
    previous_count: u64,
    previous_buckets: Vec<(u32, u64)>,
}

impl ChunkEncoder {
    pub fn new(kind: ChunkKind) -> ChunkEncoder {
        ChunkEncoder {
            kind,
            count: 0,
            min_time: i64::MAX,
            max_time: i64::MIN,
            out: BitWriter::default(),
            time: TimeState::default(),
            value: XorState::default(),
            previous_count: 0,
            previous_buckets: Vec::new(),
        }
    }

    pub fn kind(&self) -> ChunkKind {
        self.kind
    }

    pub fn len(&self) -> u32 {
        self.count
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// `(min, max)` timestamp; meaningless when empty.
    pub fn time_range(&self) -> (i64, i64) {
        (self.min_time, self.max_time)
    }

    /// Encoded bytes so far (plus the encoder's own state), for memory accounting.
    pub fn memory_bytes(&self) -> usize {
        std::mem::size_of::<Self>()
            + self.out.bytes.capacity()
            + self.previous_buckets.capacity() * std::mem::size_of::<(u32, u64)>()
    }

    /// Appends a point. A point of the other kind (a float in a histogram chunk or the
    /// reverse) is refused with `false`; the ingest path never stores one.
    pub fn append(&mut self, point: &Point) -> bool {
        let first = self.count == 0;
        match (&point.value, self.kind) {
            (PointValue::Value(value), ChunkKind::Float) => {
                self.time.write(&mut self.out, first, point.time_ms);
                self.value.write(&mut self.out, first, *value);
            }
            (PointValue::Histogram(histogram), ChunkKind::Histogram) => {
                self.time.write(&mut self.out, first, point.time_ms);
                self.out.varint(zigzag(
                    (histogram.count as i64).wrapping_sub(self.previous_count as i64),
                ));
                self.previous_count = histogram.count;
                self.value
                    .write(&mut self.out, first, histogram.sum_seconds);
                self.out.varint(histogram.buckets.len() as u64);
                let mut previous_index = 0u32;
                let mut cursor = 0usize;
                for &(index, count) in &histogram.buckets {
                    self.out
                        .varint(u64::from(index.wrapping_sub(previous_index)));
                    previous_index = index;
                    // The previous point's count in this bucket (buckets are sorted in both).
                    while cursor < self.previous_buckets.len()
                        && self.previous_buckets[cursor].0 < index
                    {
                        cursor += 1;
                    }
                    let before = match self.previous_buckets.get(cursor) {
                        Some(&(i, c)) if i == index => c,
                        _ => 0,
                    };
                    self.out
                        .varint(zigzag((count as i64).wrapping_sub(before as i64)));
                }
                self.previous_buckets.clone_from(&histogram.buckets);
            }
            _ => return false,
        }
        self.count += 1;
        self.min_time = self.min_time.min(point.time_ms);
        self.max_time = self.max_time.max(point.time_ms);
        true
    }

    /// The newest float point, from the encoder's state (no decoding), when the last point
    /// appended is the newest the chunk holds; `None` otherwise or for histogram chunks.
    pub fn last_float(&self) -> Option<(i64, f64)> {
        (self.kind == ChunkKind::Float && self.count > 0 && self.time.previous == self.max_time)
            .then(|| (self.time.previous, f64::from_bits(self.value.previous)))
    }

    /// The chunk as it is now, sealed (the encoder can go on appending).
    pub fn snapshot(&self) -> Chunk {
        Chunk {
            kind: self.kind,
            count: self.count,
            min_time: self.min_time,
            max_time: self.max_time,
            payload: Arc::from(self.out.bytes.as_slice()),
        }
    }

    /// The chunk as it is now, in its smallest form: float chunks are re-encoded as scaled
    /// integers when every value allows it and that is smaller.
    pub fn seal(&self) -> Chunk {
        let gorilla = self.snapshot();
        if self.kind != ChunkKind::Float || self.count < 2 {
            return gorilla;
        }
        let Ok(points) = gorilla.points() else {
            return gorilla;
        };
        let values: Vec<f64> = points
            .iter()
            .filter_map(|p| match p.value {
                PointValue::Value(v) => Some(v),
                PointValue::Histogram(_) => None,
            })
            .collect();
        let (scale, integers, residuals) = match decimal_form(&values) {
            Some((scale, integers)) => (scale, integers, None),
            None => {
                let (scale, integers, residuals) = near_decimal_form(&values);
                (scale, integers, Some(residuals))
            }
        };
        let kind = if residuals.is_some() {
            ChunkKind::FloatNearDecimal
        } else {
            ChunkKind::FloatDecimal
        };
        let mut best = gorilla;
        let modes = [false, true]
            .into_iter()
            .flat_map(|dod| (0..INT_CLASS_SETS.len()).map(move |set| (dod, set)));
        for (dod, set) in modes {
            let classes = INT_CLASS_SETS[set];
            let mut out = BitWriter::default();
            out.bits(u64::from(scale), 4);
            out.bit(dod);
            out.bits(set as u64, 2);
            let mut time = TimeState::default();
            let (mut previous, mut previous_delta) = (0i64, 0i64);
            for (n, (point, &integer)) in points.iter().zip(&integers).enumerate() {
                time.write(&mut out, n == 0, point.time_ms);
                if n == 0 {
                    out.varint(zigzag(integer));
                } else {
                    let delta = integer.wrapping_sub(previous);
                    let value = if dod {
                        delta.wrapping_sub(previous_delta)
                    } else {
                        delta
                    };
                    write_classed(&mut out, value, classes);
                    previous_delta = delta;
                }
                previous = integer;
                if let Some(residuals) = &residuals {
                    // Against the previous value's: summing drifts by about an ulp a step.
                    let change =
                        residuals[n].wrapping_sub(if n == 0 { 0 } else { residuals[n - 1] });
                    out.bit(change != 0);
                    if change != 0 {
                        out.varint(zigzag(change));
                    }
                }
            }
            if out.bytes.len() < best.payload.len() {
                best = Chunk {
                    kind,
                    payload: Arc::from(out.bytes),
                    ..best
                };
            }
        }
        best
    }

    /// Rebuilds an encoder from a stored chunk by re-encoding its points (the encoding is
    /// deterministic, so the result is the same bytes).
    pub fn resume(chunk: &Chunk) -> Result<ChunkEncoder, ChunkError> {
        let kind = chunk.kind.open_kind();
        let mut encoder = ChunkEncoder::new(kind);
        for point in chunk.points()? {
            encoder.append(&point);
        }
        // Every open chunk is resumed at a start: leave no growth slack behind (it grows
        // again as points come).
        encoder.out.bytes.shrink_to_fit();
        Ok(encoder)
    }
}

/// A sealed chunk: encoded points and what is needed to find and decode them.
#[derive(Debug, Clone, PartialEq)]
pub struct Chunk {
    pub kind: ChunkKind,
    pub count: u32,
    pub min_time: i64,
    pub max_time: i64,
    pub payload: Arc<[u8]>,
}

impl Chunk {
    pub fn overlaps(&self, start_ms: i64, end_ms: i64) -> bool {
        self.count > 0 && self.max_time >= start_ms && self.min_time <= end_ms
    }

    /// Every point, in the order appended.
    pub fn points(&self) -> Result<Vec<Point>, ChunkError> {
        // Every point after the first takes at least 2 bits: a larger count is corrupt (and
        // must not size an allocation).
        if self.count as usize > self.payload.len() * 4 + 1 {
            return Err(ChunkError(format!(
                "{} points cannot fit {} bytes",
                self.count,
                self.payload.len()
            )));
        }
        let mut input = BitReader {
            bytes: &self.payload,
            position: 0,
        };
        let mut time = TimeState::default();
        let mut value = XorState::default();
        let mut previous_count = 0u64;
        let mut previous_buckets: Vec<(u32, u64)> = Vec::new();
        // Decimal chunks: (scale, delta-of-delta mode), the class widths, and the integers'
        // state.
        let mut decimal = (0u32, false);
        let mut classes = INT_CLASS_SETS[0];
        let (mut previous_integer, mut previous_delta) = (0i64, 0i64);
        // Near-decimal chunks: the previous value's bits minus its quotient's.
        let mut previous_residual = 0i64;
        let mut points = Vec::with_capacity(self.count as usize);
        for n in 0..self.count {
            let first = n == 0;
            if first
                && matches!(
                    self.kind,
                    ChunkKind::FloatDecimal | ChunkKind::FloatNearDecimal
                )
            {
                // The scale and mode come before the first timestamp.
                decimal = (input.bits(4)? as u32, input.bit()?);
                if decimal.0 > MAX_DECIMAL_SCALE {
                    return Err(ChunkError(format!("decimal scale {}", decimal.0)));
                }
                classes = *INT_CLASS_SETS
                    .get(input.bits(2)? as usize)
                    .ok_or_else(|| ChunkError("unknown integer class set".into()))?;
            }
            let time_ms = time.read(&mut input, first)?;
            let value = match self.kind {
                ChunkKind::Float => PointValue::Value(value.read(&mut input, first)?),
                ChunkKind::FloatDecimal | ChunkKind::FloatNearDecimal => {
                    let integer = if first {
                        unzigzag(input.varint()?)
                    } else {
                        let read = read_classed(&mut input, classes)?;
                        let delta = if decimal.1 {
                            previous_delta.wrapping_add(read)
                        } else {
                            read
                        };
                        previous_delta = delta;
                        previous_integer.wrapping_add(delta)
                    };
                    previous_integer = integer;
                    let quotient = integer as f64 / 10f64.powi(decimal.0 as i32);
                    if self.kind == ChunkKind::FloatNearDecimal {
                        if input.bit()? {
                            previous_residual =
                                previous_residual.wrapping_add(unzigzag(input.varint()?));
                        }
                        PointValue::Value(f64::from_bits(
                            (quotient.to_bits() as i64).wrapping_add(previous_residual) as u64,
                        ))
                    } else {
                        PointValue::Value(quotient)
                    }
                }
                ChunkKind::Histogram => {
                    let count =
                        (previous_count as i64).wrapping_add(unzigzag(input.varint()?)) as u64;
                    previous_count = count;
                    let sum_seconds = value.read(&mut input, first)?;
                    let len = input.varint()?;
                    if len > self.payload.len() as u64 * 8 {
                        return Err(ChunkError(format!("implausible bucket count {len}")));
                    }
                    let mut buckets = Vec::with_capacity(len as usize);
                    let mut index = 0u32;
                    let mut cursor = 0usize;
                    for _ in 0..len {
                        let gap = u32::try_from(input.varint()?)
                            .map_err(|_| ChunkError("bucket index gap too large".into()))?;
                        index = index.wrapping_add(gap);
                        while cursor < previous_buckets.len() && previous_buckets[cursor].0 < index
                        {
                            cursor += 1;
                        }
                        let before = match previous_buckets.get(cursor) {
                            Some(&(i, c)) if i == index => c,
                            _ => 0,
                        };
                        let count = (before as i64).wrapping_add(unzigzag(input.varint()?)) as u64;
                        buckets.push((index, count));
                    }
                    previous_buckets.clone_from(&buckets);
                    PointValue::Histogram(HistogramPoint {
                        count,
                        sum_seconds,
                        buckets,
                    })
                }
            };
            points.push(Point { time_ms, value });
        }
        Ok(points)
    }

    /// The stored form: header, then the payload. (zstd over payloads was tried: bit-packed
    /// deltas leave it nothing to gain, and it slows reads.)
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut header = BitWriter::default();
        header.bits(self.kind as u64, 8);
        header.varint(self.count as u64);
        header.varint(zigzag(self.min_time));
        header.varint(zigzag(self.max_time));
        let mut bytes = header.bytes;
        bytes.extend_from_slice(&self.payload);
        bytes
    }

    pub fn from_bytes(bytes: &[u8]) -> Result<Chunk, ChunkError> {
        let mut input = BitReader { bytes, position: 0 };
        let format = input.bits(8)? as u8;
        let kind = match format {
            1 => ChunkKind::Float,
            2 => ChunkKind::Histogram,
            3 => ChunkKind::FloatDecimal,
            4 => ChunkKind::FloatNearDecimal,
            other => return Err(ChunkError(format!("unknown chunk kind {other}"))),
        };
        let count = u32::try_from(input.varint()?)
            .map_err(|_| ChunkError("point count too large".into()))?;
        let min_time = unzigzag(input.varint()?);
        let max_time = unzigzag(input.varint()?);
        let payload: Arc<[u8]> = Arc::from(&bytes[input.position / 8..]);
        Ok(Chunk {
            kind,
            count,
            min_time,
            max_time,
            payload,
        })
    }
}

/// A column of floats (rollups): scaled integers as zig-zag varint deltas when every value
/// allows it (a scale byte first), else Gorilla XOR (`0xff` first).
pub fn encode_float_column(values: &[f64]) -> Vec<u8> {
    let mut out = BitWriter::default();
    match decimal_form(values) {
        Some((scale, integers)) => {
            out.bits(u64::from(scale), 8);
            let mut previous = 0i64;
            for integer in integers {
                out.varint(zigzag(integer.wrapping_sub(previous)));
                previous = integer;
            }
        }
        None => {
            out.bits(0xff, 8);
            let mut state = XorState::default();
            for (n, value) in values.iter().enumerate() {
                state.write(&mut out, n == 0, *value);
            }
        }
    }
    out.bytes
}

pub fn decode_float_column(bytes: &[u8], len: usize) -> Result<Vec<f64>, ChunkError> {
    let mut input = BitReader { bytes, position: 0 };
    let scale = input.bits(8)? as u32;
    if len > bytes.len() * 8 {
        return Err(ChunkError(format!(
            "{len} values cannot fit {} bytes",
            bytes.len()
        )));
    }
    let mut values = Vec::with_capacity(len);
    if scale == 0xff {
        let mut state = XorState::default();
        for n in 0..len {
            values.push(state.read(&mut input, n == 0)?);
        }
    } else if scale <= MAX_DECIMAL_SCALE {
        let factor = 10f64.powi(scale as i32);
        let mut previous = 0i64;
        for _ in 0..len {
            previous = previous.wrapping_add(unzigzag(input.varint()?));
            values.push(previous as f64 / factor);
        }
    } else {
        return Err(ChunkError(format!("column scale {scale}")));
    }
    Ok(values)
}

/// A column of integers as zig-zag varint deltas.
pub fn encode_int_column(values: &[i64]) -> Vec<u8> {
    let mut out = BitWriter::default();
    let mut previous = 0i64;
    for value in values {
        out.varint(zigzag(value.wrapping_sub(previous)));
        previous = *value;
    }
    out.bytes
}

pub fn decode_int_column(bytes: &[u8], len: usize) -> Result<Vec<i64>, ChunkError> {
    if len > bytes.len() {
        return Err(ChunkError(format!(
            "{len} integers cannot fit {} bytes",
            bytes.len()
        )));
    }
    let mut input = BitReader { bytes, position: 0 };
    let mut previous = 0i64;
    (0..len)
        .map(|_| {
            previous = previous.wrapping_add(unzigzag(input.varint()?));
            Ok(previous)
        })
        .collect()
}

/// The smallest scale `k` at which every value is exactly an integer over `10^k`, with those
/// integers; `None` when there is none (NaN, -0.0, too many digits or too large).
fn decimal_form(values: &[f64]) -> Option<(u32, Vec<i64>)> {
    const LIMIT: f64 = (1u64 << 53) as f64;
    let exact_at = |value: f64, scale: u32| -> Option<i64> {
        let factor = 10f64.powi(scale as i32);
        let scaled = (value * factor).round();
        // Checked as decoding computes it: from the integer (so -0.0 is refused).
        let integer = scaled as i64;
        (scaled.abs() < LIMIT && (integer as f64 / factor).to_bits() == value.to_bits())
            .then_some(integer)
    };
    let mut scale = 0;
    for &value in values {
        while exact_at(value, scale).is_none() {
            scale += 1;
            if scale > MAX_DECIMAL_SCALE {
                return None;
            }
        }
    }
    let integers = values
        .iter()
        .map(|&value| exact_at(value, scale))
        .collect::<Option<Vec<_>>>()?;
    Some((scale, integers))
}

/// For values with no exact decimal form: the scale, the rounded integers and each value's
/// bits minus its integer's quotient's bits (wrapping, so every value round-trips, NaN and
/// infinities included, however large the difference; stored as the change from the previous
/// value's). The scale is the one whose integer
/// deltas and residuals look cheapest (a rough bit count; `seal` measures the real size).
fn near_decimal_form(values: &[f64]) -> (u32, Vec<i64>, Vec<i64>) {
    const LIMIT: f64 = (1u64 << 53) as f64;
    let form = |scale: u32| -> (Vec<i64>, Vec<i64>) {
        let factor = 10f64.powi(scale as i32);
        values
            .iter()
            .map(|&value| {
                let scaled = (value * factor).round();
                let integer = if scaled.abs() < LIMIT {
                    scaled as i64
                } else {
                    0
                };
                let quotient = integer as f64 / factor;
                (
                    integer,
                    (value.to_bits() as i64).wrapping_sub(quotient.to_bits() as i64),
                )
            })
            .unzip()
    };
    let bits = |value: i64| 64 - zigzag(value).leading_zeros();
    let cost = |(integers, residuals): &(Vec<i64>, Vec<i64>)| -> u64 {
        let deltas: u64 = integers
            .windows(2)
            .map(|pair| u64::from(bits(pair[1].wrapping_sub(pair[0]))))
            .sum();
        let residuals: u64 = std::iter::once(0)
            .chain(residuals.iter().copied())
            .collect::<Vec<_>>()
            .windows(2)
            .map(|pair| pair[1].wrapping_sub(pair[0]))
            .map(|r| if r == 0 { 1 } else { 2 + u64::from(bits(r)) })
            .sum();
        deltas + residuals
    };
    let (scale, (integers, residuals)) = (0..=MAX_DECIMAL_SCALE)
        .map(|scale| (scale, form(scale)))
        .min_by_key(|(_, form)| cost(form))
        .expect("scales to try");
    (scale, integers, residuals)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn floats(points: &[(i64, f64)]) -> Vec<Point> {
        points
            .iter()
            .map(|&(time_ms, v)| Point {
                time_ms,
                value: PointValue::Value(v),
            })
            .collect()
    }

    fn round_trip(kind: ChunkKind, points: &[Point]) -> Vec<Point> {
        let mut encoder = ChunkEncoder::new(kind);
        for point in points {
            assert!(encoder.append(point));
        }
        let stored = Chunk::from_bytes(&encoder.snapshot().to_bytes()).unwrap();
        assert_eq!(stored.count as usize, points.len());
        let resumed = ChunkEncoder::resume(&stored).unwrap();
        assert_eq!(resumed.snapshot(), encoder.snapshot());
        // The sealed form (maybe decimal) decodes to the same points.
        let sealed = Chunk::from_bytes(&encoder.seal().to_bytes()).unwrap();
        assert!(sealed.payload.len() <= stored.payload.len());
        let from_sealed = sealed.points().unwrap();
        let from_stored = stored.points().unwrap();
        assert_eq!(format!("{from_sealed:?}"), format!("{from_stored:?}"));
        assert_eq!(
            ChunkEncoder::resume(&sealed).unwrap().snapshot(),
            encoder.snapshot()
        );
        from_stored
    }

    fn bits_of(points: &[Point]) -> Vec<(i64, u64)> {
        points
            .iter()
            .map(|p| match p.value {
                PointValue::Value(v) => (p.time_ms, v.to_bits()),
                PointValue::Histogram(_) => panic!("float expected"),
            })
            .collect()
    }

    #[test]
    fn bit_writes_of_every_width_and_varints_read_back_at_every_alignment() {
        let mut writer = BitWriter::default();
        let mut expected = Vec::new();
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        for k in 0..5000u64 {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let n = (state >> 58) as u8 + 1; // 1..=64
            let value = state.rotate_left(k as u32 % 64);
            if k % 3 == 0 {
                writer.varint(value >> (k % 64));
                expected.push((0u8, value >> (k % 64)));
            } else {
                writer.bits(value, n);
                let masked = if n == 64 {
                    value
                } else {
                    value & ((1 << n) - 1)
                };
                expected.push((n, masked));
            }
        }
        let mut reader = BitReader {
            bytes: &writer.bytes,
            position: 0,
        };
        for (n, value) in expected {
            let read = if n == 0 {
                reader.varint().unwrap()
            } else {
                reader.bits(n).unwrap()
            };
            assert_eq!(read, value, "{n} bits");
        }
    }

    #[test]
    fn floats_round_trip_bit_for_bit_with_irregular_times() {
        let quiet_nan = f64::from_bits(0x7ff8_0000_0000_0001);
        let signalling_nan = f64::from_bits(0x7ff0_0000_0000_0042);
        let points = floats(&[
            (1_700_000_000_000, 1.0),
            (1_700_000_001_000, 1.0),
            (1_700_000_002_003, 312.457),
            (1_700_000_002_999, -0.0),
            (1_700_000_010_000, quiet_nan),
            (1_700_000_009_000, signalling_nan), // out of order
            (1_700_000_009_000, f64::INFINITY),
            (i64::MIN, f64::MIN_POSITIVE),
            (i64::MAX, f64::MAX),
            (0, 5e-324),
            (86_400_000, 123_456_789.125),
        ]);
        assert_eq!(
            bits_of(&round_trip(ChunkKind::Float, &points)),
            bits_of(&points)
        );
    }

    #[test]
    fn counters_and_random_floats_round_trip() {
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let mut total = 0.0;
        let mut points = Vec::new();
        for n in 0..500i64 {
            total += (next() % 1000) as f64;
            points.push((n * 1000 + (next() % 7) as i64, total));
            points.push((n * 1000 + 500, f64::from_bits(next())));
        }
        let points = floats(&points);
        assert_eq!(
            bits_of(&round_trip(ChunkKind::Float, &points)),
            bits_of(&points)
        );
    }

    #[test]
    fn histograms_round_trip() {
        let point = |time_ms, count, sum, buckets: &[(u32, u64)]| Point {
            time_ms,
            value: PointValue::Histogram(HistogramPoint {
                count,
                sum_seconds: sum,
                buckets: buckets.to_vec(),
            }),
        };
        let points = vec![
            point(1_000, 0, 0.0, &[]),
            point(2_000, 3, 0.25, &[(10, 1), (12, 2)]),
            point(3_000, 7, 0.5, &[(9, 1), (10, 1), (12, 5)]),
            point(4_000, 7, 0.5, &[(9, 1), (10, 1), (12, 5)]),
            point(5_500, 2, 0.01, &[(400, 2)]), // a reset
            point(4_000, u64::MAX, f64::NAN, &[(0, u64::MAX), (u32::MAX, 1)]),
        ];
        let back = round_trip(ChunkKind::Histogram, &points);
        assert_eq!(back[..5], points[..5]);
        match (&back[5].value, &points[5].value) {
            (PointValue::Histogram(a), PointValue::Histogram(b)) => {
                assert_eq!((a.count, &a.buckets), (b.count, &b.buckets));
                assert_eq!(a.sum_seconds.to_bits(), b.sum_seconds.to_bits());
            }
            _ => panic!("histograms expected"),
        }
    }

    #[test]
    fn a_point_of_the_other_kind_is_refused() {
        let mut encoder = ChunkEncoder::new(ChunkKind::Histogram);
        assert!(!encoder.append(&floats(&[(1, 1.0)])[0]));
        assert!(encoder.is_empty());
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        assert!(Chunk::from_bytes(&[]).is_err());
        assert!(Chunk::from_bytes(&[7, 1, 0, 0]).is_err());
        let chunk = Chunk::from_bytes(&[1, 100, 0, 0, 0xff]).unwrap();
        assert!(chunk.points().is_err());
        let mut state = 1u64;
        for len in 0..200 {
            let bytes: Vec<u8> = (0..len)
                .map(|_| {
                    state = state.wrapping_mul(6364136223846793005).wrapping_add(1);
                    (state >> 56) as u8
                })
                .collect();
            if let Ok(chunk) = Chunk::from_bytes(&bytes) {
                let _ = chunk.points();
            }
        }
    }

    #[test]
    fn near_decimal_values_seal_smaller_and_bit_for_bit() {
        // A counter summed from 0.01 steps in floating point drifts off the decimals.
        let mut total = 5000.0f64;
        let mut points = Vec::new();
        for n in 0..120i64 {
            total += [0.01, 0.97, 0.96, 0.83, 1.0][n as usize % 5];
            points.push((n * 1000 + n % 3, total));
        }
        let seal = |points: &[Point]| {
            let mut encoder = ChunkEncoder::new(ChunkKind::Float);
            for point in points {
                assert!(encoder.append(point));
            }
            (encoder.snapshot(), encoder.seal())
        };
        let (gorilla, sealed) = seal(&floats(&points));
        assert_eq!(sealed.kind, ChunkKind::FloatNearDecimal);
        assert!(
            sealed.payload.len() * 3 < gorilla.payload.len(),
            "{} vs {} bytes",
            sealed.payload.len(),
            gorilla.payload.len()
        );
        let back = Chunk::from_bytes(&sealed.to_bytes())
            .unwrap()
            .points()
            .unwrap();
        assert_eq!(bits_of(&back), bits_of(&floats(&points)));
        // Odd values among them: every one must come back with its exact bits.
        points[7].1 = f64::NAN;
        points[8].1 = -0.0;
        points[9].1 = f64::INFINITY;
        points[10].1 = 1e300;
        points[11].1 = -5001.969999999999;
        points[12].1 = f64::from_bits(0x7ff8_dead_beef_0001);
        let points = floats(&points);
        let (_, sealed) = seal(&points);
        assert_eq!(sealed.kind, ChunkKind::FloatNearDecimal);
        let back = Chunk::from_bytes(&sealed.to_bytes())
            .unwrap()
            .points()
            .unwrap();
        assert_eq!(bits_of(&back), bits_of(&points));
        // A sealed chunk resumes as an open float chunk.
        let resumed = ChunkEncoder::resume(&sealed).unwrap();
        assert_eq!(resumed.snapshot().points().unwrap().len(), 120);
    }

    #[test]
    fn decimal_values_seal_as_scaled_integers_bit_for_bit() {
        let mut points = Vec::new();
        for n in 0..120i64 {
            let milliwatts = 300_000 + (n * 7919) % 5_000;
            points.push((n * 1000 + n % 3, milliwatts as f64 / 1000.0));
        }
        let points = floats(&points);
        let mut encoder = ChunkEncoder::new(ChunkKind::Float);
        for point in &points {
            encoder.append(point);
        }
        let sealed = encoder.seal();
        assert_eq!(sealed.kind, ChunkKind::FloatDecimal);
        assert!(sealed.payload.len() * 2 < encoder.snapshot().payload.len());
        assert_eq!(
            bits_of(
                &Chunk::from_bytes(&sealed.to_bytes())
                    .unwrap()
                    .points()
                    .unwrap()
            ),
            bits_of(&points)
        );
        // One value with too many digits (or -0.0) makes it a near-decimal chunk (that value
        // carries its difference), still bit for bit.
        for odd in [1.0 / 3.0, -0.0] {
            let mut encoder = ChunkEncoder::new(ChunkKind::Float);
            let some: Vec<Point> = points
                .iter()
                .take(10)
                .chain(&floats(&[(99_000, odd)]))
                .cloned()
                .collect();
            for point in &some {
                encoder.append(point);
            }
            let sealed = encoder.seal();
            assert_eq!(sealed.kind, ChunkKind::FloatNearDecimal);
            assert_eq!(bits_of(&sealed.points().unwrap()), bits_of(&some));
        }
        // Class edges of the integer and timestamp encodings.
        let edges = [
            0i64,
            31,
            -32,
            32,
            -33,
            4095,
            -4096,
            4096,
            524_287,
            -524_288,
            1 << 40,
        ];
        let mut points = Vec::new();
        let (mut time, mut value) = (0i64, 0i64);
        for (n, edge) in edges.iter().enumerate() {
            time += 1000 + edge.clamp(&-600_000, &600_000);
            value += edge;
            points.push((time + n as i64, value as f64));
        }
        let points = floats(&points);
        assert_eq!(
            bits_of(&round_trip(ChunkKind::Float, &points)),
            bits_of(&points)
        );
    }
}
