//! A local stand-in for GCE's metadata server: the one path the worker watches,
//! `instance/preempted`, with `wait_for_change` long-polls. GCE's real server cannot run here.

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::watch;

/// A metadata server on a loopback port; its `preempted` flag flips on demand.
pub struct MetadataServer {
    /// `host:port`, for `GCE_METADATA_HOST`.
    pub host: String,
    flag: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl MetadataServer {
    /// Starts serving on a free loopback port (needs a tokio runtime).
    pub async fn start() -> anyhow::Result<Self> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let host = listener.local_addr()?.to_string();
        let (flag, rx) = watch::channel(false);
        let task = tokio::spawn(async move {
            while let Ok((sock, _)) = listener.accept().await {
                tokio::spawn(answer(sock, rx.clone()));
            }
        });
        Ok(Self { host, flag, task })
    }

    /// Sets `instance/preempted` (TRUE wakes every waiting `wait_for_change` request).
    pub fn set_preempted(&self, preempted: bool) {
        self.flag.send_replace(preempted);
    }
}

impl Drop for MetadataServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn answer(mut sock: tokio::net::TcpStream, mut rx: watch::Receiver<bool>) {
    let mut buf = vec![0u8; 4096];
    let n = sock.read(&mut buf).await.unwrap_or(0);
    let head = String::from_utf8_lossy(&buf[..n]).to_string();
    let ok_flavor = head
        .to_ascii_lowercase()
        .contains("metadata-flavor: google");
    if !head.starts_with("GET /computeMetadata/v1/instance/preempted") || !ok_flavor {
        let _ = sock
            .write_all(b"HTTP/1.1 404 Not Found\r\nconnection: close\r\ncontent-length: 0\r\n\r\n")
            .await;
        return;
    }
    if head.contains("wait_for_change=true") && !*rx.borrow() {
        let _ = rx.changed().await;
    }
    let (body, etag) = if *rx.borrow() {
        ("TRUE", "1")
    } else {
        ("FALSE", "0")
    };
    let resp = format!(
        "HTTP/1.1 200 OK\r\nmetadata-flavor: Google\r\netag: {etag}\r\ncontent-type: application/text\r\nconnection: close\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    let _ = sock.write_all(resp.as_bytes()).await;
    // One request per connection, as `connection: close` says.
    let _ = sock.shutdown().await;
}
