//! The part of Prometheus's alert templating that rule files use in practice: `{{ $labels.x }}`,
//! `{{ $value }}`, `{{ $externalLabels.x }}` (also spelled `.Labels.x`, `.Value`,
//! `.ExternalLabels.x`), optionally piped through `humanize`, `humanize1024`,
//! `humanizePercentage`, `humanizeDuration` or `printf "%.2f"`.
//!
//! Templates are parsed when the rule file is loaded, so a construct outside this subset is a
//! load error with the rule's line rather than a half-rendered notification at 3 a.m.

use std::fmt::Write as _;

/// What a placeholder reads.
#[derive(Debug, Clone, PartialEq)]
enum Source {
    Label(String),
    ExternalLabel(String),
    Value,
}

/// How a placeholder's value is written.
#[derive(Debug, Clone, PartialEq)]
enum Format {
    Plain,
    Humanize,
    Humanize1024,
    HumanizePercentage,
    HumanizeDuration,
    /// `printf "%.Nf"` (N digits after the point) or `printf "%d"` (N = 0).
    Fixed(usize),
}

#[derive(Debug, Clone, PartialEq)]
enum Part {
    Text(String),
    Field(Source, Format),
}

/// A parsed annotation or label template.
#[derive(Debug, Clone, PartialEq)]
pub struct Template {
    source: String,
    parts: Vec<Part>,
}

/// What a template is expanded with.
pub struct TemplateData<'a> {
    /// The alert's labels as the expression produced them (without `__name__`).
    pub labels: &'a [(String, String)],
    pub external_labels: &'a [(String, String)],
    pub value: f64,
}

impl Template {
    /// Parses `text`; the error says which placeholder is not supported.
    pub fn parse(text: &str) -> Result<Template, String> {
        let mut parts = Vec::new();
        let mut rest = text;
        while let Some(start) = rest.find("{{") {
            if start > 0 {
                parts.push(Part::Text(rest[..start].to_owned()));
            }
            let after = &rest[start + 2..];
            let end = after
                .find("}}")
                .ok_or_else(|| format!("unclosed \"{{{{\" in template {text:?}"))?;
            let inner = after[..end].trim_matches('-').trim();
            parts.push(parse_action(inner)?);
            rest = &after[end + 2..];
        }
        if !rest.is_empty() {
            parts.push(Part::Text(rest.to_owned()));
        }
        Ok(Template {
            source: text.to_owned(),
            parts,
        })
    }

    /// A template that expands to `text` as is.
    pub fn literal(text: &str) -> Template {
        Template {
            source: text.to_owned(),
            parts: vec![Part::Text(text.to_owned())],
        }
    }

    /// The text as written in the rule file.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// The expanded text. A label that is absent expands to "" (as Go templates do for a
    /// missing map key under Prometheus's `missingkey=zero`).
    pub fn expand(&self, data: &TemplateData<'_>) -> String {
        let mut out = String::new();
        for part in &self.parts {
            match part {
                Part::Text(text) => out.push_str(text),
                Part::Field(source, format) => {
                    let lookup = |labels: &[(String, String)], name: &str| {
                        labels
                            .iter()
                            .find(|(label, _)| label == name)
                            .map(|(_, value)| value.clone())
                            .unwrap_or_default()
                    };
                    match source {
                        Source::Label(name) => {
                            let text = lookup(data.labels, name);
                            out.push_str(&format_text(&text, format));
                        }
                        Source::ExternalLabel(name) => {
                            let text = lookup(data.external_labels, name);
                            out.push_str(&format_text(&text, format));
                        }
                        Source::Value => out.push_str(&format_number(data.value, format)),
                    }
                }
            }
        }
        out
    }
}

