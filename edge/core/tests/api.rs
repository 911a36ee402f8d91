//! The HTTP core, natively and with no async runtime: validation, auth, routing at the edge,
//! errors. Upstream calls fail here (no network), which is itself a case: a 503, never a
//! panic. The paths that reach Pub/Sub and Firestore run against the real emulators in the
//! `stack` tests and through `wrangler dev`.

use edge_core::api::{Limits, shard};
use edge_core::auth::entry;
use edge_core::testing::{Offline, block_on};
use edge_core::{App, Config, Platform, Request, Response};
use serde_json::{Value, json};
use shared::wire::InputItem;

const KEY_A: &str = "test-key-alice";
const KEY_B: &str = "test-key-bob";

fn config(extra: &[(&str, &str)]) -> Config {
    let keys = format!(
        "{},{}",
        entry("alice", KEY_A, b"0123456789ab"),
        entry("bob", KEY_B, b"ba9876543210")
    );
    config_with_keys(keys, extra)
}

/// [`config`] with the `API_KEYS` entries `keys`.
fn config_with_keys(keys: String, extra: &[(&str, &str)]) -> Config {
    let mut vars = vec![
        ("API_KEYS", keys),
        ("GCP_PROJECT", "test".to_owned()),
        ("PUBSUB_EMULATOR_HOST", "127.0.0.1:9".to_owned()),
        ("FIRESTORE_EMULATOR_HOST", "127.0.0.1:9".to_owned()),
        ("UPSTREAM_DEADLINE_MS", "1000".to_owned()),
    ];
    // An `extra` variable replaces the default above.
    vars.retain(|(k, _)| !extra.iter().any(|(e, _)| e == k));
    vars.extend(extra.iter().map(|(k, v)| (*k, (*v).to_owned())));
    Config::from_env(move |k| vars.iter().find(|(n, _)| *n == k).map(|(_, v)| v.clone()))
}

fn small_limits() -> Limits {
    Limits {
        batch_items: 10,
        ..Limits::default()
    }
}

fn request(method: &str, path: &str, auth: Option<&str>, ct: Option<&str>, body: &[u8]) -> Request {
    let (path, query) = path.split_once('?').unwrap_or((path, ""));
    let mut headers = Vec::new();
    if let Some(a) = auth {
        headers.push(("authorization".to_owned(), a.to_owned()));
    }
    if let Some(c) = ct {
        headers.push(("content-type".to_owned(), c.to_owned()));
    }
    Request {
        method: method.into(),
        path: path.into(),
        query: query.into(),
        headers,
        body: body.to_vec(),
    }
}

fn post(path: &str, body: &str) -> Request {
    post_as(KEY_A, path, body)
}

/// A JSON `POST` with API key `key`.
fn post_as(key: &str, path: &str, body: &str) -> Request {
    request(
        "POST",
        path,
        Some(&format!("Bearer {key}")),
        Some("application/json"),
        body.as_bytes(),
    )
}

/// A `classify` batch of the file `uri`.
fn input_uri_batch(uri: &str) -> String {
    json!({"task": "classify", "input_uri": uri}).to_string()
}

fn serve(app: &App, req: Request) -> Response {
    block_on(app.handle(&Offline::new(), req))
}

