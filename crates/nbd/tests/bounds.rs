//! Abuse cases: bursts of connects (the listener's backlog), clients that trickle WRITE payloads, clients that pipeline large READs and never take the replies, idle sessions that fill the
//! connection table, many connections from one address, clients that skip TLS on a TLS-only server, and
//! clients that stall in the payload of a refused WRITE, sessions idle after their last reply, TLS clients that
//! stop reading as their session closes, WRITEs whose payload completes while their export is being removed or
//! that still run at the drain deadline; and
//! the busy-session count that sets how replies are batched.
//! Run against the in-process server and against the `nbd-serve` binary (its memory and threads, and the
//! bounds its flags may set).
#![allow(clippy::unwrap_used)] // test helpers fail loudly by design

mod common;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nbd::client::Handshake;
use nbd::proto::*;
use nbd::{
    Access, Backend, ExportConfig, MemoryBackend, Registry, Server, ServerConfig, Tls, TlsSettings,
};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::oneshot;

use common::eventually;

const MIB: usize = 1 << 20;

struct Harness {
    addr: SocketAddr,
    registry: Registry,
    probe: nbd::BudgetProbe,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<Result<(), nbd::NbdError>>,
}

impl Harness {
    async fn start(cfg: ServerConfig) -> Self {
        let registry = Registry::new();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = oneshot::channel::<()>();
        let server = Server::try_new(registry.clone(), cfg).unwrap();
        let probe = server.budget_probe();
        let task = tokio::spawn(server.serve(listener, async move {
            let _ = rx.await;
        }));
        Harness {
            addr,
            registry,
            probe,
            stop: Some(tx),
            task,
        }
    }

    fn add_mem(&self, name: &str, size: usize, access: Access) {
        self.registry
            .add(ExportConfig {
                name: name.into(),
                backend: Arc::new(MemoryBackend::new(size)),
                read_only: false,
                max_connections: None,
                description: None,
                access,
            })
            .unwrap();
    }

    async fn go(&self, name: &str) -> nbd::client::Client {
        Handshake::connect(self.addr)
            .await
            .unwrap()
            .go(name)
            .await
            .unwrap()
    }

    async fn shutdown(mut self) {
        self.stop.take().unwrap().send(()).unwrap();
        tokio::time::timeout(Duration::from_secs(30), self.task)
            .await
            .expect("server stops within the deadline")
            .unwrap()
            .unwrap();
    }
}

