//! State batches in an operator's scratch files, a run each: the frozen partial states of
//! window slices and sessions, written once, read back whole, and removed when their
//! slice or session goes.

use datafusion::arrow::record_batch::RecordBatch;
use datafusion::common::{DataFusionError, Result};

use super::files::{RunFiles, RunPlace};
use super::SledBackend;
use crate::stream::checkpoint::frame::{FrameReader, FrameWriter};

/// Where a batch went: its run and the bytes it took.
#[derive(Debug, Clone, Copy)]
pub struct Stored {
    pub id: u64,
    pub bytes: usize,
}

pub struct BatchFiles {
    files: RunFiles,
    next_id: u64,
    /// Bytes of the batches stored.
    bytes: usize,
}

impl BatchFiles {
    pub fn open(backend: &SledBackend) -> Result<Self> {
        Ok(Self {
            files: RunFiles::new(backend.scratch_dir()?),
            next_id: 0,
            bytes: 0,
        })
    }

    pub fn bytes(&self) -> usize {
        self.bytes
    }

    pub fn put(&mut self, batch: &RecordBatch) -> Result<Stored> {
        let mut w = FrameWriter::default();
        w.batch(batch)?;
        let id = self.next_id;
        self.next_id += 1;
        self.files.put(id, &w.bytes)?;
        self.bytes += w.bytes.len();
        Ok(Stored {
            id,
            bytes: w.bytes.len(),
        })
    }

    pub fn get(&self, stored: Stored) -> Result<RecordBatch> {
        let bytes = self.files.get(stored.id)?.ok_or_else(|| missing(stored))?;
        FrameReader::new(&bytes).batch()
    }

    /// Where a batch is now, to read it later off the operator's task (runs are never
    /// written over).
    pub fn place(&self, stored: Stored) -> Result<StoredPlace> {
        self.files
            .place(stored.id)
            .map(StoredPlace)
            .ok_or_else(|| missing(stored))
    }

    pub fn remove(&mut self, stored: Stored) -> Result<()> {
        self.files.remove(stored.id)?;
        self.bytes -= stored.bytes;
        Ok(())
    }
}

/// A stored batch's place in the scratch files.
pub struct StoredPlace(RunPlace);

impl StoredPlace {
    pub fn read(&self) -> Result<RecordBatch> {
        FrameReader::new(&self.0.read()?).batch()
    }
}

fn missing(stored: Stored) -> DataFusionError {
    DataFusionError::Internal(format!("state batch {} is not on disk", stored.id))
}
