//! Helpers for tests that drive real outside programs (swaks, openssl, curl, dovecot, aiosmtpd):
//! finding them (skip locally, fail on CI), running a command with a deadline, servers that die
//! with the test, free ports, and a proxy launcher for routes the plain [`super::proxy`] harness
//! does not describe (device names, `sni_allow`).

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::net::TcpStream;
use tokio::process::{Child, ChildStdin, ChildStdout, Command};

/// Bound on one run of a client program.
pub const PROGRAM_TIMEOUT: Duration = Duration::from_secs(40);

/// Bound on an outside server's start.
pub const START_TIMEOUT: Duration = Duration::from_secs(20);

/// True when the CI variable is set: missing programs are failures there, not skips.
pub fn on_ci() -> bool {
    std::env::var_os("CI").is_some_and(|value| !value.is_empty())
}

/// Handles a missing prerequisite: panics on CI, prints a notice elsewhere. Returns `false` so
/// a test can `return` right after.
pub fn missing(what: &str, why: &str) -> bool {
    assert!(
        !on_ci(),
        "{what} is required when CI is set ({why}); .ci/run installs it"
    );
    eprintln!("SKIPPED: {what} is not usable here ({why}); set CI=1 to make this a failure");
    false
}

/// Whether `program probe...` runs and exits 0 (e.g. `swaks --version`,
/// `python3 -c "import aiosmtpd"`). When not: see [`missing`].
pub fn require(program: &str, probe: &[&str]) -> bool {
    let status = std::process::Command::new(program)
        .args(probe)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
    match status {
        Ok(status) if status.success() => true,
        Ok(status) => missing(
            program,
            &format!("`{program} {}` exited with {status}", probe.join(" ")),
        ),
        Err(err) => missing(program, &format!("cannot run it: {err}")),
    }
}

/// Whether this process runs as root (dovecot needs it to switch to the mail user).
pub fn is_root() -> bool {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self").is_ok_and(|meta| meta.uid() == 0)
}

/// The uid and primary gid of `user`, from /etc/passwd.
pub fn user_ids(user: &str) -> Result<(u32, u32)> {
    let passwd = std::fs::read_to_string("/etc/passwd").context("read /etc/passwd")?;
    for line in passwd.lines() {
        let fields: Vec<&str> = line.split(':').collect();
        if fields.len() >= 4 && fields[0] == user {
            let uid = fields[2].parse().context("uid in /etc/passwd")?;
            let gid = fields[3].parse().context("gid in /etc/passwd")?;
            return Ok((uid, gid));
        }
    }
    bail!("no user {user:?} in /etc/passwd")
}

/// `N` distinct free ports on 127.0.0.1 for an outside server that cannot report the ones it
/// bound. All N are held until the last is picked (a port released at once can come back from
/// the next bind); then they are released, and another process could take one in between,
/// which is acceptable for a test.
pub fn free_ports<const N: usize>() -> Result<[u16; N]> {
    let mut held = Vec::with_capacity(N);
    let mut ports = [0u16; N];
    for port in &mut ports {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").context("bind 127.0.0.1:0")?;
        *port = listener.local_addr().context("local_addr")?.port();
        held.push(listener);
    }
    Ok(ports)
}

/// What a finished program wrote and how it ended.
pub struct Output {
    pub command: String,
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl Output {
    pub fn success(&self) -> bool {
        self.status.success()
    }

    /// The exit code (`None` when killed by a signal).
    pub fn code(&self) -> Option<i32> {
        self.status.code()
    }
}

impl std::fmt::Debug for Output {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "`{}` ended with {}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.command, self.status, self.stdout, self.stderr
        )
    }
}

fn describe(program: &str, args: &[String]) -> String {
    let mut text = program.to_string();
    for arg in args {
        let _ = write!(text, " {arg}");
    }
    text
}

/// Runs `program args` with `stdin` as its input, killed if it takes longer than `timeout`.
pub async fn run(
    program: &str,
    args: &[String],
    stdin: &[u8],
    timeout: Duration,
) -> Result<Output> {
    let command = describe(program, args);
    let mut child = Command::new(program)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("start `{command}`"))?;
    let mut input = child.stdin.take().context("stdin of the child")?;
    let data = stdin.to_vec();
    // A separate task, so a program that writes a lot before reading cannot deadlock us.
    let writer = tokio::spawn(async move {
        let _ = input.write_all(&data).await;
        let _ = input.shutdown().await;
    });
    let output = tokio::time::timeout(timeout, child.wait_with_output())
        .await
        .with_context(|| format!("`{command}` did not finish within {timeout:?} (killed)"))?
        .with_context(|| format!("wait for `{command}`"))?;
    writer.abort();
    Ok(Output {
        command,
        status: output.status,
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    })
}

