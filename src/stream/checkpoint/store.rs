//! Checkpoints in the state store, beside the catalog.
//!
//! Under `ckpt/<job key>\0` each committed epoch has a meta entry (`m` + epoch), which is
//! what makes it committed, and one entry per task (`t` + epoch + task); all are written
//! in one atomic batch, so a crash leaves an epoch either complete or absent. A
//! materialized view's contents are an append-only series of per-epoch changes (`v` +
//! epoch, written in the same batch) on top of a compacted base (`b`), because the view
//! must come back whole while old epochs are pruned. `s` is the log sink's marker of the
//! last epoch it appended. `c` + epoch + task + operator + sequence holds a chunk of state
//! a task wrote while it took its snapshot (see [`super::chunks`]); its epoch's meta is
//! what makes it part of a checkpoint.

use std::sync::Arc;

use datafusion::arrow::datatypes::SchemaRef;
use datafusion::arrow::record_batch::RecordBatch;
use datafusion::common::{DataFusionError, Result};
use serde::{Deserialize, Serialize};
use weir_catalog::{StateStore, WriteBatch};

use super::chunks::{ChunkId, StatePart};
use super::frame::{FrameReader, FrameWriter};
use super::{decode_changes, encode_changes, TaskSnapshot};
use crate::stream::message::{ChangeBatch, Epoch};

/// What is known about a committed epoch of one job.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct CheckpointMeta {
    pub epoch: Epoch,
    pub tasks: usize,
    /// The graph the snapshots belong to: restoring into another one is refused.
    pub fingerprint: String,
    /// Each node's parallelism: restoring at another one redistributes the snapshots.
    #[serde(default)]
    pub parallelism: Vec<usize>,
    /// The oldest epoch its incremental entries build on (its own when all are whole).
    #[serde(default)]
    pub builds_on: Option<Epoch>,
    /// When the checkpoint's first barrier was acknowledged (ms since the Unix epoch).
    pub started_ms: i64,
    pub bytes: u64,
    /// The savepoint's name when the epoch is kept as one.
    #[serde(default)]
    pub savepoint: Option<String>,
}

const ROOT: &[u8] = b"ckpt/";

fn store_error(e: weir_catalog::CatalogError) -> DataFusionError {
    DataFusionError::External(Box::new(e))
}

/// The checkpoints of one view or job.
#[derive(Clone, Debug)]
pub struct Checkpoints {
    store: Arc<dyn StateStore>,
    prefix: Vec<u8>,
}

/// A view's stored rows: its base and the changes of the epochs since.
pub struct ViewContents {
    pub rows: Vec<ChangeBatch>,
    /// Epochs with changes since the base.
    pub entries: usize,
    /// Rows those changes have.
    pub changed_rows: usize,
}

impl Checkpoints {
    /// `key` names the view or job (`view/<name>`, `job/<id>`).
    pub fn new(store: Arc<dyn StateStore>, key: &str) -> Self {
        Self {
            store,
            prefix: [ROOT, key.as_bytes(), b"\0"].concat(),
        }
    }

    fn key(&self, kind: u8, parts: &[u64]) -> Vec<u8> {
        let mut k = self.prefix.clone();
        k.push(kind);
        for p in parts {
            k.extend_from_slice(&p.to_be_bytes());
        }
        k
    }

    fn chunk_key(&self, id: ChunkId) -> Vec<u8> {
        self.key(b'c', &[id.epoch, id.task, id.operator, id.seq])
    }

    /// Stores a chunk of a snapshot being taken (durable with the epoch's write).
    pub fn put_chunk(&self, id: ChunkId, bytes: &[u8]) -> Result<()> {
        self.store
            .put(&self.chunk_key(id), bytes)
            .map_err(store_error)
    }

    pub fn chunk(&self, id: ChunkId) -> Result<Vec<u8>> {
        self.store
            .get(&self.chunk_key(id))
            .map_err(store_error)?
            .ok_or_else(|| {
                DataFusionError::Internal(format!(
                    "checkpoint {} lacks a chunk of task {}'s state",
                    id.epoch, id.task
                ))
            })
    }

    /// Removes the chunks of epochs that never committed (a crash or a failed checkpoint
    /// came between a task's snapshot and its epoch's write).
    pub fn discard_uncommitted(&self) -> Result<()> {
        let committed: std::collections::HashSet<Epoch> =
            self.metas()?.iter().map(|m| m.epoch).collect();
        let prefix = self.key(b'c', &[]);
        let mut batch = WriteBatch::default();
        for key in self.store.scan_keys(&prefix).map_err(store_error)? {
            if !committed.contains(&chunk_epoch(&key[prefix.len()..])) {
                batch.delete(key);
            }
        }
        if !batch.is_empty() {
            self.store.apply(batch).map_err(store_error)?;
        }
        Ok(())
    }

