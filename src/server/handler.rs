//! pgwire's query handlers over Weir's engine: the simple protocol (many statements per
//! message) and the extended one (Parse / Bind / Describe / Execute).

use std::collections::HashMap;
use std::fmt::Debug;
use std::sync::Arc;

use async_trait::async_trait;
use datafusion::arrow::datatypes::{DataType, SchemaRef};
use datafusion::arrow::record_batch::RecordBatch;
use datafusion::common::tree_node::{TreeNode, TreeNodeRecursion};
use datafusion::dataframe::DataFrame;
use datafusion::logical_expr::{Expr, LogicalPlan};
use futures::{Sink, SinkExt, StreamExt};
use pgwire::api::auth::StartupHandler;
use pgwire::api::cancel::{CancelHandler, DefaultCancelHandler};
use pgwire::api::portal::{Format, Portal};
use pgwire::api::query::{ExtendedQueryHandler, SimpleQueryHandler};
use pgwire::api::results::{FieldInfo, QueryResponse, Response, Tag};
use pgwire::api::stmt::{QueryParser, StoredStatement};
use pgwire::api::store::{MemPortalStore, PortalStore};
use pgwire::api::{
    ClientInfo, ClientPortalStore, ConnectionManager, ErrorHandler, PgWireServerHandlers, Type,
};
use pgwire::error::{ErrorInfo, PgWireError, PgWireResult};
use pgwire::messages::response::TransactionStatus;
use pgwire::messages::startup::ParameterStatus;
use pgwire::messages::PgWireBackendMessage;
use pgwire::types::format::FormatOptions;

use super::auth::Authenticator;
use super::stream;
use crate::sql::column_names;
use crate::sql::cursor::{Cursor, Cursors};
use crate::sql::error::{SqlError, SqlResult};
use crate::sql::parser::{self, Parsed, Statement};
use crate::sql::subscribe_syntax::Fetch;
use crate::sql::{CommandTag, Engine, Outcome};

pub struct Handlers {
    queries: Arc<QueryHandler>,
    authenticator: Authenticator,
    cancel: Arc<DefaultCancelHandler>,
}

impl Handlers {
    pub fn new(engine: Arc<Engine>, password: Option<&str>) -> Self {
        let connections = Arc::new(ConnectionManager::new());
        Self {
            queries: Arc::new(QueryHandler {
                parser: Arc::new(StatementParser {
                    engine: engine.clone(),
                }),
                engine,
            }),
            authenticator: Authenticator::new(password, connections.clone()),
            cancel: Arc::new(DefaultCancelHandler::new(connections)),
        }
    }
}

impl PgWireServerHandlers for Handlers {
    fn simple_query_handler(&self) -> Arc<impl SimpleQueryHandler> {
        self.queries.clone()
    }

    fn extended_query_handler(&self) -> Arc<impl ExtendedQueryHandler> {
        self.queries.clone()
    }

    fn startup_handler(&self) -> Arc<impl StartupHandler> {
        Arc::new(self.authenticator.startup())
    }

    fn cancel_handler(&self) -> Arc<impl CancelHandler> {
        self.cancel.clone()
    }

    fn error_handler(&self) -> Arc<impl ErrorHandler> {
        Arc::new(LogErrors)
    }
}

struct LogErrors;

impl ErrorHandler for LogErrors {
    fn on_error<C: ClientInfo>(&self, _client: &C, error: &mut PgWireError) {
        tracing::debug!("sending error: {error}");
    }
}

pub struct QueryHandler {
    engine: Arc<Engine>,
    parser: Arc<StatementParser>,
}

/// A statement prepared by Parse: the parsed statement and, for queries and INSERTs,
/// its plan (placeholders still open).
#[derive(Debug, Clone)]
pub struct Prepared {
    parsed: Arc<Parsed>,
    plan: Option<LogicalPlan>,
    /// The result columns of a statement that has no plan but returns rows (SUBSCRIBE,
    /// FETCH), found when it was parsed.
    columns: Option<SchemaRef>,
}

