//! A job's checkpoint coordinator: collects every task's snapshot for an epoch, writes
//! them to the store in one atomic batch (off the tasks' path: they go on processing),
//! then commits the sinks' pre-committed output and tells FLUSH the epoch is committed.
//!
//! A task that ended keeps counting for later epochs with its final snapshot, so a job
//! whose bounded sources finished early still checkpoints; when every task ended, the
//! coordinator commits one last epoch with everything's final output.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use datafusion::arrow::record_batch::RecordBatch;
use datafusion::common::{DataFusionError, Result};
use tokio::sync::{mpsc, watch};
use weir_catalog::{Catalog, TableDef};

use super::store::{CheckpointMeta, Checkpoints, ViewContents};
use super::{Precommit, Restored, SourcePosition, StatePart, TaskSnapshot};
use crate::connector::log_table::append_once;
use crate::stream::graph::StreamGraph;
use crate::stream::late::LateRows;
use crate::stream::message::{ChangeBatch, Epoch, Millis, END_OF_TIME};
use crate::stream::mv::MvState;

/// Epochs kept besides savepoints: the newest is restored, older ones are a margin.
pub const RETAINED_EPOCHS: usize = 3;
/// A view's per-epoch changes are folded into its stored base after this many.
const VIEW_ENTRIES_BEFORE_COMPACTION: usize = 64;
/// Changed rows a view's stored changes may hold beyond its rows before they are folded
/// into its base.
const VIEW_CHANGED_ROWS_SLACK: usize = 1 << 16;

/// What a view's stored per-epoch changes since its base hold. A restart reads the base
/// and replays them, so they are folded into a new base after
/// [`VIEW_ENTRIES_BEFORE_COMPACTION`] epochs, or once they hold more rows than the view
/// (an updating view's -U/+U pairs for the same keys epoch after epoch): a restart then
/// replays at most about twice the view, and each fold writes the view once for at
/// least as many changed rows. A view that only grows never outgrows itself. The count
/// goes on across restarts: a restored view starts from what its store holds.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ViewLog {
    entries: usize,
    rows: usize,
}

/// Locks `m`; a panic while it was held left a count, still usable.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl ViewLog {
    /// What a view's store holds since its base.
    pub fn stored(contents: &ViewContents) -> Self {
        Self {
            entries: contents.entries,
            rows: contents.changed_rows,
        }
    }

    /// Counts an epoch's changes in; whether it is time to fold them into the base, for
    /// a view of `view_rows` rows.
    fn add(&mut self, changed_rows: usize, view_rows: usize) -> bool {
        self.entries += 1;
        self.rows += changed_rows;
        let due = self.entries >= VIEW_ENTRIES_BEFORE_COMPACTION
            || self.rows > view_rows + VIEW_CHANGED_ROWS_SLACK;
        if due {
            *self = Self::default();
        }
        due
    }
}

/// What a task tells the coordinator.
pub enum Ack {
    /// It snapshotted for `epoch` and forwarded the barrier.
    Barrier {
        epoch: Epoch,
        task: usize,
        snapshot: TaskSnapshot,
        /// How long its input waited for barrier alignment.
        alignment: Duration,
        /// When it took the snapshot: the checkpoint's duration counts from the first.
        taken: Instant,
    },
    /// Its input ended; this is its final state and output.
    Ended { task: usize, snapshot: TaskSnapshot },
    /// Its snapshot for `epoch` could not be stored: the checkpoint fails, and the job
    /// restarts from its last committed one.
    Failed {
        epoch: Epoch,
        task: usize,
        cause: String,
    },
}

/// Makes a sink's pre-committed output visible when its epoch commits.
#[derive(Clone)]
pub enum Committer {
    /// The sink writes directly (at-least-once connectors, query results).
    Direct,
    View(Arc<MvState>),
    Log {
        def: Arc<TableDef>,
        catalog: Arc<Catalog>,
    },
    Files,
    /// Sink subtasks keep their epoch's rows; this writes them when it commits.
    Epoch(Arc<dyn crate::connector::io::EpochWriter>),
}

