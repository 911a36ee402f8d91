//! End to end: the built Worker in real `wrangler dev`, against the real emulators.
//!
//! One stack for the whole file (starting it takes tens of seconds); the steps run in order
//! and the Pub/Sub outage comes last.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use edge_core::auth::entry;
use serde_json::{Value, json};
use stack::emulators::Emulators;
use stack::gcp::{Firestore, PubSub, Received, Topology};
use stack::google::{FakeGoogle, TEST_CLIENT_EMAIL};
use stack::wrangler::{EdgeConfig, Wrangler};

const KEY_A: &str = "cs_e2e_key_alice";
const KEY_B: &str = "cs_e2e_key_bob";

struct Client {
    http: reqwest::Client,
    url: String,
}

impl Client {
    async fn send(
        &self,
        method: &str,
        path: &str,
        key: &str,
        body: Option<Value>,
        idem: Option<&str>,
    ) -> (u16, Value, reqwest::header::HeaderMap) {
        let m = reqwest::Method::from_bytes(method.as_bytes()).expect("method");
        let mut r = self
            .http
            .request(m, format!("{}{path}", self.url))
            .bearer_auth(key);
        if let Some(b) = body {
            r = r.json(&b);
        }
        if let Some(k) = idem {
            r = r.header("idempotency-key", k);
        }
        let resp = r.send().await.expect("wrangler answers");
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let body = resp.json().await.unwrap_or(Value::Null);
        (status, body, headers)
    }

    /// `POST /v1/chat` with `message`, no idempotency key.
    async fn chat(&self, key: &str, message: &str) -> (u16, Value, reqwest::header::HeaderMap) {
        let body = json!({ "message": message });
        self.send("POST", "/v1/chat", key, Some(body), None).await
    }
}

