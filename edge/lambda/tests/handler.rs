//! The Lambda adapter with real `lambda_http` request values (API Gateway HTTP API / Function
//! URL payload v2), parsed by `lambda_http` itself.

use std::sync::Arc;

use edge_core::auth::entry;
use edge_core::{App, Config};
use edge_lambda::{Native, handle};
use lambda_http::Body;
use serde_json::{Value, json};

fn app() -> Arc<App> {
    let keys = entry("alice", "lambda-key", b"0123456789ab");
    let vars = [
        ("API_KEYS", keys),
        ("GCP_PROJECT", "test".to_owned()),
        ("PUBSUB_EMULATOR_HOST", "127.0.0.1:9".to_owned()),
        ("FIRESTORE_EMULATOR_HOST", "127.0.0.1:9".to_owned()),
        ("UPSTREAM_DEADLINE_MS", "300".to_owned()),
    ];
    Arc::new(App::new(Config::from_env(|k| {
        vars.iter().find(|(n, _)| *n == k).map(|(_, v)| v.clone())
    })))
}

fn event(
    method: &str,
    path: &str,
    query: &str,
    headers: Value,
    body: Option<&str>,
) -> lambda_http::Request {
    let ev = stack::lambda::http_event(method, path, query, headers, body, false);
    lambda_http::request::from_str(&ev.to_string()).expect("a valid API Gateway v2 event")
}

async fn call(ev: lambda_http::Request) -> (u16, Value, lambda_http::http::HeaderMap) {
    let r = handle(app(), Native::new(), ev)
        .await
        .expect("handler answers");
    let status = r.status().as_u16();
    let headers = r.headers().clone();
    let body: Value = match r.body() {
        lambda_http::Body::Text(t) => serde_json::from_str(t).unwrap_or(Value::Null),
        _ => Value::Null,
    };
    (status, body, headers)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn greeting_is_answered_at_the_edge() {
    let headers = json!({"authorization": "Bearer lambda-key", "content-type": "application/json"});
    let (status, body, h) = call(event(
        "POST",
        "/v1/chat",
        "",
        headers,
        Some(r#"{"message":"안녕하세요"}"#),
    ))
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["route"], "edge");
    assert_eq!(body["intent"], "greeting");
    assert!(h.get("x-request-id").is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_and_queries_pass_through() {
    let (status, body, _) = call(event("GET", "/healthz", "", json!({}), None)).await;
    assert_eq!((status, body["status"].as_str()), (200, Some("ok")));
    let (status, body, _) = call(event(
        "POST",
        "/v1/chat",
        "",
        json!({"content-type": "application/json"}),
        Some("{}"),
    ))
    .await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (401, Some("missing_api_key"))
    );
    let auth = json!({"authorization": "Bearer lambda-key"});
    let (status, body, _) = call(event(
        "GET",
        "/v1/jobs/0123456789abcdef0123456789abcdef",
        "wait=99",
        auth.clone(),
        None,
    ))
    .await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (422, Some("invalid_wait"))
    );
    // Firestore unreachable: a 503 from the system, not a 500 or a panic.
    let (status, body, _) = call(event(
        "GET",
        "/v1/jobs/0123456789abcdef0123456789abcdef",
        "",
        auth,
        None,
    ))
    .await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (503, Some("store_unavailable"))
    );
}

