//! Google's Pub/Sub and Firestore emulators on free loopback ports.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::Context;

use crate::prereq::{self, Env};
use crate::process::Group;
use crate::{free_port, wait_for};

/// Both emulators, running. Dropping this stops them (whole process groups).
#[derive(Debug)]
pub struct Emulators {
    pub pubsub: Group,
    pub firestore: Group,
    /// `host:port` for `PUBSUB_EMULATOR_HOST`.
    pub pubsub_host: String,
    /// `host:port` for `FIRESTORE_EMULATOR_HOST`.
    pub firestore_host: String,
}

/// What a JVM's log says when a port it binds is taken.
const BIND_FAILED: &str = "java.net.BindException: Address already in use";

/// How long the JVMs may take to come up on a loaded 2-core machine.
pub const READY_TIMEOUT: Duration = Duration::from_secs(90);

/// The Pub/Sub emulator command: its jar run with the `tests/emulator-shim` class first on
/// the classpath when the jar and `javac` are there (see that file for the emulator defect it
/// repairs), else the launcher script as installed.
fn pubsub_command(launcher: &Path, log_dir: &Path) -> Command {
    match shimmed_classpath(launcher, log_dir) {
        Ok(classpath) => {
            let mut cmd = Command::new("java");
            cmd.arg("-cp")
                .arg(classpath)
                .arg("com.google.cloud.pubsub.testing.v1.Main");
            cmd
        }
        Err(e) => {
            eprintln!(
                "warning: running the Pub/Sub emulator unpatched ({e:#}); it may not redeliver the messages of a killed subscriber"
            );
            Command::new(launcher)
        }
    }
}

fn shimmed_classpath(launcher: &Path, log_dir: &Path) -> anyhow::Result<std::ffi::OsString> {
    let lib = launcher
        .parent()
        .and_then(Path::parent)
        .context("launcher path")?
        .join("lib");
    let jar = std::fs::read_dir(&lib)
        .with_context(|| format!("reading {}", lib.display()))?
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|x| x == "jar"))
        .with_context(|| format!("no emulator jar in {}", lib.display()))?;
    let source = crate::root().join("tests/emulator-shim/io/grpc/InternalStatus.java");
    let out = log_dir.join("emulator-shim");
    let class = out.join("io/grpc/InternalStatus.class");
    if !class.is_file() {
        std::fs::create_dir_all(&out)?;
        let status = Command::new("javac")
            .arg("-nowarn")
            .arg("-d")
            .arg(&out)
            .arg("-cp")
            .arg(&jar)
            .arg(&source)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .context("running javac")?;
        anyhow::ensure!(status.success(), "javac failed on {}", source.display());
    }
    Ok(std::env::join_paths([out, jar])?)
}

/// An emulator found its port taken (another process bound it after [`free_port`] saw it
/// free): worth another try on other ports.
#[derive(Debug, thiserror::Error)]
#[error("{0} could not bind its port (log {1})")]
pub struct PortTaken(pub String, pub String);

/// Tries at starting the pair on fresh ports when a port was taken meanwhile.
const START_TRIES: usize = 3;

impl Emulators {
    /// Starts both emulators (in parallel) with logs in `log_dir`, and waits until both answer;
    /// on other ports again if one found its port taken.
    pub async fn start(log_dir: &Path) -> anyhow::Result<Self> {
        let mut tries = 1;
        loop {
            match Self::start_on(log_dir, free_port()?, free_port()?).await {
                Err(e) if tries < START_TRIES && e.downcast_ref::<PortTaken>().is_some() => {
                    eprintln!("{e:#}; starting the emulators again on other ports");
                    tries += 1;
                }
                other => return other,
            }
        }
    }

    /// Starts both emulators on these ports and waits until both answer; a port found taken
    /// fails at once with [`PortTaken`].
    pub async fn start_on(log_dir: &Path, ps_port: u16, fs_port: u16) -> anyhow::Result<Self> {
        let tools = prereq::emulator_tools(&Env::from_process())?;
        let pubsub_host = format!("127.0.0.1:{ps_port}");
        let firestore_host = format!("127.0.0.1:{fs_port}");

        let mut cmd = pubsub_command(&tools.pubsub, log_dir);
        cmd.arg("--host=127.0.0.1").arg(format!("--port={ps_port}"));
        let pubsub = Group::spawn(
            "pubsub-emulator",
            cmd,
            &log_dir.join(format!("pubsub-{ps_port}.log")),
        )?;

        let mut cmd = Command::new(&tools.firestore);
        cmd.args(["start", "--host=127.0.0.1"])
            .arg(format!("--port={fs_port}"));
        let firestore = Group::spawn(
            "firestore-emulator",
            cmd,
            &log_dir.join(format!("firestore-{fs_port}.log")),
        )?;

        let mut this = Self {
            pubsub,
            firestore,
            pubsub_host,
            firestore_host,
        };
        this.wait_ready().await?;
        Ok(this)
    }

    async fn wait_ready(&mut self) -> anyhow::Result<()> {
        let http = reqwest::Client::new();
        let ps_url = format!("http://{}/v1/projects/ready-check/topics", self.pubsub_host);
        let fs_url = format!("http://{}/", self.firestore_host);
        for (group, url) in [(&mut self.pubsub, ps_url), (&mut self.firestore, fs_url)] {
            let name = group.name().to_owned();
            let ready = wait_for(&name, READY_TIMEOUT, || {
                let exited = group.try_wait();
                // The Pub/Sub emulator lives on half-started when a bind fails: fail now.
                let taken = group.log_head_contains(BIND_FAILED);
                let req = http.get(&url).timeout(Duration::from_secs(2)).send();
                async move {
                    if taken {
                        return Some(Err(None));
                    }
                    if let Some(status) = exited {
                        return Some(Err(Some(status)));
                    }
                    match req.await {
                        Ok(r) if r.status().is_success() => Some(Ok(())),
                        _ => None,
                    }
                }
            })
            .await;
            match ready {
                Ok(Ok(())) => {}
                Ok(Err(None)) => {
                    return Err(PortTaken(name, group.log_path().display().to_string()).into());
                }
                Ok(Err(Some(status))) => anyhow::bail!(
                    "{name} exited with {status} before it was ready; its log ends with:\n{}",
                    group.log_tail(20)
                ),
                Err(e) => {
                    return Err(e).with_context(|| {
                        format!(
                            "log {}:\n{}",
                            group.log_path().display(),
                            group.log_tail(20)
                        )
                    });
                }
            }
        }
        Ok(())
    }

    /// The environment variables a client needs to reach these emulators.
    pub fn env(&self) -> [(&'static str, String); 2] {
        [
            ("PUBSUB_EMULATOR_HOST", self.pubsub_host.clone()),
            ("FIRESTORE_EMULATOR_HOST", self.firestore_host.clone()),
        ]
    }

    /// Stops both emulators now (also done on drop).
    pub fn stop(&mut self) {
        self.pubsub.stop(Duration::from_secs(2));
        self.firestore.stop(Duration::from_secs(2));
    }
}