/// Whether the server closed `s` (EOF or reset) within `within`.
async fn closed_within(s: &mut tokio::net::TcpStream, within: Duration) -> bool {
    let mut buf = vec![0u8; 64 * 1024];
    tokio::time::timeout(within, async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await
    .is_ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_that_never_read_replies_hold_at_most_the_budget_and_are_closed() {
    let budget = 64 * MIB;
    let h = Harness::start(ServerConfig {
        in_flight_budget: budget,
        max_connection_bytes: 32 * MIB,
        send_timeout: Duration::from_secs(2),
        ..ServerConfig::default()
    })
    .await;
    h.add_mem("a", 32 * MIB, Access::Anyone);
    // 6 clients each pipeline 8 READs of 32 MiB (1.5 GiB of replies) and never read a byte.
    let mut abusers = Vec::new();
    for _ in 0..6 {
        let mut c = h.go("a").await;
        for _ in 0..8 {
            c.send(CMD_READ, 0, 0, 32 * MIB as u32, &[]).await.unwrap();
        }
        abusers.push(c);
    }
    let mut peak = 0;
    let until = Instant::now() + Duration::from_millis(1500);
    while Instant::now() < until {
        peak = peak.max(h.probe.in_use());
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(peak <= budget, "budget in use {peak} exceeds {budget}");
    assert!(
        peak >= 32 * MIB,
        "the abusers did take budget (peak {peak}), so the bound was exercised"
    );
    // A polite client gets through once the send timeout has closed the abusers.
    let start = Instant::now();
    let mut polite = h.go("a").await;
    tokio::time::timeout(Duration::from_secs(15), async {
        polite.write(4096, &[9u8; 4096], 0).await.unwrap();
        assert_eq!(polite.read(4096, 4096).await.unwrap(), vec![9u8; 4096]);
    })
    .await
    .expect("a real client is served after the stuck sessions time out");
    assert!(start.elapsed() < Duration::from_secs(15));
    eventually(
        "budget released after the abusers were closed (bytes in use)",
        || h.probe.in_use(),
        |&n| n == 0,
    )
    .await;
    drop(abusers);
    h.shutdown().await;
}

/// Waiters for the budget are served in order, but a request of at most 256 KiB does not wait behind the
/// large requests of clients that never read their replies: it takes a small reserve of its own, and is
/// answered at once instead of after those clients were closed for the send timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn small_requests_do_not_wait_behind_large_ones_of_clients_that_never_read_replies() {
    let send_timeout = Duration::from_secs(5);
    let h = Harness::start(ServerConfig {
        in_flight_budget: 32 * MIB,
        max_connection_bytes: 32 * MIB,
        send_timeout,
        ..ServerConfig::default()
    })
    .await;
    h.add_mem("a", 32 * MIB, Access::Anyone);
    // 6 clients each pipeline 32 READs of 1 MiB and never read a byte: the budget is spent on their
    // replies and more of their READs wait for it.
    let mut abusers = Vec::new();
    for _ in 0..6 {
        let mut c = h.go("a").await;
        for _ in 0..32 {
            c.send(CMD_READ, 0, 0, MIB as u32, &[]).await.unwrap();
        }
        abusers.push(c);
    }
    eventually(
        "the budget spent on replies nobody takes",
        || h.probe.in_use(),
        |&n| n == 32 * MIB,
    )
    .await;
    let start = Instant::now();
    let mut polite = h.go("a").await;
    tokio::time::timeout(send_timeout / 2, async {
        polite.write(4096, &[9u8; 4096], 0).await.unwrap();
        assert_eq!(polite.read(4096, 4096).await.unwrap(), vec![9u8; 4096]);
        assert_eq!(polite.read(0, 256 * 1024).await.unwrap().len(), 256 * 1024);
    })
    .await
    .expect("small requests are answered before the stuck sessions time out");
    assert!(start.elapsed() < send_timeout / 2);
    assert!(h.probe.in_use() <= 32 * MIB + nbd::SMALL_RESERVE);
    drop(abusers);
    h.shutdown().await;
}

/// Sessions are counted busy while they hold requests, idle ones are not, and the count falls back to zero
/// when they go. With more busy sessions than workers (here 3 stuck ones and a fourth on 2 workers) replies
/// go out in larger batches; every pipelined request is still answered, with the right data.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn busy_sessions_are_counted_and_a_crowded_server_answers_every_pipelined_request() {
    let h = Harness::start(ServerConfig::default()).await;
    h.add_mem("a", 64 * MIB, Access::Anyone);
    let idle = h.go("a").await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(
        h.probe.busy_sessions(),
        0,
        "a negotiated, idle session is not busy"
    );
    // Three clients each ask for 32 MiB and never read it: their replies cannot be written, so their
    // sessions stay busy.
    let mut stuck = Vec::new();
    for _ in 0..3 {
        let mut c = h.go("a").await;
        c.send(CMD_READ, 0, 0, 32 * MIB as u32, &[]).await.unwrap();
        stuck.push(c);
    }
    eventually("3 sessions busy", || h.probe.busy_sessions(), |&n| n == 3).await;
    // A fourth pipelines 128 writes and 128 reads of distinct 4 KiB blocks before reading any reply.
    let mut c = h.go("a").await;
    let block = |i: usize| vec![(i % 251) as u8 + 1; 4096];
    for i in 0..128 {
        c.send(CMD_WRITE, 0, (i * 4096) as u64, 4096, &block(i))
            .await
            .unwrap();
    }
    let mut reads = std::collections::HashMap::new();
    for i in 0..128 {
        let cookie = c
            .send(CMD_READ, 0, (i * 4096) as u64, 4096, &[])
            .await
            .unwrap();
        reads.insert(cookie, i);
    }
    let mut writes_answered = 0;
    tokio::time::timeout(Duration::from_secs(20), async {
        for _ in 0..256 {
            let r = c.recv().await.unwrap();
            assert_eq!(r.error, 0, "request {} failed", r.cookie);
            match reads.remove(&r.cookie) {
                Some(i) => assert_eq!(r.data, block(i), "READ of block {i}"),
                None => writes_answered += 1,
            }
        }
    })
    .await
    .expect("every pipelined request is answered");
    assert_eq!(writes_answered, 128);
    assert!(reads.is_empty(), "READs left unanswered: {}", reads.len());
    drop(c);
    drop(stuck);
    eventually(
        "busy count back to 0 after the clients left",
        || h.probe.busy_sessions(),
        |&n| n == 0,
    )
    .await;
    drop(idle);
    h.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_sessions_are_closed_and_a_real_client_gets_in() {
    let h = Harness::start(ServerConfig {
        max_connections: 20,
        idle_timeout: Some(Duration::from_millis(700)),
        ..ServerConfig::default()
    })
    .await;
    h.add_mem("a", MIB, Access::Anyone);
    let mut idle = Vec::new();
    for _ in 0..20 {
        idle.push(h.go("a").await);
    }
    // The table is full: one more connection is closed at once, without a greeting.
    let mut extra = tokio::net::TcpStream::connect(h.addr).await.unwrap();
    assert!(closed_within(&mut extra, Duration::from_secs(5)).await);
    // A session with a request in flight is not idle; one that keeps sending requests stays open.
    let mut busy = idle.pop().unwrap();
    for _ in 0..6 {
        tokio::time::sleep(Duration::from_millis(250)).await;
        busy.write(0, b"busy", 0).await.unwrap();
    }
    for c in &mut idle {
        assert!(
            c.read(0, 1).await.is_err(),
            "idle session was closed after the idle timeout"
        );
    }
    let mut real = Handshake::connect(h.addr)
        .await
        .unwrap()
        .go("a")
        .await
        .expect("a real client connects once idle sessions are gone");
    real.write(8, b"real", 0).await.unwrap();
    assert_eq!(real.read(0, 12).await.unwrap(), b"busy\0\0\0\0real");
    h.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_writes_whose_payload_stalls_are_closed_after_the_send_timeout() {
    let h = Harness::start(ServerConfig {
        send_timeout: Duration::from_secs(1),
        ..ServerConfig::default()
    })
    .await;
    h.add_mem("a", MIB, Access::Anyone);
    h.registry
        .add(ExportConfig {
            name: "ro".into(),
            backend: Arc::new(MemoryBackend::new(MIB)),
            read_only: true,
            max_connections: None,
            description: None,
            access: Access::Anyone,
        })
        .unwrap();
    // A refused WRITE's payload is read and dropped, so the connection stays in step: sent whole, the
    // client gets its error and goes on.
    let mut whole = h.go("ro").await;
    whole
        .send(CMD_WRITE, 0, 0, 64 * 1024, &vec![1u8; 64 * 1024])
        .await
        .unwrap();
    assert_eq!(whole.recv().await.unwrap().error, EPERM);
    assert_eq!(whole.read(0, 4).await.unwrap(), vec![0u8; 4]);
    // Each of these stops in the middle of a refused WRITE's payload: to a read-only export (EPERM), past
    // the end (ENOSPC), and larger than any request may be (EINVAL).
    let mut stalled = Vec::new();
    for (export, offset, length) in [
        ("ro", 0, MIB as u32),
        ("a", MIB as u64, MIB as u32),
        ("a", 0, 64 * MIB as u32),
    ] {
        let mut c = h.go(export).await;
        c.send(CMD_WRITE, 0, offset, length, &vec![2u8; 100_000])
            .await
            .unwrap();
        stalled.push((export, length, c));
    }
    let t0 = Instant::now();
    for (export, length, c) in &mut stalled {
        let r = tokio::time::timeout(Duration::from_secs(10), c.recv()).await;
        assert!(
            matches!(r, Ok(Err(_))),
            "a client stalled in a refused {length}-byte WRITE to {export:?} is closed, got {r:?}"
        );
    }
    assert!(t0.elapsed() >= Duration::from_millis(900));
    assert_eq!(
        whole.read(0, 4).await.unwrap(),
        vec![0u8; 4],
        "the other sessions go on"
    );
    h.shutdown().await;
}

/// The idle timer starts when the last request has been answered, not only before the first one: a client
/// that is answered and then sends nothing is closed like one that never sent a request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_that_fall_idle_after_requests_are_closed_after_the_idle_timeout() {
    let h = Harness::start(ServerConfig {
        idle_timeout: Some(Duration::from_millis(500)),
        ..ServerConfig::default()
    })
    .await;
    h.add_mem("a", MIB, Access::Anyone);
    // One request each, then silence: a READ and a WRITE run in place, a FLUSH on the blocking pool.
    let mut read = h.go("a").await;
    assert_eq!(read.read(0, 4096).await.unwrap(), vec![0u8; 4096]);
    let mut write = h.go("a").await;
    write.write(0, b"once", 0).await.unwrap();
    let mut flush = h.go("a").await;
    flush.flush().await.unwrap();
    for (what, c) in [
        ("READ", &mut read),
        ("WRITE", &mut write),
        ("FLUSH", &mut flush),
    ] {
        let r = tokio::time::timeout(Duration::from_secs(5), c.recv()).await;
        assert!(
            matches!(r, Ok(Err(_))),
            "a session idle since its {what} was answered is closed after the idle timeout, got {r:?}"
        );
    }
    h.shutdown().await;
}

#[tokio::test]
async fn per_client_address_limit_refuses_only_that_address() {
    let h = Harness::start(ServerConfig {
        max_connections_per_client: 2,
        ..ServerConfig::default()
    })
    .await;
    h.add_mem("a", MIB, Access::Anyone);
    let mut a = h.go("a").await;
    let _b = h.go("a").await;
    let mut third = tokio::net::TcpStream::connect(h.addr).await.unwrap();
    let mut greet = [0u8; 18];
    let n = tokio::time::timeout(Duration::from_secs(5), third.read(&mut greet))
        .await
        .unwrap()
        .unwrap_or(0);
    assert_eq!(
        n, 0,
        "a third connection from 127.0.0.1 is closed unanswered"
    );
    // Another address (127.0.0.2 is loopback too) is not affected.
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.bind("127.0.0.2:0".parse().unwrap()).unwrap();
    let mut other = sock.connect(h.addr).await.unwrap();
    other.read_exact(&mut greet).await.unwrap();
    assert_eq!(&greet[..8], &NBDMAGIC.to_be_bytes());
    a.write(0, b"still served", 0).await.unwrap();
    h.shutdown().await;
}

#[tokio::test]
async fn tls_required_answers_nothing_but_starttls_before_the_handshake() {
    let pki = common::Pki::new();
    let settings = Arc::new(TlsSettings::from_dir(&pki.server_dir(), true).unwrap());
    let h = Harness::start(ServerConfig {
        tls: Tls::Require(settings),
        ..ServerConfig::default()
    })
    .await;
    h.add_mem("open", MIB, Access::Anyone);
    h.add_mem("secret", MIB, Access::Clients(vec!["writer-1".into()]));
    let mut c = Handshake::connect(h.addr).await.unwrap();
    for (opt, data) in [
        (OPT_LIST, Vec::new()),
        (OPT_STRUCTURED_REPLY, Vec::new()),
        (OPT_INFO, info_request("open")),
        (OPT_GO, info_request("secret")),
        (OPT_LIST_META_CONTEXT, Vec::new()),
        (77, Vec::new()),
    ] {
        c.send_option(opt, &data).await.unwrap();
        let r = c.read_option_reply().await.unwrap();
        assert_eq!(r.option, opt);
        assert_eq!(r.reply, REP_ERR_TLS_REQD, "option {opt} before STARTTLS");
        assert!(
            !String::from_utf8_lossy(&r.data).contains("secret"),
            "nothing about exports is disclosed"
        );
    }
    // EXPORT_NAME cannot carry an error: the server closes the connection.
    c.send_option(OPT_EXPORT_NAME, b"open").await.unwrap();
    assert!(c.read_option_reply().await.is_err());
    // A server without TLS refuses STARTTLS and goes on.
    let plain = Harness::start(ServerConfig::default()).await;
    plain.add_mem("open", MIB, Access::Anyone);
    plain.add_mem("secret", MIB, Access::Clients(vec!["writer-1".into()]));
    let mut c = Handshake::connect(plain.addr).await.unwrap();
    c.send_option(OPT_STARTTLS, &[]).await.unwrap();
    assert_eq!(c.read_option_reply().await.unwrap().reply, REP_ERR_POLICY);
    // Without a verified identity, a restricted export is neither listed nor opened.
    assert_eq!(c.list().await.unwrap(), vec!["open".to_string()]);
    let e = c.go("secret").await.unwrap_err();
    assert_eq!(e.remote_code(), Some(REP_ERR_UNKNOWN));
    plain.shutdown().await;
    h.shutdown().await;
}

/// A session whose last reply filled the way to its client, which then disconnects (DISC) without reading,
/// cannot send TLS's closing alert (close_notify) either: that alert is bounded by the send timeout like
/// every reply, and the session is closed. Over an in-memory pipe of `PIPE` bytes the reply's TLS record
/// fills it exactly for one of the READ lengths tried; shorter ones leave room for the alert, longer ones
/// stall in the reply itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_sessions_that_cannot_send_their_closing_alert_are_closed_after_the_send_timeout() {
    const PIPE: usize = 8192;
    // A simple reply's 16-byte header and READ data go in TLS 1.3 records of 22 bytes more each.
    const OVERHEAD: usize = 16 + 22;
    let pki = common::Pki::new();
    let settings = Arc::new(TlsSettings::from_dir(&pki.server_dir(), false).unwrap());
    let registry = Registry::new();
    registry
        .add(ExportConfig {
            name: "a".into(),
            backend: Arc::new(MemoryBackend::new(MIB)),
            read_only: false,
            max_connections: None,
            description: None,
            access: Access::Anyone,
        })
        .unwrap();
    let server = Arc::new(
        Server::try_new(
            registry,
            ServerConfig {
                tls: Tls::Require(settings),
                send_timeout: Duration::from_secs(1),
                ..ServerConfig::default()
            },
        )
        .unwrap(),
    );
    let connector = common::tls_connector(&pki.server_dir());
    let mut sessions = Vec::new();
    for length in PIPE - OVERHEAD - 48..=PIPE - OVERHEAD + 4 {
        let (client, conn) = tokio::io::duplex(PIPE);
        let s = Arc::clone(&server);
        let peer: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let task = tokio::spawn(async move { s.serve_stream(conn, peer).await });
        let mut tls = tls_go(client, &connector, "a").await;
        let mut requests = request(CMD_READ, 1, 0, length as u32).to_vec();
        requests.extend_from_slice(&request(CMD_DISC, 2, 0, 0));
        tls.write_all(&requests).await.unwrap();
        tls.flush().await.unwrap();
        // The client keeps the stream open and never reads.
        sessions.push((length, task, tls));
    }
    for (length, task, _tls) in &mut sessions {
        let r = tokio::time::timeout(Duration::from_secs(10), task).await;
        assert!(
            matches!(r, Ok(Ok(_))),
            "the session of a client that sent a {length}-byte READ and DISC and reads nothing ends within the send timeout"
        );
    }
}

/// Clients that announce 32 MiB WRITEs and then send their payloads a byte at a time hold no more budget
/// than what they sent and one piece ahead, so another client's small requests go on while they stay
/// connected; and the send timeout is a stall timeout: a client that sends a payload slowly but steadily,
/// for longer than the send timeout, is not cut off. On tmpfs (payloads received into the file's mapping)
/// and on the temporary directory's file system (payloads received into buffers).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trickled_write_payloads_do_not_starve_others_and_slow_steady_writes_complete() {
    let stall = Duration::from_secs(3);
    for dir in [std::path::PathBuf::from("/dev/shm"), std::env::temp_dir()] {
        let f = tempfile::Builder::new()
            .prefix("nbd-trickle-")
            .tempfile_in(&dir)
            .unwrap();
        f.as_file().set_len(96 * MIB as u64).unwrap();
        let srv = common::serve_file(
            f.path(),
            ServerConfig {
                in_flight_budget: 32 * MIB,
                max_connection_bytes: 32 * MIB,
                send_timeout: stall,
                ..ServerConfig::default()
            },
            false,
        )
        .await;
        let connect = || async {
            Handshake::connect(srv.addr)
                .await
                .unwrap()
                .go("f")
                .await
                .unwrap()
        };
        let mut tricklers = Vec::new();
        for i in 0..2u64 {
            let mut c = connect().await;
            c.send(CMD_WRITE, 0, i * 32 * MIB as u64, 32 * MIB as u32, &[1])
                .await
                .unwrap();
            tricklers.push(c);
        }
        let trickle = async {
            loop {
                tokio::time::sleep(Duration::from_millis(200)).await;
                for c in &mut tricklers {
                    c.send_raw(&[1]).await.unwrap();
                }
            }
        };
        let mut good = connect().await;
        let mut steady = connect().await;
        let pieces = 64usize;
        let piece = 64 * 1024;
        let data: Vec<u8> = (0..pieces * piece).map(|i| (i / 4096) as u8).collect();
        let at = 64 * MIB as u64;
        let work = async {
            let t0 = Instant::now();
            for i in 0..10u64 {
                good.write(i * 4096, &[i as u8 + 1; 4096], 0).await.unwrap();
                assert_eq!(
                    good.read(i * 4096, 4096).await.unwrap(),
                    [i as u8 + 1; 4096]
                );
            }
            let good_took = t0.elapsed();
            // 4 MiB over 5 s, more than the send timeout, 64 KiB every 80 ms.
            let t0 = Instant::now();
            steady
                .send(CMD_WRITE, 0, at, data.len() as u32, &data[..piece])
                .await
                .unwrap();
            for p in data[piece..].chunks(piece) {
                tokio::time::sleep(Duration::from_millis(80)).await;
                steady.send_raw(p).await.unwrap();
            }
            let reply = steady.recv().await.unwrap();
            (good_took, t0.elapsed(), reply.error)
        };
        let (good_took, steady_took, steady_error) = tokio::select! {
            r = tokio::time::timeout(Duration::from_secs(30), work) => r.expect("requests are answered"),
            _ = trickle => unreachable!(),
        };
        assert!(
            good_took < Duration::from_secs(2),
            "{dir:?}: 10 small WRITEs and READs took {good_took:?} beside trickled WRITEs"
        );
        assert!(
            steady_took > stall,
            "{dir:?}: the steady writer took {steady_took:?}"
        );
        assert_eq!(
            steady_error, 0,
            "{dir:?}: the steady writer's WRITE succeeds"
        );
        assert_eq!(
            good.read(at, data.len() as u32).await.unwrap(),
            data,
            "{dir:?}: the steady writer's data"
        );
        assert_eq!(
            srv.registry.get("f").unwrap().counters.connections_current,
            4,
            "{dir:?}: the tricklers are still connected"
        );
        drop(tricklers);
        srv.stop.send(()).unwrap();
        srv.task.await.unwrap().unwrap();
    }
}

