//! Runs parsed statements: DDL against the catalog, queries and INSERTs through
//! DataFusion over the catalog's tables, session statements against the session.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use datafusion::arrow::datatypes::{DataType, SchemaRef};
use datafusion::arrow::record_batch::RecordBatch;
use datafusion::catalog::{CatalogProvider, MemoryCatalogProvider};
use datafusion::common::{DFSchema, ParamValues};
use datafusion::dataframe::DataFrame;
use datafusion::execution::SessionState;
use datafusion::logical_expr::{ExprSchemable, LogicalPlan};
use datafusion::prelude::{SessionConfig, SessionContext};
use datafusion::sql::parser::Statement as DFStatement;
use datafusion::sql::sqlparser::ast::{self, ObjectType};
use datafusion_pg_catalog::pg_catalog::context::EmptyContextProvider;
use weir_catalog::{
    Catalog, ComputedColumn, SledStore, SqlType, StateStore, TableDef, TableId, ViewDef,
    WatermarkDef,
};

use super::column_names;
use super::ddl::CreateTable;
use super::error::{sqlstate, SqlError, SqlResult};
use super::insert;
use super::names::{self, object_name};
use super::parser::Statement;
use super::rewrite;
use super::schema::WeirSchema;
use super::session::{self, Assignment};
use super::show;
use super::{functions, CommandTag};

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
}

/// The server's one query engine: the catalog and the DataFusion context over it.
pub struct Engine {
    catalog: Arc<Catalog>,
    ctx: Arc<SessionContext>,
}

impl Engine {
    /// Opens (or creates) the durable store in `data_dir`.
    pub fn open(data_dir: &Path) -> anyhow::Result<Arc<Self>> {
        std::fs::create_dir_all(data_dir)?;
        let store: Arc<dyn StateStore> = Arc::new(SledStore::open(&data_dir.join("store"))?);
        Self::with_store(store)
    }

    pub fn with_store(store: Arc<dyn StateStore>) -> anyhow::Result<Arc<Self>> {
        let catalog = Arc::new(Catalog::open(store)?);
        let config = SessionConfig::new()
            .with_default_catalog_and_schema(names::CATALOG, names::SCHEMA)
            .with_create_default_catalog_and_schema(false)
            .with_information_schema(true);
        let ctx = Arc::new(SessionContext::new_with_config(config));
        let schema = Arc::new(WeirSchema::new(catalog.clone()));
        schema.set_context(&ctx);
        let weir = Arc::new(MemoryCatalogProvider::new());
        weir.register_schema(names::SCHEMA, schema)?;
        ctx.register_catalog(names::CATALOG, weir);
        datafusion_pg_catalog::setup_pg_catalog(&ctx, names::CATALOG, EmptyContextProvider)
            .map_err(|e| anyhow::anyhow!("setting up pg_catalog: {e}"))?;
        for udf in functions::all() {
            ctx.register_udf(udf);
        }
        Ok(Arc::new(Self { catalog, ctx }))
    }

    pub fn catalog(&self) -> &Arc<Catalog> {
        &self.catalog
    }

    /// Makes everything durable and lets the store close once the engine is dropped:
    /// pg_catalog's schema refers back to the catalog list that holds it, a cycle that
    /// would otherwise keep the store (and its lock) open for the life of the process.
    pub fn close(&self) -> SqlResult<()> {
        if let Some(catalog) = self.ctx.catalog(names::CATALOG) {
            catalog.deregister_schema("pg_catalog", true)?;
        }
        self.catalog.flush()?;
        Ok(())
    }

