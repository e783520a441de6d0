//! The Prometheus HTTP query API (`/api/v1/...`), in Prometheus's shapes so Grafana and
//! `promtool query` work against the aggregator: GET or POST (form) for every query endpoint,
//! RFC 3339 or Unix-seconds times, `15s`-style or float-seconds durations, `match[]`.
//! With a tokens file, every `/api/v1` call needs a `reader` or `admin` bearer token.

use std::{
    fmt::Write as _,
    time::{SystemTime, UNIX_EPOCH},
};

use axum::{
    Router,
    body::Bytes,
    extract::{FromRequestParts, Path, State},
    http::{HeaderMap, StatusCode, Uri, header, request::Parts},
    response::{IntoResponse, Response},
    routing::get,
};

use super::HttpState;
use crate::{
    query::{
        FloatHistogram, Matcher, QueryError, SampleValue, Value, format_value, parse_selector,
    },
    security::Role,
};

pub fn routes() -> Router<HttpState> {
    Router::new()
        .route("/api/v1/query", get(query).post(query))
        .route("/api/v1/query_range", get(query_range).post(query_range))
        .route("/api/v1/series", get(series).post(series))
        .route("/api/v1/labels", get(labels).post(labels))
        .route("/api/v1/label/{name}/values", get(label_values))
        .route("/api/v1/status/buildinfo", get(buildinfo))
        .route("/api/v1/metadata", get(metadata))
        .route("/-/healthy", get(healthy))
        .route("/-/ready", get(ready))
}

/// An API failure, answered in Prometheus's error shape.
pub struct ApiError {
    status: StatusCode,
    error_type: &'static str,
    message: String,
}

impl ApiError {
    fn bad_data(message: impl Into<String>) -> ApiError {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            error_type: "bad_data",
            message: message.into(),
        }
    }
}

impl From<QueryError> for ApiError {
    fn from(error: QueryError) -> ApiError {
        let status = match error {
            QueryError::BadData(_) => StatusCode::BAD_REQUEST,
            QueryError::Execution(_) => StatusCode::UNPROCESSABLE_ENTITY,
            QueryError::Timeout(_) => StatusCode::SERVICE_UNAVAILABLE,
        };
        ApiError {
            status,
            error_type: error.error_type(),
            message: error.to_string(),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = serde_json::json!({
            "status": "error",
            "errorType": self.error_type,
            "error": self.message,
        });
        (self.status, json_headers(), body.to_string()).into_response()
    }
}

fn json_headers() -> [(header::HeaderName, &'static str); 1] {
    [(header::CONTENT_TYPE, "application/json")]
}

/// `{"status":"success","data":<data>}` with `data` already JSON.
fn success(data: &str) -> Response {
    (
        StatusCode::OK,
        json_headers(),
        format!("{{\"status\":\"success\",\"data\":{data}}}"),
    )
        .into_response()
}

/// A caller allowed to read: anyone without a tokens file, else a bearer token of role
/// `reader` or `admin`. The token itself is never logged or echoed.
pub struct Reader;

impl FromRequestParts<HttpState> for Reader {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &HttpState) -> Result<Reader, ApiError> {
        let Some(tokens) = &state.tokens else {
            return Ok(Reader);
        };
        let unauthorized = |message: &str| ApiError {
            status: StatusCode::UNAUTHORIZED,
            error_type: "unauthorized",
            message: message.to_owned(),
        };
        let presented = parts
            .headers
            .get(header::AUTHORIZATION)
            .and_then(|value| value.to_str().ok())
            .and_then(|value| {
                value
                    .strip_prefix("Bearer ")
                    .or_else(|| value.strip_prefix("bearer "))
            })
            .map(str::trim)
            .ok_or_else(|| unauthorized("missing bearer token (Authorization: Bearer <token>)"))?;
        match tokens.find(presented) {
            Some(entry) if matches!(entry.role, Role::Reader | Role::Admin) => Ok(Reader),
            Some(entry) => {
                tracing::warn!(token = %entry.name, "query API refused a token without the reader or admin role");
                Err(unauthorized(
                    "this token's role cannot read; the query API needs a reader or admin token",
                ))
            }
            None => Err(unauthorized("unknown bearer token")),
        }
    }
}

/// The parameters of a request: the URL's query string, plus a urlencoded POST body.
struct Params(Vec<(String, String)>);

impl Params {
    fn of(uri: &Uri, headers: &HeaderMap, body: &Bytes) -> Result<Params, ApiError> {
        let mut pairs: Vec<(String, String)> = match uri.query() {
            Some(query) => serde_urlencoded::from_str(query)
                .map_err(|error| ApiError::bad_data(format!("invalid query string: {error}")))?,
            None => Vec::new(),
        };
        let form = headers
            .get(header::CONTENT_TYPE)
            .and_then(|value| value.to_str().ok())
            .is_some_and(|value| value.starts_with("application/x-www-form-urlencoded"));
        if form && !body.is_empty() {
            let text = std::str::from_utf8(body)
                .map_err(|_| ApiError::bad_data("the form body is not UTF-8"))?;
            let body_pairs: Vec<(String, String)> = serde_urlencoded::from_str(text)
                .map_err(|error| ApiError::bad_data(format!("invalid form body: {error}")))?;
            pairs.extend(body_pairs);
        }
        Ok(Params(pairs))
    }

