//! Protocol edge cases and registry semantics, through the in-process client against an in-process server.
#![allow(clippy::unwrap_used)] // test helpers fail loudly by design

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use nbd::client::Handshake;
use nbd::proto::*;
use nbd::{ExportConfig, MemoryBackend, NbdErrorKind, Registry, Server, ServerConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::oneshot;

use common::eventually;

struct Harness {
    addr: SocketAddr,
    registry: Registry,
    conns: nbd::ConnectionProbe,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<Result<(), nbd::NbdError>>,
}

impl Harness {
    async fn start(cfg: ServerConfig) -> Self {
        let registry = Registry::new();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = oneshot::channel::<()>();
        let server = Server::new(registry.clone(), cfg);
        let conns = server.connection_probe();
        let task = tokio::spawn(server.serve(listener, async move {
            let _ = rx.await;
        }));
        Harness {
            addr,
            registry,
            conns,
            stop: Some(tx),
            task,
        }
    }

    fn add_mem(&self, name: &str, size: usize, read_only: bool) -> Arc<MemoryBackend> {
        let b = Arc::new(MemoryBackend::new(size));
        self.registry
            .add(ExportConfig {
                name: name.into(),
                backend: b.clone(),
                read_only,
                max_connections: None,
                description: Some(format!("memory disk {name}")),
                access: nbd::Access::Anyone,
            })
            .unwrap();
        b
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
        tokio::time::timeout(Duration::from_secs(20), self.task)
            .await
            .expect("server stops within the deadline")
            .unwrap()
            .unwrap();
    }
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

#[tokio::test]
async fn negotiation_list_info_and_block_size() {
    let h = Harness::start(ServerConfig::default()).await;
    h.add_mem("a", 1 << 20, false);
    h.add_mem("b", 2 << 20, true);
    let mut hs = Handshake::connect(h.addr).await.unwrap();
    assert_eq!(hs.server_flags, FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES);
    let mut names = hs.list().await.unwrap();
    names.sort();
    assert_eq!(names, ["a", "b"]);
    let info = hs.info("b").await.unwrap();
    assert_eq!(info.size, 2 << 20);
    assert_ne!(info.flags & TFLAG_READ_ONLY, 0);
    assert_eq!(info.flags & TFLAG_SEND_WRITE_ZEROES, 0);
    assert_eq!(info.name.as_deref(), Some("b"));
    assert_eq!(info.description.as_deref(), Some("memory disk b"));
    assert_eq!(info.block_size, Some((1, 4096, 32 << 20)));
    let e = hs.info("nope").await.unwrap_err();
    assert_eq!(e.remote_code(), Some(REP_ERR_UNKNOWN));
    let c = hs.go("a").await.unwrap();
    let f = c.info.flags;
    for flag in [
        TFLAG_HAS_FLAGS,
        TFLAG_SEND_FLUSH,
        TFLAG_SEND_FUA,
        TFLAG_SEND_TRIM,
        TFLAG_SEND_WRITE_ZEROES,
        TFLAG_CAN_MULTI_CONN,
    ] {
        assert_ne!(f & flag, 0, "flag {flag:#x} advertised");
    }
    assert_eq!(f & TFLAG_READ_ONLY, 0);
    c.disconnect().await.unwrap();
    // The old EXPORT_NAME path works too, and ABORT is acknowledged.
    let mut c = Handshake::connect(h.addr)
        .await
        .unwrap()
        .export_name("a")
        .await
        .unwrap();
    assert_eq!(c.size(), 1 << 20);
    c.write(0, b"xyz", 0).await.unwrap();
    assert_eq!(c.read(0, 3).await.unwrap(), b"xyz");
    Handshake::connect(h.addr)
        .await
        .unwrap()
        .abort()
        .await
        .unwrap();
    h.shutdown().await;
}

#[tokio::test]
async fn unknown_option_gets_err_unsup_and_negotiation_continues() {
    let h = Harness::start(ServerConfig::default()).await;
    h.add_mem("a", 65536, false);
    let mut hs = Handshake::connect(h.addr).await.unwrap();
    hs.send_option(0x4242, b"some payload").await.unwrap();
    let r = hs.read_option_reply().await.unwrap();
    assert_eq!((r.option, r.reply), (0x4242, REP_ERR_UNSUP));
    hs.send_option(OPT_EXTENDED_HEADERS, &[]).await.unwrap();
    assert_eq!(hs.read_option_reply().await.unwrap().reply, REP_ERR_UNSUP);
    // Malformed GO payload: ERR_INVALID, still negotiating.
    hs.send_option(OPT_GO, &[0, 0, 0, 9, b'a']).await.unwrap();
    assert_eq!(hs.read_option_reply().await.unwrap().reply, REP_ERR_INVALID);
    // Oversized option payload: drained, ERR_TOO_BIG.
    hs.send_option(0x77, &vec![0u8; 100_000]).await.unwrap();
    assert_eq!(hs.read_option_reply().await.unwrap().reply, REP_ERR_TOO_BIG);
    // Meta contexts need structured replies first.
    let e = hs
        .set_meta_context("a", &["base:allocation"])
        .await
        .unwrap_err();
    assert_eq!(e.remote_code(), Some(REP_ERR_INVALID));
    let mut c = hs.go("a").await.unwrap();
    c.write(10, b"ok", 0).await.unwrap();
    assert_eq!(c.read(10, 2).await.unwrap(), b"ok");
    h.shutdown().await;
}

#[tokio::test]
async fn strings_are_utf8_without_nul_and_at_most_4096_bytes_both_ways() {
    let h = Harness::start(ServerConfig::default()).await;
    h.registry
        .add(ExportConfig {
            name: "d".into(),
            backend: Arc::new(MemoryBackend::new(65536)),
            read_only: false,
            max_connections: None,
            // 3 bytes a character: 4096 bytes would end inside the 1366th.
            description: Some("€".repeat(2000)),
            access: nbd::Access::Anyone,
        })
        .unwrap();
    let mut hs = Handshake::connect(h.addr).await.unwrap();
    for (name, code) in [
        ("d\0".to_string(), REP_ERR_INVALID),
        ("x".repeat(MAX_STRING + 1), REP_ERR_INVALID),
        ("x".repeat(MAX_STRING), REP_ERR_UNKNOWN),
    ] {
        let e = hs.info(&name).await.unwrap_err();
        assert_eq!(e.remote_code(), Some(code), "a {}-byte name", name.len());
    }
    // Not UTF-8.
    hs.send_option(OPT_INFO, &[0, 0, 0, 2, 0xff, 0xfe, 0, 0])
        .await
        .unwrap();
    assert_eq!(hs.read_option_reply().await.unwrap().reply, REP_ERR_INVALID);
    // A description longer than the protocol allows is cut at a character boundary.
    let info = hs.info("d").await.unwrap();
    assert_eq!(info.description, Some("€".repeat(MAX_STRING / 3)));
    let mut c = hs.go("d").await.unwrap();
    c.write(0, b"still negotiated", 0).await.unwrap();
    // The registry takes no name a client could not send.
    for (name, ok) in [
        ("e\0".to_string(), false),
        ("e".repeat(MAX_STRING + 1), false),
        ("e".repeat(MAX_STRING), true),
    ] {
        let r = h.registry.add(ExportConfig {
            name: name.clone(),
            backend: Arc::new(MemoryBackend::new(4096)),
            read_only: false,
            max_connections: None,
            description: None,
            access: nbd::Access::Anyone,
        });
        assert_eq!(r.is_ok(), ok, "a {}-byte name: {:?}", name.len(), r.err());
    }
    h.shutdown().await;
}

#[tokio::test]
async fn bad_request_magic_closes_only_that_connection() {
    let h = Harness::start(ServerConfig::default()).await;
    h.add_mem("a", 65536, false);
    let mut other = h.go("a").await;
    let mut bad = h.go("a").await;
    let mut frame = Request {
        flags: 0,
        command: CMD_READ,
        cookie: 1,
        offset: 0,
        length: 512,
    }
    .encode();
    frame[0] = 0xff;
    bad.send_raw(&frame).await.unwrap();
    let e = bad.recv().await.unwrap_err();
    assert_eq!(e.kind(), NbdErrorKind::Io, "connection closed: {e}");
    other.write(0, b"alive", 0).await.unwrap();
    assert_eq!(other.read(0, 5).await.unwrap(), b"alive");
    let reg = h.registry.clone();
    eventually(
        "bad session to be gone (connections)",
        || reg.get("a").unwrap().counters.connections_current,
        |&n| n == 1,
    )
    .await;
    h.shutdown().await;
}

/// Sends one `cmd` with `flags` (a WRITE carries `write`; FLUSH covers nothing; WRITE_ZEROES covers
/// 8-12 KiB, the rest the first 4 KiB) and returns its reply's error.
async fn flagged(c: &mut nbd::client::Client, cmd: u16, flags: u16, write: &[u8]) -> u32 {
    let (offset, len) = match cmd {
        CMD_FLUSH => (0, 0),
        CMD_WRITE_ZEROES => (8192, 4096),
        _ => (0, 4096),
    };
    let payload = if cmd == CMD_WRITE { write } else { &[] };
    let cookie = c.send(cmd, flags, offset, len, payload).await.unwrap();
    let r = c.recv().await.unwrap();
    assert_eq!(r.cookie, cookie);
    r.error
}

#[tokio::test]
async fn command_flags_not_documented_for_the_command_get_einval_and_change_nothing() {
    let h = Harness::start(ServerConfig::default()).await;
    h.add_mem("a", 1 << 20, false);
    let data = pattern(4096, 3);
    for structured in [false, true] {
        let mut hs = Handshake::connect(h.addr).await.unwrap();
        if structured {
            hs.structured_replies().await.unwrap();
        }
        let mut c = hs.go("a").await.unwrap();
        c.write(0, &data, 0).await.unwrap();
        c.write(8192, &data, 0).await.unwrap();
        let mut refused = vec![
            (CMD_WRITE, CMD_FLAG_NO_HOLE),
            (CMD_WRITE, CMD_FLAG_DF),
            (CMD_WRITE, CMD_FLAG_REQ_ONE),
            (CMD_WRITE, CMD_FLAG_FAST_ZERO),
            (CMD_WRITE, 1 << 5),
            (CMD_WRITE, 1 << 15),
            (CMD_READ, CMD_FLAG_NO_HOLE),
            (CMD_READ, CMD_FLAG_REQ_ONE),
            (CMD_READ, 1 << 9),
            (CMD_TRIM, CMD_FLAG_NO_HOLE),
            (CMD_TRIM, CMD_FLAG_FAST_ZERO),
            (CMD_FLUSH, CMD_FLAG_DF),
            (CMD_CACHE, CMD_FLAG_REQ_ONE),
            (CMD_WRITE_ZEROES, CMD_FLAG_DF),
            (CMD_WRITE_ZEROES, CMD_FLAG_REQ_ONE),
        ];
        if !structured {
            // DF asks for an unfragmented structured reply: meaningless without structured replies.
            refused.push((CMD_READ, CMD_FLAG_DF));
        }
        for (cmd, flag) in refused {
            assert_eq!(
                flagged(&mut c, cmd, flag, &[0xEE; 4096]).await,
                EINVAL,
                "command {cmd} with flag {flag:#x} (structured replies: {structured})"
            );
        }
        // Nothing was written, trimmed or zeroed, and the session goes on.
        assert_eq!(c.read(0, 4096).await.unwrap(), data);
        assert_eq!(c.read(8192, 4096).await.unwrap(), data);
        // The documented flags are taken: FUA on any command, DF on READ with structured replies,
        // NO_HOLE and FAST_ZERO on WRITE_ZEROES, REQ_ONE on BLOCK_STATUS.
        let mut taken = vec![
            (CMD_WRITE, CMD_FLAG_FUA),
            (CMD_READ, CMD_FLAG_FUA),
            (CMD_FLUSH, CMD_FLAG_FUA),
            (CMD_CACHE, CMD_FLAG_FUA),
            (
                CMD_WRITE_ZEROES,
                CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO | CMD_FLAG_FUA,
            ),
        ];
        if structured {
            taken.push((CMD_READ, CMD_FLAG_DF));
        }
        for (cmd, flag) in taken {
            assert_eq!(
                flagged(&mut c, cmd, flag, &data).await,
                0,
                "command {cmd} with flag {flag:#x} (structured replies: {structured})"
            );
        }
        c.disconnect().await.unwrap();
    }
    h.shutdown().await;
}

#[tokio::test]
async fn oversized_and_out_of_range_requests_get_errors_and_connection_lives() {
    let h = Harness::start(ServerConfig::default()).await;
    let size = 1 << 20;
    let mem = h.add_mem("a", size, false);
    let mut c = h.go("a").await;
    // A write larger than the advertised maximum: payload drained, EINVAL.
    let big = vec![0x55u8; (32 << 20) + 4096];
    let cookie = c
        .send(CMD_WRITE, 0, 0, big.len() as u32, &big)
        .await
        .unwrap();
    let r = c.recv().await.unwrap();
    assert_eq!((r.cookie, r.error), (cookie, EINVAL));
    // An oversized read.
    let e = c.read(0, (32 << 20) + 1).await.unwrap_err();
    assert_eq!(e.remote_code(), Some(EINVAL));
    // Past the end.
    assert_eq!(
        c.read(size as u64 - 10, 20)
            .await
            .unwrap_err()
            .remote_code(),
        Some(EINVAL)
    );
    assert_eq!(
        c.read(u64::MAX - 5, 20).await.unwrap_err().remote_code(),
        Some(EINVAL)
    );
    assert_eq!(
        c.write(size as u64 - 2, b"abcd", 0)
            .await
            .unwrap_err()
            .remote_code(),
        Some(ENOSPC)
    );
    assert_eq!(
        c.zero(size as u64, 1, 0).await.unwrap_err().remote_code(),
        Some(ENOSPC)
    );
    assert_eq!(
        c.trim(size as u64 - 1, 2, 0)
            .await
            .unwrap_err()
            .remote_code(),
        Some(EINVAL)
    );
    assert_eq!(c.read(0, 0).await.unwrap_err().remote_code(), Some(EINVAL));
    // Unknown command.
    c.send(99, 0, 0, 0, &[]).await.unwrap();
    assert_eq!(c.recv().await.unwrap().error, EINVAL);
    // Nothing of the refused writes landed, and the connection still works.
    assert!(mem.contents().iter().all(|&b| b == 0));
    c.write(size as u64 - 4, b"tail", 0).await.unwrap();
    assert_eq!(c.read(size as u64 - 4, 4).await.unwrap(), b"tail");
    h.shutdown().await;
}

#[tokio::test]
async fn read_only_export_refuses_writes_with_eperm() {
    let h = Harness::start(ServerConfig::default()).await;
    let mem = Arc::new(MemoryBackend::from_vec(pattern(65536, 7)));
    h.registry
        .add(ExportConfig {
            name: "ro".into(),
            backend: mem.clone(),
            read_only: true,
            max_connections: None,
            description: None,
            access: nbd::Access::Anyone,
        })
        .unwrap();
    let mut c = h.go("ro").await;
    assert_ne!(c.info.flags & TFLAG_READ_ONLY, 0);
    assert_eq!(
        c.write(0, &[1u8; 4096], 0).await.unwrap_err().remote_code(),
        Some(EPERM)
    );
    assert_eq!(
        c.zero(0, 4096, 0).await.unwrap_err().remote_code(),
        Some(EPERM)
    );
    assert_eq!(
        c.trim(0, 4096, 0).await.unwrap_err().remote_code(),
        Some(EPERM)
    );
    assert_eq!(c.read(0, 65536).await.unwrap(), pattern(65536, 7));
    c.flush().await.unwrap();
    assert_eq!(mem.contents(), pattern(65536, 7));
    h.shutdown().await;
}

#[tokio::test]
async fn pipelined_requests_all_answered_with_matching_cookies() {
    let h = Harness::start(ServerConfig::default()).await;
    let mem = h.add_mem("a", 4 << 20, false);
    let mut c = h.go("a").await;
    let mut sent = std::collections::HashMap::new();
    for i in 0..200u64 {
        let data = pattern(16384, i as u8);
        let ck = c
            .send(
                CMD_WRITE,
                if i % 7 == 0 { CMD_FLAG_FUA } else { 0 },
                i * 16384,
                16384,
                &data,
            )
            .await
            .unwrap();
        sent.insert(ck, i);
    }
    for _ in 0..200 {
        let r = c.recv().await.unwrap();
        assert_eq!(r.error, 0);
        assert!(
            sent.remove(&r.cookie).is_some(),
            "each cookie answered once"
        );
    }
    let ck: Vec<u64> = futures_lite_send_reads(&mut c).await;
    assert_eq!(ck.len(), 64);
    let contents = mem.contents();
    for i in 0..200usize {
        assert_eq!(
            &contents[i * 16384..(i + 1) * 16384],
            &pattern(16384, i as u8)[..]
        );
    }
    let snap = h.registry.get("a").unwrap();
    assert_eq!(snap.counters.writes, 200);
    assert_eq!(snap.counters.bytes_written, 200 * 16384);
    assert_eq!(snap.counters.highest_offset_written, Some(200 * 16384));
    h.shutdown().await;
}

/// Sends 64 reads at once and checks every answer; returns the cookies seen.
async fn futures_lite_send_reads(c: &mut nbd::client::Client) -> Vec<u64> {
    let mut want = std::collections::HashMap::new();
    for i in 0..64u64 {
        let ck = c.send(CMD_READ, 0, i * 16384, 16384, &[]).await.unwrap();
        want.insert(ck, i);
    }
    let mut seen = Vec::new();
    for _ in 0..64 {
        let r = c.recv().await.unwrap();
        let i = want.remove(&r.cookie).expect("known cookie");
        assert_eq!(r.data, pattern(16384, i as u8));
        seen.push(r.cookie);
    }
    seen
}

#[tokio::test]
async fn structured_reads_and_block_status() {
    let h = Harness::start(ServerConfig::default()).await;
    let mem = Arc::new(MemoryBackend::from_vec(pattern(1 << 20, 3)));
    h.registry
        .add(ExportConfig {
            name: "a".into(),
            backend: mem,
            read_only: false,
            max_connections: None,
            description: None,
            access: nbd::Access::Anyone,
        })
        .unwrap();
    // Without the context, BLOCK_STATUS is invalid.
    let mut hs = Handshake::connect(h.addr).await.unwrap();
    hs.structured_replies().await.unwrap();
    let mut c = hs.go("a").await.unwrap();
    assert_eq!(
        c.block_status(0, 4096, 0).await.unwrap_err().remote_code(),
        Some(EINVAL)
    );
    drop(c);
    let mut hs = Handshake::connect(h.addr).await.unwrap();
    hs.structured_replies().await.unwrap();
    // LIST replies carry the reserved id 0 (doc/proto.md: "SHOULD be set to zero"), as nbdkit's do; SET
    // replies the id BLOCK_STATUS will use.
    let listed = hs.list_meta_context("a", &[]).await.unwrap();
    assert_eq!(listed, [(0, "base:allocation".to_string())]);
    let listed = hs.list_meta_context("a", &["base:"]).await.unwrap();
    assert_eq!(listed, [(0, "base:allocation".to_string())]);
    assert!(hs
        .set_meta_context("a", &["qemu:dirty-bitmap:x"])
        .await
        .unwrap()
        .is_empty());
    let set = hs
        .set_meta_context("a", &["base:allocation"])
        .await
        .unwrap();
    assert_eq!(
        set,
        [(META_BASE_ALLOCATION_ID, "base:allocation".to_string())]
    );
    let mut c = hs.go("a").await.unwrap();
    assert!(c.structured());
    assert_ne!(c.info.flags & TFLAG_SEND_DF, 0);
    assert_eq!(
        c.read(4096, 8192).await.unwrap(),
        pattern(1 << 20, 3)[4096..12288]
    );
    let ext = c.block_status(0, 1 << 20, 0).await.unwrap();
    assert_eq!(ext, [(1 << 20, 0)]);
    assert_eq!(
        c.read(1 << 20, 1).await.unwrap_err().remote_code(),
        Some(EINVAL)
    );
    assert_eq!(h.registry.get("a").unwrap().counters.block_status, 1);
    h.shutdown().await;
}

/// doc/proto.md, NBD_OPT_SET_META_CONTEXT: the contexts hold only for the export the final SET_META_CONTEXT
/// named, and each SET_META_CONTEXT replaces those set before "including when this command fails". A
/// context kept past either would answer BLOCK_STATUS the client was not granted (nbdkit refuses it too).
#[tokio::test]
async fn meta_context_holds_only_for_its_export_and_a_failed_set_clears_it() {
    let h = Harness::start(ServerConfig::default()).await;
    h.add_mem("a", 65536, false);
    h.add_mem("b", 65536, false);
    let block_status_error = |mut c: nbd::client::Client| async move {
        c.block_status(0, 4096, 0)
            .await
            .err()
            .and_then(|e| e.remote_code())
    };
    let ready = || async {
        let mut hs = Handshake::connect(h.addr).await.unwrap();
        hs.structured_replies().await.unwrap();
        hs
    };

    // Set for "b", transmission on "a" (GO and EXPORT_NAME): no context.
    let mut hs = ready().await;
    assert_eq!(
        hs.set_meta_context("b", &["base:allocation"])
            .await
            .unwrap()
            .len(),
        1
    );
    assert_eq!(
        block_status_error(hs.go("a").await.unwrap()).await,
        Some(EINVAL)
    );
    let mut hs = ready().await;
    hs.set_meta_context("b", &["base:allocation"])
        .await
        .unwrap();
    let c = hs.export_name("a").await.unwrap();
    assert_eq!(block_status_error(c).await, Some(EINVAL));

    // Set for "a", then a SET_META_CONTEXT that fails (unknown export, malformed): no context.
    let mut hs = ready().await;
    hs.set_meta_context("a", &["base:allocation"])
        .await
        .unwrap();
    let e = hs
        .set_meta_context("nope", &["base:allocation"])
        .await
        .unwrap_err();
    assert_eq!(e.remote_code(), Some(REP_ERR_UNKNOWN));
    assert_eq!(
        block_status_error(hs.go("a").await.unwrap()).await,
        Some(EINVAL)
    );
    let mut hs = ready().await;
    hs.set_meta_context("a", &["base:allocation"])
        .await
        .unwrap();
    hs.send_option(OPT_SET_META_CONTEXT, &[0, 0, 0, 1, b'a', 0, 0, 0, 1])
        .await
        .unwrap();
    assert_eq!(hs.read_option_reply().await.unwrap().reply, REP_ERR_INVALID);
    assert_eq!(
        block_status_error(hs.go("a").await.unwrap()).await,
        Some(EINVAL)
    );

    // Set for "b", then for "a", transmission on "a": the context holds.
    let mut hs = ready().await;
    hs.set_meta_context("b", &["base:allocation"])
        .await
        .unwrap();
    hs.set_meta_context("a", &["base:allocation"])
        .await
        .unwrap();
    let mut c = hs.go("a").await.unwrap();
    assert_eq!(c.block_status(0, 4096, 0).await.unwrap(), [(4096, 0)]);
    h.shutdown().await;
}

#[tokio::test]
async fn big_zero_trim_flush_and_counters() {
    let h = Harness::start(ServerConfig::default()).await;
    let size = 96 << 20;
    let mem = Arc::new(MemoryBackend::from_vec(vec![0xab; size]));
    h.registry
        .add(ExportConfig {
            name: "a".into(),
            backend: mem.clone(),
            read_only: false,
            max_connections: None,
            description: None,
            access: nbd::Access::Anyone,
        })
        .unwrap();
    let mut c = h.go("a").await;
    // One request larger than the maximum payload: zeroing is not limited by it.
    c.zero(4096, (80 << 20) as u32, CMD_FLAG_NO_HOLE | CMD_FLAG_FUA)
        .await
        .unwrap();
    c.trim(0, 4096, 0).await.unwrap();
    c.flush().await.unwrap();
    c.write(size as u64 - 8, b"end-data", CMD_FLAG_FUA)
        .await
        .unwrap();
    let got = mem.contents();
    assert!(got[..4096 + (80 << 20)].iter().all(|&b| b == 0));
    assert!(got[4096 + (80 << 20)..size - 8].iter().all(|&b| b == 0xab));
    let s = h.registry.get("a").unwrap().counters;
    assert_eq!((s.zeroes, s.trims, s.flushes, s.writes), (1, 1, 1, 1));
    assert_eq!(s.highest_offset_written, Some(size as u64));
    assert_eq!(s.connections_current, 1);
    assert_eq!(s.connections_total, 1);
    assert_eq!(s.peers.len(), 1);
    assert!(s.last_activity.is_some());
    c.disconnect().await.unwrap();
    let reg = h.registry.clone();
    eventually(
        "session gone (connections)",
        || reg.get("a").unwrap().counters.connections_current,
        |&n| n == 0,
    )
    .await;
    h.shutdown().await;
}

#[tokio::test]
async fn disconnect_mid_request_leaves_server_healthy() {
    let h = Harness::start(ServerConfig::default()).await;
    let mem = h.add_mem("a", 4 << 20, false);
    let mut c = h.go("a").await;
    let hdr = Request {
        flags: 0,
        command: CMD_WRITE,
        cookie: 9,
        offset: 0,
        length: 1 << 20,
    }
    .encode();
    c.send_raw(&hdr).await.unwrap();
    c.send_raw(&vec![0x11u8; 300_000]).await.unwrap();
    drop(c);
    // Also a client that vanishes in the middle of a request header.
    let mut half = h.go("a").await;
    half.send_raw(&hdr[..10]).await.unwrap();
    drop(half);
    let reg = h.registry.clone();
    eventually(
        "both sessions gone (connections)",
        || reg.get("a").unwrap().counters.connections_current,
        |&n| n == 0,
    )
    .await;
    assert!(
        mem.contents().iter().all(|&b| b == 0),
        "partial write never applied"
    );
    let mut c = h.go("a").await;
    c.write(0, b"fine", 0).await.unwrap();
    assert_eq!(c.read(0, 4).await.unwrap(), b"fine");
    h.shutdown().await;
}

#[tokio::test]
async fn remove_while_writing_stops_that_client_only() {
    let h = Harness::start(ServerConfig::default()).await;
    h.add_mem("a", 8 << 20, false);
    let other = h.add_mem("b", 1 << 20, false);
    let mut cb = h.go("b").await;
    let mut ca = h.go("a").await;
    let writer = tokio::spawn(async move {
        let data = vec![0x5au8; 65536];
        let mut ok = 0u64;
        loop {
            match ca.write((ok % 128) * 65536, &data, 0).await {
                Ok(()) => ok += 1,
                Err(e) => return (ok, e),
            }
        }
    });
    let reg = h.registry.clone();
    eventually(
        "writes flowing (writes)",
        || reg.get("a").unwrap().counters.writes,
        |&n| n > 20,
    )
    .await;
    let report = h
        .registry
        .remove("a", Duration::from_secs(5))
        .await
        .unwrap();
    assert_eq!(report.sessions_closed, 1);
    assert!(report.drained_in_time);
    let (ok, err) = tokio::time::timeout(Duration::from_secs(10), writer)
        .await
        .unwrap()
        .unwrap();
    assert!(ok > 20);
    assert!(
        err.remote_code() == Some(ESHUTDOWN) || err.kind() == NbdErrorKind::Io,
        "writer sees an error or a disconnect, got {err}"
    );
    assert!(h.registry.get("a").is_none());
    // New sessions to the removed name are refused.
    let e = Handshake::connect(h.addr)
        .await
        .unwrap()
        .go("a")
        .await
        .unwrap_err();
    assert_eq!(e.remote_code(), Some(REP_ERR_UNKNOWN));
    // The other export is untouched.
    cb.write(0, b"still here", CMD_FLAG_FUA).await.unwrap();
    assert_eq!(cb.read(0, 10).await.unwrap(), b"still here");
    assert_eq!(&other.contents()[..10], b"still here");
    assert_eq!(h.registry.get("b").unwrap().counters.connections_current, 1);
    let e = h
        .registry
        .remove("a", Duration::from_secs(1))
        .await
        .unwrap_err();
    assert_eq!(e.kind(), NbdErrorKind::NotFound);
    h.shutdown().await;
}

#[tokio::test]
async fn readded_name_is_a_new_generation_and_old_sessions_never_serve_it() {
    let h = Harness::start(ServerConfig::default()).await;
    let old = Arc::new(MemoryBackend::from_vec(vec![1u8; 65536]));
    let g1 = h
        .registry
        .add(ExportConfig {
            name: "v".into(),
            backend: old.clone(),
            read_only: false,
            max_connections: None,
            description: None,
            access: nbd::Access::Anyone,
        })
        .unwrap()
        .generation;
    let e = h
        .registry
        .add(ExportConfig {
            name: "v".into(),
            backend: old.clone(),
            read_only: false,
            max_connections: None,
            description: None,
            access: nbd::Access::Anyone,
        })
        .unwrap_err();
    assert_eq!(e.kind(), NbdErrorKind::Conflict);
    let mut c_old = h.go("v").await;
    assert_eq!(c_old.read(0, 4).await.unwrap(), [1, 1, 1, 1]);
    let r = h
        .registry
        .remove("v", Duration::from_secs(2))
        .await
        .unwrap();
    assert_eq!(r.generation, g1);
    let new = Arc::new(MemoryBackend::from_vec(vec![2u8; 65536]));
    let g2 = h
        .registry
        .add(ExportConfig {
            name: "v".into(),
            backend: new.clone(),
            read_only: false,
            max_connections: None,
            description: None,
            access: nbd::Access::Anyone,
        })
        .unwrap()
        .generation;
    assert!(g2 > g1);
    // The old session is closed: it cannot reach the new generation.
    assert!(c_old.write(0, &[9u8; 16], 0).await.is_err() || c_old.recv().await.is_err());
    assert!(new.contents().iter().all(|&b| b == 2));
    let mut c_new = h.go("v").await;
    assert_eq!(c_new.read(0, 4).await.unwrap(), [2, 2, 2, 2]);
    assert_eq!(h.registry.get("v").unwrap().generation, g2);
    assert_eq!(h.registry.get("v").unwrap().counters.connections_total, 1);
    h.shutdown().await;
}

#[tokio::test]
async fn connection_limits_and_handshake_timeout() {
    let cfg = ServerConfig {
        handshake_timeout: Duration::from_millis(300),
        max_connections: 3,
        ..ServerConfig::default()
    };
    let h = Harness::start(cfg).await;
    h.registry
        .add(ExportConfig {
            name: "one".into(),
            backend: Arc::new(MemoryBackend::new(4096)),
            read_only: false,
            max_connections: Some(1),
            description: None,
            access: nbd::Access::Anyone,
        })
        .unwrap();
    let mut first = h.go("one").await;
    let e = Handshake::connect(h.addr)
        .await
        .unwrap()
        .go("one")
        .await
        .unwrap_err();
    assert_eq!(e.remote_code(), Some(REP_ERR_POLICY));
    // A silent client is dropped after the handshake timeout.
    let mut silent = tokio::net::TcpStream::connect(h.addr).await.unwrap();
    let mut buf = vec![0u8; 64];
    let start = std::time::Instant::now();
    let mut total = 0;
    let closed = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            let n = silent.read(&mut buf).await.unwrap_or(0);
            if n == 0 {
                break;
            }
            total += n;
        }
    })
    .await;
    assert!(closed.is_ok(), "silent client closed by the server");
    assert_eq!(total, 18, "only the greeting was sent");
    assert!(start.elapsed() >= Duration::from_millis(250));
    // Server-wide limit, 3: a 4th connection takes the place of the oldest one still negotiating.
    let mut a = tokio::net::TcpStream::connect(h.addr).await.unwrap();
    assert_eq!(a.read(&mut buf[..18]).await.unwrap(), 18, "a is greeted");
    let mut b = tokio::net::TcpStream::connect(h.addr).await.unwrap();
    assert_eq!(b.read(&mut buf[..18]).await.unwrap(), 18, "b is greeted");
    let mut c4 = tokio::net::TcpStream::connect(h.addr).await.unwrap();
    assert_eq!(c4.read(&mut buf[..18]).await.unwrap(), 18, "c4 is greeted");
    let n = tokio::time::timeout(Duration::from_millis(200), a.read(&mut buf))
        .await
        .expect("the oldest connection still negotiating is closed at once")
        .unwrap_or(0);
    assert_eq!(n, 0);
    // b and c4 are still open (c4 is dropped by the handshake timeout later).
    assert!(
        tokio::time::timeout(Duration::from_millis(100), b.read(&mut buf))
            .await
            .is_err()
    );
    drop((b, c4));
    first.write(0, b"x", 0).await.unwrap();
    h.shutdown().await;
}

