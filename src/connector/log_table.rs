//! Tables backed by Weir's own log, as DataFusion sees them: a scan replays the log
//! (a keyed table's current rows), an INSERT appends to it atomically (upserting into a
//! keyed table), and UPDATE and DELETE append the changes they make to a keyed table.

use std::fmt;
use std::sync::Arc;

use async_trait::async_trait;
use datafusion::arrow::array::{Array, ArrayRef, BooleanArray, Int8Array, RecordBatch};
use datafusion::arrow::compute::kernels::cmp::distinct;
use datafusion::arrow::compute::{filter_record_batch, interleave, not, or};
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
use weir_catalog::{op, Changes, TableDef, TableLog};

use crate::sql::error::{sqlstate, SqlError, SqlResult};
use crate::stream::message::ChangeBatch;

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
    pub(crate) fn computed_exprs(&self, state: &dyn Session) -> Result<Vec<Arc<dyn PhysicalExpr>>> {
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
        let def = self.def.clone();
        let rows = tokio::task::spawn_blocking(move || log.current(&def))
            .await
            .map_err(|e| DataFusionError::External(Box::new(e)))?
            .map_err(|e| DataFusionError::External(Box::new(e)))?;
        let computed = self.computed_exprs(state)?;
        let batches = rows
            .into_iter()
            .map(|batch| with_computed_columns(batch, &computed, &self.schema))
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

pub(crate) fn with_computed_columns(
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

/// Appends inserts to a table's log durably (upserts into a keyed table), then wakes the
/// sources that follow it.
pub async fn append(log: &TableLog, def: &TableDef, batches: Vec<RecordBatch>) -> Result<()> {
    write(
        log,
        def,
        batches.into_iter().map(Changes::inserts).collect(),
    )
    .await
}

/// Appends a job's changes for `epoch` (a table with a primary key takes updates and
/// deletes: the planner lets only such tables take them) unless `marker` says that epoch
/// was appended already (the commit is redone after a crash). An epoch without changes
/// writes nothing.
pub async fn append_once(
    log: &TableLog,
    def: &TableDef,
    changes: Vec<ChangeBatch>,
    marker: Option<Vec<u8>>,
    epoch: u64,
) -> Result<()> {
    if changes.is_empty() {
        return Ok(());
    }
    let changes = changes
        .into_iter()
        .map(|c| Changes {
            rows: c.rows,
            ops: c.ops,
        })
        .collect();
    write_marked(log, def, changes, marker.map(|m| (m, epoch))).await
}

async fn write(log: &TableLog, def: &TableDef, changes: Vec<Changes>) -> Result<()> {
    write_marked(log, def, changes, None).await
}

async fn write_marked(
    log: &TableLog,
    def: &TableDef,
    changes: Vec<Changes>,
    marker: Option<(Vec<u8>, u64)>,
) -> Result<()> {
    for c in &changes {
        check_keys(def, &c.rows).map_err(|e| DataFusionError::External(Box::new(e)))?;
    }
    let log = log.clone();
    let def = def.clone();
    tokio::task::spawn_blocking(move || match marker {
        Some((marker, epoch)) => log.write_once(&def, &changes, &marker, epoch).map(|_| ()),
        None => log.write(&def, &changes).map(|_| ()),
    })
    .await
    .map_err(|e| DataFusionError::External(Box::new(e)))?
    .map_err(|e| DataFusionError::External(Box::new(SqlError::from(e))))?;
    APPENDS.send_modify(|n| *n += 1);
    Ok(())
}

/// Refuses NULL in a primary key column: a keyed table's rows are found by their key.
fn check_keys(def: &TableDef, rows: &RecordBatch) -> SqlResult<()> {
    for key in &def.primary_key {
        let Some(column) = rows.column_by_name(key) else {
            continue;
        };
        if column.null_count() > 0 {
            return Err(
                not_null_violation(key, &def.name).with_hint("primary key columns cannot be NULL")
            );
        }
    }
    Ok(())
}

fn not_null_violation(column: &str, table: &str) -> SqlError {
    SqlError::new(
        sqlstate::NOT_NULL_VIOLATION,
        format!(
            "null value in column \"{column}\" of relation \"{table}\" violates not-null constraint"
        ),
    )
}

/// `schema` with every column nullable: rows to check before they are stored.
fn nullable(schema: &SchemaRef) -> SchemaRef {
    Arc::new(datafusion::arrow::datatypes::Schema::new(
        schema
            .fields()
            .iter()
            .map(|f| f.as_ref().clone().with_nullable(true))
            .collect::<Vec<_>>(),
    ))
}

/// Refuses NULL in the stored columns declared NOT NULL.
fn check_not_null(def: &TableDef, rows: &RecordBatch) -> SqlResult<()> {
    for (column, c) in rows.columns().iter().zip(&def.columns) {
        if !c.nullable && column.null_count() > 0 {
            return Err(not_null_violation(&c.name, &def.name));
        }
    }
    check_keys(def, rows)
}

/// What UPDATE or DELETE does to the rows of a keyed table that `predicate` selects
/// (all rows without one): `new_values` (one expression per stored column, over the
/// full row) replaces them, or they are deleted when it is `None`.
pub struct RowChange {
    pub predicate: Option<Arc<dyn PhysicalExpr>>,
    pub new_values: Option<Vec<Arc<dyn PhysicalExpr>>>,
}

impl LogTable {
    /// Applies `change` to the current rows atomically (no other write to the table in
    /// between) and returns how many rows it selected.
    pub async fn change_rows(&self, state: &dyn Session, change: RowChange) -> SqlResult<u64> {
        if self.def.primary_key.is_empty() {
            return Err(needs_primary_key(&self.def.name));
        }
        let computed = self.computed_exprs(state)?;
        let (log, def, schema) = (self.log.clone(), self.def.clone(), self.schema.clone());
        let count = tokio::task::spawn_blocking(move || {
            log.modify(&def, |current| {
                changes_of(&def, &schema, &computed, &change, current)
            })
        })
        .await
        .map_err(|e| SqlError::internal(format!("UPDATE task failed: {e}")))??;
        APPENDS.send_modify(|n| *n += 1);
        Ok(count)
    }
}

/// The error of UPDATE or DELETE on a table without a primary key.
pub fn needs_primary_key(table: &str) -> SqlError {
    SqlError::not_supported(format!(
        "table \"{table}\" has no primary key, so its rows cannot be updated or deleted: \
         Weir's tables without a key are append-only logs"
    ))
    .with_hint(format!(
        "create the table with PRIMARY KEY (...) NOT ENFORCED to make \"{table}\" updatable"
    ))
}

/// The changes `change` makes to `current`, in an order that keeps the key index right
/// when keys change: -U/+U pairs of rows that keep their key, then -D of the rows whose
/// key changes, then +I of their new rows (replacing whatever row has that key by then).
fn changes_of(
    def: &TableDef,
    schema: &SchemaRef,
    computed: &[Arc<dyn PhysicalExpr>],
    change: &RowChange,
    current: Vec<RecordBatch>,
) -> SqlResult<(Vec<Changes>, u64)> {
    let physical = def.physical_schema();
    let stored = physical.fields().len();
    let keys: Vec<usize> = def
        .primary_key
        .iter()
        .filter_map(|k| physical.index_of(k).ok())
        .collect();
    let (mut pairs, mut deleted, mut inserted) = (vec![], vec![], vec![]);
    let mut count = 0u64;
    for batch in current {
        let full = with_computed_columns(batch, computed, schema)?;
        let selected = match &change.predicate {
            Some(p) => {
                let mask = p.evaluate(&full)?.into_array(full.num_rows())?;
                let mask = mask
                    .as_any()
                    .downcast_ref::<BooleanArray>()
                    .ok_or_else(|| {
                        SqlError::new(
                            sqlstate::DATATYPE_MISMATCH,
                            "argument of WHERE must be type boolean",
                        )
                    })?
                    .clone();
                filter_record_batch(&full, &mask)?
            }
            None => full,
        };
        let n = selected.num_rows();
        if n == 0 {
            continue;
        }
        count += n as u64;
        let old = RecordBatch::try_new(physical.clone(), selected.columns()[..stored].to_vec())?;
        let Some(values) = &change.new_values else {
            deleted.push(old);
            continue;
        };
        let columns = values
            .iter()
            .zip(physical.fields())
            .map(|(e, f)| {
                let v = e.evaluate(&selected)?.into_array(n)?;
                Ok(if v.data_type() == f.data_type() {
                    v
                } else {
                    datafusion::arrow::compute::cast(&v, f.data_type())?
                })
            })
            .collect::<Result<Vec<ArrayRef>>>()?;
        let new = RecordBatch::try_new_with_options(
            nullable(&physical),
            columns,
            &datafusion::arrow::record_batch::RecordBatchOptions::new().with_row_count(Some(n)),
        )?;
        check_not_null(def, &new)?;
        let new = RecordBatch::try_new(physical.clone(), new.columns().to_vec())?;
        let mut moved = BooleanArray::from(vec![false; n]);
        for &k in &keys {
            moved = or(&moved, &distinct(old.column(k), new.column(k))?)?;
        }
        let kept = not(&moved)?;
        let (old_kept, new_kept) = (
            filter_record_batch(&old, &kept)?,
            filter_record_batch(&new, &kept)?,
        );
        if old_kept.num_rows() > 0 {
            pairs.push(update_pairs(&old_kept, &new_kept)?);
        }
        deleted.push(filter_record_batch(&old, &moved)?);
        inserted.push(filter_record_batch(&new, &moved)?);
    }
    let with_op = |rows: RecordBatch, code: i8| Changes {
        ops: (code != op::INSERT).then(|| Int8Array::from(vec![code; rows.num_rows()])),
        rows,
    };
    let changes = pairs
        .into_iter()
        .chain(deleted.into_iter().map(|b| with_op(b, op::DELETE)))
        .chain(inserted.into_iter().map(|b| with_op(b, op::INSERT)))
        .filter(|c| c.rows.num_rows() > 0)
        .collect();
    Ok((changes, count))
}

/// -U old row, +U new row, for each row.
fn update_pairs(old: &RecordBatch, new: &RecordBatch) -> SqlResult<Changes> {
    let picks: Vec<(usize, usize)> = (0..old.num_rows()).flat_map(|i| [(0, i), (1, i)]).collect();
    let columns = (0..old.num_columns())
        .map(|j| interleave(&[old.column(j).as_ref(), new.column(j).as_ref()], &picks))
        .collect::<std::result::Result<Vec<_>, _>>()?;
    let ops = (0..old.num_rows())
        .flat_map(|_| [op::UPDATE_BEFORE, op::UPDATE_AFTER])
        .collect::<Vec<_>>();
    Ok(Changes {
        rows: RecordBatch::try_new(old.schema(), columns)?,
        ops: Some(Int8Array::from(ops)),
    })
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
    /// Drops computed columns and enforces NOT NULL on the stored ones (and the key).
    fn to_stored(&self, batch: &RecordBatch, physical: &SchemaRef) -> Result<RecordBatch> {
        let columns: Vec<ArrayRef> = batch.columns()[..physical.fields().len()].to_vec();
        let stored = RecordBatch::try_new_with_options(
            nullable(physical),
            columns.clone(),
            &datafusion::arrow::record_batch::RecordBatchOptions::new()
                .with_row_count(Some(batch.num_rows())),
        )?;
        check_not_null(&self.def, &stored).map_err(|e| DataFusionError::External(Box::new(e)))?;
        Ok(RecordBatch::try_new(physical.clone(), columns)?)
    }
}

#[cfg(test)]
mod tests {
    use weir_catalog::op;

    use crate::stream::message::Op;

    /// The log stores the runtime's op codes.
    #[test]
    fn log_op_codes_are_the_runtimes() {
        assert_eq!(op::INSERT, Op::Insert as i8);
        assert_eq!(op::UPDATE_BEFORE, Op::UpdateBefore as i8);
        assert_eq!(op::UPDATE_AFTER, Op::UpdateAfter as i8);
        assert_eq!(op::DELETE, Op::Delete as i8);
    }
}
