//! Fixed-newstyle negotiation (NetworkBlockDevice/nbd `doc/proto.md`, "Newstyle negotiation" and "TLS
//! support") over any byte stream: greeting, options, STARTTLS, the TLS policy and per-export access.
//!
//! Options are read with exact-length reads and no read-ahead buffer, so after `NBD_OPT_STARTTLS` the TLS
//! handshake starts on a stream that holds nothing the negotiation consumed, and after `NBD_OPT_GO` the
//! transmission phase starts on a clean stream.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

use crate::error::NbdError;
use crate::proto::*;
use crate::registry::{AttachRefusal, Export, Registry, SessionGuard};
use crate::tls::{ClientIdentity, Tls};

/// What negotiation decided for a session.
pub(crate) struct Negotiated {
    pub export: Arc<Export>,
    pub guard: SessionGuard,
    pub kill: CancellationToken,
    pub structured: bool,
    pub meta_allocation: bool,
}

/// How a negotiation round ended.
pub(crate) enum Outcome {
    /// Transmission starts with this export.
    Go(Negotiated),
    /// The client asked for TLS and got the ACK: run the handshake, then negotiate again.
    StartTls,
    /// The client aborted or asked for something it cannot have; close the connection.
    Close,
}

/// What the negotiation knows about its connection.
pub(crate) struct Context<'a> {
    pub registry: &'a Registry,
    pub peer: SocketAddr,
    pub tls: &'a Tls,
    /// Whether the stream is already TLS.
    pub secure: bool,
    /// The verified client identity, when the stream is TLS with a client certificate.
    pub identity: Option<&'a ClientIdentity>,
    /// Client asked for no 124 zero bytes after `NBD_OPT_EXPORT_NAME`.
    pub no_zeroes: bool,
}

/// Sends the greeting and reads the client flags; returns whether the client wants no zero padding.
pub(crate) async fn greet<S: AsyncRead + AsyncWrite + Unpin>(s: &mut S) -> Result<bool, NbdError> {
    let mut g = [0u8; 18];
    g[..8].copy_from_slice(&NBDMAGIC.to_be_bytes());
    g[8..16].copy_from_slice(&IHAVEOPT.to_be_bytes());
    g[16..].copy_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    s.write_all(&g).await?;
    s.flush().await?;
    let client_flags = s.read_u32().await?;
    if client_flags & !(CLIENT_FIXED_NEWSTYLE | CLIENT_NO_ZEROES) != 0 {
        return Err(NbdError::Protocol(format!(
            "unknown client flags {client_flags:#x}"
        )));
    }
    Ok(client_flags & CLIENT_NO_ZEROES != 0)
}

struct Opt {
    code: u32,
    data: Vec<u8>,
    too_big: bool,
}

async fn read_option<R: AsyncRead + Unpin>(rd: &mut R) -> Result<Opt, NbdError> {
    let mut h = [0u8; 16];
    rd.read_exact(&mut h).await?;
    let magic = u64::from_be_bytes(h[..8].try_into().expect("8-byte slice"));
    if magic != IHAVEOPT {
        return Err(NbdError::Protocol(format!("option magic {magic:#x}")));
    }
    let code = u32::from_be_bytes(h[8..12].try_into().expect("4-byte slice"));
    let len = u32::from_be_bytes(h[12..16].try_into().expect("4-byte slice"));
    if len > MAX_OPTION_LEN {
        tokio::io::copy(&mut rd.take(u64::from(len)), &mut tokio::io::sink()).await?;
        return Ok(Opt {
            code,
            data: Vec::new(),
            too_big: true,
        });
    }
    let mut data = vec![0u8; len as usize];
    rd.read_exact(&mut data).await?;
    Ok(Opt {
        code,
        data,
        too_big: false,
    })
}

/// Appends one option reply to `out`.
fn opt_reply(out: &mut Vec<u8>, option: u32, reply: u32, data: &[u8]) {
    let len = u32::try_from(data.len()).expect("option replies are small (invariant)");
    out.extend_from_slice(&option_reply_header(option, reply, len));
    out.extend_from_slice(data);
}

/// A cursor over an option payload.
struct Cur<'a>(&'a [u8]);

