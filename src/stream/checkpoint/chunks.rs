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
use crate::stream::message::Epoch;
use crate::stream::operator::Operator;

/// Bytes of batches (in memory) per chunk.
const CHUNK_BYTES: usize = 16 << 20;

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
            StatePart::Batch(b) => b.get_array_memory_size(),
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

/// The batches of one chunk, encoded.
pub(super) fn encode_chunk(batches: &[RecordBatch]) -> Result<Vec<u8>> {
    let mut w = FrameWriter::default();
    w.u64(batches.len() as u64);
    for b in batches {
        w.batch(b)?;
    }
    Ok(w.bytes)
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
        }
    }

    pub fn push(&mut self, batch: RecordBatch) -> Result<()> {
        if batch.num_rows() == 0 {
            return Ok(());
        }
        if self.at.is_none() {
            self.parts.push(StatePart::Batch(batch));
            return Ok(());
        }
        self.pending_bytes += batch.get_array_memory_size();
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
            seq: self.parts.len() as u64,
        };
        let bytes = encode_chunk(&std::mem::take(&mut self.pending))?;
        self.pending_bytes = 0;
        at.put_chunk(id, &bytes)?;
        self.parts.push(StatePart::Stored(StoredChunk {
            id,
            bytes: bytes.len() as u64,
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

/// Restores an operator from its snapshot's parts, in order: batches held in memory
/// together, each stored chunk on its own as it is read.
pub fn restore_parts(op: &mut dyn Operator, parts: &[StatePart]) -> Result<()> {
    let mut batches = Vec::new();
    let mut restored = false;
    for part in parts {
        match part {
            StatePart::Batch(b) => batches.push(b.clone()),
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
