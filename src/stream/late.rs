//! The late-data table: rows a window operator drops as late are appended to a table the
//! user names with `SET 'weir.late-data-table' = 't'`, so they can be queried and replayed.
//! Columns are matched by name; `late_watermark` receives the watermark the row met and
//! `late_operator` the operator that dropped it; other columns are NULL.

use std::sync::Arc;

use datafusion::arrow::array::{
    new_null_array, ArrayRef, Int64Array, RecordBatch, StringArray, UInt32Array,
};
use datafusion::arrow::compute::{cast, take};
use datafusion::arrow::datatypes::{DataType, TimeUnit};
use datafusion::common::Result;
use weir_catalog::{Catalog, TableDef};

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

    /// Records rows `indices` of `rows`, which met `watermarks`, as dropped by `operator`.
    pub fn record(
        &self,
        operator: &str,
        rows: &RecordBatch,
        indices: Vec<u32>,
        watermarks: Vec<i64>,
    ) -> Result<()> {
        if indices.is_empty() {
            return Ok(());
        }
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
        let batch = crate::stream::batch_of(schema, columns, n)?;
        // Written before the operator goes on, so the epoch that follows (and FLUSH) covers
        // them; late rows are few, so waiting for the log here costs little.
        crate::stream::block_on(crate::connector::log_table::append(
            self.catalog.table_log(),
            &self.def,
            vec![batch],
        ))
    }
}
