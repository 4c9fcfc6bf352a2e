//! The supervised java process ([`Supervised`]): the `sh` supervisor that ties java to this
//! process (see the parent module's docs), the commands it takes, and how java ended.
//!
//! Must not: let java outlive the test process.

use std::ffi::OsString;
use std::fs::OpenOptions;
use std::io::{self, BufRead, BufReader, Write};
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use super::error::{HarnessError, io_error};

/// The supervisor: `sh -c SUPERVISOR nacos-supervisor DATA_DIR JAVA ARGS...`. See the module
/// docs.
///
/// fd 3 keeps the command pipe for the watcher; java gets neither it nor our stdout (the pid
/// line), and writes to the supervisor's stderr, the log file. A non-interactive shell gives a
/// background job /dev/null as stdin, so the watcher reads fd 3 explicitly.
///
/// When the pipe closes (our process dropped the server or died), the watcher marks the data
/// directory for removal (unless told `keep`) and kills java; the supervisor removes a marked
/// directory once java is gone. That cleans up after servers kept in a `static` or left behind
/// by a killed test, which nothing in our process can remove. The supervisor ignores SIGINT and
/// SIGHUP, so that a Ctrl-C in the terminal ends the test process but not the clean-up (java,
/// a background job, ignores them anyway; SIGTERM stays for `stop`).
const SUPERVISOR: &str = r#"
dir=$1
shift
trap '' INT HUP
exec 3<&0 </dev/null
"$@" 3<&- >&2 &
java=$!
echo "$java"
exec >/dev/null
(
  keep=0
  while IFS= read -r cmd <&3; do
    case "$cmd" in
      term) kill -TERM "$java" 2>/dev/null ;;
      kill) kill -KILL "$java" 2>/dev/null ;;
      keep) keep=1 ;;
    esac
  done
  [ "$keep" = 1 ] || : >"$dir/.owner-gone"
  kill -KILL "$java" 2>/dev/null
) &
watcher=$!
exec 3<&-
wait "$java"
status=$?
case "$dir" in
  */nacos-harness-*) [ -e "$dir/.owner-gone" ] && rm -rf "$dir" ;;
esac
kill "$watcher" 2>/dev/null
exit "$status"
"#;
/// The `sh` supervisor and, through it, java.
#[derive(Debug)]
pub(super) struct Supervised {
    supervisor: Child,
    pub(super) java_pid: u32,
}

impl Supervised {
    /// Starts java with `args` in `data_dir`, which it owns: see [`SUPERVISOR`].
    pub(super) fn spawn(
        java: &Path,
        args: &[OsString],
        data_dir: &Path,
        log_path: &Path,
    ) -> Result<Self, HarnessError> {
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(log_path)
            .map_err(io_error("opening the server log", log_path))?;
        let mut supervisor = Command::new("sh")
            .arg("-c")
            .arg(SUPERVISOR)
            .arg("nacos-supervisor")
            .arg(data_dir)
            .arg(java)
            .args(args)
            .current_dir(data_dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log))
            .spawn()
            .map_err(|err| HarnessError::Supervisor {
                detail: err.to_string(),
            })?;
        let mut line = String::new();
        let read = match supervisor.stdout.take() {
            Some(stdout) => BufReader::new(stdout)
                .read_line(&mut line)
                .map_err(|err| err.to_string()),
            None => Err("its stdout was not captured".to_owned()),
        };
        match read.and_then(|_| {
            line.trim()
                .parse::<u32>()
                .map_err(|_| format!("it printed {line:?}, not a pid"))
        }) {
            Ok(java_pid) => Ok(Self {
                supervisor,
                java_pid,
            }),
            Err(detail) => {
                drop(supervisor.stdin.take());
                let _ = supervisor.wait();
                Err(HarnessError::Supervisor { detail })
            }
        }
    }

    /// Sends a command to the supervisor. A supervisor that has exited cannot read it, which
    /// is fine: then java has exited too.
    pub(super) fn send(&mut self, command: &str) {
        if let Some(stdin) = self.supervisor.stdin.as_mut() {
            let _ = writeln!(stdin, "{command}").and_then(|()| stdin.flush());
        }
    }

    pub(super) fn exited(&mut self) -> Option<ExitStatus> {
        self.supervisor.try_wait().ok().flatten()
    }

    pub(super) fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        wait_timeout(&mut self.supervisor, timeout).ok().flatten()
    }

    /// SIGKILLs java and reaps the supervisor, keeping the pipe open until then so that the
    /// supervisor keeps the data directory (for a restart).
    pub(super) fn kill_and_wait(&mut self) -> Option<ExitStatus> {
        self.send("kill");
        // SIGKILL cannot be caught: this is quick unless the kernel is stuck.
        self.wait_exit(Duration::from_secs(60))
            .or_else(|| self.finish())
    }

    /// Closes the pipe, which makes the supervisor kill java and, unless told `keep`, delete
    /// the data directory; then reaps it.
    pub(super) fn finish(&mut self) -> Option<ExitStatus> {
        self.send("kill");
        drop(self.supervisor.stdin.take());
        self.supervisor.wait().ok()
    }
}

impl Drop for Supervised {
    fn drop(&mut self) {
        self.finish();
    }
}

pub(super) fn wait_timeout(child: &mut Child, timeout: Duration) -> io::Result<Option<ExitStatus>> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(Some(status));
        }
        if Instant::now() >= deadline {
            return Ok(None);
        }
        thread::sleep(Duration::from_millis(50));
    }
}

/// How java ended, from the supervisor's status (`wait` gives 128 + n for signal n).
pub(super) fn describe_exit(status: ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(code), _) if code > 128 && code < 160 => {
            format!("java was killed by signal {}", code - 128)
        }
        (Some(code), _) => format!("java exited with code {code}"),
        (None, Some(signal)) => format!("the supervisor was killed by signal {signal}"),
        (None, None) => status.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_statuses_name_the_signal() {
        assert_eq!(
            describe_exit(ExitStatus::from_raw(137 << 8)),
            "java was killed by signal 9"
        );
        assert_eq!(
            describe_exit(ExitStatus::from_raw(1 << 8)),
            "java exited with code 1"
        );
    }
}