/// One checkpoint as SHOW CHECKPOINTS lists it.
#[derive(Debug, Clone)]
pub struct CheckpointRecord {
    pub job: String,
    pub epoch: Epoch,
    pub started_ms: i64,
    pub duration: Duration,
    pub alignment: Duration,
    pub bytes: u64,
    /// "operator=bytes" per operator with state.
    pub state: String,
    /// COMPLETED, or FAILED with the cause.
    pub status: String,
}

/// The latest checkpoints of every job, newest last.
#[derive(Debug, Default)]
pub struct CheckpointHistory {
    records: Mutex<VecDeque<CheckpointRecord>>,
}

const HISTORY: usize = 200;

impl CheckpointHistory {
    pub fn push(&self, record: CheckpointRecord) {
        let mut records = lock(&self.records);
        if records.len() == HISTORY {
            records.pop_front();
        }
        records.push_back(record);
    }

    pub fn list(&self) -> Vec<CheckpointRecord> {
        lock(&self.records).iter().cloned().collect()
    }
}

/// A checkpoint could not be written: the job restarts from its last committed one.
#[derive(Debug)]
pub struct CheckpointFailed(pub String);

impl std::fmt::Display for CheckpointFailed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for CheckpointFailed {}

/// Where a durable job's checkpoints go.
#[derive(Clone)]
pub struct Durable {
    pub checkpoints: Checkpoints,
    pub fingerprint: String,
    /// Each node's parallelism, recorded with every checkpoint.
    pub parallelism: Vec<usize>,
}

pub struct Coordinator {
    pub job: String,
    pub tasks: usize,
    pub committer: Committer,
    pub durable: Option<Durable>,
    /// Per task, the names of its chain's operators (for per-operator state sizes).
    pub operator_names: Vec<Vec<String>>,
    pub history: Arc<CheckpointHistory>,
    pub committed: Arc<watch::Sender<Epoch>>,
    /// The epoch the job was restored from (0: none).
    pub restored: Epoch,
    /// The newest epoch whose output was made visible (shared across restarts of the job).
    pub published: Arc<std::sync::atomic::AtomicU64>,
    /// Per (task, operator): the epoch of the whole snapshot its latest entry builds on.
    pub bases: HashMap<(usize, usize), Epoch>,
    /// The late-data table the job's window operators keep dropped rows in.
    pub late_rows: Option<Arc<LateRows>>,
    /// A view's changes stored since its base (shared across restarts of the job).
    pub view_log: Arc<Mutex<ViewLog>>,
    /// The updating views the job follows: each committed checkpoint registers where it
    /// resumes in them.
    pub followed_views: Vec<super::view_feed::FollowedView>,
}

struct Pending {
    tasks: HashMap<usize, TaskSnapshot>,
    started_ms: i64,
    started: Instant,
    alignment: Duration,
}

impl Pending {
    /// An epoch whose first acknowledgement arrives now.
    fn new() -> Self {
        Self {
            tasks: HashMap::new(),
            started_ms: chrono::Utc::now().timestamp_millis(),
            started: Instant::now(),
            alignment: Duration::ZERO,
        }
    }

    /// A task took its snapshot at `taken`: the epoch started then if not earlier.
    fn started_at(&mut self, taken: Instant) {
        if taken < self.started {
            let earlier = self.started.duration_since(taken);
            self.started = taken;
            self.started_ms -= earlier.as_millis() as i64;
        }
    }
}

