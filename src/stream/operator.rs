//! The operator contract: synchronous handlers over whole batches. Tasks do the I/O
//! (channels, readers, sinks) around a chain of operators.

use datafusion::arrow::array::ArrayRef;
use datafusion::arrow::record_batch::RecordBatch;
use datafusion::common::{DataFusionError, Result};

use super::message::{ChangeBatch, Millis};

/// Reads the state an operator keeps beyond memory as a snapshot froze it, handing its
/// batches to `out` one at a time ([`Operator::snapshot_beyond_memory`]).
pub type StateReader =
    Box<dyn FnOnce(&mut dyn FnMut(RecordBatch) -> Result<()>) -> Result<()> + Send>;

/// One stage of a continuous query, owned by one subtask.
///
/// An operator sees batches, then the watermark (the minimum over its inputs) each time it
/// advances; what it emits goes into `out`. Its state is its own, and it says how large it
/// is so `SHOW JOBS` can report it.
pub trait Operator: Send {
    /// Handles rows from input `input` (0 unless the operator joins several inputs).
    fn process(
        &mut self,
        input: usize,
        batch: ChangeBatch,
        out: &mut Vec<ChangeBatch>,
    ) -> Result<()>;

    /// The watermark advanced to `watermark`: emit what it completes. The watermark itself
    /// is forwarded after the rows emitted here, so those meet the previous one downstream.
    fn on_watermark(&mut self, _watermark: Millis, _out: &mut Vec<ChangeBatch>) -> Result<()> {
        Ok(())
    }

    /// A checkpoint barrier arrived on every input: emit what was held back for it.
    /// Unbounded aggregates and TopN fold a whole epoch of changes and emit each changed
    /// key once here (Flink's mini-batch), not once per input row.
    fn on_barrier(&mut self, _out: &mut Vec<ChangeBatch>) -> Result<()> {
        Ok(())
    }

    /// Every input ended (after `on_watermark(END_OF_TIME)`).
    fn on_end(&mut self, _out: &mut Vec<ChangeBatch>) -> Result<()> {
        Ok(())
    }

    /// Bytes of state held.
    fn state_size(&self) -> usize {
        0
    }

    /// Rows dropped because they arrived after the windows they belonged to had fired.
    fn late_rows_dropped(&self) -> u64 {
        0
    }

    /// The rows it dropped as late since the previous call (made at each barrier), as
    /// rows of the late-data table, which they reach when the epoch commits.
    fn take_late_rows(&mut self) -> Vec<RecordBatch> {
        vec![]
    }

    /// The operator's state as Arrow batches, for a checkpoint. Taking it may reorganise
    /// the state (live accumulators become partial states) but never changes results.
    fn snapshot(&mut self) -> Result<Vec<RecordBatch>> {
        Ok(vec![])
    }

    /// What changed in its state since its previous snapshot (whole or not), for an
    /// incremental checkpoint; `None` when it only takes whole snapshots. Restoring gets
    /// the last whole snapshot's batches followed by every later one's, in order.
    fn snapshot_changes(&mut self) -> Result<Option<Vec<RecordBatch>>> {
        Ok(None)
    }

    /// The part of the snapshot just taken (by `snapshot` when `whole`, else by
    /// `snapshot_changes`) that the operator keeps beyond memory, or froze in memory to
    /// be encoded off its task, as it is now: read later, off the operator's task, while
    /// the operator goes on, into batches handed to the reader's `out` one at a time,
    /// which a checkpoint writes to the store as they come instead of holding them.
    /// `None`: nothing more. A restore gets these batches after the other ones of the
    /// same snapshot, maybe over several `restore` calls.
    fn snapshot_beyond_memory(&mut self, whole: bool) -> Result<Option<StateReader>> {
        let _ = whole;
        Ok(None)
    }

    /// The job starts from the checkpoint of `epoch` (0: from nothing), called before
    /// `restore`. Epochs go on across restarts, so `(epoch, subtask)` names this run
    /// apart from every run whose state a checkpoint can hold: operators that give their
    /// state rows identities for incremental snapshots make them unique with it.
    fn started_from(&mut self, epoch: u64, subtask: usize) {
        let _ = (epoch, subtask);
    }

    /// Puts back what [`Operator::snapshot`] took, into a fresh operator of the same plan.
    /// When a job is rescaled, a subtask restores the rows of several old subtasks' batches
    /// (each filtered to the keys it now owns), so restoring is additive. State kept
    /// beyond memory comes back in more calls, in order; [`Operator::restored`] follows
    /// the last.
    fn restore(&mut self, _state: Vec<RecordBatch>) -> Result<()> {
        Ok(())
    }

    /// Every batch of the snapshot was restored.
    fn restored(&mut self) -> Result<()> {
        Ok(())
    }

    /// The key of each row of one of its state batches (other than `progress`), as the
    /// exchange in front of the operator hashes its input rows: a rescaled job's subtasks
    /// each restore the rows whose keys they now own. `None`: the batch is not keyed and
    /// every subtask restores it.
    fn state_keys(&self, batch: &RecordBatch) -> Result<Option<Vec<ArrayRef>>> {
        let _ = batch;
        Err(DataFusionError::NotImplemented(
            "this operator's state cannot move between subtasks".into(),
        ))
    }
}

/// What operator tests share.
#[cfg(test)]
pub mod testing {
    use super::*;