/// A WRITE larger than one piece whose next piece finds the budget spent writes what arrived and
/// releases its budget before it waits (two payloads each waiting for the other's budget would wait
/// forever); it completes once budget is free again, and nothing is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_that_finds_the_budget_spent_writes_what_arrived_and_waits_holding_nothing() {
    let h = Harness::start(ServerConfig {
        in_flight_budget: 32 * MIB,
        max_connection_bytes: 32 * MIB,
        ..ServerConfig::default()
    })
    .await;
    let f = tempfile::NamedTempFile::new_in(std::env::temp_dir()).unwrap();
    f.as_file().set_len(64 * MIB as u64).unwrap();
    h.registry
        .add(ExportConfig {
            name: "f".into(),
            backend: Arc::new(nbd::FileBackend::open(f.path(), false).unwrap()),
            read_only: false,
            max_connections: None,
            description: None,
            access: Access::Anyone,
        })
        .unwrap();
    // A READ reply nobody takes holds 31 MiB of the budget.
    let mut reader = h.go("f").await;
    reader
        .send(CMD_READ, 0, 0, 31 * MIB as u32, &[])
        .await
        .unwrap();
    eventually(
        "the unread reply's budget",
        || h.probe.in_use(),
        |n| *n == 31 * MIB,
    )
    .await;
    let mut writer = h.go("f").await;
    let data: Vec<u8> = (0..4 * MIB).map(|i| (i / 4096 + 1) as u8).collect();
    let at = 32 * MIB as u64;
    writer
        .send(CMD_WRITE, 0, at, data.len() as u32, &data)
        .await
        .unwrap();
    let file_bytes = |len: usize| {
        let mut b = vec![0u8; len];
        std::os::unix::fs::FileExt::read_exact_at(f.as_file(), &mut b, at).unwrap();
        b
    };
    eventually(
        "the first piece in the file while the WRITE waits",
        || file_bytes(MIB) == data[..MIB],
        |done| *done,
    )
    .await;
    // It releases its piece's budget right after writing the piece out.
    eventually(
        "the waiting WRITE holds no budget",
        || h.probe.in_use(),
        |n| *n == 31 * MIB,
    )
    .await;
    // The reply is taken: the WRITE completes.
    let reply = reader.recv().await.unwrap();
    assert_eq!(reply.error, 0);
    let reply = tokio::time::timeout(Duration::from_secs(10), writer.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(reply.error, 0);
    assert_eq!(writer.read(at, data.len() as u32).await.unwrap(), data);
    assert_eq!(file_bytes(data.len()), data);
    let written = h.registry.get("f").unwrap().counters.bytes_written;
    assert_eq!(written, data.len() as u64);
    h.shutdown().await;
}

