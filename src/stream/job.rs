//! A running continuous query: one tokio task per chain subtask, connected by bounded
//! channels, with the metrics SHOW JOBS reports and the barriers FLUSH waits for.

use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use datafusion::arrow::record_batch::RecordBatch;
use datafusion::common::{DataFusionError, Result};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use weir_catalog::Catalog;

use super::checkpoint::beyond_memory::{self, StoringSnapshot};
use super::checkpoint::chunks::{holds_large_batches, restore_parts};
use super::checkpoint::coordinator::{
    Ack, CheckpointHistory, Committer, Coordinator, Durable, ViewLog,
};
use super::checkpoint::snapshot_cost::SnapshotCost;
use super::checkpoint::store::Checkpoints;
use super::checkpoint::{Precommit, Restored, SourcePosition, StatePart, TaskSnapshot};
use super::exchange::{AlignedEpochs, Event, Inlet, Outlet, Partitioner, Tagged, CHANNEL_CAPACITY};
use super::graph::{Exchange, NodeKind, SinkKind, SourceKind, StreamGraph};
use super::message::{
    wall_clock_ms, ChangeBatch, Epoch, Message, Millis, END_OF_TIME, NO_WATERMARK,
};
use super::operator::{Operator, StateReader};
use super::sink::Sink;
use super::source::{LaneOf, Read, Reader, SourceRows};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JobState {
    Running,
    Finished,
    /// The SQLSTATE and message of the error that stopped it.
    Failed(&'static str, String),
    Stopped,
}

impl std::fmt::Display for JobState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            JobState::Running => write!(f, "RUNNING"),
            JobState::Finished => write!(f, "FINISHED"),
            JobState::Failed(_, e) => write!(f, "FAILED: {e}"),
            JobState::Stopped => write!(f, "STOPPED"),
        }
    }
}

/// Per-subtask figures, summed for SHOW JOBS.
#[derive(Debug, Default)]
pub struct TaskFigures {
    pub late_rows: AtomicU64,
    pub state_bytes: AtomicUsize,
}

#[derive(Debug)]
pub struct JobMetrics {
    pub rows_in: AtomicU64,
    pub rows_out: AtomicU64,
    /// Malformed source records skipped (sources told to ignore parse errors).
    pub bad_records_skipped: AtomicU64,
    /// The sink's watermark.
    pub watermark: AtomicI64,
    /// Milliseconds from a row's time to its arrival at the sink, when the sink table
    /// names its time column (`'latency.column'`).
    pub latency: Mutex<hdrhistogram::Histogram<u64>>,
    tasks: Mutex<Vec<Arc<TaskFigures>>>,
}

impl JobMetrics {
    fn new() -> Self {
        Self {
            rows_in: AtomicU64::new(0),
            rows_out: AtomicU64::new(0),
            bad_records_skipped: AtomicU64::new(0),
            watermark: AtomicI64::new(NO_WATERMARK),
            latency: Mutex::new(super::latency::histogram()),
            tasks: Mutex::new(Vec::new()),
        }
    }

    /// Forgets the figures of tasks that were replaced (the job restarted).
    fn reset_tasks(&self) {
        self.tasks.lock().unwrap_or_else(|p| p.into_inner()).clear();
    }

    fn task(&self) -> Arc<TaskFigures> {
        let figures = Arc::new(TaskFigures::default());
        self.tasks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(figures.clone());
        figures
    }

    pub fn late_rows(&self) -> u64 {
        let tasks = self.tasks.lock().unwrap_or_else(|p| p.into_inner());
        tasks
            .iter()
            .map(|t| t.late_rows.load(Ordering::Relaxed))
            .sum()
    }

    pub fn state_bytes(&self) -> usize {
        let tasks = self.tasks.lock().unwrap_or_else(|p| p.into_inner());
        tasks
            .iter()
            .map(|t| t.state_bytes.load(Ordering::Relaxed))
            .sum()
    }
}

/// How a job checkpoints.
#[derive(Default)]
pub struct JobOptions {
    /// Where its checkpoints go (views and INSERT jobs); queries have none.
    pub durable: Option<Durable>,
    pub history: Arc<CheckpointHistory>,
    /// The checkpoint it resumes from.
    pub restore: Option<Restored>,
    /// Epochs that align even under unaligned checkpoints (shared by the server's jobs).
    pub aligned_epochs: Arc<AlignedEpochs>,
}

pub struct RunningJob {
    pub id: String,
    pub metrics: Arc<JobMetrics>,
    state: Arc<Mutex<JobState>>,
    barrier_requests: Arc<Mutex<Vec<mpsc::UnboundedSender<Epoch>>>>,
    committed: watch::Receiver<Epoch>,
    done: watch::Receiver<bool>,
    /// Asks the supervisor to stop the tasks (and wait for them).
    stop: watch::Sender<bool>,
    /// Tears everything down at once when the job is dropped without being stopped.
    abort: Mutex<Option<tokio::task::AbortHandle>>,
    /// It reads materialized views, so what it sees at a barrier depends on what other
    /// jobs published before it.
    pub reads_views: bool,
    /// A durable job's graph shape and each node's parallelism (its checkpoints'), which a
    /// rescale must keep and changes.
    pub fingerprint: String,
    pub parallelism: Vec<usize>,
}