fn to_pgwire(e: SqlError) -> PgWireError {
    PgWireError::UserError(Box::new(error_info(e)))
}

pub(super) fn error_info(e: SqlError) -> ErrorInfo {
    let mut info = ErrorInfo::new("ERROR".to_string(), e.code.to_string(), e.message);
    info.hint = e.hint;
    info.position = e.position.map(|p| p.to_string());
    info
}

#[async_trait]
impl SimpleQueryHandler for QueryHandler {
    async fn do_query<C>(&self, client: &mut C, query: &str) -> PgWireResult<Vec<Response>>
    where
        C: ClientInfo + ClientPortalStore + Sink<PgWireBackendMessage> + Unpin + Send + Sync,
        C::PortalStore: PortalStore,
        C::Error: Debug,
        PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
    {
        let statements = match parser::parse(query) {
            Ok(statements) => statements,
            Err(e) => return Ok(vec![Response::Error(Box::new(error_info(e)))]),
        };
        if statements.is_empty() {
            return Ok(vec![Response::EmptyQuery]);
        }
        // Their rows are sent as they come, before the responses of the other statements
        // would be: so they come alone.
        if statements.len() > 1 && statements.iter().any(|p| streams(&p.statement)) {
            return Ok(vec![Response::Error(Box::new(error_info(
                SqlError::not_supported(
                    "SUBSCRIBE and COPY (SUBSCRIBE ...) must be the only statement of their query \
                     string",
                )
                .with_hint("send the other statements in a query of their own"),
            )))]);
        }
        let mut in_transaction = client.transaction_status() != TransactionStatus::Idle;
        let mut responses = Vec::with_capacity(statements.len());
        for parsed in statements {
            let response = self
                .run(
                    client,
                    &parsed,
                    None,
                    None,
                    &Format::UnifiedText,
                    &mut in_transaction,
                    true,
                )
                .await
                .map_err(|e| match e {
                    PgWireError::UserError(mut info) => {
                        if let (Some(p), true) = (&info.position, parsed.start > 0) {
                            if let Ok(p) = p.parse::<usize>() {
                                info.position = Some((p + parsed.start).to_string());
                            }
                        }
                        PgWireError::UserError(info)
                    }
                    other => other,
                });
            match response {
                Ok(response) => responses.push(response),
                // Postgres abandons the rest of a multi-statement string at an error,
                // after sending what the statements before it produced.
                Err(PgWireError::UserError(info)) => {
                    responses.push(Response::Error(info));
                    break;
                }
                Err(other) => return Err(other),
            }
        }
        Ok(responses)
    }
}

#[async_trait]
impl ExtendedQueryHandler for QueryHandler {
    type Statement = Prepared;
    type QueryParser = StatementParser;

    fn query_parser(&self) -> Arc<Self::QueryParser> {
        self.parser.clone()
    }

    async fn do_query<C>(
        &self,
        client: &mut C,
        portal: &Portal<Self::Statement>,
        _max_rows: usize,
    ) -> PgWireResult<Response>
    where
        C: ClientInfo + ClientPortalStore + Sink<PgWireBackendMessage> + Unpin + Send + Sync,
        C::PortalStore: PortalStore<Statement = Self::Statement>,
        C::Error: Debug,
        PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
    {
        let prepared = &portal.statement.statement;
        let params = match &prepared.plan {
            Some(plan) => {
                let types = ordered_parameter_types(plan).map_err(to_pgwire)?;
                let refs: Vec<Option<&DataType>> = types.iter().map(Option::as_ref).collect();
                Some(arrow_pg::datatypes::df::deserialize_parameters(
                    portal, &refs,
                )?)
            }
            None => None,
        };
        let mut in_transaction = client.transaction_status() != TransactionStatus::Idle;
        self.run(
            client,
            &prepared.parsed,
            prepared.plan.clone(),
            params,
            &portal.result_column_format,
            &mut in_transaction,
            false,
        )
        .await
    }
}

/// Whether the statement's rows are streamed to the client as they come.
fn streams(statement: &Statement) -> bool {
    matches!(
        statement,
        Statement::Subscribe(_) | Statement::CopySubscribe(_)
    )
}

