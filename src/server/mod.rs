//! The Postgres wire endpoint: accepts connections and hands each to pgwire with
//! Weir's handlers.

mod auth;
mod handler;
mod params;
mod stream;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::sql::Engine;
use handler::Handlers;

#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Address to listen on; port 0 picks a free port.
    pub listen: String,
    pub data_dir: PathBuf,
    /// When set, clients authenticate with SCRAM-SHA-256 and this password.
    pub password: Option<String>,
}

/// A running server. Dropping it does not stop it; call [`Server::shutdown`].
pub struct Server {
    addr: SocketAddr,
    engine: Arc<Engine>,
    stop: watch::Sender<bool>,
    accept_loop: JoinHandle<()>,
}

impl Server {
    /// Opens the data directory, binds the address and starts accepting connections.
    pub async fn start(config: ServerConfig) -> anyhow::Result<Server> {
        crate::without_transparent_huge_pages();
        let engine = Engine::open(&config.data_dir)?;
        engine.resume().await;
        let listener = TcpListener::bind(&config.listen)
            .await
            .map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", config.listen))?;
        let addr = listener.local_addr()?;
        if config.password.is_none() && !addr.ip().is_loopback() {
            tracing::warn!(
                "listening on {addr} without a password: anyone who can reach it can connect; \
                 set --password"
            );
        }
        let handlers = Arc::new(Handlers::new(engine.clone(), config.password.as_deref()));
        let (stop, stopped) = watch::channel(false);
        let accept_loop = tokio::spawn(accept_connections(listener, handlers, stopped));
        Ok(Server {
            addr,
            engine,
            stop,
            accept_loop,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops accepting connections, closes open ones and makes everything durable.
    pub async fn shutdown(self) -> anyhow::Result<()> {
        let _ = self.stop.send(true);
        let _ = self.accept_loop.await;
        let engine = self.engine;
        engine.stop_jobs().await;
        tokio::task::spawn_blocking(move || engine.close()).await??;
        Ok(())
    }
}

async fn accept_connections(
    listener: TcpListener,
    handlers: Arc<Handlers>,
    mut stopped: watch::Receiver<bool>,
) {
    let mut connections = tokio::task::JoinSet::new();
    loop {
        tokio::select! {
            _ = stopped.changed() => break,
            accepted = listener.accept() => match accepted {
                Ok((socket, peer)) => {
                    let handlers = handlers.clone();
                    connections.spawn(async move {
                        let _ = socket.set_nodelay(true);
                        if let Err(e) = pgwire::tokio::process_socket(socket, None, handlers).await {
                            tracing::debug!("connection from {peer} ended: {e}");
                        }
                    });
                }
                Err(e) => {
                    tracing::warn!("accepting a connection failed: {e}");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
            },
            // Reap finished connections so the set does not grow without bound.
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
    connections.shutdown().await;
}
