//! Placeholder until the connector readers land (replaced by the connectors branch).

use weir_catalog::TableDef;

use super::io::{SinkWriter, SplitReader};
use crate::sql::error::{SqlError, SqlResult};

pub fn open_split(
    def: &TableDef,
    _split: usize,
    _splits: usize,
    _batch_size: usize,
) -> SqlResult<Box<dyn SplitReader>> {
    Err(SqlError::not_supported(format!(
        "connector {:?} cannot be read yet",
        def.connector()
    )))
}

pub fn is_bounded(_def: &TableDef) -> bool {
    false
}

pub fn open_sink(def: &TableDef, _subtask: usize, _job_id: &str) -> SqlResult<Box<dyn SinkWriter>> {
    Err(SqlError::not_supported(format!(
        "connector {:?} cannot be written yet",
        def.connector()
    )))
}
