use super::*;

/// splitmix64: deterministic test data without a dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// Values that stress every code: specials, integers, decimals, arbitrary doubles.
fn interesting_value(rng: &mut Rng, previous: f64) -> f64 {
    match rng.below(14) {
        0 => previous,
        1 => f64::NAN,
        2 => -0.0,
        3 => 0.0,
        4 => f64::INFINITY,
        5 => f64::NEG_INFINITY,
        6 => f64::from_bits(rng.next()),
        7 => f64::MIN_POSITIVE / 3.0,
        8 => (rng.below(1 << 40) as f64) - (1u64 << 39) as f64,
        9 => rng.below(100_000) as f64 / 1000.0,
        10 => previous + rng.below(1000) as f64,
        11 => 9_007_199_254_740_993.0 * (rng.below(4) as f64),
        12 => rng.below(1_000_000_000_000) as f64 / 1e9,
        _ => previous * 1.000_001,
    }
}

fn histogram(rng: &mut Rng, id: u64, previous: Option<&Histogram>) -> Histogram {
    // Running totals that mostly grow, sometimes reset, with buckets coming and going.
    let mut buckets: Vec<(u32, u64)> = match previous {
        Some(h) if rng.below(20) != 0 => {
            let mut index = 0;
            h.bucket_index_deltas
                .iter()
                .zip(&h.bucket_counts)
                .map(|(d, c)| {
                    index += d;
                    (index, *c)
                })
                .collect()
        }
        _ => Vec::new(),
    };
    for _ in 0..rng.below(6) {
        let index = rng.below(500) as u32;
        let bits = rng.below(40);
        let add = rng.below(1 << bits);
        match buckets.iter_mut().find(|(i, _)| *i == index) {
            Some((_, count)) => *count += add,
            None if add > 0 => buckets.push((index, add)),
            None => {}
        }
    }
    if rng.below(10) == 0 && !buckets.is_empty() {
        let drop = rng.below(buckets.len() as u64) as usize;
        buckets.remove(drop);
    }
    buckets.sort();
    let mut previous_index = 0;
    let mut bucket_index_deltas = Vec::new();
    let mut bucket_counts = Vec::new();
    for (index, count) in &buckets {
        bucket_index_deltas.push(index - previous_index);
        bucket_counts.push(*count);
        previous_index = *index;
    }
    let sum_ns: u64 = rng.below(1 << 50);
    Histogram {
        series_id: id,
        time_delta_ms: rng.below(2000) as i64 - 1000,
        count: bucket_counts.iter().sum(),
        sum_seconds: if rng.below(5) == 0 {
            f64::from_bits(rng.next())
        } else {
            sum_ns as f64 / 1e9
        },
        bucket_index_deltas,
        bucket_counts,
    }
}

fn same_samples(a: &[Sample], b: &[Sample]) -> bool {
    a.len() == b.len()
        && a.iter().zip(b).all(|(x, y)| {
            x.series_id == y.series_id
                && x.time_delta_ms == y.time_delta_ms
                && x.value.to_bits() == y.value.to_bits()
        })
}

fn same_histograms(a: &[Histogram], b: &[Histogram]) -> bool {
    a.len() == b.len()
        && a.iter().zip(b).all(|(x, y)| {
            x.series_id == y.series_id
                && x.time_delta_ms == y.time_delta_ms
                && x.count == y.count
                && x.sum_seconds.to_bits() == y.sum_seconds.to_bits()
                && x.bucket_index_deltas == y.bucket_index_deltas
                && x.bucket_counts == y.bucket_counts
        })
}

