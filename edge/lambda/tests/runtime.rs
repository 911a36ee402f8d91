//! The `edge-lambda` binary as Lambda runs it: a process whose runtime client long-polls
//! Lambda's Runtime API for invocations (API Gateway HTTP API / Function URL events, payload
//! 2.0) and posts the answers back. The Runtime API is a local stand-in
//! ([`stack::lambda::RuntimeApi`]: Lambda cannot run here); Pub/Sub and Firestore are the real
//! emulators.

use std::process::Command;
use std::time::Duration;

use edge_core::api::{PENDING_ABANDONED_MS, idempotency_doc_id};
use edge_core::auth::entry;
use edge_core::gcp::{Gcp, GcpConfig};
use edge_lambda::Native;
use serde_json::{Value, json};
use shared::jobs::{IDEMPOTENCY_COLLECTION, IDEMPOTENCY_TTL_MS, IdempotencyRecord};
use shared::time::rfc3339;
use stack::emulators::Emulators;
use stack::gcp::{Firestore, PubSub, Topology};
use stack::lambda::{RuntimeApi, http_event};
use stack::process::Group;

const KEY: &str = "cs_lambda_key_alice";
const ANSWER_WITHIN: Duration = Duration::from_secs(20);

/// One invocation's answer: status, JSON body (`Null` when not JSON), headers.
struct Answer {
    status: u64,
    body: Value,
    text: String,
    headers: Value,
}

impl Answer {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .as_object()?
            .iter()
            .find_map(|(k, v)| k.eq_ignore_ascii_case(name).then_some(v.as_str()).flatten())
    }
}

/// The function process and the Runtime API it polls.
struct Function {
    api: RuntimeApi,
    group: Group,
}

impl Function {
    /// Invokes the function with an HTTP event (payload 2.0) and returns its answer.
    async fn call(
        &self,
        method: &str,
        path: &str,
        key: Option<&str>,
        body: Option<&str>,
        base64: bool,
    ) -> Answer {
        self.call_with(method, path, key, body, base64, &[]).await
    }

    /// The same with more request headers.
    async fn call_with(
        &self,
        method: &str,
        path: &str,
        key: Option<&str>,
        body: Option<&str>,
        base64: bool,
        more: &[(&str, &str)],
    ) -> Answer {
        let mut headers = json!({"content-type": "application/json", "user-agent": "test"});
        if let Some(key) = key {
            headers["authorization"] = json!(format!("Bearer {key}"));
        }
        for (k, v) in more {
            headers[*k] = json!(v);
        }
        let ev = http_event(method, path, "", headers, body, base64);
        let doc = match self.api.invoke(ev, ANSWER_WITHIN).await {
            Ok(doc) => doc,
            Err(e) => panic!("{e:#}\nedge-lambda log:\n{}", self.group.log_tail(30)),
        };
        let text = doc["body"].as_str().unwrap_or("").to_owned();
        assert_eq!(doc["isBase64Encoded"], false, "{doc}");
        Answer {
            status: doc["statusCode"].as_u64().unwrap_or(0),
            body: serde_json::from_str(&text).unwrap_or(Value::Null),
            text,
            headers: doc["headers"].clone(),
        }
    }

    /// `POST /v1/chat` with `message` and the key.
    async fn chat(&self, message: &str, base64: bool) -> Answer {
        let body = json!({ "message": message }).to_string();
        self.call("POST", "/v1/chat", Some(KEY), Some(&body), base64)
            .await
    }

