//! A small asynchronous NBD client for tests and tools: fixed-newstyle negotiation (LIST, INFO, GO,
//! EXPORT_NAME, STRUCTURED_REPLY, SET_META_CONTEXT), the usual commands, and raw frames for edge cases,
//! over TCP or any other byte stream (a Unix socket, a TLS session the caller set up).

use std::collections::HashMap;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader, BufWriter};
use tokio::net::{TcpStream, ToSocketAddrs};

use crate::error::NbdError;
use crate::proto::*;

/// One option reply frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OptionReply {
    pub option: u32,
    pub reply: u32,
    pub data: Vec<u8>,
}

/// What INFO or GO told about an export.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExportInfo {
    pub size: u64,
    pub flags: u16,
    pub name: Option<String>,
    pub description: Option<String>,
    /// (minimum, preferred, maximum)
    pub block_size: Option<(u32, u32, u32)>,
}

/// The receiving half of the connection.
type Rd = BufReader<Box<dyn AsyncRead + Send + Unpin>>;
/// The sending half of the connection.
type Wr = BufWriter<Box<dyn AsyncWrite + Send + Unpin>>;

/// A client in the negotiation phase.
pub struct Handshake {
    rd: Rd,
    wr: Wr,
    /// Handshake flags the server sent.
    pub server_flags: u16,
    structured: bool,
}

fn remote(code: u32, what: impl Into<String>) -> NbdError {
    NbdError::Remote {
        code,
        what: what.into(),
    }
}

impl Handshake {
    /// Connects and reads the greeting; replies with fixed-newstyle and no-zeroes.
    pub async fn connect(addr: impl ToSocketAddrs) -> Result<Self, NbdError> {
        let s = TcpStream::connect(addr).await?;
        s.set_nodelay(true)?;
        let (rd, wr) = s.into_split();
        Self::greeted(Box::new(rd), Box::new(wr)).await
    }

    /// Like [`Handshake::connect`], over a stream already connected to the server (nothing read yet).
    pub async fn over<S>(stream: S) -> Result<Self, NbdError>
    where
        S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    {
        let (rd, wr) = tokio::io::split(stream);
        Self::greeted(Box::new(rd), Box::new(wr)).await
    }

    /// Negotiation goes on over `stream`, a session that began after the server's greeting, which said
    /// `server_flags` (a TLS session after `NBD_OPT_STARTTLS`).
    pub fn resume<S>(stream: S, server_flags: u16) -> Self
    where
        S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    {
        let (rd, wr) = tokio::io::split(stream);
        Self::from_halves(Box::new(rd), Box::new(wr), server_flags)
    }

    fn from_halves(
        rd: Box<dyn AsyncRead + Send + Unpin>,
        wr: Box<dyn AsyncWrite + Send + Unpin>,
        server_flags: u16,
    ) -> Self {
        Handshake {
            rd: BufReader::with_capacity(256 * 1024, rd),
            wr: BufWriter::with_capacity(256 * 1024, wr),
            server_flags,
            structured: false,
        }
    }

    async fn greeted(
        rd: Box<dyn AsyncRead + Send + Unpin>,
        wr: Box<dyn AsyncWrite + Send + Unpin>,
    ) -> Result<Self, NbdError> {
        let mut h = Self::from_halves(rd, wr, 0);
        let m1 = h.rd.read_u64().await?;
        let m2 = h.rd.read_u64().await?;
        if m1 != NBDMAGIC || m2 != IHAVEOPT {
            return Err(NbdError::Protocol(
                "server greeting is not fixed newstyle".into(),
            ));
        }
        h.server_flags = h.rd.read_u16().await?;
        h.wr.write_u32(CLIENT_FIXED_NEWSTYLE | CLIENT_NO_ZEROES)
            .await?;
        h.wr.flush().await?;
        Ok(h)
    }

    /// Sends one option frame.
    pub async fn send_option(&mut self, option: u32, data: &[u8]) -> Result<(), NbdError> {
        self.wr.write_u64(IHAVEOPT).await?;
        self.wr.write_u32(option).await?;
        self.wr.write_u32(data.len() as u32).await?;
        self.wr.write_all(data).await?;
        self.wr.flush().await?;
        Ok(())
    }