/// The cursors of the connection `client` is.
fn cursors<C: ClientInfo + ?Sized>(client: &C) -> Arc<Cursors> {
    client
        .session_extensions()
        .get_or_insert_with(Cursors::default)
}

impl QueryHandler {
    /// Runs one statement for either protocol. `in_transaction` follows BEGIN and
    /// COMMIT within a simple query string; `simple` sends row descriptions with rows.
    #[allow(clippy::too_many_arguments)]
    async fn run<C>(
        &self,
        client: &mut C,
        parsed: &Parsed,
        plan: Option<LogicalPlan>,
        params: Option<datafusion::common::ParamValues>,
        format: &Format,
        in_transaction: &mut bool,
        simple: bool,
    ) -> PgWireResult<Response>
    where
        C: ClientInfo + ClientPortalStore + Sink<PgWireBackendMessage> + Unpin + Send + Sync,
        C::PortalStore: PortalStore,
        C::Error: Debug,
        PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
    {
        let metadata = client.metadata().clone();
        match &parsed.statement {
            Statement::Subscribe(spec) => {
                let mut subscription = self
                    .engine
                    .subscribe(&metadata, spec)
                    .await
                    .map_err(to_pgwire)?;
                send_notices(client, subscription.take_notices()).await?;
                stream::send_subscription(client, subscription, format, simple).await
            }
            Statement::CopySubscribe(spec) => {
                let mut subscription = self
                    .engine
                    .subscribe(&metadata, spec)
                    .await
                    .map_err(to_pgwire)?;
                send_notices(client, subscription.take_notices()).await?;
                stream::send_copy(client, subscription).await
            }
            Statement::Declare(declare) => {
                let mut cursor = Cursor::open(&self.engine, &metadata, declare)
                    .await
                    .map_err(to_pgwire)?;
                send_notices(client, cursor.take_notices()).await?;
                let schema = cursor.schema();
                cursors(client)
                    .declare(&declare.name, cursor, *in_transaction && !declare.hold)
                    .map_err(to_pgwire)?;
                register_cursor_portal(client, &declare.name, schema);
                Ok(Response::Execution(Tag::new("DECLARE CURSOR")))
            }
            Statement::Fetch(fetch) => {
                let all = cursors(client);
                let (schema, batches) = stream::with_heartbeat(client, all.fetch(fetch))
                    .await?
                    .map_err(to_pgwire)?;
                let options = Arc::new(FormatOptions::from_client_metadata(client.metadata()));
                let mut response = rows_response(&schema, batches, format, options)?;
                response.set_command_tag("FETCH");
                Ok(Response::Query(response))
            }
            Statement::Close(name) => {
                for closed in cursors(client).close(name.as_deref()).map_err(to_pgwire)? {
                    client.portal_store().rm_portal(&closed);
                }
                Ok(Response::Execution(Tag::new("CLOSE CURSOR")))
            }
            statement => {
                let outcome = self
                    .engine
                    .execute(&metadata, statement, plan, params)
                    .await
                    .map_err(to_pgwire)?;
                match &outcome {
                    Outcome::Begin => *in_transaction = true,
                    Outcome::End(_) => {
                        *in_transaction = false;
                        for closed in cursors(client).end_transaction() {
                            client.portal_store().rm_portal(&closed);
                        }
                    }
                    _ => {}
                }
                respond(client, outcome, format).await
            }
        }
    }
}

async fn send_notices<C>(client: &mut C, notices: Vec<String>) -> PgWireResult<()>
where
    C: Sink<PgWireBackendMessage> + Unpin + Send,
    C::Error: Debug,
    PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
{
    for notice in notices {
        let info = ErrorInfo::new("NOTICE".into(), "01000".into(), notice);
        client
            .send(PgWireBackendMessage::NoticeResponse(info.into()))
            .await?;
    }
    Ok(())
}