fn parse_action(inner: &str) -> Result<Part, String> {
    let mut stages = inner.split('|').map(str::trim);
    let head = stages.next().unwrap_or_default();
    let source = if head == "$value" || head == ".Value" {
        Source::Value
    } else if let Some(name) = head
        .strip_prefix("$labels.")
        .or_else(|| head.strip_prefix(".Labels."))
    {
        Source::Label(checked_name(name, head)?)
    } else if let Some(name) = head
        .strip_prefix("$externalLabels.")
        .or_else(|| head.strip_prefix(".ExternalLabels."))
    {
        Source::ExternalLabel(checked_name(name, head)?)
    } else {
        return Err(format!(
            "unsupported template action {{{{ {inner} }}}}: use $labels.NAME, $value or \
             $externalLabels.NAME, optionally piped to humanize, humanize1024, \
             humanizePercentage, humanizeDuration or printf \"%.2f\""
        ));
    };
    let mut format = Format::Plain;
    for stage in stages {
        if format != Format::Plain {
            return Err(format!(
                "template {{{{ {inner} }}}}: only one formatting function per value"
            ));
        }
        format = match stage {
            "humanize" => Format::Humanize,
            "humanize1024" => Format::Humanize1024,
            "humanizePercentage" => Format::HumanizePercentage,
            "humanizeDuration" => Format::HumanizeDuration,
            other => parse_printf(other).ok_or_else(|| {
                format!(
                    "unsupported template function {other:?} in {{{{ {inner} }}}} (supported: \
                     humanize, humanize1024, humanizePercentage, humanizeDuration, \
                     printf \"%.Nf\")"
                )
            })?,
        };
    }
    Ok(Part::Field(source, format))
}

fn checked_name(name: &str, head: &str) -> Result<String, String> {
    let mut chars = name.chars();
    let valid = matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_');
    if valid {
        Ok(name.to_owned())
    } else {
        Err(format!(
            "{head}: {name:?} is not a label name (for other names use index, which is not \
             supported here)"
        ))
    }
}

/// `printf "%.2f"`, `printf "%f"`, `printf "%d"`.
fn parse_printf(stage: &str) -> Option<Format> {
    let pattern = stage.strip_prefix("printf")?.trim();
    let pattern = pattern.strip_prefix('"')?.strip_suffix('"')?;
    match pattern {
        "%d" => Some(Format::Fixed(0)),
        "%f" => Some(Format::Fixed(6)),
        _ => {
            let digits = pattern.strip_prefix("%.")?.strip_suffix('f')?;
            digits
                .parse()
                .ok()
                .filter(|n: &usize| *n <= 17)
                .map(Format::Fixed)
        }
    }
}

fn format_text(text: &str, format: &Format) -> String {
    match format {
        Format::Plain => text.to_owned(),
        // Numbers carried in labels (rare) are formatted like values; anything else as is.
        _ => text
            .parse::<f64>()
            .map(|value| format_number(value, format))
            .unwrap_or_else(|_| text.to_owned()),
    }
}

/// A value as Prometheus's templates write it.
fn format_number(value: f64, format: &Format) -> String {
    match format {
        Format::Plain => format_value(value),
        Format::Fixed(digits) => format!("{value:.digits$}"),
        Format::Humanize => humanize(value, 1000.0, &["k", "M", "G", "T", "P", "E", "Z", "Y"]),
        Format::Humanize1024 => humanize(
            value,
            1024.0,
            &["ki", "Mi", "Gi", "Ti", "Pi", "Ei", "Zi", "Yi"],
        ),
        Format::HumanizePercentage => format!("{}%", format_g(value * 100.0, 4)),
        Format::HumanizeDuration => humanize_duration(value),
    }
}

/// Go's `strconv.FormatFloat(v, 'g', -1, 64)` for ordinary values, as `{{ $value }}` prints.
pub fn format_value(value: f64) -> String {
    if value.is_nan() {
        return "NaN".into();
    }
    if value.is_infinite() {
        return if value > 0.0 { "+Inf" } else { "-Inf" }.into();
    }
    let exponent = if value == 0.0 {
        0
    } else {
        value.abs().log10().floor() as i32
    };
    if (-4..21).contains(&exponent) {
        format!("{value}")
    } else {
        let text = format!("{value:e}");
        // Go writes e+06, Rust e6.
        match text.split_once('e') {
            Some((mantissa, exp)) => {
                let (sign, digits) = match exp.strip_prefix('-') {
                    Some(digits) => ('-', digits),
                    None => ('+', exp),
                };
                format!("{mantissa}e{sign}{digits:0>2}")
            }
            None => text,
        }
    }
}

/// `%.{precision}g` without trailing zeros, as Go's `fmt` writes it.
fn format_g(value: f64, precision: usize) -> String {
    if value == 0.0 || !value.is_finite() {
        return format_value(value);
    }
    let exponent = value.abs().log10().floor() as i32;
    if exponent < -4 || exponent >= precision as i32 {
        let text = format!("{:.*e}", precision.saturating_sub(1), value);
        let (mantissa, exp) = text.split_once('e').unwrap_or((&text, "0"));
        let mantissa = trim_zeros(mantissa);
        let exp: i32 = exp.parse().unwrap_or(0);
        let sign = if exp < 0 { '-' } else { '+' };
        format!("{mantissa}e{sign}{:02}", exp.abs())
    } else {
        let decimals = (precision as i32 - 1 - exponent).max(0) as usize;
        trim_zeros(&format!("{value:.decimals$}")).to_owned()
    }
}

