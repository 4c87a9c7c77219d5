//! A session aggregate's session states under the sled state backend. After each
//! snapshot, the partial states beyond the memory budget go to the backend's scratch
//! files as the `session` batches whole snapshots hold: first those of sessions no row
//! changed since the previous snapshot, then the others, each group those ending last
//! first (the next sessions to close keep theirs). A session's key, bounds and emitted
//! rows stay in memory. A row that joins a session on disk, or the watermark closing it,
//! brings its state back; incremental snapshots read the states on disk of the keys they
//! write; a whole snapshot reads them off the task, as they are then.

use datafusion::arrow::record_batch::RecordBatch;
use datafusion::common::{DataFusionError, HashSet, Result};

use super::{partial_columns, SessionAggregate};
use crate::stream::operator::StateReader;
use crate::stream::ops::grouped::{AggregateCalls, OneGroup};
use crate::stream::ops::partial_spill::PartialSpill;
use crate::stream::snapshot;
use crate::stream::state_backend::batches::Stored;
use crate::stream::state_backend::SledBackend;

/// A session's partial state: live in memory, or frozen in the scratch files.
pub(super) enum Held {
    Memory(OneGroup),
    Disk(Stored),
}

impl Held {
    pub(super) fn memory_size(&self) -> usize {
        match self {
            Held::Memory(state) => state.size(),
            Held::Disk(_) => 0,
        }
    }
}

pub(super) type Spill = PartialSpill;

/// Forgets what `held` kept on disk.
pub(super) fn remove(spill: &mut Spill, held: &Held) -> Result<()> {
    match held {
        Held::Disk(stored) => spill.files.remove(*stored),
        Held::Memory(_) => Ok(()),
    }
}

/// `held` as a live state, read back from disk (and removed there) if it went.
pub(super) fn into_live(
    spill: Option<&mut Spill>,
    calls: &AggregateCalls,
    held: Held,
) -> Result<OneGroup> {
    match held {
        Held::Memory(state) => Ok(state),
        Held::Disk(stored) => {
            let spill = spill.ok_or_else(|| {
                DataFusionError::Internal("a session's state on disk without a backend".into())
            })?;
            let mut state = calls.new_one_group()?;
            state.merge(&spill.read(calls, stored)?.states)?;
            remove(spill, &held)?;
            Ok(state)
        }
    }
}

impl SessionAggregate {
    /// Keeps session states beyond `backend`'s memory budget on disk.
    pub fn with_backend(mut self, backend: Option<&SledBackend>) -> Result<Self> {
        self.spill = Spill::under(backend)?;
        Ok(self)
    }

    /// Session `id`'s live state, brought back from disk if it went there.
    /// The caller counts its memory again (`account`) once done with it.
    pub(super) fn live_state(&mut self, id: usize) -> Result<&mut OneGroup> {
        let session = self.sessions.get_mut(&id).expect("live session");
        if let Held::Disk(stored) = session.state {
            let held = Held::Disk(stored);
            session.state = Held::Memory(into_live(self.spill.as_mut(), &self.calls, held)?);
        }
        match &mut session.state {
            Held::Memory(state) => Ok(state),
            Held::Disk(_) => unreachable!("brought back"),
        }
    }

    /// After a snapshot: what is on disk as it is now, for a whole one (read later, off
    /// the task, each session's state followed by its emitted rows as the snapshot
    /// holds them); then the states beyond the budget go to disk. `changed`: the
    /// sessions rows changed since the snapshot before.
    pub(super) fn spilled_snapshot(
        &mut self,
        whole: bool,
        changed: &HashSet<usize>,
    ) -> Result<Option<StateReader>> {
        let Some(spill) = self.spill.as_ref() else {
            return Ok(None);
        };
        // Only a whole snapshot needs what is on disk (an incremental one read the
        // states of the keys it wrote).
        let reader = if whole {
            let on_disk = self
                .sessions
                .values()
                .filter_map(|s| match &s.state {
                    Held::Disk(stored) => Some(spill.files.place(*stored).and_then(|place| {
                        let emitted = s.emitted.iter().map(emitted_batch);
                        Ok((place, emitted.collect::<Result<_>>()?))
                    })),
                    Held::Memory(_) => None,
                })
                .collect::<Result<Vec<_>>>()?;
            Spill::reader(on_disk)
        } else {
            None
        };
        self.move_out(changed)?;
        Ok(reader)
    }

    /// Moves session states to disk until those in memory fit the budget: unchanged
    /// sessions first, then changed ones, those ending last first.
    pub(super) fn move_out(&mut self, changed: &HashSet<usize>) -> Result<()> {
        let Some(memory) = self.spill.as_ref().map(|s| s.memory) else {
            return Ok(());
        };
        let mut held: usize = self.sessions.values().map(|s| s.state.memory_size()).sum();
        if held <= memory {
            return Ok(());
        }
        let mut order: Vec<(bool, i64, usize)> = self
            .sessions
            .iter()
            .filter(|(_, s)| matches!(s.state, Held::Memory(_)))
            .map(|(id, s)| (changed.contains(id), -s.end, *id))
            .collect();
        order.sort_unstable();
        for (_, _, id) in order {
            let spill = self.spill.as_mut().expect("checked");
            if held <= memory {
                break;
            }
            let session = self.sessions.get_mut(&id).expect("listed");
            let Held::Memory(state) = &mut session.state else {
                continue;
            };
            held -= state.size();
            let columns = partial_columns(&self.converter, &session.key, state.freeze()?)?;
            let batch = snapshot::batch("session", &[session.start, session.end], columns)?;
            session.state = Held::Disk(spill.files.put(&batch)?);
            self.account(id);
        }
        Ok(())
    }
}

/// The snapshot batch of a session's emitted rows.
pub(super) fn emitted_batch(rows: &RecordBatch) -> Result<RecordBatch> {
    snapshot::batch("emitted", &[], rows.columns().to_vec())
}
