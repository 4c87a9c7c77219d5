//! The built-in table log: the durable, replayable append log behind every table that
//! was declared without a connector.
//!
//! Each `INSERT` appends whole Arrow batches under consecutive offsets in one atomic
//! store batch, together with the table's next offset, and returns only after a flush:
//! a statement is either entirely durable or absent. Readers replay entries from any
//! offset, which is what a streaming source rewinding to a checkpoint needs.
//!
//! An entry may carry each row's change (+I, -U, +U, -D): the log of a table with a
//! primary key is a changelog, normalised against the table's current rows when written
//! (see [`crate::keyed`]). Entries without changes are inserts, as every entry written
//! before keyed tables existed is.

use std::collections::HashMap;
use std::io::Cursor;
use std::ops::Range;
use std::sync::{Arc, Mutex, MutexGuard};

use arrow::array::{Array, ArrayRef, Int8Array};
use arrow::datatypes::{DataType, Field, Schema};
use arrow::ipc::reader::StreamReader;
use arrow::ipc::writer::StreamWriter;
use arrow::record_batch::RecordBatch;

use crate::error::{CatalogError, Result};
use crate::keyed::KeyedRows;
use crate::keys;
use crate::store::{StateStore, WriteBatch};
use crate::table_def::{TableDef, TableId};

/// Position of an entry in a table's log. Offsets start at 0 and have no gaps.
pub type Offset = u64;

/// The change a row makes, by the codes the streaming runtime uses (its `Op`).
pub mod op {
    pub const INSERT: i8 = 0;
    pub const UPDATE_BEFORE: i8 = 1;
    pub const UPDATE_AFTER: i8 = 2;
    pub const DELETE: i8 = 3;

    /// Whether the row is taken away (-U, -D) rather than added (+I, +U).
    pub fn retracts(code: i8) -> bool {
        code == UPDATE_BEFORE || code == DELETE
    }
}

/// Rows and each row's change ([`op`] codes); `ops: None` means every row is an insert.
#[derive(Debug, Clone, PartialEq)]
pub struct Changes {
    pub rows: RecordBatch,
    pub ops: Option<Int8Array>,
}

impl Changes {
    pub fn inserts(rows: RecordBatch) -> Self {
        Self { rows, ops: None }
    }

    pub fn op(&self, i: usize) -> i8 {
        self.ops.as_ref().map_or(op::INSERT, |o| o.value(i))
    }
}

#[derive(Debug, Clone)]
pub struct LogEntry {
    pub offset: Offset,
    pub batch: RecordBatch,
    /// Each row's change; `None`: all inserts.
    pub ops: Option<Int8Array>,
}

/// The stored batch's last column holds the ops when its schema has this metadata key.
const OPS_METADATA: &str = "weir.ops";
const OPS_COLUMN: &str = "__weir_op";

#[derive(Debug, Clone)]
pub struct TableLog {
    store: Arc<dyn StateStore>,
    /// Serialises appends so offsets are handed out without gaps or reuse, and holds the
    /// current rows of keyed tables (built on first use, then kept up to date by writes).
    writes: Arc<Mutex<HashMap<TableId, KeyedRows>>>,
}

