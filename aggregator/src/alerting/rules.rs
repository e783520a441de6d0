//! Prometheus rule files: parsing, checking and the loaded form the evaluator runs.
//!
//! The format is Prometheus's (`groups:` of `name`, `interval`, `rules:` with `alert` or
//! `record`, `expr`, `for`, `keep_firing_for`, `labels`, `annotations`), with unknown keys
//! refused so a typo (`anotations:`) is an error rather than a silently missing runbook. Every
//! `expr` is parsed with `promql-parser` (the engine's parser) and every template is parsed at
//! load; errors say `FILE:LINE:COLUMN: reason`.
//!
//! Thresholds: `${name:-default}` anywhere in an `expr`, a label value or an annotation is
//! replaced before parsing by `alerting.thresholds.name` from the aggregator's config, or by
//! `default` when the config does not set it (`${name}` without a default requires the
//! config to set it). The shipped catalog writes its thresholds this way, so operators
//! override them per cluster in the config without editing the shipped files.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    fmt,
    path::{Path, PathBuf},
    time::Duration,
};

use promql_parser::parser::{self, value::ValueType};
use serde::Deserialize;

use super::template::Template;

/// The shortest evaluation interval a group may ask for.
pub const MIN_INTERVAL: Duration = Duration::from_secs(1);

/// Why a rule file cannot be used: where and what.
#[derive(Debug, Clone, PartialEq)]
pub struct RuleError {
    pub file: PathBuf,
    /// 1-based; `None` when the problem is the file as a whole (unreadable, empty glob).
    pub line: Option<usize>,
    pub column: Option<usize>,
    pub message: String,
}

impl fmt::Display for RuleError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if let Some(line) = self.line {
            write!(f, ":{line}")?;
            if let Some(column) = self.column {
                write!(f, ":{column}")?;
            }
        }
        write!(f, ": {}", self.message)
    }
}

impl std::error::Error for RuleError {}