    /// The key the late-data table's appends mark the job's epochs with.
    pub fn late_marker(&self) -> Vec<u8> {
        self.key(b'l', &[])
    }

    /// The key the log sink marks the epochs it appended with.
    pub fn sink_marker(&self) -> Vec<u8> {
        self.key(b's', &[])
    }

    /// Writes a committed epoch: its tasks, the view changes it publishes, then its meta,
    /// atomically and durably. `chunk_bytes`: what its tasks stored as chunks while they
    /// took their snapshots, made durable first. Returns the bytes written.
    pub fn write(
        &self,
        meta: &CheckpointMeta,
        tasks: Vec<Vec<u8>>,
        view: Option<&[ChangeBatch]>,
        chunk_bytes: u64,
    ) -> Result<u64> {
        if chunk_bytes > 0 {
            // The meta never gets to disk before the chunks it commits.
            self.store.flush().map_err(store_error)?;
        }
        let mut batch = WriteBatch::default();
        let mut bytes = chunk_bytes;
        for (i, t) in tasks.into_iter().enumerate() {
            bytes += t.len() as u64;
            batch.put(self.key(b't', &[meta.epoch, i as u64]), t);
        }
        if let Some(changes) = view.filter(|c| !c.is_empty()) {
            let mut w = FrameWriter::default();
            w.u64(changes.len() as u64);
            for c in changes {
                w.bytes(&encode_changes(c)?);
            }
            bytes += w.bytes.len() as u64;
            batch.put(self.key(b'v', &[meta.epoch]), w.bytes);
        }
        let meta = CheckpointMeta {
            bytes,
            ..meta.clone()
        };
        batch.put(
            self.key(b'm', &[meta.epoch]),
            serde_json::to_vec(&meta).expect("meta serialises"),
        );
        self.store.apply(batch).map_err(store_error)?;
        if crate::stream::failpoint::hit(crate::stream::failpoint::at::DURING_WRITE) {
            return Err(DataFusionError::Execution(
                "failpoint: the store did not confirm the write".into(),
            ));
        }
        self.store.flush().map_err(store_error)?;
        Ok(bytes)
    }

    /// Every committed epoch, oldest first.
    pub fn metas(&self) -> Result<Vec<CheckpointMeta>> {
        self.store
            .scan_prefix(&self.key(b'm', &[]))
            .map_err(store_error)?
            .into_iter()
            .map(|(_, v)| {
                serde_json::from_slice(&v).map_err(|e| {
                    DataFusionError::Internal(format!("a stored checkpoint is corrupt: {e}"))
                })
            })
            .collect()
    }

    pub fn latest(&self) -> Result<Option<CheckpointMeta>> {
        Ok(self.metas()?.pop())
    }

    /// The task snapshots of a committed epoch, in task order.
    /// The task snapshots of `meta`'s epoch with each operator's state whole: an
    /// incremental entry comes after the entries of earlier epochs, back to that
    /// operator's last whole snapshot, and its restore applies them in order.
    pub fn load(&self, meta: &CheckpointMeta) -> Result<Vec<TaskSnapshot>> {
        let earlier: Vec<Epoch> = self
            .metas()?
            .iter()
            .map(|m| m.epoch)
            .filter(|e| *e < meta.epoch)
            .rev()
            .collect();
        (0..meta.tasks)
            .map(|t| {
                let mut task =
                    TaskSnapshot::decode_at(&self.task_entry(meta.epoch, t)?, Some(self))?;
                let mut open: Vec<usize> = (0..task.operators.len())
                    .filter(|&k| task.is_changes(k))
                    .collect();
                let mut epochs = earlier.iter();
                while !open.is_empty() {
                    let Some(&epoch) = epochs.next() else {
                        return Err(DataFusionError::Internal(format!(
                            "checkpoint {} builds on epochs that are gone",
                            meta.epoch
                        )));
                    };
                    let before = TaskSnapshot::decode_at(&self.task_entry(epoch, t)?, Some(self))?;
                    for &k in &open {
                        let mut layers = before.operators.get(k).cloned().unwrap_or_default();
                        layers.append(&mut task.operators[k]);
                        task.operators[k] = layers;
                    }
                    open.retain(|&k| before.is_changes(k));
                }
                task.changes.clear();
                Ok(task)
            })
            .collect()
    }

