//! Runs parsed statements: DDL against the catalog, queries and INSERTs through
//! DataFusion over the catalog's tables, session statements against the session.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use datafusion::arrow::datatypes::SchemaRef;
use datafusion::arrow::record_batch::RecordBatch;
use datafusion::catalog::CatalogProvider;
use datafusion::common::ParamValues;
use datafusion::dataframe::DataFrame;
use datafusion::execution::SessionState;
use datafusion::logical_expr::LogicalPlan;
use datafusion::prelude::{SessionConfig, SessionContext};
use datafusion::sql::parser::Statement as DFStatement;
use datafusion::sql::sqlparser::ast;
use datafusion_pg_catalog::pg_catalog::context::EmptyContextProvider;
use weir_catalog::{Catalog, SledStore, StateStore};

use super::column_names;
use super::dml;
use super::error::{SqlError, SqlResult};
use super::information_schema::{InformationSchema, WeirCatalog};
use super::insert;
use super::names;
use super::parser::Statement;
use super::rewrite;
use super::schema::WeirSchema;
use super::session::{self, Assignment};
use super::show;
use super::{functions, streaming, CommandTag};
use crate::plan::planner::Mode;
use crate::stream::manager::{Jobs, DEFAULT_EPOCH_INTERVAL};
use datafusion::sql::sqlparser::ast::ObjectType;

/// What a statement produced.
pub enum Outcome {
    /// Rows to return, and the Postgres names of their columns where DataFusion's differ.
    Rows(DataFrame, Vec<Option<String>>),
    Command(CommandTag),
    /// Session variables to change (and report to the client).
    Set(Vec<Assignment>, CommandTag),
    Begin,
    /// COMMIT or ROLLBACK.
    End(CommandTag),
    /// `DEALLOCATE name` frees a statement prepared through the protocol; `None` is ALL.
    Deallocate(Option<String>),
    /// Warnings sent as NOTICEs before the outcome (e.g. state that grows without bound).
    Noticed(Vec<String>, Box<Outcome>),
}

impl Outcome {
    pub fn noticed(notices: Vec<String>, outcome: Outcome) -> Outcome {
        if notices.is_empty() {
            outcome
        } else {
            Outcome::Noticed(notices, Box::new(outcome))
        }
    }
}

/// The server's one query engine: the catalog and the DataFusion context over it.
pub struct Engine {
    pub(super) catalog: Arc<Catalog>,
    pub(super) ctx: Arc<SessionContext>,
    pub(super) jobs: Arc<Jobs>,
    /// Where operators under the sled state backend open their scratch databases.
    pub(super) spill_root: PathBuf,
}

impl Engine {
    /// Opens (or creates) the durable store in `data_dir`.
    pub fn open(data_dir: &Path) -> anyhow::Result<Arc<Self>> {
        std::fs::create_dir_all(data_dir)?;
        let store: Arc<dyn StateStore> = Arc::new(SledStore::open(&data_dir.join("store"))?);
        // Scratch state of a server that was killed: checkpoints rebuild it.
        let spill_root = data_dir.join("spill");
        if spill_root.exists() {
            std::fs::remove_dir_all(&spill_root)?;
        }
        Self::with_store_and_spill(store, spill_root)
    }

    /// An engine over `store`, with scratch state in the system's temporary directory.
    pub fn with_store(store: Arc<dyn StateStore>) -> anyhow::Result<Arc<Self>> {
        let spill_root =
            std::env::temp_dir().join(format!("weir-spill-{:016x}", rand::random::<u64>()));
        Self::with_store_and_spill(store, spill_root)
    }

