//! Child processes in their own process group, killed as a group.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;

/// A child process that leads its own process group. Dropping it kills the whole group.
#[derive(Debug)]
pub struct Group {
    name: String,
    child: Child,
    log: PathBuf,
}

impl Group {
    /// Spawns `cmd` as the leader of a new process group, stdout and stderr appended to `log`.
    pub fn spawn(name: &str, mut cmd: Command, log: &Path) -> anyhow::Result<Self> {
        use std::os::unix::process::CommandExt;
        if let Some(dir) = log.parent() {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        let out = File::create(log).with_context(|| format!("creating {}", log.display()))?;
        let err = out.try_clone()?;
        cmd.stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .process_group(0);
        let child = cmd
            .spawn()
            .with_context(|| format!("starting {name} ({cmd:?})"))?;
        Ok(Self {
            name: name.to_owned(),
            child,
            log: log.to_owned(),
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The process id, which is also the process group id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// Whether the first 64 KiB of the log hold `needle` (a start-up failure).
    pub fn log_head_contains(&self, needle: &str) -> bool {
        use std::io::Read;
        let mut head = Vec::new();
        let read =
            std::fs::File::open(&self.log).and_then(|f| f.take(64 << 10).read_to_end(&mut head));
        read.is_ok() && String::from_utf8_lossy(&head).contains(needle)
    }

    /// The last `n` lines of the log, for error messages.
    pub fn log_tail(&self, n: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    /// Whether the leader has exited (its exit status, if so).
    pub fn try_wait(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// Waits (polling every 10 ms) until the leader exits: its status and how long that took,
    /// or an error with the log's tail after `timeout`.
    pub async fn wait_exit(
        &mut self,
        timeout: Duration,
    ) -> anyhow::Result<(std::process::ExitStatus, Duration)> {
        let started = Instant::now();
        loop {
            if let Some(s) = self.try_wait() {
                return Ok((s, started.elapsed()));
            }
            if started.elapsed() > timeout {
                anyhow::bail!(
                    "{} still running after {timeout:?}:\n{}",
                    self.name,
                    self.log_tail(20)
                );
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Sends `signal` to the whole group.
    pub fn signal(&self, signal: i32) {
        let pgid = self.child.id() as libc::pid_t;
        // SAFETY: kill(2) with a negative pid signals the group we created; no memory is shared.
        unsafe {
            libc::kill(-pgid, signal);
        }
    }

    /// Stops the group: SIGTERM, then SIGKILL after `grace`. Returns the leader's status.
    pub fn stop(&mut self, grace: Duration) -> Option<std::process::ExitStatus> {
        self.signal(libc::SIGTERM);
        let deadline = Instant::now() + grace;
        let status = loop {
            if let Some(s) = self.try_wait() {
                break Some(s);
            }
            if Instant::now() >= deadline {
                break None;
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        // Children of the leader (an emulator launcher's `java`) may still run: kill the group.
        self.signal(libc::SIGKILL);
        let _ = self.child.wait();
        // Orphaned members are reaped by init shortly after SIGKILL; wait for that, bounded.
        let deadline = Instant::now() + Duration::from_secs(5);
        while self.group_alive() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        status
    }

    /// CPU time (user + system, all threads) the group's leader has used so far, in seconds
    /// (Linux `/proc`); 0 if it cannot be read.
    pub fn cpu_seconds(&self) -> f64 {
        let stat =
            std::fs::read_to_string(format!("/proc/{}/stat", self.child.id())).unwrap_or_default();
        // Fields after the parenthesised command: state is the 3rd field of the line, utime
        // and stime the 14th and 15th.
        let ticks: u64 = stat
            .rsplit_once(')')
            .map(|(_, rest)| {
                rest.split_whitespace()
                    .skip(11)
                    .take(2)
                    .filter_map(|v| v.parse::<u64>().ok())
                    .sum()
            })
            .unwrap_or(0);
        // SAFETY: sysconf only reads a configuration value.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
        if hz <= 0 {
            return 0.0;
        }
        ticks as f64 / hz as f64
    }

    /// Resident memory of every process in the group, in bytes (Linux `/proc`).
    pub fn rss_bytes(&self) -> u64 {
        let pgid = self.child.id() as i64;
        let mut total = 0;
        for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
            let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
                continue;
            };
            // Fields after the parenthesised command: state ppid pgrp ...
            let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else {
                continue;
            };
            if rest
                .split_whitespace()
                .nth(2)
                .and_then(|g| g.parse::<i64>().ok())
                != Some(pgid)
            {
                continue;
            }
            let status = std::fs::read_to_string(entry.path().join("status")).unwrap_or_default();
            if let Some(kb) = status
                .lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.split_whitespace().next())
                .and_then(|v| v.parse::<u64>().ok())
            {
                total += kb * 1024;
            }
        }
        total
    }

    /// Whether any process of the group is still alive.
    pub fn group_alive(&self) -> bool {
        let pgid = self.child.id() as libc::pid_t;
        // SAFETY: signal 0 only checks for existence.
        unsafe { libc::kill(-pgid, 0) == 0 }
    }
}

impl Drop for Group {
    fn drop(&mut self) {
        self.stop(Duration::from_secs(2));
    }
}
