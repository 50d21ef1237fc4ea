//! systemd readiness notification (`sd_notify`): `READY=1`, `STOPPING=1` and `STATUS=` datagrams to
//! `$NOTIFY_SOCKET`, when the service runs under `Type=notify`. Does nothing otherwise.

use std::io;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};

/// Sends `state` (newline-separated `KEY=VALUE` lines) to the service manager; `Ok(false)` when not
/// running under one.
pub fn notify(state: &str) -> io::Result<bool> {
    notify_to(std::env::var_os("NOTIFY_SOCKET"), state)
}

/// [`notify`] to the socket `$NOTIFY_SOCKET` names (a path, or `@` and an abstract name).
fn notify_to(socket: Option<std::ffi::OsString>, state: &str) -> io::Result<bool> {
    let Some(path) = socket else {
        return Ok(false);
    };
    let path = path.to_string_lossy().into_owned();
    let addr = match path.strip_prefix('@') {
        Some(abstract_name) => SocketAddr::from_abstract_name(abstract_name.as_bytes())?,
        None => SocketAddr::from_pathname(&path)?,
    };
    let sock = UnixDatagram::unbound()?;
    sock.send_to_addr(state.as_bytes(), &addr)?;
    Ok(true)
}

/// Tells the service manager the daemon is ready, with a status line.
pub fn ready(status: &str) {
    if let Err(e) = notify(&format!("READY=1\nSTATUS={status}")) {
        tracing::warn!(error = %e, "cannot send the readiness notification to systemd");
    }
}

/// Tells the service manager what the daemon is doing (`STATUS=`, shown by `systemctl status`).
pub fn status(status: &str) {
    if let Err(e) = notify(&format!("STATUS={status}")) {
        tracing::warn!(error = %e, "cannot send a status line to systemd");
    }
}

/// Tells the service manager the daemon is stopping.
pub fn stopping() {
    if let Err(e) = notify("STOPPING=1") {
        tracing::warn!(error = %e, "cannot send the stopping notification to systemd");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sends_ready_to_the_notify_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify.sock");
        let server = UnixDatagram::bind(&path).unwrap();
        // The socket is passed in, not set in the environment: changing the environment while other
        // tests' threads read it is undefined behaviour in C's getenv.
        assert!(notify_to(Some(path.into_os_string()), "READY=1\nSTATUS=test").unwrap());
        assert!(!notify_to(None, "READY=1").unwrap());
        let mut buf = [0u8; 64];
        let n = server.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1\nSTATUS=test");
    }
}
