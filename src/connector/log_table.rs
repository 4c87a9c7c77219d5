//! Tables backed by Weir's own log, as DataFusion sees them: a scan replays the log,
//! an INSERT appends to it atomically.

use std::fmt;
use std::sync::Arc;

use async_trait::async_trait;
use datafusion::arrow::array::{Array, ArrayRef, RecordBatch};
use datafusion::arrow::datatypes::SchemaRef;
use datafusion::catalog::{Session, TableProvider};
use datafusion::common::{DFSchema, Result};
use datafusion::datasource::memory::MemorySourceConfig;
use datafusion::datasource::sink::{DataSink, DataSinkExec};
use datafusion::datasource::TableType;
use datafusion::error::DataFusionError;
use datafusion::execution::{SendableRecordBatchStream, TaskContext};
use datafusion::logical_expr::dml::InsertOp;
use datafusion::logical_expr::Expr;
use datafusion::physical_expr::PhysicalExpr;
use datafusion::physical_plan::{DisplayAs, DisplayFormatType, ExecutionPlan};
use futures::TryStreamExt;
use weir_catalog::{TableDef, TableLog};

use crate::sql::error::{sqlstate, SqlError};

/// A table without a connector: its rows are the entries of its log.
#[derive(Debug)]
pub struct LogTable {
    def: Arc<TableDef>,
    log: TableLog,
    schema: SchemaRef,
}

impl LogTable {
    pub fn new(def: Arc<TableDef>, log: TableLog) -> Self {
        let schema = def.schema();
        Self { def, log, schema }
    }

    pub fn def(&self) -> &Arc<TableDef> {
        &self.def
    }

    /// Physical expressions for the computed columns, planned against the stored columns.
    fn computed_exprs(&self, state: &dyn Session) -> Result<Vec<Arc<dyn PhysicalExpr>>> {
        if self.def.computed.is_empty() {
            return Ok(vec![]);
        }
        let physical = DFSchema::try_from(self.def.physical_schema().as_ref().clone())?;
        self.def
            .computed
            .iter()
            .map(|c| {
                let expr = crate::sql::expr::parse_sql_expr(&c.expr, &physical, state)?;
                state.create_physical_expr(expr, &physical)
            })
            .collect()
    }
}

#[async_trait]
impl TableProvider for LogTable {
    fn schema(&self) -> SchemaRef {
        self.schema.clone()
    }

    fn table_type(&self) -> TableType {
        TableType::Base
    }

    async fn scan(
        &self,
        state: &dyn Session,
        projection: Option<&Vec<usize>>,
        _filters: &[Expr],
        _limit: Option<usize>,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        let log = self.log.clone();
        let id = self.def.id;
        let entries = tokio::task::spawn_blocking(move || log.read_from(id, 0))
            .await
            .map_err(|e| DataFusionError::External(Box::new(e)))?
            .map_err(|e| DataFusionError::External(Box::new(e)))?;
        let computed = self.computed_exprs(state)?;
        let batches = entries
            .into_iter()
            .map(|entry| with_computed_columns(entry.batch, &computed, &self.schema))
            .collect::<Result<Vec<_>>>()?;
        Ok(MemorySourceConfig::try_new_exec(
            &[batches],
            self.schema.clone(),
            projection.cloned(),
        )?)
    }

    async fn insert_into(
        &self,
        _state: &dyn Session,
        input: Arc<dyn ExecutionPlan>,
        insert_op: InsertOp,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        if insert_op != InsertOp::Append {
            return Err(DataFusionError::External(Box::new(SqlError::not_supported(
                format!("{insert_op} is not supported: tables in Weir's log only take appends (INSERT INTO)"),
            ))));
        }
        let sink = LogSink {
            def: self.def.clone(),
            log: self.log.clone(),
            schema: self.schema.clone(),
        };
        Ok(Arc::new(DataSinkExec::new(input, Arc::new(sink), None)))
    }
}

fn with_computed_columns(
    batch: RecordBatch,
    computed: &[Arc<dyn PhysicalExpr>],
    schema: &SchemaRef,
) -> Result<RecordBatch> {
    if computed.is_empty() {
        return Ok(batch.with_schema(schema.clone())?);
    }
    let mut columns: Vec<ArrayRef> = batch.columns().to_vec();
    for expr in computed {
        columns.push(expr.evaluate(&batch)?.into_array(batch.num_rows())?);
    }
    Ok(RecordBatch::try_new(schema.clone(), columns)?)
}

static APPENDS: std::sync::LazyLock<tokio::sync::watch::Sender<u64>> =
    std::sync::LazyLock::new(|| tokio::sync::watch::Sender::new(0));

/// Changes after every append to any table's log: sources following a log wait on it.
pub fn appends() -> tokio::sync::watch::Receiver<u64> {
    APPENDS.subscribe()
}

/// Appends batches to a table's log durably, then wakes the sources that follow it.
pub async fn append(log: &TableLog, def: &TableDef, batches: Vec<RecordBatch>) -> Result<()> {
    let log = log.clone();
    let id = def.id;
    tokio::task::spawn_blocking(move || log.append(id, &batches))
        .await
        .map_err(|e| DataFusionError::External(Box::new(e)))?
        .map_err(|e| DataFusionError::External(Box::new(SqlError::from(e))))?;
    APPENDS.send_modify(|n| *n += 1);
    Ok(())
}

/// Collects a whole INSERT, checks it, and appends it to the log in one durable step.
#[derive(Debug)]
struct LogSink {
    def: Arc<TableDef>,
    log: TableLog,
    /// The table's full schema (stored and computed columns): what DataFusion feeds us.
    schema: SchemaRef,
}

impl DisplayAs for LogSink {
    fn fmt_as(&self, _t: DisplayFormatType, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "LogSink: table={}", self.def.name)
    }
}

#[async_trait]
impl DataSink for LogSink {
    fn schema(&self) -> &SchemaRef {
        &self.schema
    }

    async fn write_all(
        &self,
        data: SendableRecordBatchStream,
        _context: &Arc<TaskContext>,
    ) -> Result<u64> {
        let batches: Vec<RecordBatch> = data.try_collect().await?;
        let physical = self.def.physical_schema();
        let stored = batches
            .iter()
            .map(|b| self.to_stored(b, &physical))
            .collect::<Result<Vec<_>>>()?;
        let rows: usize = stored.iter().map(|b| b.num_rows()).sum();
        append(&self.log, &self.def, stored).await?;
        Ok(rows as u64)
    }
}

impl LogSink {
    /// Drops computed columns and enforces NOT NULL on the stored ones.
    fn to_stored(&self, batch: &RecordBatch, physical: &SchemaRef) -> Result<RecordBatch> {
        let columns: Vec<ArrayRef> = batch.columns()[..physical.fields().len()].to_vec();
        for (field, column) in physical.fields().iter().zip(&columns) {
            if !field.is_nullable() && column.null_count() > 0 {
                return Err(DataFusionError::External(Box::new(SqlError::new(
                    sqlstate::NOT_NULL_VIOLATION,
                    format!(
                        "null value in column \"{}\" of relation \"{}\" violates not-null constraint",
                        field.name(),
                        self.def.name
                    ),
                ))));
            }
        }
        Ok(RecordBatch::try_new(physical.clone(), columns)?)
    }
}