impl Coordinator {
    /// Runs until every task has dropped its sender. An error (the store refused a
    /// checkpoint, a sink could not commit) fails the job.
    pub async fn run(mut self, mut acks: mpsc::UnboundedReceiver<Ack>) -> Result<()> {
        let mut pending: BTreeMap<Epoch, Pending> = BTreeMap::new();
        let mut ended: HashMap<usize, TaskSnapshot> = HashMap::new();
        let mut last = self.restored;
        let mut finished = false;
        while let Some(ack) = acks.recv().await {
            match ack {
                Ack::Barrier {
                    epoch,
                    task,
                    snapshot,
                    alignment,
                    taken,
                } => {
                    let p = pending.entry(epoch).or_insert_with(Pending::new);
                    p.started_at(taken);
                    p.tasks.insert(task, snapshot);
                    p.alignment = p.alignment.max(alignment);
                }
                Ack::Ended { task, snapshot } => {
                    ended.insert(task, snapshot);
                }
                Ack::Failed { epoch, task, cause } => {
                    let p = pending.remove(&epoch).unwrap_or_else(Pending::new);
                    let cause = format!("task {task} could not store its state: {cause}");
                    self.record(epoch, &p, 0, String::new(), format!("FAILED: {cause}"));
                    return Err(DataFusionError::External(Box::new(CheckpointFailed(
                        format!("checkpoint {epoch}: {cause}"),
                    ))));
                }
            }
            while let Some((&epoch, p)) = pending.first_key_value() {
                if !(0..self.tasks).all(|t| p.tasks.contains_key(&t) || ended.contains_key(&t)) {
                    break;
                }
                let p = pending.remove(&epoch).expect("present");
                self.complete(epoch, p, &mut ended).await?;
                last = last.max(epoch);
            }
            if !finished && ended.len() == self.tasks {
                finished = true;
                self.complete(last + 1, Pending::new(), &mut ended).await?;
            }
        }
        Ok(())
    }

    async fn complete(
        &mut self,
        epoch: Epoch,
        mut p: Pending,
        ended: &mut HashMap<usize, TaskSnapshot>,
    ) -> Result<()> {
        let mut snapshots = Vec::with_capacity(self.tasks);
        for t in 0..self.tasks {
            let snapshot = match p.tasks.remove(&t) {
                Some(s) => s,
                // An ended task's final output is committed once, at the first epoch
                // after it ended.
                None => {
                    let s = ended.get_mut(&t).expect("every task acked or ended");
                    let out = s.clone();
                    s.sink = s.sink.as_ref().map(Precommit::committed);
                    s.late.clear();
                    out
                }
            };
            snapshots.push(snapshot);
        }
        let builds_on = self.builds_on(epoch, &snapshots);
        let precommits: Vec<Precommit> = snapshots.iter().filter_map(|s| s.sink.clone()).collect();
        let late = late_rows_of(&snapshots);
        // A view's rows of all sink subtasks, merged once: stored and then published.
        let mut view = match &self.committer {
            Committer::View(_) => Some(merged_changes(&precommits)),
            _ => None,
        };
        let state = self.state_sizes(&snapshots);
        let written = match &self.durable {
            Some(durable) => {
                // The view's rows are stored once, in its per-epoch series.
                if view.is_some() {
                    for s in &mut snapshots {
                        s.sink = s.sink.as_ref().map(Precommit::committed);
                    }
                }
                let meta = CheckpointMeta {
                    epoch,
                    tasks: self.tasks,
                    fingerprint: durable.fingerprint.clone(),
                    parallelism: durable.parallelism.clone(),
                    builds_on: Some(builds_on),
                    started_ms: p.started_ms,
                    bytes: 0,
                    savepoint: None,
                };
                let checkpoints = durable.checkpoints.clone();
                let rows = view.take();
                let chunk_bytes = snapshots
                    .iter()
                    .flat_map(|s| s.operators.iter().flatten())
                    .map(|p| match p {
                        StatePart::Stored(c) => c.bytes,
                        StatePart::Batch(_) => 0,
                    })
                    .sum();
                let followed = self.followed_views.clone();
                // Only a job that follows updating views registers where it is in them.
                let sources: Vec<Option<SourcePosition>> = if followed.is_empty() {
                    Vec::new()
                } else {
                    snapshots.iter().map(|s| s.source.clone()).collect()
                };
                tokio::task::spawn_blocking(move || {
                    let tasks = snapshots
                        .into_iter()
                        .map(TaskSnapshot::into_bytes)
                        .collect::<Result<Vec<_>>>()?;
                    let changes = rows.as_ref().map(|(c, _, _)| c.as_slice());
                    let bytes = checkpoints.write(&meta, tasks, changes, chunk_bytes)?;
                    super::view_feed::register_at(&followed, &checkpoints, &sources)?;
                    checkpoints.prune(RETAINED_EPOCHS)?;
                    Ok::<_, DataFusionError>((bytes, rows))
                })
                .await
                .map_err(|e| DataFusionError::External(Box::new(e)))
                .and_then(|r| r)
                .map(|(bytes, rows)| {
                    view = rows;
                    bytes
                })
            }
            None => Ok(0),
        };
        let bytes = match written {
            Ok(b) => b,
            Err(e) => {
                self.record(epoch, &p, 0, state, format!("FAILED: {e}"));
                return Err(DataFusionError::External(Box::new(CheckpointFailed(
                    format!("checkpoint {epoch} could not be written: {e}"),
                ))));
            }
        };
        if self.durable.is_some() {
            crate::stream::failpoint::hit(crate::stream::failpoint::at::BEFORE_PUBLISH);
        }
        if let Err(e) = self.commit(epoch, precommits, view, late).await {
            self.record(epoch, &p, bytes, state, format!("FAILED: {e}"));
            return Err(e);
        }
        self.published
            .fetch_max(epoch, std::sync::atomic::Ordering::SeqCst);
        self.record(epoch, &p, bytes, state, "COMPLETED".into());
        self.committed.send_if_modified(|c| {
            let advanced = epoch > *c;
            *c = (*c).max(epoch);
            advanced
        });
        Ok(())
    }

