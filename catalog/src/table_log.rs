//! The built-in table log: the durable, replayable append log behind every table that
//! was declared without a connector.
//!
//! Each `INSERT` appends whole Arrow batches under consecutive offsets in one atomic
//! store batch, together with the table's next offset, and returns only after a flush:
//! a statement is either entirely durable or absent. Readers replay entries from any
//! offset, which is what a streaming source rewinding to a checkpoint needs.

use std::io::Cursor;
use std::ops::Range;
use std::sync::{Arc, Mutex};

use arrow::ipc::reader::StreamReader;
use arrow::ipc::writer::StreamWriter;
use arrow::record_batch::RecordBatch;

use crate::error::{CatalogError, Result};
use crate::keys;
use crate::store::{StateStore, WriteBatch};
use crate::table_def::TableId;

/// Position of an entry in a table's log. Offsets start at 0 and have no gaps.
pub type Offset = u64;

#[derive(Debug, Clone)]
pub struct LogEntry {
    pub offset: Offset,
    pub batch: RecordBatch,
}

#[derive(Debug, Clone)]
pub struct TableLog {
    store: Arc<dyn StateStore>,
    /// Serialises appends so offsets are handed out without gaps or reuse.
    append_lock: Arc<Mutex<()>>,
}

impl TableLog {
    pub fn new(store: Arc<dyn StateStore>) -> Self {
        Self {
            store,
            append_lock: Arc::new(Mutex::new(())),
        }
    }

    /// Appends `batches` atomically and durably; blocks on the store's flush.
    /// Returns the offsets the batches were given.
    pub fn append(&self, table: TableId, batches: &[RecordBatch]) -> Result<Range<Offset>> {
        let batches: Vec<&RecordBatch> = batches.iter().filter(|b| b.num_rows() > 0).collect();
        let _guard = self.append_lock.lock().unwrap_or_else(|p| p.into_inner());
        let first = self.next_offset(table)?;
        if batches.is_empty() {
            return Ok(first..first);
        }
        let mut write = WriteBatch::default();
        let mut offset = first;
        for batch in batches {
            write.put(keys::log_entry(table, offset), encode(batch)?);
            offset += 1;
        }
        write.put(keys::log_next_offset(table), offset.to_be_bytes().to_vec());
        self.store.apply(write)?;
        self.store.flush()?;
        Ok(first..offset)
    }

    /// The offset the next appended entry will get (= number of entries).
    pub fn next_offset(&self, table: TableId) -> Result<Offset> {
        match self.store.get(&keys::log_next_offset(table))? {
            None => Ok(0),
            Some(bytes) => {
                let arr: [u8; 8] =
                    bytes
                        .as_slice()
                        .try_into()
                        .map_err(|_| CatalogError::Corrupt {
                            key: format!("lognext/{}", table.0),
                            reason: "expected 8 bytes".into(),
                        })?;
                Ok(u64::from_be_bytes(arr))
            }
        }
    }

    /// Every entry at or after `from`, in offset order.
    pub fn read_from(&self, table: TableId, from: Offset) -> Result<Vec<LogEntry>> {
        let prefix = keys::log_prefix(table);
        self.store
            .scan_prefix_from(&prefix, &keys::log_entry(table, from))?
            .into_iter()
            .map(|(key, value)| {
                let offset =
                    keys::offset_of_log_key(&key).ok_or_else(|| CatalogError::Corrupt {
                        key: String::from_utf8_lossy(&key).into_owned(),
                        reason: "log key without offset".into(),
                    })?;
                Ok(LogEntry {
                    offset,
                    batch: decode(&value)?,
                })
            })
            .collect()
    }

    /// Adds the deletion of a table's whole log to `write` (used by DROP TABLE).
    pub fn delete_into(&self, table: TableId, write: &mut WriteBatch) -> Result<()> {
        for (key, _) in self.store.scan_prefix(&keys::log_prefix(table))? {
            write.delete(key);
        }
        write.delete(keys::log_next_offset(table));
        Ok(())
    }
}

fn encode(batch: &RecordBatch) -> Result<Vec<u8>> {
    let mut buf = Vec::new();
    let mut writer = StreamWriter::try_new(&mut buf, batch.schema_ref())?;
    writer.write(batch)?;
    writer.finish()?;
    drop(writer);
    Ok(buf)
}

fn decode(bytes: &[u8]) -> Result<RecordBatch> {
    let mut reader = StreamReader::try_new(Cursor::new(bytes), None)?;
    match reader.next() {
        Some(batch) => Ok(batch?),
        None => Err(CatalogError::Corrupt {
            key: "log entry".into(),
            reason: "no record batch in entry".into(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{MemoryStore, SledStore};
    use arrow::array::{Int64Array, StringArray};
    use arrow::datatypes::{DataType, Field, Schema};

    fn batch(ids: &[i64]) -> RecordBatch {
        let schema = Arc::new(Schema::new(vec![
            Field::new("id", DataType::Int64, false),
            Field::new("name", DataType::Utf8, true),
        ]));
        let names: Vec<Option<String>> = ids.iter().map(|i| Some(format!("n{i}"))).collect();
        RecordBatch::try_new(
            schema,
            vec![
                Arc::new(Int64Array::from(ids.to_vec())),
                Arc::new(StringArray::from(names)),
            ],
        )
        .unwrap()
    }

    #[test]
    fn appends_get_consecutive_offsets_and_replay_from_any_offset() {
        let log = TableLog::new(Arc::new(MemoryStore::default()));
        let t = TableId(7);
        assert_eq!(log.append(t, &[batch(&[1, 2]), batch(&[3])]).unwrap(), 0..2);
        assert_eq!(log.append(t, &[batch(&[4])]).unwrap(), 2..3);
        assert_eq!(log.append(t, &[batch(&[])]).unwrap(), 3..3);
        let all = log.read_from(t, 0).unwrap();
        assert_eq!(
            all.iter().map(|e| e.offset).collect::<Vec<_>>(),
            vec![0, 1, 2]
        );
        assert_eq!(all[0].batch, batch(&[1, 2]));
        let tail = log.read_from(t, 2).unwrap();
        assert_eq!(tail.len(), 1);
        assert_eq!(tail[0].batch, batch(&[4]));
        // Another table's log is separate.
        assert!(log.read_from(TableId(8), 0).unwrap().is_empty());
    }

    #[test]
    fn log_survives_reopen_and_delete_clears_it() {
        let dir = tempfile::tempdir().unwrap();
        let t = TableId(1);
        {
            let log = TableLog::new(Arc::new(SledStore::open(dir.path()).unwrap()));
            log.append(t, &[batch(&[1, 2, 3])]).unwrap();
        }
        let store: Arc<dyn StateStore> = Arc::new(SledStore::open(dir.path()).unwrap());
        let log = TableLog::new(store.clone());
        assert_eq!(log.next_offset(t).unwrap(), 1);
        assert_eq!(log.read_from(t, 0).unwrap()[0].batch, batch(&[1, 2, 3]));
        let mut write = WriteBatch::default();
        log.delete_into(t, &mut write).unwrap();
        store.apply(write).unwrap();
        assert!(log.read_from(t, 0).unwrap().is_empty());
        assert_eq!(log.next_offset(t).unwrap(), 0);
    }
}