/// Connections that never finish negotiating fill the server's table: a real client still gets in (each new
/// connection takes the place of the oldest one negotiating), and a session is never closed for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_that_never_negotiate_do_not_keep_a_real_client_out() {
    let h = Harness::start(ServerConfig {
        max_connections: 16,
        max_connections_per_client: 1_000,
        ..ServerConfig::default()
    })
    .await;
    h.registry
        .add(ExportConfig {
            name: "v".into(),
            backend: Arc::new(MemoryBackend::new(1 << 20)),
            read_only: false,
            max_connections: None,
            description: None,
            access: nbd::Access::Anyone,
        })
        .unwrap();
    let mut sessions = Vec::new();
    for _ in 0..8 {
        sessions.push(h.go("v").await);
    }
    let mut silent = Vec::new();
    for _ in 0..64 {
        silent.push(tokio::net::TcpStream::connect(h.addr).await.unwrap());
    }
    for _ in 0..3 {
        let mut real = h.go("v").await;
        real.write(0, b"real", 0).await.unwrap();
        assert_eq!(real.read(0, 4).await.unwrap(), b"real");
        sessions.push(real);
    }
    for c in &mut sessions {
        c.flush().await.expect("no session was closed to make room");
    }
    assert_eq!(h.conns.max(), 16);
    assert_eq!(
        h.conns.refused_full(),
        0,
        "nothing refused while some negotiate"
    );
    assert!(h.conns.last_refused_full().is_none());
    // The silent clients leave; once sessions fill the table, a new connection is refused at once.
    drop(silent);
    for _ in 0..200 {
        if h.conns.open() == sessions.len() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(h.conns.open(), 11);
    for _ in 0..5 {
        sessions.push(h.go("v").await);
    }
    assert_eq!(h.conns.open(), 16);
    let mut over = tokio::net::TcpStream::connect(h.addr).await.unwrap();
    let mut buf = [0u8; 64];
    let n = tokio::time::timeout(Duration::from_secs(5), over.read(&mut buf))
        .await
        .unwrap()
        .unwrap_or(0);
    assert_eq!(
        n, 0,
        "refused without a greeting: every connection has a session"
    );
    assert_eq!(h.conns.refused_full(), 1);
    assert!(h.conns.last_refused_full().is_some());
    for c in &mut sessions {
        c.flush().await.unwrap();
    }
    h.shutdown().await;
}

