//! Prometheus remote-write 1.0 messages (`prometheus/prompb/remote.proto` and `types.proto`,
//! the float-sample subset) and their wire encoding: protobuf, snappy block-compressed, sent
//! with `Content-Encoding: snappy`, `Content-Type: application/x-protobuf` and
//! `X-Prometheus-Remote-Write-Version: 0.1.0`.

use prost::Message;

#[derive(Clone, PartialEq, Message)]
pub struct WriteRequest {
    #[prost(message, repeated, tag = "1")]
    pub timeseries: Vec<TimeSeries>,
}

#[derive(Clone, PartialEq, Message)]
pub struct TimeSeries {
    /// Sorted by name; `__name__` holds the metric name.
    #[prost(message, repeated, tag = "1")]
    pub labels: Vec<Label>,
    /// Oldest first.
    #[prost(message, repeated, tag = "2")]
    pub samples: Vec<Sample>,
}

#[derive(Clone, PartialEq, Message)]
pub struct Label {
    #[prost(string, tag = "1")]
    pub name: String,
    #[prost(string, tag = "2")]
    pub value: String,
}

#[derive(Clone, PartialEq, Message)]
pub struct Sample {
    #[prost(double, tag = "1")]
    pub value: f64,
    /// Milliseconds since the Unix epoch.
    #[prost(int64, tag = "2")]
    pub timestamp: i64,
}

/// The HTTP body of a remote-write request: the protobuf, snappy block-compressed.
pub fn encode(request: &WriteRequest) -> Vec<u8> {
    compress(&request.encode_to_vec())
}

/// Snappy block compression of an already encoded `WriteRequest` (the queue keeps records
/// encoded, and encoded requests concatenate into one).
pub fn compress(encoded: &[u8]) -> Vec<u8> {
    snap::raw::Encoder::new()
        .compress_vec(encoded)
        .expect("snappy compresses any input below 4 GiB")
}

/// Reads a remote-write body (snappy block, then protobuf).
pub fn decode(body: &[u8]) -> Result<WriteRequest, String> {
    let raw = snap::raw::Decoder::new()
        .decompress_vec(body)
        .map_err(|e| format!("not snappy-compressed: {e}"))?;
    WriteRequest::decode(raw.as_slice()).map_err(|e| format!("not a remote-write request: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips() {
        let request = WriteRequest {
            timeseries: vec![TimeSeries {
                labels: vec![Label {
                    name: "__name__".into(),
                    value: "vigil_gpu_utilization_ratio".into(),
                }],
                samples: vec![Sample {
                    value: 0.5,
                    timestamp: 1_700_000_000_000,
                }],
            }],
        };
        assert_eq!(decode(&encode(&request)).unwrap(), request);
        assert!(decode(b"garbage").is_err());
    }
}
