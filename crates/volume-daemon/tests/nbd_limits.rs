//! The NBD server's limits as the daemon's configuration sets them: connections open at once from one client
//! address (`nbd_max_connections_per_client`) and over all clients (`nbd_max_connections`), and the idle
//! timeout of negotiated sessions (`nbd_idle_timeout_secs`).
#![allow(clippy::unwrap_used)] // tests unwrap: a panic is the failure report

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use serde_json::json;
use support::{TestDaemon, GIB};
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

/// Connects and reads the server's 18-byte greeting; `None` when the server closes the connection first.
async fn greeted(addr: SocketAddr) -> Option<TcpStream> {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let mut greeting = [0u8; 18];
    match tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut greeting)).await {
        Ok(Ok(_)) => {
            assert_eq!(&greeting[..16], b"NBDMAGICIHAVEOPT", "not an NBD greeting");
            Some(s)
        }
        Ok(Err(_)) => None,
        Err(_) => panic!("neither a greeting nor a close within 5 s"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_from_one_address_beyond_the_allowance_are_closed_before_the_greeting() {
    let d = TestDaemon::start_with(|c| c.nbd_max_connections_per_client = 2).await;
    let addr = d.daemon().nbd_addr();
    let first = greeted(addr)
        .await
        .expect("the first connection is greeted");
    let _second = greeted(addr)
        .await
        .expect("the second connection is greeted");
    assert!(
        greeted(addr).await.is_none(),
        "a third connection from 127.0.0.1 was greeted with nbd_max_connections_per_client = 2"
    );
    drop(first);
    // The allowance comes back once the server has seen the first connection end.
    let mut again = None;
    for _ in 0..50 {
        again = greeted(addr).await;
        if again.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        again.is_some(),
        "no connection was greeted after one of two closed"
    );
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_idle_for_nbd_idle_timeout_secs_are_closed() {
    let d = TestDaemon::start_with(|c| c.nbd_idle_timeout_secs = 1).await;
    let volume = d.create_volume("idle", GIB).await;
    let attached = d.attach_to_appliance(volume).await;
    let mut c = d.nbd_session(&attached).await;
    // Requests closer together than the timeout keep the session open.
    for _ in 0..4 {
        c.write(0, &[7u8; 4096], 0).await.unwrap();
        tokio::time::sleep(Duration::from_millis(400)).await;
    }
    assert_eq!(c.read(0, 4096).await.unwrap(), vec![7u8; 4096]);
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert!(
        c.read(0, 4096).await.is_err(),
        "a session idle for 2.5 s was still served with nbd_idle_timeout_secs = 1"
    );
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_nbd_connection_table_lets_a_writer_in_in_place_of_a_connection_still_negotiating() {
    let d = TestDaemon::start_with(|c| c.nbd_max_connections = 4).await;
    let volume = d.create_volume("full", GIB).await;
    let attached = d.attach_to_appliance(volume).await;
    let addr = d.daemon().nbd_addr();
    let mut sessions = vec![d.nbd_session(&attached).await];
    // Connections that never negotiate fill the table, and more keep coming.
    let mut silent = Vec::new();
    for _ in 0..12 {
        silent.push(TcpStream::connect(addr).await.unwrap());
    }
    for i in 0..3u64 {
        let mut c = d.nbd_session(&attached).await;
        c.write(i * 4096, &[9u8; 4096], 0).await.unwrap();
        sessions.push(c);
    }
    for c in &mut sessions {
        c.flush().await.expect("no session is closed to make room");
    }
    let (_, h) = d.get("/health").await;
    assert_eq!(h["components"]["nbd"]["status"], "ok", "{h}");
    // The silent clients leave; with a session on every connection a new one is closed before the greeting,
    // and `/health` says writers are kept out.
    drop(silent);
    let mut open = f64::NAN;
    for _ in 0..100 {
        open = metric(&d, "volume_daemon_nbd_connections").await;
        if open == 4.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(open, 4.0);
    assert_eq!(metric(&d, "volume_daemon_nbd_connection_limit").await, 4.0);
    assert!(
        greeted(addr).await.is_none(),
        "a fifth connection was greeted with nbd_max_connections = 4 and four sessions"
    );
    assert_eq!(
        metric(&d, "volume_daemon_nbd_connections_refused_full_total").await,
        1.0
    );
    let (s, h) = d.get("/health").await;
    assert_eq!(s, reqwest::StatusCode::OK, "degraded, still serving: {h}");
    let nbd = &h["components"]["nbd"];
    assert_eq!(nbd["status"], "degraded", "{h}");
    assert!(
        nbd["detail"]
            .as_str()
            .unwrap()
            .contains("connection table full: 4 of 4 connections open"),
        "{h}"
    );
    drop(sessions);
    d.run_ok(&format!("/volumes/{volume}/detach"), json!({}))
        .await;
    d.stop().await;
}

/// A value of `/metrics` (NaN when absent).
async fn metric(d: &TestDaemon, name: &str) -> f64 {
    let text = reqwest::get(format!("http://{}/metrics", d.daemon().api_addr()))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or(f64::NAN)
}
