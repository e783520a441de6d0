//! Matching rules: the built-in model-server rules and the operator's regex patterns.
//!
//! Operator patterns (config rules and `--track`) are deliberately broad: they are
//! unanchored regexes tested against comm, the exe path, the exe file name and the
//! cmdline joined with spaces, because the operator chose them for their own node.
//!
//! Built-in rules run on every node of the fleet, so they look at how a process was
//! *launched* — the program it runs, the Python module or script, the Java main
//! class, or the process title the server sets for itself — and never at a word that
//! merely appears somewhere in the arguments: `vim vllm_notes.txt` and
//! `grep tritonserver` are not model servers.

use std::sync::LazyLock;

use regex::Regex;

use super::ProcessIdentity;

/// The kernel keeps at most this many bytes of a process name in comm
/// (`TASK_COMM_LEN - 1`): "tensorflow_model_server" shows up as "tensorflow_mode".
pub(super) const COMM_LEN: usize = 15;

/// An operator-written regex (a config rule's `pattern` or a `--track` value).
#[derive(Debug, Clone)]
pub(super) struct UserPattern(Regex);

impl UserPattern {
    pub(super) fn new(pattern: &str) -> Result<Self, regex::Error> {
        Regex::new(pattern).map(Self)
    }

    /// True if the regex matches comm, the exe path, the exe file name or the joined
    /// cmdline. The file name is tried on its own so that an anchored pattern such as
    /// `^ranker_main$` works against the exe.
    pub(super) fn matches(&self, identity: &ProcessIdentity, joined_cmdline: &str) -> bool {
        let re = &self.0;
        re.is_match(&identity.comm)
            || identity
                .exe
                .as_deref()
                .is_some_and(|exe| re.is_match(exe) || re.is_match(file_name(exe)))
            || re.is_match(joined_cmdline)
    }
}

/// The built-in rule that claims this process, as its server name.
pub(super) fn builtin_server(identity: &ProcessIdentity) -> Option<&'static str> {
    let launch = Launch::new(identity);
    BUILTIN_RULES
        .iter()
        .find(|rule| rule.matchers.iter().any(|m| launch.satisfies(m)))
        .map(|rule| rule.server)
}

/// The last component of a `/`-separated path.
pub(super) fn file_name(path: &str) -> &str {
    path.rsplit_once('/').map_or(path, |(_, name)| name)
}