    fn task_entry(&self, epoch: Epoch, task: usize) -> Result<Vec<u8>> {
        self.store
            .get(&self.key(b't', &[epoch, task as u64]))
            .map_err(store_error)?
            .map(|v| v.to_vec())
            .ok_or_else(|| {
                DataFusionError::Internal(format!("checkpoint {epoch} lacks task {task}"))
            })
    }

    /// Removes all but the newest `keep` epochs (and the epochs their incremental entries
    /// build on), except savepoints, and the chunks of epochs older than the newest that
    /// never committed: epochs commit in order, so those were abandoned (a task still
    /// storing its state when its job failed and restarted may write one after the
    /// restart discarded the uncommitted ones).
    pub fn prune(&self, keep: usize) -> Result<()> {
        let metas = self.metas()?;
        let newest = metas.last().map_or(0, |m| m.epoch);
        let committed: std::collections::HashSet<Epoch> = metas.iter().map(|m| m.epoch).collect();
        let mut batch = WriteBatch::default();
        let chunks = self.key(b'c', &[]);
        for key in self.store.scan_keys(&chunks).map_err(store_error)? {
            let epoch = chunk_epoch(&key[chunks.len()..]);
            if epoch < newest && !committed.contains(&epoch) {
                batch.delete(key);
            }
        }
        let kept = metas.len().saturating_sub(keep);
        let floor = metas[kept..]
            .iter()
            .map(|m| m.builds_on.unwrap_or(m.epoch))
            .min()
            .unwrap_or(0);
        let old = metas[..kept].partition_point(|m| m.epoch < floor);
        for meta in metas.iter().take(old).filter(|m| m.savepoint.is_none()) {
            batch.delete(self.key(b'm', &[meta.epoch]));
            for t in 0..meta.tasks {
                batch.delete(self.key(b't', &[meta.epoch, t as u64]));
            }
            for key in self
                .store
                .scan_keys(&self.key(b'c', &[meta.epoch]))
                .map_err(store_error)?
            {
                batch.delete(key);
            }
        }
        if !batch.is_empty() {
            self.store.apply(batch).map_err(store_error)?;
        }
        Ok(())
    }

    /// A view's contents as of `upto`: its compacted base, then each later epoch's changes.
    pub fn view_contents(&self, upto: Epoch) -> Result<ViewContents> {
        let mut out = Vec::new();
        let mut base_epoch = 0;
        if let Some(base) = self.store.get(&self.key(b'b', &[])).map_err(store_error)? {
            let mut r = FrameReader::new(&base);
            base_epoch = r.u64()?;
            for _ in 0..r.u64()? {
                out.push(ChangeBatch::new(r.batch()?));
            }
        }
        let (changes, entries) = self.view_changes(base_epoch, upto)?;
        let changed_rows = changes.iter().map(ChangeBatch::num_rows).sum();
        out.extend(changes);
        Ok(ViewContents {
            rows: out,
            entries,
            changed_rows,
        })
    }

    /// A view's changes of the epochs in `(after, upto]`, and how many epochs had some.
    pub fn view_changes(&self, after: Epoch, upto: Epoch) -> Result<(Vec<ChangeBatch>, usize)> {
        let mut out = Vec::new();
        let mut entries = 0;
        for (key, value) in self
            .store
            .scan_prefix_from(&self.key(b'v', &[]), &self.key(b'v', &[after + 1]))
            .map_err(store_error)?
        {
            if epoch_of(&key) > upto {
                break;
            }
            entries += 1;
            let mut r = FrameReader::new(&value);
            for _ in 0..r.u64()? {
                out.push(decode_changes(r.bytes()?)?);
            }
        }
        Ok((out, entries))
    }

    /// Replaces a view's per-epoch changes up to `epoch` by its contents as of `epoch`.
    /// Changes a registered reader has not passed yet stay (it resumes from them); they
    /// go at a later fold, once it has.
    pub fn compact_view(&self, epoch: Epoch, contents: &[RecordBatch]) -> Result<()> {
        let mut w = FrameWriter::default();
        w.u64(epoch);
        w.u64(contents.len() as u64);
        for b in contents {
            w.batch(b)?;
        }
        let mut batch = WriteBatch::default();
        batch.put(self.key(b'b', &[]), w.bytes);
        let needed = self.readers()?.into_iter().map(|(_, e)| e).min();
        let upto = needed
            .map_or(epoch, |n| n.min(epoch))
            .max(self.changes_kept_after()?);
        batch.put(self.key(b'f', &[]), upto.to_be_bytes().to_vec());
        for key in self
            .store
            .scan_keys(&self.key(b'v', &[]))
            .map_err(store_error)?
        {
            if epoch_of(&key) <= upto {
                batch.delete(key);
            }
        }
        self.store.apply(batch).map_err(store_error)?;
        self.store.flush().map_err(store_error)
    }