    fn with_store_and_spill(
        store: Arc<dyn StateStore>,
        spill_root: PathBuf,
    ) -> anyhow::Result<Arc<Self>> {
        let catalog = Arc::new(Catalog::open(store)?);
        let config = SessionConfig::new()
            .with_default_catalog_and_schema(names::CATALOG, names::SCHEMA)
            .with_create_default_catalog_and_schema(false)
            .with_information_schema(false);
        // The CASE lookup rewrite goes before common subexpression elimination, which
        // would take a comparison repeated within a projection out as a column first and
        // leave its CASE branch by branch.
        let mut rules = datafusion::optimizer::Optimizer::new().rules;
        let cse = rules
            .iter()
            .position(|r| r.name() == "common_sub_expression_eliminate")
            .unwrap_or(rules.len());
        rules.insert(cse, Arc::new(crate::plan::case_lookup::CaseLookup));
        let state = datafusion::execution::SessionStateBuilder::new()
            .with_config(config)
            .with_default_features()
            .with_optimizer_rules(rules)
            .build();
        let ctx = SessionContext::new_with_state(state);
        let ctx = Arc::new(ctx);
        let jobs = Jobs::new();
        if tokio::runtime::Handle::try_current().is_ok() {
            jobs.start_epochs(DEFAULT_EPOCH_INTERVAL);
        }
        let schema = Arc::new(WeirSchema::new(catalog.clone(), jobs.clone()));
        schema.set_context(&ctx);
        let information_schema = Arc::new(InformationSchema::default());
        information_schema.set_context(&ctx);
        let weir = Arc::new(WeirCatalog::new(information_schema));
        weir.register_schema(names::SCHEMA, schema)?;
        ctx.register_catalog(names::CATALOG, weir);
        datafusion_pg_catalog::setup_pg_catalog(&ctx, names::CATALOG, EmptyContextProvider)
            .map_err(|e| anyhow::anyhow!("setting up pg_catalog: {e}"))?;
        for udf in functions::all() {
            ctx.register_udf(udf);
        }
        Ok(Arc::new(Self {
            catalog,
            ctx,
            jobs,
            spill_root,
        }))
    }

    pub fn catalog(&self) -> &Arc<Catalog> {
        &self.catalog
    }

    /// Stops every view and job and waits until they no longer use the store.
    pub async fn stop_jobs(&self) {
        self.jobs.stop_all().await;
    }

    /// Makes everything durable and lets the store close once the engine is dropped (call
    /// [`Engine::stop_jobs`] first):
    /// pg_catalog's schema refers back to the catalog list that holds it, a cycle that
    /// would otherwise keep the store (and its lock) open for the life of the process.
    pub fn close(&self) -> SqlResult<()> {
        if let Some(catalog) = self.ctx.catalog(names::CATALOG) {
            catalog.deregister_schema("pg_catalog", true)?;
        }
        self.catalog.flush()?;
        Ok(())
    }

    pub(super) fn state(&self) -> SessionState {
        self.ctx.state()
    }

    /// Plans statements DataFusion executes (queries and INSERTs), so the extended
    /// protocol can describe parameters and result columns before execution.
    pub async fn plan(
        &self,
        metadata: &HashMap<String, String>,
        statement: &Statement,
    ) -> SqlResult<Option<LogicalPlan>> {
        let Statement::Sql(stmt) = statement else {
            return Ok(None);
        };
        let mut stmt = (**stmt).clone();
        rewrite::rewrite(&mut stmt, metadata)?;
        tracing::debug!("planning: {stmt}");
        let state = self.session_state(metadata);
        match &mut stmt {
            ast::Statement::Explain { statement, .. } if explained_view(statement).is_some() => {
                return Ok(None)
            }
            ast::Statement::Query(_) | ast::Statement::Explain { .. } => {}
            ast::Statement::Insert(insert) => {
                let def = insert::prepare(&self.catalog, insert)?;
                insert::check_source_types(&state, insert, &def).await?;
            }
            ast::Statement::Update(_) | ast::Statement::Delete(_) => {
                dml::check(&self.catalog, &stmt)?;
            }
            _ => return Ok(None),
        }
        let plan = state
            .statement_to_plan(DFStatement::Statement(Box::new(stmt)))
            .await?;
        match &plan {
            LogicalPlan::Ddl(_) | LogicalPlan::Statement(_) | LogicalPlan::Copy(_) => {
                return Err(SqlError::not_supported(format!(
                    "{} is not supported",
                    plan.display()
                )))
            }
            _ => {}
        }
        Ok(Some(plan))
    }

