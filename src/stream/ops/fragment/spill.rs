//! A windowed fragment's buffered rows under the sled state backend (window TopN, window
//! joins, window deduplication). Buffered batches never change, so once a snapshot has
//! written them, those beyond the memory budget go to the backend's scratch files as
//! the `rows` batches snapshots hold, those of the windows that fire last first, and
//! come back when their window fires. A whole snapshot reads what is on disk off the
//! task, as it is.
//!
//! Between snapshots, once the rows in memory outgrow what stayed at the previous move
//! by 32 MiB, batches go to disk before a snapshot has written them: the next snapshot
//! of changes reads those off the task too.
//!
//! Under an allowed lateness, the rows a fired window emitted go to disk too once a
//! snapshot has them, before buffered rows ([`crate::stream::ops::kept_rows`]).
//!
//! What stays in memory: the rows buffered since the last move (up to 32 MiB past the
//! budget), those within the budget, and a firing window's rows while DataFusion runs
//! over them.

use datafusion::common::Result;

use super::{Fragment, Span};
use crate::stream::message::ChangeBatch;
use crate::stream::operator::StateReader;
use crate::stream::ops::kept_rows::{self, KeptRows};
use crate::stream::ops::partial_spill::PartialSpill;
use crate::stream::state_backend::batches::Stored;
use crate::stream::state_backend::{EarlyEmitMark, SledBackend};

/// A buffered batch of a window's input, in memory or in the scratch files.
#[derive(Clone)]
pub(super) enum Buffered {
    Memory(Box<ChangeBatch>),
    Disk(Stored),
}

impl Buffered {
    pub(super) fn memory_size(&self) -> usize {
        match self {
            Buffered::Memory(rows) => rows.rows.get_array_memory_size(),
            Buffered::Disk(_) => 0,
        }
    }
}

pub(super) type Spill = PartialSpill;

impl Fragment {
    /// Keeps buffered rows beyond `backend`'s memory budget on disk.
    pub fn with_backend(mut self, backend: Option<&SledBackend>) -> Result<Self> {
        self.spill = Spill::under(backend)?;
        self.early = backend.map(|b| EarlyEmitMark::new(b.memory));
        Ok(self)
    }

    /// Between snapshots, once the rows in memory outgrow what stayed at the previous
    /// move by [`crate::stream::state_backend::EARLY_EMIT_SLACK`]: batches (those no
    /// snapshot has written yet included: the next snapshot of changes reads them from
    /// disk) and snapshotted emitted rows go to disk until what is in memory fits the
    /// budget.
    pub(super) fn move_out_early(&mut self) -> Result<()> {
        let Some(mark) = &self.early else {
            return Ok(());
        };
        if !mark.is_passed(self.held_in_memory()) {
            return Ok(());
        }
        self.move_out(true)
    }

    /// Bytes of buffered and emitted rows in memory.
    pub(super) fn held_in_memory(&self) -> usize {
        self.buffered_in_memory()
            + self
                .emitted
                .values()
                .map(KeptRows::memory_size)
                .sum::<usize>()
    }

    /// The batches of `buffered`, those on disk read back.
    pub(super) fn loaded(&self, buffered: &[Vec<Buffered>]) -> Result<Vec<Vec<ChangeBatch>>> {
        buffered
            .iter()
            .map(|input| {
                input
                    .iter()
                    .map(|b| match b {
                        Buffered::Memory(rows) => Ok((**rows).clone()),
                        Buffered::Disk(stored) => {
                            let spill = self.spill.as_ref().expect("on disk under the backend");
                            Ok(self.decode_rows(&spill.files.get(*stored)?)?.2)
                        }
                    })
                    .collect()
            })
            .collect()
    }

    /// Forgets what `buffered` kept on disk.
    pub(super) fn remove(&mut self, buffered: &[Vec<Buffered>]) -> Result<()> {
        let Some(spill) = self.spill.as_mut() else {
            return Ok(());
        };
        for b in buffered.iter().flatten() {
            if let Buffered::Disk(stored) = b {
                spill.files.remove(*stored)?;
            }
        }
        Ok(())
    }

    /// After a snapshot: what is on disk as it is now, for a whole one (read later, off
    /// the task); then the batches beyond the budget go to disk.
    pub(super) fn spilled_snapshot(&mut self, whole: bool) -> Result<Option<StateReader>> {
        let Some(spill) = self.spill.as_ref() else {
            return Ok(None);
        };
        // A whole snapshot needs what is on disk; one of changes, what went there before
        // it was written.
        let written_before = std::mem::take(&mut self.unsnapshotted_on_disk);
        let buffered = self.buffers.values().flatten().flatten();
        let buffered = buffered.filter_map(|b| match b {
            Buffered::Disk(stored) => Some(*stored),
            Buffered::Memory(_) => None,
        });
        let on_disk = buffered.chain(kept_rows::on_disk(&self.emitted));
        let reader = spill.snapshot_reader(whole, on_disk, written_before)?;
        self.move_out(false)?;
        Ok(reader)
    }

    /// Moves snapshotted emitted rows, then buffered batches (only those a snapshot wrote
    /// unless `unsnapshotted`; those of the windows that end last first) to disk until
    /// what is in memory fits the budget; the early-move mark is then set from what
    /// stayed.
    pub(super) fn move_out(&mut self, unsnapshotted: bool) -> Result<()> {
        let Some(memory) = self.spill.as_ref().map(|s| s.memory) else {
            return Ok(());
        };
        let mut held = self.held_in_memory();
        self.move_batches_out(memory, unsnapshotted, &mut held)?;
        if let Some(mark) = &mut self.early {
            mark.moved(held);
        }
        Ok(())
    }

    fn move_batches_out(&mut self, memory: usize, all: bool, held: &mut usize) -> Result<()> {
        let spill = self.spill.as_mut().expect("under the backend");
        kept_rows::move_out(&mut self.emitted, &self.emitted_changed, spill, held)?;
        if *held <= memory {
            return Ok(());
        }
        let mut spans: Vec<Span> = self.buffers.keys().copied().collect();
        spans.sort_by_key(|span| std::cmp::Reverse(span.1));
        for span in spans {
            let taken = self.snapshotted.get(&span).cloned().unwrap_or_default();
            let spill = self.spill.as_mut().expect("under the backend");
            let inputs = self.buffers.get_mut(&span).expect("listed");
            for (input, changes) in inputs.iter_mut().enumerate() {
                let upto = match all {
                    true => changes.len(),
                    false => taken.get(input).copied().unwrap_or(0),
                };
                for b in &mut changes[..upto] {
                    if *held <= memory {
                        return Ok(());
                    }
                    let Buffered::Memory(rows) = b else {
                        continue;
                    };
                    let size = rows.rows.get_array_memory_size();
                    let batch = super::rows_batch(span, input, rows)?;
                    *b = Buffered::Disk(spill.files.put(&batch)?);
                    *held -= size;
                }
            }
        }
        Ok(())
    }
}
