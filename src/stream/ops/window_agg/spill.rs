//! A window aggregate's frozen slice states under the sled state backend. Partial states
//! never change once frozen (a checkpoint freezes every slice's live state), so once a
//! snapshot has written them, those beyond the memory budget go to the backend's
//! scratch files as the `slice` batches snapshots hold, and come back when a window
//! that needs them fires. Slices whose windows fire last go first: the next windows to
//! fire find theirs in memory. A whole snapshot reads what is on disk off the task, as
//! it is then.
//!
//! Between snapshots, once the state in memory outgrows what stayed at the previous move
//! by 32 MiB (as a GROUP BY's early emit), every live slice state is frozen there and
//! then, and states go to disk before a snapshot has written them: the next snapshot of
//! changes reads those off the task too.
//!
//! A window whose slices' partial states take more than [`MERGED_IN_PARTS`] times the
//! budget is merged in parts: its partial states, split by a hash of their keys, go to
//! the scratch files a part each, and each part is merged and emitted on its own, so a
//! firing window holds the merged state of a part of its keys at a time, not of all.
//!
//! Under an allowed lateness, the rows a fired window emitted are kept to be corrected;
//! once a snapshot has written them they go to disk too (before the partial states, the
//! windows that fired first first: a late row is likelier for a window that fired
//! lately), as the `emitted` batches snapshots hold, and come back when a late row
//! corrects their window.
//!
//! What stays in memory: each slice's live state (up to 32 MiB past the budget), the
//! partials and emitted rows within the budget, and a part of a firing window's merged
//! state.

use datafusion::arrow::array::{ArrayRef, UInt32Array};
use datafusion::arrow::compute::{concat_batches, take};
use datafusion::arrow::record_batch::RecordBatch;
use datafusion::common::hash_utils::{create_hashes, RandomState};
use datafusion::common::Result;

use super::{Slice, WindowAggregate};
use crate::stream::operator::StateReader;
use crate::stream::ops::grouped::{Grouped, Partial};
use crate::stream::ops::kept_rows::{self, KeptRows};
use crate::stream::ops::partial_spill::PartialSpill;
use crate::stream::snapshot;
use crate::stream::state_backend::batches::Stored;
use crate::stream::state_backend::{EarlyEmitMark, SledBackend};
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

    /// Bytes in memory or on disk.
    fn size(&self) -> usize {
        match self {
            Held::Memory(partial) => partial.size(),
            Held::Disk(stored) => stored.bytes,
        }
    }
}

/// `partial`'s rows split into `count` parts by a hash of their keys: each non-empty
/// part's number and rows. `hashes` is scratch space.
fn split(partial: &Partial, count: usize, hashes: &mut Vec<u64>) -> Result<Vec<(usize, Partial)>> {
    let rows = partial.keys.first().map_or(0, |k| k.len());
    hashes.clear();
    hashes.resize(rows, 0);
    create_hashes(&partial.keys, &PART_HASH, hashes)?;
    let mut rows_of: Vec<Vec<u32>> = vec![Vec::new(); count];
    for (row, hash) in hashes.iter().enumerate() {
        rows_of[(*hash % count as u64) as usize].push(row as u32);
    }
    rows_of
        .into_iter()
        .enumerate()
        .filter(|(_, rows)| !rows.is_empty())
        .map(|(part, rows)| {
            let rows = UInt32Array::from(rows);
            let taken = |columns: &[ArrayRef]| -> Result<Vec<ArrayRef>> {
                Ok(columns
                    .iter()
                    .map(|c| take(c.as_ref(), &rows, None))
                    .collect::<std::result::Result<_, _>>()?)
            };
            Ok((
                part,
                Partial {
                    keys: taken(&partial.keys)?,
                    states: partial
                        .states
                        .iter()
                        .map(|s| taken(s))
                        .collect::<Result<_>>()?,
                },
            ))
        })
        .collect()
}

pub(super) type Spill = PartialSpill;

