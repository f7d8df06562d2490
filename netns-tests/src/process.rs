//! Processes for labs and benches: bounded commands in a namespace (everything under
//! timeout(1), in its own process group) and long-running daemons stopped when dropped.

use std::ffi::OsStr;
use std::fs::File;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use crate::run;

/// `ip netns exec <netns> timeout -k 5 <limit>s <program> <args>`. `ip netns exec` execs, so the
/// child's pid is timeout's, which leads the process group.
pub fn in_netns(
    netns: &str,
    limit_secs: u64,
    program: impl AsRef<OsStr>,
    args: &[&str],
) -> Command {
    let mut command = Command::new("ip");
    command
        .args(["netns", "exec", netns, "timeout", "-k", "5"])
        .arg(format!("{limit_secs}s"))
        .arg(program)
        .args(args)
        .stdin(Stdio::null())
        .process_group(0);
    command
}

/// Runs a bounded command in a namespace and returns its output, successful or not.
pub fn ns_output(
    netns: &str,
    limit_secs: u64,
    program: &str,
    args: &[&str],
) -> anyhow::Result<Output> {
    in_netns(netns, limit_secs, program, args)
        .output()
        .with_context(|| format!("cannot run {program} in {netns}"))
}

/// Runs a bounded command in a namespace and fails with its output unless it succeeds.
pub fn ns_sh(netns: &str, program: &str, args: &[&str]) -> anyhow::Result<String> {
    let output = ns_output(netns, 30, program, args)?;
    if !output.status.success() {
        bail!(
            "`{program} {}` in {netns} failed ({}): {}{}",
            args.join(" "),
            output.status,
            String::from_utf8_lossy(&output.stdout).trim(),
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// A long-running process; stopped (SIGTERM, then SIGKILL to its whole group) when dropped.
pub struct Daemon {
    what: String,
    child: Child,
    log: PathBuf,
    grace: Duration,
    /// Files removed once the process is gone (userspace WireGuard control sockets).
    pub leftovers: Vec<PathBuf>,
}

impl Daemon {
    pub fn spawn(
        what: &str,
        mut command: Command,
        log: PathBuf,
        grace: Duration,
    ) -> anyhow::Result<Self> {
        let file =
            File::create(&log).with_context(|| format!("cannot create {}", log.display()))?;
        let child = command
            .stdout(file.try_clone()?)
            .stderr(file)
            .spawn()
            .with_context(|| format!("cannot start {what}"))?;
        Ok(Self {
            what: what.to_owned(),
            child,
            log,
            grace,
            leftovers: Vec::new(),
        })
    }

    pub fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Fails with the log's tail if the process has exited.
    pub fn check(&mut self) -> anyhow::Result<()> {
        if let Ok(Some(status)) = self.child.try_wait() {
            bail!(
                "{} exited ({status}):\n{}",
                self.what,
                tail(&std::fs::read_to_string(&self.log).unwrap_or_default(), 15)
            );
        }
        Ok(())
    }

    /// The process timeout(1) runs (the daemon proper), for CPU accounting. GNU timeout forks
    /// the daemon as its child; busybox's timeout (a minimal guest's) execs the daemon itself and
    /// leaves the watching to a child, so a process no longer named `timeout` is the daemon.
    pub fn worker_pid(&self) -> Option<u32> {
        let pid = self.child.id();
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).ok()?;
        if comm.trim() != "timeout" {
            return Some(pid);
        }
        std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
            .ok()?
            .split_whitespace()
            .next()?
            .parse()
            .ok()
    }

    pub fn stop(&mut self) {
        if self.running() {
            let pid = self.child.id();
            // timeout(1) passes SIGTERM on to the daemon and waits for it: a graceful stop.
            let _ = run("kill", &["-TERM", &pid.to_string()]);
            let deadline = Instant::now() + self.grace;
            while self.running() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            if self.running() {
                eprintln!(
                    "{} ignored SIGTERM for {:?}; killing it",
                    self.what, self.grace
                );
                let _ = run("kill", &["-KILL", "--", &format!("-{pid}")]);
                let _ = self.child.kill();
            }
            let _ = self.child.wait();
        }
        for file in self.leftovers.drain(..) {
            let _ = std::fs::remove_file(file);
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.stop();
    }
}

pub fn wait_until(
    what: &str,
    timeout: Duration,
    mut check: impl FnMut() -> anyhow::Result<bool>,
) -> anyhow::Result<Duration> {
    let started = Instant::now();
    loop {
        if check()? {
            return Ok(started.elapsed());
        }
        if started.elapsed() > timeout {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

pub fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}