fn trim_zeros(text: &str) -> &str {
    if text.contains('.') {
        text.trim_end_matches('0').trim_end_matches('.')
    } else {
        text
    }
}

fn humanize(value: f64, base: f64, big: &[&str]) -> String {
    if value == 0.0 || !value.is_finite() {
        return format_g(value, 4);
    }
    if value.abs() >= 1.0 {
        let mut scaled = value;
        let mut prefix = "";
        for unit in big {
            if scaled.abs() < base {
                break;
            }
            scaled /= base;
            prefix = unit;
        }
        return format!("{}{prefix}", format_g(scaled, 4));
    }
    if base != 1000.0 {
        return format_g(value, 4);
    }
    let mut scaled = value;
    let mut prefix = "";
    for unit in ["m", "u", "n", "p", "f", "a", "z", "y"] {
        if scaled.abs() >= 1.0 {
            break;
        }
        scaled *= 1000.0;
        prefix = unit;
    }
    format!("{}{prefix}", format_g(scaled, 4))
}

fn humanize_duration(seconds: f64) -> String {
    if !seconds.is_finite() {
        return format_value(seconds);
    }
    if seconds.abs() < 1.0 {
        return humanize(seconds, 1000.0, &[]) + "s";
    }
    let sign = if seconds < 0.0 { "-" } else { "" };
    let total = seconds.abs();
    let whole = total.floor() as u64;
    let (days, hours, minutes) = (whole / 86_400, whole / 3600 % 24, whole / 60 % 60);
    let secs = total - (whole - whole % 60) as f64;
    let mut out = String::from(sign);
    if days > 0 {
        let _ = write!(out, "{days}d ");
    }
    if days > 0 || hours > 0 {
        let _ = write!(out, "{hours}h ");
    }
    if days > 0 || hours > 0 || minutes > 0 {
        let _ = write!(out, "{minutes}m ");
    }
    let _ = write!(out, "{}s", format_g(secs, 4));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn expand(text: &str, value: f64) -> String {
        let labels = vec![
            ("gpu".to_string(), "3".to_string()),
            ("node".to_string(), "gpu-7".to_string()),
        ];
        let external = vec![("cluster".to_string(), "east".to_string())];
        Template::parse(text).unwrap().expand(&TemplateData {
            labels: &labels,
            external_labels: &external,
            value,
        })
    }

    #[test]
    fn labels_values_and_external_labels_expand() {
        assert_eq!(
            expand(
                "GPU {{ $labels.gpu }} on {{$labels.node}} is {{ $value }} C",
                91.5
            ),
            "GPU 3 on gpu-7 is 91.5 C"
        );
        assert_eq!(expand("{{ .Labels.gpu }}/{{ .Value }}", 2.0), "3/2");
        assert_eq!(expand("{{ $externalLabels.cluster }}", 0.0), "east");
        assert_eq!(expand("[{{ $labels.missing }}]", 0.0), "[]");
        assert_eq!(expand("no placeholders", 0.0), "no placeholders");
    }

    #[test]
    fn formatting_functions_follow_prometheus() {
        assert_eq!(expand("{{ $value | humanize }}", 1234567.0), "1.235M");
        assert_eq!(expand("{{ $value | humanize }}", 0.0012), "1.2m");
        assert_eq!(expand("{{ $value | humanize1024 }}", 2048.0), "2ki");
        assert_eq!(
            expand("{{ $value | humanizePercentage }}", 0.9712),
            "97.12%"
        );
        assert_eq!(
            expand("{{ $value | humanizeDuration }}", 3725.0),
            "1h 2m 5s"
        );
        assert_eq!(expand("{{ $value | printf \"%.2f\" }}", 1.23456), "1.23");
        assert_eq!(expand("{{ $value }}", 1e21), "1e+21");
    }

    #[test]
    fn unsupported_constructs_are_refused_with_the_reason() {
        for bad in [
            "{{ range $labels }}",
            "{{ $labels.gpu | title }}",
            "{{ $labels.gpu",
            "{{ $labels.\"a-b\" }}",
        ] {
            assert!(Template::parse(bad).is_err(), "{bad}");
        }
    }
}
