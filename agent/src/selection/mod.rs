//! Model-server selection: decides which processes on the node are model servers the
//! agent tracks, and finds them in /proc each interval.
//!
//! The syscall-latency collector and the process collector both take their process
//! list from [`ProcessSelector::scan`], so they agree on what a model server is and
//! what it is called (the `server` label).
//!
//! A process is classified by the first rule that matches, in this order:
//!
//! 1. config rules (`[[selection.rules]]`), in file order — server name: the rule's
//!    `server`;
//! 2. `--track REGEX` patterns — server name: the built-in name if a built-in rule
//!    also recognises the process (so `--track tritonserver` still reports
//!    `triton`), otherwise the process's comm (what `ps` and `top` show). Built-in
//!    names are only consulted while `builtin_rules` is on;
//! 3. built-in rules, unless `builtin_rules = false`: triton, vllm, sglang, tgi,
//!    torchserve, tf-serving, ray-serve (see `rules.rs` for exactly what each matches).
//!
//! Config and `--track` patterns are unanchored regexes tested against comm, the exe
//! path, the exe file name and the cmdline joined with spaces; any hit counts.
//! Built-in rules are stricter and look at how the process was launched, so an
//! editor or `grep` that mentions a server is not mistaken for one.
//!
//! Kernel threads, zombies and the agent itself are never selected: a `--track`
//! pattern usually appears verbatim in the agent's own cmdline.

pub mod budget;
mod proc_scan;
mod rules;

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::Mutex;

use self::rules::UserPattern;

/// One rule as written in the agent config file, e.g.
///
/// ```toml
/// [[selection.rules]]
/// server = "my-ranker"
/// pattern = "ranker_main"
/// ```
#[derive(Debug, Clone, serde::Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RuleConfig {
    /// Server name reported for processes this rule selects.
    pub server: String,
    /// Regex tested against comm, exe path, exe file name and the joined cmdline.
    pub pattern: String,
}

/// The `[selection]` table of the agent config file.
#[derive(Debug, Clone, serde::Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct SelectionConfig {
    /// Match the built-in model-server rules (default true).
    pub builtin_rules: bool,
    /// Extra rules, checked before the built-in ones.
    pub rules: Vec<RuleConfig>,
    /// Most model-server processes that get series of their own (default 64). Over this,
    /// the busiest (recent CPU plus GPU use, see [`budget::ProcessBudget`]) are kept and the
    /// rest are summed into `server="other"` series, so a node with hundreds of workers
    /// cannot flood the store. 0 folds every process.
    pub max_tracked_processes: usize,
}

impl Default for SelectionConfig {
    fn default() -> Self {
        Self {
            builtin_rules: true,
            rules: Vec::new(),
            max_tracked_processes: 64,
        }
    }
}

/// Why a [`ProcessSelector`] could not be built from the config and command line.
#[derive(Debug, thiserror::Error)]
pub enum SelectionError {
    /// A config rule's `pattern` is not a valid regex.
    ///
    /// The regex error is part of the message rather than a `source`, so it is shown
    /// however the caller prints the error.
    #[error("selection rule for server `{server}` has an invalid pattern `{pattern}`: {error}")]
    InvalidRulePattern {
        server: String,
        pattern: String,
        error: regex::Error,
    },
    /// A `--track` value is not a valid regex.
    #[error("--track `{pattern}` is not a valid regex: {error}")]
    InvalidTrackPattern {
        pattern: String,
        error: regex::Error,
    },
    /// A config rule has `server = ""`, which would produce an empty server label.
    #[error("selection rule with pattern `{pattern}` has an empty server name")]
    EmptyServerName { pattern: String },
}

/// What a process is, as far as selection is concerned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcessIdentity {
    /// `/proc/PID/comm`: the exec'd file name (or a name the process set), at most 15 bytes.
    pub comm: String,
    /// Target of `/proc/PID/exe`, without the kernel's " (deleted)" suffix; `None` if
    /// unreadable (another user's process without ptrace access, or the process exited).
    pub exe: Option<String>,
    /// `/proc/PID/cmdline` split at NULs.
    pub cmdline: Vec<String>,
}