// ----- The file as written -------------------------------------------------------------------

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileYaml {
    groups: Vec<GroupYaml>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct GroupYaml {
    name: String,
    #[serde(default)]
    interval: Option<String>,
    /// Prometheus's per-group limit on alerts/series (0: none).
    #[serde(default)]
    limit: usize,
    #[serde(default)]
    rules: Vec<RuleYaml>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RuleYaml {
    #[serde(default)]
    record: Option<String>,
    #[serde(default)]
    alert: Option<String>,
    expr: Scalarish,
    #[serde(default, rename = "for")]
    for_: Option<String>,
    #[serde(default)]
    keep_firing_for: Option<String>,
    #[serde(default)]
    labels: BTreeMap<String, Scalarish>,
    #[serde(default)]
    annotations: BTreeMap<String, Scalarish>,
}

/// A YAML scalar taken as text: `expr: 1` and `severity: 2` are valid, as in Prometheus.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Scalarish {
    Text(String),
    Integer(i64),
    Float(f64),
    Bool(bool),
}

impl Scalarish {
    fn into_text(self) -> String {
        match self {
            Scalarish::Text(text) => text,
            Scalarish::Integer(value) => value.to_string(),
            Scalarish::Float(value) => value.to_string(),
            Scalarish::Bool(value) => value.to_string(),
        }
    }
}

// ----- The loaded form ----------------------------------------------------------------------

/// A group of rules evaluated together, in order, at one interval.
#[derive(Debug, Clone, PartialEq)]
pub struct RuleGroup {
    pub name: String,
    pub file: PathBuf,
    pub interval: Duration,
    /// Most alerts (alerting rules) or series (recording rules) one rule may produce; 0: no
    /// limit.
    pub limit: usize,
    pub rules: Vec<Rule>,
}

/// One rule, checked.
#[derive(Debug, Clone, PartialEq)]
pub struct Rule {
    /// The alert or recorded metric name.
    pub name: String,
    /// The expression after threshold substitution (what is evaluated and shown).
    pub expr: String,
    /// Label templates (recording rules: plain values).
    pub labels: Vec<(String, Template)>,
    pub kind: RuleKind,
    /// Where the rule starts in its file (1-based).
    pub line: usize,
}

#[derive(Debug, Clone, PartialEq)]
pub enum RuleKind {
    Recording,
    Alerting {
        hold: Duration,
        keep_firing_for: Duration,
        annotations: Vec<(String, Template)>,
    },
}

impl Rule {
    pub fn is_alerting(&self) -> bool {
        matches!(self.kind, RuleKind::Alerting { .. })
    }

    /// What identifies a rule across reloads: an unchanged rule keeps its alerts' state.
    pub fn identity(&self) -> String {
        let labels: Vec<String> = self
            .labels
            .iter()
            .map(|(name, value)| format!("{name}={}", value.source()))
            .collect();
        format!(
            "{}\u{1}{}\u{1}{}\u{1}{}",
            self.is_alerting(),
            self.name,
            self.expr,
            labels.join(",")
        )
    }
}

/// Loads and checks every file; the first error stops the load.
pub fn load_files(
    files: &[PathBuf],
    default_interval: Duration,
    thresholds: &BTreeMap<String, String>,
) -> Result<Vec<RuleGroup>, RuleError> {
    let mut groups = Vec::new();
    let mut defaults_seen = HashMap::new();
    for file in files {
        let text = std::fs::read_to_string(file).map_err(|error| RuleError {
            file: file.clone(),
            line: None,
            column: None,
            message: format!("cannot read: {error}"),
        })?;
        groups.extend(parse_file(
            file,
            &text,
            default_interval,
            thresholds,
            &mut defaults_seen,
        )?);
    }
    Ok(groups)
}

/// The files the `rule_files` globs name, sorted and without duplicates. A pattern without
/// glob characters must name an existing file (a typo in a path is an error, not an empty
/// rule set); a glob may match nothing.
pub fn expand_globs(patterns: &[String], base: &Path) -> Result<Vec<PathBuf>, RuleError> {
    let mut files = Vec::new();
    for pattern in patterns {
        let full = if Path::new(pattern).is_absolute() {
            PathBuf::from(pattern)
        } else {
            base.join(pattern)
        };
        let text = full.to_string_lossy().into_owned();
        let is_glob = pattern.contains(['*', '?', '[']);
        if !is_glob {
            if !full.is_file() {
                return Err(RuleError {
                    file: full,
                    line: None,
                    column: None,
                    message: "no such rule file (alerting.rule_files)".into(),
                });
            }
            files.push(full);
            continue;
        }
        let paths = glob::glob(&text).map_err(|error| RuleError {
            file: full.clone(),
            line: None,
            column: None,
            message: format!("not a valid glob (alerting.rule_files): {error}"),
        })?;
        for path in paths.flatten() {
            if path.is_file() {
                files.push(path);
            }
        }
    }
    files.sort();
    files.dedup();
    Ok(files)
}

/// Parses and checks one file's text. `defaults_seen` catches one threshold given two
/// different defaults across files.
pub fn parse_file(
    file: &Path,
    text: &str,
    default_interval: Duration,
    thresholds: &BTreeMap<String, String>,
    defaults_seen: &mut HashMap<String, (String, PathBuf, usize)>,
) -> Result<Vec<RuleGroup>, RuleError> {
    let error_at = |line: Option<usize>, column: Option<usize>, message: String| RuleError {
        file: file.to_owned(),
        line,
        column,
        message,
    };
    if text.trim().is_empty() {
        // As Prometheus: an empty file is a valid file without groups.
        return Ok(Vec::new());
    }
    let parsed: FileYaml = serde_yaml_ng::from_str(text).map_err(|error| {
        let location = error.location();
        let message = error.to_string();
        // serde_yaml_ng appends " at line L column C"; the location is already in front.
        let message = match message.find(" at line ") {
            Some(cut) if location.is_some() => message[..cut].to_owned(),
            _ => message,
        };
        error_at(
            location.as_ref().map(|l| l.line()),
            location.as_ref().map(|l| l.column()),
            message,
        )
    })?;
    let locator = Locator::new(text);
    let mut group_names = HashSet::new();
    let mut groups = Vec::new();
    for (group_index, group) in parsed.groups.into_iter().enumerate() {
        let group_line = locator.group_line(group_index, &group.name);
        if group.name.trim().is_empty() {
            return Err(error_at(group_line, None, "a group needs a name".into()));
        }
        if !group_names.insert(group.name.clone()) {
            return Err(error_at(
                group_line,
                None,
                format!("group name {:?} is repeated in this file", group.name),
            ));
        }
        let interval = match &group.interval {
            None => default_interval,
            Some(text) => {
                let interval = parse_duration(text).map_err(|why| {
                    error_at(
                        group_line,
                        None,
                        format!("group {:?}: interval: {why}", group.name),
                    )
                })?;
                if interval < MIN_INTERVAL {
                    return Err(error_at(
                        group_line,
                        None,
                        format!(
                            "group {:?}: interval {text} is shorter than the minimum, 1s",
                            group.name
                        ),
                    ));
                }
                interval
            }
        };
        let mut rules = Vec::new();
        for rule in group.rules {
            let name = rule
                .alert
                .clone()
                .or(rule.record.clone())
                .unwrap_or_default();
            let line = locator.rule_line(&rule).or(group_line);
            let mut substitute = |text: &str| -> Result<String, RuleError> {
                substitute_thresholds(text, thresholds, file, line.unwrap_or(0), defaults_seen)
                    .map_err(|why| error_at(line, None, format!("rule {name:?}: {why}")))
            };
            let checked =
                check_rule(rule, &mut substitute).map_err(|why| error_at(line, None, why))?;
            rules.push(Rule {
                line: line.unwrap_or(0),
                ..checked
            });
        }
        groups.push(RuleGroup {
            name: group.name,
            file: file.to_owned(),
            interval,
            limit: group.limit,
            rules,
        });
    }
    Ok(groups)
}

fn check_rule(
    rule: RuleYaml,
    substitute: &mut dyn FnMut(&str) -> Result<String, RuleError>,
) -> Result<Rule, String> {
    let unwrap = |result: Result<String, RuleError>| result.map_err(|error| error.message);
    let (name, alerting) = match (&rule.alert, &rule.record) {
        (Some(alert), None) => (alert.clone(), true),
        (None, Some(record)) => (record.clone(), false),
        (Some(_), Some(_)) => {
            return Err("a rule has either `alert` or `record`, not both".into());
        }
        (None, None) => {
            return Err("a rule needs `alert` (alerting) or `record` (recording)".into());
        }
    };
    if alerting && name.trim().is_empty() {
        return Err("`alert` must not be empty".into());
    }
    if !alerting && !is_metric_name(&name) {
        return Err(format!(
            "recording rule name {name:?} is not a valid metric name ([a-zA-Z_:][a-zA-Z0-9_:]*)"
        ));
    }
    let expr = unwrap(substitute(&rule.expr.into_text()))?;
    if expr.trim().is_empty() {
        return Err(format!("rule {name:?}: `expr` is empty"));
    }
    let parsed =
        parser::parse(&expr).map_err(|why| format!("rule {name:?}: expr {expr:?}: {why}"))?;
    match parsed.value_type() {
        ValueType::Vector | ValueType::Scalar => {}
        other => {
            return Err(format!(
                "rule {name:?}: expr must be an instant vector or a scalar, not a {other}"
            ));
        }
    }
    let mut labels = Vec::new();
    for (label, value) in rule.labels {
        if !is_label_name(&label) || label.starts_with("__") {
            return Err(format!(
                "rule {name:?}: label name {label:?} is not valid ([a-zA-Z_][a-zA-Z0-9_]*, no \
                 leading __)"
            ));
        }
        if alerting && label == "alertname" {
            return Err(format!(
                "rule {name:?}: label `alertname` is set from `alert`; it cannot be overridden"
            ));
        }
        let value = unwrap(substitute(&value.into_text()))?;
        let template = if alerting {
            Template::parse(&value).map_err(|why| format!("rule {name:?}: label {label}: {why}"))?
        } else {
            // Recording rules do not template (as Prometheus): the value is literal.
            Template::literal(&value)
        };
        labels.push((label, template));
    }
    let kind = if alerting {
        let hold = match &rule.for_ {
            None => Duration::ZERO,
            Some(text) => {
                parse_duration(text).map_err(|why| format!("rule {name:?}: for: {why}"))?
            }
        };
        let keep_firing_for = match &rule.keep_firing_for {
            None => Duration::ZERO,
            Some(text) => parse_duration(text)
                .map_err(|why| format!("rule {name:?}: keep_firing_for: {why}"))?,
        };
        let mut annotations = Vec::new();
        for (annotation, value) in rule.annotations {
            if !is_label_name(&annotation) {
                return Err(format!(
                    "rule {name:?}: annotation name {annotation:?} is not valid \
                     ([a-zA-Z_][a-zA-Z0-9_]*)"
                ));
            }
            let value = unwrap(substitute(&value.into_text()))?;
            let template = Template::parse(&value)
                .map_err(|why| format!("rule {name:?}: annotation {annotation}: {why}"))?;
            annotations.push((annotation, template));
        }
        RuleKind::Alerting {
            hold,
            keep_firing_for,
            annotations,
        }
    } else {
        for (key, present) in [
            ("for", rule.for_.is_some()),
            ("keep_firing_for", rule.keep_firing_for.is_some()),
            ("annotations", !rule.annotations.is_empty()),
        ] {
            if present {
                return Err(format!(
                    "recording rule {name:?}: `{key}` is only for alerting rules"
                ));
            }
        }
        RuleKind::Recording
    };
    Ok(Rule {
        name,
        expr,
        labels,
        kind,
        line: 0,
    })
}

/// A Prometheus duration (`30s`, `5m`, `1h30m`, `0s`).
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    if text == "0" || text.trim_start_matches('0') == "s" || text == "0s" {
        return Ok(Duration::ZERO);
    }
    promql_parser::util::parse_duration(text)
        .map_err(|why| format!("{text:?} is not a duration ({why}); write e.g. 30s, 5m, 1h"))
}