    /// The epoch after which a view's per-epoch changes are all kept (those up to it were
    /// folded into its base and removed; 0: none were).
    pub fn changes_kept_after(&self) -> Result<Epoch> {
        if let Some(f) = self.store.get(&self.key(b'f', &[])).map_err(store_error)? {
            return FrameReader::new(&f).u64();
        }
        // Folded before readers kept changes: those up to the base's epoch went.
        match self.store.get(&self.key(b'b', &[])).map_err(store_error)? {
            Some(base) => FrameReader::new(&base).u64(),
            None => Ok(0),
        }
    }

    /// A view's changes of the epochs in `(after, upto]`; `None` when some of them were
    /// folded into its base (a reader at `after` cannot go on from the changes).
    pub fn view_changes_kept(&self, after: Epoch, upto: Epoch) -> Result<Option<Vec<ChangeBatch>>> {
        if self.changes_kept_after()? > after {
            return Ok(None);
        }
        Ok(Some(self.view_changes(after, upto)?.0))
    }

    /// This view's or job's checkpoint lineage: a number drawn when its first checkpoint
    /// state is made, kept until it is removed. A reader's place in a view's epochs is
    /// only meaningful within the lineage it was recorded in (a view rebuilt, or started
    /// from a savepoint, numbers its epochs anew).
    pub fn lineage(&self) -> Result<u64> {
        let key = self.key(b'i', &[]);
        if let Some(v) = self.store.get(&key).map_err(store_error)? {
            let bytes: [u8; 8] = v.as_slice().try_into().map_err(|_| {
                DataFusionError::Internal("a stored checkpoint lineage is not 8 bytes".into())
            })?;
            return Ok(u64::from_be_bytes(bytes));
        }
        // Never 0: a reader's position uses 0 for "not following yet".
        let lineage = rand::random::<u64>().max(1);
        self.store
            .put(&key, &lineage.to_be_bytes())
            .map_err(store_error)?;
        Ok(lineage)
    }

    fn reader_key(&self, reader: &Checkpoints) -> Vec<u8> {
        [self.key(b'r', &[]).as_slice(), reader.prefix.as_slice()].concat()
    }

    /// Records that `reader` (a view or job reading this view's changes) resumes after
    /// `epoch`: folds keep the changes after it. Not flushed: a registration lost in a
    /// crash leaves an earlier one, which keeps more.
    pub fn register_reader(&self, reader: &Checkpoints, epoch: Epoch) -> Result<()> {
        self.store
            .put(&self.reader_key(reader), &epoch.to_be_bytes())
            .map_err(store_error)
    }

    /// Makes what was written so far durable.
    pub fn flush(&self) -> Result<()> {
        self.store.flush().map_err(store_error)
    }

    /// The epoch `reader` is registered to resume after, if it is.
    pub fn reader_epoch(&self, reader: &Checkpoints) -> Result<Option<Epoch>> {
        self.store
            .get(&self.reader_key(reader))
            .map_err(store_error)?
            .map(|v| FrameReader::new(&v).u64())
            .transpose()
    }

    pub fn unregister_reader(&self, reader: &Checkpoints) -> Result<()> {
        self.store
            .delete(&self.reader_key(reader))
            .map_err(store_error)
    }

    /// Each registered reader (by its key prefix) and the epoch it resumes after.
    pub fn readers(&self) -> Result<Vec<(Vec<u8>, Epoch)>> {
        let prefix = self.key(b'r', &[]);
        Ok(self
            .store
            .scan_prefix(&prefix)
            .map_err(store_error)?
            .into_iter()
            .map(|(k, v)| {
                let epoch = v.as_slice().try_into().map_or(0, u64::from_be_bytes);
                (k[prefix.len()..].to_vec(), epoch)
            })
            .collect())
    }

