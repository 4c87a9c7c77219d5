//! The TopN's checkpoints: `rows` (partition, sort key, row, count), `emitted`
//! (partition, row, in rank order), `emitted_top` (partitions whose emitted rows are
//! their current top N, named instead of written again: after a barrier, every partition
//! but those changed since) and `changed` (partitions with changes not emitted)
//! batches, for every partition (a whole snapshot) or only for the partitions changed
//! since the previous snapshot, after a `reset` batch naming them all (an incremental
//! one). Restoring reads the batches in order: a `reset` drops what earlier layers said
//! of its partitions, so each partition comes back as its last layer left it.
//!
//! `rows` and `emitted` hold rows as the operator encodes them, and say how in their
//! header ([`ROWS_FLAT`] or [`ROWS_ARROW`]; none: arrow's row format, as before the flat
//! encoding): a restore re-encodes rows written the other way.

use std::sync::Arc;

use datafusion::arrow::array::{ArrayRef, BinaryArray, Int64Array};
use datafusion::arrow::record_batch::RecordBatch;
use datafusion::common::{DataFusionError, Result};

use super::{Entry, Partition, TopN};
use crate::stream::flat_rows::{EncodedRows, FlatRows, RowCodec};
use crate::stream::operator::StateReader;
use crate::stream::snapshot::{self, column};

/// How the rows of `rows` and `emitted` batches are encoded: [`RowCodec`]'s flat layout
/// or arrow's row format.
const ROWS_FLAT: i64 = 1;
const ROWS_ARROW: i64 = 0;

/// Partitions per chunk of a snapshot's batches.
const CHUNK_PARTITIONS: usize = 1 << 16;

/// The partitions in memory as a snapshot took them, encoded into batches by the thread
/// storing the checkpoint: the task only clones each partition's entries (shared, not
/// copied) where it encoded every changed row (Nexmark q18: a fifth of the task's time).
pub(super) struct Frozen {
    /// For an incremental snapshot, the keys of partitions that left memory since the
    /// previous one: its `reset` batch names them and the frozen partitions' keys.
    gone: Option<Vec<Arc<[u8]>>>,
    partitions: Vec<(Arc<[u8]>, Partition)>,
    changed: Vec<Arc<[u8]>>,
    limit: usize,
    flat: bool,
}

impl Frozen {
    /// The batches, in restore order: `reset`, then `rows`, `emitted` and `emitted_top`
    /// of the partitions by key in chunks of [`CHUNK_PARTITIONS`], then `changed`.
    fn encode(mut self, out: &mut dyn FnMut(RecordBatch) -> Result<()>) -> Result<()> {
        if let Some(gone) = self.gone {
            let mut reset: Vec<&[u8]> = gone.iter().map(|k| &**k).collect();
            reset.extend(self.partitions.iter().map(|(k, _)| &**k));
            reset.sort_unstable();
            reset.dedup();
            out(snapshot::batch(
                "reset",
                &[],
                vec![snapshot::binary(reset)],
            )?)?;
        }
        self.partitions.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        for chunk in self.partitions.chunks(CHUNK_PARTITIONS) {
            for batch in TopN::chunk_batches(self.limit, self.flat, chunk)? {
                out(batch)?;
            }
        }
        self.changed.sort_unstable();
        self.changed.dedup();
        out(snapshot::batch(
            "changed",
            &[],
            vec![snapshot::binary(self.changed.iter().map(|k| &**k))],
        )?)
    }
}

impl TopN {
    /// Freezes every partition in memory for [`Self::frozen_snapshot`]; what changed is
    /// now recorded.
    pub(super) fn freeze_whole(&mut self) {
        let mut partitions = Vec::with_capacity(self.partitions.len());
        for (_, key, p) in self.partitions.iter_mut() {
            p.dirty = false;
            partitions.push((key.clone(), p.frozen()));
        }
        self.dirty.clear();
        self.gone.clear();
        self.freeze(None, partitions);
    }

