//! The rows a fired window emitted, kept while an allowed lateness may still correct it
//! (window aggregates, windowed fragments): in memory, or under the sled backend in the
//! operator's scratch files as the `emitted` batches a whole snapshot holds, once a
//! snapshot has them. A correction reads them back; a whole snapshot reads those on
//! disk off the task, as they are.

use std::collections::{BTreeMap, BTreeSet};

use datafusion::arrow::datatypes::SchemaRef;
use datafusion::arrow::record_batch::RecordBatch;
use datafusion::common::Result;

use super::partial_spill::PartialSpill;
use crate::stream::snapshot;
use crate::stream::state_backend::batches::Stored;
use crate::stream::window::Span;

pub enum KeptRows {
    Memory(Vec<RecordBatch>),
    Disk(Vec<Stored>),
}

impl KeptRows {
    pub fn memory_size(&self) -> usize {
        match self {
            KeptRows::Memory(rows) => rows.iter().map(RecordBatch::get_array_memory_size).sum(),
            KeptRows::Disk(_) => 0,
        }
    }

    /// The rows, read back from disk (and forgotten there) if they were on it.
    pub fn take(
        self,
        spill: Option<&mut PartialSpill>,
        schema: &SchemaRef,
    ) -> Result<Vec<RecordBatch>> {
        match self {
            KeptRows::Memory(rows) => Ok(rows),
            KeptRows::Disk(stored) => {
                let spill = spill.expect("on disk under the backend");
                stored
                    .into_iter()
                    .map(|s| {
                        let batch = spill.files.get(s)?;
                        spill.files.remove(s)?;
                        let (_, _, columns) = snapshot::parts(&batch, 2)?;
                        crate::stream::batch_of(schema.clone(), columns, batch.num_rows())
                    })
                    .collect()
            }
        }
    }

    /// Forgets them, on disk too.
    pub fn forget(self, spill: Option<&mut PartialSpill>) -> Result<()> {
        if let (KeptRows::Disk(stored), Some(spill)) = (self, spill) {
            for s in stored {
                spill.files.remove(s)?;
            }
        }
        Ok(())
    }

    /// The rows, while they are in memory.
    pub fn in_memory(&self) -> Option<&[RecordBatch]> {
        match self {
            KeptRows::Memory(rows) => Some(rows),
            KeptRows::Disk(_) => None,
        }
    }

    /// Where they are on disk.
    pub fn stored(&self) -> &[Stored] {
        match self {
            KeptRows::Memory(_) => &[],
            KeptRows::Disk(stored) => stored,
        }
    }
}

/// Where the kept rows on disk are, every window's.
pub fn on_disk(kept: &BTreeMap<Span, KeptRows>) -> impl Iterator<Item = Stored> + '_ {
    kept.values().flat_map(|rows| rows.stored().iter().copied())
}

/// Moves kept rows to disk, the windows that fired first first (a late row is likelier
/// for one that fired lately), until `held` bytes in memory fit `spill`'s budget. A
/// window in `changed` (corrected since the last snapshot) waits for the next one.
pub fn move_out(
    kept: &mut BTreeMap<Span, KeptRows>,
    changed: &BTreeSet<Span>,
    spill: &mut PartialSpill,
    held: &mut usize,
) -> Result<()> {
    for (window, rows) in kept.iter_mut() {
        if *held <= spill.memory {
            break;
        }
        let size = rows.memory_size();
        let KeptRows::Memory(batches) = rows else {
            continue;
        };
        if changed.contains(window) {
            continue;
        }
        let stored = batches
            .iter()
            .map(|b| {
                let batch =
                    snapshot::batch("emitted", &[window.0, window.1], b.columns().to_vec())?;
                spill.files.put(&batch)
            })
            .collect::<Result<Vec<_>>>()?;
        *rows = KeptRows::Disk(stored);
        *held -= size;
    }
    Ok(())
}
