//! A deliberately lenient origin on raw TCP: it records every byte it is sent, parses nothing
//! (so an ambiguous request would reach it whole), and answers each connection with one canned
//! response, then closes it.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

pub struct RawOrigin {
    pub port: u16,
    received: Arc<parking_lot::Mutex<Vec<Vec<u8>>>>,
    connections: Arc<AtomicUsize>,
    response: Arc<parking_lot::Mutex<Vec<u8>>>,
    task: tokio::task::JoinHandle<()>,
}

impl RawOrigin {
    /// Answer every connection with `response` (a whole HTTP/1.1 message).
    pub async fn start(response: Vec<u8>) -> Self {
        super::install_tls_provider();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let received = Arc::new(parking_lot::Mutex::new(Vec::new()));
        let connections = Arc::new(AtomicUsize::new(0));
        let response = Arc::new(parking_lot::Mutex::new(response));
        let (rec, conns, canned) = (received.clone(), connections.clone(), response.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut stream, _)) = listener.accept().await else { return };
                conns.fetch_add(1, Ordering::SeqCst);
                let (rec, response) = (rec.clone(), canned.lock().clone());
                tokio::spawn(async move {
                    let mut bytes = Vec::new();
                    let mut buf = [0u8; 16384];
                    // Whatever arrives until the sender pauses.
                    while let Ok(Ok(n)) =
                        tokio::time::timeout(Duration::from_millis(150), stream.read(&mut buf)).await
                    {
                        if n == 0 {
                            break;
                        }
                        bytes.extend_from_slice(&buf[..n]);
                    }
                    rec.lock().push(bytes);
                    let _ = stream.write_all(&response).await;
                    let _ = stream.shutdown().await;
                });
            }
        });
        RawOrigin { port, received, connections, response, task }
    }

    /// Answer later connections with `response` instead.
    pub fn set_response(&self, response: Vec<u8>) {
        *self.response.lock() = response;
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Every byte received, per connection that sent any (the gateway's reachability probe
    /// connects and sends nothing).
    pub fn received(&self) -> Vec<Vec<u8>> {
        self.received.lock().iter().filter(|r| !r.is_empty()).cloned().collect()
    }

    /// Connections that sent at least one byte.
    pub fn requests(&self) -> usize {
        self.received().len()
    }

    /// Connections accepted, the probe's included.
    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }
}

impl Drop for RawOrigin {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A canned `200` with a small JSON body and the extra header lines given.
pub fn ok_response(extra_headers: &str) -> Vec<u8> {
    let body = r#"{"value":[]}"#;
    format!(
        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n{extra_headers}\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// One raw request on a new connection: the status, the head as text, the body, and whether
/// the gateway closed the connection after answering.
pub async fn raw_request(port: u16, request: &[u8]) -> (u16, String, String, bool) {
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    stream.write_all(request).await.unwrap();
    let mut data = Vec::new();
    let mut buf = [0u8; 16384];
    let mut closed = false;
    loop {
        match tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => {
                closed = true;
                break;
            }
            Ok(Ok(n)) => data.extend_from_slice(&buf[..n]),
            Err(_) => break,
        }
        if let Some(end) = find(&data, b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&data[..end]).to_string();
            let length = head
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().to_string())
                })
                .and_then(|v| v.parse::<usize>().ok())
                .unwrap_or(0);
            if data.len() >= end + 4 + length {
                // Wait briefly to see whether the gateway closes the connection.
                closed = matches!(
                    tokio::time::timeout(Duration::from_millis(300), stream.read(&mut buf)).await,
                    Ok(Ok(0)) | Ok(Err(_))
                );
                break;
            }
        }
    }
    let end = find(&data, b"\r\n\r\n").unwrap_or(data.len());
    let head = String::from_utf8_lossy(&data[..end]).to_string();
    let body = String::from_utf8_lossy(data.get(end + 4..).unwrap_or_default()).to_string();
    let status = head.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    (status, head, body, closed)
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}
