//! A window aggregate's frozen slice states under the sled state backend. Partial states
//! never change once frozen (a checkpoint freezes every slice's live state), so once a
//! snapshot has written them, those beyond the memory budget go to the backend's
//! scratch files as the `slice` batches snapshots hold, and come back when a window
//! that needs them fires. Slices whose windows fire last go first: the next windows to
//! fire find theirs in memory. Incremental snapshots never need what is on disk (it was
//! written before it went); a whole snapshot reads it off the task, as it is then.
//!
//! What stays in memory: each slice's live state (what arrived since the last
//! checkpoint), the partials within the budget, and a window's merged state while it
//! fires; emitted rows kept for a lateness stay in memory too.

use datafusion::common::Result;

use super::{Slice, WindowAggregate};
use crate::stream::operator::StateReader;
use crate::stream::ops::grouped::Partial;
use crate::stream::ops::partial_spill::PartialSpill;
use crate::stream::snapshot;
use crate::stream::state_backend::batches::Stored;
use crate::stream::state_backend::SledBackend;
use crate::stream::window::Span;

/// A frozen partial state, in memory or in the scratch files.
pub(super) enum Held {
    Memory(Partial),
    Disk(Stored),
}

impl Held {
    pub(super) fn memory_size(&self) -> usize {
        match self {
            Held::Memory(partial) => partial.size(),
            Held::Disk(_) => 0,
        }
    }
}

pub(super) type Spill = PartialSpill;

/// Forgets what `partials` kept on disk.
pub(super) fn remove(spill: &mut Spill, partials: &[Held]) -> Result<()> {
    for held in partials {
        if let Held::Disk(stored) = held {
            spill.files.remove(*stored)?;
        }
    }
    Ok(())
}

impl WindowAggregate {
    /// Keeps frozen slice states beyond `backend`'s memory budget on disk.
    pub fn with_backend(mut self, backend: Option<&SledBackend>) -> Result<Self> {
        self.spill = Spill::under(backend)?;
        Ok(self)
    }

    /// Bytes of the partial states kept in memory.
    fn partials_in_memory(&self) -> usize {
        self.slices
            .values()
            .flat_map(|s| &s.partials)
            .map(Held::memory_size)
            .sum()
    }

    /// After a snapshot: what is on disk as it is now, for a whole one (read later, off
    /// the task); then the partials beyond the budget go to disk, those of the slices
    /// whose last window ends last first.
    pub(super) fn spilled_snapshot(&mut self, whole: bool) -> Result<Option<StateReader>> {
        let Some(spill) = self.spill.as_ref() else {
            return Ok(None);
        };
        // Only a whole snapshot needs what is on disk (an incremental one wrote it before
        // it went).
        let reader = if whole {
            let on_disk = self
                .slices
                .values()
                .flat_map(|s| &s.partials)
                .filter_map(|held| match held {
                    Held::Disk(stored) => Some(spill.files.place(*stored).map(|p| (p, vec![]))),
                    Held::Memory(_) => None,
                })
                .collect::<Result<Vec<_>>>()?;
            Spill::reader(on_disk)
        } else {
            None
        };
        self.move_out()?;
        Ok(reader)
    }

    /// Moves snapshotted partial states to disk until those in memory fit the budget.
    fn move_out(&mut self) -> Result<()> {
        let Some(memory) = self.spill.as_ref().map(|s| s.memory) else {
            return Ok(());
        };
        let mut held = self.partials_in_memory();
        if held <= memory {
            return Ok(());
        }
        let mut order: Vec<Span> = self.slices.keys().copied().collect();
        order.sort_by_key(|slice| std::cmp::Reverse(self.slicing.last_end(*slice)));
        let spill = self.spill.as_mut().expect("checked");
        for slice in order {
            let entry: &mut Slice = self.slices.get_mut(&slice).expect("listed");
            for partial in &mut entry.partials[..entry.snapshotted] {
                if held <= memory {
                    return Ok(());
                }
                let Held::Memory(state) = partial else {
                    continue;
                };
                let size = state.size();
                let batch = snapshot::batch("slice", &[slice.0, slice.1], state.columns())?;
                *partial = Held::Disk(spill.files.put(&batch)?);
                held -= size;
            }
        }
        Ok(())
    }
}
