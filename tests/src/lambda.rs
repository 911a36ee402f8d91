//! A local stand-in for AWS Lambda's Runtime API, the loopback HTTP service through which
//! Lambda hands a custom runtime (`provided.al2023`) its invocations and takes the answers:
//! `GET /2018-06-01/runtime/invocation/next` (long-polls for the next event),
//! `POST …/invocation/{id}/response`, `POST …/invocation/{id}/error` and
//! `POST …/runtime/init/error`. Lambda itself cannot run here; the function's binary runs
//! unchanged against this, given `AWS_LAMBDA_RUNTIME_API` and the variables of [`env`].

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, anyhow};
use serde_json::Value;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot};

use crate::http1::{header, read_request};

/// What the function answered to one invocation.
type Answer = Result<Value, Value>;

#[derive(Default)]
struct Shared {
    /// Invocations handed out and not yet answered, by request id.
    waiting: Mutex<HashMap<String, oneshot::Sender<Answer>>>,
    /// Bodies of `init/error` reports.
    init_errors: Mutex<Vec<Value>>,
}

/// The Runtime API on a loopback port.
pub struct RuntimeApi {
    /// `127.0.0.1:PORT`, for `AWS_LAMBDA_RUNTIME_API`.
    pub host: String,
    events: mpsc::UnboundedSender<(String, Value)>,
    shared: Arc<Shared>,
    next_id: AtomicU64,
    task: tokio::task::JoinHandle<()>,
}

impl RuntimeApi {
    /// Starts serving on a free loopback port (needs a tokio runtime).
    pub async fn start() -> anyhow::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let host = listener.local_addr()?.to_string();
        let (events, rx) = mpsc::unbounded_channel();
        let rx = Arc::new(tokio::sync::Mutex::new(rx));
        let shared = Arc::new(Shared::default());
        let s = shared.clone();
        let task = tokio::spawn(async move {
            while let Ok((sock, _)) = listener.accept().await {
                tokio::spawn(answer(sock, rx.clone(), s.clone()));
            }
        });
        Ok(Self {
            host,
            events,
            shared,
            next_id: AtomicU64::new(1),
            task,
        })
    }

    /// The environment Lambda gives a function, for this API: `AWS_LAMBDA_RUNTIME_API` and
    /// the variables the runtime client requires.
    pub fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("AWS_LAMBDA_RUNTIME_API", self.host.clone()),
            ("AWS_LAMBDA_FUNCTION_NAME", "edge".to_owned()),
            ("AWS_LAMBDA_FUNCTION_MEMORY_SIZE", "256".to_owned()),
            ("AWS_LAMBDA_FUNCTION_VERSION", "$LATEST".to_owned()),
            ("AWS_LAMBDA_LOG_GROUP_NAME", "/aws/lambda/edge".to_owned()),
            ("AWS_LAMBDA_LOG_STREAM_NAME", "local".to_owned()),
        ]
    }

    /// Hands `event` to the function and waits up to `timeout` for its answer: the response
    /// document, or an error naming what the function reported instead.
    pub async fn invoke(&self, event: Value, timeout: Duration) -> anyhow::Result<Value> {
        let id = format!("req-{}", self.next_id.fetch_add(1, Ordering::Relaxed));
        let (tx, rx) = oneshot::channel();
        self.shared
            .waiting
            .lock()
            .map_err(|_| anyhow!("runtime API state poisoned"))?
            .insert(id.clone(), tx);
        self.events
            .send((id.clone(), event))
            .map_err(|_| anyhow!("runtime API stopped"))?;
        let answer = tokio::time::timeout(timeout, rx)
            .await
            .with_context(|| {
                format!(
                    "no answer to invocation {id} within {timeout:?}; init errors: {:?}",
                    self.init_errors()
                )
            })?
            .context("the runtime API dropped the invocation")?;
        answer.map_err(|e| anyhow!("invocation {id} reported an error: {e}"))
    }

    /// How many invocations were handed to the function so far.
    pub fn invocations(&self) -> u64 {
        self.next_id.load(Ordering::Relaxed) - 1
    }

    /// The bodies of the function's `init/error` reports so far.
    pub fn init_errors(&self) -> Vec<Value> {
        self.shared
            .init_errors
            .lock()
            .map(|v| v.clone())
            .unwrap_or_default()
    }
}

