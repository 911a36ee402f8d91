//! A local stand-in for Google's OAuth2 token endpoint and Pub/Sub's publish call, for the
//! production credential path that the emulators skip: a service-account key becomes an
//! RS256-signed JWT, exchanged at `token_uri` for an access token that Pub/Sub calls carry.
//! The token endpoint verifies the JWT's signature with the test key's public half. Google's
//! real endpoints cannot be reached from here.
//!
//! `tests/data/test-sa-key.pem` is a throwaway key made for these tests only.

use std::sync::{Arc, Mutex};

use ring::signature::{RSA_PKCS1_2048_8192_SHA256, UnparsedPublicKey};
use serde_json::{Value, json};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};

use crate::http1::{header, read_request};

/// The test service account's private key (PKCS#8 PEM).
pub const TEST_KEY_PEM: &str = include_str!("../data/test-sa-key.pem");
/// Its public key (DER `RSAPublicKey`), which verifies the JWTs.
pub const TEST_PUB_DER: &[u8] = include_bytes!("../data/test-sa-pub.der");
/// The test service account's e-mail (the JWT's `iss`).
pub const TEST_CLIENT_EMAIL: &str = "edge@p.iam.gserviceaccount.com";

/// What the fake endpoints saw.
#[derive(Clone, Debug, Default)]
pub struct Seen {
    /// Access tokens issued (`tok-1`, `tok-2`, … in order).
    pub tokens_issued: u32,
    /// JWT claims of each accepted token request.
    pub claims: Vec<Value>,
    /// Token requests refused (bad signature or grant type).
    pub refused: u32,
    /// The `Authorization` header of each publish call.
    pub publish_auth: Vec<String>,
}

/// `/token` and `/v1/projects/{project}/topics/{topic}:publish` on a loopback port.
pub struct FakeGoogle {
    /// `http://127.0.0.1:PORT`.
    pub base: String,
    publish_path: String,
    seen: Arc<Mutex<Seen>>,
    task: tokio::task::JoinHandle<()>,
}

impl FakeGoogle {
    /// Starts serving on a free loopback port (needs a tokio runtime).
    pub async fn start(project: &str, topic: &str) -> anyhow::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let base = format!("http://{}", listener.local_addr()?);
        let seen = Arc::new(Mutex::new(Seen::default()));
        let publish_path = format!("/v1/projects/{project}/topics/{topic}:publish");
        let task = tokio::spawn({
            let (seen, publish_path) = (seen.clone(), publish_path.clone());
            async move {
                while let Ok((sock, _)) = listener.accept().await {
                    tokio::spawn(answer(sock, seen.clone(), publish_path.clone()));
                }
            }
        });
        Ok(Self {
            base,
            publish_path,
            seen,
            task,
        })
    }

    /// The service-account JSON key of the test account, with `token_uri` pointing here.
    pub fn service_account(&self) -> Value {
        json!({
            "type": "service_account",
            "client_email": TEST_CLIENT_EMAIL,
            "private_key": TEST_KEY_PEM,
            "token_uri": format!("{}/token", self.base),
        })
    }

    /// A snapshot of what the endpoints saw so far.
    pub fn seen(&self) -> Seen {
        self.seen.lock().map(|s| s.clone()).unwrap_or_default()
    }

    /// The publish path served (`/v1/projects/P/topics/T:publish`).
    pub fn publish_path(&self) -> &str {
        &self.publish_path
    }
}

impl Drop for FakeGoogle {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn unb64url(s: &str) -> Option<Vec<u8>> {
    let mut std = s.replace('-', "+").replace('_', "/");
    while !std.len().is_multiple_of(4) {
        std.push('=');
    }
    shared::b64::unbase64(&std).ok()
}

/// Verifies a token request (`grant_type=…jwt-bearer&assertion=JWT`): the JWT's claims when
/// its RS256 signature checks out with the test key.
fn verify_grant(form: &str) -> Option<Value> {
    let jwt = form.strip_prefix(
        "grant_type=urn%3Aietf%3Aparams%3Aoauth%3Agrant-type%3Ajwt-bearer&assertion=",
    )?;
    let parts: Vec<&str> = jwt.split('.').collect();
    let [header, claims, sig] = parts[..] else {
        return None;
    };
    let head: Value = serde_json::from_slice(&unb64url(header)?).ok()?;
    if head["alg"] != "RS256" {
        return None;
    }
    UnparsedPublicKey::new(&RSA_PKCS1_2048_8192_SHA256, TEST_PUB_DER)
        .verify(format!("{header}.{claims}").as_bytes(), &unb64url(sig)?)
        .ok()?;
    serde_json::from_slice(&unb64url(claims)?).ok()
}

async fn answer(mut sock: TcpStream, seen: Arc<Mutex<Seen>>, publish_path: String) {
    let Some((head, body)) = read_request(&mut sock).await else {
        return;
    };
    let path = head.split_whitespace().nth(1).unwrap_or("").to_owned();
    let (status, answer) = if path == "/token" {
        let claims = verify_grant(&String::from_utf8_lossy(&body));
        let Ok(mut s) = seen.lock() else { return };
        match claims {
            Some(c) => {
                s.tokens_issued += 1;
                s.claims.push(c);
                let token = format!("tok-{}", s.tokens_issued);
                (
                    200,
                    json!({"access_token": token, "expires_in": 3600, "token_type": "Bearer"}),
                )
            }
            None => {
                s.refused += 1;
                (401, json!({"error": "invalid_grant"}))
            }
        }
    } else if path == publish_path {
        let auth = header(&head, "authorization").unwrap_or_default();
        let Ok(mut s) = seen.lock() else { return };
        s.publish_auth.push(auth);
        let id = s.publish_auth.len().to_string();
        (200, json!({"messageIds": [id]}))
    } else {
        (404, json!({"error": format!("no such path {path}")}))
    };
    let body = answer.to_string();
    let resp = format!(
        "HTTP/1.1 {status} X\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = sock.write_all(resp.as_bytes()).await;
}