/// Replaces every `${name}` / `${name:-default}` in `text`.
fn substitute_thresholds(
    text: &str,
    thresholds: &BTreeMap<String, String>,
    file: &Path,
    line: usize,
    defaults_seen: &mut HashMap<String, (String, PathBuf, usize)>,
) -> Result<String, String> {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let end = after
            .find('}')
            .ok_or_else(|| format!("unclosed \"${{\" in {text:?}"))?;
        let inner = &after[..end];
        let (name, default) = match inner.split_once(":-") {
            Some((name, default)) => (name.trim(), Some(default.trim())),
            None => (inner.trim(), None),
        };
        if !is_label_name(name) {
            return Err(format!(
                "threshold name {name:?} in {text:?} is not valid ([a-zA-Z_][a-zA-Z0-9_]*)"
            ));
        }
        if let Some(default) = default {
            match defaults_seen.get(name) {
                Some((earlier, earlier_file, earlier_line)) if earlier != default => {
                    return Err(format!(
                        "threshold {name} has default {default} here but {earlier} at {}:{}; \
                         one threshold has one default",
                        earlier_file.display(),
                        earlier_line
                    ));
                }
                Some(_) => {}
                None => {
                    defaults_seen
                        .insert(name.to_owned(), (default.to_owned(), file.to_owned(), line));
                }
            }
        }
        let value = thresholds
            .get(name)
            .map(String::as_str)
            .or(default)
            .ok_or_else(|| {
                format!(
                    "threshold ${{{name}}} has no default and alerting.thresholds.{name} is \
                     not set in the aggregator config"
                )
            })?;
        out.push_str(value);
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

/// Finds where groups and rules start in the text (serde gives locations only for errors).
/// Rules are found by their `alert:`/`record:` line, in order; a rule written in flow style
/// falls back to its group's line.
struct Locator<'a> {
    lines: Vec<&'a str>,
    group_lines: Vec<usize>,
    /// Next line to search from for each (key, name), so repeated names map in order.
    next_rule_search: std::cell::RefCell<HashMap<(String, String), usize>>,
}

