//! Tables declared with a named connector (kafka, filesystem, ...). Their schema is
//! known, so planning and introspection see them; reading them needs the streaming
//! runtime, which is not built yet, and says so.

use std::sync::Arc;

use async_trait::async_trait;
use datafusion::arrow::datatypes::SchemaRef;
use datafusion::catalog::{Session, TableProvider};
use datafusion::common::Result;
use datafusion::datasource::TableType;
use datafusion::error::DataFusionError;
use datafusion::logical_expr::Expr;
use datafusion::physical_plan::ExecutionPlan;
use weir_catalog::TableDef;

use crate::sql::error::SqlError;

/// A table read through a named connector. Its schema is known (for `\d`, DESCRIBE and
/// planning) but reading it needs the streaming runtime.
#[derive(Debug)]
pub struct ConnectorTable {
    def: Arc<TableDef>,
    schema: SchemaRef,
}

impl ConnectorTable {
    pub fn new(def: Arc<TableDef>) -> Self {
        let schema = def.schema();
        Self { def, schema }
    }

    pub fn def(&self) -> &Arc<TableDef> {
        &self.def
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
        Err(DataFusionError::External(Box::new(
            SqlError::not_supported(format!(
                "table \"{}\" ('{}') is read by the streaming engine, not as a snapshot",
                self.def.name,
                self.def.connector().unwrap_or_default()
            )),
        )))
    }
}