/// The Worker's JSON log line for `request_id`, from wrangler's output.
async fn log_line(wr: &Wrangler, request_id: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let text = std::fs::read_to_string(wr.group.log_path()).unwrap_or_default();
        if let Some(line) = text
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l.trim()).ok())
            .find(|v| v["request_id"] == request_id)
        {
            return line;
        }
        assert!(
            Instant::now() < deadline,
            "no log line for request {request_id}; wrangler log:\n{}",
            wr.group.log_tail(20)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Up to `n` messages of `subscription`, acked (20 s at most).
async fn pull_n(ps: &PubSub, t: &Topology, subscription: &str, n: usize) -> Vec<Received> {
    let mut got = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while got.len() < n && Instant::now() < deadline {
        let batch = ps.pull(&t.project, subscription, 100).await.expect("pull");
        if !batch.is_empty() {
            let ids: Vec<String> = batch.iter().map(|m| m.ack_id.clone()).collect();
            ps.ack(&t.project, subscription, &ids).await.expect("ack");
        }
        got.extend(batch);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    got
}

fn message(r: &Received) -> Value {
    serde_json::from_slice(&r.data).expect("JSON message data")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_worker_in_wrangler_dev_serves_the_contract_against_the_emulators() {
    let dir =
        std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join(stack::unique_name("edge-e2e"));
    let mut emu = Emulators::start(&dir.join("logs"))
        .await
        .expect("emulators start");
    let t = Topology::unique("edge-e2e");
    let ps = PubSub::new(&emu.pubsub_host);
    ps.create_topology(&t, 60, 5).await.expect("topology");
    let keys = format!(
        "{},{}",
        entry("alice", KEY_A, b"e2e-salt-a"),
        entry("bob", KEY_B, b"e2e-salt-b")
    );
    let cfg = EdgeConfig {
        project: t.project.clone(),
        topic: t.topic.clone(),
        chat_topic: t.chat_topic.clone(),
        pubsub_host: emu.pubsub_host.clone(),
        firestore_host: emu.firestore_host.clone(),
        api_keys: keys,
        vars: vec![("UPSTREAM_DEADLINE_MS".into(), "2000".into())],
        rate_limit: Some(10_000),
    };
    let wr = Wrangler::start(&dir.join("wrangler"), &cfg, 0)
        .await
        .expect("wrangler dev starts");
    let c = Client {
        http: reqwest::Client::new(),
        url: wr.url.clone(),
    };
    let fs = Firestore::new(&emu.firestore_host, &t.project);

    // Health, no key.
    let r = c
        .http
        .get(format!("{}/healthz", c.url))
        .send()
        .await
        .expect("healthz");
    assert_eq!(r.status().as_u16(), 200);
    assert!(r.headers().get("x-request-id").is_some());
    let h: Value = r.json().await.expect("json");
    assert_eq!(h["model"]["sha256"].as_str().map(str::len), Some(64), "{h}");

    // The benchmark's `/hello` is not there unless the benchmark asks for it.
    let r = c
        .http
        .get(format!("{}/hello", c.url))
        .send()
        .await
        .expect("hello");
    assert_eq!(r.status().as_u16(), 404);
    assert!(r.headers().get("x-request-id").is_some());
    let b: Value = r.json().await.expect("a JSON error");
    assert_eq!(b["error"]["code"], "not_found", "{b}");

    // A body past the largest limit is refused before it is read whole (the Worker reads no
    // further than the limit): 413 in the error shape, and the Worker goes on answering.
    for path in ["/v1/batches", "/v1/chat"] {
        let r = c
            .http
            .post(format!("{}{path}", c.url))
            .bearer_auth(KEY_A)
            .header("content-type", "application/json")
            .body(vec![b' '; 9 << 20])
            .send()
            .await
            .expect("a large body is answered");
        assert_eq!(r.status().as_u16(), 413, "{path}");
        let b: Value = r.json().await.expect("a JSON error");
        assert_eq!(b["error"]["code"], "payload_too_large", "{b}");
    }

    // A greeting is answered at the edge.
    let (s, b, h) = c.chat(KEY_A, "안녕하세요!").await;
    assert_eq!(
        (s, b["route"].as_str(), b["intent"].as_str()),
        (200, Some("edge"), Some("greeting")),
        "{b}"
    );
    assert!(h.get("x-request-id").is_some());

    // A food request is queued: 202, Location, and a message with the job id (masked text).
    let food = json!({"message": "안녕! 근처 짜장면집 추천해줘. 내 번호는 010-1234-5678"});
    let (s, b, h) = c
        .send(
            "POST",
            "/v1/chat",
            KEY_A,
            Some(food.clone()),
            Some("idem-1"),
        )
        .await;
    assert_eq!((s, b["route"].as_str()), (202, Some("queue")), "{b}");
    let job = b["job_id"].as_str().expect("job id").to_owned();
    assert_eq!(
        h.get("location").and_then(|v| v.to_str().ok()),
        Some(format!("/v1/jobs/{job}").as_str())
    );
    let chats = t.chat_subscription.clone().expect("a chat subscription");
    let msgs = pull_n(&ps, &t, &chats, 1).await;
    assert_eq!(msgs.len(), 1);
    let jobs_topic = ps
        .pull(&t.project, &t.subscription, 10)
        .await
        .expect("pull");
    assert!(
        jobs_topic.is_empty(),
        "a chat message goes to the chat topic alone: {} on the jobs topic",
        jobs_topic.len()
    );
    let m = message(&msgs[0]);
    assert_eq!(m["job_id"], job.as_str());
    assert_eq!(msgs[0].attributes["job_id"], job.as_str());
    let text = m["chat"]["message"].as_str().unwrap_or("");
    assert!(text.contains("[phone]") && !text.contains("5678"), "{text}");

    // Its structured log line reaches wrangler's output (written after the response went
    // out), with route and intent but none of the message's text.
    let request_id = h
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .expect("x-request-id")
        .to_owned();
    let line = log_line(&wr, &request_id).await;
    assert_eq!(
        (line["route"].as_str(), line["status"].as_u64()),
        (Some("queue"), Some(202)),
        "{line}"
    );
    assert!(
        line["latency_ms"].is_u64() && line["confidence"].is_f64(),
        "{line}"
    );
    let raw = line.to_string();
    assert!(!raw.contains("짜장면") && !raw.contains("5678"), "{raw}");

    // Idempotent replay: the same answer, nothing new enqueued.
    let (s, b2, h) = c
        .send(
            "POST",
            "/v1/chat",
            KEY_A,
            Some(food.clone()),
            Some("idem-1"),
        )
        .await;
    assert_eq!(
        (s, b2["job_id"].as_str()),
        (202, Some(job.as_str())),
        "{b2}"
    );
    assert_eq!(
        h.get("idempotent-replayed").and_then(|v| v.to_str().ok()),
        Some("true")
    );
    // The same key with another body is refused, and enqueues nothing.
    let (s, v, _) = c
        .send(
            "POST",
            "/v1/chat",
            KEY_A,
            Some(json!({"message": "순대국밥집 추천해줘"})),
            Some("idem-1"),
        )
        .await;
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (422, Some("idempotency_key_reused")),
        "{v}"
    );
    // The same key from another API key is a different request.
    let (s, b3, _) = c
        .send("POST", "/v1/chat", KEY_B, Some(food), Some("idem-1"))
        .await;
    assert_eq!(s, 202);
    assert_ne!(b3["job_id"], b["job_id"]);
    let msgs = pull_n(&ps, &t, &chats, 2).await;
    assert_eq!(msgs.len(), 1, "a replay must not publish");
    assert_eq!(message(&msgs[0])["job_id"], b3["job_id"]);

    // GET returns the job to its owner, 404 to anyone else; wait=N long-polls.
    let (s, v, _) = c
        .send("GET", &format!("/v1/jobs/{job}"), KEY_A, None, None)
        .await;
    assert_eq!(
        (s, v["status"].as_str(), v["kind"].as_str()),
        (200, Some("queued"), Some("chat")),
        "{v}"
    );
    assert_eq!(v["counts"], json!({"total": 1, "done": 0, "failed": 0}));
    assert!(v.get("owner").is_none());
    let (s, v, _) = c
        .send("GET", &format!("/v1/jobs/{job}"), KEY_B, None, None)
        .await;
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (404, Some("job_not_found"))
    );
    let started = Instant::now();
    let (s, _, _) = c
        .send("GET", &format!("/v1/jobs/{job}?wait=2"), KEY_A, None, None)
        .await;
    assert_eq!(s, 200);
    assert!(
        started.elapsed() >= Duration::from_millis(1500),
        "{:?}",
        started.elapsed()
    );

    // A batch of 2,500 items becomes 3 shard messages (1,000 items each at most).
    let items: Vec<Value> = (0..2500)
        .map(|i| json!({"custom_id": format!("i{i}"), "input": format!("메시지 {i} a@b.com")}))
        .collect();
    let (s, b, _) = c
        .send(
            "POST",
            "/v1/batches",
            KEY_A,
            Some(json!({"task": "classify", "items": items})),
            None,
        )
        .await;
    assert_eq!((s, b["counts"]["total"].as_u64()), (202, Some(2500)), "{b}");
    let batch = b["job_id"].as_str().expect("batch id").to_owned();
    let msgs = pull_n(&ps, &t, &t.subscription, 3).await;
    assert_eq!(msgs.len(), 3);
    let chat_topic = ps.pull(&t.project, &chats, 10).await.expect("pull");
    assert!(
        chat_topic.is_empty(),
        "batch shards go to the jobs topic: {} on the chat topic",
        chat_topic.len()
    );
    let mut ids = HashSet::new();
    for m in &msgs {
        let v = message(m);
        assert_eq!(
            (v["job_id"].as_str(), v["shards"].as_u64()),
            (Some(batch.as_str()), Some(3))
        );
        for it in v["items"].as_array().expect("items") {
            assert!(
                it["input"].as_str().is_some_and(|s| s.ends_with("[email]")),
                "{it}"
            );
            ids.insert(it["custom_id"].as_str().unwrap_or_default().to_owned());
        }
    }
    assert_eq!(ids.len(), 2500);

    // DELETE asks for cancellation.
    let (s, v, _) = c
        .send("DELETE", &format!("/v1/jobs/{batch}"), KEY_A, None, None)
        .await;
    assert_eq!(
        (s, v["cancel_requested"].as_bool()),
        (202, Some(true)),
        "{v}"
    );
    let (s, _, _) = c
        .send("DELETE", &format!("/v1/jobs/{batch}"), KEY_B, None, None)
        .await;
    assert_eq!(s, 404);

    // Production credentials, no Pub/Sub emulator: the Worker signs a JWT with WebCrypto
    // (RS256), exchanges it at the service account's `token_uri`, publishes with the access
    // token and keeps it for the next message. `FakeGoogle` plays Google's token endpoint
    // and Pub/Sub, and checks the signature with the key's public half.
    let project = format!("{}-sa", t.project);
    let google = FakeGoogle::start(&project, "t").await.expect("fake google");
    let prod = EdgeConfig {
        project,
        topic: "t".into(),
        chat_topic: "t".into(),
        pubsub_host: String::new(),
        firestore_host: emu.firestore_host.clone(),
        api_keys: cfg.api_keys.clone(),
        vars: vec![
            ("PUBSUB_ENDPOINT".into(), google.base.clone()),
            (
                "GCP_SERVICE_ACCOUNT_KEY".into(),
                google.service_account().to_string(),
            ),
            // Written as a TOML integer, as users write it: the Worker must read it.
            ("RATE_LIMIT_PER_MINUTE".into(), "3".into()),
        ],
        rate_limit: None,
    };
    let wr_sa = Wrangler::start(&dir.join("wrangler-sa"), &prod, 0)
        .await
        .expect("wrangler dev starts");
    let c_sa = Client {
        http: c.http.clone(),
        url: wr_sa.url.clone(),
    };
    for _ in 0..2 {
        let (s, v, _) = c_sa.chat(KEY_A, "떡볶이 맛집 알려줘").await;
        assert_eq!((s, v["route"].as_str()), (202, Some("queue")), "{v}");
    }
    // The fallback limit of 3 a minute (no binding here) from the numeric var.
    let (s, _, _) = c_sa.chat(KEY_A, "안녕").await;
    assert_eq!(s, 200);
    let (s, v, _) = c_sa.chat(KEY_A, "안녕").await;
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (429, Some("rate_limited")),
        "{v}"
    );
    let seen = google.seen();
    assert_eq!((seen.tokens_issued, seen.refused), (1, 0), "{seen:?}");
    assert_eq!(seen.publish_auth, ["Bearer tok-1"; 2]);
    assert_eq!(seen.claims[0]["iss"], TEST_CLIENT_EMAIL);
    assert_eq!(
        seen.claims[0]["aud"],
        format!("{}/token", google.base).as_str()
    );
    drop(wr_sa);

    // Pub/Sub outage: 503, and no job record is left `queued` without a message.
    emu.pubsub.stop(Duration::from_secs(2));
    let (s, v, _) = c.chat(KEY_A, "떡볶이 맛집 알려줘").await;
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (503, Some("queue_unavailable")),
        "{v}"
    );
    let (s, v, _) = c
        .send(
            "POST",
            "/v1/batches",
            KEY_A,
            Some(json!({"task": "classify", "items": [{"custom_id": "x", "input": "y"}]})),
            None,
        )
        .await;
    assert_eq!(s, 503, "{v}");
    let accepted: HashSet<String> = [
        job,
        b3["job_id"].as_str().unwrap_or_default().to_owned(),
        batch,
    ]
    .into();
    let docs = fs.list("jobs").await.expect("list jobs");
    for d in &docs {
        let f = &d["fields"];
        let id = f["job_id"]["stringValue"].as_str().unwrap_or_default();
        if f["status"]["stringValue"] == "queued" {
            assert!(accepted.contains(id), "orphaned queued job {id}");
        }
    }
    assert_eq!(docs.len(), 3, "records: {docs:?}");
    drop(wr);
}

