//! The agent's config file (TOML). Every key is documented on its struct; unknown keys are errors,
//! so a typo is reported instead of silently falling back to a default.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::{
    attribution::AttributionConfig,
    collectors::{
        gpu::GpuConfig, host::HostConfig, process::ProcessConfig, syscalls::SyscallsConfig,
    },
    exposition::MetricsConfig,
    selection::SelectionConfig,
    transport::TransportConfig,
};

/// Where `vigil-agent` looks for its config when `--config` is not given.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/vigil/agent.toml";

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AgentConfig {
    /// Which processes are model servers (`[selection]`, `[[selection.rules]]`).
    pub selection: SelectionConfig,
    /// Kernel syscall latency (`[syscalls]`).
    pub syscalls: SyscallsConfig,
    /// Per model-server process stats from /proc (`[process]`).
    pub process: ProcessConfig,
    /// NVIDIA GPU telemetry through NVML (`[gpu]`).
    pub gpu: GpuConfig,
    /// Node-wide stats: CPU, memory, network, disks, filesystems, pressure (`[host]`).
    pub host: HostConfig,
    /// Container and Kubernetes pod labels for model-server processes (`[attribution]`).
    pub attribution: AttributionConfig,
    /// Streaming to the aggregator for `vigil-agent run` (`[transport]`).
    pub transport: TransportConfig,
    /// The agent's own `/metrics` endpoint for `vigil-agent run` (`[metrics]`).
    pub metrics: MetricsConfig,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
}

impl AgentConfig {
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        toml::from_str(&text).map_err(|e| ConfigError::Parse {
            path: path.to_owned(),
            message: e.to_string(),
        })
    }

    /// The file named on the command line; else the default path if it exists; else defaults.
    pub fn load(explicit: Option<&Path>) -> Result<Self, ConfigError> {
        match explicit {
            Some(path) => Self::from_file(path),
            None if Path::new(DEFAULT_CONFIG_PATH).exists() => {
                Self::from_file(Path::new(DEFAULT_CONFIG_PATH))
            }
            None => Ok(Self::default()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_typo_in_a_section_name_is_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.toml");
        std::fs::write(&path, "[syscall]\nenabled = false\n").unwrap();
        let err = AgentConfig::from_file(&path).unwrap_err().to_string();
        assert!(err.contains("unknown field `syscall`"), "{err}");
        assert!(err.contains("agent.toml"), "{err}");
    }

    #[test]
    fn a_full_config_parses() {
        let config: AgentConfig = toml::from_str(
            r#"
            [selection]
            builtin_rules = false
            [[selection.rules]]
            server = "ranker"
            pattern = "ranker_main"
            [syscalls]
            max_tracked_processes = 16
            histogram_syscalls = ["read", "ioctl"]
            "#,
        )
        .unwrap();
        assert!(!config.selection.builtin_rules);
        assert_eq!(config.selection.rules[0].server, "ranker");
        assert_eq!(config.syscalls.max_tracked_processes, 16);
        assert_eq!(config.syscalls.histogram_syscalls, ["read", "ioctl"]);
    }

    #[test]
    fn the_readme_example_config_is_valid() {
        let readme = include_str!("../../README.md");
        let start = readme.find("```toml\n").expect("README has a toml example") + 8;
        let end = start + readme[start..].find("```").unwrap();
        let config: AgentConfig = toml::from_str(&readme[start..end]).unwrap();
        assert_eq!(
            config.metrics.listen,
            Some("127.0.0.1:9465".parse().unwrap()),
            "the README's example serves /metrics"
        );
        config.syscalls.histogram_syscall_numbers().unwrap();
        crate::selection::ProcessSelector::new(&config.selection, &[]).unwrap();
    }

    #[test]
    fn a_missing_explicit_file_is_an_error() {
        let err = AgentConfig::load(Some(Path::new("/nonexistent/agent.toml"))).unwrap_err();
        assert!(err.to_string().contains("/nonexistent/agent.toml"));
    }
}
