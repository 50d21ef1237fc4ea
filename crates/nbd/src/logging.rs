//! How the programs of the workspace log to standard error: the filter, colour only on a terminal, and a
//! writer that never fails the thread that logs.

/// A log filter for a program serving TLS: `wanted` (`RUST_LOG`) or else `default`, with the TLS library's
/// own warnings left out unless the filter names `rustls` itself. Those warnings say nothing an operator can
/// act on (one for every client that names the server by IP address, as libnbd and qemu do); refused
/// handshakes are logged by the server with their cause.
pub fn log_filter(wanted: Option<&str>, default: &str) -> String {
    let filter = wanted
        .map(str::trim)
        .filter(|w| !w.is_empty())
        .unwrap_or(default);
    if filter.contains("rustls") {
        filter.to_string()
    } else {
        format!("{filter},rustls=error")
    }
}

/// Whether a program's logs on standard error are coloured: only on a terminal, and never when `NO_COLOR`
/// is set to anything but the empty string (no-color.org). A file or the journal gets plain text.
pub fn log_colour() -> bool {
    colour_logs(
        std::io::IsTerminal::is_terminal(&std::io::stderr()),
        std::env::var_os("NO_COLOR").as_deref(),
    )
}

fn colour_logs(stderr_is_terminal: bool, no_color: Option<&std::ffi::OsStr>) -> bool {
    stderr_is_terminal && no_color.is_none_or(|v| v.is_empty())
}

/// Standard error as a log writer that never fails: a line that cannot be written (the disk of a file
/// standard error points at is full, the reader of its pipe is gone) is dropped. The logging library
/// reports a failed write with `eprintln!`, which panics when standard error fails, so a failing log
/// would otherwise panic whatever task logged (an operation half-way, a session).
/// `tracing_subscriber::fmt().with_writer(|| LossyStderr)`.
#[derive(Debug, Clone, Copy, Default)]
pub struct LossyStderr;

impl std::io::Write for LossyStderr {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let _ = std::io::stderr().lock().write_all(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        let _ = std::io::stderr().flush();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn logs_are_coloured_only_on_a_terminal_without_no_color() {
        use std::ffi::OsStr;
        assert!(colour_logs(true, None));
        assert!(colour_logs(true, Some(OsStr::new(""))));
        assert!(!colour_logs(true, Some(OsStr::new("1"))));
        assert!(!colour_logs(false, None));
    }

    #[test]
    fn the_log_filter_leaves_out_tls_library_warnings_unless_it_names_them() {
        assert_eq!(log_filter(None, "info"), "info,rustls=error");
        assert_eq!(log_filter(Some(""), "info"), "info,rustls=error");
        assert_eq!(log_filter(Some("debug"), "info"), "debug,rustls=error");
        assert_eq!(
            log_filter(Some("debug,rustls=debug"), "info"),
            "debug,rustls=debug"
        );
        assert_eq!(
            log_filter(Some("nbd=trace"), "warn"),
            "nbd=trace,rustls=error"
        );
    }
}