/// A process selected as a model server.
/// The model servers of one collection pass, after the cardinality budget: `tracked` processes
/// get series of their own; `folded` ones (over the budget) count only towards
/// `server="other"` aggregates.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PassSelection {
    pub tracked: Vec<ModelServerProcess>,
    pub folded: Vec<ModelServerProcess>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelServerProcess {
    pub pid: u32,
    /// Field 22 of /proc/PID/stat (clock ticks since boot): together with pid it identifies a process
    /// across PID reuse.
    pub start_time_ticks: u64,
    pub comm: String,
    pub server: String,
}

/// Decides which processes are model servers; built once from config and `--track`.
#[derive(Debug)]
pub struct ProcessSelector {
    config_rules: Vec<(String, UserPattern)>,
    track_patterns: Vec<UserPattern>,
    builtin_rules: bool,
    /// What earlier scans learned, so a scan reads little (see [`ScanCache`]).
    cache: Mutex<ScanCache>,
}

/// A process another scan looked at: who it was and what it was classified as.
#[derive(Debug)]
struct KnownProcess {
    start_time_ticks: u64,
    comm: String,
    /// `Some(server)` for a model server; `None` for anything else (kernel threads too).
    server: Option<String>,
}

/// Memory of earlier scans. Classifying a process takes its cmdline and exe; a scan of a node
/// with hundreds of processes every second cannot afford that for all of them. So:
/// * a pid not seen before is read in full and classified;
/// * a known model server has its stat re-read every scan (is it the same process, still
///   running the same program?);
/// * every other known process has its stat re-read every [`RECHECK_EVERY`] scans,
///   staggered by pid: a process that `exec`s into a model server (same pid and start time,
///   new comm) is found within that many scans.
///
/// A changed start time (pid reuse) or comm (exec, setproctitle) means a full read.
#[derive(Debug, Default)]
struct ScanCache {
    known: HashMap<u32, KnownProcess>,
    scans: u64,
    stat_buffer: Vec<u8>,
}

/// Scans between two stat reads of a known process that is not a model server.
const RECHECK_EVERY: u64 = 10;

