//! `nbd-serve`: serve files or block devices over NBD until SIGTERM, SIGINT or SIGHUP.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use clap::Parser;
use tokio::signal::unix::{signal, SignalKind};

/// Serve files or block devices over NBD (fixed newstyle) until SIGTERM, SIGINT or SIGHUP (each stops it cleanly).
#[derive(Debug, Parser)]
#[command(name = "nbd-serve", version)]
struct Args {
    /// Address to listen on, e.g. 127.0.0.1:10809 (port 0 picks a free port).
    #[arg(long)]
    listen: String,
    /// Serve every export read-only.
    #[arg(long)]
    read_only: bool,
    /// Connections open at once to each export (default: no limit; the server as a whole takes 512).
    #[arg(long)]
    max_connections: Option<usize>,
    /// Connections allowed from one client IP address.
    #[arg(long, default_value_t = nbd::ServerConfig::default().max_connections_per_client)]
    max_connections_per_client: usize,
    /// Requests of one connection read and not yet answered.
    #[arg(long, default_value_t = nbd::ServerConfig::default().max_in_flight)]
    max_in_flight: usize,
    /// MiB of request data (WRITE payloads, READ replies) held at once over all connections; when spent,
    /// no further requests are read until replies drain. At least 32.
    #[arg(long, default_value_t = nbd::ServerConfig::default().in_flight_budget >> 20)]
    budget_mib: usize,
    /// MiB of request data one connection may hold. At least 32.
    #[arg(long, default_value_t = nbd::ServerConfig::default().max_connection_bytes >> 20)]
    connection_mib: usize,
    /// Blocking I/O calls (flush, zero, large or uncached I/O) running at once.
    #[arg(long, default_value_t = nbd::ServerConfig::default().io_threads)]
    io_threads: usize,
    /// Close a negotiated session after SECS without requests (0: never).
    #[arg(long, value_name = "SECS", default_value_t = 0)]
    idle_timeout: u64,
    /// TLS: off, on (offered) or require (nothing but STARTTLS before the handshake).
    #[arg(long, value_enum, default_value_t = TlsFlag::Off)]
    tls: TlsFlag,
    /// Directory with server-cert.pem, server-key.pem and (for --tls-verify-peer) ca-cert.pem.
    #[arg(long, value_name = "DIR")]
    tls_certificates: Option<PathBuf>,
    /// Require client certificates signed by DIR/ca-cert.pem.
    #[arg(long)]
    tls_verify_peer: bool,
    /// Restrict export NAME to clients whose verified certificate names IDENTITY (common name or subject
    /// alternative name); repeat for more. Other clients neither list nor open it.
    #[arg(long = "allow", value_name = "NAME=IDENTITY")]
    allow: Vec<String>,
    /// Exports as NAME=PATH (a regular file or a block device).
    #[arg(required = true, value_name = "NAME=PATH")]
    exports: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum TlsFlag {
    Off,
    On,
    Require,
}

fn parse_export(s: &str) -> anyhow::Result<(String, PathBuf)> {
    let (name, path) = s
        .split_once('=')
        .with_context(|| format!("export {s:?} is not NAME=PATH"))?;
    anyhow::ensure!(!path.is_empty(), "export {s:?} has an empty PATH");
    Ok((name.to_string(), PathBuf::from(path)))
}

/// Checks the bounds the flags set before anything is opened or bound, naming the flag, its value and what
/// is allowed (the server's own check names its settings, in bytes).
fn check_bounds(args: &Args) -> anyhow::Result<()> {
    let min_mib = (nbd::proto::BLOCK_MAX >> 20) as usize;
    let max_mib = tokio::sync::Semaphore::MAX_PERMITS >> 20;
    for (flag, v) in [
        ("--budget-mib", args.budget_mib),
        ("--connection-mib", args.connection_mib),
    ] {
        anyhow::ensure!(
            (min_mib..=max_mib).contains(&v),
            "{flag} {v} is out of bounds: it must be at least {min_mib} (MiB: one largest NBD request) and at \
             most {max_mib}"
        );
    }
    for (flag, v) in [
        ("--max-connections", args.max_connections.unwrap_or(1)),
        (
            "--max-connections-per-client",
            args.max_connections_per_client,
        ),
        ("--max-in-flight", args.max_in_flight),
        ("--io-threads", args.io_threads),
    ] {
        anyhow::ensure!(v >= 1, "{flag} {v} is out of bounds: it must be at least 1");
    }
    Ok(())
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    let served = check_bounds(&args).and_then(|()| {
        tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .context("cannot start the async runtime")?
            .block_on(run(args))
    });
    match served {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // The whole chain on one line: what failed and why.
            eprintln!("nbd-serve: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(nbd::log_filter(
            std::env::var("RUST_LOG").ok().as_deref(),
            "warn",
        )))
        .with_ansi(nbd::log_colour())
        .with_writer(|| nbd::LossyStderr)
        .init();
    let tls = match (args.tls, &args.tls_certificates) {
        (TlsFlag::Off, _) => nbd::Tls::Off,
        (_, None) => anyhow::bail!("--tls=on and --tls=require need --tls-certificates=DIR"),
        (mode, Some(dir)) => {
            let settings = std::sync::Arc::new(
                nbd::TlsSettings::from_dir(dir, args.tls_verify_peer).with_context(|| {
                    format!("cannot load TLS certificates from {}", dir.display())
                })?,
            );
            if mode == TlsFlag::Require {
                nbd::Tls::Require(settings)
            } else {
                nbd::Tls::On(settings)
            }
        }
    };
    anyhow::ensure!(
        !args.tls_verify_peer || args.tls != TlsFlag::Off,
        "--tls-verify-peer needs --tls=on or --tls=require"
    );
    anyhow::ensure!(
        args.allow.is_empty() || args.tls_verify_peer,
        "--allow needs --tls-verify-peer: without verified client certificates no client has an \
         identity, and the export could be opened by nobody"
    );
    let mut allowed: std::collections::HashMap<String, Vec<String>> = Default::default();
    for spec in &args.allow {
        let (name, id) = spec
            .split_once('=')
            .with_context(|| format!("--allow {spec:?} is not NAME=IDENTITY"))?;
        allowed
            .entry(name.to_string())
            .or_default()
            .push(id.to_string());
    }
    let registry = nbd::Registry::new();
    for spec in &args.exports {
        let (name, path) = parse_export(spec)?;
        let backend = nbd::FileBackend::open(&path, args.read_only)
            .with_context(|| format!("cannot serve {}", path.display()))?;
        registry
            .add(nbd::ExportConfig {
                name: name.clone(),
                backend: Arc::new(backend),
                read_only: args.read_only,
                max_connections: args.max_connections,
                // The server's own paths are not the clients' business (nbdkit and qemu-nbd send none).
                description: None,
                access: match allowed.remove(&name) {
                    Some(ids) => nbd::Access::Clients(ids),
                    None => nbd::Access::Anyone,
                },
            })
            .with_context(|| format!("cannot add export {name:?}"))?;
    }
    if let Some(name) = allowed.keys().next() {
        anyhow::bail!("--allow names export {name:?}, which is not served");
    }
    let cfg = nbd::ServerConfig {
        max_connections_per_client: args.max_connections_per_client,
        max_in_flight: args.max_in_flight,
        in_flight_budget: args.budget_mib << 20,
        max_connection_bytes: args.connection_mib << 20,
        io_threads: args.io_threads,
        idle_timeout: (args.idle_timeout > 0)
            .then(|| std::time::Duration::from_secs(args.idle_timeout)),
        tls,
        ..nbd::ServerConfig::default()
    };
    // Checked before the listener is bound: a refused setting never prints `listening on`.
    let server = nbd::Server::try_new(registry, cfg).context("invalid server settings")?;
    // SIGTERM, SIGINT and SIGHUP each stop the server cleanly (as nbdkit's quit signals do); installed
    // before `listening on` is printed, so a signal sent once it is never kills the process instead.
    let handler = |kind: SignalKind, name: &str| {
        signal(kind).with_context(|| format!("cannot install the {name} handler"))
    };
    let mut term = handler(SignalKind::terminate(), "SIGTERM")?;
    let mut int = handler(SignalKind::interrupt(), "SIGINT")?;
    let mut hup = handler(SignalKind::hangup(), "SIGHUP")?;
    let listener = tokio::net::TcpListener::bind(&args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    let addr = listener.local_addr()?;
    {
        use std::io::Write;
        let mut out = std::io::stdout().lock();
        writeln!(out, "listening on {addr}")?;
        out.flush()?;
    }
    let shutdown = async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
            _ = hup.recv() => {}
        }
    };
    server.serve(listener, shutdown).await?;
    Ok(())
}