    fn get(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(key, _)| key == name)
            .map(|(_, value)| value.as_str())
    }

    fn all(&self, name: &str) -> Vec<&str> {
        self.0
            .iter()
            .filter(|(key, _)| key == name)
            .map(|(_, value)| value.as_str())
            .collect()
    }

    fn time(&self, name: &str, default: i64) -> Result<i64, ApiError> {
        match self.get(name) {
            None | Some("") => Ok(default),
            Some(text) => parse_time(text).map_err(|error| {
                ApiError::bad_data(format!("invalid parameter {name:?}: {error}"))
            }),
        }
    }

    /// The `query` parameter, which must not be blank.
    fn expr(&self) -> Result<String, ApiError> {
        let expr = self.get("query").unwrap_or("");
        if expr.trim().is_empty() {
            return Err(ApiError::bad_data(
                "invalid parameter \"query\": no expression found in input",
            ));
        }
        Ok(expr.to_owned())
    }

    fn required_time(&self, name: &str) -> Result<i64, ApiError> {
        match self.get(name) {
            None | Some("") => Err(ApiError::bad_data(format!(
                "invalid parameter {name:?}: cannot parse \"\" to a valid timestamp"
            ))),
            Some(text) => parse_time(text).map_err(|error| {
                ApiError::bad_data(format!("invalid parameter {name:?}: {error}"))
            }),
        }
    }

    fn matchers(&self) -> Result<Vec<Vec<Matcher>>, ApiError> {
        self.all("match[]")
            .into_iter()
            .map(|text| parse_selector(text).map_err(ApiError::from))
            .collect()
    }
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// The earliest and latest times Prometheus accepts as "no bound".
const MIN_TIME_MS: i64 = i64::MIN / 4;
const MAX_TIME_MS: i64 = i64::MAX / 4;

/// A timestamp as Prometheus's API takes it: Unix seconds (fractions to the millisecond) or
/// RFC 3339.
pub fn parse_time(text: &str) -> Result<i64, String> {
    if let Ok(seconds) = text.parse::<f64>()
        && seconds.is_finite()
    {
        let whole = seconds.trunc();
        let fraction = ((seconds - whole) * 1000.0).round();
        return Ok(whole as i64 * 1000 + fraction as i64);
    }
    if let Ok(time) =
        time::OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339)
    {
        return Ok((time.unix_timestamp_nanos() / 1_000_000) as i64);
    }
    Err(format!("cannot parse {text:?} to a valid timestamp"))
}

/// A duration as Prometheus's API takes it: float seconds, or `1h30m`-style units (ms, s, m,
/// h, d, w, y). Answers milliseconds.
pub fn parse_duration(text: &str) -> Result<i64, String> {
    if let Ok(seconds) = text.parse::<f64>() {
        let ms = seconds * 1000.0;
        if !ms.is_finite() || ms.abs() > i64::MAX as f64 / 1000.0 {
            return Err(format!(
                "cannot parse {text:?} to a valid duration. It overflows int64"
            ));
        }
        return Ok(ms.round() as i64);
    }
    let invalid = || format!("cannot parse {text:?} to a valid duration");
    let mut total: i64 = 0;
    let mut rest = text;
    if rest.is_empty() {
        return Err(invalid());
    }
    // Units in the order Prometheus requires them (largest first, each at most once).
    let units: [(&str, i64); 7] = [
        ("y", 365 * 24 * 3_600_000),
        ("w", 7 * 24 * 3_600_000),
        ("d", 24 * 3_600_000),
        ("h", 3_600_000),
        ("m", 60_000),
        ("s", 1_000),
        ("ms", 1),
    ];
    let mut next_unit = 0;
    while !rest.is_empty() {
        let digits = rest.chars().take_while(char::is_ascii_digit).count();
        if digits == 0 {
            return Err(invalid());
        }
        let number: i64 = rest[..digits].parse().map_err(|_| invalid())?;
        rest = &rest[digits..];
        let unit_len = rest.chars().take_while(|c| c.is_ascii_alphabetic()).count();
        let unit = &rest[..unit_len];
        rest = &rest[unit_len..];
        let position = units[next_unit..]
            .iter()
            .position(|(name, _)| *name == unit)
            .ok_or_else(invalid)?;
        let (_, scale) = units[next_unit + position];
        next_unit += position + 1;
        total = number
            .checked_mul(scale)
            .and_then(|value| total.checked_add(value))
            .ok_or_else(invalid)?;
    }
    Ok(total)
}

