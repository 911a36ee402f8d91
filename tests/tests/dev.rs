//! `cargo xtask dev` brings the stack up and, on Ctrl-C (SIGINT) or SIGTERM, leaves no process
//! it started.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn xtask() -> Option<std::path::PathBuf> {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/release/xtask");
    p.is_file().then_some(p)
}

fn alive(pgid: i32) -> bool {
    // SAFETY: signal 0 only checks for existence.
    unsafe { libc::kill(-pgid, 0) == 0 }
}

/// Stops `xtask dev` with SIGTERM if the test fails before it does so itself.
struct Running(std::process::Child);

impl Drop for Running {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            // SAFETY: signalling the child we spawned.
            unsafe { libc::kill(self.0.id() as i32, libc::SIGTERM) };
            let _ = self.0.wait();
        }
    }
}

/// One stack at a time: two pairs of JVMs starting together crowd a 2-core machine.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn dev_stops_cleanly_on(signal: i32) {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let Some(bin) = xtask() else {
        panic!("target/release/xtask is missing: run the tests through `cargo xtask test`");
    };
    // Its own folder, so that a developer's `cargo xtask dev` in this checkout is untouched.
    let dev_dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("dev-{signal}"));
    let child = Command::new(&bin)
        .args(["dev", "--port", "0"])
        .env("DEV_DIR", &dev_dir)
        .env("DEV_API_KEY", "test-key-123")
        .env("METRICS_ADDR", "127.0.0.1:0")
        // The worker binary `cargo test` built for this workspace, so `xtask dev` builds nothing.
        .env("BATCH_WORKER_BIN", stack::release_worker())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("xtask dev starts");
    let mut child = Running(child);
    let stdout = child.0.stdout.take().expect("stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut groups = Vec::new();
    let mut key = None;
    let mut url = None;
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        let line = rx
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .expect("xtask dev prints `ready`");
        if let Some(rest) = line.split(" pid=").nth(1) {
            groups.push(
                rest.split_whitespace()
                    .next()
                    .and_then(|p| p.parse::<i32>().ok())
                    .expect("pid"),
            );
        }
        if let Some(u) = line.strip_prefix("URL=") {
            url = Some(u.to_owned());
        }
        if let Some(k) = line.strip_prefix("DEV_API_KEY=") {
            key = Some(k.to_owned());
        }
        if line.starts_with("ready") {
            break;
        }
    }
    assert_eq!(
        key.as_deref(),
        Some("test-key-123"),
        "the development API key comes from DEV_API_KEY"
    );
    assert_eq!(
        groups.len(),
        4,
        "both emulators, the worker and wrangler report their process group"
    );
    assert!(groups.iter().all(|&g| alive(g)));
    // The Worker answers with the development key.
    let url = url.expect("xtask dev prints URL=");
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let (status, body) = rt.block_on(async {
        let r = reqwest::Client::new()
            .post(format!("{url}/v1/chat"))
            .bearer_auth("test-key-123")
            .json(&serde_json::json!({"message": "hello"}))
            .send()
            .await
            .expect("wrangler dev answers");
        (r.status().as_u16(), r.text().await.unwrap_or_default())
    });
    assert_eq!(status, 200, "{body}");
    // A food request is queued; the worker's text-generation model writes the reply.
    let chat = rt.block_on(async {
        let http = reqwest::Client::new();
        let r = http
            .post(format!("{url}/v1/chat"))
            .bearer_auth("test-key-123")
            .json(&serde_json::json!({"message": "근처에서 급식카드 되는 짜장면집 추천해줘"}))
            .send()
            .await
            .expect("chat accepted");
        assert_eq!(r.status().as_u16(), 202);
        let v: serde_json::Value = r.json().await.expect("json");
        assert_eq!(v["route"], "queue", "{v}");
        let status_url = v["status_url"].as_str().expect("status_url").to_owned();
        wait_finished(&http, &url, &status_url).await
    });
    assert_eq!(chat["status"], "succeeded", "{chat}");
    assert_eq!(chat["kind"], "chat", "{chat}");
    assert!(chat["result"]["reply"].is_string(), "{chat}");
    // A batch goes through the Worker, Pub/Sub and the worker, and ends succeeded.
    let job = rt.block_on(async {
        let http = reqwest::Client::new();
        let r = http
            .post(format!("{url}/v1/batches"))
            .bearer_auth("test-key-123")
            .json(&serde_json::json!({"task": "classify", "items": [
                {"custom_id": "a", "input": "안녕하세요"},
                {"custom_id": "b", "input": "근처 짜장면집 추천해줘"},
            ]}))
            .send()
            .await
            .expect("batch accepted");
        assert_eq!(r.status().as_u16(), 202);
        let v: serde_json::Value = r.json().await.expect("json");
        let status_url = v["status_url"].as_str().expect("status_url").to_owned();
        wait_finished(&http, &url, &status_url).await
    });
    assert_eq!(job["status"], "succeeded", "{job}");
    assert_eq!(job["counts"]["done"], 2, "{job}");
    let dir = job["output_uri"]
        .as_str()
        .and_then(|u| u.strip_prefix("file://"))
        .expect("file:// output_uri")
        .to_owned();
    let lines: usize = std::fs::read_dir(&dir)
        .expect("output dir")
        .flatten()
        .map(|e| {
            std::fs::read_to_string(e.path())
                .unwrap_or_default()
                .lines()
                .count()
        })
        .sum();
    assert_eq!(lines, 2, "one output line per item in {dir}");

    // An `input_uri` job (once: the SIGTERM run): against the emulators the edge takes a
    // file:// input, which the worker reads, malformed line included.
    if signal == libc::SIGTERM {
        let input = Path::new(env!("CARGO_TARGET_TMPDIR"))
            .join(format!("dev-input-{}.jsonl", std::process::id()));
        let text = "{\"custom_id\":\"a\",\"input\":\"고마워\"}\nnot json\n\
                    {\"custom_id\":\"c\",\"input\":\"떡볶이 맛집 알려줘\"}\n";
        std::fs::write(&input, text).expect("write input");
        let job = rt.block_on(async {
            let http = reqwest::Client::new();
            let r = http
                .post(format!("{url}/v1/batches"))
                .bearer_auth("test-key-123")
                .json(&serde_json::json!({
                    "task": "classify",
                    "input_uri": format!("file://{}", input.display()),
                }))
                .send()
                .await
                .expect("batch accepted");
            let status = r.status().as_u16();
            let v: serde_json::Value = r.json().await.expect("json");
            assert_eq!(status, 202, "{v}");
            let status_url = v["status_url"].as_str().expect("status_url").to_owned();
            wait_finished(&http, &url, &status_url).await
        });
        assert_eq!(job["status"], "succeeded", "{job}");
        assert_eq!(
            (&job["counts"]["total"], &job["counts"]["failed"]),
            (&serde_json::json!(3), &serde_json::json!(1)),
            "{job}"
        );
        let dir = job["output_uri"]
            .as_str()
            .and_then(|u| u.strip_prefix("file://"))
            .expect("file:// output_uri")
            .to_owned();
        let mut ids: Vec<String> = std::fs::read_dir(&dir)
            .expect("output dir")
            .flatten()
            .flat_map(|e| {
                std::fs::read_to_string(e.path())
                    .unwrap_or_default()
                    .lines()
                    .map(|l| {
                        serde_json::from_str::<serde_json::Value>(l).expect("output line")
                            ["custom_id"]
                            .as_str()
                            .unwrap_or_default()
                            .to_owned()
                    })
                    .collect::<Vec<_>>()
            })
            .collect();
        ids.sort();
        assert_eq!(ids, ["2", "a", "c"], "one line per input line in {dir}");
    }

    // The demo page in a real browser, against the same stack (once: the SIGINT run).
    if signal == libc::SIGINT {
        // A second stack in the same folder is refused at once (it would rewrite this one's
        // settings), as is one on this one's port.
        let port = url.rsplit(':').next().unwrap_or_default().to_owned();
        for (dir, port, expected) in [
            (dev_dir.clone(), "0", "another `cargo xtask dev` (pid"),
            (dev_dir.join("other"), port.as_str(), "is already in use"),
        ] {
            let second = Command::new(&bin)
                .args(["dev", "--port", port])
                .env("DEV_DIR", &dir)
                .env("METRICS_ADDR", "127.0.0.1:0")
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .output()
                .expect("a second xtask dev runs");
            let err = String::from_utf8_lossy(&second.stderr);
            assert!(!second.status.success(), "{err}");
            assert!(err.contains(expected), "{err}");
        }
        browser_test(&url);
    }

    // SAFETY: signalling the child we spawned.
    unsafe { libc::kill(child.0.id() as i32, signal) };
    let status = child.0.wait().expect("xtask dev exits");
    assert!(status.success(), "{status}");
    let deadline = Instant::now() + Duration::from_secs(10);
    while groups.iter().any(|&g| alive(g)) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    for g in groups {
        assert!(!alive(g), "process group {g} survived `xtask dev`");
    }
}