    /// `POST /v1/chat` with `message`, the key and an `Idempotency-Key`.
    async fn chat_once(&self, message: &str, idempotency_key: &str) -> Answer {
        let body = json!({ "message": message }).to_string();
        let more = [("idempotency-key", idempotency_key)];
        self.call_with("POST", "/v1/chat", Some(KEY), Some(&body), false, &more)
            .await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_serves_invocations_against_the_emulators() {
    let dir =
        std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join(stack::unique_name("lambda-rt"));
    let mut emu = Emulators::start(&dir.join("logs"))
        .await
        .expect("emulators start");
    let t = Topology::unique("lambda-rt");
    let ps = PubSub::new(&emu.pubsub_host);
    ps.create_topology(&t, 60, 5).await.expect("topology");
    let api = RuntimeApi::start().await.expect("runtime API stand-in");

    let mut cmd = Command::new(env!("CARGO_BIN_EXE_edge-lambda"));
    cmd.env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .envs(api.env())
        .envs(emu.env())
        .env("GCP_PROJECT", &t.project)
        .env("PUBSUB_TOPIC", &t.topic)
        .env("PUBSUB_CHAT_TOPIC", &t.chat_topic)
        .env("API_KEYS", entry("alice", KEY, b"lambda-rt-salt"))
        .env("UPSTREAM_DEADLINE_MS", "5000");
    let started = std::time::Instant::now();
    let group = Group::spawn("edge-lambda", cmd, &dir.join("logs/edge-lambda.log"))
        .expect("edge-lambda starts");
    let mut f = Function { api, group };

    // Health, no key.
    let a = f.call("GET", "/healthz", None, None, false).await;
    let cold = started.elapsed();
    assert_eq!(a.status, 200, "{}", a.text);
    assert_eq!(
        a.body["model"]["sha256"].as_str().map(str::len),
        Some(64),
        "{}",
        a.text
    );
    assert!(a.header("x-request-id").is_some(), "{}", a.headers);

    // A greeting is answered in the function; so is thanks sent base64-encoded.
    let a = f.chat("안녕하세요!", false).await;
    let got = (
        a.status,
        a.body["route"].as_str(),
        a.body["intent"].as_str(),
    );
    assert_eq!(got, (200, Some("edge"), Some("greeting")), "{}", a.text);
    assert!(
        a.body["reply"].as_str().is_some_and(|r| !r.is_empty()),
        "{}",
        a.text
    );
    let a = f.chat("고마워", true).await;
    let got = (a.status, a.body["intent"].as_str());
    assert_eq!(got, (200, Some("thanks")), "{}", a.text);

    // A food request is queued: a job record in Firestore and a message on Pub/Sub.
    let a = f.chat("근처 짜장면집 추천해줘", false).await;
    let got = (a.status, a.body["route"].as_str());
    assert_eq!(got, (202, Some("queue")), "{}", a.text);
    let job_id = a.body["job_id"].as_str().expect("job_id").to_owned();
    assert_eq!(
        a.header("location"),
        Some(format!("/v1/jobs/{job_id}").as_str())
    );
    let chats = t.chat_subscription.clone().expect("a chat subscription");
    let mut published = Vec::new();
    for _ in 0..50 {
        published = ps.pull(&t.project, &chats, 10).await.expect("pull");
        if !published.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(published.len(), 1, "one message for the queued chat");
    let msg: Value = serde_json::from_slice(&published[0].data).expect("JSON message");
    assert_eq!(msg["job_id"], job_id.as_str(), "{msg}");
    let a = f
        .call("GET", &format!("/v1/jobs/{job_id}"), Some(KEY), None, false)
        .await;
    let got = (a.status, a.body["status"].as_str(), a.body["kind"].as_str());
    assert_eq!(got, (200, Some("queued"), Some("chat")), "{}", a.text);

    // An Idempotency-Key whose first request died before it finished (a record still
    // pending after the abandon time) is taken over; one still fresh answers 409.
    let fs = Firestore::new(&emu.firestore_host, &t.project);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .expect("clock after 1970");
    for (key, age_ms) in [("k-abandoned", PENDING_ABANDONED_MS + 5_000), ("k-busy", 0)] {
        let rec = IdempotencyRecord {
            owner: "alice".into(),
            state: "pending".into(),
            status: 0,
            body: String::new(),
            // As records written before bodies were fingerprinted: any body may take it.
            request_sha256: String::new(),
            created_at: rfc3339(now - age_ms),
            expire_at: rfc3339(now + IDEMPOTENCY_TTL_MS),
        };
        let doc = shared::firestore::to_document(&rec, &["expire_at"]).expect("document");
        let id = idempotency_doc_id("alice", "chat", key);
        fs.create(IDEMPOTENCY_COLLECTION, &id, doc["fields"].clone())
            .await
            .expect("pending record");
    }
    let a = f.chat_once("떡볶이집 추천해줘", "k-abandoned").await;
    assert_eq!(a.status, 202, "{}", a.text);
    let taken_over = a.body["job_id"].as_str().expect("job_id").to_owned();
    let a = f.chat_once("떡볶이집 추천해줘", "k-abandoned").await;
    assert_eq!(a.status, 202, "{}", a.text);
    assert_eq!(
        a.body["job_id"],
        taken_over.as_str(),
        "the replay gives the same job"
    );
    assert_eq!(
        a.header("idempotent-replayed"),
        Some("true"),
        "{}",
        a.headers
    );
    // The same key with another body is another request, refused rather than answered with
    // the first one's job.
    let a = f.chat_once("순대국밥집 추천해줘", "k-abandoned").await;
    let got = (a.status, a.body["error"]["code"].as_str());
    assert_eq!(got, (422, Some("idempotency_key_reused")), "{}", a.text);
    let a = f.chat_once("떡볶이집 추천해줘", "k-busy").await;
    let got = (a.status, a.body["error"]["code"].as_str());
    assert_eq!(got, (409, Some("idempotency_key_in_use")), "{}", a.text);

    // The takeover is a write conditioned on the record as read: of two writers that read
    // the same record, the second finds it changed.
    let gcp = Gcp::new(
        GcpConfig {
            project: t.project.clone(),
            topic: t.topic.clone(),
            chat_topic: t.chat_topic.clone(),
            database: "(default)".into(),
            pubsub_base: format!("http://{}", emu.pubsub_host),
            firestore_base: format!("http://{}", emu.firestore_host),
            pubsub_emulated: true,
            firestore_emulated: true,
            deadline_ms: 5_000,
        },
        None,
    );
    let native = Native::new();
    let busy = idempotency_doc_id("alice", "chat", "k-busy");
    let read = gcp
        .get(&native, IDEMPOTENCY_COLLECTION, &busy)
        .await
        .expect("get")
        .expect("the record");
    let seen = read["updateTime"].as_str().expect("updateTime");
    for (writer, wins) in [("first", true), ("second", false)] {
        // Each writer's own record (an unchanged document would keep its `updateTime`).
        let mut doc = json!({"fields": read["fields"].clone()});
        doc["fields"]["created_at"] = json!({"stringValue": rfc3339(now + 1 + u64::from(wins))});
        let won = gcp
            .replace_if(&native, IDEMPOTENCY_COLLECTION, &busy, doc.clone(), seen)
            .await
            .expect("replace_if answers");
        assert_eq!(won, wins, "the {writer} writer");
    }

    // Errors keep the contract's shape; the demo page is served at `/`.
    let a = f
        .call("POST", "/v1/chat", None, Some(r#"{"message":"hi"}"#), false)
        .await;
    let got = (a.status, a.body["error"]["code"].as_str());
    assert_eq!(got, (401, Some("missing_api_key")), "{}", a.text);
    let a = f.call("GET", "/", None, None, false).await;
    assert_eq!(a.status, 200);
    let html = a
        .header("content-type")
        .is_some_and(|c| c.starts_with("text/html"));
    assert!(html, "{}", a.headers);
    assert!(a.text.contains("/v1/chat"), "the demo page calls the API");

    // All of it in one process (one cold start), which reported no init error.
    let exited = f.group.try_wait();
    assert!(
        exited.is_none(),
        "edge-lambda exited:\n{}",
        f.group.log_tail(30)
    );
    assert_eq!(f.api.init_errors(), Vec::<Value>::new());
    // For sizing the function (not asserted: this machine is not Lambda's).
    eprintln!(
        "edge-lambda: spawn to first answer {:.0} ms; resident {:.1} MiB after {} invocations",
        cold.as_secs_f64() * 1e3,
        f.group.rss_bytes() as f64 / (1 << 20) as f64,
        f.api.invocations()
    );
    f.group.stop(Duration::from_secs(2));
    emu.stop();
}

#[test]
fn outside_lambda_it_exits_2_with_one_line_instead_of_a_panic() {
    let out = Command::new(env!("CARGO_BIN_EXE_edge-lambda"))
        .env_clear()
        .env("RUST_BACKTRACE", "1")
        .output()
        .expect("edge-lambda runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.starts_with("edge-lambda: AWS_LAMBDA_RUNTIME_API is not set"),
        "{stderr}"
    );
}