/// What a task runs after its input: operators, then an outlet or a sink.
struct Chain {
    operators: Vec<Box<dyn Operator>>,
    figures: Arc<TaskFigures>,
    /// Per operator: what its snapshots have cost since its last whole one.
    snapshots: Vec<SnapshotCost>,
    /// When the state size was last measured for `SHOW JOBS`.
    reported: Option<Instant>,
    /// Restored from the snapshot of a task that had ended: its operators emitted all
    /// they would then (a global aggregate its row for no input) and their state was
    /// left out, so watermarks, barriers and the end do not ask them again (Flink's
    /// operators finished on restore).
    finished: bool,
}

/// How stale `SHOW JOBS`' state size may be between barriers: measuring it walks some
/// operators' whole state, too costly after every batch.
const REPORT_EVERY: Duration = Duration::from_millis(250);

impl Chain {
    /// Runs `batch` through operators `from..`, returning what comes out of the last one.
    fn push(&mut self, from: usize, input: usize, batch: ChangeBatch) -> Result<Vec<ChangeBatch>> {
        super::failpoint::hit(super::failpoint::at::OPERATOR);
        let mut current = vec![(input, batch)];
        for op in &mut self.operators[from..] {
            let mut next = Vec::new();
            for (input, batch) in current {
                op.process(input, batch, &mut next)?;
            }
            current = next.into_iter().map(|b| (0, b)).collect();
        }
        Ok(current.into_iter().map(|(_, b)| b).collect())
    }

    fn watermark(&mut self, watermark: Millis) -> Result<Vec<ChangeBatch>> {
        let mut out = Vec::new();
        if self.finished {
            return Ok(out);
        }
        for i in 0..self.operators.len() {
            let mut emitted = Vec::new();
            self.operators[i].on_watermark(watermark, &mut emitted)?;
            for batch in emitted {
                out.extend(self.push(i + 1, 0, batch)?);
            }
        }
        Ok(out)
    }

    /// Lets every operator emit what it held for the barrier, in chain order.
    fn barrier(&mut self) -> Result<Vec<ChangeBatch>> {
        let mut out = Vec::new();
        if self.finished {
            return Ok(out);
        }
        for i in 0..self.operators.len() {
            let mut emitted = Vec::new();
            self.operators[i].on_barrier(&mut emitted)?;
            for batch in emitted {
                out.extend(self.push(i + 1, 0, batch)?);
            }
        }
        Ok(out)
    }

    fn end(&mut self) -> Result<Vec<ChangeBatch>> {
        let mut out = Vec::new();
        if self.finished {
            return Ok(out);
        }
        for i in 0..self.operators.len() {
            let mut emitted = Vec::new();
            self.operators[i].on_end(&mut emitted)?;
            for batch in emitted {
                out.extend(self.push(i + 1, 0, batch)?);
            }
        }
        Ok(out)
    }

    /// Every operator's state in memory, in chain order, whether each is only what
    /// changed since its previous snapshot, and the readers of what operators keep beyond
    /// memory, as of now (with their positions in the chain). An operator that can tell
    /// its changes gives them until a restore would read more than about twice its state
    /// ([`SnapshotCost`]), then a whole one again.
    #[allow(clippy::type_complexity)]
    fn snapshot(&mut self) -> Result<(Vec<Vec<StatePart>>, Vec<bool>, Vec<(usize, StateReader)>)> {
        self.snapshots
            .resize(self.operators.len(), SnapshotCost::default());
        let mut states = Vec::with_capacity(self.operators.len());
        let mut changes = Vec::with_capacity(self.operators.len());
        let mut readers = Vec::new();
        for (k, (op, cost)) in self
            .operators
            .iter_mut()
            .zip(&mut self.snapshots)
            .enumerate()
        {
            let state_size = op.state_size();
            let due = cost.whole_due(state_size);
            let (batches, whole) = match if due { None } else { op.snapshot_changes()? } {
                Some(batches) => (batches, false),
                None => (op.snapshot()?, true),
            };
            let parts: Vec<StatePart> = batches.into_iter().map(StatePart::Batch).collect();
            readers.extend(op.snapshot_beyond_memory(whole)?.map(|r| (k, r)));
            let bytes = parts.iter().map(StatePart::bytes).sum();
            cost.record(whole, bytes, state_size);
            states.push(parts);
            changes.push(!whole);
        }
        Ok((states, changes, readers))
    }

    /// The rows its operators dropped as late since the previous barrier.
    fn take_late_rows(&mut self) -> Vec<RecordBatch> {
        self.operators
            .iter_mut()
            .flat_map(|op| op.take_late_rows())
            .collect()
    }

    /// The snapshot before this one was stored: what its operators' parts beyond memory
    /// took (by position) counts in their snapshots' cost.
    fn stored(&mut self, written: Vec<(usize, usize)>) {
        for (k, bytes) in written {
            self.snapshots[k].add_stored(bytes);
        }
    }

    /// Publishes the figures of `SHOW JOBS`; between barriers at most every
    /// [`REPORT_EVERY`] unless `now`.
    fn report(&mut self, now: bool) {
        let at = Instant::now();
        if !now
            && self
                .reported
                .is_some_and(|r| at.duration_since(r) < REPORT_EVERY)
        {
            return;
        }
        self.reported = Some(at);
        let late = self.operators.iter().map(|o| o.late_rows_dropped()).sum();
        let state = self.operators.iter().map(|o| o.state_size()).sum();
        self.figures.late_rows.store(late, Ordering::Relaxed);
        self.figures.state_bytes.store(state, Ordering::Relaxed);
    }
}