impl TableLog {
    pub fn new(store: Arc<dyn StateStore>) -> Self {
        Self {
            store,
            writes: Arc::new(Mutex::new(HashMap::new())),
        }
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<TableId, KeyedRows>> {
        self.writes.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Appends `batches` atomically and durably; blocks on the store's flush.
    /// Returns the offsets the batches were given.
    pub fn append(&self, table: TableId, batches: &[RecordBatch]) -> Result<Range<Offset>> {
        let changes: Vec<Changes> = batches.iter().cloned().map(Changes::inserts).collect();
        let _guard = self.lock();
        self.append_locked(table, &changes, WriteBatch::default())
    }

    fn append_locked(
        &self,
        table: TableId,
        changes: &[Changes],
        mut write: WriteBatch,
    ) -> Result<Range<Offset>> {
        let changes: Vec<&Changes> = changes.iter().filter(|c| c.rows.num_rows() > 0).collect();
        let first = self.next_offset(table)?;
        if changes.is_empty() {
            if !write.is_empty() {
                self.store.apply(write)?;
                self.store.flush()?;
            }
            return Ok(first..first);
        }
        let mut offset = first;
        for c in changes {
            write.put(keys::log_entry(table, offset), encode(c)?);
            offset += 1;
        }
        write.put(keys::log_next_offset(table), offset.to_be_bytes().to_vec());
        self.store.apply(write)?;
        self.store.flush()?;
        Ok(first..offset)
    }

    /// Writes `changes` to `def`'s log atomically and durably. A table without a primary
    /// key only takes inserts; a keyed table's changes are normalised against its current
    /// rows first (upserts). Returns the offsets of the appended entries.
    pub fn write(&self, def: &TableDef, changes: &[Changes]) -> Result<Range<Offset>> {
        let mut indexes = self.lock();
        self.write_with(&mut indexes, def, changes, WriteBatch::default())
    }

    /// Writes `changes` and `extra` in one atomic batch.
    fn write_with(
        &self,
        indexes: &mut HashMap<TableId, KeyedRows>,
        def: &TableDef,
        changes: &[Changes],
        extra: WriteBatch,
    ) -> Result<Range<Offset>> {
        if def.primary_key.is_empty() {
            if changes.iter().any(|c| c.ops.is_some()) {
                return Err(CatalogError::Unsupported(format!(
                    "table \"{}\" has no primary key, so its rows cannot be updated or deleted",
                    def.name
                )));
            }
            return self.append_locked(def.id, changes, extra);
        }
        let index = self.keyed(indexes, def)?;
        let normalised = changes
            .iter()
            .map(|c| index.normalise(c))
            .collect::<std::result::Result<Vec<_>, _>>();
        let appended = normalised
            .map_err(CatalogError::from)
            .and_then(|n| self.append_locked(def.id, &n, extra));
        match appended {
            Ok(range) => {
                index.next = range.end;
                Ok(range)
            }
            Err(e) => {
                // The index ran ahead of the log: rebuild it from the log when next used.
                indexes.remove(&def.id);
                Err(e)
            }
        }
    }

    /// Writes `changes` like [`TableLog::write`] unless `marker` already records `epoch` or
    /// a later one; the marker is written in the same atomic batch as the entries. A job's
    /// sink commits an epoch's rows through this, so redoing the commit after a crash
    /// never appends them twice. Returns whether it wrote.
    pub fn write_once(
        &self,
        def: &TableDef,
        changes: &[Changes],
        marker: &[u8],
        epoch: u64,
    ) -> Result<bool> {
        let mut indexes = self.lock();
        if let Some(done) = self.store.get(marker)? {
            let done: [u8; 8] = done
                .as_slice()
                .try_into()
                .map_err(|_| CatalogError::Corrupt {
                    key: String::from_utf8_lossy(marker).into_owned(),
                    reason: "expected 8 bytes".into(),
                })?;
            if u64::from_be_bytes(done) >= epoch {
                return Ok(false);
            }
        }
        let mut extra = WriteBatch::default();
        extra.put(marker.to_vec(), epoch.to_be_bytes().to_vec());
        self.write_with(&mut indexes, def, changes, extra)?;
        Ok(true)
    }

    /// Reads `def`'s current rows, lets `f` decide the changes to make to them, and writes
    /// those, with no other write to the log in between. Returns what `f` returned.
    pub fn modify<T, E>(
        &self,
        def: &TableDef,
        f: impl FnOnce(Vec<RecordBatch>) -> std::result::Result<(Vec<Changes>, T), E>,
    ) -> std::result::Result<T, E>
    where
        E: From<CatalogError>,
    {
        let mut indexes = self.lock();
        let current = self.current_locked(&mut indexes, def)?;
        let (changes, out) = f(current)?;
        self.write_with(&mut indexes, def, &changes, WriteBatch::default())?;
        Ok(out)
    }

    /// The table's rows now: a keyed table's changelog applied, or every entry.
    pub fn current(&self, def: &TableDef) -> Result<Vec<RecordBatch>> {
        let mut indexes = self.lock();
        self.current_locked(&mut indexes, def)
    }

    fn current_locked(
        &self,
        indexes: &mut HashMap<TableId, KeyedRows>,
        def: &TableDef,
    ) -> Result<Vec<RecordBatch>> {
        if def.primary_key.is_empty() {
            return Ok(self
                .read_from(def.id, 0)?
                .into_iter()
                .map(|e| e.batch)
                .collect());
        }
        Ok(self.keyed(indexes, def)?.current()?)
    }

    /// The keyed table's index, built from the log on first use and caught up with
    /// entries appended without it.
    fn keyed<'a>(
        &self,
        indexes: &'a mut HashMap<TableId, KeyedRows>,
        def: &TableDef,
    ) -> Result<&'a mut KeyedRows> {
        let index = match indexes.entry(def.id) {
            std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::hash_map::Entry::Vacant(e) => e.insert(KeyedRows::new(def)?),
        };
        if index.next < self.next_offset(def.id)? {
            for entry in self.read_from(def.id, index.next)? {
                index.replay(&Changes {
                    rows: entry.batch,
                    ops: entry.ops,
                })?;
                index.next = entry.offset + 1;
            }
        }
        Ok(index)
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
                let (batch, ops) = decode(&value)?;
                Ok(LogEntry { offset, batch, ops })
            })
            .collect()
    }

    /// Adds the deletion of a table's whole log to `write` (used by DROP TABLE).
    pub fn delete_into(&self, table: TableId, write: &mut WriteBatch) -> Result<()> {
        self.lock().remove(&table);
        for (key, _) in self.store.scan_prefix(&keys::log_prefix(table))? {
            write.delete(key);
        }
        write.delete(keys::log_next_offset(table));
        Ok(())
    }
}