    /// The columns a statement returns, without running it (Describe).
    pub fn result_schema(
        &self,
        statement: &Statement,
        plan: Option<&LogicalPlan>,
    ) -> SqlResult<Option<SchemaRef>> {
        Ok(match statement {
            Statement::ShowTables => Some(show::show_tables_schema()),
            Statement::ShowCreateTable(_) => Some(show::show_create_schema()),
            Statement::Describe(_) => Some(show::describe_schema()),
            Statement::ShowVariable(name) => Some(show::show_variable_schema(name)?),
            Statement::ShowJobs => Some(self.show_jobs_schema()),
            Statement::ShowCheckpoints => Some(super::streaming::show_checkpoints_schema()),
            Statement::ShowSavepoints => Some(super::savepoints::show_savepoints_schema()),
            Statement::StopJob {
                savepoint: true, ..
            }
            | Statement::StopView(_) => Some(super::savepoints::savepoint_schema()),
            Statement::Sql(stmt)
                if matches!(&**stmt, ast::Statement::Explain { statement, .. }
                    if explained_view(statement).is_some()) =>
            {
                Some(streaming::explain_schema())
            }
            Statement::Sql(stmt) => match plan {
                Some(plan @ LogicalPlan::Dml(_)) if streaming::is_job(plan) => {
                    Some(streaming::job_id_schema())
                }
                Some(LogicalPlan::Explain(e))
                    if streaming::is_job(&e.plan) || streaming::needs_streaming(&e.plan) =>
                {
                    Some(streaming::explain_schema())
                }
                Some(LogicalPlan::Dml(_)) | None => None,
                Some(plan) => Some(column_names::rename(
                    &Arc::new(plan.schema().as_arrow().clone()),
                    &column_names::postgres_names(stmt),
                )),
            },
            _ => None,
        })
    }

    /// Runs one statement. `plan` is what [`Engine::plan`] made of it, if it was planned
    /// ahead (extended protocol); `params` fill its placeholders.
    pub async fn execute(
        &self,
        metadata: &HashMap<String, String>,
        statement: &Statement,
        plan: Option<LogicalPlan>,
        params: Option<ParamValues>,
    ) -> SqlResult<Outcome> {
        match statement {
            Statement::CreateTable(create) => match &create.as_query {
                Some(query) => self.create_table_as(metadata, create, query).await,
                None => self.create_table(create).await,
            },
            Statement::ShowTables => self.rows(show::show_tables(&self.catalog)),
            Statement::ShowCreateTable(name) => self.rows(show::show_create(&self.catalog, name)?),
            Statement::Describe(name) => self.describe(name).await,
            Statement::ShowVariable(name) => self.rows(show::show_variable(metadata, name)?),
            Statement::SetVariable { name, value } if name == "all" && value.is_none() => {
                Ok(Outcome::Set(session::reset_all(), CommandTag::new("RESET")))
            }
            Statement::SetVariable { name, value } => {
                let tag = if value.is_some() { "SET" } else { "RESET" };
                let assignment = session::assign(name, value.as_deref())?;
                if name == "execution.checkpointing.interval" {
                    self.jobs.set_epoch_interval(
                        value
                            .as_deref()
                            .and_then(crate::connector::options::parse_duration)
                            .unwrap_or(DEFAULT_EPOCH_INTERVAL),
                    );
                }
                Ok(Outcome::Set(vec![assignment], CommandTag::new(tag)))
            }
            Statement::SetIgnored => Ok(Outcome::Command(CommandTag::new("SET"))),
            Statement::ShowJobs => self.show_jobs(),
            Statement::ShowCheckpoints => self.show_checkpoints(),
            Statement::StopJob { id, savepoint } => self.stop_job(id, *savepoint).await,
            Statement::StopView(name) => self.stop_view(name).await,
            Statement::ShowSavepoints => self.show_savepoints().await,
            Statement::DropSavepoint(name) => self.drop_savepoint(name).await,
            Statement::AlterParallelism {
                target,
                parallelism,
            } => self.alter_parallelism(target, *parallelism).await,
            Statement::Flush => self.flush().await,
            Statement::Subscribe(_)
            | Statement::CopySubscribe(_)
            | Statement::Declare(_)
            | Statement::Fetch(_)
            | Statement::Close(_) => Err(SqlError::internal(
                "SUBSCRIBE and cursor statements run on a connection, not through execute",
            )),
            Statement::Sql(stmt) => {
                self.execute_sql(metadata, statement, stmt, plan, params)
                    .await
            }
        }
    }