#[tokio::test]
async fn shutdown_drains_flushes_and_closes_sessions() {
    let h = Harness::start(ServerConfig::default()).await;
    let mem = h.add_mem("a", 1 << 20, false);
    let mut c = h.go("a").await;
    for i in 0..16u64 {
        c.send(CMD_WRITE, 0, i * 4096, 4096, &[7u8; 4096])
            .await
            .unwrap();
    }
    for _ in 0..16 {
        assert_eq!(c.recv().await.unwrap().error, 0);
    }
    let addr = h.addr;
    h.shutdown().await;
    assert!(c.read(0, 1).await.is_err(), "session closed by shutdown");
    assert!(mem.contents()[..65536].iter().all(|&b| b == 7));
    assert!(
        tokio::net::TcpStream::connect(addr).await.is_err(),
        "listener closed"
    );
}

#[tokio::test]
async fn garbage_greeting_reply_does_not_disturb_others() {
    let h = Harness::start(ServerConfig::default()).await;
    h.add_mem("a", 4096, false);
    let mut good = h.go("a").await;
    let mut s = tokio::net::TcpStream::connect(h.addr).await.unwrap();
    let mut greet = [0u8; 18];
    s.read_exact(&mut greet).await.unwrap();
    s.write_all(&[0xff; 64]).await.unwrap();
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut rest))
        .await
        .unwrap();
    good.write(0, b"ok", 0).await.unwrap();
    assert_eq!(good.read(0, 2).await.unwrap(), b"ok");
    h.shutdown().await;
}