/// One IPC stream of the rows, with the ops as an extra last column when there are any.
pub fn encode(changes: &Changes) -> Result<Vec<u8>> {
    let batch = match &changes.ops {
        None => changes.rows.clone(),
        Some(ops) => {
            let rows = &changes.rows;
            let mut fields: Vec<Field> = rows
                .schema()
                .fields()
                .iter()
                .map(|f| f.as_ref().clone())
                .collect();
            fields.push(Field::new(OPS_COLUMN, DataType::Int8, false));
            let mut metadata = rows.schema().metadata().clone();
            metadata.insert(OPS_METADATA.into(), "last column".into());
            let mut columns: Vec<ArrayRef> = rows.columns().to_vec();
            columns.push(std::sync::Arc::new(ops.clone()));
            RecordBatch::try_new(
                std::sync::Arc::new(Schema::new_with_metadata(fields, metadata)),
                columns,
            )?
        }
    };
    let mut buf = Vec::new();
    let mut writer = StreamWriter::try_new(&mut buf, batch.schema_ref())?;
    writer.write(&batch)?;
    writer.finish()?;
    drop(writer);
    Ok(buf)
}

/// The rows of an entry and their ops, stripped off the stored batch.
pub fn decode(bytes: &[u8]) -> Result<(RecordBatch, Option<Int8Array>)> {
    let mut reader = StreamReader::try_new(Cursor::new(bytes), None)?;
    let batch = match reader.next() {
        Some(batch) => batch?,
        None => {
            return Err(CatalogError::Corrupt {
                key: "log entry".into(),
                reason: "no record batch in entry".into(),
            })
        }
    };
    let schema = batch.schema();
    if !schema.metadata().contains_key(OPS_METADATA) {
        return Ok((batch, None));
    }
    let last = batch.num_columns().checked_sub(1);
    let ops = last.and_then(|i| batch.column(i).as_any().downcast_ref::<Int8Array>());
    let (Some(last), Some(ops)) = (last, ops.cloned()) else {
        return Err(CatalogError::Corrupt {
            key: "log entry".into(),
            reason: "ops column missing".into(),
        });
    };
    let mut metadata = schema.metadata().clone();
    metadata.remove(OPS_METADATA);
    let fields: Vec<Field> = schema.fields()[..last]
        .iter()
        .map(|f| f.as_ref().clone())
        .collect();
    let rows = RecordBatch::try_new_with_options(
        std::sync::Arc::new(Schema::new_with_metadata(fields, metadata)),
        batch.columns()[..last].to_vec(),
        &arrow::record_batch::RecordBatchOptions::new().with_row_count(Some(batch.num_rows())),
    )?;
    Ok((rows, Some(ops)))
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
    fn ops_are_stored_with_entries_and_old_entries_read_as_inserts() {
        use crate::keyed::tests::{changes, keyed_table, listed};
        let def = keyed_table();
        let log = TableLog::new(Arc::new(MemoryStore::default()));
        // An entry written the old way (no ops), then a changelog entry.
        log.append(def.id, &[changes(&def, &[("a", 1)], None).rows])
            .unwrap();
        let change = changes(
            &def,
            &[("a", 1), ("b", 1)],
            Some(vec![op::UPDATE_BEFORE, op::UPDATE_AFTER]),
        );
        log.append_locked(def.id, std::slice::from_ref(&change), WriteBatch::default())
            .unwrap();
        let entries = log.read_from(def.id, 0).unwrap();
        assert_eq!(entries[0].ops, None);
        assert_eq!(entries[0].batch.schema(), def.physical_schema());
        assert_eq!(entries[1].batch, change.rows);
        assert_eq!(entries[1].ops, change.ops);
        assert_eq!(entries[1].batch.schema(), def.physical_schema());
        // The index replays both.
        let current = log.current(&def).unwrap();
        assert_eq!(
            listed(&Changes::inserts(current[0].clone())),
            vec![(op::INSERT, "b".into(), 1)]
        );
    }

    #[test]
    fn keyed_tables_upsert_and_their_current_rows_survive_reopen() {
        use crate::keyed::tests::{changes, keyed_table, listed};
        let def = keyed_table();
        let dir = tempfile::tempdir().unwrap();
        let rows = |log: &TableLog| -> Vec<(String, i64)> {
            log.current(&def)
                .unwrap()
                .into_iter()
                .flat_map(|b| listed(&Changes::inserts(b)))
                .map(|(_, v, k)| (v, k))
                .collect()
        };
        {
            let log = TableLog::new(Arc::new(SledStore::open(dir.path()).unwrap()));
            log.write(&def, &[changes(&def, &[("a", 1), ("b", 2)], None)])
                .unwrap();
            let range = log
                .write(&def, &[changes(&def, &[("c", 2), ("d", 3)], None)])
                .unwrap();
            assert_eq!(range, 1..2);
            assert_eq!(
                listed(&Changes {
                    rows: log.read_from(def.id, 1).unwrap()[0].batch.clone(),
                    ops: log.read_from(def.id, 1).unwrap()[0].ops.clone(),
                }),
                vec![
                    (op::UPDATE_BEFORE, "b".into(), 2),
                    (op::UPDATE_AFTER, "c".into(), 2),
                    (op::INSERT, "d".into(), 3),
                ]
            );
            // modify sees the current rows and writes its changes under the same lock.
            let seen = log
                .modify(&def, |current| {
                    let n: usize = current.iter().map(|b| b.num_rows()).sum();
                    let delete = changes(&def, &[("?", 1)], Some(vec![op::DELETE]));
                    Ok::<_, CatalogError>((vec![delete], n))
                })
                .unwrap();
            assert_eq!(seen, 3);
            assert_eq!(rows(&log), vec![("c".into(), 2), ("d".into(), 3)]);
        }
        // A new process rebuilds the index from the log on first use.
        let log = TableLog::new(Arc::new(SledStore::open(dir.path()).unwrap()));
        assert_eq!(rows(&log), vec![("c".into(), 2), ("d".into(), 3)]);
        // Entries appended behind the index's back are caught up with.
        log.append(def.id, &[changes(&def, &[("e", 3)], None).rows])
            .unwrap();
        assert_eq!(rows(&log), vec![("c".into(), 2), ("e".into(), 3)]);
        // A table without a key takes no updates.
        let mut plain = def.clone();
        plain.primary_key.clear();
        let e = log
            .write(
                &plain,
                &[changes(&def, &[("x", 1)], Some(vec![op::DELETE]))],
            )
            .unwrap_err();
        assert!(matches!(e, CatalogError::Unsupported(_)), "{e}");
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