/// A firing window whose slices' partial states take more than this many times the
/// memory budget is merged in parts.
pub const MERGED_IN_PARTS: usize = 16;
/// Parts a window is merged in at most.
const MAX_PARTS: usize = 256;
/// Keys go to parts by this hash (not the exchange's, which chose the subtask: a
/// subtask's keys would fall into few of its parts).
const PART_HASH: RandomState = RandomState::with_seed(0x7061_7274);

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
        self.early = backend.map(|b| EarlyEmitMark::new(b.memory));
        Ok(self)
    }

    /// Under the backend, when the partial states of `window`'s slices (live ones
    /// included) take more than [`MERGED_IN_PARTS`] times the budget: those states,
    /// live ones frozen, split by key into parts on disk, each to be merged on its own;
    /// `None` to merge them at once (a last slice's live state is then consumed in
    /// place, as without the backend). A window without keys has one row, and is merged
    /// at once.
    pub(super) fn parts_on_disk(&mut self, window: Span) -> Result<Option<Vec<Vec<Stored>>>> {
        let Some(spill) = self.spill.as_mut() else {
            return Ok(None);
        };
        if self.calls.key_schema.fields().is_empty() {
            return Ok(None);
        }
        let slices = self.slicing.slices_of_window(window);
        let bytes: usize = slices
            .iter()
            .filter_map(|slice| self.slices.get(slice))
            .map(|entry| {
                entry.live.as_ref().map_or(0, Grouped::size)
                    + entry.partials.iter().map(Held::size).sum::<usize>()
            })
            .sum();
        let merged_at_once = spill.memory.saturating_mul(MERGED_IN_PARTS);
        if bytes <= merged_at_once {
            return Ok(None);
        }
        let count = bytes.div_ceil(merged_at_once.max(1)).clamp(2, MAX_PARTS);
        let mut parts = vec![Vec::new(); count];
        let mut hashes = Vec::new();
        for slice in &slices {
            let Some(entry) = self.slices.get_mut(slice) else {
                continue;
            };
            if let Some(mut live) = entry.live.take() {
                if !live.is_empty() {
                    entry.partials.push(Held::Memory(live.freeze()?));
                }
            }
            for held in &entry.partials {
                let read;
                let partial = match held {
                    Held::Memory(partial) => partial,
                    Held::Disk(stored) => {
                        read = spill.read(&self.calls, *stored)?;
                        &read
                    }
                };
                for (part, piece) in split(partial, count, &mut hashes)? {
                    let batch = snapshot::batch("slice", &[window.0, window.1], piece.columns())?;
                    parts[part].push(spill.files.put(&batch)?);
                }
            }
        }
        #[cfg(test)]
        {
            self.merged_in_parts += 1;
        }
        Ok(Some(parts))
    }

    /// Part `part` of a window merged in parts, read and removed from disk.
    pub(super) fn merge_part(&mut self, part: Vec<Stored>) -> Result<Grouped> {
        let spill = self.spill.as_mut().expect("parts are on disk");
        let mut state = self.calls.new_state()?;
        for stored in part {
            state.merge(&spill.read(&self.calls, stored)?)?;
            spill.files.remove(stored)?;
        }
        Ok(state)
    }

    /// `window`'s emitted rows, read and removed from disk if they were there.
    pub(super) fn take_emitted(&mut self, emitted: KeptRows) -> Result<RecordBatch> {
        #[cfg(test)]
        {
            self.emitted_read_back += matches!(emitted, KeptRows::Disk(_)) as usize;
        }
        let rows = emitted.take(self.spill.as_mut(), &self.schema)?;
        Ok(concat_batches(&self.schema, &rows)?)
    }

    /// Bytes of the partial states kept in memory.
    fn partials_in_memory(&self) -> usize {
        self.slices
            .values()
            .flat_map(|s| &s.partials)
            .map(Held::memory_size)
            .sum()
    }

    /// Between snapshots, once the state in memory outgrows what stayed at the previous
    /// move by [`crate::stream::state_backend::EARLY_EMIT_SLACK`]: every live slice state
    /// is frozen, and partial states (those no snapshot has written yet included: the
    /// next snapshot of changes reads them from disk) and snapshotted emitted rows go to
    /// disk until what is in memory fits the budget.
    pub(super) fn move_out_early(&mut self) -> Result<()> {
        let Some(mark) = &self.early else {
            return Ok(());
        };
        let live: usize = self
            .slices
            .values()
            .filter_map(|s| s.live.as_ref())
            .map(Grouped::size)
            .sum();
        let emitted: usize = self.emitted.values().map(KeptRows::memory_size).sum();
        if !mark.is_passed(live + self.partials_in_memory() + emitted) {
            return Ok(());
        }
        for entry in self.slices.values_mut() {
            if let Some(mut live) = entry.live.take() {
                if !live.is_empty() {
                    entry.partials.push(Held::Memory(live.freeze()?));
                }
            }
        }
        self.move_out(true)
    }

    /// After a snapshot: what is on disk as it is now, for a whole one (read later, off
    /// the task); then the partials beyond the budget go to disk, those of the slices
    /// whose last window ends last first.
    pub(super) fn spilled_snapshot(&mut self, whole: bool) -> Result<Option<StateReader>> {
        let Some(spill) = self.spill.as_ref() else {
            return Ok(None);
        };
        // A whole snapshot needs what is on disk; one of changes, what went there before
        // it was written.
        let written_before = std::mem::take(&mut self.unsnapshotted_on_disk);
        let partials = self.slices.values().flat_map(|s| &s.partials);
        let partials = partials.filter_map(|held| match held {
            Held::Disk(stored) => Some(*stored),
            Held::Memory(_) => None,
        });
        let on_disk = partials.chain(kept_rows::on_disk(&self.emitted));
        let reader = spill.snapshot_reader(whole, on_disk, written_before)?;
        self.move_out(false)?;
        Ok(reader)
    }

    /// Moves snapshotted emitted rows, then partial states (only those a snapshot wrote
    /// unless `unsnapshotted`), to disk until what is in memory fits the budget; the
    /// early-move mark is then set from what stayed.
    fn move_out(&mut self, unsnapshotted: bool) -> Result<()> {
        let Some(memory) = self.spill.as_ref().map(|s| s.memory) else {
            return Ok(());
        };
        let emitted_bytes: usize = self.emitted.values().map(KeptRows::memory_size).sum();
        let mut held = self.partials_in_memory() + emitted_bytes;
        self.move_partials_out(memory, unsnapshotted, &mut held)?;
        if let Some(mark) = &mut self.early {
            mark.moved(held);
        }
        Ok(())
    }

    fn move_partials_out(&mut self, memory: usize, all: bool, held: &mut usize) -> Result<()> {
        if *held <= memory {
            return Ok(());
        }
        let spill = self.spill.as_mut().expect("under the backend");
        kept_rows::move_out(&mut self.emitted, &self.emitted_changed, spill, held)?;
        if *held <= memory {
            return Ok(());
        }
        let mut order: Vec<Span> = self.slices.keys().copied().collect();
        order.sort_by_key(|slice| std::cmp::Reverse(self.slicing.last_end(*slice)));
        let spill = self.spill.as_mut().expect("under the backend");
        for slice in order {
            let entry: &mut Slice = self.slices.get_mut(&slice).expect("listed");
            let upto = if all {
                entry.partials.len()
            } else {
                entry.snapshotted
            };
            for partial in &mut entry.partials[..upto] {
                if *held <= memory {
                    return Ok(());
                }
                let Held::Memory(state) = partial else {
                    continue;
                };
                let size = state.size();
                let batch = snapshot::batch("slice", &[slice.0, slice.1], state.columns())?;
                *partial = Held::Disk(spill.files.put(&batch)?);
                *held -= size;
            }
        }
        Ok(())
    }
}
