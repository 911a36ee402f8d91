//! GCE's metadata server: the preemption notice and the VM service account's access token.
//!
//! The base URL is configurable (`GCE_METADATA_HOST`), so tests serve these paths from a
//! local HTTP server. Off GCE, with no host configured, nothing is contacted.

use std::time::Duration;

use serde::Deserialize;
use tokio_util::sync::CancellationToken;

/// The metadata server the worker talks to: `GCE_METADATA_HOST` (`host:port`), else
/// `metadata.google.internal` when the machine says it is a Google Compute Engine VM.
pub fn metadata_base(configured: Option<&str>) -> Option<String> {
    if let Some(host) = configured.filter(|h| !h.is_empty()) {
        return Some(
            if host.starts_with("http://") || host.starts_with("https://") {
                host.trim_end_matches('/').to_owned()
            } else {
                format!("http://{host}")
            },
        );
    }
    let product = std::fs::read_to_string("/sys/class/dmi/id/product_name").unwrap_or_default();
    product
        .contains("Google")
        .then(|| "http://metadata.google.internal".to_owned())
}

/// Watches `instance/preempted` with `wait_for_change` and cancels `drain` when it turns
/// `TRUE`. Returns when the flag is seen or `stop` is cancelled.
pub async fn watch_preemption(base: String, drain: CancellationToken, stop: CancellationToken) {
    let http = match reqwest::Client::builder()
        .timeout(Duration::from_secs(120))
        .build()
    {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "cannot build the metadata client; preemption notices are not watched");
            return;
        }
    };
    let url = format!("{base}/computeMetadata/v1/instance/preempted");
    let mut etag: Option<String> = None;
    let mut failures = 0u32;
    loop {
        let mut req = http.get(&url).header("Metadata-Flavor", "Google");
        if let Some(tag) = &etag {
            req = req.query(&[("wait_for_change", "true"), ("last_etag", tag.as_str())]);
        }
        let answer = tokio::select! {
            _ = stop.cancelled() => return,
            r = req.send() => r,
        };
        let result = match answer {
            Ok(r) if r.status().is_success() => {
                let tag = r
                    .headers()
                    .get("etag")
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_owned);
                r.text().await.map(|body| (tag, body))
            }
            Ok(r) => {
                tracing::warn!(status = %r.status(), "metadata server refused the preemption query");
                Ok((None, String::new()))
            }
            Err(e) => Err(e),
        };
        match result {
            Ok((tag, body)) => {
                failures = 0;
                if body.trim().eq_ignore_ascii_case("TRUE") {
                    tracing::warn!("GCE preemption notice received: draining");
                    drain.cancel();
                    return;
                }
                if tag.is_some() {
                    etag = tag;
                } else {
                    // No etag (an odd server): poll instead of long-polling.
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                    }
                }
            }
            Err(e) => {
                failures += 1;
                if failures == 1 || failures.is_multiple_of(60) {
                    tracing::warn!(error = %e, failures, "metadata server unreachable; retrying");
                }
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
            }
        }
    }
}

#[derive(Deserialize)]
struct Token {
    access_token: String,
    expires_in: u64,
}

/// Access tokens of the VM's service account, cached until a minute before they expire.
#[derive(Debug)]
pub struct TokenSource {
    http: reqwest::Client,
    base: String,
    cached: tokio::sync::Mutex<Option<(String, std::time::Instant)>>,
}

impl TokenSource {
    pub fn new(http: reqwest::Client, base: String) -> Self {
        Self {
            http,
            base,
            cached: tokio::sync::Mutex::new(None),
        }
    }

    pub async fn token(&self) -> Result<String, String> {
        let mut cached = self.cached.lock().await;
        if let Some((tok, until)) = cached.as_ref()
            && std::time::Instant::now() < *until
        {
            return Ok(tok.clone());
        }
        let url = format!(
            "{}/computeMetadata/v1/instance/service-accounts/default/token",
            self.base
        );
        let resp = self
            .http
            .get(&url)
            .header("Metadata-Flavor", "Google")
            .send()
            .await
            .map_err(|e| format!("metadata token request failed: {e}"))?;
        if !resp.status().is_success() {
            return Err(format!("metadata token request answered {}", resp.status()));
        }
        let t: Token = resp
            .json()
            .await
            .map_err(|e| format!("metadata token answer unreadable: {e}"))?;
        // Google's tokens last an hour; a longer lifetime is not believed.
        let until = std::time::Instant::now()
            + Duration::from_secs(t.expires_in.saturating_sub(60).clamp(1, 3600));
        *cached = Some((t.access_token.clone(), until));
        Ok(t.access_token)
    }
}
