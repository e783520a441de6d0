//! A helper process that holds probes attached while the benchmark measures: started, waited on
//! until it says it has attached, then stopped (stdin EOF or SIGINT) and checked for a clean exit.

use std::io::{BufRead, BufReader, Read};
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

/// How long a helper may take to load and attach, and to detach and exit.
const ATTACH_TIMEOUT: Duration = Duration::from_secs(60);
const EXIT_TIMEOUT: Duration = Duration::from_secs(30);

pub struct ProbeProcess {
    name: String,
    child: Child,
    /// Held open while measuring; closing it is the agent's signal to detach and exit.
    stdin: Option<ChildStdin>,
    /// Everything the helper writes to stderr, for error messages.
    stderr: Option<JoinHandle<String>>,
}

impl ProbeProcess {
    /// Starts `command` with piped stdio and returns once a line of its stdout satisfies
    /// `is_ready`. The rest of its stdout is read and dropped, so it never blocks on a full pipe.
    pub fn start(name: &str, mut command: Command, is_ready: fn(&str) -> bool) -> Result<Self> {
        let mut child = command
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("cannot start {name} ({:?})", command.get_program()))?;
        let stdout = child.stdout.take().expect("stdout is piped");
        let mut stderr_pipe = child.stderr.take().expect("stderr is piped");
        let mut process = ProbeProcess {
            name: name.to_string(),
            stdin: child.stdin.take(),
            child,
            stderr: Some(thread::spawn(move || {
                let mut text = String::new();
                let _ = stderr_pipe.read_to_string(&mut text);
                text
            })),
        };
        let lines = stdout_lines(stdout);

        let deadline = Instant::now() + ATTACH_TIMEOUT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match lines.recv_timeout(left) {
                Ok(line) if is_ready(&line) => return Ok(process),
                Ok(_) => continue,
                Err(RecvTimeoutError::Disconnected) => {
                    let status = process.wait(EXIT_TIMEOUT)?;
                    bail!(
                        "{name} exited ({status}) before it was ready:\n{}",
                        process.stderr_text()
                    );
                }
                Err(RecvTimeoutError::Timeout) => {
                    let _ = process.child.kill();
                    let _ = process.child.wait();
                    bail!(
                        "{name} was not ready after {ATTACH_TIMEOUT:?}:\n{}",
                        process.stderr_text()
                    );
                }
            }
        }
    }

    /// Closes the helper's stdin (the agent's signal to detach) and requires exit status 0.
    pub fn stop_by_closing_stdin(mut self) -> Result<()> {
        drop(self.stdin.take());
        let status = self.wait(EXIT_TIMEOUT)?;
        if !status.success() {
            let stderr = self.stderr_text();
            bail!("{} failed ({status}):\n{stderr}", self.name);
        }
        Ok(())
    }

    /// Sends SIGINT (bpftrace's way to stop) and waits for the exit.
    pub fn stop_by_sigint(mut self) -> Result<()> {
        let pid = libc::pid_t::try_from(self.child.id()).expect("pids fit in pid_t");
        // SAFETY: kill has no memory-safety preconditions; `pid` is our own, not yet reaped, child.
        unsafe { libc::kill(pid, libc::SIGINT) };
        let status = self.wait(EXIT_TIMEOUT)?;
        if !status.success() {
            let stderr = self.stderr_text();
            bail!("{} failed after SIGINT ({status}):\n{stderr}", self.name);
        }
        Ok(())
    }

    fn wait(&mut self, timeout: Duration) -> Result<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Ok(status);
            }
            if Instant::now() >= deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                bail!("{} did not exit within {timeout:?}; killed it", self.name);
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// The helper's stderr; complete once it has exited.
    fn stderr_text(&mut self) -> String {
        self.stderr
            .take()
            .and_then(|reader| reader.join().ok())
            .map(|text| text.trim_end().to_string())
            .unwrap_or_default()
    }
}

impl Drop for ProbeProcess {
    /// A helper left running would keep probes attached after the benchmark fails.
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Reads `stdout` line by line on a thread until EOF; the receiver disconnects at EOF.
fn stdout_lines(stdout: impl Read + Send + 'static) -> Receiver<String> {
    let (sender, receiver) = mpsc::channel();
    thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            // Once the reader is gone (after `ready`), keep draining without sending.
            let _ = sender.send(line);
        }
    });
    receiver
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sh(script: &str) -> Command {
        let mut command = Command::new("sh");
        command.args(["-c", script]);
        command
    }

    #[test]
    fn a_helper_is_ready_at_its_ready_line_and_exits_cleanly_at_stdin_eof() {
        let helper = sh("echo loading; echo ready; cat >/dev/null; echo detached");
        let process = ProbeProcess::start("helper", helper, |line| line == "ready").unwrap();
        process.stop_by_closing_stdin().unwrap();
    }

    #[test]
    fn a_helper_that_exits_before_ready_fails_with_its_stderr() {
        let helper = sh("echo 'cannot attach: permission denied' >&2; exit 3");
        let err = ProbeProcess::start("helper", helper, |line| line == "ready")
            .err()
            .expect("the helper never said ready");
        let message = format!("{err:#}");
        assert!(message.contains("exit status: 3"), "{message}");
        assert!(
            message.contains("cannot attach: permission denied"),
            "{message}"
        );
    }

    #[test]
    fn a_helper_failing_at_detach_is_an_error_with_its_stderr() {
        let helper = sh("echo ready; cat >/dev/null; echo 'detach failed' >&2; exit 1");
        let process = ProbeProcess::start("helper", helper, |line| line == "ready").unwrap();
        let message = format!("{:#}", process.stop_by_closing_stdin().unwrap_err());
        assert!(message.contains("detach failed"), "{message}");
    }

    #[test]
    fn a_helper_stopped_by_sigint_exits_cleanly() {
        let helper =
            sh("trap 'exit 0' INT; echo 'Attaching 2 probes...'; while :; do sleep 0.05; done");
        let process =
            ProbeProcess::start("helper", helper, |line| line.contains("Attaching")).unwrap();
        process.stop_by_sigint().unwrap();
    }
}