enum Output {
    /// To the tasks of each node reading the chain's last node (several when the
    /// planner shares it).
    Outlets(Vec<Outlet>),
    Sink(Sink),
}

/// A task's snapshot, the readers of what its operators keep beyond memory, and when it
/// was taken.
type Taken = (TaskSnapshot, Vec<(usize, StateReader)>, Instant);

struct TaskEnd {
    metrics: Arc<JobMetrics>,
    acks: mpsc::UnboundedSender<Ack>,
    task: usize,
    /// Operators snapshot at barriers only when the job keeps checkpoints.
    durable: bool,
    /// Where the job's checkpoints are, for state its operators keep beyond memory.
    chunks: Option<Checkpoints>,
}

impl TaskEnd {
    /// What the task holds now, and the readers of what its operators keep beyond
    /// memory; operators snapshot only when the job keeps checkpoints.
    /// `last`: the task ended, and this snapshot stands for every later epoch. An ended
    /// task's operators have emitted all they will and take no more input, so their
    /// state is left out (as Flink's finished operators): a restored ended task ends
    /// again at once with nothing to emit, whatever state it had.
    fn snapshot(
        &self,
        chain: &mut Chain,
        last: bool,
        inputs: Vec<Millis>,
        source: Option<SourcePosition>,
        sink: Option<Precommit>,
    ) -> Result<Taken> {
        let taken = Instant::now();
        let (operators, changes, readers) = if self.durable && !last {
            chain.snapshot()?
        } else {
            (vec![], vec![], vec![])
        };
        let snapshot = TaskSnapshot {
            operators,
            changes,
            in_flight: vec![],
            inputs,
            source,
            sink,
            late: chain.take_late_rows(),
        };
        Ok((snapshot, readers, taken))
    }

    /// Acknowledges barrier `epoch` with `snapshot`: at once when its operators keep
    /// nothing beyond memory (`readers`) and it holds no big batches, else from the
    /// thread that stores those, once stored (or reporting why it could not be).
    fn acknowledge(
        &self,
        epoch: Epoch,
        (snapshot, readers, taken): Taken,
        alignment: Duration,
    ) -> Option<StoringSnapshot> {
        let task = self.task;
        let large = self.chunks.is_some() && holds_large_batches(&snapshot);
        if readers.is_empty() && !large {
            self.ack(Ack::Barrier {
                epoch,
                task,
                snapshot,
                alignment,
                taken,
            });
            return None;
        }
        let (acks, durable) = (self.acks.clone(), self.durable);
        Some(beyond_memory::store(
            readers,
            self.chunks.clone(),
            epoch,
            task,
            snapshot,
            move |stored| {
                let ack = match stored {
                    Ok(snapshot) => Ack::Barrier {
                        epoch,
                        task,
                        snapshot,
                        alignment,
                        taken,
                    },
                    Err(e) => Ack::Failed {
                        epoch,
                        task,
                        cause: e.to_string(),
                    },
                };
                send_ack(&acks, durable, ack);
            },
        ))
    }

    fn ack(&self, ack: Ack) {
        send_ack(&self.acks, self.durable, ack);
    }
}

fn send_ack(acks: &mpsc::UnboundedSender<Ack>, durable: bool, ack: Ack) {
    if matches!(ack, Ack::Barrier { .. }) && durable {
        super::failpoint::hit(super::failpoint::at::BEFORE_ACK);
    }
    // The coordinator is gone only when the job is being torn down.
    let _ = acks.send(ack);
}

/// Waits for the task's previous snapshot to be stored, if it still is being.
async fn stored(storing: &mut Option<StoringSnapshot>, chain: &mut Chain) -> Result<()> {
    if let Some(storing) = storing.take() {
        chain.stored(storing.finished().await?);
    }
    Ok(())
}

impl Output {
    async fn rows(&mut self, batches: Vec<ChangeBatch>, end: &TaskEnd) -> Result<()> {
        for batch in batches {
            match self {
                Output::Outlets(outlets) => {
                    let (last, others) = outlets.split_last_mut().expect("a consumer");
                    for o in others {
                        o.send(batch.clone()).await?;
                    }
                    last.send(batch).await?
                }
                Output::Sink(sink) => {
                    end.metrics
                        .rows_out
                        .fetch_add(batch.num_rows() as u64, Ordering::Relaxed);
                    if let Some(column) = sink.latency_column() {
                        column.record(&batch, wall_clock_ms(), &end.metrics.latency)?;
                    }
                    sink.write(batch).await?
                }
            }
        }
        Ok(())
    }

    async fn watermark(&mut self, watermark: Millis, end: &TaskEnd) -> Result<()> {
        match self {
            Output::Outlets(_) => self.signal(Message::Watermark(watermark)).await,
            Output::Sink(_) => {
                end.metrics
                    .watermark
                    .fetch_max(watermark, Ordering::Relaxed);
                Ok(())
            }
        }
    }

