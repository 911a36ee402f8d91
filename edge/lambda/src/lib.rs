//! The edge on AWS Lambda: [`handle`] converts a `lambda_http` request, serves it with the
//! same [`edge_core::App`] as the Worker, and converts the answer back. `GET /` is the demo
//! page, built into the binary (the Worker serves the same file as a static asset).
//! [`Native`] is the platform on plain Rust (reqwest, ring, tokio), also used by the emulator
//! tests.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use edge_core::{App, HttpRequest, HttpResponse, Platform};
use lambda_http::{Body, Request, Response};
use ring::rand::{SecureRandom, SystemRandom};
use ring::signature::{RSA_PKCS1_SHA256, RsaKeyPair};

/// The platform on a native host.
#[derive(Clone, Debug)]
pub struct Native {
    client: reqwest::Client,
    rng: SystemRandom,
}

impl Default for Native {
    fn default() -> Self {
        Self::new()
    }
}

impl Native {
    pub fn new() -> Self {
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .build()
            .unwrap_or_default();
        Self {
            client,
            rng: SystemRandom::new(),
        }
    }
}

impl Platform for Native {
    async fn http(&self, req: HttpRequest) -> Result<HttpResponse, String> {
        let method =
            reqwest::Method::from_bytes(req.method.as_bytes()).map_err(|e| e.to_string())?;
        let mut b = self.client.request(method, &req.url);
        for (k, v) in &req.headers {
            b = b.header(k, v);
        }
        if let Some(body) = req.body {
            b = b.body(body);
        }
        let r = b.send().await.map_err(|e| e.to_string())?;
        let status = r.status().as_u16();
        let body = r.bytes().await.map_err(|e| e.to_string())?.to_vec();
        Ok(HttpResponse { status, body })
    }

    fn now_ms(&self) -> u64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0)
    }

    fn random(&self, buf: &mut [u8]) {
        // SystemRandom fails only without an OS entropy source; there is no safe fallback.
        if self.rng.fill(buf).is_err() {
            panic!("the OS random number generator is unavailable");
        }
    }

    async fn sleep(&self, ms: u64) {
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }

    async fn sign_rs256(&self, pkcs8_der: &[u8], msg: &[u8]) -> Result<Vec<u8>, String> {
        let key =
            RsaKeyPair::from_pkcs8(pkcs8_der).map_err(|e| format!("service-account key: {e}"))?;
        let mut sig = vec![0u8; key.public().modulus_len()];
        key.sign(&RSA_PKCS1_SHA256, &self.rng, msg, &mut sig)
            .map_err(|e| format!("RS256 signing failed: {e}"))?;
        Ok(sig)
    }

    async fn rate_limit(&self, _key: &str) -> Option<bool> {
        None // Lambda has no rate-limit binding: the core's per-instance limit applies.
    }

    fn log(&self, line: &str) {
        println!("{line}");
    }
}

/// `edge/assets/index.html`: the demo page, one self-contained file.
pub const DEMO_PAGE: &str = include_str!("../../assets/index.html");

fn demo_page(
    platform: &Native,
    req: &edge_core::Request,
) -> Result<Response<Body>, lambda_http::Error> {
    let body = if req.method == "HEAD" {
        Body::Empty
    } else {
        Body::Text(DEMO_PAGE.to_owned())
    };
    Ok(Response::builder()
        .status(200)
        .header("content-type", "text/html; charset=utf-8")
        .header("cache-control", "no-cache")
        .header("x-request-id", edge_core::api::request_id(platform, req))
        .body(body)?)
}

/// Serves one Lambda HTTP event. The core's futures are not `Send` (a Worker isolate is
/// single-threaded), so each request runs on a blocking thread that drives it to completion.
pub async fn handle(
    app: Arc<App>,
    platform: Native,
    event: Request,
) -> Result<Response<Body>, lambda_http::Error> {
    let (parts, body) = event.into_parts();
    let req = edge_core::Request {
        method: parts.method.as_str().to_owned(),
        path: api_path(&parts),
        query: parts.uri.query().unwrap_or("").to_owned(),
        headers: parts
            .headers
            .iter()
            .filter_map(|(k, v)| {
                Some((k.as_str().to_ascii_lowercase(), v.to_str().ok()?.to_owned()))
            })
            .collect(),
        body: body.to_vec(),
    };
    if req.path == "/" && matches!(req.method.as_str(), "GET" | "HEAD") {
        return demo_page(&platform, &req);
    }
    let rt = tokio::runtime::Handle::current();
    let res = tokio::task::spawn_blocking(move || rt.block_on(app.handle(&platform, req))).await?;
    let mut builder = Response::builder().status(res.status);
    for (k, v) in &res.headers {
        builder = builder.header(k, v);
    }
    Ok(builder.body(Body::Text(String::from_utf8_lossy(&res.body).into_owned()))?)
}

