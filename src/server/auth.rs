//! Start-up and authentication: trust (no password configured) or SCRAM-SHA-256.

use std::fmt::Debug;
use std::sync::Arc;

use async_trait::async_trait;
use futures::{Sink, SinkExt};
use pgwire::api::auth::noop::NoopStartupHandler;
use pgwire::api::auth::sasl::scram::{gen_salted_password, ScramAuth};
use pgwire::api::auth::sasl::SASLAuthStartupHandler;
use pgwire::api::auth::{AuthSource, LoginInfo, Password, StartupHandler};
use pgwire::api::{ClientInfo, ConnectionManager};
use pgwire::error::{PgWireError, PgWireResult};
use pgwire::messages::startup::ParameterStatus;
use pgwire::messages::{PgWireBackendMessage, PgWireFrontendMessage};

use super::params::{server_parameters, ServerParameters};

const SCRAM_ITERATIONS: usize = 4096;

/// Makes the start-up handler of each connection.
pub struct Authenticator {
    password: Option<Arc<OnePassword>>,
    connections: Arc<ConnectionManager>,
}

impl Authenticator {
    pub fn new(password: Option<&str>, connections: Arc<ConnectionManager>) -> Self {
        Self {
            password: password.map(|p| Arc::new(OnePassword::new(p))),
            connections,
        }
    }

    /// A handler for one connection: pgwire's SASL handler keeps the exchange's state
    /// in itself, so sharing one between connections would mix their handshakes.
    pub fn startup(&self) -> Startup {
        match &self.password {
            None => Startup::Trust(TrustStartup {
                connections: self.connections.clone(),
            }),
            Some(password) => {
                let mut scram = ScramAuth::new(password.clone());
                scram.set_iterations(SCRAM_ITERATIONS);
                Startup::Scram(
                    SASLAuthStartupHandler::new(Arc::new(ServerParameters))
                        .with_scram(scram)
                        .with_connection_manager(self.connections.clone()),
                )
            }
        }
    }
}

pub enum Startup {
    Trust(TrustStartup),
    Scram(SASLAuthStartupHandler<ServerParameters>),
}

#[async_trait]
impl StartupHandler for Startup {
    async fn on_startup<C>(
        &self,
        client: &mut C,
        message: PgWireFrontendMessage,
    ) -> PgWireResult<()>
    where
        C: ClientInfo + Sink<PgWireBackendMessage> + Unpin + Send + Sync,
        C::Error: Debug,
        PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
    {
        match self {
            Startup::Trust(h) => h.on_startup(client, message).await,
            Startup::Scram(h) => h.on_startup(client, message).await,
        }
    }
}

/// Accepts every user: for a server on loopback with no password configured.
pub struct TrustStartup {
    connections: Arc<ConnectionManager>,
}

#[async_trait]
impl NoopStartupHandler for TrustStartup {
    fn connection_manager(&self) -> Option<Arc<ConnectionManager>> {
        Some(self.connections.clone())
    }

    /// pgwire's trust path announces its own defaults; restate Weir's, which win.
    async fn post_startup<C>(
        &self,
        client: &mut C,
        _message: PgWireFrontendMessage,
    ) -> PgWireResult<()>
    where
        C: ClientInfo + Sink<PgWireBackendMessage> + Unpin + Send,
        C::Error: Debug,
        PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
    {
        for (name, value) in server_parameters(client) {
            client
                .feed(PgWireBackendMessage::ParameterStatus(ParameterStatus::new(
                    name, value,
                )))
                .await?;
        }
        Ok(())
    }
}

/// The one server password, salted once at start-up; any user name may use it.
#[derive(Debug)]
struct OnePassword {
    salt: Vec<u8>,
    salted: Vec<u8>,
}

impl OnePassword {
    fn new(password: &str) -> Self {
        let salt: [u8; 16] = rand::random();
        Self {
            salted: gen_salted_password(password, &salt, SCRAM_ITERATIONS),
            salt: salt.to_vec(),
        }
    }
}

#[async_trait]
impl AuthSource for OnePassword {
    async fn get_password(&self, _login: &LoginInfo) -> PgWireResult<Password> {
        Ok(Password::new(Some(self.salt.clone()), self.salted.clone()))
    }
}
