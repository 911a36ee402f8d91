//! Edge configuration, read from the platform's variables and secrets.
//!
//! | variable | default | meaning |
//! |---|---|---|
//! | `GCP_PROJECT` | — (required) | project of the Pub/Sub topic and Firestore database |
//! | `PUBSUB_TOPIC` | `jobs` | topic job messages are published to |
//! | `PUBSUB_CHAT_TOPIC` | `PUBSUB_TOPIC` | topic queued chat messages are published to (the workers pull it through their own chat subscription, so a reply never waits behind batch shards) |
//! | `FIRESTORE_DATABASE` | `(default)` | Firestore database id |
//! | `PUBSUB_EMULATOR_HOST` | — | `host:port` of the Pub/Sub emulator (no credentials then) |
//! | `FIRESTORE_EMULATOR_HOST` | — | `host:port` of the Firestore emulator |
//! | `PUBSUB_ENDPOINT` | `https://pubsub.googleapis.com` | Pub/Sub API base URL with credentials (e.g. a regional endpoint `https://asia-northeast3-pubsub.googleapis.com`) |
//! | `FIRESTORE_ENDPOINT` | `https://firestore.googleapis.com` | Firestore API base URL with credentials |
//! | `API_KEYS` (secret) | — (required) | `name:salt_hex:sha256_hex` entries (`cargo xtask api-key`) |
//! | `GCP_SERVICE_ACCOUNT_KEY` (secret) | — | service-account JSON key; required without emulators |
//! | `RATE_LIMIT_PER_MINUTE` | `600` | per-key limit (≥ 1) when the platform has no rate-limit binding |
//! | `UPSTREAM_DEADLINE_MS` | `8000` | total time for one Pub/Sub or Firestore call with retries (1–120000) |
//! | `INPUT_URI_PREFIX` | — (any `gs://` object) | where `input_uri` files may be: `gs://bucket/folder/`, `{key}` standing for the caller's API key name (`gs://inputs/{key}/`: each key reads only its own folder) |
//! | `LOG_REQUESTS` | `all` | `all`: one JSON log line per request; `errors`: only for 4xx/5xx |
//! | `BENCH_CLASSIFY_REPEAT` | `1` | benchmark only: classify each chat message this many times |

use crate::auth::KeyStore;
use crate::gcp::{GcpConfig, ServiceAccount};

/// Parsed configuration; a missing or bad value is kept as its error message so that
/// `/healthz` and every `/v1` route can say exactly what to fix.
#[derive(Debug)]
pub struct Config {
    pub keys: Result<KeyStore, String>,
    pub gcp: Result<(GcpConfig, Option<ServiceAccount>), String>,
    /// The fallback rate limit, or what is wrong with `RATE_LIMIT_PER_MINUTE`.
    pub rate_limit_per_minute: Result<u32, String>,
    /// Log every request (`Ok(true)`) or only failed ones, or what is wrong with `LOG_REQUESTS`.
    pub log_all: Result<bool, String>,
    /// Where `input_uri` files may be (`{key}`: the caller's key name; none: anywhere), or
    /// what is wrong with `INPUT_URI_PREFIX`.
    pub input_uri_prefix: Result<Option<String>, String>,
    /// Benchmark knob: how many times each chat message is classified (`bench-edge` derives
    /// the classify cost inside the Worker from the latency difference).
    pub classify_repeat: u32,
}

impl Config {
    pub fn from_env(get: impl Fn(&str) -> Option<String>) -> Self {
        let get = |k: &str| {
            get(k)
                .map(|v| v.trim().to_owned())
                .filter(|v| !v.is_empty())
        };
        let keys = match get("API_KEYS") {
            Some(s) => KeyStore::parse(&s),
            None => Err(
                "the API_KEYS secret is not set (entries from `cargo xtask api-key NAME`)".into(),
            ),
        };
        let rate_limit_per_minute = match get("RATE_LIMIT_PER_MINUTE") {
            None => Ok(600),
            Some(v) => v.parse::<u32>().ok().filter(|&n| n >= 1).ok_or_else(|| {
                format!("RATE_LIMIT_PER_MINUTE must be a whole number of requests ≥ 1, got {v:?}")
            }),
        };
        let log_all = match get("LOG_REQUESTS").as_deref() {
            None | Some("all") => Ok(true),
            Some("errors") => Ok(false),
            Some(v) => Err(format!("LOG_REQUESTS must be `all` or `errors`, got {v:?}")),
        };
        let input_uri_prefix = match get("INPUT_URI_PREFIX") {
            None => Ok(None),
            Some(p) => {
                let bucket = p
                    .strip_prefix("gs://")
                    .and_then(|rest| rest.split_once('/'))
                    .map(|(bucket, _)| bucket);
                if bucket.is_some_and(|b| !b.is_empty() && !b.contains("{key}")) && p.ends_with('/')
                {
                    Ok(Some(p))
                } else {
                    Err(format!(
                        "INPUT_URI_PREFIX must be gs://bucket/ or gs://bucket/folder/ (ending in `/`; `{{key}}` in the folder stands for the caller's API key name), got {p:?}"
                    ))
                }
            }
        };
        Self {
            keys,
            gcp: gcp(&get),
            rate_limit_per_minute,
            log_all,
            input_uri_prefix,
            classify_repeat: get("BENCH_CLASSIFY_REPEAT")
                .and_then(|v| v.parse().ok())
                .unwrap_or(1)
                .clamp(1, 10_000),
        }
    }
}