impl<'a> Cur<'a> {
    fn u16(&mut self) -> Option<u16> {
        let (h, t) = self.0.split_first_chunk::<2>()?;
        self.0 = t;
        Some(u16::from_be_bytes(*h))
    }
    fn u32(&mut self) -> Option<u32> {
        let (h, t) = self.0.split_first_chunk::<4>()?;
        self.0 = t;
        Some(u32::from_be_bytes(*h))
    }
    fn bytes(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (h, t) = self.0.split_at(n);
        self.0 = t;
        Some(h)
    }
    /// A protocol string: UTF-8, no NUL, at most [`MAX_STRING`] bytes; anything else is a malformed
    /// option (`NBD_REP_ERR_INVALID`).
    fn string(&mut self) -> Option<String> {
        let n = self.u32()? as usize;
        let s = String::from_utf8(self.bytes(n)?.to_vec()).ok()?;
        (s.len() <= MAX_STRING && !s.contains('\0')).then_some(s)
    }
    fn done(&self) -> bool {
        self.0.is_empty()
    }
}

/// Parses `name, n, n x u16` (GO/INFO).
fn parse_info_request(data: &[u8]) -> Option<(String, Vec<u16>)> {
    let mut c = Cur(data);
    let name = c.string()?;
    let n = c.u16()?;
    let mut infos = Vec::with_capacity(n as usize);
    for _ in 0..n {
        infos.push(c.u16()?);
    }
    c.done().then_some((name, infos))
}

/// Parses `name, n, n x string` (LIST/SET_META_CONTEXT).
fn parse_meta_request(data: &[u8]) -> Option<(String, Vec<String>)> {
    let mut c = Cur(data);
    let name = c.string()?;
    let n = c.u32()?;
    let mut q = Vec::new();
    for _ in 0..n {
        q.push(c.string()?);
    }
    c.done().then_some((name, q))
}

pub(crate) fn transmission_flags(export: &Export, structured: bool) -> u16 {
    let b = &export.backend;
    let mut f = TFLAG_HAS_FLAGS | TFLAG_SEND_FLUSH | TFLAG_SEND_FUA | TFLAG_SEND_CACHE;
    if export.read_only {
        f |= TFLAG_READ_ONLY;
    } else {
        f |= TFLAG_SEND_WRITE_ZEROES;
        if b.can_trim() {
            f |= TFLAG_SEND_TRIM;
        }
        if b.can_fast_zero() {
            f |= TFLAG_SEND_FAST_ZERO;
        }
    }
    if structured {
        f |= TFLAG_SEND_DF;
    }
    if b.can_multi_conn() {
        f |= TFLAG_CAN_MULTI_CONN;
    }
    if b.is_rotational() {
        f |= TFLAG_ROTATIONAL;
    }
    f
}

fn info_replies(
    out: &mut Vec<u8>,
    option: u32,
    export: &Export,
    requested: &[u16],
    structured: bool,
) {
    let mut d = Vec::with_capacity(12);
    d.extend_from_slice(&INFO_EXPORT.to_be_bytes());
    d.extend_from_slice(&export.backend.size().to_be_bytes());
    d.extend_from_slice(&transmission_flags(export, structured).to_be_bytes());
    opt_reply(out, option, REP_INFO, &d);
    if requested.contains(&INFO_NAME) {
        let mut d = INFO_NAME.to_be_bytes().to_vec();
        d.extend_from_slice(export.name.as_bytes());
        opt_reply(out, option, REP_INFO, &d);
    }
    if let Some(desc) = export
        .description
        .as_ref()
        .filter(|_| requested.contains(&INFO_DESCRIPTION))
    {
        let mut d = INFO_DESCRIPTION.to_be_bytes().to_vec();
        // At most MAX_STRING bytes, cut at a character boundary so the client gets valid UTF-8.
        let mut end = desc.len().min(MAX_STRING);
        while !desc.is_char_boundary(end) {
            end -= 1;
        }
        d.extend_from_slice(&desc.as_bytes()[..end]);
        opt_reply(out, option, REP_INFO, &d);
    }
    let mut d = INFO_BLOCK_SIZE.to_be_bytes().to_vec();
    d.extend_from_slice(&BLOCK_MIN.to_be_bytes());
    d.extend_from_slice(&BLOCK_PREFERRED.to_be_bytes());
    d.extend_from_slice(&BLOCK_MAX.to_be_bytes());
    opt_reply(out, option, REP_INFO, &d);
}

/// The export of that name if this client may see it. Exports a client may not open are reported as
/// unknown, so their names are never disclosed.
fn visible(ctx: &Context<'_>, name: &str) -> Option<Arc<Export>> {
    ctx.registry
        .lookup(name)
        .filter(|e| e.access.permits(ctx.identity))
}

