//! The REST listener under slow, idle, non-reading and many clients: header deadline (also for answers
//! nobody reads), connection cap, request time limit, and a real client still served.
#![allow(clippy::unwrap_used)] // tests unwrap: a panic is the failure report

mod support;

use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::json;
use support::{TestDaemon, GIB};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Waits until the server closes `s` (EOF or reset); returns how long that took, `None` after `limit`.
async fn closed_within(s: &mut TcpStream, limit: Duration) -> Option<Duration> {
    let start = Instant::now();
    let mut buf = [0u8; 1024];
    loop {
        match tokio::time::timeout(limit.saturating_sub(start.elapsed()), s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return Some(start.elapsed()),
            Ok(Ok(_)) => {} // a 408 or similar before closing is fine
            Err(_) => return None,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_and_idle_connections_are_closed_and_real_clients_get_in() {
    let d = TestDaemon::start_with(|c| {
        c.api_header_timeout_secs = 1;
        c.api_max_connections = 8;
    })
    .await;
    let addr = d.api_addr();

    // Slowloris: 24 connections that never finish their headers, three times the cap.
    let mut slow = Vec::new();
    for _ in 0..24 {
        let mut s = TcpStream::connect(&addr).await.unwrap();
        s.write_all(b"GET /api/v1/health HTTP/1.1\r\nHost: x\r\n")
            .await
            .unwrap();
        slow.push(s);
    }
    // An idle keep-alive connection after one full request.
    let mut idle = TcpStream::connect(&addr).await.unwrap();

    // Every one of them is closed by the server: 8 at a time, each after about a second.
    for s in &mut slow {
        let took = closed_within(s, Duration::from_secs(10)).await;
        assert!(
            took.is_some(),
            "a slow connection was still open after 10 s"
        );
    }
    idle.write_all(b"GET /api/v1/health HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut got = vec![0u8; 4096];
    let n = idle.read(&mut got).await.unwrap();
    assert!(String::from_utf8_lossy(&got[..n]).starts_with("HTTP/1.1 "));
    let took = closed_within(&mut idle, Duration::from_secs(5)).await;
    assert!(
        took.is_some_and(|t| t < Duration::from_secs(3)),
        "idle keep-alive connection: {took:?}"
    );

    // A real client is served.
    let (status, _) = d.get("/health").await;
    assert!(status == StatusCode::OK || status == StatusCode::SERVICE_UNAVAILABLE);
    d.stop().await;
}

/// Clients that pipeline requests and read none of the answers hold every connection slot; each is
/// closed once its answer has waited the header timeout for the client to read, and a real client gets in.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_that_read_no_answers_lose_their_connections_and_real_clients_get_in() {
    let d = TestDaemon::start_with(|c| {
        c.api_header_timeout_secs = 2;
        c.api_max_connections = 4;
    })
    .await;
    let addr: std::net::SocketAddr = d.api_addr().parse().unwrap();
    let requests = b"GET /api/v1/openapi.json HTTP/1.1\r\nHost: x\r\n\r\n".repeat(200);
    let mut stuck = Vec::new();
    for _ in 0..4 {
        let sock = tokio::net::TcpSocket::new_v4().unwrap();
        sock.set_recv_buffer_size(4096).unwrap();
        let mut s = sock.connect(addr).await.unwrap();
        s.write_all(&requests).await.unwrap();
        stuck.push(s);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let started = Instant::now();
    let (status, _) = tokio::time::timeout(Duration::from_secs(30), d.get("/health"))
        .await
        .expect("no answer to /health within 30 s while four clients read nothing");
    assert!(status == StatusCode::OK || status == StatusCode::SERVICE_UNAVAILABLE);
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "/health waited {:?}",
        started.elapsed()
    );
    for s in &mut stuck {
        assert!(
            closed_within(s, Duration::from_secs(20)).await.is_some(),
            "a client that read nothing kept its connection"
        );
    }
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_over_its_time_limit_gets_503() {
    let d = TestDaemon::start_with(|c| {
        c.api_request_timeout_secs = 1;
        c.sim.job_delay_ms = 3_000;
    })
    .await;
    let (status, op) = d
        .post(
            "/volumes",
            json!({"name": "slow", "size": GIB, "zone_id": d.zone(), "disk_offering_id": d.custom_offering()}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{op}");
    let started = Instant::now();
    let (status, body) = d
        .get(&format!(
            "/operations/{}?wait=30",
            op["id"].as_str().unwrap()
        ))
        .await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert_eq!(body["code"], "unavailable", "{body}");
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .contains("api_request_timeout_secs"),
        "{body}"
    );
    assert!(started.elapsed() < Duration::from_secs(3));
    d.stop().await;
}

/// Resident memory of this process (the daemon runs in it), in KiB.
fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_returns_to_its_baseline_after_a_flood_of_half_open_connections() {
    let d = TestDaemon::start_with(|c| {
        c.api_header_timeout_secs = 1;
        c.api_max_connections = 4096;
    })
    .await;
    let addr = d.api_addr();
    // Warm up: every lazily built part of a request's path exists before the baseline is taken.
    for _ in 0..20 {
        let (status, _) = d.get("/volumes").await;
        assert_eq!(status, StatusCode::OK);
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let baseline = rss_kib();

    for _round in 0..2 {
        let mut flood = Vec::new();
        for _ in 0..2000 {
            let mut s = TcpStream::connect(&addr).await.unwrap();
            s.write_all(b"GET /api/v1/volumes HTTP/1.1\r\nHost: x\r\n")
                .await
                .unwrap();
            flood.push(s);
        }
        for s in &mut flood {
            assert!(
                closed_within(s, Duration::from_secs(20)).await.is_some(),
                "a half-open connection outlived the header deadline"
            );
        }
        drop(flood);
    }
    // The allocator hands freed pages back gradually over its decay time (0.5 s): within 2 s, all of them.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
    let mut after = rss_kib();
    while after > baseline + 4 * 1024 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
        after = rss_kib();
    }
    assert!(
        after <= baseline + 4 * 1024,
        "RSS grew from {baseline} KiB to {after} KiB and stayed there 2 s after the connections closed"
    );
    let (status, _) = d.get("/health").await;
    assert!(status == StatusCode::OK || status == StatusCode::SERVICE_UNAVAILABLE);
    d.stop().await;
}

/// At the cap, a new client takes the place of the connection idle longest: connections that sent
/// nothing, half a request, or one request and then nothing cannot keep a real client out until the header
/// timeout closes them; connections with a request in progress are never closed for a newcomer, which then
/// waits for a place.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_the_cap_idle_connections_give_their_place_and_busy_ones_keep_it() {
    let d = TestDaemon::start_with(|c| {
        c.api_header_timeout_secs = 60;
        c.api_max_connections = 8;
        c.sim.job_delay_ms = 4000;
    })
    .await;
    let addr = d.api_addr();
    // Eight idle connections of three kinds fill the table.
    let mut idle = Vec::new();
    for i in 0..8 {
        let mut s = TcpStream::connect(&addr).await.unwrap();
        match i % 3 {
            0 => {}
            1 => s
                .write_all(b"GET /api/v1/health HTTP/1.1\r\nHost: x\r\n")
                .await
                .unwrap(),
            _ => {
                s.write_all(b"GET /api/v1/health HTTP/1.1\r\nHost: x\r\n\r\n")
                    .await
                    .unwrap();
                let mut buf = [0u8; 4096];
                let n = s.read(&mut buf).await.unwrap();
                assert!(buf[..n].starts_with(b"HTTP/1.1 200"));
            }
        }
        idle.push(s);
    }
    tokio::time::sleep(Duration::from_millis(1200)).await;
    // Real clients get in at once, again and again, each taking an idle connection's place (each keeps its
    // own connection open afterwards, as a client's pool does).
    let mut clients = Vec::new();
    for _ in 0..8 {
        let start = Instant::now();
        let client = reqwest::Client::new();
        let r = client
            .get(format!("{}/health", d.base))
            .timeout(Duration::from_secs(5))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::OK);
        assert!(
            start.elapsed() < Duration::from_secs(3),
            "{:?}",
            start.elapsed()
        );
        clients.push(client);
    }
    // The idle ones were closed, the oldest first.
    let mut closed = 0;
    for s in &mut idle {
        if closed_within(s, Duration::from_millis(200)).await.is_some() {
            closed += 1;
        }
    }
    assert_eq!(closed, 8, "every idle connection gave its place");
    drop(clients);

    // Eight long polls on an operation that takes seconds fill the table with busy connections.
    let vol = d.create_volume("busy", GIB).await;
    let (s, op) = d
        .post(
            &format!("/volumes/{vol}/attach"),
            json!({"vm_id": d.appliance()}),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{op}");
    let id = op["id"].as_str().unwrap().to_string();
    let mut polls = Vec::new();
    for _ in 0..8 {
        let url = format!("{}/operations/{id}?wait=30", d.base);
        polls.push(tokio::spawn(async move {
            let r = reqwest::Client::new().get(url).send().await.unwrap();
            let status = r.status();
            let v: serde_json::Value = r.json().await.unwrap();
            (status, v)
        }));
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    // A newcomer waits for a place instead of closing a busy connection...
    let start = Instant::now();
    let r = reqwest::Client::new()
        .get(format!("{}/health", d.base))
        .timeout(Duration::from_secs(20))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    // ...which every long poll keeps to its answer: the operation's end.
    for p in polls {
        let (status, v) = p.await.unwrap();
        assert_eq!(status, StatusCode::OK, "{v}");
        assert_eq!(v["status"], "completed", "{v}");
    }
    assert!(
        start.elapsed() >= Duration::from_millis(1000),
        "the newcomer was served before a busy connection ended: {:?}",
        start.elapsed()
    );
    d.run_ok(&format!("/volumes/{vol}/detach"), json!({})).await;
    d.stop().await;
}