impl ProcessSelector {
    /// Compiles the config rules and the `--track REGEX` command-line patterns.
    ///
    /// A process matched by a `--track` pattern is named after the built-in rule that
    /// also matches it (if built-ins are enabled), otherwise after its comm.
    pub fn new(config: &SelectionConfig, track: &[String]) -> Result<Self, SelectionError> {
        let config_rules = config
            .rules
            .iter()
            .map(|rule| {
                if rule.server.is_empty() {
                    return Err(SelectionError::EmptyServerName {
                        pattern: rule.pattern.clone(),
                    });
                }
                let pattern = UserPattern::new(&rule.pattern).map_err(|error| {
                    SelectionError::InvalidRulePattern {
                        server: rule.server.clone(),
                        pattern: rule.pattern.clone(),
                        error,
                    }
                })?;
                Ok((rule.server.clone(), pattern))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let track_patterns = track
            .iter()
            .map(|pattern| {
                UserPattern::new(pattern).map_err(|error| SelectionError::InvalidTrackPattern {
                    pattern: pattern.clone(),
                    error,
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self {
            config_rules,
            track_patterns,
            builtin_rules: config.builtin_rules,
            cache: Mutex::new(ScanCache::default()),
        })
    }

    /// Server name if this process is a model server. Patterns are matched against comm, the exe path
    /// (and its file name) and the cmdline joined with spaces.
    pub fn classify(&self, identity: &ProcessIdentity) -> Option<String> {
        let joined_cmdline = identity.cmdline.join(" ");
        if let Some((server, _)) = self
            .config_rules
            .iter()
            .find(|(_, pattern)| pattern.matches(identity, &joined_cmdline))
        {
            return Some(server.clone());
        }
        let builtin = || {
            self.builtin_rules
                .then(|| rules::builtin_server(identity))
                .flatten()
        };
        if self
            .track_patterns
            .iter()
            .any(|pattern| pattern.matches(identity, &joined_cmdline))
        {
            return Some(match builtin() {
                Some(server) => server.to_owned(),
                None => tracked_server_name(identity),
            });
        }
        builtin().map(str::to_owned)
    }

    /// Reads /proc and returns every model-server process, sorted by pid.
    pub fn scan(&self) -> Vec<ModelServerProcess> {
        self.scan_proc_root(Path::new("/proc"))
    }

    /// Like [`scan`](Self::scan) with another proc root (for tests).
    ///
    /// Processes that vanish mid-scan are skipped; an unreadable exe just leaves
    /// `exe` unset. The scanning process itself is never included.
    pub fn scan_proc_root(&self, proc_root: &Path) -> Vec<ModelServerProcess> {
        let own_pid = std::process::id();
        let mut guard = self
            .cache
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let cache = &mut *guard;
        cache.scans += 1;
        let pids = proc_scan::list_pids(proc_root);
        let listed: HashSet<u32> = pids.iter().copied().collect();
        cache.known.retain(|pid, _| listed.contains(pid));

        let mut selected = Vec::new();
        for pid in pids {
            if pid == own_pid {
                continue;
            }
            let known = cache.known.get(&pid);
            let due = known.is_none_or(|k| {
                k.server.is_some() || (u64::from(pid) + cache.scans).is_multiple_of(RECHECK_EVERY)
            });
            if !due {
                continue;
            }
            let Some(stat) = proc_scan::read_stat(proc_root, pid, &mut cache.stat_buffer) else {
                cache.known.remove(&pid); // gone
                continue;
            };
            // A model server that became a zombie is no longer one.
            let unchanged = !stat.ignored
                && known.is_some_and(|k| {
                    k.start_time_ticks == stat.start_time_ticks && k.comm == stat.comm
                });
            if !unchanged {
                // Read in full through one descriptor of /proc/PID, so start time, comm,
                // cmdline and exe all describe the same process.
                let full = (!stat.ignored)
                    .then(|| proc_scan::read_process_by_pid(proc_root, pid))
                    .flatten();
                let known = match full {
                    Some(process) => KnownProcess {
                        server: self.classify(&process.identity),
                        start_time_ticks: process.start_time_ticks,
                        comm: process.identity.comm,
                    },
                    None => KnownProcess {
                        start_time_ticks: stat.start_time_ticks,
                        comm: stat.comm,
                        server: None,
                    },
                };
                cache.known.insert(pid, known);
            }
            let known = &cache.known[&pid];
            if let Some(server) = &known.server {
                selected.push(ModelServerProcess {
                    pid,
                    start_time_ticks: known.start_time_ticks,
                    comm: known.comm.clone(),
                    server: server.clone(),
                });
            }
        }
        selected.sort_by_key(|process| process.pid);
        tracing::trace!(count = selected.len(), "model-server scan done");
        selected
    }
}

/// Server name for a `--track` match that no built-in rule names: comm, or — if a
/// process cleared its comm — the exe file name.
fn tracked_server_name(identity: &ProcessIdentity) -> String {
    if !identity.comm.is_empty() {
        return identity.comm.clone();
    }
    match identity.exe.as_deref().map(rules::file_name) {
        Some(name) if !name.is_empty() => name.to_owned(),
        _ => "tracked".to_owned(),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn identity(comm: &str, exe: Option<&str>, cmdline: &[&str]) -> ProcessIdentity {
        ProcessIdentity {
            comm: comm.to_owned(),
            exe: exe.map(str::to_owned),
            cmdline: cmdline.iter().map(|arg| (*arg).to_owned()).collect(),
        }
    }

    fn rule(server: &str, pattern: &str) -> RuleConfig {
        RuleConfig {
            server: server.to_owned(),
            pattern: pattern.to_owned(),
        }
    }

    fn selector(rules: Vec<RuleConfig>, builtin_rules: bool, track: &[&str]) -> ProcessSelector {
        let config = SelectionConfig {
            builtin_rules,
            rules,
            ..SelectionConfig::default()
        };
        let track: Vec<String> = track.iter().map(|t| (*t).to_owned()).collect();
        ProcessSelector::new(&config, &track).expect("valid selection config")
    }

    fn triton() -> ProcessIdentity {
        identity(
            "tritonserver",
            Some("/opt/tritonserver/bin/tritonserver"),
            &["tritonserver", "--model-repository=/models"],
        )
    }

    fn ranker() -> ProcessIdentity {
        identity(
            "ranker_main",
            Some("/opt/ranker/bin/ranker_main"),
            &["/opt/ranker/bin/ranker_main", "--port", "9000"],
        )
    }

    #[test]
    fn default_config_selects_builtin_servers_only() {
        let selector = selector(vec![], true, &[]);
        assert_eq!(selector.classify(&triton()).as_deref(), Some("triton"));
        assert_eq!(selector.classify(&ranker()), None);
    }

    #[test]
    fn config_rule_names_the_server_and_wins_over_builtin_rules() {
        let selector = selector(
            vec![
                rule("my-ranker", "ranker_main"),
                rule("edge-triton", "tritonserver"),
            ],
            true,
            &[],
        );
        assert_eq!(selector.classify(&ranker()).as_deref(), Some("my-ranker"));
        assert_eq!(selector.classify(&triton()).as_deref(), Some("edge-triton"));
    }

    #[test]
    fn first_matching_config_rule_wins() {
        let selector = selector(
            vec![rule("first", "ranker"), rule("second", "ranker_main")],
            true,
            &[],
        );
        assert_eq!(selector.classify(&ranker()).as_deref(), Some("first"));
    }

    #[test]
    fn user_patterns_match_comm_exe_path_exe_file_name_or_joined_cmdline() {
        let selector = selector(
            vec![
                rule("by-comm", "^rk-worker$"),
                rule("by-exe-path", "^/srv/models/"),
                rule("by-exe-name", "^ranker_main$"),
                rule("by-cmdline", "--model ranker-v2"),
            ],
            false,
            &[],
        );
        let classify = |comm, exe, cmdline| selector.classify(&identity(comm, exe, cmdline));
        assert_eq!(
            classify("rk-worker", Some("/usr/bin/python3"), &["python3", "w.py"]).as_deref(),
            Some("by-comm")
        );
        assert_eq!(
            classify("serve", Some("/srv/models/serve"), &["./serve"]).as_deref(),
            Some("by-exe-path")
        );
        assert_eq!(
            classify("rm-0", Some("/opt/rk/bin/ranker_main"), &["rm-0"]).as_deref(),
            Some("by-exe-name")
        );
        assert_eq!(
            classify(
                "python3",
                None,
                &["python3", "serve.py", "--model", "ranker-v2"]
            )
            .as_deref(),
            Some("by-cmdline")
        );
        assert_eq!(classify("python3", None, &["python3", "serve.py"]), None);
    }

    #[test]
    fn track_match_is_named_after_comm() {
        let selector = selector(vec![], true, &["ranker_main"]);
        assert_eq!(selector.classify(&ranker()).as_deref(), Some("ranker_main"));
    }

    #[test]
    fn track_match_that_a_builtin_rule_also_recognises_gets_the_builtin_name() {
        let selector = selector(vec![], true, &["tritonserver"]);
        assert_eq!(selector.classify(&triton()).as_deref(), Some("triton"));
    }

    #[test]
    fn config_rule_wins_over_track_pattern() {
        let selector = selector(vec![rule("my-ranker", "ranker")], true, &["ranker"]);
        assert_eq!(selector.classify(&ranker()).as_deref(), Some("my-ranker"));
    }

    #[test]
    fn disabled_builtin_rules_neither_select_nor_name_processes() {
        let without_track = selector(vec![], false, &[]);
        assert_eq!(without_track.classify(&triton()), None);
        let with_track = selector(vec![], false, &["tritonserver"]);
        assert_eq!(
            with_track.classify(&triton()).as_deref(),
            Some("tritonserver")
        );
    }

    #[test]
    fn track_match_with_empty_comm_is_named_after_the_exe_file_name() {
        let selector = selector(vec![], true, &["ranker_main"]);
        let process = identity("", Some("/opt/ranker/bin/ranker_main"), &[]);
        assert_eq!(selector.classify(&process).as_deref(), Some("ranker_main"));
    }

    #[test]
    fn invalid_config_rule_pattern_is_an_error_naming_the_rule() {
        let config = SelectionConfig {
            builtin_rules: true,
            rules: vec![rule("ok", "fine"), rule("my-ranker", "ranker(")],
            ..SelectionConfig::default()
        };
        let error = ProcessSelector::new(&config, &[]).unwrap_err();
        assert!(
            matches!(&error, SelectionError::InvalidRulePattern { server, pattern, .. }
                if server == "my-ranker" && pattern == "ranker("),
            "{error:?}"
        );
        let message = error.to_string();
        assert!(
            message.starts_with(
                "selection rule for server `my-ranker` has an invalid pattern `ranker(`: regex parse error"
            ),
            "{message}"
        );
        assert!(message.contains("unclosed group"), "{message}");
    }

    #[test]
    fn invalid_track_pattern_is_an_error_naming_the_track_value() {
        let track = vec!["ok".to_owned(), "[model".to_owned()];
        let error = ProcessSelector::new(&SelectionConfig::default(), &track).unwrap_err();
        assert!(
            matches!(&error, SelectionError::InvalidTrackPattern { pattern, .. } if pattern == "[model"),
            "{error:?}"
        );
        let message = error.to_string();
        assert!(
            message.starts_with("--track `[model` is not a valid regex: regex parse error"),
            "{message}"
        );
        assert!(message.contains("unclosed character class"), "{message}");
    }

    #[test]
    fn empty_server_name_is_an_error() {
        let config = SelectionConfig {
            builtin_rules: true,
            rules: vec![rule("", "ranker")],
            ..SelectionConfig::default()
        };
        let error = ProcessSelector::new(&config, &[]).unwrap_err();
        assert_eq!(
            error.to_string(),
            "selection rule with pattern `ranker` has an empty server name"
        );
    }

    /// The shape of the agent config file around the `[selection]` table.
    #[derive(Debug, serde::Deserialize)]
    struct AgentConfig {
        #[serde(default)]
        selection: SelectionConfig,
    }

    #[test]
    fn selection_config_parses_from_toml() {
        let config: AgentConfig = toml::from_str(
            r#"
            [selection]
            builtin_rules = false
            max_tracked_processes = 16

            [[selection.rules]]
            server = "my-ranker"
            pattern = "ranker_main"

            [[selection.rules]]
            server = "embedder"
            pattern = "^embed-"
            "#,
        )
        .unwrap();
        assert_eq!(
            config.selection,
            SelectionConfig {
                builtin_rules: false,
                rules: vec![
                    rule("my-ranker", "ranker_main"),
                    rule("embedder", "^embed-")
                ],
                max_tracked_processes: 16,
            }
        );
    }

    #[test]
    fn missing_selection_keys_take_defaults() {
        let absent: AgentConfig = toml::from_str("").unwrap();
        assert_eq!(absent.selection, SelectionConfig::default());
        assert_eq!(
            SelectionConfig::default(),
            SelectionConfig {
                builtin_rules: true,
                rules: vec![],
                max_tracked_processes: 64,
            }
        );
        let rules_only: AgentConfig = toml::from_str(
            "[[selection.rules]]\nserver = \"my-ranker\"\npattern = \"ranker_main\"\n",
        )
        .unwrap();
        assert!(rules_only.selection.builtin_rules);
    }

    #[test]
    fn unknown_selection_key_is_rejected_with_the_key_named() {
        let error = toml::from_str::<AgentConfig>("[selection]\nbuiltin_rule = false\n")
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("unknown field `builtin_rule`, expected one of `builtin_rules`, `rules`, `max_tracked_processes`"),
            "{error}"
        );
    }

    #[test]
    fn unknown_rule_key_is_rejected_with_the_key_named() {
        let error = toml::from_str::<AgentConfig>(
            "[[selection.rules]]\nserver = \"my-ranker\"\npatern = \"ranker_main\"\n",
        )
        .unwrap_err()
        .to_string();
        assert!(
            error.contains("unknown field `patern`, expected `server` or `pattern`"),
            "{error}"
        );
    }

    #[test]
    fn rule_without_pattern_is_rejected() {
        let error = toml::from_str::<AgentConfig>("[[selection.rules]]\nserver = \"my-ranker\"\n")
            .unwrap_err()
            .to_string();
        assert!(error.contains("missing field `pattern`"), "{error}");
    }
}