/// Makes a declared cursor a portal of the protocol too, as in Postgres: psycopg asks
/// for its columns with Describe Portal.
fn register_cursor_portal<C>(client: &C, name: &str, schema: SchemaRef)
where
    C: ClientPortalStore,
    C::PortalStore: PortalStore,
{
    let Some(store) = client
        .portal_store()
        .as_any()
        .downcast_ref::<MemPortalStore<Prepared>>()
    else {
        return;
    };
    let fetch = Statement::Fetch(Fetch {
        cursor: name.to_string(),
        count: None,
        timeout: None,
    });
    let prepared = Prepared {
        parsed: Arc::new(Parsed {
            statement: fetch,
            text: format!("FETCH ALL FROM {}", weir_catalog::quote_ident(name)),
            start: 0,
        }),
        plan: None,
        columns: Some(schema),
    };
    let statement = Arc::new(StoredStatement::new(name.to_string(), prepared, vec![]));
    store.put_portal(Arc::new(Portal::new_cursor(name.to_string(), statement)));
}

pub struct StatementParser {
    engine: Arc<Engine>,
}

#[async_trait]
impl QueryParser for StatementParser {
    type Statement = Prepared;

    async fn parse_sql<C>(
        &self,
        client: &C,
        sql: &str,
        _types: &[Option<Type>],
    ) -> PgWireResult<Option<Prepared>>
    where
        C: ClientInfo + Unpin + Send + Sync,
    {
        let mut statements = parser::parse(sql).map_err(to_pgwire)?;
        if statements.len() > 1 {
            return Err(to_pgwire(SqlError::syntax(
                "cannot insert multiple commands into a prepared statement",
            )));
        }
        let Some(parsed) = statements.pop() else {
            return Ok(None);
        };
        let plan = self
            .engine
            .plan(client.metadata(), &parsed.statement)
            .await
            .map_err(|e| to_pgwire(e.shifted(parsed.start)))?;
        let columns = match &parsed.statement {
            Statement::Subscribe(spec) => Some(
                self.engine
                    .subscribe_schema(client.metadata(), spec)
                    .await
                    .map_err(to_pgwire)?,
            ),
            // A cursor declared later has no columns yet: Describe says NoData.
            Statement::Fetch(fetch) => cursors(client).schema(&fetch.cursor),
            _ => None,
        };
        Ok(Some(Prepared {
            parsed: Arc::new(parsed),
            plan,
            columns,
        }))
    }

    fn get_parameter_types(&self, stmt: &Prepared) -> PgWireResult<Vec<Type>> {
        let Some(plan) = &stmt.plan else {
            return Ok(vec![]);
        };
        ordered_parameter_types(plan)
            .map_err(to_pgwire)?
            .iter()
            .map(|t| match t {
                Some(t) => arrow_pg::datatypes::into_pg_type(t),
                None => Ok(Type::UNKNOWN),
            })
            .collect()
    }

    fn get_result_schema(
        &self,
        stmt: &Prepared,
        column_format: Option<&Format>,
    ) -> PgWireResult<Vec<FieldInfo>> {
        let schema = match &stmt.columns {
            Some(columns) => Some(columns.clone()),
            None => self
                .engine
                .result_schema(&stmt.parsed.statement, stmt.plan.as_ref())
                .map_err(to_pgwire)?,
        };
        match schema {
            None => Ok(vec![]),
            Some(schema) => arrow_pg::datatypes::arrow_schema_to_pg_fields(
                &schema,
                column_format.unwrap_or(&Format::UnifiedText),
                None,
            ),
        }
    }
}

/// Types of `$1..$n` in order: DataFusion's inference, else the type a placeholder is
/// cast to (`$1::int`), else unknown.
fn ordered_parameter_types(plan: &LogicalPlan) -> SqlResult<Vec<Option<DataType>>> {
    let inferred = plan.get_parameter_types()?;
    let mut cast_types: HashMap<String, DataType> = HashMap::new();
    plan.apply(|node| {
        for expr in node.expressions() {
            expr.apply(|e| {
                if let Expr::Cast(cast) = e {
                    if let Expr::Placeholder(p) = cast.expr.as_ref() {
                        cast_types.insert(p.id.clone(), cast.field.data_type().clone());
                    }
                }
                Ok(TreeNodeRecursion::Continue)
            })?;
        }
        Ok(TreeNodeRecursion::Continue)
    })?;
    let count = inferred
        .keys()
        .filter_map(|id| id.trim_start_matches('$').parse::<usize>().ok())
        .max()
        .unwrap_or(0);
    Ok((1..=count)
        .map(|i| {
            let id = format!("${i}");
            inferred
                .get(&id)
                .cloned()
                .flatten()
                .or_else(|| cast_types.get(&id).cloned())
        })
        .collect())
}

