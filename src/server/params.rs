//! The parameters a client is told at start-up (ParameterStatus).

use std::collections::HashMap;

use pgwire::api::auth::ServerParameterProvider;
use pgwire::api::ClientInfo;

use crate::sql::session;

pub struct ServerParameters;

impl ServerParameterProvider for ServerParameters {
    fn server_parameters<C: ClientInfo>(&self, client: &C) -> Option<HashMap<String, String>> {
        Some(server_parameters(client).into_iter().collect())
    }
}

/// Weir's values for every reported variable, honouring what the client asked for at
/// start-up (application_name, DateStyle, TimeZone, ...).
pub fn server_parameters<C: ClientInfo>(client: &C) -> Vec<(String, String)> {
    session::reported(client.metadata())
}