#[test]
fn bad_requests_get_their_status_and_code() {
    let app = App::with_limits(config(&[]), small_limits());
    let auth = format!("Bearer {KEY_A}");
    let items = |n: usize| {
        let items: Vec<Value> = (0..n)
            .map(|i| json!({"custom_id": format!("c{i}"), "input": "x"}))
            .collect();
        json!({"task": "classify", "items": items}).to_string()
    };
    let long = "가".repeat(2001);
    let with_key = |message: &str| {
        let mut r = post("/v1/chat", &json!({ "message": message }).to_string());
        r.headers
            .push(("idempotency-key".into(), "has space".into()));
        r
    };
    let cases: Vec<(&str, Request, u16, &str)> = vec![
        ("bad JSON", post("/v1/chat", "{"), 400, "invalid_json"),
        ("not an object", post("/v1/chat", "[]"), 400, "invalid_body"),
        (
            "wrong type",
            post("/v1/chat", r#"{"message": 5}"#),
            400,
            "invalid_type",
        ),
        (
            "null message",
            post("/v1/chat", r#"{"message": null}"#),
            400,
            "invalid_type",
        ),
        (
            "unknown field",
            post("/v1/chat", r#"{"message":"hi","extra":1}"#),
            400,
            "unknown_field",
        ),
        (
            "missing message",
            post("/v1/chat", "{}"),
            400,
            "missing_field",
        ),
        (
            "empty message",
            post("/v1/chat", r#"{"message":""}"#),
            422,
            "message_empty",
        ),
        (
            "blank message",
            post("/v1/chat", r#"{"message":"  \n "}"#),
            422,
            "message_empty",
        ),
        (
            "invisible message",
            post("/v1/chat", r#"{"message":"\u0000\u200b\ufeff\u2060\t"}"#),
            422,
            "message_empty",
        ),
        (
            "2001 chars",
            post("/v1/chat", &json!({"message": long}).to_string()),
            422,
            "message_too_long",
        ),
        (
            "bad locale",
            post("/v1/chat", r#"{"message":"hi","locale":"fr"}"#),
            422,
            "invalid_locale",
        ),
        (
            "locale type",
            post("/v1/chat", r#"{"message":"hi","locale":3}"#),
            400,
            "invalid_type",
        ),
        (
            "wrong method",
            request("GET", "/v1/chat", Some(&auth), None, b""),
            405,
            "method_not_allowed",
        ),
        (
            // No CORS: keys stay on servers (README, Browsers).
            "cross-origin preflight",
            request("OPTIONS", "/v1/chat", None, None, b""),
            405,
            "method_not_allowed",
        ),
        (
            "wrong method on health",
            request("PUT", "/healthz", None, None, b""),
            405,
            "method_not_allowed",
        ),
        (
            "text/plain",
            request("POST", "/v1/chat", Some(&auth), Some("text/plain"), b"{}"),
            415,
            "unsupported_media_type",
        ),
        (
            "no content type",
            request("POST", "/v1/chat", Some(&auth), None, b"{}"),
            415,
            "unsupported_media_type",
        ),
        (
            "EUC-KR declared",
            request(
                "POST",
                "/v1/chat",
                Some(&auth),
                Some("application/json; charset=EUC-KR"),
                b"{\"message\":\"\xbe\xc8\xb3\xe7\"}",
            ),
            415,
            "unsupported_media_type",
        ),
        (
            "no auth",
            request("POST", "/v1/chat", None, Some("application/json"), b"{}"),
            401,
            "missing_api_key",
        ),
        (
            "basic auth",
            request(
                "POST",
                "/v1/chat",
                Some("Basic eDp5"),
                Some("application/json"),
                b"{}",
            ),
            401,
            "invalid_authorization",
        ),
        (
            "wrong key",
            request(
                "POST",
                "/v1/chat",
                Some("Bearer nope"),
                Some("application/json"),
                b"{}",
            ),
            401,
            "invalid_api_key",
        ),
        (
            "non-UTF-8",
            request(
                "POST",
                "/v1/chat",
                Some(&auth),
                Some("application/json"),
                b"{\"message\":\"\xff\xfe\"}",
            ),
            400,
            "invalid_utf8",
        ),
        (
            "oversize body",
            post(
                "/v1/chat",
                &format!(r#"{{"message":"{}"}}"#, "a".repeat(17_000)),
            ),
            413,
            "payload_too_large",
        ),
        (
            "unknown job",
            request("GET", "/v1/jobs/not-a-job", Some(&auth), None, b""),
            404,
            "job_not_found",
        ),
        (
            "bad wait",
            request(
                "GET",
                "/v1/jobs/0123456789abcdef0123456789abcdef?wait=26",
                Some(&auth),
                None,
                b"",
            ),
            422,
            "invalid_wait",
        ),
        (
            "wait not a number",
            request(
                "GET",
                "/v1/jobs/0123456789abcdef0123456789abcdef?wait=x",
                Some(&auth),
                None,
                b"",
            ),
            422,
            "invalid_wait",
        ),
        (
            "unknown route",
            request("GET", "/v2/chat", Some(&auth), None, b""),
            404,
            "not_found",
        ),
        (
            "huge batch",
            post("/v1/batches", &items(11)),
            413,
            "too_many_items",
        ),
        (
            "no items",
            post("/v1/batches", r#"{"task":"classify","items":[]}"#),
            422,
            "no_items",
        ),
        (
            "items not array",
            post("/v1/batches", r#"{"task":"classify","items":{}}"#),
            400,
            "invalid_type",
        ),
        (
            "bad task",
            post(
                "/v1/batches",
                r#"{"task":"translate","items":[{"custom_id":"a","input":"x"}]}"#,
            ),
            422,
            "invalid_task",
        ),
        (
            "both sources",
            post(
                "/v1/batches",
                r#"{"task":"classify","items":[],"input_uri":"gs://b/o"}"#,
            ),
            422,
            "items_or_input_uri",
        ),
        (
            "no source",
            post("/v1/batches", r#"{"task":"classify"}"#),
            422,
            "items_or_input_uri",
        ),
        (
            "bad uri",
            post(
                "/v1/batches",
                r#"{"task":"classify","input_uri":"http://example.com/x"}"#,
            ),
            422,
            "invalid_input_uri",
        ),
        (
            "duplicate custom_id",
            post(
                "/v1/batches",
                r#"{"task":"classify","items":[{"custom_id":"a","input":"x"},{"custom_id":"a","input":"y"}]}"#,
            ),
            422,
            "duplicate_custom_id",
        ),
        (
            "empty custom_id",
            post(
                "/v1/batches",
                r#"{"task":"classify","items":[{"custom_id":"","input":"x"}]}"#,
            ),
            422,
            "invalid_custom_id",
        ),
        (
            "item missing input",
            post(
                "/v1/batches",
                r#"{"task":"classify","items":[{"custom_id":"a"}]}"#,
            ),
            400,
            "missing_field",
        ),
        (
            "item unknown field",
            post(
                "/v1/batches",
                r#"{"task":"classify","items":[{"custom_id":"a","input":"x","n":1}]}"#,
            ),
            400,
            "unknown_field",
        ),
        (
            "bad idempotency key",
            with_key("근처 짜장면집 추천해줘"),
            400,
            "invalid_idempotency_key",
        ),
        (
            "bad idempotency key on a message the edge answers",
            with_key("안녕"),
            400,
            "invalid_idempotency_key",
        ),
    ];
    assert!(cases.len() >= 20);
    for (name, req, status, code) in cases {
        let r = serve(&app, req);
        let body = r.json_body();
        assert_eq!(
            (r.status, body["error"]["code"].as_str()),
            (status, Some(code)),
            "{name}: {body}"
        );
        let message = body["error"]["message"].as_str().unwrap_or("");
        assert!(message.len() > 10, "{name}: message {message:?}");
        assert!(
            r.header("x-request-id").is_some_and(|id| !id.is_empty()),
            "{name}"
        );
        assert!(
            r.header("content-type")
                .is_some_and(|c| c.starts_with("application/json")),
            "{name}"
        );
        if status == 405 {
            assert!(r.header("allow").is_some(), "{name}");
        }
        assert!(r.header("access-control-allow-origin").is_none(), "{name}");
    }
}

#[test]
fn healthz_reports_the_model_and_needs_no_key() {
    let app = App::new(config(&[]));
    let r = serve(&app, request("GET", "/healthz", None, None, b""));
    assert_eq!(r.status, 200);
    let body = r.json_body();
    assert_eq!(body["status"], "ok");
    assert_eq!(body["model"]["sha256"].as_str().map(str::len), Some(64));
    assert!(body["model"]["name"].is_string());
}

#[test]
fn misconfiguration_is_named_not_hidden() {
    let app = App::new(Config::from_env(|_| None));
    let r = serve(&app, request("GET", "/healthz", None, None, b""));
    assert_eq!(r.status, 503);
    let text = r.json_body().to_string();
    assert!(
        text.contains("API_KEYS") && text.contains("GCP_PROJECT"),
        "{text}"
    );
    let r = serve(&app, post("/v1/chat", r#"{"message":"hi"}"#));
    assert_eq!(
        (r.status, r.json_body()["error"]["code"].as_str()),
        (503, Some("misconfigured"))
    );
}

/// `file://` inputs exist only for local development: against the emulators the edge takes
/// them (here the offline upstream then fails the call, so past validation), with Google it
/// refuses them.
#[test]
fn file_input_uris_only_against_the_emulators() {
    let file = &input_uri_batch("file:///tmp/in.jsonl");
    let code = |r: &Response| r.json_body()["error"]["code"].as_str().map(str::to_owned);
    let local = App::new(config(&[]));
    let r = serve(&local, post("/v1/batches", file));
    assert_eq!(r.status, 503, "{:?}", r.json_body());
    for bad in [
        "file:///",
        "file:///tmp/",
        "file://host/x.jsonl",
        "/tmp/in.jsonl",
    ] {
        let r = serve(&local, post("/v1/batches", &input_uri_batch(bad)));
        assert_eq!(
            (r.status, code(&r).as_deref()),
            (422, Some("invalid_input_uri")),
            "{bad}"
        );
        assert!(
            r.json_body().to_string().contains("file:///absolute"),
            "{bad}"
        );
    }
    let keys = entry("alice", KEY_A, b"0123456789ab");
    let google = App::new(Config::from_env(move |k| match k {
        "API_KEYS" => Some(keys.clone()),
        "GCP_PROJECT" => Some("test".into()),
        "GCP_SERVICE_ACCOUNT_KEY" => {
            Some(r#"{"client_email":"edge@test.iam","private_key":"unused"}"#.into())
        }
        _ => None,
    }));
    let r = serve(&google, post("/v1/batches", file));
    assert_eq!(
        (r.status, code(&r).as_deref()),
        (422, Some("invalid_input_uri"))
    );
    assert!(!r.json_body().to_string().contains("file:///absolute"));
}

/// With `INPUT_URI_PREFIX` an `input_uri` must name an object under it, `{key}` being the
/// caller's key name: each key reads only its own folder, by plain path segments.
#[test]
fn input_uris_stay_under_the_configured_prefix() {
    let app = App::new(config(&[("INPUT_URI_PREFIX", "gs://inputs/{key}/")]));
    let submit =
        |key: &str, uri: &str| serve(&app, post_as(key, "/v1/batches", &input_uri_batch(uri)));
    // Allowed: past validation, the store (unreachable here) answers 503.
    for (key, uri) in [
        (KEY_A, "gs://inputs/alice/in.jsonl"),
        (KEY_A, "gs://inputs/alice/2026/12/in.jsonl"),
        (KEY_B, "gs://inputs/bob/in.jsonl"),
    ] {
        let r = submit(key, uri);
        assert_eq!(r.status, 503, "{uri}: {:?}", r.json_body());
    }
    for uri in [
        "gs://inputs/bob/in.jsonl",
        "gs://inputs/alicex/in.jsonl",
        "gs://inputs/alice/",
        "gs://inputs/alice/../bob/in.jsonl",
        "gs://inputs/alice/./in.jsonl",
        "gs://inputs/alice//in.jsonl",
        "gs://inputs/alice/%2e%2e/bob/in.jsonl",
        "gs://inputs/alice%2Fin.jsonl",
        "gs://other/alice/in.jsonl",
        "file:///tmp/in.jsonl",
        // A URL parser drops tabs and line breaks, then resolves `..`: bob's file.
        "gs://inputs/alice/.\t./bob/in.jsonl",
        "gs://inputs/alice/.\n./bob/in.jsonl",
        "gs://inputs/alice/.\r./bob/in.jsonl",
        "gs://inputs/alice/..\\bob\\in.jsonl",
        "gs://inputs/alice/in.jsonl?generation=1",
        "gs://inputs/alice/in.jsonl#x",
    ] {
        let r = submit(KEY_A, uri);
        let body = r.json_body();
        assert_eq!(
            (r.status, body["error"]["code"].as_str()),
            (422, Some("invalid_input_uri")),
            "{uri}: {body:?}"
        );
        let message = body["error"]["message"].as_str().unwrap_or_default();
        assert!(
            message.contains("gs://inputs/alice/")
                || message.contains("must be gs://")
                || message.contains("must not contain control characters"),
            "{uri}: {message}"
        );
    }
    // A key whose name has a `/` has no folder of its own.
    let slashed = App::new(config_with_keys(
        entry("team/a", KEY_A, b"0123456789ab"),
        &[("INPUT_URI_PREFIX", "gs://inputs/{key}/")],
    ));
    let body = input_uri_batch("gs://inputs/team/a/in.jsonl");
    let r = serve(&slashed, post("/v1/batches", &body));
    assert_eq!(r.status, 422, "{:?}", r.json_body());
    assert!(
        r.json_body()["error"]["message"]
            .to_string()
            .contains("cannot name a folder")
    );
    // Without `{key}` the prefix is one folder for every key.
    let shared = App::new(config(&[("INPUT_URI_PREFIX", "gs://inputs/shared/")]));
    let body = input_uri_batch("gs://inputs/shared/in.jsonl");
    assert_eq!(serve(&shared, post("/v1/batches", &body)).status, 503);
}

/// A mistyped rate limit or logging setting is named, not quietly replaced by the default.
#[test]
fn bad_settings_are_named_and_stop_v1() {
    for (var, value) in [
        ("RATE_LIMIT_PER_MINUTE", "1k"),
        ("RATE_LIMIT_PER_MINUTE", "0"),
        ("LOG_REQUESTS", "error"),
        ("INPUT_URI_PREFIX", "gs://inputs"),
        ("INPUT_URI_PREFIX", "s3://inputs/"),
        ("INPUT_URI_PREFIX", "gs:///folder/"),
        ("INPUT_URI_PREFIX", "gs://{key}/"),
    ] {
        let app = App::new(config(&[(var, value)]));
        let r = serve(&app, request("GET", "/healthz", None, None, b""));
        assert_eq!(r.status, 503, "{var}={value}");
        let text = r.json_body()["problems"].to_string();
        assert!(text.contains(var) && text.contains(value), "{text}");
        let r = serve(&app, post("/v1/chat", r#"{"message":"hi"}"#));
        assert_eq!(
            (r.status, r.json_body()["error"]["code"].as_str()),
            (503, Some("misconfigured")),
            "{var}={value}"
        );
        assert!(r.json_body()["error"]["message"].to_string().contains(var));
    }
    for (var, value) in [
        ("RATE_LIMIT_PER_MINUTE", "1"),
        ("LOG_REQUESTS", "errors"),
        ("INPUT_URI_PREFIX", "gs://inputs/"),
        ("INPUT_URI_PREFIX", "gs://inputs/{key}/"),
        ("UPSTREAM_DEADLINE_MS", "120000"),
    ] {
        let app = App::new(config(&[(var, value)]));
        let r = serve(&app, request("GET", "/healthz", None, None, b""));
        assert_eq!(r.status, 200, "{var}={value}");
    }
    // A Google setting stops what needs Google; the edge still answers what it can alone.
    for value in ["0", "18446744073709551615"] {
        let app = App::new(config(&[("UPSTREAM_DEADLINE_MS", value)]));
        let r = serve(&app, request("GET", "/healthz", None, None, b""));
        let text = r.json_body()["problems"].to_string();
        assert_eq!(r.status, 503, "{text}");
        assert!(
            text.contains("UPSTREAM_DEADLINE_MS") && text.contains(value),
            "{text}"
        );
        let r = serve(
            &app,
            post(
                "/v1/batches",
                r#"{"task":"classify","items":[{"custom_id":"a","input":"x"}]}"#,
            ),
        );
        assert_eq!(
            (r.status, r.json_body()["error"]["code"].as_str()),
            (503, Some("misconfigured")),
        );
        let r = serve(&app, post("/v1/chat", r#"{"message":"안녕"}"#));
        assert_eq!(r.status, 200);
    }
}

#[test]
fn trivial_messages_are_answered_at_the_edge_in_their_language() {
    let app = App::new(config(&[]));
    for (msg, locale, intent, hangul) in [
        ("안녕하세요", None, "greeting", true),
        ("고마워!", None, "thanks", true),
        ("hello there", None, "greeting", false),
        ("안녕", Some("en"), "greeting", false),
    ] {
        let body = match locale {
            Some(l) => json!({"message": msg, "locale": l}),
            None => json!({"message": msg}),
        };
        let r = serve(&app, post("/v1/chat", &body.to_string()));
        let b = r.json_body();
        assert_eq!(r.status, 200, "{msg}: {b}");
        assert_eq!(
            (b["route"].as_str(), b["intent"].as_str()),
            (Some("edge"), Some(intent)),
            "{msg}"
        );
        let reply = b["reply"].as_str().unwrap_or("");
        assert_eq!(
            reply.chars().any(|c| ('가'..='힣').contains(&c)),
            hangul,
            "{msg}: {reply}"
        );
        assert!(
            b["confidence"]
                .as_f64()
                .is_some_and(|c| c > 0.5 && c <= 1.0)
        );
    }
}

#[test]
fn a_body_not_declared_as_json_is_told_how_to_declare_it() {
    let app = App::new(config(&[]));
    let auth = format!("Bearer {KEY_A}");
    let body = br#"{"message":"hi"}"#;
    let message = |ct: Option<&str>| {
        let r = serve(&app, request("POST", "/v1/chat", Some(&auth), ct, body));
        assert_eq!(r.status, 415);
        r.json_body()["error"]["message"]
            .as_str()
            .unwrap_or("")
            .to_owned()
    };
    let none = message(None);
    assert!(
        none.contains("no Content-Type") && none.contains("application/json"),
        "{none}"
    );
    // What `curl -d` sends: the message says how to send JSON with curl.
    let form = message(Some("application/x-www-form-urlencoded"));
    assert!(
        form.contains("curl") && form.contains("-H 'content-type: application/json'"),
        "{form}"
    );
    let text = message(Some("text/plain"));
    assert!(
        text.contains("\"text/plain\"") && !text.contains("curl"),
        "{text}"
    );
}

#[test]
fn utf8_bodies_may_say_so_and_may_start_with_a_byte_order_mark() {
    let app = App::new(config(&[]));
    let auth = format!("Bearer {KEY_A}");
    let json = "{\"message\":\"안녕하세요\"}";
    for (ct, body) in [
        ("application/json; charset=utf-8", json.as_bytes().to_vec()),
        (
            "application/json;charset=\"UTF-8\"",
            json.as_bytes().to_vec(),
        ),
        ("application/json; charset=utf8", json.as_bytes().to_vec()),
        (
            "application/json",
            [&b"\xEF\xBB\xBF"[..], json.as_bytes()].concat(),
        ),
    ] {
        let r = serve(
            &app,
            request("POST", "/v1/chat", Some(&auth), Some(ct), &body),
        );
        let b = r.json_body();
        assert_eq!(
            (r.status, b["intent"].as_str()),
            (200, Some("greeting")),
            "{ct}: {b}"
        );
    }
    // A declared charset other than UTF-8 is named; undeclared legacy bytes are explained.
    let euc_kr = b"{\"message\":\"\xbe\xc8\xb3\xe7\"}";
    let r = serve(
        &app,
        request(
            "POST",
            "/v1/chat",
            Some(&auth),
            Some("application/json; charset=cp949"),
            euc_kr,
        ),
    );
    let msg = r.json_body()["error"]["message"]
        .as_str()
        .unwrap_or("")
        .to_owned();
    assert!(
        msg.contains("charset=\"cp949\"") && msg.contains("UTF-8"),
        "{msg}"
    );
    let r = serve(
        &app,
        request(
            "POST",
            "/v1/chat",
            Some(&auth),
            Some("application/json"),
            euc_kr,
        ),
    );
    let msg = r.json_body()["error"]["message"]
        .as_str()
        .unwrap_or("")
        .to_owned();
    assert_eq!(r.status, 400, "{msg}");
    assert!(msg.contains("EUC-KR"), "{msg}");
}

#[test]
fn null_optional_fields_count_as_absent() {
    let app = App::new(config(&[]));
    let r = serve(
        &app,
        post("/v1/chat", r#"{"message":"안녕","locale":null}"#),
    );
    let b = r.json_body();
    assert_eq!(
        (r.status, b["intent"].as_str()),
        (200, Some("greeting")),
        "{b}"
    );
    // The locale is detected from the message, as when the field is left out.
    let reply = b["reply"].as_str().unwrap_or("");
    assert!(reply.chars().any(|c| ('가'..='힣').contains(&c)), "{reply}");
    // Past validation, these reach the store, which is down here.
    for body in [
        r#"{"task":"classify","items":[{"custom_id":"a","input":"x"}],"input_uri":null}"#,
        r#"{"task":"classify","items":null,"input_uri":"gs://b/o.jsonl"}"#,
    ] {
        let r = serve(&app, post("/v1/batches", body));
        assert_eq!(
            (r.status, r.json_body()["error"]["code"].as_str()),
            (503, Some("store_unavailable")),
            "{body}"
        );
    }
    let r = serve(
        &app,
        post(
            "/v1/batches",
            r#"{"task":"classify","items":null,"input_uri":null}"#,
        ),
    );
    assert_eq!(
        (r.status, r.json_body()["error"]["code"].as_str()),
        (422, Some("items_or_input_uri"))
    );
}

#[test]
fn a_queued_message_with_the_store_down_is_a_503_not_a_panic() {
    let app = App::new(config(&[]));
    let p = Offline::new();
    let r = block_on(app.handle(
        &p,
        post("/v1/chat", r#"{"message":"안녕! 근처 짜장면집 추천해줘"}"#),
    ));
    assert_eq!(
        (r.status, r.json_body()["error"]["code"].as_str()),
        (503, Some("store_unavailable"))
    );
    // Retries stayed inside the deadline (1 s here) on the fake clock.
    assert!(p.now_ms() - 1_795_790_154_000 <= 1_000);
    // The log line has the routing decision and never the message text.
    let logs = p.logs.borrow();
    let line: Value = serde_json::from_str(&logs[0]).expect("JSON log line");
    assert_eq!(line["route"], "queue");
    assert_eq!(line["status"], 503);
    assert!(!logs[0].contains("짜장면"), "{}", logs[0]);
}

#[test]
fn request_ids_are_echoed_when_sane_and_generated_otherwise() {
    let app = App::new(config(&[]));
    let mut req = request("GET", "/healthz", None, None, b"");
    req.headers.push(("x-request-id".into(), "abc-123".into()));
    assert_eq!(serve(&app, req).header("x-request-id"), Some("abc-123"));
    let mut req = request("GET", "/healthz", None, None, b"");
    req.headers.push(("x-request-id".into(), "bad id\n".into()));
    let id = serve(&app, req)
        .header("x-request-id")
        .map(str::to_owned)
        .unwrap_or_default();
    assert_eq!(id.len(), 16);
}

#[test]
fn the_fallback_rate_limit_is_per_key() {
    let app = App::new(config(&[("RATE_LIMIT_PER_MINUTE", "3")]));
    let p = Offline::new();
    let hi = r#"{"message":"hi"}"#;
    for _ in 0..3 {
        assert_eq!(block_on(app.handle(&p, post("/v1/chat", hi))).status, 200);
    }
    let r = block_on(app.handle(&p, post("/v1/chat", hi)));
    assert_eq!(
        (r.status, r.json_body()["error"]["code"].as_str()),
        (429, Some("rate_limited"))
    );
    let bob = post_as(KEY_B, "/v1/chat", hi);
    assert_eq!(block_on(app.handle(&p, bob)).status, 200);
    p.now.set(p.now.get() + 60_000);
    assert_eq!(block_on(app.handle(&p, post("/v1/chat", hi))).status, 200);
}

/// `?wait=N` reads the job every 250 ms for its first 3 s (a chat reply is seen at most
/// 250 ms late) and still stays under the Free plan's 50 subrequests in the longest wait.
#[test]
fn long_polls_read_closely_at_first_and_stay_under_the_subrequest_limit() {
    let wait_ms = 25_000;
    let (mut elapsed, mut reads) = (0, 1);
    let mut gaps = Vec::new();
    loop {
        let gap = edge_core::api::poll_interval(elapsed);
        if elapsed + gap > wait_ms {
            break;
        }
        elapsed += gap;
        reads += 1;
        gaps.push((elapsed, gap));
    }
    assert!(
        gaps.iter()
            .filter(|(at, _)| *at <= 3_000)
            .all(|(_, g)| *g <= 250),
        "{gaps:?}"
    );
    assert!(reads <= 40, "{reads} reads in a 25 s wait");
    assert!(elapsed >= 24_000, "the wait ends {elapsed} ms in");
}

#[test]
fn shards_hold_their_byte_limit_as_json_escapes_included() {
    let limits = Limits {
        shard_bytes: 10_000,
        ..Limits::default()
    };
    // 500 characters that JSON writes as six bytes each (`\u0001`), and plain ones.
    let item = |i: usize, text: String| InputItem {
        custom_id: format!("id-{i}"),
        input: text,
    };
    let items: Vec<InputItem> = (0..40)
        .map(|i| match i % 2 {
            0 => item(i, "\u{1}".repeat(500)),
            _ => item(i, "a".repeat(500)),
        })
        .collect();
    let shards = shard(&items, &limits);
    let json_len = |items: &[InputItem]| serde_json::to_string(items).map_or(0, |j| j.len());
    for (i, s) in shards.iter().enumerate() {
        assert!(json_len(s) <= limits.shard_bytes, "{} bytes", json_len(s));
        // Full: the next shard's first item would not have fitted.
        if let Some(next) = shards.get(i + 1) {
            let more = [&s[..], &next[..1]].concat();
            assert!(json_len(&more) > limits.shard_bytes, "shard {i} not full");
        }
    }
    // Counted by raw length (~21 KB) they would fit in three shards; as JSON (~72 KB) not.
    assert!(shards.len() >= 8, "{} shards", shards.len());
    assert_eq!(shards.concat(), items, "every item once, in order");
    // One item over the limit still goes out, alone.
    let big = vec![item(0, "a".repeat(20_000)), item(1, "b".into())];
    assert_eq!(shard(&big, &limits).len(), 2);
}

#[test]
fn a_batch_body_of_many_small_values_is_refused_before_it_is_parsed() {
    let app = App::new(config(&[]));
    let code = |body: String| {
        let r = serve(&app, post("/v1/batches", &body));
        (
            r.status,
            r.json_body()["error"]["code"].as_str().map(str::to_owned),
        )
    };
    // 500,000 numbers (1 MB of text) would be a ~16 MB tree; refused by counting alone.
    let zeros = vec!["0"; 500_000].join(",");
    assert_eq!(
        code(format!(r#"{{"task":"classify","items":[{zeros}]}}"#)),
        (413, Some("too_many_items".into()))
    );
    assert_eq!(
        code(format!(
            r#"{{"task":"classify","items":[{{"custom_id":"a","input":"x"}}],"x":[{zeros}]}}"#
        )),
        (413, Some("too_many_items".into()))
    );
    // The largest batch allowed is not refused by the count: it goes on to be queued (here
    // against no Pub/Sub: 503), and one item more is refused by the item count.
    let full = |n: usize| {
        let items: Vec<Value> = (0..n)
            .map(|i| json!({"custom_id": format!("c{i}"), "input": "안녕"}))
            .collect();
        json!({"task": "classify", "items": items}).to_string()
    };
    assert_eq!(code(full(10_000)).0, 503);
    assert_eq!(code(full(10_001)), (413, Some("too_many_items".into())));
    // Text that is not JSON, within the count, is said to be so.
    assert_eq!(
        code(r#"{"task":"classify","items":[0,0"#.into()),
        (400, Some("invalid_json".into()))
    );
}