    /// Forwards the barrier, or pre-commits what the sink took in this epoch.
    async fn barrier(&mut self, epoch: Epoch, watermark: Millis) -> Result<Option<Precommit>> {
        match self {
            Output::Outlets(_) => {
                self.signal(Message::Barrier(epoch)).await?;
                Ok(None)
            }
            Output::Sink(sink) => sink.precommit(watermark, false).await,
        }
    }

    async fn signal(&mut self, message: Message) -> Result<()> {
        match self {
            Output::Outlets(outlets) => {
                for o in outlets {
                    o.broadcast(message.clone()).await?;
                }
                Ok(())
            }
            Output::Sink(_) => Ok(()),
        }
    }

    async fn end(&mut self) -> Result<Option<Precommit>> {
        match self {
            Output::Outlets(_) => {
                self.signal(Message::End).await?;
                Ok(None)
            }
            Output::Sink(sink) => sink.precommit(END_OF_TIME, true).await,
        }
    }
}

/// How a sink's output becomes visible when an epoch commits.
pub fn committer(graph: &StreamGraph, catalog: &Arc<Catalog>, job: &str) -> Result<Committer> {
    if let Some(NodeKind::Sink(SinkKind::Connector(def))) = graph.nodes.last().map(|n| &n.kind) {
        if let Some(writer) = crate::connector::factory::open_epoch_writer(def, job)
            .map_err(|e| DataFusionError::External(Box::new(e)))?
        {
            return Ok(Committer::Epoch(writer));
        }
    }
    Ok(match graph.nodes.last().map(|n| &n.kind) {
        Some(NodeKind::Sink(SinkKind::View(state))) => Committer::View(state.clone()),
        Some(NodeKind::Sink(SinkKind::Log(def))) => Committer::Log {
            def: def.clone(),
            catalog: catalog.clone(),
        },
        Some(NodeKind::Sink(SinkKind::Connector(def))) if def.connector() == Some("filesystem") => {
            Committer::Files
        }
        _ => Committer::Direct,
    })
}

impl RunningJob {
    /// Starts every task of `graph`, without checkpoints.
    pub fn start(id: String, graph: StreamGraph, catalog: Arc<Catalog>) -> Result<Arc<Self>> {
        Self::start_with(id, graph, catalog, JobOptions::default())
    }

    /// Starts every task of `graph`, checkpointing and restoring as `options` say.
    pub fn start_with(
        id: String,
        graph: StreamGraph,
        catalog: Arc<Catalog>,
        options: JobOptions,
    ) -> Result<Arc<Self>> {
        let reads_views = graph.nodes.iter().any(|n| {
            matches!(&n.kind, NodeKind::Source(spec) if matches!(spec.kind, SourceKind::View { .. }))
        });
        let restored_epoch = options.restore.as_ref().map_or(0, |r| r.epoch);
        let view_log = options.restore.as_ref().map(|r| r.view_log);
        let (committed_tx, committed) = watch::channel(restored_epoch);
        let (fingerprint, parallelism) = options
            .durable
            .as_ref()
            .map(|d| (d.fingerprint.clone(), d.parallelism.clone()))
            .unwrap_or_default();
        let plan = Arc::new(Plan {
            id: id.clone(),
            graph,
            catalog,
            durable: options.durable,
            history: options.history,
            metrics: Arc::new(JobMetrics::new()),
            committed: Arc::new(committed_tx),
            published: Arc::new(AtomicU64::new(restored_epoch)),
            aligned_epochs: options.aligned_epochs,
            view_log: Arc::new(Mutex::new(view_log.unwrap_or_default())),
        });
        let launched = launch(&plan, options.restore)?;
        let barrier_requests = Arc::new(Mutex::new(launched.barrier_requests.clone()));
        let (stop, stop_requested) = watch::channel(false);
        let state = Arc::new(Mutex::new(JobState::Running));
        let (done_tx, done) = watch::channel(false);
        let supervisor = tokio::spawn(supervise(
            plan.clone(),
            launched,
            state.clone(),
            barrier_requests.clone(),
            stop_requested,
            done_tx,
        ));
        Ok(Arc::new(Self {
            id,
            metrics: plan.metrics.clone(),
            state,
            barrier_requests,
            committed,
            done,
            stop,
            abort: Mutex::new(Some(supervisor.abort_handle())),
            reads_views,
            fingerprint,
            parallelism,
        }))
    }