/// The request's path as the API knows it, without an API Gateway stage. `lambda_http` puts
/// a named stage (`prod`) before the path of a REST API event (payload 1.0), and an HTTP API
/// on a named stage sends it in the path itself (`/prod/v1/chat`); Function URLs and the
/// `$default` stage have none.
fn api_path(parts: &lambda_http::http::request::Parts) -> String {
    use lambda_http::RequestExt as _;
    use lambda_http::request::RequestContext;
    // A REST API event's own path, which has no stage; an HTTP API event's raw path.
    let raw = parts.raw_http_path();
    let path = if raw.is_empty() {
        parts.uri.path()
    } else {
        raw
    };
    let stage = match parts.request_context_ref() {
        Some(RequestContext::ApiGatewayV1(c)) => c.stage.as_deref(),
        Some(RequestContext::ApiGatewayV2(c)) => c.stage.as_deref(),
        _ => None,
    };
    without_stage(path, stage).to_owned()
}

/// `path` with a leading `/{stage}` removed, unless the path is already one the edge serves
/// (the stage may be named like a route's first segment, `v1`).
fn without_stage<'a>(path: &'a str, stage: Option<&str>) -> &'a str {
    let serves = |p: &str| p.trim_end_matches('/').is_empty() || edge_core::api::is_route(p);
    let Some(stage) = stage.filter(|s| !s.is_empty() && *s != "$default") else {
        return path;
    };
    if serves(path) {
        return path;
    }
    match path.strip_prefix('/').and_then(|p| p.strip_prefix(stage)) {
        Some("") => "/",
        Some(rest) if rest.starts_with('/') => rest,
        _ => path,
    }
}

/// What keeps this process from being a Lambda function: Lambda's runtime variables, which
/// the runtime client reads (and panics without), missing or unusable. `None` inside Lambda.
pub fn runtime_env_problem(var: impl Fn(&str) -> Option<String>) -> Option<String> {
    const OUTSIDE: &str = "this binary is an AWS Lambda function: deploy it as `bootstrap` on \
                           the provided.al2023 runtime (see the README); to run the edge here, \
                           use `cargo xtask dev`";
    let missing = [
        "AWS_LAMBDA_RUNTIME_API",
        "AWS_LAMBDA_FUNCTION_NAME",
        "AWS_LAMBDA_FUNCTION_VERSION",
        "AWS_LAMBDA_FUNCTION_MEMORY_SIZE",
    ]
    .into_iter()
    .find(|k| var(k).is_none_or(|v| v.trim().is_empty()));
    if let Some(k) = missing {
        return Some(format!("{k} is not set: {OUTSIDE}"));
    }
    let memory = var("AWS_LAMBDA_FUNCTION_MEMORY_SIZE").unwrap_or_default();
    if memory.parse::<i32>().is_err() {
        return Some(format!(
            "AWS_LAMBDA_FUNCTION_MEMORY_SIZE must be a whole number of MB, got {memory:?}"
        ));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::{runtime_env_problem, without_stage};

    #[test]
    fn a_named_stage_is_taken_off_the_path() {
        for (path, stage, expected) in [
            ("/v1/chat", None, "/v1/chat"),
            ("/v1/chat", Some("$default"), "/v1/chat"),
            ("/prod/v1/chat", Some("prod"), "/v1/chat"),
            ("/prod/v1/jobs/ab12", Some("prod"), "/v1/jobs/ab12"),
            ("/prod/healthz", Some("prod"), "/healthz"),
            ("/prod", Some("prod"), "/"),
            ("/prod/", Some("prod"), "/"),
            // Already a route: kept, even when the stage is named like its first segment.
            ("/v1/chat", Some("v1"), "/v1/chat"),
            ("/v1/v1/chat", Some("v1"), "/v1/chat"),
            ("/v1/chat", Some("prod"), "/v1/chat"),
            // Neither a route nor under the stage: left for the API's 404.
            ("/production/v1/chat", Some("prod"), "/production/v1/chat"),
            ("/other", Some("prod"), "/other"),
        ] {
            assert_eq!(without_stage(path, stage), expected, "{path} on {stage:?}");
        }
    }

    fn vars(set: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let set: Vec<(String, String)> = set
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        move |k| set.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone())
    }

    const LAMBDA: [(&str, &str); 4] = [
        ("AWS_LAMBDA_RUNTIME_API", "127.0.0.1:9001"),
        ("AWS_LAMBDA_FUNCTION_NAME", "edge"),
        ("AWS_LAMBDA_FUNCTION_VERSION", "$LATEST"),
        ("AWS_LAMBDA_FUNCTION_MEMORY_SIZE", "256"),
    ];

    #[test]
    fn inside_lambda_there_is_no_problem() {
        assert_eq!(runtime_env_problem(vars(&LAMBDA)), None);
    }

    #[test]
    fn each_missing_variable_is_named() {
        for skip in 0..LAMBDA.len() {
            let mut set = LAMBDA.to_vec();
            let (name, _) = set.remove(skip);
            let problem = runtime_env_problem(vars(&set)).expect("a problem");
            assert!(
                problem.starts_with(&format!("{name} is not set")),
                "{problem}"
            );
            assert!(problem.contains("cargo xtask dev"), "{problem}");
        }
        let problem = runtime_env_problem(vars(&[])).expect("a problem");
        assert!(
            problem.starts_with("AWS_LAMBDA_RUNTIME_API is not set"),
            "{problem}"
        );
    }

    #[test]
    fn an_unusable_memory_size_is_named() {
        let mut set = LAMBDA.to_vec();
        set[3].1 = "lots";
        let problem = runtime_env_problem(vars(&set)).expect("a problem");
        assert!(problem.contains("\"lots\""), "{problem}");
    }
}