    /// A sled backend with no memory budget, in a temporary directory (kept while the
    /// returned guard lives): every state that can go to disk does.
    pub fn backend_without_memory() -> (tempfile::TempDir, crate::stream::state_backend::SledBackend)
    {
        let dir = tempfile::tempdir().unwrap();
        let backend = crate::stream::state_backend::SledBackend {
            root: dir.path().to_path_buf(),
            memory: 0,
        };
        (dir, backend)
    }

    /// A whole snapshot (or the changes since the previous one) with what the operator
    /// keeps beyond memory, as a checkpoint takes it.
    pub fn snapshot_of(op: &mut dyn Operator, whole: bool) -> Vec<RecordBatch> {
        let mut batches = if whole {
            op.snapshot().unwrap()
        } else {
            op.snapshot_changes().unwrap().unwrap()
        };
        if let Some(read) = op.snapshot_beyond_memory(whole).unwrap() {
            read(&mut |b| {
                batches.push(b);
                Ok(())
            })
            .unwrap();
        }
        batches
    }

    /// Under the sled backend with no memory budget and no minimum idle time: new keys go
    /// to disk at a barrier, a key brought back stays in memory while every epoch uses it,
    /// and goes once an epoch does not. `epoch` runs rows (key, value) and a barrier and
    /// checks what came out; `counts` says how many keys are in memory and on disk.
    pub fn brought_back_state_stays_while_in_use<O>(
        op: &mut O,
        epoch: impl Fn(&mut O, &[(&'static str, i64)]),
        counts: impl Fn(&O) -> (usize, usize),
    ) {
        epoch(op, &[("a", 1), ("b", 2)]);
        assert_eq!(counts(op), (0, 2), "new keys go at the barrier");
        for v in 3..6 {
            epoch(op, &[("a", v)]);
            assert_eq!(counts(op), (1, 1), "a key in use stays");
        }
        epoch(op, &[("c", 9)]);
        assert_eq!(counts(op), (0, 3), "a key unused for an epoch goes");
    }

    /// Runs each epoch's batches through `plain` then a barrier, and through `early` a
    /// batch at a time with `after_batch` looking at it after each, then a barrier; after
    /// every epoch both changelogs must leave the same rows, however they were folded.
    pub fn leave_the_same_rows<O: Operator>(
        plain: &mut O,
        early: &mut O,
        epochs: Vec<Vec<ChangeBatch>>,
        mut after_batch: impl FnMut(&O),
    ) {
        use crate::stream::message::{change_lines, rows_left};
        let (mut expected, mut got) = (Vec::new(), Vec::new());
        for batches in epochs {
            for batch in batches {
                plain.process(0, batch.clone(), &mut expected).unwrap();
                early.process(0, batch, &mut got).unwrap();
                after_batch(early);
            }
            plain.on_barrier(&mut expected).unwrap();
            early.on_barrier(&mut got).unwrap();
            assert_eq!(
                rows_left(&change_lines(&got)),
                rows_left(&change_lines(&expected))
            );
        }
    }

    /// One input batch and the watermark after it.
    pub type Step = (ChangeBatch, Millis);

    /// Runs `batch` through `op`, then `watermark`: its output's change lines, sorted.
    pub fn run_step(op: &mut dyn Operator, (batch, watermark): &Step) -> Vec<String> {
        let mut out = Vec::new();
        op.process(0, batch.clone(), &mut out).unwrap();
        op.on_watermark(*watermark, &mut out).unwrap();
        let mut lines = crate::stream::message::change_lines(&out);
        lines.sort();
        lines
    }

    /// An operator snapshotted whole after the first of `steps` and incrementally after
    /// each later one, then restored from those snapshots after step `k` (for every k),
    /// must run the remaining steps as one that never stopped, and hold as much state
    /// by `size` (compared right after the restore); some snapshot of changes must be
    /// smaller than a whole one would have been then. `corrections`: whether the steps
    /// make the operator correct rows it emitted (late rows within a lateness).
    pub fn restores_from_incremental_snapshots<O: Operator, S: PartialEq + std::fmt::Debug>(
        fresh: impl Fn() -> O,
        steps: &[Step],
        corrections: bool,
        size: impl Fn(&O) -> S,
    ) {
        let rows = |b: &[RecordBatch]| b.iter().map(RecordBatch::num_rows).sum::<usize>();
        let mut straight = fresh();
        let expected: Vec<Vec<String>> = steps.iter().map(|s| run_step(&mut straight, s)).collect();
        let corrected = expected.concat().iter().any(|l| l.starts_with("+U"));
        assert_eq!(corrected, corrections, "{expected:?}");
        let mut smaller = false;
        for k in 1..steps.len() {
            let mut before = fresh();
            let mut layers = Vec::new();
            for (i, step) in steps[..k].iter().enumerate() {
                assert_eq!(run_step(&mut before, step), expected[i]);
                layers.push(snapshot_of(&mut before, i == 0));
            }
            // Whole, state beyond memory included.
            smaller |=
                rows(layers.last().expect("a layer")) < rows(&snapshot_of(&mut before, true));
            let mut after = fresh();
            for layer in layers {
                after.restore(layer).unwrap();
            }
            after.restored().unwrap();
            assert_eq!(size(&after), size(&before), "restored after step {k}");
            for (i, step) in steps.iter().enumerate().skip(k) {
                assert_eq!(
                    run_step(&mut after, step),
                    expected[i],
                    "restored after step {k}, step {i}"
                );
            }
        }
        assert!(
            smaller,
            "no snapshot of changes was smaller than a whole one"
        );
    }
}