    /// Writes raw bytes (for malformed frames).
    pub async fn send_raw(&mut self, bytes: &[u8]) -> Result<(), NbdError> {
        self.wr.write_all(bytes).await?;
        self.wr.flush().await?;
        Ok(())
    }

    /// Reads one option reply frame.
    pub async fn read_option_reply(&mut self) -> Result<OptionReply, NbdError> {
        let magic = self.rd.read_u64().await?;
        if magic != OPT_REPLY_MAGIC {
            return Err(NbdError::Protocol(format!("option reply magic {magic:#x}")));
        }
        let option = self.rd.read_u32().await?;
        let reply = self.rd.read_u32().await?;
        let len = self.rd.read_u32().await?;
        let mut data = vec![0u8; len as usize];
        self.rd.read_exact(&mut data).await?;
        Ok(OptionReply {
            option,
            reply,
            data,
        })
    }

    async fn expect_ack(&mut self) -> Result<(), NbdError> {
        let r = self.read_option_reply().await?;
        if r.reply == REP_ACK {
            Ok(())
        } else {
            Err(remote(r.reply, String::from_utf8_lossy(&r.data)))
        }
    }

    /// Negotiates structured replies.
    pub async fn structured_replies(&mut self) -> Result<(), NbdError> {
        self.send_option(OPT_STRUCTURED_REPLY, &[]).await?;
        self.expect_ack().await?;
        self.structured = true;
        Ok(())
    }