    async fn execute_sql(
        &self,
        metadata: &HashMap<String, String>,
        statement: &Statement,
        stmt: &ast::Statement,
        plan: Option<LogicalPlan>,
        params: Option<ParamValues>,
    ) -> SqlResult<Outcome> {
        match stmt {
            ast::Statement::StartTransaction { .. } => return Ok(Outcome::Begin),
            ast::Statement::Commit { .. } => return Ok(Outcome::End(CommandTag::new("COMMIT"))),
            // Savepoints are accepted like transactions: reads need nothing undone.
            ast::Statement::Rollback {
                savepoint: Some(_), ..
            } => return Ok(Outcome::Command(CommandTag::new("ROLLBACK"))),
            ast::Statement::Rollback { .. } => {
                return Ok(Outcome::End(CommandTag::new("ROLLBACK")))
            }
            ast::Statement::Savepoint { .. } => {
                return Ok(Outcome::Command(CommandTag::new("SAVEPOINT")))
            }
            ast::Statement::ReleaseSavepoint { .. } => {
                return Ok(Outcome::Command(CommandTag::new("RELEASE")))
            }
            ast::Statement::Deallocate { name, .. } => {
                let all = name.quote_style.is_none() && name.value.eq_ignore_ascii_case("all");
                return Ok(Outcome::Deallocate((!all).then(|| name.value.clone())));
            }
            ast::Statement::CreateView(view) => return self.create_view(metadata, view).await,
            ast::Statement::Drop {
                object_type: ObjectType::MaterializedView,
                if_exists,
                names,
                ..
            } => {
                for name in names {
                    let name = names::object_name(name)?;
                    match self.catalog.view(&name) {
                        Some(v) if v.materialized => {
                            self.drop_materialized_view(&name).await?;
                        }
                        Some(_) => {
                            return Err(SqlError::new(
                                "42809",
                                format!("\"{name}\" is not a materialized view"),
                            )
                            .with_hint("use DROP VIEW"))
                        }
                        None if self.catalog.table(&name).is_some() => {
                            return Err(SqlError::new("42809", format!("\"{name}\" is a table"))
                                .with_hint("use DROP TABLE"))
                        }
                        None if *if_exists => {}
                        None => return Err(SqlError::undefined_table(&name)),
                    }
                }
                return Ok(Outcome::Command(CommandTag::new("DROP MATERIALIZED VIEW")));
            }
            ast::Statement::Drop {
                object_type,
                if_exists,
                names,
                cascade,
                ..
            } => return self.drop(*object_type, *if_exists, names, *cascade).await,
            ast::Statement::Explain { statement, .. } if explained_view(statement).is_some() => {
                let query = explained_view(statement).expect("checked").to_string();
                return self.explain_view(metadata, &query).await;
            }
            ast::Statement::Truncate(_) => {
                return Err(SqlError::not_supported(
                    "TRUNCATE is not supported: tables in Weir's log are append-only logs, or \
                     changelogs when they have a primary key",
                )
                .with_hint("DELETE FROM removes the rows of a table with a primary key; DROP TABLE and create it again empties any table"))
            }
            ast::Statement::Explain { statement, .. }
                if matches!(
                    statement.as_ref(),
                    ast::Statement::Update(_) | ast::Statement::Delete(_)
                ) =>
            {
                return Err(SqlError::not_supported(
                    "EXPLAIN of UPDATE or DELETE is not supported",
                ))
            }
            _ => {}
        }
        let plan = match plan {
            Some(plan) => plan,
            None => self.plan(metadata, statement).await?.ok_or_else(|| {
                SqlError::not_supported(format!(
                    "statement not supported: {}",
                    statement_kind(stmt)
                ))
            })?,
        };
        let plan = match params {
            Some(params) => plan.with_param_values(params)?,
            None => plan,
        };
        if let LogicalPlan::Dml(update_or_delete) = &plan {
            if dml::is_update_or_delete(&plan) {
                let tag = dml::execute(&self.session_state(metadata), update_or_delete).await?;
                return Ok(Outcome::Command(tag));
            }
        }
        if streaming::is_job(&plan) {
            return self.insert_job(metadata, stmt.to_string(), &plan).await;
        }
        if let LogicalPlan::Explain(e) = &plan {
            if streaming::is_job(&e.plan) {
                return self.explain_insert(metadata, &e.plan);
            }
            if streaming::needs_streaming(&e.plan) {
                return self.explain_stream(metadata, &e.plan, Mode::Bounded);
            }
        }
        if streaming::needs_streaming(&plan) {
            let batches = self.run_bounded(metadata, &plan).await?;
            return self.streamed_rows(&plan, batches, column_names::postgres_names(stmt));
        }
        let insert = match &plan {
            LogicalPlan::Dml(dml) => Some(dml.clone()),
            _ => None,
        };
        let df = DataFrame::new(self.session_state(metadata), plan);
        let Some(insert) = insert else {
            return Ok(Outcome::Rows(df, column_names::postgres_names(stmt)));
        };
        let batches = df
            .collect()
            .await
            .map_err(|e| insert::explain_failure(&self.catalog, &insert, e))?;
        let rows = insert::count_of(&batches);
        Ok(Outcome::Command(CommandTag::new("INSERT").with_rows(rows)))
    }