async fn send<S: AsyncWrite + Unpin>(s: &mut S, out: &mut Vec<u8>) -> Result<(), NbdError> {
    if !out.is_empty() {
        s.write_all(out).await?;
        out.clear();
    }
    s.flush().await?;
    Ok(())
}

/// Runs option haggling until GO/EXPORT_NAME, STARTTLS, ABORT or a fatal error.
pub(crate) async fn negotiate<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    ctx: &Context<'_>,
) -> Result<Outcome, NbdError> {
    // State negotiated before STARTTLS is forgotten: each call starts afresh (doc/proto.md requires it).
    let mut structured = false;
    // The export named by the last NBD_OPT_SET_META_CONTEXT, when that option selected `base:allocation`.
    // The context holds only if transmission starts on that same export: doc/proto.md lets a client send
    // NBD_CMD_BLOCK_STATUS only when the final SET_META_CONTEXT "referred to the same export name", and a
    // SET_META_CONTEXT "replaces all previously-set metadata contexts (including when this command fails)".
    let mut meta_export: Option<String> = None;
    let mut out = Vec::with_capacity(4096);
    loop {
        send(s, &mut out).await?;
        let opt = read_option(s).await?;
        let code = opt.code;
        if code == OPT_SET_META_CONTEXT {
            // Whatever the answer (an error included), the contexts selected before are gone.
            meta_export = None;
        }
        let tls_required = ctx.tls.required() && !ctx.secure;
        if tls_required && !matches!(code, OPT_STARTTLS | OPT_ABORT) {
            if code == OPT_EXPORT_NAME {
                // No error can be sent for EXPORT_NAME: the only answer is to close.
                tracing::info!(peer = %ctx.peer, "EXPORT_NAME before STARTTLS on a TLS-only server; closing");
                return Ok(Outcome::Close);
            }
            opt_reply(
                &mut out,
                code,
                REP_ERR_TLS_REQD,
                b"this server requires TLS: send STARTTLS first",
            );
            continue;
        }
        if opt.too_big {
            if code == OPT_EXPORT_NAME {
                return Ok(Outcome::Close);
            }
            opt_reply(&mut out, code, REP_ERR_TOO_BIG, b"option payload too large");
            continue;
        }
        match code {
            OPT_EXPORT_NAME => {
                let Ok(name) = String::from_utf8(opt.data) else {
                    return Ok(Outcome::Close);
                };
                let Some(export) = visible(ctx, &name) else {
                    tracing::info!(peer = %ctx.peer, export = %name, "unknown export requested; closing");
                    return Ok(Outcome::Close);
                };
                let kill = CancellationToken::new();
                let Ok(guard) = export.attach(ctx.peer, ctx.identity, kill.clone()) else {
                    return Ok(Outcome::Close);
                };
                out.extend_from_slice(&export.backend.size().to_be_bytes());
                out.extend_from_slice(&transmission_flags(&export, structured).to_be_bytes());
                if !ctx.no_zeroes {
                    out.extend_from_slice(&[0u8; 124]);
                }
                send(s, &mut out).await?;
                let meta_allocation = meta_export.as_deref() == Some(name.as_str());
                return Ok(Outcome::Go(Negotiated {
                    export,
                    guard,
                    kill,
                    structured,
                    meta_allocation,
                }));
            }
            OPT_ABORT => {
                opt_reply(&mut out, code, REP_ACK, &[]);
                let _ = send(s, &mut out).await;
                return Ok(Outcome::Close);
            }
            OPT_STARTTLS => {
                if !opt.data.is_empty() {
                    opt_reply(&mut out, code, REP_ERR_INVALID, b"STARTTLS takes no data");
                } else if ctx.secure {
                    opt_reply(&mut out, code, REP_ERR_INVALID, b"TLS is already active");
                } else if ctx.tls.settings().is_none() {
                    opt_reply(
                        &mut out,
                        code,
                        REP_ERR_POLICY,
                        b"TLS is not offered by this server",
                    );
                } else {
                    opt_reply(&mut out, code, REP_ACK, &[]);
                    send(s, &mut out).await?;
                    return Ok(Outcome::StartTls);
                }
            }
            OPT_LIST => {
                if !opt.data.is_empty() {
                    opt_reply(&mut out, code, REP_ERR_INVALID, b"LIST takes no data");
                    continue;
                }
                let mut names: Vec<String> = ctx
                    .registry
                    .all()
                    .into_iter()
                    .filter(|e| e.access.permits(ctx.identity))
                    .map(|e| e.name.clone())
                    .collect();
                names.sort();
                for name in names {
                    let mut d = Vec::with_capacity(4 + name.len());
                    d.extend_from_slice(&(name.len() as u32).to_be_bytes());
                    d.extend_from_slice(name.as_bytes());
                    opt_reply(&mut out, code, REP_SERVER, &d);
                }
                opt_reply(&mut out, code, REP_ACK, &[]);
            }
            OPT_INFO | OPT_GO => {
                let Some((name, infos)) = parse_info_request(&opt.data) else {
                    opt_reply(
                        &mut out,
                        code,
                        REP_ERR_INVALID,
                        b"malformed INFO/GO request",
                    );
                    continue;
                };
                let Some(export) = visible(ctx, &name) else {
                    let msg = format!("no export named {name:?} for this client");
                    opt_reply(&mut out, code, REP_ERR_UNKNOWN, msg.as_bytes());
                    continue;
                };
                if export.is_closing() {
                    opt_reply(&mut out, code, REP_ERR_SHUTDOWN, b"export is being removed");
                    continue;
                }
                if code == OPT_INFO {
                    info_replies(&mut out, code, &export, &infos, structured);
                    opt_reply(&mut out, code, REP_ACK, &[]);
                    continue;
                }
                let kill = CancellationToken::new();
                let guard = match export.attach(ctx.peer, ctx.identity, kill.clone()) {
                    Ok(g) => g,
                    Err(AttachRefusal::Limit) => {
                        opt_reply(
                            &mut out,
                            code,
                            REP_ERR_POLICY,
                            b"export connection limit reached; retry later",
                        );
                        continue;
                    }
                    Err(AttachRefusal::Closing) => {
                        opt_reply(&mut out, code, REP_ERR_SHUTDOWN, b"export is being removed");
                        continue;
                    }
                };
                info_replies(&mut out, code, &export, &infos, structured);
                opt_reply(&mut out, code, REP_ACK, &[]);
                send(s, &mut out).await?;
                let meta_allocation = meta_export.as_deref() == Some(name.as_str());
                return Ok(Outcome::Go(Negotiated {
                    export,
                    guard,
                    kill,
                    structured,
                    meta_allocation,
                }));
            }
            OPT_STRUCTURED_REPLY => {
                if !opt.data.is_empty() {
                    opt_reply(
                        &mut out,
                        code,
                        REP_ERR_INVALID,
                        b"STRUCTURED_REPLY takes no data",
                    );
                } else {
                    structured = true;
                    opt_reply(&mut out, code, REP_ACK, &[]);
                }
            }
            OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => {
                if !structured {
                    opt_reply(
                        &mut out,
                        code,
                        REP_ERR_INVALID,
                        b"negotiate structured replies first",
                    );
                    continue;
                }
                let Some((name, queries)) = parse_meta_request(&opt.data) else {
                    opt_reply(
                        &mut out,
                        code,
                        REP_ERR_INVALID,
                        b"malformed meta context request",
                    );
                    continue;
                };
                if visible(ctx, &name).is_none() {
                    let msg = format!("no export named {name:?} for this client");
                    opt_reply(&mut out, code, REP_ERR_UNKNOWN, msg.as_bytes());
                    continue;
                }
                let matches = if code == OPT_LIST_META_CONTEXT {
                    queries.is_empty()
                        || queries
                            .iter()
                            .any(|q| q == "base:" || q == META_BASE_ALLOCATION)
                } else {
                    queries.iter().any(|q| q == META_BASE_ALLOCATION)
                };
                if code == OPT_SET_META_CONTEXT && matches {
                    meta_export = Some(name);
                }
                if matches {
                    // A listed context has no id yet: doc/proto.md reserves the field in LIST replies
                    // ("SHOULD be set to zero; clients MUST disregard it").
                    let id = if code == OPT_LIST_META_CONTEXT {
                        0
                    } else {
                        META_BASE_ALLOCATION_ID
                    };
                    let mut d = id.to_be_bytes().to_vec();
                    d.extend_from_slice(META_BASE_ALLOCATION.as_bytes());
                    opt_reply(&mut out, code, REP_META_CONTEXT, &d);
                }
                opt_reply(&mut out, code, REP_ACK, &[]);
            }
            _ => {
                let msg = format!("option {code} is not supported");
                opt_reply(&mut out, code, REP_ERR_UNSUP, msg.as_bytes());
            }
        }
    }
}