/// The engine, with the request's `timeout` when it asks for less than the default.
fn with_timeout(state: &HttpState, params: &Params) -> Result<crate::query::Engine, ApiError> {
    let engine = state.engine.clone();
    match params.get("timeout") {
        None | Some("") => Ok(engine),
        Some(text) => {
            let ms = parse_duration(text).map_err(|error| {
                ApiError::bad_data(format!("invalid parameter \"timeout\": {error}"))
            })?;
            let requested = std::time::Duration::from_millis(ms.max(0) as u64);
            Ok(engine.with_timeout(requested.min(crate::query::engine::DEFAULT_TIMEOUT)))
        }
    }
}

/// Runs queries and store reads off the async workers: they are CPU work that can take a
/// while on a large store.
async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> T + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|error| ApiError {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            error_type: "internal",
            message: format!("the request failed: {error}"),
        })
}

async fn query(
    _reader: Reader,
    State(state): State<HttpState>,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let params = Params::of(&uri, &headers, &body)?;
    let expr = params.expr()?;
    let time_ms = params.time("time", now_ms())?;
    let engine = with_timeout(&state, &params)?;
    let value = blocking(move || engine.instant(&expr, time_ms)).await??;
    Ok(success(&result_json(&value)))
}

async fn query_range(
    _reader: Reader,
    State(state): State<HttpState>,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let params = Params::of(&uri, &headers, &body)?;
    let start = params.required_time("start")?;
    let end = params.required_time("end")?;
    if end < start {
        return Err(ApiError::bad_data(
            "invalid parameter \"end\": end timestamp must not be before start time",
        ));
    }
    let step = match params.get("step") {
        None | Some("") => {
            return Err(ApiError::bad_data(
                "invalid parameter \"step\": cannot parse \"\" to a valid duration",
            ));
        }
        Some(text) => parse_duration(text)
            .map_err(|error| ApiError::bad_data(format!("invalid parameter \"step\": {error}")))?,
    };
    if step <= 0 {
        return Err(ApiError::bad_data(
            "invalid parameter \"step\": zero or negative query resolution step widths are not accepted. Try a positive integer",
        ));
    }
    let expr = params.expr()?;
    let engine = with_timeout(&state, &params)?;
    let value = blocking(move || engine.range(&expr, start, end, step)).await??;
    Ok(success(&result_json(&value)))
}

async fn series(
    _reader: Reader,
    State(state): State<HttpState>,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let params = Params::of(&uri, &headers, &body)?;
    let selectors = params.matchers()?;
    if selectors.is_empty() {
        return Err(ApiError::bad_data("no match[] parameter provided"));
    }
    let start = params.time("start", MIN_TIME_MS)?;
    let end = params.time("end", MAX_TIME_MS)?;
    let source = state.engine.source().clone();
    let all = blocking(move || {
        let mut all = Vec::new();
        for matchers in &selectors {
            all.extend(source.series_labels(matchers, start, end));
        }
        all.sort();
        all.dedup();
        all
    })
    .await?;
    let mut out = String::from("[");
    for (i, labels) in all.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        write_labels(&mut out, labels);
    }
    out.push(']');
    Ok(success(&out))
}

async fn labels(
    _reader: Reader,
    State(state): State<HttpState>,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let params = Params::of(&uri, &headers, &body)?;
    let selectors = params.matchers()?;
    let start = params.time("start", MIN_TIME_MS)?;
    let end = params.time("end", MAX_TIME_MS)?;
    let source = state.engine.source().clone();
    let names = blocking(move || {
        let mut names = Vec::new();
        if selectors.is_empty() {
            names = source.label_names(&[], start, end);
        } else {
            for matchers in &selectors {
                names.extend(source.label_names(matchers, start, end));
            }
        }
        names.sort();
        names.dedup();
        names
    })
    .await?;
    Ok(success(&serde_json::to_string(&names).unwrap_or_default()))
}