    /// The oldest epoch `epoch`'s incremental entries need (back to each one's whole
    /// snapshot); pruning keeps it and those after.
    fn builds_on(&mut self, epoch: Epoch, snapshots: &[TaskSnapshot]) -> Epoch {
        let mut oldest = epoch;
        for (t, s) in snapshots.iter().enumerate() {
            for k in 0..s.operators.len() {
                let base = if s.is_changes(k) {
                    // Unknown: keep everything.
                    self.bases.get(&(t, k)).copied().unwrap_or(0)
                } else {
                    epoch
                };
                self.bases.insert((t, k), base);
                oldest = oldest.min(base);
            }
        }
        oldest
    }

    fn state_sizes(&self, snapshots: &[TaskSnapshot]) -> String {
        let mut sizes: BTreeMap<&str, usize> = BTreeMap::new();
        for (t, s) in snapshots.iter().enumerate() {
            for (i, parts) in s.operators.iter().enumerate() {
                let bytes: usize = parts.iter().map(StatePart::bytes).sum();
                if bytes > 0 {
                    let name = self.operator_names[t]
                        .get(i)
                        .map_or("operator", |n| n.as_str());
                    *sizes.entry(name).or_default() += bytes;
                }
            }
        }
        sizes
            .iter()
            .map(|(n, b)| format!("{n}={b}"))
            .collect::<Vec<_>>()
            .join(", ")
    }

    fn record(&self, epoch: Epoch, p: &Pending, bytes: u64, state: String, status: String) {
        if self.durable.is_none() {
            return;
        }
        self.history.push(CheckpointRecord {
            job: self.job.clone(),
            epoch,
            started_ms: p.started_ms,
            duration: p.started.elapsed(),
            alignment: p.alignment,
            bytes,
            state,
            status,
        });
    }

    /// Makes the epoch's pre-committed output visible (a view's is `view`, merged), then
    /// appends its `late` rows to the late-data table.
    async fn commit(
        &self,
        epoch: Epoch,
        precommits: Vec<Precommit>,
        view: Option<(Vec<ChangeBatch>, Millis, bool)>,
        late: Vec<RecordBatch>,
    ) -> Result<()> {
        self.commit_sink(epoch, precommits, view).await?;
        if let Some(table) = &self.late_rows {
            let marker = self.durable.as_ref().map(|d| d.checkpoints.late_marker());
            table.commit(late, marker, epoch).await?;
        }
        Ok(())
    }