#[tokio::test]
async fn client_that_never_reads_replies_does_not_stall_others() {
    let h = Harness::start(ServerConfig {
        shutdown_drain: Duration::from_secs(1),
        ..ServerConfig::default()
    })
    .await;
    h.add_mem("a", 4 << 20, false);
    let mut greedy = h.go("a").await;
    // Far more reply data than the socket buffers hold; the replies are never read.
    for _ in 0..400 {
        greedy.send(CMD_READ, 0, 0, 1 << 20, &[]).await.unwrap();
    }
    let mut polite = h.go("a").await;
    tokio::time::timeout(Duration::from_secs(10), async {
        for i in 0..50u64 {
            polite.write(i * 4096, &[i as u8; 4096], 0).await.unwrap();
            assert_eq!(
                polite.read(i * 4096, 4096).await.unwrap(),
                vec![i as u8; 4096]
            );
        }
    })
    .await
    .expect("the other client is served promptly");
    // Shutdown does not hang on the stuck session.
    h.shutdown().await;
    drop(greedy);
}

#[tokio::test]
async fn file_backend_block_status_reports_holes_and_data() {
    let h = Harness::start(ServerConfig::default()).await;
    let f = tempfile::Builder::new()
        .prefix("nbd-test-")
        .tempfile_in("/dev/shm")
        .unwrap();
    f.as_file().set_len(1 << 20).unwrap();
    let backend = nbd::FileBackend::open(f.path(), false).unwrap();
    h.registry
        .add(ExportConfig {
            name: "f".into(),
            backend: Arc::new(backend),
            read_only: false,
            max_connections: None,
            description: None,
            access: nbd::Access::Anyone,
        })
        .unwrap();
    let mut hs = Handshake::connect(h.addr).await.unwrap();
    hs.structured_replies().await.unwrap();
    hs.set_meta_context("f", &["base:allocation"])
        .await
        .unwrap();
    let mut c = hs.go("f").await.unwrap();
    c.write(256 << 10, &vec![0xeeu8; 256 << 10], CMD_FLAG_FUA)
        .await
        .unwrap();
    let hole = STATE_HOLE | STATE_ZERO;
    let ext = c.block_status(0, 1 << 20, 0).await.unwrap();
    assert_eq!(ext, [(256 << 10, hole), (256 << 10, 0), (512 << 10, hole)]);
    let one = c
        .block_status(256 << 10, 1 << 19, CMD_FLAG_REQ_ONE)
        .await
        .unwrap();
    assert_eq!(one, [(256 << 10, 0)]);
    // Zeroing with holes allowed punches the data out again.
    c.zero(256 << 10, 256 << 10, 0).await.unwrap();
    assert_eq!(
        c.block_status(0, 1 << 20, 0).await.unwrap(),
        [(1 << 20, hole)]
    );
    assert_eq!(c.read(256 << 10, 4096).await.unwrap(), vec![0u8; 4096]);
    h.shutdown().await;
}