fn gcp(
    get: &impl Fn(&str) -> Option<String>,
) -> Result<(GcpConfig, Option<ServiceAccount>), String> {
    let project = get("GCP_PROJECT").ok_or("GCP_PROJECT is not set")?;
    let emulator =
        |var: &str| get(var).map(|h| format!("http://{}", h.trim_start_matches("http://")));
    let endpoint = |var: &str| match get(var) {
        Some(u) if u.starts_with("https://") || u.starts_with("http://") => {
            Ok(Some(u.trim_end_matches('/').to_owned()))
        }
        Some(u) => Err(format!("{var} must be an http(s) URL, got {u:?}")),
        None => Ok(None),
    };
    let (pubsub_endpoint, firestore_endpoint) = (
        endpoint("PUBSUB_ENDPOINT")?,
        endpoint("FIRESTORE_ENDPOINT")?,
    );
    let pubsub_emu = emulator("PUBSUB_EMULATOR_HOST");
    let firestore_emu = emulator("FIRESTORE_EMULATOR_HOST");
    let account = match get("GCP_SERVICE_ACCOUNT_KEY") {
        Some(json) => Some(serde_json::from_str::<ServiceAccount>(&json).map_err(|e| {
            format!("GCP_SERVICE_ACCOUNT_KEY is not a service-account JSON key: {e}")
        })?),
        None if pubsub_emu.is_some() && firestore_emu.is_some() => None,
        None => {
            return Err(
                "GCP_SERVICE_ACCOUNT_KEY is not set and no emulator hosts are configured".into(),
            );
        }
    };
    let deadline_ms = match get("UPSTREAM_DEADLINE_MS") {
        Some(v) => v
            .parse()
            .ok()
            .filter(|ms| (1..=120_000).contains(ms))
            .ok_or_else(|| {
                format!("UPSTREAM_DEADLINE_MS must be 1..=120000 milliseconds, got {v:?}")
            })?,
        None => 8_000,
    };
    let topic = get("PUBSUB_TOPIC").unwrap_or_else(|| "jobs".into());
    Ok((
        GcpConfig {
            project,
            chat_topic: get("PUBSUB_CHAT_TOPIC").unwrap_or_else(|| topic.clone()),
            topic,
            database: get("FIRESTORE_DATABASE").unwrap_or_else(|| "(default)".into()),
            pubsub_emulated: pubsub_emu.is_some(),
            firestore_emulated: firestore_emu.is_some(),
            pubsub_base: pubsub_emu
                .or(pubsub_endpoint)
                .unwrap_or_else(|| "https://pubsub.googleapis.com".into()),
            firestore_base: firestore_emu
                .or(firestore_endpoint)
                .unwrap_or_else(|| "https://firestore.googleapis.com".into()),
            deadline_ms,
        },
        account,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gcp_of(vars: &[(&str, &str)]) -> Result<GcpConfig, String> {
        let get = |k: &str| {
            vars.iter()
                .find(|(n, _)| *n == k)
                .map(|(_, v)| (*v).to_owned())
        };
        gcp(&get).map(|(c, _)| c)
    }

    /// A project and both emulators: the least that configures Google Cloud.
    const EMU: [(&str, &str); 3] = [
        ("GCP_PROJECT", "p"),
        ("PUBSUB_EMULATOR_HOST", "127.0.0.1:1"),
        ("FIRESTORE_EMULATOR_HOST", "127.0.0.1:2"),
    ];

    /// The `[vars]` of the production `wrangler.toml`, as (name, value) pairs.
    fn wrangler_vars() -> Vec<(String, String)> {
        let text = include_str!("../../../wrangler.toml");
        let section = text
            .split_once("\n[vars]\n")
            .map(|(_, rest)| rest.split("\n[").next().unwrap_or(rest))
            .expect("wrangler.toml has [vars]");
        section
            .lines()
            .filter(|l| !l.trim_start().starts_with('#'))
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.trim().to_owned(), v.trim().trim_matches('"').to_owned()))
            .collect()
    }

    /// The config of `vars` (with both emulators and `API_KEYS` set), and every variable it
    /// asked for.
    fn read(vars: &[(String, String)]) -> (Config, std::collections::BTreeSet<String>) {
        let asked = std::cell::RefCell::new(std::collections::BTreeSet::new());
        let c = Config::from_env(|k| {
            asked.borrow_mut().insert(k.to_owned());
            vars.iter()
                .map(|(n, v)| (n.as_str(), v.as_str()))
                .chain(EMU)
                .chain([("API_KEYS", "")])
                .find(|(n, _)| *n == k)
                .map(|(_, v)| v.to_owned())
        });
        (c, asked.into_inner())
    }

    /// The README documents every variable the edge reads.
    #[test]
    fn the_readme_documents_every_variable_the_edge_reads() {
        let readme = include_str!("../../../README.md");
        let (_, asked) = read(&[]);
        assert!(asked.len() >= 12, "{asked:?}");
        let missing: Vec<&String> = asked
            .iter()
            .filter(|v| !readme.contains(&format!("`{v}`")))
            .collect();
        assert!(missing.is_empty(), "not in README.md: {missing:?}");
    }

    /// Every variable `wrangler.toml` sets is one the edge reads, and its value is valid: a
    /// misspelt name would be ignored without a word.
    #[test]
    fn the_edge_reads_every_variable_wrangler_toml_sets() {
        let vars = wrangler_vars();
        assert!(vars.len() >= 4, "{vars:?}");
        let (c, asked) = read(&vars);
        for (name, _) in &vars {
            assert!(
                asked.contains(name),
                "wrangler.toml sets {name}, which the edge never reads"
            );
        }
        let (gcp, _) = c.gcp.expect("wrangler.toml's values are valid");
        assert_eq!(
            (gcp.topic.as_str(), gcp.chat_topic.as_str()),
            ("jobs", "chat")
        );
    }

    #[test]
    fn chat_messages_go_to_the_jobs_topic_unless_a_chat_topic_is_set() {
        let c = gcp_of(&EMU).expect("defaults");
        assert_eq!((c.topic.as_str(), c.chat_topic.as_str()), ("jobs", "jobs"));
        let c = gcp_of(&[EMU.as_slice(), &[("PUBSUB_TOPIC", "bulk")]].concat()).expect("topic");
        assert_eq!((c.topic.as_str(), c.chat_topic.as_str()), ("bulk", "bulk"));
        let c = gcp_of(&[EMU.as_slice(), &[("PUBSUB_CHAT_TOPIC", "chat")]].concat()).expect("chat");
        assert_eq!((c.topic.as_str(), c.chat_topic.as_str()), ("jobs", "chat"));
    }

    #[test]
    fn endpoints_default_to_google_and_can_be_overridden() {
        let c = gcp_of(&EMU).expect("emulators");
        assert_eq!(
            (c.pubsub_base.as_str(), c.pubsub_emulated),
            ("http://127.0.0.1:1", true)
        );
        let sa = r#"{"client_email":"e@p.iam.gserviceaccount.com","private_key":"k"}"#;
        let c = gcp_of(&[("GCP_PROJECT", "p"), ("GCP_SERVICE_ACCOUNT_KEY", sa)]).expect("prod");
        assert_eq!(c.pubsub_base, "https://pubsub.googleapis.com");
        assert_eq!(c.firestore_base, "https://firestore.googleapis.com");
        let c = gcp_of(&[
            ("GCP_PROJECT", "p"),
            ("GCP_SERVICE_ACCOUNT_KEY", sa),
            (
                "PUBSUB_ENDPOINT",
                "https://asia-northeast3-pubsub.googleapis.com/",
            ),
        ])
        .expect("regional");
        assert_eq!(
            (c.pubsub_base.as_str(), c.pubsub_emulated),
            ("https://asia-northeast3-pubsub.googleapis.com", false)
        );
        let e = gcp_of(&[
            ("GCP_PROJECT", "p"),
            ("GCP_SERVICE_ACCOUNT_KEY", sa),
            ("FIRESTORE_ENDPOINT", "firestore.example"),
        ])
        .expect_err("not a URL");
        assert!(
            e.contains("FIRESTORE_ENDPOINT must be an http(s) URL"),
            "{e}"
        );
    }
}
