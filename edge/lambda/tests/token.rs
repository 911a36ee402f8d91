//! Production credentials: a service-account key becomes an RS256-signed JWT, exchanged at the
//! token endpoint for an access token that Pub/Sub calls carry, cached until shortly before
//! it expires. A local HTTP server plays Google's token endpoint and Pub/Sub, and verifies the
//! JWT's signature with the key's public half.
//!
//! `tests/data/test-sa-key.pem` is a throwaway key made for this test only.

use std::sync::{Arc, Mutex};

use edge_core::gcp::{Gcp, GcpConfig, ServiceAccount};
use edge_lambda::Native;
use ring::signature::{RSA_PKCS1_2048_8192_SHA256, UnparsedPublicKey};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

const KEY_PEM: &str = include_str!("data/test-sa-key.pem");
const PUB_DER: &[u8] = include_bytes!("data/test-sa-pub.der");

fn unb64url(s: &str) -> Vec<u8> {
    let mut std = s.replace('-', "+").replace('_', "/");
    while !std.len().is_multiple_of(4) {
        std.push('=');
    }
    shared::b64::unbase64(&std).expect("base64url")
}

#[derive(Default)]
struct Seen {
    tokens_issued: u32,
    claims: Vec<Value>,
    publish_auth: Vec<String>,
}

/// Serves `/token` and `/v1/projects/p/topics/t:publish`, one request per connection.
async fn fake_google(listener: TcpListener, seen: Arc<Mutex<Seen>>) {
    loop {
        let Ok((mut sock, _)) = listener.accept().await else {
            return;
        };
        let seen = seen.clone();
        tokio::spawn(async move {
            let mut buf = Vec::new();
            let mut chunk = [0u8; 8192];
            let (head, body) = loop {
                let n = sock.read(&mut chunk).await.unwrap_or(0);
                if n == 0 {
                    return;
                }
                buf.extend_from_slice(&chunk[..n]);
                if let Some(at) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                    let head = String::from_utf8_lossy(&buf[..at]).to_string();
                    let len = head
                        .lines()
                        .find_map(|l| {
                            l.to_ascii_lowercase()
                                .strip_prefix("content-length:")
                                .map(|v| v.trim().parse::<usize>().unwrap_or(0))
                        })
                        .unwrap_or(0);
                    while buf.len() < at + 4 + len {
                        let n = sock.read(&mut chunk).await.unwrap_or(0);
                        if n == 0 {
                            break;
                        }
                        buf.extend_from_slice(&chunk[..n]);
                    }
                    break (head, buf[at + 4..].to_vec());
                }
            };
            let path = head.split_whitespace().nth(1).unwrap_or("").to_owned();
            let (status, answer) = if path == "/token" {
                let form = String::from_utf8_lossy(&body).to_string();
                let jwt = form.split("assertion=").nth(1).unwrap_or("").to_owned();
                let parts: Vec<&str> = jwt.split('.').collect();
                let signed = format!("{}.{}", parts[0], parts[1]);
                let ok = UnparsedPublicKey::new(&RSA_PKCS1_2048_8192_SHA256, PUB_DER)
                    .verify(signed.as_bytes(), &unb64url(parts[2]))
                    .is_ok();
                let mut s = seen.lock().expect("lock");
                if !ok
                    || !form.starts_with(
                        "grant_type=urn%3Aietf%3Aparams%3Aoauth%3Agrant-type%3Ajwt-bearer&",
                    )
                {
                    (401, json!({"error": "invalid_grant"}))
                } else {
                    s.tokens_issued += 1;
                    s.claims
                        .push(serde_json::from_slice(&unb64url(parts[1])).expect("claims JSON"));
                    (
                        200,
                        json!({"access_token": format!("tok-{}", s.tokens_issued), "expires_in": 3600, "token_type": "Bearer"}),
                    )
                }
            } else if path == "/v1/projects/p/topics/t:publish" {
                let auth = head
                    .lines()
                    .find_map(|l| {
                        l.to_ascii_lowercase()
                            .starts_with("authorization:")
                            .then(|| l[14..].trim().to_owned())
                    })
                    .unwrap_or_default();
                seen.lock().expect("lock").publish_auth.push(auth);
                (200, json!({"messageIds": ["1"]}))
            } else {
                (404, json!({}))
            };
            let body = answer.to_string();
            let resp = format!(
                "HTTP/1.1 {status} X\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = sock.write_all(resp.as_bytes()).await;
        });
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn service_account_jwt_is_signed_exchanged_and_cached() {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let base = format!("http://{}", listener.local_addr().expect("addr"));
    let seen = Arc::new(Mutex::new(Seen::default()));
    tokio::spawn(fake_google(listener, seen.clone()));

    let sa: ServiceAccount = serde_json::from_value(json!({
        "type": "service_account",
        "client_email": "edge@p.iam.gserviceaccount.com",
        "private_key": KEY_PEM,
        "token_uri": format!("{base}/token"),
    }))
    .expect("service-account JSON");
    let gcp = Gcp::new(
        GcpConfig {
            project: "p".into(),
            topic: "t".into(),
            database: "(default)".into(),
            pubsub_base: base.clone(),
            firestore_base: base.clone(),
            pubsub_emulated: false,
            firestore_emulated: false,
            deadline_ms: 3000,
        },
        Some(sa),
    );
    let p = Native::new();
    for _ in 0..3 {
        let ids = gcp
            .publish(&p, &[(b"{}".to_vec(), vec![("job_id", "j".to_owned())])])
            .await
            .expect("publish");
        assert_eq!(ids, ["1"]);
    }
    let s = seen.lock().expect("lock");
    assert_eq!(s.tokens_issued, 1, "the token is cached across calls");
    assert_eq!(s.publish_auth, ["Bearer tok-1"; 3]);
    let c = &s.claims[0];
    assert_eq!(c["iss"], "edge@p.iam.gserviceaccount.com");
    assert_eq!(c["aud"], format!("{base}/token").as_str());
    assert_eq!(c["scope"], "https://www.googleapis.com/auth/cloud-platform");
    let (iat, exp) = (
        c["iat"].as_u64().unwrap_or(0),
        c["exp"].as_u64().unwrap_or(0),
    );
    assert_eq!(exp - iat, 3600);
}