/// Long-polls `status_url` (`?wait=20`) until the job is no longer queued or running, or a
/// minute passes; the last job view.
async fn wait_finished(http: &reqwest::Client, url: &str, status_url: &str) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let j: serde_json::Value = http
            .get(format!("{url}{status_url}?wait=20"))
            .bearer_auth("test-key-123")
            .send()
            .await
            .expect("job")
            .json()
            .await
            .expect("json");
        if j["status"] != "queued" && j["status"] != "running" || Instant::now() > deadline {
            return j;
        }
    }
}

/// Runs `tests/browser/page.mjs` (playwright-core driving Debian's chromium) against `url`.
fn browser_test(url: &str) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let chromium = std::env::var_os("CHROMIUM")
        .map(std::path::PathBuf::from)
        .or_else(|| {
            ["/usr/bin/chromium", "/usr/bin/chromium-browser"]
                .iter()
                .map(std::path::PathBuf::from)
                .find(|p| p.is_file())
        })
        .expect(
            "chromium not found: `cargo xtask setup` installs Debian's chromium, or set CHROMIUM",
        );
    let artifacts = Path::new(env!("CARGO_TARGET_TMPDIR")).join("browser");
    let mut cmd = Command::new(stack::wrangler::node());
    cmd.arg(root.join("tests/browser/page.mjs"))
        .env("PAGE_URL", url)
        .env("API_KEY", "test-key-123")
        .env("CHROMIUM", &chromium)
        .env("ARTIFACTS", &artifacts)
        .current_dir(&root);
    if let Some(shot) = std::env::var_os("PAGE_SCREENSHOT") {
        cmd.env("SCREENSHOT", shot);
    }
    let out = cmd.output().expect("node runs the browser test");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("{text}");
    assert!(out.status.success(), "browser test failed:\n{text}");
}

#[test]
fn xtask_dev_leaves_nothing_running_after_ctrl_c() {
    dev_stops_cleanly_on(libc::SIGINT);
}

#[test]
fn xtask_dev_leaves_nothing_running_after_sigterm() {
    dev_stops_cleanly_on(libc::SIGTERM);
}