async fn label_values(
    _reader: Reader,
    State(state): State<HttpState>,
    Path(name): Path<String>,
    uri: Uri,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    if !crate::query::is_valid_label_name(&name) {
        return Err(ApiError::bad_data(format!("invalid label name: {name:?}")));
    }
    let params = Params::of(&uri, &headers, &Bytes::new())?;
    let selectors = params.matchers()?;
    let start = params.time("start", MIN_TIME_MS)?;
    let end = params.time("end", MAX_TIME_MS)?;
    let source = state.engine.source().clone();
    let values = blocking(move || {
        let mut values = Vec::new();
        if selectors.is_empty() {
            values = source.label_values(&name, &[], start, end);
        } else {
            for matchers in &selectors {
                values.extend(source.label_values(&name, matchers, start, end));
            }
        }
        values.sort();
        values.dedup();
        values
    })
    .await?;
    Ok(success(&serde_json::to_string(&values).unwrap_or_default()))
}

async fn buildinfo(_reader: Reader) -> Response {
    let data = serde_json::json!({
        "version": env!("CARGO_PKG_VERSION"),
        "revision": "",
        "branch": "",
        "buildUser": "",
        "buildDate": "",
        "goVersion": "",
        "application": "vigil-aggregator",
    });
    success(&data.to_string())
}

/// Metric metadata is not kept; Grafana and promtool accept an empty answer.
async fn metadata(_reader: Reader) -> Response {
    success("{}")
}

async fn healthy() -> &'static str {
    "Vigil aggregator is Healthy.\n"
}

async fn ready() -> &'static str {
    "Vigil aggregator is Ready.\n"
}

/// A timestamp as Prometheus writes it: seconds, with the milliseconds only when not zero.
fn write_time(out: &mut String, time_ms: i64) {
    let mut ms = time_ms;
    if ms < 0 {
        out.push('-');
        ms = -ms;
    }
    let _ = write!(out, "{}", ms / 1000);
    let fraction = ms % 1000;
    if fraction != 0 {
        let _ = write!(out, ".{fraction:03}");
    }
}

fn write_string(out: &mut String, text: &str) {
    out.push_str(&serde_json::to_string(text).unwrap_or_else(|_| "\"\"".into()));
}

fn write_labels(out: &mut String, labels: &[(String, String)]) {
    out.push('{');
    for (i, (name, value)) in labels.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        write_string(out, name);
        out.push(':');
        write_string(out, value);
    }
    out.push('}');
}

/// `[time, "value"]`
fn write_float_point(out: &mut String, time_ms: i64, value: f64) {
    out.push('[');
    write_time(out, time_ms);
    out.push_str(",\"");
    out.push_str(&format_value(value));
    out.push_str("\"]");
}

/// `[time, {"count": .., "sum": .., "buckets": [[0, "lower", "upper", "count"], ...]}]`;
/// boundary rule 0: lower bound exclusive, upper inclusive (as our buckets are).
fn write_histogram_point(out: &mut String, time_ms: i64, histogram: &FloatHistogram) {
    use vigil_agent_common::histogram::{bucket_lower_bound_ns, bucket_upper_bound_ns};
    out.push('[');
    write_time(out, time_ms);
    let _ = write!(
        out,
        ",{{\"count\":\"{}\",\"sum\":\"{}\",\"buckets\":[",
        format_value(histogram.count),
        format_value(histogram.sum_seconds)
    );
    let mut first = true;
    for (index, count) in &histogram.buckets {
        if *count == 0.0 {
            continue;
        }
        if !first {
            out.push(',');
        }
        first = false;
        let lower = bucket_lower_bound_ns(*index as usize) as f64 / 1e9;
        let upper = bucket_upper_bound_ns(*index as usize) as f64 / 1e9;
        let _ = write!(
            out,
            "[0,\"{}\",\"{}\",\"{}\"]",
            format_value(lower),
            format_value(upper),
            format_value(*count)
        );
    }
    out.push_str("]}]");
}