    /// Rows a streaming query returned. Their columns get unique names for DataFusion
    /// (a join may return two `price` columns); the client sees the original ones.
    fn streamed_rows(
        &self,
        plan: &LogicalPlan,
        batches: Vec<RecordBatch>,
        mut names: Vec<Option<String>>,
    ) -> SqlResult<Outcome> {
        let fields = plan.schema().fields();
        names.resize(fields.len(), None);
        let unique: Vec<_> = fields
            .iter()
            .enumerate()
            .map(|(i, f)| f.as_ref().clone().with_name(format!("{}#{i}", f.name())))
            .collect();
        for (name, field) in names.iter_mut().zip(fields.iter()) {
            name.get_or_insert_with(|| field.name().clone());
        }
        let schema = Arc::new(datafusion::arrow::datatypes::Schema::new(unique));
        let batches = batches
            .into_iter()
            .map(|b| crate::stream::batch_of(schema.clone(), b.columns().to_vec(), b.num_rows()))
            .collect::<Result<Vec<_>, _>>()?;
        let table = datafusion::datasource::MemTable::try_new(schema, vec![batches])?;
        Ok(Outcome::Rows(self.ctx.read_table(Arc::new(table))?, names))
    }

    pub(super) fn rows(&self, batch: RecordBatch) -> SqlResult<Outcome> {
        Ok(Outcome::Rows(self.ctx.read_batch(batch)?, vec![]))
    }
}

/// The statement's leading keywords, for messages about what is not supported.
fn statement_kind(stmt: &ast::Statement) -> String {
    stmt.to_string()
        .split_whitespace()
        .take(2)
        .collect::<Vec<_>>()
        .join(" ")
}

/// The query of `EXPLAIN CREATE MATERIALIZED VIEW v AS query`.
fn explained_view(statement: &ast::Statement) -> Option<&ast::Query> {
    match statement {
        ast::Statement::CreateView(view) if view.materialized => Some(&view.query),
        _ => None,
    }
}