/// A file backend that records how many extents each block-status lookup produced.
struct CountingExtents {
    inner: nbd::FileBackend,
    most: std::sync::atomic::AtomicUsize,
}

impl nbd::Backend for CountingExtents {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn read_at(&self, buf: &mut Vec<u8>, offset: u64, len: usize) -> std::io::Result<()> {
        self.inner.read_at(buf, offset, len)
    }
    fn write_at(&self, data: &[u8], offset: u64) -> std::io::Result<()> {
        self.inner.write_at(data, offset)
    }
    fn flush(&self) -> std::io::Result<()> {
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
        let extents = self.inner.block_status(offset, len, max_extents)?;
        self.most
            .fetch_max(extents.len(), std::sync::atomic::Ordering::SeqCst);
        Ok(extents)
    }
}

/// BLOCK_STATUS with REQ_ONE on a file where every other 4 KiB block is allocated looks up one extent,
/// not as many as a full reply carries (each costs the file system up to two `lseek`s), and without
/// REQ_ONE the reply carries at most 1024.
#[tokio::test]
async fn block_status_with_req_one_looks_up_only_the_first_extent() {
    let h = Harness::start(ServerConfig::default()).await;
    let f = tempfile::NamedTempFile::new_in(std::env::temp_dir()).unwrap();
    let size = 16u64 << 20;
    f.as_file().set_len(size).unwrap();
    for block in (0..size / 4096).step_by(2) {
        std::os::unix::fs::FileExt::write_all_at(f.as_file(), &[1u8; 4096], block * 4096).unwrap();
    }
    let backend = Arc::new(CountingExtents {
        inner: nbd::FileBackend::open(f.path(), false).unwrap(),
        most: 0.into(),
    });
    h.registry
        .add(ExportConfig {
            name: "f".into(),
            backend: Arc::clone(&backend) as Arc<dyn nbd::Backend>,
            read_only: false,
            max_connections: None,
            description: None,
            access: nbd::Access::Anyone,
        })
        .unwrap();
    let mut hs = Handshake::connect(h.addr).await.unwrap();
    hs.structured_replies().await.unwrap();
    hs.set_meta_context("f", &["base:allocation"])
        .await
        .unwrap();
    let mut c = hs.go("f").await.unwrap();
    let most = || backend.most.load(std::sync::atomic::Ordering::SeqCst);
    for offset in [0u64, 4096] {
        let one = c
            .block_status(offset, 8 << 20, CMD_FLAG_REQ_ONE)
            .await
            .unwrap();
        let flags = if offset == 0 {
            0
        } else {
            STATE_HOLE | STATE_ZERO
        };
        assert_eq!(one, [(4096, flags)]);
    }
    assert_eq!(most(), 1, "a REQ_ONE lookup stops after the first extent");
    let all = c.block_status(0, 16 << 20, 0).await.unwrap();
    assert_eq!(all.len(), 1024);
    assert_eq!(all.iter().map(|e| e.0).sum::<u32>(), 4 << 20);
    assert_eq!(most(), 1024);
    h.shutdown().await;
}