/// GET or HEAD `/` with `headers`: (status, the header `name`, the body).
async fn root(method: &str, headers: Value, name: &str) -> (u16, Option<String>, Body) {
    let r = handle(app(), Native::new(), event(method, "/", "", headers, None))
        .await
        .expect("handler answers");
    let header = r.headers().get(name).and_then(|v| v.to_str().ok());
    (
        r.status().as_u16(),
        header.map(str::to_owned),
        r.into_body(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn root_serves_the_demo_page() {
    let page =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../assets/index.html"))
            .expect("edge/assets/index.html");
    let (status, content_type, body) = root("GET", json!({}), "content-type").await;
    assert_eq!(status, 200);
    assert_eq!(content_type.as_deref(), Some("text/html; charset=utf-8"));
    match body {
        Body::Text(t) => assert_eq!(t, page),
        other => panic!("expected the page as text, got {other:?}"),
    }
    let (_, request_id, _) = root("GET", json!({}), "x-request-id").await;
    assert!(request_id.is_some_and(|id| id.len() == 16));

    // A caller's usable request id is kept, as on every other route; HEAD has no body.
    let (status, request_id, body) =
        root("HEAD", json!({"x-request-id": "trace-42"}), "x-request-id").await;
    assert_eq!(status, 200);
    assert_eq!(request_id.as_deref(), Some("trace-42"));
    assert!(matches!(body, Body::Empty));

    // Only GET and HEAD: anything else at `/` is the API's JSON error.
    let (status, body, h) = call(event("POST", "/", "", json!({}), None)).await;
    assert!(status == 404 || status == 405, "{status} {body}");
    assert!(body["error"]["code"].is_string(), "{body}");
    assert!(h.get("x-request-id").is_some());
}

/// An API Gateway REST API proxy event (payload 1.0) on the stage `stage`: its `path` has no
/// stage, and `lambda_http` puts the stage before it.
fn rest_event(method: &str, path: &str, stage: &str, headers: Value, body: Option<&str>) -> Value {
    json!({
        "resource": "/{proxy+}",
        "path": path,
        "httpMethod": method,
        "headers": headers,
        "queryStringParameters": null,
        "pathParameters": {"proxy": path.trim_start_matches('/')},
        "stageVariables": null,
        "requestContext": {
            "accountId": "123456789012", "resourceId": "abc123", "stage": stage,
            "requestId": "r1", "identity": {"sourceIp": "127.0.0.1"},
            "resourcePath": "/{proxy+}", "httpMethod": method, "apiId": "api",
            "path": format!("/{stage}{path}")
        },
        "body": body,
        "isBase64Encoded": false
    })
}

/// Behind API Gateway on a named stage (`prod`), the routes answer as they do without one:
/// the stage is not part of the API's paths.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_answer_on_a_named_api_gateway_stage() {
    let headers = json!({"authorization": "Bearer lambda-key", "content-type": "application/json"});
    let hello = Some(r#"{"message":"안녕하세요"}"#);
    let parse = |ev: Value| lambda_http::request::from_str(&ev.to_string()).expect("an event");
    // REST API (payload 1.0), stages named `prod` and `v1` (like the routes' first segment).
    for stage in ["prod", "v1"] {
        let ev = parse(rest_event(
            "POST",
            "/v1/chat",
            stage,
            headers.clone(),
            hello,
        ));
        let (status, body, _) = call(ev).await;
        assert_eq!(status, 200, "REST API on {stage}: {body}");
        assert_eq!(body["intent"], "greeting", "{body}");
        let ev = parse(rest_event("GET", "/healthz", stage, json!({}), None));
        let (status, body, _) = call(ev).await;
        assert_eq!(
            (status, body["status"].as_str()),
            (200, Some("ok")),
            "{body}"
        );
    }
    // HTTP API (payload 2.0) on a named stage: the stage comes in the raw path.
    for (stage, path) in [("prod", "/prod/v1/chat"), ("v1", "/v1/v1/chat")] {
        let mut ev = stack::lambda::http_event("POST", path, "", headers.clone(), hello, false);
        ev["requestContext"]["stage"] = json!(stage);
        let (status, body, _) = call(parse(ev)).await;
        assert_eq!(status, 200, "HTTP API on {stage}: {body}");
        assert_eq!(body["intent"], "greeting", "{body}");
    }
    // The demo page at the stage's root.
    let r = handle(
        app(),
        Native::new(),
        parse(rest_event("GET", "/", "prod", json!({}), None)),
    )
    .await
    .expect("handler answers");
    assert_eq!(r.status().as_u16(), 200);
    assert!(matches!(r.body(), Body::Text(t) if t.contains("<html")));
    // A path outside the API is still the API's 404, stage or not.
    let ev = parse(rest_event("GET", "/nowhere", "prod", json!({}), None));
    let (status, body, _) = call(ev).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (404, Some("not_found"))
    );
}
