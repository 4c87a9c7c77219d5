//! The streaming runtime: messages, operators, tasks and exchanges.

pub mod changelog;
pub mod checkpoint;
pub mod exchange;
pub mod failpoint;
pub mod flat_rows;
pub mod graph;
pub mod job;
pub mod late;
pub mod latency;
pub mod manager;
pub mod message;
pub mod mv;
pub mod operator;
pub mod ops;
pub mod sink;
pub mod snapshot;
pub mod source;
pub mod state_backend;
pub mod view_rows;
pub mod window;

/// Runs DataFusion work from inside a synchronous operator. On the multi-threaded runtime
/// the worker hands its other tasks over first, so DataFusion's own tasks can progress.
pub fn block_on<F: std::future::Future>(future: F) -> F::Output {
    use tokio::runtime::{Handle, RuntimeFlavor};
    match Handle::try_current() {
        Ok(handle) if handle.runtime_flavor() == RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(|| handle.block_on(future))
        }
        _ => futures::executor::block_on(future),
    }
}

/// A batch of `columns` with `rows` rows; with no columns (`SELECT count(*)` reads none)
/// the row count is all a batch carries.
pub fn batch_of(
    schema: datafusion::arrow::datatypes::SchemaRef,
    columns: Vec<datafusion::arrow::array::ArrayRef>,
    rows: usize,
) -> datafusion::common::Result<datafusion::arrow::record_batch::RecordBatch> {
    let options =
        datafusion::arrow::record_batch::RecordBatchOptions::new().with_row_count(Some(rows));
    Ok(
        datafusion::arrow::record_batch::RecordBatch::try_new_with_options(
            schema, columns, &options,
        )?,
    )
}

/// The bytes `column` refers to. Columns read back from a checkpoint share the buffer of
/// the message they were decoded from, which each would count whole.
pub fn column_bytes(column: &dyn datafusion::arrow::array::Array) -> usize {
    column
        .to_data()
        .get_slice_memory_size()
        .unwrap_or_else(|_| column.get_array_memory_size())
}

/// The bytes `batch`'s columns refer to (a slice counts its rows, not its buffers).
pub fn batch_bytes(batch: &datafusion::arrow::record_batch::RecordBatch) -> usize {
    batch
        .columns()
        .iter()
        .map(|c| column_bytes(c.as_ref()))
        .sum()
}

/// A RowConverter for rows of `fields`, ordered as arrow orders them by default: for keys
/// compared and hashed by their bytes.
pub fn row_converter(
    fields: &[datafusion::arrow::datatypes::FieldRef],
) -> datafusion::common::Result<datafusion::arrow::row::RowConverter> {
    Ok(datafusion::arrow::row::RowConverter::new(
        fields
            .iter()
            .map(|f| datafusion::arrow::row::SortField::new(f.data_type().clone()))
            .collect(),
    )?)
}
