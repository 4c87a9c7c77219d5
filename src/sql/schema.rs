//! Weir's catalog as a DataFusion schema (`weir.public`): tables without a connector
//! read their log, views are planned from their stored query each time they are used.

use std::sync::{Arc, OnceLock, Weak};

use async_trait::async_trait;
use datafusion::catalog::{SchemaProvider, TableProvider};
use datafusion::common::Result;
use datafusion::datasource::{TableType, ViewTable};
use datafusion::error::DataFusionError;
use datafusion::prelude::SessionContext;
use datafusion::sql::parser::Statement as DFStatement;
use weir_catalog::Catalog;

use super::error::SqlError;
use super::parser::{self, Statement};
use crate::connector::connector_table::ConnectorTable;
use crate::connector::log_table::LogTable;
use crate::plan::window_table::WindowTvfTable;
use crate::plan::window_tvf::WindowSpec;
use crate::stream::manager::Jobs;
use crate::stream::mv::MvTable;

#[derive(Debug)]
pub struct WeirSchema {
    catalog: Arc<Catalog>,
    jobs: Arc<Jobs>,
    /// The context views are planned in; set once the context exists.
    context: OnceLock<Weak<SessionContext>>,
}

impl WeirSchema {
    pub fn new(catalog: Arc<Catalog>, jobs: Arc<Jobs>) -> Self {
        Self {
            catalog,
            jobs,
            context: OnceLock::new(),
        }
    }

    pub fn set_context(&self, ctx: &Arc<SessionContext>) {
        let _ = self.context.set(Arc::downgrade(ctx));
    }
}

/// Plans a view's stored query in the context, each time the view is used, so it sees
/// the tables as they are now.
pub async fn view_table(
    context: &OnceLock<Weak<SessionContext>>,
    name: &str,
    query: &str,
) -> Result<Arc<dyn TableProvider>> {
    let ctx = context
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
        if let Some(spec) = WindowSpec::from_table_name(name) {
            let input = Box::pin(self.table(&spec.table))
                .await?
                .ok_or_else(|| external(SqlError::undefined_table(&spec.table)))?;
            return Ok(Some(Arc::new(WindowTvfTable::try_new(spec, input)?)));
        }
        if let Some(def) = self.catalog.table(name) {
            if def.connector() == Some("upsert-kafka") {
                let query = crate::connector::kafka::upsert_query(&def);
                return view_table(&self.context, name, &query).await.map(Some);
            }
            return Ok(Some(match def.connector() {
                None => Arc::new(LogTable::new(def, self.catalog.table_log().clone())),
                Some(_) => Arc::new(ConnectorTable::new(def)),
            }));
        }
        if let Some(table) = name.strip_suffix(crate::connector::kafka::CHANGELOG_SUFFIX) {
            if let Some(def) = self.catalog.table(table) {
                if def.connector() == Some("upsert-kafka") {
                    let changelog = crate::connector::kafka::changelog_table(&def);
                    return Ok(Some(Arc::new(ConnectorTable::new(Arc::new(changelog)))));
                }
            }
        }
        match self.catalog.view(name) {
            Some(view) if view.materialized => match self.jobs.view(name) {
                Some(state) => Ok(Some(Arc::new(MvTable { state }))),
                None => Err(external(SqlError::new(
                    "55000",
                    format!("materialized view \"{name}\" is not running"),
                ))),
            },
            Some(view) => view_table(&self.context, name, &view.query).await.map(Some),
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