    pub fn state(&self) -> JobState {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Injects a barrier for `epoch` at every source.
    pub fn request_barrier(&self, epoch: Epoch) {
        for request in self
            .barrier_requests
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
        {
            let _ = request.send(epoch);
        }
    }

    /// Waits until every sink committed `epoch` (see [`RunningJob::request_barrier`]), or
    /// the job ended.
    pub async fn committed(&self, epoch: Epoch) {
        let mut committed = self.committed.clone();
        let mut done = self.done.clone();
        loop {
            if *committed.borrow_and_update() >= epoch || *done.borrow_and_update() {
                return;
            }
            tokio::select! {
                r = committed.changed() => if r.is_err() { return },
                r = done.changed() => if r.is_err() { return },
            }
        }
    }

    /// Waits until every task has finished (bounded inputs) or the job failed.
    pub async fn finished(&self) -> JobState {
        let mut done = self.done.clone();
        while !*done.borrow_and_update() {
            if done.changed().await.is_err() {
                break;
            }
        }
        self.state()
    }

    /// Stops the tasks; [`RunningJob::finished`] returns once they and the checkpoint
    /// being written (if any) are gone.
    pub fn stop(&self) {
        {
            let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
            if *s == JobState::Running {
                *s = JobState::Stopped;
            }
        }
        let _ = self.stop.send(true);
    }
}

impl Drop for RunningJob {
    fn drop(&mut self) {
        if let Some(abort) = self.abort.lock().unwrap_or_else(|p| p.into_inner()).take() {
            abort.abort();
        }
    }
}

/// What a job is made of, kept so that it can be started again from its checkpoint.
struct Plan {
    id: String,
    graph: StreamGraph,
    catalog: Arc<Catalog>,
    durable: Option<Durable>,
    history: Arc<CheckpointHistory>,
    metrics: Arc<JobMetrics>,
    committed: Arc<watch::Sender<Epoch>>,
    /// The newest epoch whose output is visible.
    published: Arc<AtomicU64>,
    aligned_epochs: Arc<AlignedEpochs>,
    /// A view's changes stored since its base.
    view_log: Arc<Mutex<ViewLog>>,
}

struct Launched {
    tasks: JoinSet<Result<()>>,
    /// Runs until every task is gone; never aborted, so an epoch it is writing or
    /// committing is finished (and the store released) before the job counts as ended.
    coordinator: tokio::task::JoinHandle<Result<()>>,
    barrier_requests: Vec<mpsc::UnboundedSender<Epoch>>,
}

/// Starts the tasks of `plan` (and its checkpoint coordinator), restored from `restore`.
fn launch(plan: &Plan, restore: Option<Restored>) -> Result<Launched> {
    let graph = &plan.graph;
    let catalog = &plan.catalog;
    let id = &plan.id;
    let metrics = &plan.metrics;
    metrics.reset_tasks();
    let chains = graph.chains();
    let chain_of = |node: usize| {
        chains
            .iter()
            .position(|c| c.contains(&node))
            .expect("every node is in a chain")
    };
    // One receiver per subtask of every chain whose head reads channels.
    let mut senders: Vec<Vec<mpsc::Sender<Tagged>>> = Vec::new();
    let mut receivers: Vec<Vec<Option<mpsc::Receiver<Tagged>>>> = Vec::new();
    for chain in &chains {
        let head = &graph.nodes[chain[0]];
        let (mut tx, mut rx) = (Vec::new(), Vec::new());
        if !matches!(head.kind, NodeKind::Source(_)) {
            for _ in 0..head.parallelism {
                let (s, r) = mpsc::channel(CHANNEL_CAPACITY);
                tx.push(s);
                rx.push(Some(r));
            }
        }
        senders.push(tx);
        receivers.push(rx);
    }
    let restored_epoch = restore.as_ref().map_or(0, |r| r.epoch);
    let durable = plan.durable.is_some();
    let mut restored = restore.map(|r| r.tasks.into_iter());
    let (acks, ack_receiver) = mpsc::unbounded_channel();
    let mut operator_names = Vec::new();
    let mut tasks: JoinSet<Result<()>> = JoinSet::new();
    let mut barrier_requests = Vec::new();
    for (c, chain) in chains.iter().enumerate() {
        let head = &graph.nodes[chain[0]];
        let tail_id = *chain.last().unwrap();
        let tail = &graph.nodes[tail_id];
        // Channel layout at the head: one channel per (input edge, upstream subtask),
        // or one per input edge when it is a forward edge.
        let channel_inputs = graph.channel_inputs(chain[0], |n| graph.nodes[n].parallelism);
        for subtask in 0..head.parallelism {
            let task = operator_names.len();
            let figures = metrics.task();
            let mut operators = chain
                .iter()
                .filter_map(|&n| match &graph.nodes[n].kind {
                    NodeKind::Operator(factory) => Some(factory(subtask)),
                    _ => None,
                })
                .collect::<Result<Vec<_>>>()?;
            operator_names.push(
                chain
                    .iter()
                    .filter(|&&n| matches!(graph.nodes[n].kind, NodeKind::Operator(_)))
                    .map(|&n| graph.nodes[n].name.clone())
                    .collect::<Vec<_>>(),
            );
            let snapshot = match restored.as_mut() {
                Some(r) => Some(r.next().ok_or_else(|| {
                    DataFusionError::Internal("the checkpoint has fewer tasks than the job".into())
                })?),
                None => None,
            };
            for op in operators.iter_mut() {
                op.started_from(restored_epoch, subtask);
            }
            if let Some(snapshot) = &snapshot {
                for (op, parts) in operators.iter_mut().zip(&snapshot.operators) {
                    restore_parts(op.as_mut(), parts)?;
                }
            }
            // An ended task's snapshot holds no operator state ([`TaskEnd::snapshot`]).
            let finished = snapshot
                .as_ref()
                .is_some_and(|s| s.operators.is_empty() && !operators.is_empty());
            let chain_ops = Chain {
                operators,
                figures,
                snapshots: Vec::new(),
                reported: None,
                finished,
            };
            let output = match &tail.kind {
                NodeKind::Sink(kind) => Output::Sink(Sink::open(kind, subtask, id)?),
                _ => {
                    let consumers = graph.consumers_of(tail_id);
                    if consumers.is_empty() {
                        return Err(DataFusionError::Internal("node without consumer".into()));
                    }
                    let mut outlets = Vec::new();
                    for (consumer, input) in consumers {
                        let target = chain_of(consumer);
                        let consumer_node = &graph.nodes[consumer];
                        // The consumer's first channel for this input.
                        let base = graph
                            .channel_inputs(consumer, |n| graph.nodes[n].parallelism)
                            .iter()
                            .position(|&i| i == input)
                            .expect("every input has a channel");
                        let exchange = &consumer_node.inputs[input].exchange;
                        let all = senders[target].clone();
                        let (targets, tag, partitioner) = match exchange {
                            Exchange::Forward => {
                                (vec![all[subtask].clone()], base, Partitioner::Single)
                            }
                            Exchange::Gather => {
                                (vec![all[0].clone()], base + subtask, Partitioner::Single)
                            }
                            Exchange::Hash(keys) => {
                                (all, base + subtask, Partitioner::Hash(keys.clone()))
                            }
                        };
                        outlets.push(Outlet::new(targets, tag as u32, partitioner));
                    }
                    Output::Outlets(outlets)
                }
            };
            let end = TaskEnd {
                metrics: metrics.clone(),
                acks: acks.clone(),
                task,
                durable,
                chunks: plan.durable.as_ref().map(|d| d.checkpoints.clone()),
            };
            match &head.kind {
                NodeKind::Source(spec) => {
                    let mut reader = Reader::open(&spec.kind, catalog, subtask, head.parallelism)?;
                    let mut rows = SourceRows::new(spec, head.schema.clone());
                    if let Some(position) = snapshot.and_then(|s| s.source) {
                        reader.restore(&position.position)?;
                        rows.watermark = position.watermark;
                    }
                    let (tx, rx) = mpsc::unbounded_channel();
                    barrier_requests.push(tx);
                    tasks.spawn(run_source(reader, rows, rx, chain_ops, output, end));
                }
                _ => {
                    let receiver = receivers[c][subtask].take().expect("one task per receiver");
                    let unaligned = graph
                        .unaligned_checkpoints
                        .then(|| plan.aligned_epochs.clone());
                    let mut inlet = Inlet::new(receiver, channel_inputs.clone(), unaligned);
                    if let Some(snapshot) = snapshot {
                        inlet.restore_watermarks(&snapshot.inputs);
                        inlet.restore_in_flight(snapshot.in_flight);
                    }
                    tasks.spawn(run_task(inlet, chain_ops, output, end));
                }
            }
        }
    }
    drop(senders);
    drop(acks);
    let coordinator = Coordinator {
        job: id.clone(),
        tasks: operator_names.len(),
        committer: committer(graph, catalog, id)?,
        durable: plan.durable.clone(),
        operator_names,
        history: plan.history.clone(),
        committed: plan.committed.clone(),
        restored: restored_epoch,
        published: plan.published.clone(),
        bases: HashMap::new(),
        late_rows: graph.late_rows.clone(),
        view_log: plan.view_log.clone(),
        followed_views: super::checkpoint::view_feed::followed_views(graph),
    };
    let coordinator = tokio::spawn(coordinator.run(ack_receiver));
    Ok(Launched {
        tasks,
        coordinator,
        barrier_requests,
    })
}

/// Times a job whose task panicked, or whose checkpoint failed, is started again from
/// its last checkpoint before it is declared failed.
const MAX_RESTARTS: u32 = 3;

/// Waits for a job's tasks. A panic or a failed checkpoint in a job that checkpoints
/// restarts its tasks from the last committed epoch (other jobs and the server are not
/// touched); any other error, or too many restarts, fails the job.
async fn supervise(
    plan: Arc<Plan>,
    mut launched: Launched,
    state: Arc<Mutex<JobState>>,
    barrier_requests: Arc<Mutex<Vec<mpsc::UnboundedSender<Epoch>>>>,
    mut stop: watch::Receiver<bool>,
    done: watch::Sender<bool>,
) {
    let mut restarts = 0;
    loop {
        let failure = first_failure(&mut launched, &mut stop).await;
        let Some((code, message, restartable)) = failure else {
            break;
        };
        if restartable && plan.durable.is_some() && restarts < MAX_RESTARTS {
            restarts += 1;
            tracing::warn!(
                "job {} restarts from its last checkpoint ({restarts} of {MAX_RESTARTS}): {message}",
                plan.id
            );
            tokio::time::sleep(Duration::from_millis(100 * u64::from(restarts))).await;
            match relaunch(&plan).await {
                Ok(next) => {
                    *barrier_requests.lock().unwrap_or_else(|p| p.into_inner()) =
                        next.barrier_requests.clone();
                    launched = next;
                    continue;
                }
                Err(e) => {
                    let e = crate::sql::error::SqlError::from(e);
                    *state.lock().unwrap_or_else(|p| p.into_inner()) = JobState::Failed(
                        e.code,
                        format!(
                            "{message}; restarting from the last checkpoint failed: {}",
                            e.message
                        ),
                    );
                    break;
                }
            }
        }
        tracing::warn!("job {} failed: {message}", plan.id);
        *state.lock().unwrap_or_else(|p| p.into_inner()) = JobState::Failed(code, message);
        break;
    }
    let mut s = state.lock().unwrap_or_else(|p| p.into_inner());
    if *s == JobState::Running {
        *s = JobState::Finished;
    }
    drop(s);
    let _ = done.send(true);
}

/// Joins every task and then the coordinator; at the first failure, or when the job is
/// stopped, the tasks are aborted (and joined). Returns the failure's SQLSTATE, message
/// and whether a restart may cure it (a panic, a failed checkpoint).
async fn first_failure(
    launched: &mut Launched,
    stop: &mut watch::Receiver<bool>,
) -> Option<(&'static str, String, bool)> {
    let mut failure = None;
    let mut stopping = false;
    let mut coordinator_done = false;
    loop {
        let result = tokio::select! {
            joined = launched.tasks.join_next() => match joined {
                Some(result) => result,
                None => break,
            },
            ended = &mut launched.coordinator, if !coordinator_done => {
                coordinator_done = true;
                ended
            }
            _ = stop.changed(), if !stopping => {
                stopping = true;
                launched.tasks.abort_all();
                continue;
            }
        };
        let failed = failure_of(result);
        if failure.is_none() && failed.is_some() && !stopping {
            failure = failed;
            launched.tasks.abort_all();
        }
    }
    // Every task is gone, so its acknowledgement channel is closed: the coordinator ends
    // once the epoch it may be writing is written.
    if !coordinator_done {
        let ended = failure_of((&mut launched.coordinator).await);
        if failure.is_none() && !stopping {
            failure = ended;
        }
    }
    failure
}

/// A task's or the coordinator's failure, and whether a restart may cure it.
fn failure_of(
    result: std::result::Result<Result<()>, tokio::task::JoinError>,
) -> Option<(&'static str, String, bool)> {
    match result {
        Ok(Ok(())) => None,
        Ok(Err(e)) => {
            let restartable = matches!(&e, DataFusionError::External(inner)
                if inner.is::<super::checkpoint::coordinator::CheckpointFailed>());
            let e = crate::sql::error::SqlError::from(e);
            Some((e.code, e.message, restartable))
        }
        Err(e) if e.is_cancelled() => None,
        Err(e) => Some(("XX000", format!("a task panicked: {e}"), true)),
    }
}

/// Starts a job's tasks again from its newest checkpoint, after its commit is redone. A
/// view keeps its rows in memory; it only gets the epochs it had not published yet.
async fn relaunch(plan: &Plan) -> Result<Launched> {
    let durable = plan.durable.as_ref().expect("only durable jobs restart");
    let (committer, view) = match committer(&plan.graph, &plan.catalog, &plan.id)? {
        Committer::View(state) => (Committer::Direct, Some(state)),
        other => (other, None),
    };
    let restore =
        super::checkpoint::coordinator::recover(&durable.checkpoints, &plan.graph, &committer)
            .await?;
    let published = plan.published.load(Ordering::SeqCst);
    if let (Some(state), Some(restored)) = (view, &restore) {
        if restored.epoch > published {
            let checkpoints = durable.checkpoints.clone();
            let upto = restored.epoch;
            let (changes, _) =
                tokio::task::spawn_blocking(move || checkpoints.view_changes(published, upto))
                    .await
                    .map_err(|e| DataFusionError::External(Box::new(e)))??;
            let sinks: Vec<Precommit> = restored
                .tasks
                .iter()
                .filter_map(|t| t.sink.clone())
                .collect();
            let (_, watermark, ended) = super::checkpoint::coordinator::merged_changes(&sinks);
            state.publish(changes, watermark, ended, upto)?;
            plan.published.fetch_max(upto, Ordering::SeqCst);
        }
    }
    launch(plan, restore)
}

async fn run_task(
    mut inlet: Inlet,
    mut chain: Chain,
    mut output: Output,
    end: TaskEnd,
) -> Result<()> {
    // An unaligned checkpoint's snapshot, until its in-flight messages are known.
    let mut unacknowledged: Option<(Epoch, Taken)> = None;
    let mut storing: Option<StoringSnapshot> = None;
    while let Some(event) = inlet.next().await {
        match event {
            Event::Data(input, batch) => {
                let out = chain.push(0, input, batch)?;
                output.rows(out, &end).await?;
            }
            Event::Watermark(w) => {
                let out = chain.watermark(w)?;
                output.rows(out, &end).await?;
                output.watermark(w, &end).await?;
            }
            Event::Barrier(epoch) => {
                let out = chain.barrier()?;
                output.rows(out, &end).await?;
                chain.report(true);
                let sink = output.barrier(epoch, inlet.watermark()).await?;
                stored(&mut storing, &mut chain).await?;
                let taken =
                    end.snapshot(&mut chain, false, inlet.channel_watermarks(), None, sink)?;
                if inlet.recording() {
                    // Unaligned: acknowledged once the in-flight messages are known.
                    unacknowledged = Some((epoch, taken));
                } else {
                    storing = end.acknowledge(epoch, taken, inlet.last_alignment());
                }
            }
            Event::InFlight(epoch, messages) => {
                if let Some((at, mut taken)) = unacknowledged.take() {
                    debug_assert_eq!(at, epoch);
                    taken.0.in_flight = messages;
                    storing = end.acknowledge(epoch, taken, Duration::ZERO);
                }
            }
            Event::Idle => output.signal(Message::Idle).await?,
            Event::Active => output.signal(Message::Active).await?,
            Event::End => {
                let out = chain.end()?;
                output.rows(out, &end).await?;
                chain.report(true);
                let sink = output.end().await?;
                stored(&mut storing, &mut chain).await?;
                let (snapshot, _, _) =
                    end.snapshot(&mut chain, true, inlet.channel_watermarks(), None, sink)?;
                end.ack(Ack::Ended {
                    task: end.task,
                    snapshot,
                });
                // The job ends when its tasks do: freeing millions of keys' state (about
                // a second for Nexmark q18's) need not hold it up.
                tokio::task::spawn_blocking(move || drop(chain));
                return Ok(());
            }
        }
        chain.report(false);
    }
    Ok(())
}

/// How often a processing-time source advances its watermark without rows.
const PROCESSING_TICK: Duration = Duration::from_millis(100);

async fn run_source(
    mut reader: Reader,
    mut rows: SourceRows,
    mut barriers: mpsc::UnboundedReceiver<Epoch>,
    mut chain: Chain,
    mut output: Output,
    end: TaskEnd,
) -> Result<()> {
    let idle_timeout = rows.idle_timeout();
    let mut idle = false;
    let mut skipped = 0;
    let mut tick = tokio::time::interval(PROCESSING_TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut storing: Option<StoringSnapshot> = None;
    loop {
        let timeout = async {
            match idle_timeout {
                Some(t) if !idle => tokio::time::sleep(t).await,
                _ => std::future::pending().await,
            }
        };
        let read = tokio::select! {
            biased;
            Some(epoch) = barriers.recv() => {
                for read in reader.available_now()? {
                    if handle_read(read, None, &mut rows, &mut chain, &mut output, &end, &mut idle).await? {
                        stored(&mut storing, &mut chain).await?;
                        return source_ended(&mut reader, &rows, &mut chain, &mut output, &end).await;
                    }
                }
                let out = chain.barrier()?;
                output.rows(out, &end).await?;
                chain.report(true);
                let sink = output.barrier(epoch, rows.watermark).await?;
                let position = source_position(&reader, &rows)?;
                stored(&mut storing, &mut chain).await?;
                let taken = end.snapshot(&mut chain, false, vec![], Some(position), sink)?;
                storing = end.acknowledge(epoch, taken, Duration::ZERO);
                continue;
            }
            read = reader.next() => read?,
            _ = tick.tick(), if rows.ticks() => {
                if let Some(w) = rows.tick() {
                    let out = chain.watermark(w)?;
                    output.rows(out, &end).await?;
                    output.watermark(w, &end).await?;
                }
                continue;
            }
            _ = timeout => {
                idle = true;
                output.signal(Message::Idle).await?;
                continue;
            }
        };
        let lane = reader.lane();
        let now_skipped = reader.skipped_records();
        if now_skipped > skipped {
            end.metrics
                .bad_records_skipped
                .fetch_add(now_skipped - skipped, Ordering::Relaxed);
            skipped = now_skipped;
        }
        if handle_read(
            read,
            lane,
            &mut rows,
            &mut chain,
            &mut output,
            &end,
            &mut idle,
        )
        .await?
        {
            stored(&mut storing, &mut chain).await?;
            return source_ended(&mut reader, &rows, &mut chain, &mut output, &end).await;
        }
    }
}

/// Returns true at the end of the input.
async fn handle_read(
    read: Read,
    lane: LaneOf,
    rows: &mut SourceRows,
    chain: &mut Chain,
    output: &mut Output,
    end: &TaskEnd,
    idle: &mut bool,
) -> Result<bool> {
    match read {
        Read::Rows(physical) => {
            if *idle {
                *idle = false;
                output.signal(Message::Active).await?;
            }
            end.metrics
                .rows_in
                .fetch_add(physical.num_rows() as u64, Ordering::Relaxed);
            let before = rows.watermark;
            let batch = rows.prepare(physical, lane)?;
            let out = chain.push(0, 0, batch)?;
            output.rows(out, end).await?;
            if rows.watermark > before {
                let out = chain.watermark(rows.watermark)?;
                output.rows(out, end).await?;
                output.watermark(rows.watermark, end).await?;
            }
            chain.report(false);
            Ok(false)
        }
        Read::Watermark(w) => {
            if w > rows.watermark {
                rows.watermark = w;
                let out = chain.watermark(w)?;
                output.rows(out, end).await?;
                output.watermark(w, end).await?;
            }
            Ok(false)
        }
        Read::End => {
            let out = chain.watermark(END_OF_TIME)?;
            output.rows(out, end).await?;
            let out = chain.end()?;
            output.rows(out, end).await?;
            chain.report(true);
            Ok(true)
        }
    }
}

/// A source's input ended: the end goes downstream and its final state to the
/// coordinator.
async fn source_ended(
    reader: &mut Reader,
    rows: &SourceRows,
    chain: &mut Chain,
    output: &mut Output,
    end: &TaskEnd,
) -> Result<()> {
    let sink = output.end().await?;
    let position = source_position(reader, rows)?;
    let (snapshot, _, _) = end.snapshot(chain, true, vec![], Some(position), sink)?;
    end.ack(Ack::Ended {
        task: end.task,
        snapshot,
    });
    Ok(())
}

fn source_position(reader: &Reader, rows: &SourceRows) -> Result<SourcePosition> {
    Ok(SourcePosition {
        position: reader.position()?,
        watermark: rows.watermark,
    })
}
