//! Weir's catalog as a DataFusion schema (`weir.public`): tables without a connector
//! read their log, views are planned from their stored query each time they are used.

use std::sync::{Arc, OnceLock, Weak};

use async_trait::async_trait;
use datafusion::arrow::datatypes::SchemaRef;
use datafusion::catalog::{SchemaProvider, Session, TableProvider};
use datafusion::common::Result;
use datafusion::datasource::{TableType, ViewTable};
use datafusion::error::DataFusionError;
use datafusion::logical_expr::Expr;
use datafusion::physical_plan::ExecutionPlan;
use datafusion::prelude::SessionContext;
use datafusion::sql::parser::Statement as DFStatement;
use weir_catalog::{Catalog, TableDef};

use super::error::SqlError;
use super::parser::{self, Statement};
use crate::connector::log_table::LogTable;

#[derive(Debug)]
pub struct WeirSchema {
    catalog: Arc<Catalog>,
    /// The context views are planned in; set once the context exists.
    context: OnceLock<Weak<SessionContext>>,
}

impl WeirSchema {
    pub fn new(catalog: Arc<Catalog>) -> Self {
        Self {
            catalog,
            context: OnceLock::new(),
        }
    }

    pub fn set_context(&self, ctx: &Arc<SessionContext>) {
        let _ = self.context.set(Arc::downgrade(ctx));
    }

    async fn view_table(&self, name: &str, query: &str) -> Result<Arc<dyn TableProvider>> {
        let ctx = self
            .context
            .get()
            .and_then(Weak::upgrade)
            .ok_or_else(|| DataFusionError::Internal("session context is gone".into()))?;
        let statement = match parser::parse(query)
            .map_err(external)?
            .pop()
            .map(|p| p.statement)
        {
            Some(Statement::Sql(s)) => s,
            _ => {
                return Err(external(SqlError::internal(format!(
                    "stored query of view \"{name}\" is not a query"
                ))))
            }
        };
        let plan = ctx
            .state()
            .statement_to_plan(DFStatement::Statement(statement))
            .await?;
        Ok(Arc::new(ViewTable::new(plan, Some(query.to_string()))))
    }
}

fn external(e: SqlError) -> DataFusionError {
    DataFusionError::External(Box::new(e))
}

#[async_trait]
impl SchemaProvider for WeirSchema {
    fn table_names(&self) -> Vec<String> {
        let mut names: Vec<String> = self
            .catalog
            .tables()
            .iter()
            .map(|t| t.name.clone())
            .collect();
        names.extend(self.catalog.views().iter().map(|v| v.name.clone()));
        names
    }

    async fn table(&self, name: &str) -> Result<Option<Arc<dyn TableProvider>>> {
        if let Some(def) = self.catalog.table(name) {
            return Ok(Some(match def.connector() {
                None => Arc::new(LogTable::new(def, self.catalog.table_log().clone())),
                Some(_) => Arc::new(ConnectorTable::new(def)),
            }));
        }
        match self.catalog.view(name) {
            Some(view) => self.view_table(name, &view.query).await.map(Some),
            None => Ok(None),
        }
    }

    async fn table_type(&self, name: &str) -> Result<Option<TableType>> {
        if self.catalog.table(name).is_some() {
            Ok(Some(TableType::Base))
        } else if self.catalog.view(name).is_some() {
            Ok(Some(TableType::View))
        } else {
            Ok(None)
        }
    }

    fn table_exist(&self, name: &str) -> bool {
        self.catalog.exists(name)
    }
}

/// A table read through a named connector. Its schema is known (for `\d`, DESCRIBE and
/// planning) but reading it needs the streaming runtime.
#[derive(Debug)]
pub struct ConnectorTable {
    def: Arc<TableDef>,
    schema: SchemaRef,
}

impl ConnectorTable {
    fn new(def: Arc<TableDef>) -> Self {
        let schema = def.schema();
        Self { def, schema }
    }
}

#[async_trait]
impl TableProvider for ConnectorTable {
    fn schema(&self) -> SchemaRef {
        self.schema.clone()
    }

    fn table_type(&self) -> TableType {
        TableType::Base
    }

    async fn scan(
        &self,
        _state: &dyn Session,
        _projection: Option<&Vec<usize>>,
        _filters: &[Expr],
        _limit: Option<usize>,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        Err(external(SqlError::not_supported(format!(
            "reading table \"{}\" through connector '{}' needs continuous queries, which this Weir \
             version does not run yet; only tables without a connector can be queried",
            self.def.name,
            self.def.connector().unwrap_or_default()
        ))))
    }
}
