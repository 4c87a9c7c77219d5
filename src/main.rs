//! `weir`: serves Weir over the Postgres wire protocol.

use std::path::PathBuf;

use clap::Parser;
use weir::server::{Server, ServerConfig};

#[derive(Debug, Parser)]
#[command(
    name = "weir",
    version,
    about = "A streaming SQL engine server speaking the Postgres wire protocol"
)]
struct Args {
    /// Address to listen on for Postgres clients.
    #[arg(long, env = "WEIR_LISTEN", default_value = "127.0.0.1:5433")]
    listen: String,
    /// Directory holding the catalog and table data.
    #[arg(long, env = "WEIR_DATA_DIR", default_value = "./weir-data")]
    data_dir: PathBuf,
    /// Require this password (SCRAM-SHA-256) from every client.
    #[arg(long, env = "WEIR_PASSWORD", hide_env_values = true)]
    password: Option<String>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_target(false)
        .init();
    let args = Args::parse();
    let server = Server::start(ServerConfig {
        listen: args.listen,
        data_dir: args.data_dir.clone(),
        password: args.password,
    })
    .await?;
    tracing::info!(
        "weir listening on {} (data in {})",
        server.local_addr(),
        args.data_dir.display()
    );
    shutdown_signal().await;
    tracing::info!("shutting down");
    server.shutdown().await
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("installing the SIGTERM handler");
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}