    /// Copies the newest committed epoch (its tasks, a view's contents up to it, the log
    /// sink's marker) over whatever `target` held, named `savepoint` when it is one.
    /// Returns the copied epoch's meta; `None` when there is no checkpoint yet.
    pub fn copy_latest_to(
        &self,
        target: &Checkpoints,
        savepoint: Option<&str>,
        statement: &str,
    ) -> Result<Option<CheckpointMeta>> {
        let Some(meta) = self.latest()? else {
            return Ok(None);
        };
        let mut batch = WriteBatch::default();
        for key in target
            .store
            .scan_keys(&target.prefix)
            .map_err(store_error)?
        {
            batch.delete(key);
        }
        target.store.apply(batch).map_err(store_error)?;
        let mut batch = WriteBatch::default();
        for key in self.store.scan_keys(&self.prefix).map_err(store_error)? {
            let rest = &key[self.prefix.len()..];
            let keep = match rest.first() {
                Some(b'v') => epoch_of(&key) <= meta.epoch,
                Some(b'b' | b'f' | b's') => true,
                _ => false,
            };
            if keep {
                if let Some(value) = self.store.get(&key).map_err(store_error)? {
                    batch.put([target.prefix.as_slice(), rest].concat(), value);
                }
            }
        }
        // Whole snapshots: the copy does not build on epochs it does not have. Chunks are
        // copied one at a time, renamed as the copied epoch's.
        for (t, mut task) in self.load(&meta)?.into_iter().enumerate() {
            for (k, parts) in task.operators.iter_mut().enumerate() {
                let mut seq = 0;
                for part in parts.iter_mut() {
                    if let StatePart::Stored(chunk) = part {
                        let id = ChunkId {
                            epoch: meta.epoch,
                            task: t as u64,
                            operator: k as u64,
                            seq: chunk.renumbered(seq),
                        };
                        seq += 1;
                        target.put_chunk(id, &chunk.at.chunk(chunk.id)?)?;
                        chunk.id = id;
                        chunk.at = target.clone();
                    }
                }
            }
            batch.put(
                target.key(b't', &[meta.epoch, t as u64]),
                task.into_bytes()?,
            );
        }
        let meta = CheckpointMeta {
            savepoint: savepoint.map(str::to_string),
            builds_on: Some(meta.epoch),
            ..meta
        };
        batch.put(
            target.key(b'm', &[meta.epoch]),
            serde_json::to_vec(&meta).expect("meta serialises"),
        );
        batch.put(target.key(b'q', &[]), statement.as_bytes().to_vec());
        target.store.apply(batch).map_err(store_error)?;
        target.store.flush().map_err(store_error)?;
        Ok(Some(meta))
    }

    /// The statement a savepoint was taken from.
    pub fn statement(&self) -> Result<Option<String>> {
        Ok(self
            .store
            .get(&self.key(b'q', &[]))
            .map_err(store_error)?
            .map(|b| String::from_utf8_lossy(&b).into_owned()))
    }

    /// Forgets everything of this view or job (it was dropped).
    pub fn remove(&self) -> Result<()> {
        let mut batch = WriteBatch::default();
        for key in self.store.scan_keys(&self.prefix).map_err(store_error)? {
            batch.delete(key);
        }
        self.store.apply(batch).map_err(store_error)?;
        self.store.flush().map_err(store_error)
    }
}

/// The epoch of a chunk key after its kind's prefix.
fn chunk_epoch(rest: &[u8]) -> Epoch {
    rest.get(..8)
        .map_or(0, |e| Epoch::from_be_bytes(e.try_into().expect("8 bytes")))
}

fn epoch_of(key: &[u8]) -> Epoch {
    let tail: [u8; 8] = key[key.len() - 8..].try_into().expect("8 bytes");
    u64::from_be_bytes(tail)
}

/// Where savepoint `name` is kept.
pub fn savepoint(store: Arc<dyn StateStore>, name: &str) -> Checkpoints {
    Checkpoints::new(store, &format!("{SAVEPOINTS}{name}"))
}

const SAVEPOINTS: &str = "savepoint/";

/// Every savepoint: its name, meta and statement.
pub fn savepoints(store: &Arc<dyn StateStore>) -> Result<Vec<(CheckpointMeta, String)>> {
    let prefix = [ROOT, SAVEPOINTS.as_bytes()].concat();
    let mut out = Vec::new();
    // Keys only: the values are the savepoints' state.
    for key in store.scan_keys(&prefix).map_err(store_error)? {
        let Some(zero) = key.iter().position(|b| *b == 0) else {
            continue;
        };
        if key.get(zero + 1) != Some(&b'm') {
            continue;
        }
        let Some(value) = store.get(&key).map_err(store_error)? else {
            continue;
        };
        let Ok(meta) = serde_json::from_slice::<CheckpointMeta>(&value) else {
            continue;
        };
        let name = String::from_utf8_lossy(&key[prefix.len()..zero]).into_owned();
        let statement = savepoint(store.clone(), &name)
            .statement()?
            .unwrap_or_default();
        out.push((meta, statement));
    }
    Ok(out)
}