impl Drop for RuntimeApi {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn answer(
    mut sock: TcpStream,
    events: Arc<tokio::sync::Mutex<mpsc::UnboundedReceiver<(String, Value)>>>,
    shared: Arc<Shared>,
) {
    let Some((head, body)) = read_request(&mut sock).await else {
        return;
    };
    let mut words = head.split_whitespace();
    let method = words.next().unwrap_or("").to_owned();
    let path = words.next().unwrap_or("").to_owned();
    let doc = || serde_json::from_slice::<Value>(&body).unwrap_or(Value::Null);
    let reply = if method == "GET" && path == "/2018-06-01/runtime/invocation/next" {
        // Long-poll: one function instance asks for one event at a time.
        let next = events.lock().await.recv().await;
        let Some((id, event)) = next else { return };
        let deadline = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() + 30_000)
            .unwrap_or(0);
        let extra = format!(
            "lambda-runtime-aws-request-id: {id}\r\n\
             lambda-runtime-deadline-ms: {deadline}\r\n\
             lambda-runtime-invoked-function-arn: arn:aws:lambda:ap-northeast-2:123456789012:function:edge\r\n\
             lambda-runtime-trace-id: Root=1-00000000-000000000000000000000000;Sampled=0\r\n"
        );
        (200, extra, event.to_string())
    } else if let Some(rest) = path.strip_prefix("/2018-06-01/runtime/invocation/")
        && method == "POST"
    {
        let (id, what) = rest.split_once('/').unwrap_or((rest, ""));
        let answer = match what {
            "response" => Ok(doc()),
            "error" => Err(serde_json::json!({
                "type": header(&head, "lambda-runtime-function-error-type"),
                "body": doc(),
            })),
            _ => return reply_with(&mut sock, 404, "", "{}").await,
        };
        let tx = shared.waiting.lock().ok().and_then(|mut w| w.remove(id));
        match tx {
            Some(tx) => {
                let _ = tx.send(answer);
                (202, String::new(), r#"{"status":"OK"}"#.to_owned())
            }
            None => (
                400,
                String::new(),
                r#"{"errorType":"InvalidRequestID"}"#.to_owned(),
            ),
        }
    } else if method == "POST" && path == "/2018-06-01/runtime/init/error" {
        if let Ok(mut v) = shared.init_errors.lock() {
            v.push(doc());
        }
        (202, String::new(), r#"{"status":"OK"}"#.to_owned())
    } else {
        (404, String::new(), "{}".to_owned())
    };
    reply_with(&mut sock, reply.0, &reply.1, &reply.2).await;
}

async fn reply_with(sock: &mut TcpStream, status: u16, extra_headers: &str, body: &str) {
    let resp = format!(
        "HTTP/1.1 {status} X\r\ncontent-type: application/json\r\n{extra_headers}content-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = sock.write_all(resp.as_bytes()).await;
    let _ = sock.shutdown().await;
}

/// An API Gateway HTTP API / Function URL event (payload format 2.0) as Lambda delivers it to
/// a function; `body` is base64-encoded when `base64` is set, as Function URLs may send it.
pub fn http_event(
    method: &str,
    path: &str,
    query: &str,
    headers: Value,
    body: Option<&str>,
    base64: bool,
) -> Value {
    let body = body.map(|b| {
        if base64 {
            shared::b64::base64(b.as_bytes())
        } else {
            b.to_owned()
        }
    });
    serde_json::json!({
        "version": "2.0",
        "routeKey": "$default",
        "rawPath": path,
        "rawQueryString": query,
        "headers": headers,
        "requestContext": {
            "accountId": "123456789012", "apiId": "api", "domainName": "x.lambda-url.ap-northeast-2.on.aws",
            "domainPrefix": "x", "requestId": "r1", "routeKey": "$default", "stage": "$default",
            "time": "06/Dec/2026:09:00:00 +0000", "timeEpoch": 1796547600000u64,
            "http": {"method": method, "path": path, "protocol": "HTTP/1.1", "sourceIp": "127.0.0.1", "userAgent": "test"}
        },
        "body": body,
        "isBase64Encoded": base64
    })
}