/// The backlog of the TCP listener on `addr` (`ss`'s Send-Q of a listening socket).
fn listen_backlog(addr: SocketAddr) -> Option<u32> {
    let out = Command::new("ss")
        .args(["-ltnH", &format!("sport = :{}", addr.port())])
        .output()
        .expect("run ss");
    let text = String::from_utf8(out.stdout).unwrap();
    let line = text.lines().find(|l| l.contains(&addr.to_string()))?;
    line.split_whitespace().nth(2)?.parse().ok()
}

/// The listener queues as many connections not yet accepted as the kernel allows up to 4096 (nbdkit's),
/// whatever its owner bound it with: a burst of connects does not overflow it and wait a second for a
/// retried SYN.
#[tokio::test]
async fn ext_the_listener_queues_up_to_4096_connections_not_yet_accepted() {
    let h = Harness::start(ServerConfig::default()).await;
    let somaxconn: u32 = std::fs::read_to_string("/proc/sys/net/core/somaxconn")
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let want = somaxconn.min(nbd::LISTEN_BACKLOG as u32);
    assert!(want > 1024, "net.core.somaxconn is {somaxconn}");
    eventually(
        "the listener's backlog",
        || listen_backlog(h.addr),
        |b| *b == Some(want),
    )
    .await;
    // It still accepts and serves.
    h.add_mem("a", MIB, Access::Anyone);
    let mut c = h.go("a").await;
    c.write(0, &[7u8; 4096], 0).await.unwrap();
    assert_eq!(c.read(0, 4096).await.unwrap(), vec![7u8; 4096]);
    h.shutdown().await;
}