    async fn commit_sink(
        &self,
        epoch: Epoch,
        precommits: Vec<Precommit>,
        view: Option<(Vec<ChangeBatch>, Millis, bool)>,
    ) -> Result<()> {
        match &self.committer {
            Committer::Direct => Ok(()),
            Committer::View(state) => {
                let (changes, watermark, ended) =
                    view.unwrap_or_else(|| merged_changes(&precommits));
                let changed_rows: usize = changes.iter().map(ChangeBatch::num_rows).sum();
                state.publish(changes, watermark, ended, epoch)?;
                if let (Some(durable), true) = (&self.durable, changed_rows > 0) {
                    let fold = lock(&self.view_log).add(changed_rows, state.size().0);
                    if fold {
                        let checkpoints = durable.checkpoints.clone();
                        let contents = state.snapshot()?;
                        blocking(move || checkpoints.compact_view(epoch, &contents)).await?;
                    }
                }
                Ok(())
            }
            Committer::Log { def, catalog } => {
                let (changes, _, _) = merged_changes(&precommits);
                let marker = self.durable.as_ref().map(|d| d.checkpoints.sink_marker());
                append_once(catalog.table_log(), def, changes, marker, epoch).await
            }
            Committer::Files => {
                let files = files_of(precommits);
                blocking(move || publish_files(&files)).await
            }
            Committer::Epoch(writer) => {
                writer
                    .clone()
                    .commit(epoch, rows_of(precommits), false)
                    .await
            }
        }
    }
}

/// The rows every task's operators dropped as late in the epoch.
fn late_rows_of(snapshots: &[TaskSnapshot]) -> Vec<RecordBatch> {
    snapshots
        .iter()
        .flat_map(|s| s.late.iter().cloned())
        .collect()
}

/// What every sink subtask left to the epoch writer.
fn rows_of(precommits: Vec<Precommit>) -> Vec<crate::connector::io::SinkRows> {
    precommits
        .into_iter()
        .filter_map(|p| match p {
            Precommit::Rows(r) => Some(r),
            _ => None,
        })
        .collect()
}

/// The finished files of every sink subtask.
fn files_of(precommits: Vec<Precommit>) -> Vec<(std::path::PathBuf, std::path::PathBuf)> {
    precommits
        .into_iter()
        .flat_map(|p| match p {
            Precommit::Files(f) => f,
            _ => vec![],
        })
        .collect()
}

async fn blocking(f: impl FnOnce() -> Result<()> + Send + 'static) -> Result<()> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| DataFusionError::External(Box::new(e)))?
}

/// Every sink subtask's rows, the lowest watermark among them, and whether all ended.
pub fn merged_changes(precommits: &[Precommit]) -> (Vec<ChangeBatch>, Millis, bool) {
    let mut changes = Vec::new();
    let mut watermark = END_OF_TIME;
    let mut ended = true;
    for p in precommits {
        if let Precommit::Changes {
            changes: c,
            watermark: w,
            ended: e,
        } = p
        {
            changes.extend(c.iter().filter(|b| b.num_rows() > 0).cloned());
            watermark = watermark.min(*w);
            ended &= *e;
        }
    }
    (changes, watermark, ended)
}

/// Renames finished hidden files to their visible names; a file already renamed (the
/// commit is being redone after a crash) is left as it is.
pub fn publish_files(files: &[(std::path::PathBuf, std::path::PathBuf)]) -> Result<()> {
    for (from, to) in files {
        if from.exists() {
            std::fs::rename(from, to).map_err(|e| {
                DataFusionError::Execution(format!(
                    "could not publish {}: {e}",
                    to.to_string_lossy()
                ))
            })?;
        } else if !to.exists() {
            return Err(DataFusionError::Execution(format!(
                "the committed file {} is gone",
                from.to_string_lossy()
            )));
        }
    }
    Ok(())
}

/// Redoes the commit of the epoch a job is restored from (a crash may have come between
/// its checkpoint and its commit), and puts a view's contents back. Returns what the
/// view's store holds since its base.
async fn redo(
    committer: &Committer,
    late_rows: Option<&LateRows>,
    checkpoints: &Checkpoints,
    epoch: Epoch,
    snapshots: &[TaskSnapshot],
) -> Result<ViewLog> {
    let view_log = redo_sink(committer, checkpoints, epoch, snapshots).await?;
    if let Some(table) = late_rows {
        let late = late_rows_of(snapshots);
        table
            .commit(late, Some(checkpoints.late_marker()), epoch)
            .await?;
    }
    Ok(view_log)
}