/// One way of recognising a model server from its launch.
enum Matcher {
    /// Runs this program: the exe file name, argv\[0\]'s file name or a Python
    /// script's file name equals it. Comm (possibly truncated) is used only when none
    /// of those explains it, see [`Launch::runs_program`].
    Program(&'static str),
    /// `PROGRAM SUBCOMMAND ...`, run directly or as a Python console script. Needed
    /// where the same program is also a client (`vllm chat`, `vllm bench serve`).
    Subcommand(&'static str, &'static str),
    /// A process title set with setproctitle (which rewrites argv\[0\] and comm):
    /// argv\[0\] or comm starts with this prefix.
    Title(&'static str),
    /// A Python interpreter running `-m MODULE`, MODULE matching the regex.
    PythonModule(Regex),
    /// A Python interpreter running a script whose path matches the regex.
    PythonScript(Regex),
    /// A Java VM with this main class among its arguments.
    JavaMain(&'static str),
}

struct BuiltinRule {
    server: &'static str,
    matchers: Vec<Matcher>,
}

static BUILTIN_RULES: LazyLock<Vec<BuiltinRule>> = LazyLock::new(|| {
    use Matcher::*;
    let re = |pattern: &str| Regex::new(pattern).expect("built-in selection patterns are valid");
    vec![
        BuiltinRule {
            server: "triton",
            matchers: vec![
                Program("tritonserver"),
                // Python-backend models run in stub processes that do the model's work.
                Program("triton_python_backend_stub"),
            ],
        },
        BuiltinRule {
            server: "vllm",
            matchers: vec![
                Subcommand("vllm", "serve"),
                PythonModule(re(r"^vllm\.entrypoints\.")),
                PythonScript(re(r"(^|/)vllm/entrypoints/.+\.py$")),
                // Engine cores, workers and API servers: "VLLM::EngineCore_DP0",
                // "VLLM::Worker_TP1" (prefix from VLLM_PROCESS_NAME_PREFIX, default VLLM).
                Title("VLLM::"),
            ],
        },
        BuiltinRule {
            server: "sglang",
            matchers: vec![
                PythonModule(re(r"^sglang\.(launch_server$|srt\.)")),
                PythonScript(re(r"(^|/)sglang/(launch_server\.py$|srt/)")),
                // "sglang::scheduler_TP0", "sglang::detokenizer", ...
                Title("sglang::"),
            ],
        },
        BuiltinRule {
            server: "tgi",
            matchers: vec![
                Program("text-generation-launcher"),
                Program("text-generation-router"),
                // The Python shards; a console script, so exe is the interpreter.
                Program("text-generation-server"),
            ],
        },
        BuiltinRule {
            server: "torchserve",
            matchers: vec![
                JavaMain("org.pytorch.serve.ModelServer"),
                Program("torchserve"),
                PythonScript(re(r"(^|/)model_service_worker\.py$")),
                PythonModule(re(r"^ts\.model_service_worker$")),
            ],
        },
        BuiltinRule {
            server: "tf-serving",
            matchers: vec![Program("tensorflow_model_server")],
        },
        BuiltinRule {
            server: "ray-serve",
            matchers: vec![
                // Ray actors retitle themselves "ray::<Actor>...". Generic workers
                // ("ray::IDLE", training actors) are not Serve and do not match.
                Title("ray::ServeReplica"),
                Title("ray::ServeController"),
                Title("ray::ProxyActor"),
                Title("ray::HTTPProxyActor"),
                Subcommand("serve", "run"),
            ],
        },
    ]
});

/// What a Python interpreter was asked to run.
enum PythonRun<'a> {
    Module { module: &'a str },
    Script { path: &'a str, args: &'a [String] },
}

/// A process's identity, pre-digested for the built-in matchers.
struct Launch<'a> {
    comm: &'a str,
    exe_name: Option<&'a str>,
    argv0: Option<&'a str>,
    argv0_name: Option<&'a str>,
    cmdline: &'a [String],
    python: Option<PythonRun<'a>>,
}

impl<'a> Launch<'a> {
    fn new(identity: &'a ProcessIdentity) -> Self {
        let argv0 = identity.cmdline.first().map(String::as_str);
        let argv0_name = argv0.map(file_name);
        let python = match (argv0_name, identity.cmdline.get(1..)) {
            (Some(name), Some(args)) if is_python(name) => python_run(args),
            _ => None,
        };
        Self {
            comm: &identity.comm,
            exe_name: identity.exe.as_deref().map(file_name),
            argv0,
            argv0_name,
            cmdline: &identity.cmdline,
            python,
        }
    }

    fn satisfies(&self, matcher: &Matcher) -> bool {
        match matcher {
            Matcher::Program(name) => self.runs_program(name),
            Matcher::Subcommand(program, subcommand) => {
                self.command().is_some_and(|(name, args)| {
                    name == *program && args.first().is_some_and(|arg| arg == subcommand)
                })
            }
            Matcher::Title(prefix) => {
                self.argv0.is_some_and(|argv0| argv0.starts_with(prefix))
                    || self.comm.starts_with(prefix)
                    || (self.comm.len() == COMM_LEN && prefix.starts_with(self.comm))
            }
            Matcher::PythonModule(re) => {
                matches!(self.python, Some(PythonRun::Module { module }) if re.is_match(module))
            }
            Matcher::PythonScript(re) => {
                matches!(self.python, Some(PythonRun::Script { path, .. }) if re.is_match(path))
            }
            Matcher::JavaMain(class) => {
                (self.exe_name == Some("java") || self.argv0_name == Some("java"))
                    && self.cmdline.iter().skip(1).any(|arg| arg == class)
            }
        }
    }

    /// Untruncated names of the program this process runs.
    fn full_names(&self) -> impl Iterator<Item = &'a str> + Clone {
        let script = match self.python {
            Some(PythonRun::Script { path, .. }) => Some(file_name(path)),
            _ => None,
        };
        [self.exe_name, self.argv0_name, script]
            .into_iter()
            .flatten()
    }

    fn runs_program(&self, name: &str) -> bool {
        let mut full_names = self.full_names();
        if full_names.clone().any(|full| full == name) {
            return true;
        }
        // Comm is the exec'd file name cut to 15 bytes, so "text-generation" could be
        // the launcher or text-generation-benchmark (a load generator). When a full
        // name accounts for comm we have already judged the untruncated name above;
        // comm only decides when nothing else names the program (exe unreadable,
        // argv[0] rewritten).
        !full_names.any(|full| comm_of(full) == self.comm.as_bytes())
            && comm_of(name) == self.comm.as_bytes()
    }

    /// The command name and its arguments: the script for a Python console script
    /// (`python3 /usr/local/bin/vllm serve ...`), otherwise argv\[0\].
    fn command(&self) -> Option<(&'a str, &'a [String])> {
        match self.python {
            Some(PythonRun::Script { path, args }) => Some((file_name(path), args)),
            _ => Some((self.argv0_name?, self.cmdline.get(1..)?)),
        }
    }
}

/// The comm the kernel would show for a program of this name.
fn comm_of(name: &str) -> &[u8] {
    &name.as_bytes()[..name.len().min(COMM_LEN)]
}

/// `python`, `python3`, `python3.12`.
fn is_python(name: &str) -> bool {
    name.strip_prefix("python")
        .is_some_and(|version| version.chars().all(|c| c.is_ascii_digit() || c == '.'))
}

/// Finds the module or script in a Python interpreter's arguments (after argv\[0\]),
/// skipping interpreter options the way CPython parses them: clustered flags (`-uB`),
/// and `-W`/`-X`/`-m`/`-c` taking a value attached or as the next argument.
fn python_run(args: &[String]) -> Option<PythonRun<'_>> {
    let mut i = 0;
    while let Some(arg) = args.get(i) {
        i += 1;
        if arg == "--" {
            let path = args.get(i)?;
            return Some(PythonRun::Script {
                path,
                args: &args[i + 1..],
            });
        }
        if arg == "--check-hash-based-pycs" {
            i += 1;
            continue;
        }
        if arg.starts_with("--") {
            continue;
        }
        let Some(flags) = arg.strip_prefix('-') else {
            return Some(PythonRun::Script {
                path: arg,
                args: &args[i..],
            });
        };
        // "-" alone: the program comes from stdin.
        if flags.is_empty() {
            return None;
        }
        for (pos, flag) in flags.char_indices() {
            if !matches!(flag, 'm' | 'c' | 'W' | 'X') {
                continue;
            }
            let attached = &flags[pos + 1..];
            let value = if attached.is_empty() {
                i += 1;
                args.get(i - 1)?.as_str()
            } else {
                attached
            };
            match flag {
                'm' => return Some(PythonRun::Module { module: value }),
                'c' => return None,
                _ => break,
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::selection::tests::identity;

    #[track_caller]
    fn assert_server(expected: Option<&str>, comm: &str, exe: Option<&str>, cmdline: &[&str]) {
        assert_eq!(
            builtin_server(&identity(comm, exe, cmdline)),
            expected,
            "comm={comm:?} exe={exe:?} cmdline={cmdline:?}"
        );
    }

    #[test]
    fn triton_server_and_its_python_backend_stubs_are_triton() {
        assert_server(
            Some("triton"),
            "tritonserver",
            Some("/opt/tritonserver/bin/tritonserver"),
            &[
                "tritonserver",
                "--model-repository=/models",
                "--http-port=8000",
            ],
        );
        assert_server(
            Some("triton"),
            "triton_python_b",
            Some("/opt/tritonserver/backends/python/triton_python_backend_stub"),
            &[
                "/opt/tritonserver/backends/python/triton_python_backend_stub",
                "/models/preprocess/1/model.py",
                "triton_python_backend_shm_region_1",
                "1048576",
                "1048576",
                "1",
                "/opt/tritonserver/backends/python",
                "336",
                "preprocess_0_0",
                "DEFAULT",
            ],
        );
    }

    #[test]
    fn vllm_serve_console_script_is_vllm() {
        assert_server(
            Some("vllm"),
            "vllm",
            Some("/usr/bin/python3.12"),
            &[
                "/usr/bin/python3",
                "/usr/local/bin/vllm",
                "serve",
                "meta-llama/Llama-3.1-8B-Instruct",
                "--tensor-parallel-size",
                "2",
            ],
        );
    }

    #[test]
    fn vllm_openai_api_server_module_is_vllm_even_after_interpreter_options() {
        assert_server(
            Some("vllm"),
            "python3",
            Some("/usr/bin/python3.12"),
            &[
                "python3",
                "-m",
                "vllm.entrypoints.openai.api_server",
                "--model",
                "facebook/opt-125m",
                "--port",
                "8000",
            ],
        );
        assert_server(
            Some("vllm"),
            "python3",
            Some("/usr/bin/python3.12"),
            &[
                "python3",
                "-u",
                "-X",
                "faulthandler",
                "-mvllm.entrypoints.api_server",
                "--model",
                "facebook/opt-125m",
            ],
        );
    }

    #[test]
    fn vllm_engine_core_and_worker_titles_are_vllm_even_with_truncated_comm() {
        assert_server(
            Some("vllm"),
            "VLLM::EngineCor",
            Some("/usr/bin/python3.12"),
            &["VLLM::EngineCore_DP0"],
        );
        assert_server(
            Some("vllm"),
            "VLLM::Worker_TP",
            Some("/usr/bin/python3.12"),
            &["VLLM::Worker_TP1"],
        );
    }

    #[test]
    fn sglang_launch_server_and_its_titled_subprocesses_are_sglang() {
        assert_server(
            Some("sglang"),
            "python3",
            Some("/usr/bin/python3.10"),
            &[
                "python3",
                "-m",
                "sglang.launch_server",
                "--model-path",
                "meta-llama/Llama-3.1-8B-Instruct",
                "--port",
                "30000",
            ],
        );
        assert_server(
            Some("sglang"),
            "python",
            Some("/usr/bin/python3.10"),
            &[
                "python",
                "-m",
                "sglang.srt.disaggregation.mini_lb",
                "--port",
                "8000",
            ],
        );
        assert_server(
            Some("sglang"),
            "sglang::schedul",
            Some("/usr/bin/python3.10"),
            &["sglang::scheduler_TP0"],
        );
        assert_server(
            Some("sglang"),
            "sglang::detoken",
            Some("/usr/bin/python3.10"),
            &["sglang::detokenizer"],
        );
    }

    #[test]
    fn tgi_launcher_router_and_python_shards_are_tgi() {
        assert_server(
            Some("tgi"),
            "text-generation",
            Some("/usr/local/bin/text-generation-launcher"),
            &[
                "text-generation-launcher",
                "--model-id",
                "bigscience/bloom-560m",
                "--num-shard",
                "1",
            ],
        );
        assert_server(
            Some("tgi"),
            "text-generation",
            Some("/usr/local/bin/text-generation-router"),
            &[
                "text-generation-router",
                "--max-concurrent-requests",
                "128",
                "--port",
                "80",
            ],
        );
        assert_server(
            Some("tgi"),
            "text-generation",
            Some("/opt/conda/bin/python3.11"),
            &[
                "/opt/conda/bin/python3.11",
                "/opt/conda/bin/text-generation-server",
                "serve",
                "bigscience/bloom-560m",
                "--uds-path",
                "/tmp/text-generation-server",
                "--json-output",
            ],
        );
    }

    #[test]
    fn torchserve_frontend_workers_and_launcher_are_torchserve() {
        assert_server(
            Some("torchserve"),
            "java",
            Some("/usr/lib/jvm/java-17-openjdk-amd64/bin/java"),
            &[
                "java",
                "-Dmodel_server_home=/home/venv/lib/python3.9/site-packages",
                "-cp",
                ".:/home/venv/lib/python3.9/site-packages/ts/frontend/*",
                "org.pytorch.serve.ModelServer",
                "--python",
                "/home/venv/bin/python",
                "-f",
                "/home/model-server/config.properties",
                "-ncs",
            ],
        );
        assert_server(
            Some("torchserve"),
            "python",
            Some("/usr/bin/python3.9"),
            &[
                "/home/venv/bin/python",
                "/home/venv/lib/python3.9/site-packages/ts/model_service_worker.py",
                "--sock-type",
                "unix",
                "--sock-name",
                "/home/model-server/tmp/.ts.sock.9000",
            ],
        );
        assert_server(
            Some("torchserve"),
            "torchserve",
            Some("/usr/bin/python3.9"),
            &[
                "/home/venv/bin/python",
                "/home/venv/bin/torchserve",
                "--start",
                "--foreground",
                "--model-store",
                "/home/model-server/model-store",
            ],
        );
    }

    #[test]
    fn tensorflow_model_server_is_tf_serving_by_exe_or_by_truncated_comm_alone() {
        assert_server(
            Some("tf-serving"),
            "tensorflow_mode",
            Some("/usr/bin/tensorflow_model_server"),
            &[
                "tensorflow_model_server",
                "--port=8500",
                "--rest_api_port=8501",
                "--model_name=resnet",
                "--model_base_path=/models/resnet",
            ],
        );
        // exe unreadable (no ptrace access) and argv[0] rewritten: only comm is left.
        assert_server(
            Some("tf-serving"),
            "tensorflow_mode",
            None,
            &["tf-serving", "--port=8500"],
        );
    }

    #[test]
    fn ray_serve_actors_and_serve_run_are_ray_serve() {
        let python = Some("/home/ray/anaconda3/bin/python3.11");
        assert_server(
            Some("ray-serve"),
            "ray::ServeRepli",
            python,
            &["ray::ServeReplica:default:LLMServer"],
        );
        assert_server(
            Some("ray-serve"),
            "ray::ServeContr",
            python,
            &["ray::ServeController"],
        );
        assert_server(
            Some("ray-serve"),
            "ray::ProxyActor",
            python,
            &["ray::ProxyActor"],
        );
        assert_server(
            Some("ray-serve"),
            "ray::HTTPProxyA",
            python,
            &["ray::HTTPProxyActor"],
        );
        // Title in comm only (cmdline unreadable for a moment while being rewritten).
        assert_server(Some("ray-serve"), "ray::ServeRepli", python, &[]);
        assert_server(
            Some("ray-serve"),
            "serve",
            python,
            &[
                "/home/ray/anaconda3/bin/python",
                "/home/ray/anaconda3/bin/serve",
                "run",
                "config.yaml",
            ],
        );
    }

    #[test]
    fn tools_that_merely_mention_a_server_are_not_model_servers() {
        let near_misses: &[(&str, &str, &[&str])] = &[
            ("vim", "/usr/bin/vim.basic", &["vim", "vllm_notes.txt"]),
            ("grep", "/usr/bin/grep", &["grep", "tritonserver"]),
            (
                "tail",
                "/usr/bin/tail",
                &["tail", "-f", "/var/log/tritonserver.log"],
            ),
            ("python", "/usr/bin/python3.11", &["python", "train.py"]),
            (
                "python3",
                "/usr/bin/python3.11",
                &["python3", "-c", "import vllm; print(vllm.__version__)"],
            ),
            (
                "python3",
                "/usr/bin/python3.11",
                &["python3", "-m", "pytest", "tests/entrypoints/test_vllm.py"],
            ),
            (
                "pip",
                "/usr/bin/python3.11",
                &[
                    "/usr/bin/python3",
                    "/usr/bin/pip",
                    "install",
                    "vllm",
                    "sglang",
                ],
            ),
            ("bash", "/usr/bin/bash", &["bash", "run_vllm_serve.sh"]),
            (
                "java",
                "/usr/bin/java",
                &["java", "-jar", "app.jar", "--name", "org.pytorch.serve"],
            ),
            ("ray::IDLE", "/usr/bin/python3.11", &["ray::IDLE"]),
            (
                "raylet",
                "/usr/lib/ray/raylet",
                &["/usr/lib/ray/raylet", "--node_manager_port=0"],
            ),
            (
                "ray",
                "/usr/bin/python3.11",
                &["/usr/bin/python3", "/usr/local/bin/ray", "start", "--head"],
            ),
        ];
        for (comm, exe, cmdline) in near_misses {
            assert_server(None, comm, Some(exe), cmdline);
        }
    }

    #[test]
    fn server_clients_and_benchmarks_are_not_model_servers() {
        let python = Some("/usr/bin/python3.12");
        // vLLM's CLI is also its client and benchmark tool; only `vllm serve` serves.
        assert_server(
            None,
            "vllm",
            python,
            &["/usr/bin/python3", "/usr/local/bin/vllm", "chat"],
        );
        assert_server(
            None,
            "vllm",
            python,
            &[
                "/usr/bin/python3",
                "/usr/local/bin/vllm",
                "bench",
                "serve",
                "--model",
                "m",
            ],
        );
        // Same truncated comm as the TGI launcher, but the full exe name says otherwise.
        assert_server(
            None,
            "text-generation",
            Some("/usr/local/bin/text-generation-benchmark"),
            &[
                "text-generation-benchmark",
                "--tokenizer-name",
                "bigscience/bloom-560m",
            ],
        );
    }

    #[test]
    fn python_options_are_skipped_to_find_the_module_or_script() {
        let args = |list: &[&str]| list.iter().map(|a| (*a).to_owned()).collect::<Vec<_>>();
        let module = |list: &[&str]| match python_run(&args(list)) {
            Some(PythonRun::Module { module }) => Some(module.to_owned()),
            _ => None,
        };
        let script = |list: &[&str]| match python_run(&args(list)) {
            Some(PythonRun::Script { path, args }) => Some((path.to_owned(), args.to_vec())),
            _ => None,
        };
        assert_eq!(
            module(&["-um", "sglang.launch_server"]).as_deref(),
            Some("sglang.launch_server")
        );
        assert_eq!(
            module(&["-W", "ignore", "-OO", "-m", "ts.model_service_worker"]).as_deref(),
            Some("ts.model_service_worker")
        );
        assert_eq!(
            module(&["-Xdev", "-mvllm.entrypoints.api_server"]).as_deref(),
            Some("vllm.entrypoints.api_server")
        );
        assert_eq!(
            script(&[
                "-u",
                "--check-hash-based-pycs",
                "never",
                "serve.py",
                "--port",
                "80"
            ]),
            Some(("serve.py".to_owned(), args(&["--port", "80"])))
        );
        assert_eq!(
            script(&["--", "-odd-name.py"]),
            Some(("-odd-name.py".to_owned(), vec![]))
        );
        assert!(python_run(&args(&["-c", "import sglang.launch_server"])).is_none());
        assert!(python_run(&args(&["-", "sglang.launch_server"])).is_none());
        assert!(python_run(&args(&["-i"])).is_none());
        assert!(python_run(&args(&["-m"])).is_none());
    }
}