fn request(command: u16, cookie: u64, offset: u64, length: u32) -> [u8; REQUEST_LEN] {
    let mut r = [0u8; REQUEST_LEN];
    r[..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
    r[6..8].copy_from_slice(&command.to_be_bytes());
    r[8..16].copy_from_slice(&cookie.to_be_bytes());
    r[16..24].copy_from_slice(&offset.to_be_bytes());
    r[24..28].copy_from_slice(&length.to_be_bytes());
    r
}

/// Negotiates `export` over TLS (STARTTLS, then GO without structured replies) on a raw stream.
async fn tls_go<S: AsyncRead + AsyncWrite + Unpin>(
    s: S,
    connector: &tokio_rustls::TlsConnector,
    export: &str,
) -> tokio_rustls::client::TlsStream<S> {
    async fn option_reply<R: AsyncRead + Unpin>(r: &mut R) -> (u32, Vec<u8>) {
        let mut h = [0u8; 20];
        r.read_exact(&mut h).await.unwrap();
        assert_eq!(
            u64::from_be_bytes(h[..8].try_into().unwrap()),
            OPT_REPLY_MAGIC
        );
        let reply = u32::from_be_bytes(h[12..16].try_into().unwrap());
        let mut data = vec![0u8; u32::from_be_bytes(h[16..].try_into().unwrap()) as usize];
        r.read_exact(&mut data).await.unwrap();
        (reply, data)
    }
    fn option(code: u32, data: &[u8]) -> Vec<u8> {
        let mut o = IHAVEOPT.to_be_bytes().to_vec();
        o.extend_from_slice(&code.to_be_bytes());
        o.extend_from_slice(&(data.len() as u32).to_be_bytes());
        o.extend_from_slice(data);
        o
    }
    let (mut tls, _) = common::starttls(s, connector).await;
    tls.write_all(&option(OPT_GO, &info_request(export)))
        .await
        .unwrap();
    tls.flush().await.unwrap();
    loop {
        match option_reply(&mut tls).await.0 {
            REP_ACK => return tls,
            REP_INFO => {}
            other => panic!("GO over TLS answered {other:#x}"),
        }
    }
}

fn info_request(name: &str) -> Vec<u8> {
    let mut d = (name.len() as u32).to_be_bytes().to_vec();
    d.extend_from_slice(name.as_bytes());
    d.extend_from_slice(&0u16.to_be_bytes());
    d
}

// ---- the nbd-serve binary: memory and threads of the process ----

/// A running `nbd-serve`, killed (by its own pid) when dropped.
struct Served {
    child: Child,
    addr: SocketAddr,
}

impl Served {
    fn start(args: &[&str]) -> Served {
        let mut child = Command::new(env!("CARGO_BIN_EXE_nbd-serve"))
            .args(["--listen", "127.0.0.1:0"])
            .args(args)
            .stdout(Stdio::piped())
            .spawn()
            .expect("start nbd-serve");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let addr = line
            .trim()
            .strip_prefix("listening on ")
            .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
            .parse()
            .unwrap();
        Served { child, addr }
    }

    /// A field of /proc/PID/status, in its unit (kB for memory).
    fn status(&self, field: &str) -> u64 {
        let text = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        text.lines()
            .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or_else(|| panic!("{field} missing from /proc status"))
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn shm_file(size: u64) -> tempfile::NamedTempFile {
    let f = tempfile::Builder::new()
        .prefix("nbd-bounds-")
        .tempfile_in("/dev/shm")
        .unwrap();
    f.as_file().set_len(size).unwrap();
    f
}

/// A flag out of bounds is refused before the listener is bound (no `listening on`), naming the flag, the
/// value and what is allowed.
#[test]
fn nbd_serve_refuses_bounds_out_of_range_before_listening() {
    let disk = tempfile::NamedTempFile::new().unwrap();
    disk.as_file().set_len(MIB as u64).unwrap();
    let export = format!("a={}", disk.path().display());
    for (flag, value, allowed) in [
        ("--budget-mib", "16", "at least 32"),
        ("--connection-mib", "8", "at least 32"),
        ("--budget-mib", "18446744073709551615", "at most"),
        ("--io-threads", "0", "at least 1"),
        ("--max-in-flight", "0", "at least 1"),
        ("--max-connections-per-client", "0", "at least 1"),
        ("--max-connections", "0", "at least 1"),
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_nbd-serve"))
            .args(["--listen", "127.0.0.1:0", flag, value, &export])
            .env_remove("RUST_BACKTRACE")
            .env_remove("RUST_LIB_BACKTRACE")
            .stdin(Stdio::null())
            .output()
            .expect("run nbd-serve");
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{flag} {value}: {stderr}");
        assert!(
            !stdout.contains("listening"),
            "{flag} {value}: it listened first: {stdout}"
        );
        assert!(
            stderr.contains(&format!("{flag} {value}")) && stderr.contains(allowed),
            "{flag} {value}: the message names the flag, the value and {allowed:?}: {stderr}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nbd_serve_memory_stays_under_budget_with_12_clients_pipelining_32m_reads() {
    let disk = shm_file(32 * MIB as u64);
    let srv = Served::start(&[
        "--budget-mib",
        "64",
        "--connection-mib",
        "32",
        &format!("disk={}", disk.path().display()),
    ]);
    let base_kb = srv.status("VmRSS");
    let mut abusers = Vec::new();
    for _ in 0..12 {
        let mut c = Handshake::connect(srv.addr)
            .await
            .unwrap()
            .go("disk")
            .await
            .unwrap();
        for _ in 0..8 {
            c.send(CMD_READ, 0, 0, 32 * MIB as u32, &[]).await.unwrap();
        }
        abusers.push(c);
    }
    let mut peak_kb = 0;
    let until = Instant::now() + Duration::from_secs(3);
    while Instant::now() < until {
        peak_kb = peak_kb.max(srv.status("VmRSS"));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let hwm_kb = srv.status("VmHWM").max(peak_kb);
    let growth_mib = hwm_kb.saturating_sub(base_kb) / 1024;
    println!("nbd-serve RSS {base_kb} kB at start, peak {hwm_kb} kB: growth {growth_mib} MiB");
    // 3 GiB of replies were asked for; the budget is 64 MiB, plus buffers and runtime.
    assert!(
        growth_mib <= 64 + 32,
        "nbd-serve grew by {growth_mib} MiB with a 64 MiB budget"
    );
    assert!(
        growth_mib >= 16,
        "the reads were served into memory (growth {growth_mib} MiB), so the bound was exercised"
    );
    drop(abusers);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nbd_serve_idle_sessions_cost_no_threads() {
    let disk = shm_file(MIB as u64);
    let srv = Served::start(&[
        "--max-connections-per-client",
        "1000",
        &format!("disk={}", disk.path().display()),
    ]);
    let mut sessions = Vec::new();
    for _ in 0..300 {
        sessions.push(
            Handshake::connect(srv.addr)
                .await
                .unwrap()
                .go("disk")
                .await
                .unwrap(),
        );
    }
    let mut c = sessions.pop().unwrap();
    c.write(0, b"alive", 0).await.unwrap();
    let threads = srv.status("Threads");
    println!("nbd-serve threads with 300 negotiated sessions: {threads}");
    assert!(
        threads <= 24,
        "300 idle sessions made {threads} threads; sessions must not own threads"
    );
}

/// Memory storage whose flushes (and, when asked, writes) take a while, and which notes when a flush began
/// and counts the writes that reach it after that.
struct SlowStorage {
    inner: MemoryBackend,
    write_delay: Duration,
    flush_delay: Duration,
    flushing: std::sync::atomic::AtomicBool,
    late_writes: std::sync::atomic::AtomicUsize,
}

impl SlowStorage {
    fn new(write_delay: Duration, flush_delay: Duration) -> Arc<Self> {
        Arc::new(SlowStorage {
            inner: MemoryBackend::new(4 * MIB),
            write_delay,
            flush_delay,
            flushing: false.into(),
            late_writes: 0.into(),
        })
    }

    fn flush_began(&self) -> bool {
        self.flushing.load(std::sync::atomic::Ordering::SeqCst)
    }

    fn wrote(&self) {
        if self.flush_began() {
            self.late_writes
                .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
    }

    fn late_writes(&self) -> usize {
        self.late_writes.load(std::sync::atomic::Ordering::SeqCst)
    }

    fn bytes(&self, offset: u64, len: usize) -> Vec<u8> {
        let mut data = Vec::new();
        self.inner.read_at(&mut data, offset, len).unwrap();
        data
    }
}

impl Backend for SlowStorage {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn read_at(&self, buf: &mut Vec<u8>, offset: u64, len: usize) -> std::io::Result<()> {
        self.inner.read_at(buf, offset, len)
    }
    fn write_at(&self, data: &[u8], offset: u64) -> std::io::Result<()> {
        self.wrote();
        std::thread::sleep(self.write_delay);
        self.inner.write_at(data, offset)
    }
    fn write_nowait(&self, data: &[u8], offset: u64) -> std::io::Result<usize> {
        if !self.write_delay.is_zero() {
            return Ok(0);
        }
        self.wrote();
        self.inner.write_nowait(data, offset)
    }
    fn flush(&self) -> std::io::Result<()> {
        self.flushing
            .store(true, std::sync::atomic::Ordering::SeqCst);
        std::thread::sleep(self.flush_delay);
        self.inner.flush()
    }
    fn trim(&self, offset: u64, len: u64) -> std::io::Result<()> {
        self.inner.trim(offset, len)
    }
    fn zero(&self, offset: u64, len: u64, may_trim: bool, fast: bool) -> std::io::Result<()> {
        self.inner.zero(offset, len, may_trim, fast)
    }
    fn block_status(
        &self,
        offset: u64,
        len: u64,
        max_extents: usize,
    ) -> std::io::Result<Vec<nbd::Extent>> {
        self.inner.block_status(offset, len, max_extents)
    }
}

fn add_backend(registry: &Registry, name: &str, backend: &Arc<SlowStorage>) {
    registry
        .add(ExportConfig {
            name: name.into(),
            backend: Arc::clone(backend) as Arc<dyn Backend>,
            read_only: false,
            max_connections: None,
            description: None,
            access: Access::Anyone,
        })
        .unwrap();
}

/// A WRITE whose header came before the export began closing but whose payload was still arriving is not
/// counted by the drain; when its payload completes while the export closes (here during the final flush) it
/// is refused with `ESHUTDOWN`, never carried out and acknowledged after the flush that covers every
/// acknowledged write.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_whose_payload_completes_while_the_export_closes_is_refused() {
    let h = Harness::start(ServerConfig::default()).await;
    let backend = SlowStorage::new(Duration::ZERO, Duration::from_millis(1500));
    add_backend(&h.registry, "a", &backend);
    let mut c = h.go("a").await;
    c.write(MIB as u64, &[5u8; 4096], 0).await.unwrap();
    // Half of a 1 MiB WRITE's payload, then the export is removed.
    c.send(CMD_WRITE, 0, 0, MIB as u32, &vec![7u8; MIB / 2])
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let registry = h.registry.clone();
    let removal = tokio::spawn(async move { registry.remove("a", Duration::from_secs(5)).await });
    eventually("the final flush began", || backend.flush_began(), |&f| f).await;
    // The rest of the payload arrives while the export is closing.
    c.send_raw(&vec![7u8; MIB / 2]).await.unwrap();
    let reply = tokio::time::timeout(Duration::from_secs(10), c.recv())
        .await
        .expect("the client is answered or closed in bounded time");
    if let Ok(r) = &reply {
        assert_eq!(
            r.error, ESHUTDOWN,
            "a WRITE completed while the export closes is refused, not acknowledged"
        );
    }
    let report = removal.await.unwrap().unwrap();
    assert!(report.flush_error.is_none());
    assert_eq!(
        backend.late_writes(),
        0,
        "nothing written after the final flush began"
    );
    assert_eq!(
        backend.bytes(0, 4),
        vec![0u8; 4],
        "the refused WRITE changed nothing"
    );
    assert_eq!(
        backend.bytes(MIB as u64, 4),
        vec![5u8; 4],
        "the acknowledged WRITE is there"
    );
    h.shutdown().await;
}

/// A WRITE still running on the device when the drain deadline passes is not acknowledged once the final
/// flush has begun (the flush may not cover it): the sessions are closed before the flush, so such a request
/// is never answered and the client must repeat it, as for any unacknowledged write.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_still_running_at_the_drain_deadline_is_not_acknowledged_after_the_final_flush_began(
) {
    let h = Harness::start(ServerConfig::default()).await;
    let backend = SlowStorage::new(Duration::from_millis(1500), Duration::from_millis(2500));
    add_backend(&h.registry, "a", &backend);
    let mut c = h.go("a").await;
    c.send(CMD_WRITE, 0, 0, 4096, &[7u8; 4096]).await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let registry = h.registry.clone();
    let removal =
        tokio::spawn(async move { registry.remove("a", Duration::from_millis(300)).await });
    let reply = tokio::time::timeout(Duration::from_secs(10), c.recv())
        .await
        .expect("the client is answered or closed in bounded time");
    if let Ok(r) = &reply {
        assert!(
            !backend.flush_began() || r.error != 0,
            "a WRITE acknowledged after the final flush began: {r:?}"
        );
    }
    let report = removal.await.unwrap().unwrap();
    assert!(!report.drained_in_time);
    h.shutdown().await;
}