async fn redo_sink(
    committer: &Committer,
    checkpoints: &Checkpoints,
    epoch: Epoch,
    snapshots: &[TaskSnapshot],
) -> Result<ViewLog> {
    let precommits: Vec<Precommit> = snapshots.iter().filter_map(|s| s.sink.clone()).collect();
    match committer {
        Committer::Direct => Ok(ViewLog::default()),
        Committer::View(state) => {
            let (_, watermark, ended) = merged_changes(&precommits);
            let checkpoints = checkpoints.clone();
            let contents = tokio::task::spawn_blocking(move || checkpoints.view_contents(epoch))
                .await
                .map_err(|e| DataFusionError::External(Box::new(e)))??;
            let view_log = ViewLog::stored(&contents);
            super::store::check_schema(&contents.rows, &state.schema())?;
            state.publish(contents.rows, watermark, ended, epoch)?;
            Ok(view_log)
        }
        Committer::Log { def, catalog } => {
            let (changes, _, _) = merged_changes(&precommits);
            let marker = Some(checkpoints.sink_marker());
            append_once(catalog.table_log(), def, changes, marker, epoch).await?;
            Ok(ViewLog::default())
        }
        Committer::Files => {
            let files = files_of(precommits);
            blocking(move || publish_files(&files)).await?;
            Ok(ViewLog::default())
        }
        Committer::Epoch(writer) => {
            let rows = rows_of(precommits);
            writer.clone().commit(epoch, rows, true).await?;
            Ok(ViewLog::default())
        }
    }
}

/// The newest committed checkpoint of a job, with its commit redone and its snapshots
/// arranged for `graph`'s tasks (redistributed when it was taken at another parallelism);
/// `None` when it has none. A checkpoint taken from another plan is refused.
pub async fn recover(
    checkpoints: &Checkpoints,
    graph: &StreamGraph,
    committer: &Committer,
) -> Result<Option<Restored>> {
    let stored = checkpoints.clone();
    let latest = tokio::task::spawn_blocking(move || {
        stored.discard_uncommitted()?;
        let Some(meta) = stored.latest()? else {
            return Ok(None);
        };
        let tasks = stored.load(&meta)?;
        Ok::<_, DataFusionError>(Some((meta, tasks)))
    })
    .await
    .map_err(|e| DataFusionError::External(Box::new(e)))??;
    let Some((meta, tasks)) = latest else {
        return Ok(None);
    };
    let fingerprint = super::fingerprint(graph);
    if meta.fingerprint != fingerprint {
        return Err(DataFusionError::Plan(format!(
            "checkpoint {} was taken from a different plan of this query (was:\n{}\nnow:\n{})",
            meta.epoch, meta.fingerprint, fingerprint
        )));
    }
    let late_rows = graph.late_rows.as_deref();
    let view_log = redo(committer, late_rows, checkpoints, meta.epoch, &tasks).await?;
    let now = super::rescale::parallelism(graph);
    let tasks = if meta.parallelism.is_empty() || meta.parallelism == now {
        tasks
    } else {
        super::rescale::redistribute(graph, &meta.parallelism, tasks)?
    };
    Ok(Some(Restored {
        epoch: meta.epoch,
        tasks,
        view_log,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_views_changes_fold_into_its_base_once_they_outgrow_it_or_pile_up() {
        // An updating view of 100 k rows whose keys all change every epoch (-U and +U):
        // its changes outgrow it in the first epoch past the slack.
        let mut log = ViewLog::default();
        let folds: Vec<usize> = (1..=10).filter(|_| log.add(200_000, 100_000)).collect();
        assert_eq!(folds, (1..=10).collect::<Vec<_>>());
        // A tenth of its keys an epoch: every few epochs.
        let mut log = ViewLog::default();
        let folds: Vec<usize> = (1..=20).filter(|_| log.add(20_000, 100_000)).collect();
        assert_eq!(folds, [9, 18]);
        // A view that only grows never outgrows itself: the count of epochs decides.
        let mut log = ViewLog::default();
        let mut rows = 0;
        let folds: Vec<usize> = (1..=130)
            .filter(|_| {
                rows += 1_000_000;
                log.add(1_000_000, rows)
            })
            .collect();
        assert_eq!(folds, [64, 128]);
    }
}
