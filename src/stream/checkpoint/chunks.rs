//! State an operator keeps beyond memory (a state backend's) goes into a checkpoint as
//! chunks written to the store while the snapshot is taken, not held until the
//! coordinator writes the epoch: the task's snapshot names its chunks instead of holding
//! their rows, so checkpointing such state needs memory for one chunk, not for the state.
//! A restore reads them back a chunk at a time. A chunk belongs to the epoch it was
//! written for: it is pruned with it, and dropped when that epoch never committed.

use datafusion::arrow::record_batch::RecordBatch;
use datafusion::common::{DataFusionError, Result};

use super::frame::{FrameReader, FrameWriter};
use super::store::Checkpoints;
use super::TaskSnapshot;
use crate::stream::message::Epoch;
use crate::stream::operator::Operator;

/// Bytes of batches (in memory) per chunk.
const CHUNK_BYTES: usize = 16 << 20;

/// An operator's state batches held in memory, from this size in all, are written to the
/// store as chunks by the thread storing its snapshot, not encoded with the rest of the
/// task's snapshot by the coordinator: a big state's checkpoint then encodes a chunk at a
/// time into one buffer, where the whole snapshot went into one fresh buffer of its size
/// (every page of which the kernel zeroed: a third of Nexmark q20's time).
const INLINE_BYTES: usize = 1 << 20;

/// The sequence numbers of chunks of batches held in memory (see [`INLINE_BYTES`]) have
/// this bit; a restore gives their batches to the operator with the batches around
/// them, as if they had stayed in the task's snapshot.
const JOINED: u64 = 1 << 63;

/// One piece of an operator's snapshot, in restore order.
#[derive(Debug, Clone)]
pub enum StatePart {
    Batch(RecordBatch),
    Stored(StoredChunk),
}

impl StatePart {
    /// The batch, when it is held in memory.
    pub fn batch(&self) -> Option<&RecordBatch> {
        match self {
            StatePart::Batch(b) => Some(b),
            StatePart::Stored(_) => None,
        }
    }

    /// Bytes it takes: in memory, or in the store.
    pub fn bytes(&self) -> usize {
        match self {
            StatePart::Batch(b) => crate::stream::batch_bytes(b),
            StatePart::Stored(c) => c.bytes as usize,
        }
    }
}

/// Where a chunk is, among a job's checkpoints.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkId {
    pub epoch: Epoch,
    pub task: u64,
    pub operator: u64,
    pub seq: u64,
}

/// A chunk of operator state in the store.
#[derive(Debug, Clone)]
pub struct StoredChunk {
    pub id: ChunkId,
    /// Its encoded size.
    pub bytes: u64,
    /// The checkpoints it is stored among.
    pub at: Checkpoints,
    /// Restored into a job of another parallelism: only the rows that subtask `.0` of
    /// `.1` owns.
    pub owned: Option<(usize, usize)>,
}

impl StoredChunk {
    /// Whether it holds batches the operator had in memory (restored with the others).
    pub fn joined(&self) -> bool {
        self.id.seq & JOINED != 0
    }

    /// Its id as the `n`th chunk of its operator's snapshot (a copy keeps its kind).
    pub fn renumbered(&self, n: u64) -> u64 {
        (self.id.seq & JOINED) | n
    }

    /// Its batches, each cut to the rows `op`'s subtask owns after a rescale.
    pub fn load(&self, op: &dyn Operator) -> Result<Vec<RecordBatch>> {
        let bytes = self.at.chunk(self.id)?;
        let mut r = FrameReader::new(&bytes);
        let mut out = Vec::new();
        for _ in 0..r.u64()? {
            let batch = r.batch()?;
            let batch = match self.owned {
                None => Some(batch),
                Some((subtask, parallelism)) => {
                    super::rescale::owned_part(op, batch, subtask, parallelism)?
                }
            };
            out.extend(batch);
        }
        Ok(out)
    }

    pub(super) fn encode(&self, w: &mut FrameWriter) {
        let id = self.id;
        for v in [id.epoch, id.task, id.operator, id.seq, self.bytes] {
            w.u64(v);
        }
    }

    pub(super) fn decode(r: &mut FrameReader, at: Option<&Checkpoints>) -> Result<Self> {
        let id = ChunkId {
            epoch: r.u64()?,
            task: r.u64()?,
            operator: r.u64()?,
            seq: r.u64()?,
        };
        let bytes = r.u64()?;
        let at = at.cloned().ok_or_else(|| {
            DataFusionError::Internal("a snapshot names stored chunks but no store".into())
        })?;
        Ok(Self {
            id,
            bytes,
            at,
            owned: None,
        })
    }
}

/// The batches of one chunk, encoded into `w` (emptied first, its room kept).
fn encode_chunk(w: &mut FrameWriter, batches: &[RecordBatch]) -> Result<()> {
    w.bytes.clear();
    w.u64(batches.len() as u64);
    for b in batches {
        w.batch(b)?;
    }
    Ok(())
}