    /// Lists export names.
    pub async fn list(&mut self) -> Result<Vec<String>, NbdError> {
        self.send_option(OPT_LIST, &[]).await?;
        let mut names = Vec::new();
        loop {
            let r = self.read_option_reply().await?;
            match r.reply {
                REP_ACK => return Ok(names),
                REP_SERVER => {
                    let n = r
                        .data
                        .get(..4)
                        .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize)
                        .ok_or_else(|| NbdError::Protocol("short SERVER reply".into()))?;
                    let name = r
                        .data
                        .get(4..4 + n)
                        .ok_or_else(|| NbdError::Protocol("short SERVER reply".into()))?;
                    names.push(String::from_utf8_lossy(name).into_owned());
                }
                other => return Err(remote(other, String::from_utf8_lossy(&r.data))),
            }
        }
    }

    /// Selects metadata contexts for `export`; returns the (id, name) pairs granted.
    pub async fn set_meta_context(
        &mut self,
        export: &str,
        queries: &[&str],
    ) -> Result<Vec<(u32, String)>, NbdError> {
        self.meta_context(OPT_SET_META_CONTEXT, export, queries)
            .await
    }

    /// Lists metadata contexts matching `queries` for `export`.
    pub async fn list_meta_context(
        &mut self,
        export: &str,
        queries: &[&str],
    ) -> Result<Vec<(u32, String)>, NbdError> {
        self.meta_context(OPT_LIST_META_CONTEXT, export, queries)
            .await
    }

    async fn meta_context(
        &mut self,
        option: u32,
        export: &str,
        queries: &[&str],
    ) -> Result<Vec<(u32, String)>, NbdError> {
        let mut d = (export.len() as u32).to_be_bytes().to_vec();
        d.extend_from_slice(export.as_bytes());
        d.extend_from_slice(&(queries.len() as u32).to_be_bytes());
        for q in queries {
            d.extend_from_slice(&(q.len() as u32).to_be_bytes());
            d.extend_from_slice(q.as_bytes());
        }
        self.send_option(option, &d).await?;
        let mut out = Vec::new();
        loop {
            let r = self.read_option_reply().await?;
            match r.reply {
                REP_ACK => return Ok(out),
                REP_META_CONTEXT if r.data.len() >= 4 => {
                    let id = u32::from_be_bytes([r.data[0], r.data[1], r.data[2], r.data[3]]);
                    out.push((id, String::from_utf8_lossy(&r.data[4..]).into_owned()));
                }
                other => return Err(remote(other, String::from_utf8_lossy(&r.data))),
            }
        }
    }

    async fn info_or_go(&mut self, option: u32, export: &str) -> Result<ExportInfo, NbdError> {
        let mut d = (export.len() as u32).to_be_bytes().to_vec();
        d.extend_from_slice(export.as_bytes());
        let wanted = [INFO_NAME, INFO_DESCRIPTION, INFO_BLOCK_SIZE];
        d.extend_from_slice(&(wanted.len() as u16).to_be_bytes());
        for w in wanted {
            d.extend_from_slice(&w.to_be_bytes());
        }
        self.send_option(option, &d).await?;
        let mut info = ExportInfo::default();
        loop {
            let r = self.read_option_reply().await?;
            match r.reply {
                REP_ACK => return Ok(info),
                REP_INFO if r.data.len() >= 2 => {
                    let t = u16::from_be_bytes([r.data[0], r.data[1]]);
                    let b = &r.data[2..];
                    match t {
                        INFO_EXPORT if b.len() == 10 => {
                            info.size = u64::from_be_bytes(b[..8].try_into().expect("8 bytes"));
                            info.flags = u16::from_be_bytes([b[8], b[9]]);
                        }
                        INFO_NAME => info.name = Some(String::from_utf8_lossy(b).into_owned()),
                        INFO_DESCRIPTION => {
                            info.description = Some(String::from_utf8_lossy(b).into_owned())
                        }
                        INFO_BLOCK_SIZE if b.len() == 12 => {
                            let u = |i: usize| {
                                u32::from_be_bytes(b[i..i + 4].try_into().expect("4 bytes"))
                            };
                            info.block_size = Some((u(0), u(4), u(8)));
                        }
                        _ => {}
                    }
                }
                other => return Err(remote(other, String::from_utf8_lossy(&r.data))),
            }
        }
    }

    /// Asks about an export without entering transmission.
    pub async fn info(&mut self, export: &str) -> Result<ExportInfo, NbdError> {
        self.info_or_go(OPT_INFO, export).await
    }

    /// Enters transmission on `export` with GO.
    pub async fn go(mut self, export: &str) -> Result<Client, NbdError> {
        let info = self.info_or_go(OPT_GO, export).await?;
        Ok(Client::new(self, info))
    }

    /// Enters transmission on `export` with the old EXPORT_NAME option.
    pub async fn export_name(mut self, export: &str) -> Result<Client, NbdError> {
        self.wr.write_u64(IHAVEOPT).await?;
        self.wr.write_u32(OPT_EXPORT_NAME).await?;
        self.wr.write_u32(export.len() as u32).await?;
        self.wr.write_all(export.as_bytes()).await?;
        self.wr.flush().await?;
        let size = self.rd.read_u64().await?;
        let flags = self.rd.read_u16().await?;
        let info = ExportInfo {
            size,
            flags,
            ..ExportInfo::default()
        };
        Ok(Client::new(self, info))
    }

    /// Sends ABORT and waits for the server's acknowledgement.
    pub async fn abort(mut self) -> Result<(), NbdError> {
        self.send_option(OPT_ABORT, &[]).await?;
        self.expect_ack().await
    }

    /// Reads until the server closes the connection; returns how many bytes arrived meanwhile.
    pub async fn read_to_close(&mut self) -> Result<usize, NbdError> {
        let mut sink = Vec::new();
        Ok(self.rd.read_to_end(&mut sink).await?)
    }
}

/// A reply to one request.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Reply {
    pub cookie: u64,
    /// 0 on success, else the protocol error value.
    pub error: u32,
    /// Read data (for READ), assembled from all chunks.
    pub data: Vec<u8>,
    /// Block-status descriptors (length, flags).
    pub extents: Vec<(u32, u32)>,
}

/// A client in the transmission phase.
pub struct Client {
    rd: Rd,
    wr: Wr,
    /// What negotiation told about the export.
    pub info: ExportInfo,
    structured: bool,
    next_cookie: u64,
    /// Outstanding requests: cookie -> (command, offset, length).
    pending: HashMap<u64, (u16, u64, u32)>,
}

