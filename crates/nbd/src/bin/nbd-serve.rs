//! `nbd-serve`: serve files or block devices over NBD until SIGTERM or Ctrl-C.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use clap::Parser;

/// Serve files or block devices over NBD (fixed newstyle) until SIGTERM.
#[derive(Debug, Parser)]
#[command(name = "nbd-serve", version)]
struct Args {
    /// Address to listen on, e.g. 127.0.0.1:10809 (port 0 picks a free port).
    #[arg(long)]
    listen: String,
    /// Serve every export read-only.
    #[arg(long)]
    read_only: bool,
    /// Connections allowed per export (default: no limit).
    #[arg(long)]
    max_connections: Option<usize>,
    /// Requests executed at once per connection, one I/O thread each. Fewer threads avoid contention
    /// on a file's lock (tmpfs, page cache); more help devices with deep queues.
    #[arg(long, default_value_t = nbd::ServerConfig::default().max_in_flight)]
    threads_per_connection: usize,
    /// Exports as NAME=PATH (a regular file or a block device).
    #[arg(required = true, value_name = "NAME=PATH")]
    exports: Vec<String>,
}

fn parse_export(s: &str) -> anyhow::Result<(String, PathBuf)> {
    let (name, path) = s
        .split_once('=')
        .with_context(|| format!("export {s:?} is not NAME=PATH"))?;
    anyhow::ensure!(!path.is_empty(), "export {s:?} has an empty PATH");
    Ok((name.to_string(), PathBuf::from(path)))
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    anyhow::ensure!(
        args.threads_per_connection > 0,
        "--threads-per-connection must be at least 1"
    );
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?
        .block_on(run(args))
}

async fn run(args: Args) -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
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
                description: Some(path.display().to_string()),
            })
            .with_context(|| format!("cannot add export {name:?}"))?;
    }
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
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("cannot install the SIGTERM handler")?;
    let shutdown = async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
    };
    let cfg = nbd::ServerConfig {
        max_in_flight: args.threads_per_connection,
        ..nbd::ServerConfig::default()
    };
    let server = nbd::Server::new(registry, cfg);
    server.serve(listener, shutdown).await?;
    Ok(())
}