    /// Freezes the partitions in memory changed or gone since the previous snapshot for
    /// [`Self::frozen_snapshot`].
    pub(super) fn freeze_changes(&mut self) {
        let dirty = std::mem::take(&mut self.dirty);
        // Sized at once: grown by doubling, the copies were a third of the freeze.
        let mut partitions = Vec::with_capacity(dirty.len());
        for (i, &id) in dirty.iter().enumerate() {
            if let Some(&ahead) = dirty.get(i + super::PREFETCH_AHEAD) {
                self.partitions.prefetch(ahead);
            }
            // A slot listed again (or holding another partition since) is taken once.
            if let Some((key, p)) = self.partitions.at_mut(id).filter(|(_, p)| p.dirty) {
                p.dirty = false;
                partitions.push((key.clone(), p.frozen()));
            }
        }
        let gone = std::mem::take(&mut self.gone);
        self.freeze(Some(gone), partitions);
    }

    fn freeze(&mut self, gone: Option<Vec<Arc<[u8]>>>, partitions: Vec<(Arc<[u8]>, Partition)>) {
        self.frozen = Some(Frozen {
            gone,
            partitions,
            changed: self
                .changed
                .iter()
                .filter_map(|&id| self.partitions.at(id).filter(|(_, p)| p.changed))
                .map(|(key, _)| key.clone())
                .collect(),
            limit: self.limit,
            flat: self.rows_codec.is_flat(),
        });
    }

    /// The snapshot just taken: the partitions it froze in memory, then those on disk
    /// (all of them when `whole`, else those changed since the previous snapshot).
    pub(super) fn frozen_snapshot(&mut self, whole: bool) -> Result<Option<StateReader>> {
        let frozen = self.frozen.take();
        let spilled = self.spilled_snapshot(whole)?;
        if frozen.is_none() && spilled.is_none() {
            return Ok(None);
        }
        Ok(Some(Box::new(move |out| {
            if let Some(frozen) = frozen {
                frozen.encode(out)?;
            }
            match spilled {
                Some(read) => read(out),
                None => Ok(()),
            }
        })))
    }

    /// `rows`, `emitted` and `emitted_top` batches of the partitions, whose rows are
    /// `flat`-encoded or not.
    pub(super) fn chunk_batches<K: AsRef<[u8]>>(
        limit: usize,
        flat: bool,
        partitions: &[(K, Partition)],
    ) -> Result<[RecordBatch; 3]> {
        let codec = if flat { ROWS_FLAT } else { ROWS_ARROW };
        let (mut row_keys, mut sorts, mut rows, mut counts) = (vec![], vec![], vec![], vec![]);
        let (mut emitted_keys, mut emitted, mut emitted_top) = (vec![], vec![], vec![]);
        for (key, p) in partitions {
            let key = key.as_ref();
            for (entry, count) in p.rows.iter() {
                row_keys.push(key);
                sorts.push(entry.sort());
                rows.push(entry.row());
                counts.push(count);
            }
            if !p.emitted.is_empty() && Self::top(limit, p) == p.emitted {
                emitted_top.push(key);
                continue;
            }
            for row in &p.emitted {
                emitted_keys.push(key);
                emitted.push(row.row());
            }
        }
        Ok([
            snapshot::batch(
                "rows",
                &[codec],
                vec![
                    snapshot::binary(row_keys),
                    snapshot::binary(sorts),
                    snapshot::binary(rows),
                    Arc::new(Int64Array::from(counts)),
                ],
            )?,
            snapshot::batch(
                "emitted",
                &[codec],
                vec![snapshot::binary(emitted_keys), snapshot::binary(emitted)],
            )?,
            snapshot::batch("emitted_top", &[], vec![snapshot::binary(emitted_top)])?,
        ])
    }

    /// The partition key of each row of a state batch (its first column after the header).
    pub(super) fn partition_keys(&self, batch: &RecordBatch) -> Result<Vec<ArrayRef>> {
        let (_, _, columns) = snapshot::parts(batch, snapshot::heads(batch))?;
        let keys = column::<BinaryArray>(&columns, 0)?;
        let parser = self.partition_converter.parser();
        Ok(self
            .partition_converter
            .convert_rows((0..batch.num_rows()).map(|i| parser.parse(keys.value(i))))?)
    }

