//! The late-data table: rows a window operator drops as late are appended to a table the
//! user names with `SET 'weir.late-data-table' = 't'`, so they can be queried and replayed.
//! Columns are matched by name; `late_watermark` receives the watermark the row met and
//! `late_operator` the operator that dropped it; other columns are NULL.
//!
//! An operator subtask holds the rows it drops until its next barrier; they go with its
//! snapshot and reach the table when that epoch commits, marked with the epoch, so rows
//! dropped again when a restarted job replays its input are not written twice.

use std::sync::Arc;

use datafusion::arrow::array::{
    new_null_array, ArrayRef, Int64Array, RecordBatch, StringArray, UInt32Array,
};
use datafusion::arrow::compute::{cast, take};
use datafusion::arrow::datatypes::{DataType, TimeUnit};
use datafusion::common::Result;
use weir_catalog::{Catalog, TableDef};

use super::message::ChangeBatch;

pub struct LateRows {
    def: Arc<TableDef>,
    catalog: Arc<Catalog>,
}

impl std::fmt::Debug for LateRows {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "LateRows({})", self.def.name)
    }
}

impl LateRows {
    /// Appends to `def`, a table in Weir's log.
    pub fn new(def: Arc<TableDef>, catalog: Arc<Catalog>) -> Arc<Self> {
        Arc::new(Self { def, catalog })
    }

    /// Rows `indices` of `rows`, which met `watermarks`, as the table's rows of rows
    /// dropped by `operator`.
    fn table_rows(
        &self,
        operator: &str,
        rows: &RecordBatch,
        indices: Vec<u32>,
        watermarks: Vec<i64>,
    ) -> Result<RecordBatch> {
        let n = indices.len();
        let indices = UInt32Array::from(indices);
        let schema = self.def.physical_schema();
        let columns = schema
            .fields()
            .iter()
            .map(|field| -> Result<ArrayRef> {
                let ty = field.data_type();
                let array: ArrayRef = match field.name().as_str() {
                    "late_watermark" => {
                        let ms: ArrayRef = Arc::new(Int64Array::from(watermarks.clone()));
                        cast(
                            &cast(&ms, &DataType::Timestamp(TimeUnit::Millisecond, None))?,
                            ty,
                        )?
                    }
                    "late_operator" => cast(
                        &(Arc::new(StringArray::from(vec![operator; n])) as ArrayRef),
                        ty,
                    )?,
                    name => match rows.schema().index_of(name) {
                        Ok(i) => cast(&take(rows.column(i), &indices, None)?, ty)?,
                        Err(_) => new_null_array(ty, n),
                    },
                };
                Ok(array)
            })
            .collect::<Result<Vec<_>>>()?;
        crate::stream::batch_of(schema, columns, n)
    }

    /// Appends the rows dropped in `epoch`, unless `marker` (the job's, in the log's
    /// store) says that epoch's were appended already (its commit is being redone).
    pub async fn commit(
        &self,
        rows: Vec<RecordBatch>,
        marker: Option<Vec<u8>>,
        epoch: u64,
    ) -> Result<()> {
        let changes = rows.into_iter().map(ChangeBatch::new).collect();
        crate::connector::log_table::append_once(
            self.catalog.table_log(),
            &self.def,
            changes,
            marker,
            epoch,
        )
        .await
    }
}

/// One operator subtask's rows dropped as late since its last barrier.
#[derive(Debug)]
pub struct LateRecorder {
    table: Arc<LateRows>,
    held: Vec<RecordBatch>,
}

impl LateRecorder {
    pub fn new(table: Arc<LateRows>) -> Self {
        Self {
            table,
            held: Vec::new(),
        }
    }

    /// Keeps rows `indices` of `rows`, which met `watermarks`, as dropped by `operator`.
    pub fn record(
        &mut self,
        operator: &str,
        rows: &RecordBatch,
        indices: Vec<u32>,
        watermarks: Vec<i64>,
    ) -> Result<()> {
        if !indices.is_empty() {
            let rows = self.table.table_rows(operator, rows, indices, watermarks)?;
            self.held.push(rows);
        }
        Ok(())
    }

    /// The rows kept since the last call, for the barrier's snapshot.
    pub fn take(&mut self) -> Vec<RecordBatch> {
        std::mem::take(&mut self.held)
    }
}