/// `{"resultType": .., "result": ..}` in Prometheus's JSON.
pub fn result_json(value: &Value) -> String {
    let mut out = String::new();
    let _ = write!(
        out,
        "{{\"resultType\":\"{}\",\"result\":",
        value.result_type()
    );
    match value {
        Value::Scalar { time_ms, value } => write_float_point(&mut out, *time_ms, *value),
        Value::String { time_ms, value } => {
            out.push('[');
            write_time(&mut out, *time_ms);
            out.push(',');
            write_string(&mut out, value);
            out.push(']');
        }
        Value::Vector(samples) => {
            out.push('[');
            for (i, sample) in samples.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push_str("{\"metric\":");
                write_labels(&mut out, &sample.labels);
                match &sample.value {
                    SampleValue::Float(v) => {
                        out.push_str(",\"value\":");
                        write_float_point(&mut out, sample.time_ms, *v);
                    }
                    SampleValue::Histogram(h) => {
                        out.push_str(",\"histogram\":");
                        write_histogram_point(&mut out, sample.time_ms, h);
                    }
                }
                out.push('}');
            }
            out.push(']');
        }
        Value::Matrix(series) => {
            out.push('[');
            for (i, series) in series.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push_str("{\"metric\":");
                write_labels(&mut out, &series.labels);
                let floats: Vec<_> = series
                    .points
                    .iter()
                    .filter_map(|(t, v)| match v {
                        SampleValue::Float(v) => Some((*t, *v)),
                        SampleValue::Histogram(_) => None,
                    })
                    .collect();
                let histograms: Vec<_> = series
                    .points
                    .iter()
                    .filter_map(|(t, v)| match v {
                        SampleValue::Histogram(h) => Some((*t, h)),
                        SampleValue::Float(_) => None,
                    })
                    .collect();
                if !floats.is_empty() || histograms.is_empty() {
                    out.push_str(",\"values\":[");
                    for (j, (t, v)) in floats.iter().enumerate() {
                        if j > 0 {
                            out.push(',');
                        }
                        write_float_point(&mut out, *t, *v);
                    }
                    out.push(']');
                }
                if !histograms.is_empty() {
                    out.push_str(",\"histograms\":[");
                    for (j, (t, h)) in histograms.iter().enumerate() {
                        if j > 0 {
                            out.push(',');
                        }
                        write_histogram_point(&mut out, *t, h);
                    }
                    out.push(']');
                }
                out.push('}');
            }
            out.push(']');
        }
    }
    out.push('}');
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::query::{InstantSample, RangeSeries};

    #[test]
    fn times_parse_as_prometheus() {
        assert_eq!(parse_time("1700000000"), Ok(1_700_000_000_000));
        assert_eq!(parse_time("1700000000.123"), Ok(1_700_000_000_123));
        assert_eq!(parse_time("2023-11-14T22:13:20Z"), Ok(1_700_000_000_000));
        assert_eq!(
            parse_time("2023-11-14T23:13:20.5+01:00"),
            Ok(1_700_000_000_500)
        );
        assert!(parse_time("yesterday").is_err());
    }

    #[test]
    fn durations_parse_as_prometheus() {
        assert_eq!(parse_duration("15s"), Ok(15_000));
        assert_eq!(parse_duration("1h30m"), Ok(5_400_000));
        assert_eq!(parse_duration("1.5"), Ok(1_500));
        assert_eq!(parse_duration("100ms"), Ok(100));
        assert!(parse_duration("30m1h").is_err());
        assert!(parse_duration("1x").is_err());
        assert!(parse_duration("").is_err());
    }

    #[test]
    fn results_are_written_in_prometheus_json() {
        let vector = Value::Vector(vec![InstantSample {
            labels: vec![
                ("__name__".into(), "up".into()),
                ("node".into(), "a\"b".into()),
            ],
            time_ms: 1_700_000_000_500,
            value: SampleValue::Float(f64::INFINITY),
        }]);
        assert_eq!(
            result_json(&vector),
            r#"{"resultType":"vector","result":[{"metric":{"__name__":"up","node":"a\"b"},"value":[1700000000.500,"+Inf"]}]}"#
        );
        let matrix = Value::Matrix(vec![RangeSeries {
            labels: vec![],
            points: vec![
                (1000, SampleValue::Float(0.1)),
                (2000, SampleValue::Float(f64::NAN)),
            ],
        }]);
        assert_eq!(
            result_json(&matrix),
            r#"{"resultType":"matrix","result":[{"metric":{},"values":[[1,"0.1"],[2,"NaN"]]}]}"#
        );
        let scalar = Value::Scalar {
            time_ms: 1_050,
            value: 1e21,
        };
        assert_eq!(
            result_json(&scalar),
            r#"{"resultType":"scalar","result":[1.050,"1000000000000000000000"]}"#
        );
    }
}