impl std::fmt::Debug for Handshake {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Handshake")
            .field("server_flags", &self.server_flags)
            .field("structured", &self.structured)
            .finish_non_exhaustive()
    }
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("info", &self.info)
            .field("structured", &self.structured)
            .field("pending", &self.pending.len())
            .finish_non_exhaustive()
    }
}

impl Client {
    fn new(h: Handshake, info: ExportInfo) -> Self {
        Client {
            rd: h.rd,
            wr: h.wr,
            info,
            structured: h.structured,
            next_cookie: 1,
            pending: HashMap::new(),
        }
    }

    /// Export size.
    pub fn size(&self) -> u64 {
        self.info.size
    }

    /// Sends a request (and payload) without waiting; returns its cookie.
    pub async fn send(
        &mut self,
        command: u16,
        flags: u16,
        offset: u64,
        length: u32,
        payload: &[u8],
    ) -> Result<u64, NbdError> {
        let cookie = self.next_cookie;
        self.next_cookie += 1;
        let req = Request {
            flags,
            command,
            cookie,
            offset,
            length,
        };
        self.wr.write_all(&req.encode()).await?;
        self.wr.write_all(payload).await?;
        self.wr.flush().await?;
        self.pending.insert(cookie, (command, offset, length));
        Ok(cookie)
    }

    /// Writes raw bytes on the socket.
    pub async fn send_raw(&mut self, bytes: &[u8]) -> Result<(), NbdError> {
        self.wr.write_all(bytes).await?;
        self.wr.flush().await?;
        Ok(())
    }

    /// Receives the next complete reply (all chunks of a structured reply).
    pub async fn recv(&mut self) -> Result<Reply, NbdError> {
        let mut acc: HashMap<u64, Reply> = HashMap::new();
        loop {
            let magic = self.rd.read_u32().await?;
            match magic {
                SIMPLE_REPLY_MAGIC => {
                    let error = self.rd.read_u32().await?;
                    let cookie = self.rd.read_u64().await?;
                    let (cmd, _, len) = self
                        .pending
                        .remove(&cookie)
                        .ok_or_else(|| NbdError::Protocol(format!("unknown cookie {cookie}")))?;
                    let mut data = Vec::new();
                    if error == 0 && cmd == CMD_READ {
                        data = vec![0u8; len as usize];
                        self.rd.read_exact(&mut data).await?;
                    }
                    return Ok(Reply {
                        cookie,
                        error,
                        data,
                        extents: Vec::new(),
                    });
                }
                STRUCTURED_REPLY_MAGIC => {
                    let flags = self.rd.read_u16().await?;
                    let kind = self.rd.read_u16().await?;
                    let cookie = self.rd.read_u64().await?;
                    let len = self.rd.read_u32().await? as usize;
                    let &(_, req_off, req_len) = self
                        .pending
                        .get(&cookie)
                        .ok_or_else(|| NbdError::Protocol(format!("unknown cookie {cookie}")))?;
                    let mut body = vec![0u8; len];
                    self.rd.read_exact(&mut body).await?;
                    let r = acc.entry(cookie).or_insert_with(|| Reply {
                        cookie,
                        ..Reply::default()
                    });
                    match kind {
                        REPLY_TYPE_OFFSET_DATA | REPLY_TYPE_OFFSET_HOLE if len >= 8 => {
                            let off = u64::from_be_bytes(body[..8].try_into().expect("8 bytes"));
                            let rel = off
                                .checked_sub(req_off)
                                .filter(|&r| r <= u64::from(req_len))
                                .ok_or_else(|| {
                                    NbdError::Protocol("chunk offset out of range".into())
                                })? as usize;
                            if r.data.len() < req_len as usize {
                                r.data.resize(req_len as usize, 0);
                            }
                            if kind == REPLY_TYPE_OFFSET_DATA {
                                let d = &body[8..];
                                r.data
                                    .get_mut(rel..rel + d.len())
                                    .ok_or_else(|| NbdError::Protocol("chunk past request".into()))?
                                    .copy_from_slice(d);
                            }
                        }
                        REPLY_TYPE_BLOCK_STATUS if len >= 4 => {
                            for d in body[4..].chunks_exact(8) {
                                r.extents.push((
                                    u32::from_be_bytes(d[..4].try_into().expect("4 bytes")),
                                    u32::from_be_bytes(d[4..].try_into().expect("4 bytes")),
                                ));
                            }
                        }
                        REPLY_TYPE_ERROR | REPLY_TYPE_ERROR_OFFSET if len >= 4 => {
                            r.error = u32::from_be_bytes(body[..4].try_into().expect("4 bytes"));
                        }
                        REPLY_TYPE_NONE => {}
                        other => {
                            return Err(NbdError::Protocol(format!("unknown chunk type {other}")))
                        }
                    }
                    if flags & REPLY_FLAG_DONE != 0 {
                        self.pending.remove(&cookie);
                        return Ok(acc.remove(&cookie).expect("entry inserted above"));
                    }
                }
                other => return Err(NbdError::Protocol(format!("reply magic {other:#x}"))),
            }
        }
    }