    /// Puts back whole and incremental snapshots, in order. Adds to the partitions there
    /// are, so a rescaled subtask takes several old subtasks' partitions.
    pub(super) fn restore_layers(&mut self, state: Vec<RecordBatch>) -> Result<()> {
        let now = self.ttl.map(|_| std::time::Instant::now());
        for batch in state {
            let (kind, head, columns) = snapshot::parts(&batch, snapshot::heads(&batch))?;
            let keys = column::<BinaryArray>(&columns, 0)?;
            let flat = head.first() == Some(&ROWS_FLAT);
            match kind.as_str() {
                "reset" => {
                    for key in keys.iter().flatten() {
                        self.partitions.remove(key);
                        if let Some(spill) = self.spill.as_mut() {
                            spill.delete(key)?;
                        }
                    }
                }
                "rows" => {
                    let sorts = column::<BinaryArray>(&columns, 1)?;
                    let rows = self.rows_as_encoded(column::<BinaryArray>(&columns, 2)?, flat)?;
                    let counts = column::<Int64Array>(&columns, 3)?;
                    for i in 0..batch.num_rows() {
                        let p = self.partition(keys.value(i))?;
                        p.touched = now;
                        p.rows.add(sorts.value(i), rows.row(i), counts.value(i));
                        p.present += counts.value(i);
                    }
                }
                "emitted" => {
                    // Emitted rows only compare and emit their row bytes.
                    let rows = self.rows_as_encoded(column::<BinaryArray>(&columns, 1)?, flat)?;
                    for i in 0..batch.num_rows() {
                        let p = self.partition(keys.value(i))?;
                        p.emitted.push(Entry::new(&[], rows.row(i)));
                    }
                }
                "emitted_top" => {
                    // After this layer's rows: the emitted rows share their entries.
                    let limit = self.limit;
                    for key in keys.iter().flatten() {
                        let p = self.partition(key)?;
                        p.emitted = Self::top(limit, p);
                    }
                }
                "changed" => {
                    for key in keys.iter().flatten() {
                        self.bring_back(key)?;
                        if let Some(id) = self.partitions.find(key) {
                            let (_, p) = self.partitions.at_mut(id).expect("found");
                            if !p.changed {
                                p.changed = true;
                                self.changed.push(id);
                            }
                        }
                    }
                }
                other => {
                    return Err(DataFusionError::Internal(format!(
                        "a TopN state batch of unknown kind {other}"
                    )))
                }
            }
        }
        self.bytes = self
            .partitions
            .iter()
            .map(|(_, k, p)| Self::partition_size(k, p))
            .sum();
        Ok(())
    }

    /// Rows of a state batch (`flat`-encoded or in arrow's row format) as this operator
    /// encodes them.
    fn rows_as_encoded(&self, rows: &BinaryArray, flat: bool) -> Result<StoredRows> {
        if flat == self.rows_codec.is_flat() {
            return Ok(StoredRows::AsStored(rows.clone()));
        }
        let fields = &self.schema.fields()[..self.schema.fields().len() - 1];
        let written = if flat {
            let flat = FlatRows::new(fields).ok_or_else(|| {
                DataFusionError::Internal("flat TopN rows of a type without a flat layout".into())
            })?;
            RowCodec::Flat(flat)
        } else {
            RowCodec::Arrow(crate::stream::row_converter(fields)?)
        };
        let columns = written.decode(rows.iter().map(|r| r.unwrap_or_default()))?;
        Ok(StoredRows::Encoded(self.rows_codec.encode(&columns)?))
    }

    /// The partition `key`, brought back from disk or new.
    fn partition(&mut self, key: &[u8]) -> Result<&mut Partition> {
        if !self.partitions.contains(key) && !self.bring_back(key)? {
            self.partitions.insert(key.into(), Partition::default());
        }
        Ok(self.partitions.get_mut(key).expect("inserted"))
    }
}

/// Rows of a state batch, as stored or encoded again.
enum StoredRows {
    AsStored(BinaryArray),
    Encoded(EncodedRows),
}

impl StoredRows {
    fn row(&self, i: usize) -> &[u8] {
        match self {
            StoredRows::AsStored(rows) => rows.value(i),
            StoredRows::Encoded(rows) => rows.row(i),
        }
    }
}