/// An outside server started by a test. Its stderr goes to a log file (shown by
/// [`log`](Self::log) in failure messages). Dropping it kills the process; [`stop`](Self::stop)
/// asks it to end first.
pub struct Daemon {
    pub name: String,
    child: Child,
    stdin: Option<ChildStdin>,
    stdout: Option<Lines<BufReader<ChildStdout>>>,
    log_paths: Vec<PathBuf>,
}

impl Daemon {
    /// Starts `program args` with piped stdin and stdout, stderr into `stderr_log`.
    pub fn spawn(program: &str, args: &[String], stderr_log: &Path) -> Result<Daemon> {
        let command = describe(program, args);
        let log = std::fs::File::create(stderr_log)
            .with_context(|| format!("create {}", stderr_log.display()))?;
        let mut child = Command::new(program)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log))
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("start `{command}`"))?;
        let stdin = child.stdin.take();
        let stdout = child.stdout.take().map(|out| BufReader::new(out).lines());
        Ok(Daemon {
            name: command,
            child,
            stdin,
            stdout,
            log_paths: vec![stderr_log.to_path_buf()],
        })
    }

    /// Another file to show in [`log`](Self::log) (e.g. dovecot's own log).
    pub fn add_log(&mut self, path: &Path) {
        self.log_paths.push(path.to_path_buf());
    }

    /// Everything the server logged so far, for failure messages.
    pub fn log(&self) -> String {
        let mut text = String::new();
        for path in &self.log_paths {
            let content = std::fs::read_to_string(path).unwrap_or_default();
            let _ = write!(text, "\n--- {} ---\n{content}", path.display());
        }
        text
    }

    /// Waits for a stdout line starting with `prefix` and returns it.
    pub async fn wait_for_line(&mut self, prefix: &str, timeout: Duration) -> Result<String> {
        let lines = self.stdout.as_mut().context("stdout already consumed")?;
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let line = tokio::time::timeout_at(deadline, lines.next_line())
                .await
                .with_context(|| format!("{}: no {prefix:?} line within {timeout:?}", self.name))?
                .context("read the server's stdout")?;
            match line {
                Some(line) if line.starts_with(prefix) => return Ok(line),
                Some(_) => continue,
                None => bail!(
                    "{} closed its stdout before printing {prefix:?}; exit: {:?}{}",
                    self.name,
                    self.child.try_wait().ok().flatten(),
                    self.log()
                ),
            }
        }
    }

    /// Polls until every address accepts a TCP connection (bounded by `timeout`); fails early
    /// when the server exits.
    pub async fn wait_listening(&mut self, addrs: &[SocketAddr], timeout: Duration) -> Result<()> {
        let started = Instant::now();
        for addr in addrs {
            loop {
                if let Some(status) = self.child.try_wait().context("check the server")? {
                    bail!(
                        "{} exited with {status} during start{}",
                        self.name,
                        self.log()
                    );
                }
                let attempt =
                    tokio::time::timeout(Duration::from_secs(1), TcpStream::connect(addr)).await;
                if let Ok(Ok(_)) = attempt {
                    break;
                }
                if started.elapsed() > timeout {
                    bail!(
                        "{} does not listen on {addr} after {timeout:?}{}",
                        self.name,
                        self.log()
                    );
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        Ok(())
    }

    /// Closes stdin, sends SIGTERM and waits (bounded) for the exit; kills it after that.
    pub async fn stop(mut self) {
        drop(self.stdin.take());
        if let Some(pid) = self.child.id() {
            let _ = std::process::Command::new("kill")
                .args(["-TERM", &pid.to_string()])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
        if tokio::time::timeout(Duration::from_secs(10), self.child.wait())
            .await
            .is_err()
        {
            let _ = self.child.start_kill();
            let _ = tokio::time::timeout(Duration::from_secs(5), self.child.wait()).await;
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
    }
}