#[test]
fn every_value_and_histogram_comes_back_bit_for_bit_over_a_long_stream() {
    let mut rng = Rng(7);
    let mut encoder = DeltaEncoder::new();
    let mut decoder = DeltaDecoder::new(100_000);
    let mut last_values: HashMap<u64, f64> = HashMap::new();
    let mut last_histograms: HashMap<u64, Histogram> = HashMap::new();
    // Long enough for several sweeps; series come and go so forgetting is exercised.
    for batch_number in 0..3000u64 {
        let live_from = batch_number / 300 * 40;
        let mut samples = Vec::new();
        for id in live_from..live_from + 60 {
            if rng.below(4) == 0 {
                continue;
            }
            let previous = last_values.get(&id).copied().unwrap_or(0.0);
            let value = interesting_value(&mut rng, previous);
            last_values.insert(id, value);
            samples.push(Sample {
                series_id: id,
                time_delta_ms: rng.below(3) as i64 - 1,
                value,
            });
        }
        let mut histograms = Vec::new();
        for id in 1_000_000 + live_from..1_000_000 + live_from + 12 {
            if rng.below(3) == 0 {
                continue;
            }
            let h = histogram(&mut rng, id, last_histograms.get(&id));
            last_histograms.insert(id, h.clone());
            histograms.push(h);
        }
        // A series twice in one batch is coded against its first appearance.
        if let Some(first) = samples.first().cloned() {
            samples.push(Sample {
                value: first.value + 1.5,
                ..first
            });
        }
        let original = Batch {
            sequence: batch_number + 1,
            samples: samples.clone(),
            histograms: histograms.clone(),
            ..Default::default()
        };
        let mut wire = original.clone();
        encoder.encode(&mut wire);
        assert!(wire.samples.is_empty() && wire.histograms.is_empty());
        let mut decoded = wire.clone();
        decoder.decode(&mut decoded).unwrap();
        assert!(decoded.delta.is_none());
        assert!(
            same_samples(&decoded.samples, &original.samples),
            "batch {batch_number}: samples differ"
        );
        assert!(
            same_histograms(&decoded.histograms, &original.histograms),
            "batch {batch_number}: histograms differ"
        );
    }
    // Forgetting kept the state near the live set, not every series ever seen.
    assert!(
        encoder.state.series_count() < 300,
        "{}",
        encoder.state.series_count()
    );
    assert_eq!(encoder.state.series_count(), decoder.state.series_count());
}

#[test]
fn steady_readings_take_little_room() {
    let mut encoder = DeltaEncoder::new();
    let batch = |n: u64| Batch {
        samples: (0..1000)
            .map(|id| Sample {
                series_id: id,
                time_delta_ms: 0,
                // Constants, counters and decimals.
                value: match id % 3 {
                    0 => 700.0,
                    1 => 4.0e12 + n as f64 * 1000.0,
                    _ => (560_000 + n * 7 % 13) as f64 / 1000.0,
                },
            })
            .collect(),
        ..Default::default()
    };
    let mut first = batch(0);
    encoder.encode(&mut first);
    let mut second = batch(1);
    encoder.encode(&mut second);
    let block = second.delta.unwrap();
    // One code byte per value, and payloads of at most a few bytes for the changes.
    assert_eq!(block.sample_kinds.len(), 1000);
    assert!(
        block.sample_payloads.len() < 2000,
        "{}",
        block.sample_payloads.len()
    );
    assert!(
        block
            .sample_kinds
            .iter()
            .filter(|&&k| k == code::SAME)
            .count()
            >= 333
    );
}

#[test]
fn malformed_histograms_stay_plain() {
    let mut encoder = DeltaEncoder::new();
    let bad = [
        Histogram {
            series_id: 1,
            bucket_index_deltas: vec![1, 2],
            bucket_counts: vec![1],
            ..Default::default()
        },
        Histogram {
            series_id: 2,
            bucket_index_deltas: vec![1, 0],
            bucket_counts: vec![1, 1],
            ..Default::default()
        },
        Histogram {
            series_id: 3,
            bucket_index_deltas: vec![4],
            bucket_counts: vec![0],
            ..Default::default()
        },
    ];
    let mut batch = Batch {
        histograms: bad.to_vec(),
        ..Default::default()
    };
    encoder.encode(&mut batch);
    assert_eq!(batch.histograms, bad.to_vec());
    assert!(batch.delta.is_none());
}

fn encoded_pair() -> (Batch, Batch) {
    let mut encoder = DeltaEncoder::new();
    let mut rng = Rng(3);
    let make = |rng: &mut Rng| Batch {
        samples: (1..20)
            .map(|id| Sample {
                series_id: id,
                time_delta_ms: 0,
                value: interesting_value(rng, 1.0),
            })
            .collect(),
        histograms: (100..105).map(|id| histogram(rng, id, None)).collect(),
        ..Default::default()
    };
    let mut first = make(&mut rng);
    encoder.encode(&mut first);
    let mut second = make(&mut rng);
    encoder.encode(&mut second);
    (first, second)
}