/// Turns an outcome into what pgwire sends, applying session changes on the way.
async fn respond<C>(client: &mut C, outcome: Outcome, format: &Format) -> PgWireResult<Response>
where
    C: ClientInfo + ClientPortalStore + Sink<PgWireBackendMessage> + Unpin + Send + Sync,
    C::PortalStore: PortalStore,
    C::Error: Debug,
    PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
{
    let outcome = match outcome {
        Outcome::Noticed(notices, outcome) => {
            send_notices(client, notices).await?;
            *outcome
        }
        outcome => outcome,
    };
    Ok(match outcome {
        Outcome::Noticed(..) => unreachable!("notices are sent above"),
        Outcome::Rows(df, names) => {
            let options = Arc::new(FormatOptions::from_client_metadata(client.metadata()));
            Response::Query(run_to_completion(df, &names, format, options).await?)
        }
        Outcome::Command(tag) => Response::Execution(tag_of(&tag)),
        Outcome::Set(assignments, tag) => {
            for a in assignments {
                client.metadata_mut().insert(a.key, a.value);
                if let Some((name, value)) = a.report {
                    client
                        .send(PgWireBackendMessage::ParameterStatus(ParameterStatus::new(
                            name, value,
                        )))
                        .await?;
                }
            }
            Response::Execution(tag_of(&tag))
        }
        Outcome::Begin => Response::TransactionStart(Tag::new("BEGIN")),
        Outcome::End(tag) => Response::TransactionEnd(tag_of(&tag)),
        Outcome::Deallocate(name) => {
            // Without a name (ALL) there is nothing to look up: pgwire frees a
            // connection's statements when it closes.
            if let Some(name) = &name {
                client.portal_store().rm_statement(name);
            }
            let tag = if name.is_some() {
                "DEALLOCATE"
            } else {
                "DEALLOCATE ALL"
            };
            Response::Execution(Tag::new(tag))
        }
    })
}

/// Runs a query fully before any row is sent, so an error mid-way reaches the client as
/// a proper error with its SQLSTATE instead of a cut-off result. Rows are encoded from
/// the batches directly: Postgres column names may repeat, which a DataFrame refuses.
async fn run_to_completion(
    df: DataFrame,
    names: &[Option<String>],
    format: &Format,
    options: Arc<FormatOptions>,
) -> PgWireResult<QueryResponse> {
    let schema = column_names::rename(&Arc::new(df.schema().as_arrow().clone()), names);
    let batches = df.collect().await.map_err(|e| to_pgwire(e.into()))?;
    rows_response(&schema, batches, format, options)
}

/// Rows computed already, as pgwire sends them.
fn rows_response(
    schema: &SchemaRef,
    batches: Vec<RecordBatch>,
    format: &Format,
    options: Arc<FormatOptions>,
) -> PgWireResult<QueryResponse> {
    let fields = Arc::new(arrow_pg::datatypes::arrow_schema_to_pg_fields(
        schema,
        format,
        Some(options),
    )?);
    let row_fields = fields.clone();
    let rows = futures::stream::iter(batches).flat_map(move |batch| {
        futures::stream::iter(arrow_pg::datatypes::encode_recordbatch(
            row_fields.clone(),
            batch,
        ))
    });
    Ok(QueryResponse::new(fields, rows))
}

fn tag_of(tag: &CommandTag) -> Tag {
    let mut t = Tag::new(&tag.command);
    if tag.command == "INSERT" {
        t = t.with_oid(0);
    }
    match tag.rows {
        Some(rows) => t.with_rows(rows),
        None => t,
    }
}
