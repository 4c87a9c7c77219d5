//! Statements that change or describe the catalog: CREATE TABLE, CREATE VIEW, DROP,
//! DESCRIBE.

use datafusion::arrow::datatypes::DataType;
use datafusion::common::DFSchema;
use datafusion::logical_expr::ExprSchemable;
use datafusion::sql::parser::Statement as DFStatement;
use datafusion::sql::sqlparser::ast::{self, ObjectType};
use weir_catalog::{Catalog, ComputedColumn, SqlType, TableDef, TableId, ViewDef, WatermarkDef};

use super::ddl::CreateTable;
use super::engine::{Engine, Outcome};
use super::error::{sqlstate, SqlError, SqlResult};
use super::names::object_name;
use super::parser::Statement;
use super::show;
use super::CommandTag;

impl Engine {
    pub(super) async fn create_table(&self, create: &CreateTable) -> SqlResult<Outcome> {
        if self.catalog.exists(&create.name) && create.if_not_exists {
            return Ok(Outcome::Command(CommandTag::new("CREATE TABLE")));
        }
        crate::connector::options::validate(&create.options)?;
        if create.options.get("connector").map(String::as_str) == Some("upsert-kafka") {
            if create.primary_key.is_empty() {
                return Err(SqlError::new(
                    sqlstate::INVALID_PARAMETER_VALUE,
                    format!(
                        "upsert-kafka table \"{}\" needs a PRIMARY KEY (...) NOT ENFORCED: \
                         its messages are keyed by it",
                        create.name
                    ),
                ));
            }
            if !create.computed.is_empty() || create.watermark.is_some() {
                return Err(SqlError::not_supported(format!(
                    "upsert-kafka table \"{}\": computed columns and WATERMARK are not \
                     supported on upsert-kafka tables yet",
                    create.name
                ))
                .with_hint("declare a view over the table with the computed columns"));
            }
        }
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
        // METADATA columns: only Kafka tables have them, with Kafka's keys.
        crate::connector::kafka::metadata::columns(&def)?;
        crate::stream::latency::LatencyColumn::of(&def)?;
        let if_not_exists = create.if_not_exists;
        self.catalog_write(move |c| c.create_table(def, if_not_exists))
            .await?;
        Ok(Outcome::Command(CommandTag::new("CREATE TABLE")))
    }

    pub(super) async fn create_view(
        &self,
        metadata: &std::collections::HashMap<String, String>,
        view: &ast::CreateView,
    ) -> SqlResult<Outcome> {
        let name = object_name(&view.name)?;
        let tag = if view.materialized {
            "CREATE MATERIALIZED VIEW"
        } else {
            "CREATE VIEW"
        };
        if view.if_not_exists && self.catalog.exists(&name) {
            return Ok(Outcome::Command(CommandTag::new(tag)));
        }
        if view.materialized && view.or_replace {
            return Err(SqlError::not_supported(
                "CREATE OR REPLACE MATERIALIZED VIEW is not supported; DROP MATERIALIZED VIEW and create it again",
            ));
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
        if view.materialized {
            if self.catalog.exists(&name) {
                return Err(SqlError::new(
                    "42P07",
                    format!("relation \"{name}\" already exists"),
                ));
            }
            let def = ViewDef {
                name,
                query,
                depends_on,
                materialized: true,
                settings: super::streaming::planning_settings(metadata),
            };
            return self.create_materialized_view(metadata, def).await;
        }
        // Plan it once now, so a view that cannot run is refused at creation.
        let planned = super::parser::parse(&query)?;
        if let Some(Statement::Sql(stmt)) = planned.into_iter().next().map(|p| p.statement) {
            state
                .statement_to_plan(DFStatement::Statement(stmt))
                .await?;
        }
        let def = ViewDef {
            name,
            query,
            depends_on,
            materialized: false,
            settings: Default::default(),
        };
        let or_replace = view.or_replace;
        self.catalog_write(move |c| c.create_view(def, or_replace))
            .await?;
        Ok(Outcome::Command(CommandTag::new("CREATE VIEW")))
    }

    pub(super) async fn drop(
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
                    let table = name.clone();
                    self.catalog_write(move |c| c.drop_table(&table)).await?
                }
                _ => {
                    if self.catalog.table(&name).is_some() {
                        return Err(wrong_kind(&name, "a table", "DROP TABLE"));
                    }
                    if self.catalog.view(&name).is_some_and(|v| v.materialized) {
                        return Err(wrong_kind(
                            &name,
                            "a materialized view",
                            "DROP MATERIALIZED VIEW",
                        ));
                    }
                    let view = name.clone();
                    self.catalog_write(move |c| c.drop_view(&view)).await?
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

    /// Catalog writes wait for sled's flush: keep them off the async worker threads.
    pub(super) async fn catalog_write<T: Send + 'static>(
        &self,
        write: impl FnOnce(&Catalog) -> weir_catalog::Result<T> + Send + 'static,
    ) -> SqlResult<T> {
        let catalog = self.catalog.clone();
        tokio::task::spawn_blocking(move || write(&catalog))
            .await
            .map_err(|e| SqlError::internal(format!("catalog write failed: {e}")))?
            .map_err(SqlError::from)
    }

    pub(super) async fn describe(&self, name: &str) -> SqlResult<Outcome> {
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