    async fn call(
        &mut self,
        command: u16,
        flags: u16,
        offset: u64,
        length: u32,
        payload: &[u8],
    ) -> Result<Reply, NbdError> {
        let cookie = self.send(command, flags, offset, length, payload).await?;
        let r = self.recv().await?;
        if r.cookie != cookie {
            return Err(NbdError::Protocol("reply for another request".into()));
        }
        if r.error != 0 {
            return Err(remote(r.error, error_name(r.error)));
        }
        Ok(r)
    }

    /// Reads `len` bytes at `offset`.
    pub async fn read(&mut self, offset: u64, len: u32) -> Result<Vec<u8>, NbdError> {
        Ok(self.call(CMD_READ, 0, offset, len, &[]).await?.data)
    }

    /// Writes `data` at `offset` with command flags (e.g. FUA).
    pub async fn write(&mut self, offset: u64, data: &[u8], flags: u16) -> Result<(), NbdError> {
        let len = u32::try_from(data.len())
            .map_err(|_| NbdError::Invalid("write larger than 4 GiB".into()))?;
        self.call(CMD_WRITE, flags, offset, len, data)
            .await
            .map(drop)
    }

    /// Flushes.
    pub async fn flush(&mut self) -> Result<(), NbdError> {
        self.call(CMD_FLUSH, 0, 0, 0, &[]).await.map(drop)
    }

    /// Trims.
    pub async fn trim(&mut self, offset: u64, len: u32, flags: u16) -> Result<(), NbdError> {
        self.call(CMD_TRIM, flags, offset, len, &[]).await.map(drop)
    }

    /// Writes zeros (flags: NO_HOLE, FAST_ZERO, FUA).
    pub async fn zero(&mut self, offset: u64, len: u32, flags: u16) -> Result<(), NbdError> {
        self.call(CMD_WRITE_ZEROES, flags, offset, len, &[])
            .await
            .map(drop)
    }

    /// Asks for `base:allocation` extents (requires structured replies and the context set).
    pub async fn block_status(
        &mut self,
        offset: u64,
        len: u32,
        flags: u16,
    ) -> Result<Vec<(u32, u32)>, NbdError> {
        Ok(self
            .call(CMD_BLOCK_STATUS, flags, offset, len, &[])
            .await?
            .extents)
    }

    /// Sends DISC and waits for the server to close the connection.
    pub async fn disconnect(mut self) -> Result<(), NbdError> {
        let _ = self.send(CMD_DISC, 0, 0, 0, &[]).await?;
        let mut sink = Vec::new();
        self.rd.read_to_end(&mut sink).await?;
        Ok(())
    }

    /// Whether structured replies are on.
    pub fn structured(&self) -> bool {
        self.structured
    }
}

impl NbdError {
    /// The protocol error value when the server refused a request or an option.
    pub fn remote_code(&self) -> Option<u32> {
        match self {
            NbdError::Remote { code, .. } => Some(*code),
            _ => None,
        }
    }
}