/// Takes the batches an operator hands over beyond memory during one snapshot and
/// writes them to the store in chunks as they come (or keeps them, for a job without
/// checkpoints in a store).
pub struct ChunkWriter {
    at: Option<Checkpoints>,
    epoch: Epoch,
    task: usize,
    operator: usize,
    pending: Vec<RecordBatch>,
    pending_bytes: usize,
    parts: Vec<StatePart>,
    /// Added to each chunk's position among `parts` for its sequence number.
    first_seq: u64,
    encoded: FrameWriter,
}

impl ChunkWriter {
    pub fn new(at: Option<Checkpoints>, epoch: Epoch, task: usize, operator: usize) -> Self {
        Self {
            at,
            epoch,
            task,
            operator,
            pending: Vec::new(),
            pending_bytes: 0,
            parts: Vec::new(),
            first_seq: 0,
            encoded: FrameWriter::default(),
        }
    }

    /// A writer of chunks of batches operator `operator` held in memory ([`JOINED`]).
    fn joined(at: &Checkpoints, epoch: Epoch, task: usize, operator: usize) -> Self {
        Self {
            first_seq: JOINED,
            ..Self::new(Some(at.clone()), epoch, task, operator)
        }
    }

    /// Keeps `part` in the task's snapshot, after the chunks of what came before it.
    fn keep(&mut self, part: StatePart) -> Result<()> {
        self.write()?;
        self.parts.push(part);
        Ok(())
    }

    pub fn push(&mut self, batch: RecordBatch) -> Result<()> {
        if batch.num_rows() == 0 {
            return Ok(());
        }
        if self.at.is_none() {
            self.parts.push(StatePart::Batch(batch));
            return Ok(());
        }
        self.pending_bytes += crate::stream::batch_bytes(&batch);
        self.pending.push(batch);
        if self.pending_bytes >= CHUNK_BYTES {
            self.write()?;
        }
        Ok(())
    }

    fn write(&mut self) -> Result<()> {
        let Some(at) = &self.at else {
            return Ok(());
        };
        if self.pending.is_empty() {
            return Ok(());
        }
        let id = ChunkId {
            epoch: self.epoch,
            task: self.task as u64,
            operator: self.operator as u64,
            seq: self.first_seq | self.parts.len() as u64,
        };
        encode_chunk(&mut self.encoded, &std::mem::take(&mut self.pending))?;
        self.pending_bytes = 0;
        at.put_chunk(id, &self.encoded.bytes)?;
        self.parts.push(StatePart::Stored(StoredChunk {
            id,
            bytes: self.encoded.bytes.len() as u64,
            at: at.clone(),
            owned: None,
        }));
        Ok(())
    }

    /// The parts written, in order.
    pub fn finish(mut self) -> Result<Vec<StatePart>> {
        self.write()?;
        Ok(self.parts)
    }
}

/// Whether the snapshot holds batches [`store_large_batches`] would store.
pub fn holds_large_batches(snapshot: &TaskSnapshot) -> bool {
    snapshot.operators.iter().any(|parts| holds_large(parts))
}

/// Whether an operator's batches held in memory take [`INLINE_BYTES`] or more in all:
/// many small batches (a join's snapshot shares runs of its chunks, each a batch) weigh
/// on the epoch's encoding as one big one does.
fn holds_large(parts: &[StatePart]) -> bool {
    let held: usize = parts
        .iter()
        .filter_map(StatePart::batch)
        .map(crate::stream::batch_bytes)
        .sum();
    held >= INLINE_BYTES
}

/// Writes the batches of each operator that holds [`INLINE_BYTES`] or more of them to the
/// store as chunks of epoch `epoch` and task `task` (consecutive ones together, up to a
/// chunk's size), in their places among the operator's parts, freeing each once written.
pub fn store_large_batches(
    snapshot: &mut TaskSnapshot,
    at: &Checkpoints,
    epoch: Epoch,
    task: usize,
) -> Result<()> {
    for (k, parts) in snapshot.operators.iter_mut().enumerate() {
        if !holds_large(parts) {
            continue;
        }
        // Its chunks are encoded one after another into one buffer.
        let mut writer = ChunkWriter::joined(at, epoch, task, k);
        for part in std::mem::take(parts) {
            match part {
                StatePart::Batch(batch) => writer.push(batch)?,
                other => writer.keep(other)?,
            }
        }
        *parts = writer.finish()?;
    }
    Ok(())
}

