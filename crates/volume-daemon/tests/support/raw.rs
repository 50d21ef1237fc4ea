//! HTTP as it goes over the wire, for tests that send what a client library would not (broken framing,
//! partial requests, trickled bodies): one answer read from a socket, and a request sent as it is.
#![allow(dead_code, clippy::unwrap_used)]

use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::TestDaemon;

/// An answer as it came over the wire: status, head (lower-cased) and JSON body (`Null` when none).
pub struct Answer {
    pub status: u16,
    pub head: String,
    pub body: Value,
}

/// Reads one answer (its head, then as many bytes as its `content-length` says; the connection may stay
/// open) from `s`, within 10 s.
pub async fn read_answer(s: &mut (impl AsyncRead + Unpin)) -> Answer {
    let read = async {
        let mut answer = Vec::new();
        let mut chunk = [0u8; 8192];
        loop {
            if let Some(end) = answer.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&answer[..end]).to_ascii_lowercase();
                let length: usize = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length:"))
                    .and_then(|v| v.trim().parse().ok())
                    .unwrap_or(0);
                if answer.len() >= end + 4 + length {
                    let body = serde_json::from_slice(&answer[end + 4..end + 4 + length])
                        .unwrap_or(Value::Null);
                    let status = head
                        .split(' ')
                        .nth(1)
                        .and_then(|s| s.parse().ok())
                        .unwrap_or_else(|| panic!("no HTTP status in {head:?}"));
                    return Answer { status, head, body };
                }
            }
            let n = s.read(&mut chunk).await.unwrap();
            assert!(n > 0, "closed after {:?}", String::from_utf8_lossy(&answer));
            answer.extend_from_slice(&chunk[..n]);
        }
    };
    tokio::time::timeout(Duration::from_secs(10), read)
        .await
        .expect("an answer within 10 s")
}

/// Sends `request` as it is on a new connection to `d`'s API and reads the answer.
pub async fn send(d: &TestDaemon, request: &str) -> Answer {
    let mut s = TcpStream::connect(d.api_addr()).await.unwrap();
    s.write_all(request.as_bytes()).await.unwrap();
    read_answer(&mut s).await
}