/// The Workers Free plan's limit on a Worker's compressed size.
const FREE_PLAN_GZIP_KIB: f64 = 3072.0;

/// `wrangler deploy --dry-run` on the production `wrangler.toml` (its `[build]` step left out:
/// the Worker is already built, and a nested cargo would wait on this one's lock): wrangler
/// accepts the file without a warning about it, lists its bindings, and the bundle it would
/// upload fits the Free plan.
#[test]
fn wrangler_accepts_the_production_config_and_the_bundle_fits_the_free_plan() {
    let root = stack::root();
    assert!(
        stack::wrangler::worker_main().is_file(),
        "run `cargo xtask build-edge` first"
    );
    let text = std::fs::read_to_string(root.join("wrangler.toml")).expect("wrangler.toml");
    let build = "[build]\ncommand = \"cargo xtask build-edge\"\n";
    assert!(text.contains(build), "wrangler.toml's [build] changed");
    let abs = format!("\"{}/edge/", root.display());
    let config = text.replace(build, "").replace("\"edge/", &abs);
    assert_eq!(
        config.matches(&abs).count(),
        2,
        "main and [assets] directory"
    );
    let dir = root.join("target/wrangler-dry-run");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("scratch dir");
    std::fs::write(dir.join("wrangler.toml"), config).expect("write config");
    let out = std::process::Command::new(stack::wrangler::node())
        .arg(stack::wrangler::cli())
        .args(["deploy", "--dry-run", "--outdir"])
        .arg(dir.join("out"))
        .arg("--config")
        .arg(dir.join("wrangler.toml"))
        .current_dir(&dir)
        .env("WRANGLER_SEND_METRICS", "false")
        .env("CLOUDFLARE_CF_FETCH_ENABLED", "false")
        .env("WRANGLER_LOG_PATH", dir.join("logs"))
        .env("NO_COLOR", "1")
        .env("FORCE_COLOR", "0")
        .output()
        .expect("run wrangler (installed by `cargo xtask setup`)");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "wrangler deploy --dry-run failed:\n{text}"
    );
    // Its warnings about the file name unknown or misplaced fields ("Unexpected fields found
    // in …") under this heading; others (a newer wrangler published) are not the file's.
    assert!(
        !text.contains("Processing wrangler.toml configuration"),
        "wrangler warns about wrangler.toml:\n{text}"
    );
    for binding in [
        "env.RATE_LIMITER",
        "env.PUBSUB_TOPIC",
        "env.PUBSUB_CHAT_TOPIC",
    ] {
        assert!(
            text.contains(binding),
            "no {binding} among the bindings:\n{text}"
        );
    }
    // "Total Upload: 7010.89 KiB / gzip: 2429.38 KiB"
    let sizes = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("Total Upload: "))
        .and_then(|s| s.split_once(" KiB / gzip: "))
        .and_then(|(up, gz)| {
            let gz = gz.strip_suffix(" KiB")?;
            Some((up.parse::<f64>().ok()?, gz.parse::<f64>().ok()?))
        });
    let Some((upload, gzip)) = sizes else {
        panic!("no `Total Upload: … KiB / gzip: … KiB` line:\n{text}");
    };
    eprintln!("Worker bundle: {upload:.0} KiB, {gzip:.0} KiB gzip");
    assert!(
        gzip <= FREE_PLAN_GZIP_KIB,
        "the Worker is {gzip:.0} KiB gzip, over the Free plan's {FREE_PLAN_GZIP_KIB:.0} KiB"
    );
}