    fn state(&self) -> SessionState {
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
        let state = self.state();
        match &mut stmt {
            ast::Statement::Query(_) | ast::Statement::Explain { .. } => {}
            ast::Statement::Insert(insert) => {
                let def = insert::prepare(&self.catalog, insert)?;
                insert::check_source_types(&state, insert, &def).await?;
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
            Statement::Sql(stmt) => match plan {
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
            Statement::CreateTable(create) => self.create_table(create).await,
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
                Ok(Outcome::Set(vec![assignment], CommandTag::new(tag)))
            }
            Statement::SetIgnored => Ok(Outcome::Command(CommandTag::new("SET"))),
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
            ast::Statement::CreateView(view) => return self.create_view(view).await,
            ast::Statement::Drop {
                object_type,
                if_exists,
                names,
                cascade,
                ..
            } => return self.drop(*object_type, *if_exists, names, *cascade),
            ast::Statement::Update(_) | ast::Statement::Delete(_) | ast::Statement::Truncate(_) => {
                return Err(SqlError::not_supported(
                    "UPDATE, DELETE and TRUNCATE are not supported: tables in Weir's log are \
                     append-only; use INSERT INTO, or DROP TABLE and create it again",
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
        let insert = match &plan {
            LogicalPlan::Dml(dml) => Some(dml.clone()),
            _ => None,
        };
        let df = DataFrame::new(self.state(), plan);
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

    fn rows(&self, batch: RecordBatch) -> SqlResult<Outcome> {
        Ok(Outcome::Rows(self.ctx.read_batch(batch)?, vec![]))
    }

    async fn create_table(&self, create: &CreateTable) -> SqlResult<Outcome> {
        if self.catalog.exists(&create.name) && create.if_not_exists {
            return Ok(Outcome::Command(CommandTag::new("CREATE TABLE")));
        }
        crate::connector::options::validate(&create.options)?;
        let mut def = TableDef {
            id: TableId(0),
            name: create.name.clone(),
            columns: create.columns.clone(),
            computed: vec![],
            primary_key: create.primary_key.clone(),
            watermark: None,
            options: create.options.clone(),
        };
        let state = self.state();
        for (name, expr) in &create.computed {
            let schema = DFSchema::try_from(def.physical_schema().as_ref().clone())?;
            let planned = state.create_logical_expr(&expr.to_string(), &schema)?;
            let data_type = planned.get_type(&schema)?;
            let sql_type = SqlType::from_arrow(&data_type).ok_or_else(|| {
                SqlError::new(
                    sqlstate::DATATYPE_MISMATCH,
                    format!("computed column \"{name}\" has type {data_type}, which a table cannot hold"),
                )
            })?;
            def.computed.push(ComputedColumn {
                name: name.clone(),
                expr: expr.to_string(),
                data_type: sql_type,
            });
        }
        if let Some((column, expr)) = &create.watermark {
            let schema = DFSchema::try_from(def.schema().as_ref().clone())?;
            let planned = state.create_logical_expr(&expr.to_string(), &schema)?;
            let data_type = planned.get_type(&schema)?;
            if !matches!(data_type, DataType::Timestamp(..)) {
                return Err(SqlError::new(
                    sqlstate::DATATYPE_MISMATCH,
                    format!("WATERMARK expression for \"{column}\" has type {data_type}; it must give a timestamp, as in {column} - INTERVAL '5' SECOND"),
                ));
            }
            def.watermark = Some(WatermarkDef {
                column: column.clone(),
                expr: expr.to_string(),
            });
        }
        self.catalog.create_table(def, create.if_not_exists)?;
        Ok(Outcome::Command(CommandTag::new("CREATE TABLE")))
    }

    async fn create_view(&self, view: &ast::CreateView) -> SqlResult<Outcome> {
        if view.materialized {
            return Err(SqlError::not_supported(
                "CREATE MATERIALIZED VIEW is not supported yet; CREATE VIEW gives a view computed when read",
            ));
        }
        let name = object_name(&view.name)?;
        if view.if_not_exists && self.catalog.exists(&name) {
            return Ok(Outcome::Command(CommandTag::new("CREATE VIEW")));
        }
        let mut query = view.query.to_string();
        if !view.columns.is_empty() {
            let columns: Vec<String> = view.columns.iter().map(|c| c.name.to_string()).collect();
            query = format!(
                "SELECT * FROM ({query}) AS {}({})",
                weir_catalog::quote_ident(&name),
                columns.join(", ")
            );
        }
        let statement = DFStatement::Statement(Box::new(ast::Statement::Query(view.query.clone())));
        let state = self.state();
        let references = state.resolve_table_references(&statement)?;
        let depends_on: Vec<String> = references
            .iter()
            .map(|r| r.table().to_string())
            .filter(|t| self.catalog.exists(t))
            .collect();
        if depends_on.contains(&name) {
            return Err(SqlError::new(
                "42P17",
                format!("view \"{name}\" cannot read itself"),
            ));
        }
        // Plan it once now, so a view that cannot run is refused at creation.
        let planned = super::parser::parse(&query)?;
        if let Some(Statement::Sql(stmt)) = planned.into_iter().next().map(|p| p.statement) {
            state
                .statement_to_plan(DFStatement::Statement(stmt))
                .await?;
        }
        self.catalog.create_view(
            ViewDef {
                name,
                query,
                depends_on,
            },
            view.or_replace,
        )?;
        Ok(Outcome::Command(CommandTag::new("CREATE VIEW")))
    }

    fn drop(
        &self,
        object_type: ObjectType,
        if_exists: bool,
        names: &[ast::ObjectName],
        cascade: bool,
    ) -> SqlResult<Outcome> {
        let (kind, tag) = match object_type {
            ObjectType::Table => ("table", "DROP TABLE"),
            ObjectType::View => ("view", "DROP VIEW"),
            other => {
                return Err(SqlError::not_supported(format!(
                    "DROP {other} is not supported; Weir has tables and views"
                )))
            }
        };
        if cascade {
            return Err(SqlError::not_supported(
                "DROP ... CASCADE is not supported; drop the dependent views first",
            ));
        }
        for name in names {
            let name = object_name(name)?;
            let dropped = match object_type {
                ObjectType::Table => {
                    if self.catalog.view(&name).is_some() {
                        return Err(wrong_kind(&name, "a view", "DROP VIEW"));
                    }
                    self.catalog.drop_table(&name)?
                }
                _ => {
                    if self.catalog.table(&name).is_some() {
                        return Err(wrong_kind(&name, "a table", "DROP TABLE"));
                    }
                    self.catalog.drop_view(&name)?
                }
            };
            if !dropped && !if_exists {
                return Err(SqlError::new(
                    sqlstate::UNDEFINED_TABLE,
                    format!("{kind} \"{name}\" does not exist"),
                ));
            }
        }
        Ok(Outcome::Command(CommandTag::new(tag)))
    }

    async fn describe(&self, name: &str) -> SqlResult<Outcome> {
        if let Some(def) = self.catalog.table(name) {
            return self.rows(show::describe_table(&def));
        }
        if self.catalog.view(name).is_some() {
            let df = self.ctx.table(name).await?;
            return self.rows(show::describe_view(df.schema().as_arrow()));
        }
        Err(SqlError::undefined_table(name))
    }
}

fn wrong_kind(name: &str, what: &str, instead: &str) -> SqlError {
    SqlError::new(sqlstate::WRONG_OBJECT_TYPE, format!("\"{name}\" is {what}"))
        .with_hint(format!("use {instead}"))
}

/// The statement's leading keywords, for messages about what is not supported.
fn statement_kind(stmt: &ast::Statement) -> String {
    stmt.to_string()
        .split_whitespace()
        .take(2)
        .collect::<Vec<_>>()
        .join(" ")
}