impl<'a> Locator<'a> {
    fn new(text: &'a str) -> Locator<'a> {
        let lines: Vec<&str> = text.lines().collect();
        let group_lines = lines
            .iter()
            .enumerate()
            .filter(|(_, line)| {
                let trimmed = line.trim_start();
                trimmed.starts_with("- name:") || trimmed.starts_with("-   name:")
            })
            .map(|(index, _)| index + 1)
            .collect();
        Locator {
            lines,
            group_lines,
            next_rule_search: Default::default(),
        }
    }

    fn group_line(&self, index: usize, _name: &str) -> Option<usize> {
        self.group_lines.get(index).copied()
    }

    fn rule_line(&self, rule: &RuleYaml) -> Option<usize> {
        let (key, name) = match (&rule.alert, &rule.record) {
            (Some(alert), _) => ("alert", alert.as_str()),
            (None, Some(record)) => ("record", record.as_str()),
            (None, None) => return None,
        };
        let mut searches = self.next_rule_search.borrow_mut();
        let from = searches
            .get(&(key.to_owned(), name.to_owned()))
            .copied()
            .unwrap_or(0);
        for (index, line) in self.lines.iter().enumerate().skip(from) {
            let trimmed = line.trim_start().trim_start_matches('-').trim_start();
            if let Some(value) = trimmed.strip_prefix(key)
                && let Some(value) = value.trim_start().strip_prefix(':')
            {
                let value = value.trim().trim_matches(|c| c == '"' || c == '\'');
                if value == name {
                    searches.insert((key.to_owned(), name.to_owned()), index + 1);
                    return Some(index + 1);
                }
            }
        }
        None
    }
}

pub(crate) fn is_metric_name(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_' || c == ':')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
}

pub(crate) fn is_label_name(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Vec<RuleGroup>, RuleError> {
        let thresholds = BTreeMap::from([("hot".to_string(), "90".to_string())]);
        parse_file(
            Path::new("r.yml"),
            text,
            Duration::from_secs(5),
            &thresholds,
            &mut HashMap::new(),
        )
    }

    #[test]
    fn a_valid_file_loads_with_substituted_thresholds() {
        let groups = parse(
            "groups:\n- name: gpu\n  interval: 10s\n  rules:\n  - alert: Hot\n    expr: t > ${hot:-85}\n    for: 2m\n    labels: {severity: warning}\n    annotations:\n      summary: 'GPU {{ $labels.gpu }} at {{ $value }}'\n  - record: job:t:max\n    expr: max by (node) (t > ${cold:-10})\n",
        )
        .unwrap();
        assert_eq!(groups.len(), 1);
        assert_eq!(groups[0].interval, Duration::from_secs(10));
        assert_eq!(groups[0].rules[0].expr, "t > 90");
        assert_eq!(groups[0].rules[0].line, 5);
        assert_eq!(groups[0].rules[1].expr, "max by (node) (t > 10)");
        assert_eq!(groups[0].rules[1].line, 11);
    }

    #[test]
    fn errors_carry_file_line_and_reason() {
        let error =
            parse("groups:\n- name: g\n  rules:\n  - alert: A\n    expr: up\n    anotations: {}\n")
                .unwrap_err();
        assert_eq!(error.line, Some(6), "{error}");
        assert!(error.to_string().starts_with("r.yml:6:"), "{error}");
        assert!(error.message.contains("anotations"), "{error}");

        let error =
            parse("groups:\n- name: g\n  rules:\n  - alert: A\n    expr: up\n  - alert: B\n    expr: rate(up[5m]\n")
                .unwrap_err();
        assert_eq!(error.line, Some(6), "{error}");
        assert!(error.message.contains("rule \"B\""), "{error}");

        let error = parse("groups:\n- name: g\n  interval: 500ms\n  rules: []\n").unwrap_err();
        assert!(error.message.contains("minimum"), "{error}");

        let error =
            parse("groups:\n- name: g\n  rules:\n  - record: r\n    expr: up\n    for: 1m\n")
                .unwrap_err();
        assert!(error.message.contains("only for alerting"), "{error}");

        let error = parse("groups:\n- name: g\n  rules:\n  - alert: A\n    expr: up > ${nope}\n")
            .unwrap_err();
        assert!(
            error.message.contains("alerting.thresholds.nope"),
            "{error}"
        );

        let error =
            parse("groups:\n- name: g\n  rules:\n  - alert: A\n    expr: up[5m]\n").unwrap_err();
        assert!(error.message.contains("instant vector"), "{error}");
    }
}