/// Restores an operator from its snapshot's parts, in order: batches held in memory
/// (and those of chunks of them) together, each chunk of state beyond memory on its own
/// as it is read.
pub fn restore_parts(op: &mut dyn Operator, parts: &[StatePart]) -> Result<()> {
    let mut batches = Vec::new();
    let mut restored = false;
    for part in parts {
        match part {
            StatePart::Batch(b) => batches.push(b.clone()),
            StatePart::Stored(chunk) if chunk.joined() => batches.extend(chunk.load(op)?),
            StatePart::Stored(chunk) => {
                if !batches.is_empty() {
                    op.restore(std::mem::take(&mut batches))?;
                }
                let state = chunk.load(op)?;
                op.restore(state)?;
                restored = true;
            }
        }
    }
    if !batches.is_empty() || !restored {
        op.restore(batches)?;
    }
    op.restored()
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use datafusion::arrow::array::{Array, Int64Array};
    use datafusion::arrow::datatypes::{DataType, Field, Schema};

    use super::*;
    use crate::stream::message::ChangeBatch;

    /// `rows` rows of value `v`.
    fn values(v: i64, rows: usize) -> RecordBatch {
        RecordBatch::try_new(
            Arc::new(Schema::new(vec![Field::new("v", DataType::Int64, false)])),
            vec![Arc::new(Int64Array::from(vec![v; rows]))],
        )
        .unwrap()
    }

    /// A batch of 1.1 MB, above the size that goes to the store.
    fn big(v: i64) -> StatePart {
        StatePart::Batch(values(v, 140_000))
    }

    fn small(v: i64) -> StatePart {
        StatePart::Batch(values(v, 3))
    }

    /// Records what each restore call was given: each batch's value and rows.
    #[derive(Default)]
    struct Recorder {
        calls: Vec<Vec<(i64, usize)>>,
        restored: usize,
    }

    impl Operator for Recorder {
        fn process(&mut self, _: usize, _: ChangeBatch, _: &mut Vec<ChangeBatch>) -> Result<()> {
            Ok(())
        }

        fn restore(&mut self, state: Vec<RecordBatch>) -> Result<()> {
            let batch = |b: &RecordBatch| {
                let v = b.column(0).as_any().downcast_ref::<Int64Array>().unwrap();
                (v.value(0), v.len())
            };
            self.calls.push(state.iter().map(batch).collect());
            Ok(())
        }

        fn restored(&mut self) -> Result<()> {
            self.restored += 1;
            Ok(())
        }
    }

    #[test]
    fn big_batches_go_to_the_store_and_restore_with_the_batches_around_them() {
        let at = Checkpoints::new(Arc::new(weir_catalog::MemoryStore::default()), "job/x");
        // Operator 0 also has a chunk of state beyond memory, stored before.
        let mut beyond = ChunkWriter::new(Some(at.clone()), 7, 0, 0);
        beyond.push(values(9, 2)).unwrap();
        let mut parts = vec![small(1), big(2), big(3), small(4)];
        parts.extend(beyond.finish().unwrap());
        parts.push(big(5));
        // Operator 1 holds little; operator 2 many batches over 1 MB in all.
        let many: Vec<StatePart> = (10..20)
            .map(|v| StatePart::Batch(values(v, 14_000)))
            .collect();
        let mut snapshot = TaskSnapshot {
            operators: vec![parts, vec![small(6)], many],
            changes: vec![true, false, true],
            ..Default::default()
        };
        assert!(holds_large_batches(&snapshot));
        store_large_batches(&mut snapshot, &at, 7, 0).unwrap();
        assert!(!holds_large_batches(&snapshot));
        let shape = |parts: &[StatePart]| -> Vec<&str> {
            parts
                .iter()
                .map(|p| match p {
                    StatePart::Batch(_) => "batch",
                    StatePart::Stored(c) if c.joined() => "joined",
                    StatePart::Stored(_) => "beyond",
                })
                .collect()
        };
        // Neighbouring batches share a chunk.
        assert_eq!(
            shape(&snapshot.operators[0]),
            ["joined", "beyond", "joined"]
        );
        assert_eq!(shape(&snapshot.operators[1]), ["batch"]);
        assert_eq!(shape(&snapshot.operators[2]), ["joined"]);

        let back = TaskSnapshot::decode_at(&snapshot.into_bytes().unwrap(), Some(&at)).unwrap();
        let mut op = Recorder::default();
        restore_parts(&mut op, &back.operators[0]).unwrap();
        let held = vec![(1, 3), (2, 140_000), (3, 140_000), (4, 3)];
        assert_eq!(op.calls, vec![held, vec![(9, 2)], vec![(5, 140_000)]]);
        assert_eq!(op.restored, 1);
        let mut op = Recorder::default();
        restore_parts(&mut op, &back.operators[2]).unwrap();
        let many: Vec<(i64, usize)> = (10..20).map(|v| (v, 14_000)).collect();
        assert_eq!(op.calls, vec![many]);
        // A copy of the chunk (a savepoint's) stays one of batches held in memory.
        let StatePart::Stored(joined) = &back.operators[0][0] else {
            panic!("a chunk");
        };
        assert_eq!(joined.renumbered(0), JOINED);
        let StatePart::Stored(beyond) = &back.operators[0][1] else {
            panic!("a chunk");
        };
        assert_eq!(beyond.renumbered(3), 3);
    }
}
