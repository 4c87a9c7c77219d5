//! Frozen partial aggregate states beyond an operator's memory budget under the sled
//! state backend (window slices', sessions'), kept as the snapshot batches that hold
//! them: two leading integers (the slice's or session's bounds), then the partial
//! state's columns. Windowed fragments keep their buffered rows here too, as their
//! `rows` snapshot batches.

use datafusion::arrow::record_batch::RecordBatch;
use datafusion::common::Result;

use super::grouped::{AggregateCalls, Partial};
use crate::stream::operator::StateReader;
use crate::stream::snapshot;
use crate::stream::state_backend::batches::{BatchFiles, Stored, StoredPlace};
use crate::stream::state_backend::SledBackend;

pub struct PartialSpill {
    pub files: BatchFiles,
    /// Bytes of partial states the operator keeps in memory.
    pub memory: usize,
}

impl PartialSpill {
    /// The store of an operator kept under `backend`, if any.
    pub fn under(backend: Option<&SledBackend>) -> Result<Option<Self>> {
        backend
            .map(|backend| {
                Ok(Self {
                    files: BatchFiles::open(backend)?,
                    memory: backend.memory,
                })
            })
            .transpose()
    }

    /// A whole snapshot's part on disk, read later off the task: each stored state as it
    /// is now, followed by the batches that go with it. `None` when nothing is on disk.
    pub fn reader(on_disk: Vec<(StoredPlace, Vec<RecordBatch>)>) -> Option<StateReader> {
        if on_disk.is_empty() {
            return None;
        }
        Some(Box::new(move |out| {
            for (place, after) in on_disk {
                out(place.read()?)?;
                for batch in after {
                    out(batch)?;
                }
            }
            Ok(())
        }))
    }

    /// A whole snapshot's part on disk when it is only `stored` (no batches after them).
    pub fn reader_of(
        &self,
        stored: impl IntoIterator<Item = Stored>,
    ) -> Result<Option<StateReader>> {
        let on_disk = stored
            .into_iter()
            .map(|s| self.files.place(s).map(|p| (p, vec![])))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self::reader(on_disk))
    }

    /// The reader of a snapshot's part on disk: for a whole snapshot everything there
    /// (`on_disk`), for one of changes what went there before it was written.
    pub fn snapshot_reader(
        &self,
        whole: bool,
        on_disk: impl Iterator<Item = Stored>,
        written_before: Vec<Stored>,
    ) -> Result<Option<StateReader>> {
        match whole {
            true => self.reader_of(on_disk),
            false => self.reader_of(written_before),
        }
    }

    /// A partial state from disk.
    pub fn read(&self, calls: &AggregateCalls, stored: Stored) -> Result<Partial> {
        let (_, _, columns) = snapshot::parts(&self.files.get(stored)?, 2)?;
        Partial::from_columns(calls, &columns)
    }
}