#[test]
fn broken_blocks_are_errors_not_panics() {
    let (first, _) = encoded_pair();
    let block = *first.delta.clone().unwrap();
    let mut cases: Vec<(&str, DeltaBlock)> = Vec::new();
    let mut b = block.clone();
    b.sample_payloads.pop();
    cases.push(("ends early", b));
    let mut b = block.clone();
    b.sample_kinds[0] = 200;
    cases.push(("unknown value code", b));
    let mut b = block.clone();
    b.sample_count = u32::MAX;
    cases.push(("sample_count", b));
    let mut b = block.clone();
    b.sample_series.push(0);
    cases.push(("left over", b));
    let mut b = block.clone();
    b.histogram_count = 1_000_000;
    cases.push(("histogram_count", b));
    let mut b = block.clone();
    b.histogram_bucket_gaps = vec![0xff, 0xff, 0xff, 0xff, 0x0f];
    cases.push(("new buckets", b));
    let mut b = block.clone();
    b.histogram_totals[0] ^= 2;
    cases.push(("add up to", b));
    let mut b = block.clone();
    b.histogram_bucket_changes
        .truncate(b.histogram_bucket_changes.len() - 1);
    cases.push(("histogram_bucket_changes", b));
    let mut b = block.clone();
    b.sample_series = vec![0xff; 11];
    cases.push(("varint too long", b));
    for (expected, block) in cases {
        let mut decoder = DeltaDecoder::new(1000);
        let mut batch = Batch {
            delta: Some(Box::new(block)),
            ..Default::default()
        };
        let error = decoder.decode(&mut batch).unwrap_err();
        assert!(
            error.to_string().contains(expected),
            "{expected}: got {error}"
        );
    }
    // Arbitrary bytes in every column: never a panic.
    let mut rng = Rng(11);
    for _ in 0..2000 {
        let mut bytes = |n: u64| {
            let len = rng.below(n);
            (0..len).map(|_| rng.next() as u8).collect()
        };
        let block = DeltaBlock {
            sample_count: 4,
            sample_series: bytes(12),
            sample_times: bytes(12),
            sample_kinds: bytes(8),
            sample_payloads: bytes(40),
            histogram_count: 2,
            histogram_series: bytes(6),
            histogram_times: bytes(6),
            histogram_counts: bytes(6),
            histogram_sum_kinds: bytes(4),
            histogram_sum_payloads: bytes(20),
            histogram_totals: bytes(6),
            histogram_bucket_gaps: bytes(15),
            histogram_bucket_changes: bytes(30),
        };
        let _ = DeltaDecoder::new(1000).decode(&mut Batch {
            delta: Some(Box::new(block)),
            ..Default::default()
        });
    }
}

#[test]
fn a_decoder_that_missed_a_batch_is_caught_or_differs_but_a_new_stream_starts_clean() {
    let (first, second) = encoded_pair();
    // A fresh decoder given only the second batch decodes against zeros: values differ (this
    // is why the aggregator must decode every batch of a stream and end it on any error).
    let mut fresh = DeltaDecoder::new(1000);
    let mut late = second.clone();
    let outcome = fresh.decode(&mut late);
    let mut reference = DeltaDecoder::new(1000);
    let mut a = first.clone();
    reference.decode(&mut a).unwrap();
    let mut b = second.clone();
    reference.decode(&mut b).unwrap();
    assert!(outcome.is_err() || !same_samples(&late.samples, &b.samples));
}

#[test]
fn the_state_is_bounded() {
    let mut encoder = DeltaEncoder::new();
    let mut batch = Batch {
        samples: (0..50)
            .map(|id| Sample {
                series_id: id,
                time_delta_ms: 0,
                value: 1.0,
            })
            .collect(),
        ..Default::default()
    };
    encoder.encode(&mut batch);
    let error = DeltaDecoder::new(10).decode(&mut batch).unwrap_err();
    assert!(error.to_string().contains("exceed 10 series"), "{error}");
}