/// The newest epoch any job committed: a restarted server numbers epochs after it.
pub fn latest_epoch(store: &Arc<dyn StateStore>) -> Result<Epoch> {
    let mut latest = 0;
    // Keys only: the values under the root are every snapshot's chunks.
    for key in store.scan_keys(ROOT).map_err(store_error)? {
        let Some(zero) = key.iter().position(|b| *b == 0) else {
            continue;
        };
        if key.get(zero + 1) == Some(&b'm') {
            let Some(value) = store.get(&key).map_err(store_error)? else {
                continue;
            };
            if let Ok(meta) = serde_json::from_slice::<CheckpointMeta>(&value) {
                latest = latest.max(meta.epoch);
            }
        }
    }
    Ok(latest)
}

/// A view's schema check: contents restored for a view must have its columns.
pub fn check_schema(contents: &[ChangeBatch], schema: &SchemaRef) -> Result<()> {
    match contents
        .iter()
        .find(|c| c.rows.schema().fields() != schema.fields())
    {
        Some(c) => Err(DataFusionError::Plan(format!(
            "the stored contents have columns {:?}, the view has {:?}",
            c.rows.schema().fields(),
            schema.fields()
        ))),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stream::message::change_lines;
    use datafusion::arrow::array::Int64Array;
    use datafusion::arrow::datatypes::{DataType, Field, Schema};
    use weir_catalog::MemoryStore;

    use crate::stream::checkpoint::chunks::ChunkWriter;

    fn rows(v: &[i64]) -> RecordBatch {
        RecordBatch::try_new(
            Arc::new(Schema::new(vec![Field::new("v", DataType::Int64, true)])),
            vec![Arc::new(Int64Array::from(v.to_vec()))],
        )
        .unwrap()
    }

    fn meta(epoch: Epoch) -> CheckpointMeta {
        CheckpointMeta {
            epoch,
            tasks: 2,
            fingerprint: "g".into(),
            parallelism: vec![1],
            builds_on: None,
            started_ms: 0,
            bytes: 0,
            savepoint: None,
        }
    }

    #[test]
    fn epochs_are_written_pruned_and_loaded() {
        let store: Arc<dyn StateStore> = Arc::new(MemoryStore::default());
        let a = Checkpoints::new(store.clone(), "view/a");
        let other = Checkpoints::new(store.clone(), "view/ab");
        let task = TaskSnapshot::default().encode().unwrap();
        for e in 1..=5 {
            let mut m = meta(e);
            if e == 2 {
                m.savepoint = Some("sp".into());
            }
            a.write(&m, vec![task.clone(), task.clone()], None, 0)
                .unwrap();
        }
        other
            .write(&meta(9), vec![task.clone(), task], None, 0)
            .unwrap();
        a.prune(2).unwrap();
        let kept: Vec<Epoch> = a.metas().unwrap().iter().map(|m| m.epoch).collect();
        assert_eq!(kept, vec![2, 4, 5]);
        assert_eq!(a.load(&a.latest().unwrap().unwrap()).unwrap().len(), 2);
        assert_eq!(latest_epoch(&store).unwrap(), 9);
        a.remove().unwrap();
        assert!(a.latest().unwrap().is_none());
        assert_eq!(other.latest().unwrap().unwrap().epoch, 9);
    }

    /// A task whose one operator holds `v`, whole or as changes; in a chunk stored
    /// among `c` as epoch `v`'s when `stored` (state beyond memory).
    fn layer(c: &Checkpoints, v: i64, changes: bool, stored: bool) -> Vec<u8> {
        let state = if stored {
            let mut writer = ChunkWriter::new(Some(c.clone()), v as Epoch, 0, 0);
            writer.push(rows(&[v])).unwrap();
            writer.finish().unwrap()
        } else {
            vec![StatePart::Batch(rows(&[v]))]
        };
        TaskSnapshot {
            operators: vec![state],
            changes: vec![changes],
            ..Default::default()
        }
        .into_bytes()
        .unwrap()
    }

    /// An operator whose state has no keys.
    struct Unkeyed;

    impl crate::stream::operator::Operator for Unkeyed {
        fn process(&mut self, _: usize, _: ChangeBatch, _: &mut Vec<ChangeBatch>) -> Result<()> {
            Ok(())
        }
    }

    fn values(task: &TaskSnapshot) -> Vec<i64> {
        task.operators[0]
            .iter()
            .flat_map(|p| match p {
                StatePart::Batch(b) => vec![b.clone()],
                StatePart::Stored(c) => c.load(&Unkeyed).unwrap(),
            })
            .map(|b| {
                b.column(0)
                    .as_any()
                    .downcast_ref::<Int64Array>()
                    .unwrap()
                    .value(0)
            })
            .collect()
    }

    /// The epochs of the chunks stored among `c`.
    fn chunk_epochs(c: &Checkpoints) -> Vec<Epoch> {
        let prefix = c.key(b'c', &[]);
        c.store
            .scan_keys(&prefix)
            .unwrap()
            .iter()
            .map(|k| chunk_epoch(&k[prefix.len()..]))
            .collect()
    }

    #[test]
    fn incremental_epochs_load_with_the_epochs_they_build_on_which_pruning_keeps() {
        let store: Arc<dyn StateStore> = Arc::new(MemoryStore::default());
        let c = Checkpoints::new(store.clone(), "job/j");
        // What the coordinator records: 2..=4 build on 1, 6 on 5.
        let one_task = |e| CheckpointMeta {
            tasks: 1,
            builds_on: Some(if e < 5 { 1 } else { 5 }),
            ..meta(e)
        };
        // Epoch 1 whole, 2..=4 changes, 5 whole, 6 changes; epochs 2, 4 and 6 stored
        // their state as chunks.
        for e in 1..=6u64 {
            let changes = !matches!(e, 1 | 5);
            let task = layer(&c, e as i64, changes, e % 2 == 0);
            c.write(&one_task(e), vec![task], None, 0).unwrap();
            if e == 4 {
                c.prune(2).unwrap();
                let kept: Vec<Epoch> = c.metas().unwrap().iter().map(|m| m.epoch).collect();
                assert_eq!(kept, vec![1, 2, 3, 4], "3 and 4 build on 1 and 2");
                let loaded = c.load(&one_task(4)).unwrap();
                assert_eq!(values(&loaded[0]), vec![1, 2, 3, 4]);
                assert!(!loaded[0].is_changes(0));
                // A savepoint is whole: it needs no earlier epoch.
                let saved = savepoint(store.clone(), "sp");
                c.copy_latest_to(&saved, Some("sp"), "q").unwrap();
                let meta = saved.latest().unwrap().unwrap();
                assert_eq!(values(&saved.load(&meta).unwrap()[0]), vec![1, 2, 3, 4]);
                // Its chunks are its own copies, under its one epoch.
                assert_eq!(chunk_epochs(&saved), vec![4, 4]);
            }
        }
        // A snapshot's chunk whose epoch never committed.
        let _ = layer(&c, 7, true, true);
        assert_eq!(chunk_epochs(&c), vec![2, 4, 6, 7]);
        c.discard_uncommitted().unwrap();
        assert_eq!(chunk_epochs(&c), vec![2, 4, 6]);
        c.prune(2).unwrap();
        let kept: Vec<Epoch> = c.metas().unwrap().iter().map(|m| m.epoch).collect();
        assert_eq!(kept, vec![5, 6]);
        assert_eq!(chunk_epochs(&c), vec![6], "pruned with their epochs");
        assert_eq!(values(&c.load(&one_task(6)).unwrap()[0]), vec![5, 6]);
        // The savepoint does not depend on the epochs it was copied from.
        let saved = savepoint(store.clone(), "sp");
        assert_eq!(
            values(&saved.load(&saved.latest().unwrap().unwrap()).unwrap()[0]),
            vec![1, 2, 3, 4]
        );
        // A chunk written after the discard (by a task of a run that failed, still
        // storing): pruning once a later epoch committed removes it; the chunk of an
        // epoch being taken stays.
        let _ = layer(&c, 7, true, true);
        let _ = layer(&c, 9, true, true);
        let task = layer(&c, 8, true, true);
        c.write(&one_task(8), vec![task], None, 0).unwrap();
        assert_eq!(chunk_epochs(&c), vec![6, 7, 8, 9]);
        c.prune(3).unwrap();
        assert_eq!(chunk_epochs(&c), vec![6, 8, 9]);
        c.remove().unwrap();
        assert!(chunk_epochs(&c).is_empty());
    }

    #[test]
    fn a_savepoint_copies_the_newest_epoch_and_the_view_contents() {
        let store: Arc<dyn StateStore> = Arc::new(MemoryStore::default());
        let v = Checkpoints::new(store.clone(), "view/v");
        let task = TaskSnapshot::default().encode().unwrap();
        for e in 1..=3 {
            let changes = vec![ChangeBatch::new(rows(&[e as i64]))];
            v.write(
                &meta(e),
                vec![task.clone(), task.clone()],
                Some(&changes),
                0,
            )
            .unwrap();
        }
        let sp = savepoint(store.clone(), "sp1");
        let copied = v.copy_latest_to(&sp, Some("sp1"), "CREATE ...").unwrap();
        assert_eq!(copied.unwrap().epoch, 3);
        assert_eq!(sp.metas().unwrap().len(), 1);
        assert_eq!(sp.load(&sp.latest().unwrap().unwrap()).unwrap().len(), 2);
        let contents = sp.view_contents(3).unwrap().rows;
        assert_eq!(change_lines(&contents), vec!["+I 1", "+I 2", "+I 3"]);
        let listed = savepoints(&store).unwrap();
        assert_eq!(listed.len(), 1);
        assert_eq!(listed[0].0.savepoint.as_deref(), Some("sp1"));
        assert_eq!(listed[0].1, "CREATE ...");
        // Pruning never removes a savepoint's epoch.
        sp.prune(0).unwrap();
        assert_eq!(sp.metas().unwrap().len(), 1);
    }

    #[test]
    fn view_contents_are_base_plus_later_epochs() {
        let store: Arc<dyn StateStore> = Arc::new(MemoryStore::default());
        let v = Checkpoints::new(store, "view/v");
        for e in 1..=4 {
            let changes = vec![ChangeBatch::new(rows(&[e as i64]))];
            v.write(&meta(e), vec![], Some(&changes), 0).unwrap();
        }
        let contents = v.view_contents(3).unwrap();
        assert_eq!(change_lines(&contents.rows), vec!["+I 1", "+I 2", "+I 3"]);
        assert_eq!((contents.entries, contents.changed_rows), (3, 3));
        v.compact_view(2, &[rows(&[1, 2])]).unwrap();
        let contents = v.view_contents(4).unwrap();
        assert_eq!(
            change_lines(&contents.rows),
            vec!["+I 1", "+I 2", "+I 3", "+I 4"]
        );
        assert_eq!((contents.entries, contents.changed_rows), (2, 2));
    }

    #[test]
    fn a_fold_keeps_the_changes_a_registered_reader_has_not_passed() {
        let store: Arc<dyn StateStore> = Arc::new(MemoryStore::default());
        let v = Checkpoints::new(store.clone(), "view/v");
        let reader = Checkpoints::new(store.clone(), "job/r");
        let write = |e: Epoch| {
            let changes = vec![ChangeBatch::new(rows(&[e as i64]))];
            v.write(&meta(e), vec![], Some(&changes), 0).unwrap();
        };
        let kept = |after, upto| {
            v.view_changes_kept(after, upto)
                .unwrap()
                .map(|c| change_lines(&c))
        };
        for e in 1..=4 {
            write(e);
        }
        assert_eq!(kept(0, 4).unwrap().len(), 4);
        v.register_reader(&reader, 2).unwrap();
        v.compact_view(4, &[rows(&[1, 2, 3, 4])]).unwrap();
        // The base has every row; the reader still finds what came after its epoch.
        assert_eq!(v.view_contents(4).unwrap().rows.len(), 1);
        assert_eq!(kept(2, 4), Some(vec!["+I 3".to_string(), "+I 4".into()]));
        assert_eq!(kept(1, 4), None, "epoch 2's changes were folded");
        // Once it has passed them, the next fold removes them.
        write(5);
        v.register_reader(&reader, 4).unwrap();
        v.compact_view(5, &[rows(&[1, 2, 3, 4, 5])]).unwrap();
        assert_eq!(kept(2, 5), None);
        assert_eq!(kept(4, 5), Some(vec!["+I 5".to_string()]));
        assert_eq!(v.readers().unwrap(), vec![(reader.prefix.clone(), 4)]);
        // Without readers a fold keeps nothing.
        v.unregister_reader(&reader).unwrap();
        write(6);
        v.compact_view(6, &[rows(&[1, 2, 3, 4, 5, 6])]).unwrap();
        assert_eq!(kept(4, 6), None);
        assert_eq!(kept(6, 6), Some(vec![]));
    }

    #[test]
    fn a_lineage_lasts_until_the_checkpoints_are_removed() {
        let store: Arc<dyn StateStore> = Arc::new(MemoryStore::default());
        let v = Checkpoints::new(store.clone(), "view/v");
        let first = v.lineage().unwrap();
        assert_ne!(first, 0);
        assert_eq!(v.lineage().unwrap(), first);
        v.register_reader(&Checkpoints::new(store.clone(), "job/r"), 3)
            .unwrap();
        v.remove().unwrap();
        assert!(v.readers().unwrap().is_empty());
        assert_ne!(v.lineage().unwrap(), first);
    }
}
