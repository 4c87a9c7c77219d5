//! A running continuous query: one tokio task per chain subtask, connected by bounded
//! channels, with the metrics SHOW JOBS reports and the barriers FLUSH waits for.

use std::sync::atomic::{AtomicI64, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use datafusion::common::{DataFusionError, Result};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use weir_catalog::Catalog;

use super::exchange::{Event, Inlet, Outlet, Partitioner, Tagged, CHANNEL_CAPACITY};
use super::graph::{Exchange, NodeKind, SourceKind, StreamGraph};
use super::message::{ChangeBatch, Epoch, Message, Millis, END_OF_TIME, NO_WATERMARK};
use super::operator::Operator;
use super::sink::Sink;
use super::source::{Read, Reader, SourceRows};

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
    /// The sink's watermark.
    pub watermark: AtomicI64,
    tasks: Mutex<Vec<Arc<TaskFigures>>>,
}

impl JobMetrics {
    fn new() -> Self {
        Self {
            rows_in: AtomicU64::new(0),
            rows_out: AtomicU64::new(0),
            watermark: AtomicI64::new(NO_WATERMARK),
            tasks: Mutex::new(Vec::new()),
        }
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

/// Epochs every sink subtask has committed: the minimum is the job's committed epoch.
struct Commits {
    per_sink: Mutex<Vec<Epoch>>,
    committed: watch::Sender<Epoch>,
}

impl Commits {
    fn record(&self, sink: usize, epoch: Epoch) {
        let mut per_sink = self.per_sink.lock().unwrap_or_else(|p| p.into_inner());
        per_sink[sink] = per_sink[sink].max(epoch);
        let min = per_sink.iter().copied().min().unwrap_or(epoch);
        self.committed.send_if_modified(|c| {
            let advanced = min > *c;
            *c = (*c).max(min);
            advanced
        });
    }
}

pub struct RunningJob {
    pub id: String,
    pub metrics: Arc<JobMetrics>,
    state: Arc<Mutex<JobState>>,
    barrier_requests: Vec<mpsc::UnboundedSender<Epoch>>,
    committed: watch::Receiver<Epoch>,
    done: watch::Receiver<bool>,
    abort: Mutex<Option<tokio::task::AbortHandle>>,
    /// It reads materialized views, so what it sees at a barrier depends on what other
    /// jobs published before it.
    pub reads_views: bool,
}

/// Chains of nodes run in one task: a node joins its input's chain when the edge between
/// them is a forward edge.
fn chains(graph: &StreamGraph) -> Vec<Vec<usize>> {
    let mut chain_of = vec![usize::MAX; graph.nodes.len()];
    let mut chains: Vec<Vec<usize>> = Vec::new();
    for (id, node) in graph.nodes.iter().enumerate() {
        let joins = match node.inputs.as_slice() {
            [edge] if matches!(edge.exchange, Exchange::Forward) => Some(chain_of[edge.from]),
            _ => None,
        };
        match joins {
            Some(c) => {
                chains[c].push(id);
                chain_of[id] = c;
            }
            None => {
                chain_of[id] = chains.len();
                chains.push(vec![id]);
            }
        }
    }
    chains
}

/// What a task runs after its input: operators, then an outlet or a sink.
struct Chain {
    operators: Vec<Box<dyn Operator>>,
    figures: Arc<TaskFigures>,
}

impl Chain {
    /// Runs `batch` through operators `from..`, returning what comes out of the last one.
    fn push(&mut self, from: usize, input: usize, batch: ChangeBatch) -> Result<Vec<ChangeBatch>> {
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
        for i in 0..self.operators.len() {
            let mut emitted = Vec::new();
            self.operators[i].on_end(&mut emitted)?;
            for batch in emitted {
                out.extend(self.push(i + 1, 0, batch)?);
            }
        }
        Ok(out)
    }

    fn report(&self) {
        let late = self.operators.iter().map(|o| o.late_rows_dropped()).sum();
        let state = self.operators.iter().map(|o| o.state_size()).sum();
        self.figures.late_rows.store(late, Ordering::Relaxed);
        self.figures.state_bytes.store(state, Ordering::Relaxed);
    }
}

enum Output {
    Outlet(Outlet),
    Sink { sink: Sink, index: usize },
}

struct TaskEnd {
    metrics: Arc<JobMetrics>,
    commits: Arc<Commits>,
}

impl Output {
    async fn rows(&mut self, batches: Vec<ChangeBatch>, end: &TaskEnd) -> Result<()> {
        for batch in batches {
            match self {
                Output::Outlet(o) => o.send(batch).await?,
                Output::Sink { sink, .. } => {
                    end.metrics
                        .rows_out
                        .fetch_add(batch.num_rows() as u64, Ordering::Relaxed);
                    sink.write(batch).await?
                }
            }
        }
        Ok(())
    }

    async fn watermark(&mut self, watermark: Millis, end: &TaskEnd) -> Result<()> {
        match self {
            Output::Outlet(o) => o.broadcast(Message::Watermark(watermark)).await,
            Output::Sink { .. } => {
                end.metrics
                    .watermark
                    .fetch_max(watermark, Ordering::Relaxed);
                Ok(())
            }
        }
    }

    async fn barrier(&mut self, epoch: Epoch, watermark: Millis, end: &TaskEnd) -> Result<()> {
        match self {
            Output::Outlet(o) => o.broadcast(Message::Barrier(epoch)).await,
            Output::Sink { sink, index } => {
                sink.commit(watermark, false).await?;
                end.commits.record(*index, epoch);
                Ok(())
            }
        }
    }

    async fn signal(&mut self, message: Message) -> Result<()> {
        match self {
            Output::Outlet(o) => o.broadcast(message).await,
            Output::Sink { .. } => Ok(()),
        }
    }

    async fn end(&mut self, end: &TaskEnd) -> Result<()> {
        match self {
            Output::Outlet(o) => o.broadcast(Message::End).await,
            Output::Sink { sink, index } => {
                sink.commit(END_OF_TIME, true).await?;
                end.commits.record(*index, Epoch::MAX);
                Ok(())
            }
        }
    }
}

impl RunningJob {
    /// Starts every task of `graph`.
    pub fn start(id: String, graph: StreamGraph, catalog: Arc<Catalog>) -> Result<Arc<Self>> {
        let reads_views = graph.nodes.iter().any(|n| {
            matches!(&n.kind, NodeKind::Source(spec) if matches!(spec.kind, SourceKind::View { .. }))
        });
        let metrics = Arc::new(JobMetrics::new());
        let chains = chains(&graph);
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
        let sink_count: usize = chains
            .iter()
            .filter(|c| matches!(graph.nodes[*c.last().unwrap()].kind, NodeKind::Sink(_)))
            .map(|c| graph.nodes[c[0]].parallelism)
            .sum();
        let (committed_tx, committed) = watch::channel(0);
        let commits = Arc::new(Commits {
            per_sink: Mutex::new(vec![0; sink_count]),
            committed: committed_tx,
        });
        let state = Arc::new(Mutex::new(JobState::Running));
        let mut tasks: JoinSet<Result<()>> = JoinSet::new();
        let mut barrier_requests = Vec::new();
        let mut sink_index = 0;
        for (c, chain) in chains.iter().enumerate() {
            let head = &graph.nodes[chain[0]];
            let tail_id = *chain.last().unwrap();
            let tail = &graph.nodes[tail_id];
            // Channel layout at the head: one channel per (input edge, upstream subtask),
            // or one per input edge when it is a forward edge.
            let mut channel_inputs = Vec::new();
            for (input, edge) in head.inputs.iter().enumerate() {
                let upstream = graph.nodes[edge.from].parallelism;
                let count = if matches!(edge.exchange, Exchange::Forward) {
                    1
                } else {
                    upstream
                };
                channel_inputs.extend(std::iter::repeat_n(input, count));
            }
            for subtask in 0..head.parallelism {
                let figures = metrics.task();
                let operators = chain
                    .iter()
                    .filter_map(|&n| match &graph.nodes[n].kind {
                        NodeKind::Operator(factory) => Some(factory(subtask)),
                        _ => None,
                    })
                    .collect::<Result<Vec<_>>>()?;
                let chain_ops = Chain { operators, figures };
                let output = match &tail.kind {
                    NodeKind::Sink(kind) => {
                        let index = sink_index;
                        sink_index += 1;
                        Output::Sink {
                            sink: Sink::open(kind, &catalog, subtask, &id)?,
                            index,
                        }
                    }
                    _ => {
                        let (consumer, input) = graph.consumer_of(tail_id).ok_or_else(|| {
                            DataFusionError::Internal("node without consumer".into())
                        })?;
                        let target = chain_of(consumer);
                        let consumer_node = &graph.nodes[consumer];
                        let base = {
                            let mut base = 0;
                            for edge in &consumer_node.inputs[..input] {
                                let up = graph.nodes[edge.from].parallelism;
                                base += if matches!(edge.exchange, Exchange::Forward) {
                                    1
                                } else {
                                    up
                                };
                            }
                            base
                        };
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
                        Output::Outlet(Outlet::new(targets, tag as u32, partitioner))
                    }
                };
                let end = TaskEnd {
                    metrics: metrics.clone(),
                    commits: commits.clone(),
                };
                match &head.kind {
                    NodeKind::Source(spec) => {
                        let reader = Reader::open(&spec.kind, &catalog, subtask, head.parallelism)?;
                        let rows = SourceRows::new(spec, head.schema.clone());
                        let (tx, rx) = mpsc::unbounded_channel();
                        barrier_requests.push(tx);
                        tasks.spawn(run_source(reader, rows, rx, chain_ops, output, end));
                    }
                    _ => {
                        let receiver = receivers[c][subtask].take().expect("one task per receiver");
                        let inlet = Inlet::new(receiver, channel_inputs.clone());
                        tasks.spawn(run_task(inlet, chain_ops, output, end));
                    }
                }
            }
        }
        drop(senders);
        let (done_tx, done) = watch::channel(false);
        let watcher_state = state.clone();
        let supervisor = tokio::spawn(async move {
            while let Some(result) = tasks.join_next().await {
                let failure = match result {
                    Ok(Ok(())) => None,
                    Ok(Err(e)) => {
                        let e = crate::sql::error::SqlError::from(e);
                        Some((e.code, e.message))
                    }
                    Err(e) if e.is_cancelled() => None,
                    Err(e) => Some(("XX000", format!("a task panicked: {e}"))),
                };
                if let Some((code, message)) = failure {
                    tracing::warn!("job failed: {message}");
                    *watcher_state.lock().unwrap_or_else(|p| p.into_inner()) =
                        JobState::Failed(code, message);
                    tasks.abort_all();
                }
            }
            let mut s = watcher_state.lock().unwrap_or_else(|p| p.into_inner());
            if *s == JobState::Running {
                *s = JobState::Finished;
            }
            drop(s);
            let _ = done_tx.send(true);
        });
        Ok(Arc::new(Self {
            id,
            metrics,
            state,
            barrier_requests,
            committed,
            done,
            abort: Mutex::new(Some(supervisor.abort_handle())),
            reads_views,
        }))
    }

    pub fn state(&self) -> JobState {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Injects a barrier for `epoch` at every source.
    pub fn request_barrier(&self, epoch: Epoch) {
        for request in &self.barrier_requests {
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

    pub fn stop(&self) {
        {
            let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
            if *s == JobState::Running {
                *s = JobState::Stopped;
            }
        }
        if let Some(abort) = self.abort.lock().unwrap_or_else(|p| p.into_inner()).take() {
            abort.abort();
        }
    }
}

impl Drop for RunningJob {
    fn drop(&mut self) {
        if let Some(abort) = self.abort.lock().unwrap_or_else(|p| p.into_inner()).take() {
            abort.abort();
        }
    }
}

async fn run_task(
    mut inlet: Inlet,
    mut chain: Chain,
    mut output: Output,
    end: TaskEnd,
) -> Result<()> {
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
                output.barrier(epoch, inlet.watermark(), &end).await?
            }
            Event::Idle => output.signal(Message::Idle).await?,
            Event::Active => output.signal(Message::Active).await?,
            Event::End => {
                let out = chain.end()?;
                output.rows(out, &end).await?;
                chain.report();
                return output.end(&end).await;
            }
        }
        chain.report();
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
    let mut tick = tokio::time::interval(PROCESSING_TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
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
                    if handle_read(read, &mut rows, &mut chain, &mut output, &end, &mut idle).await? {
                        return Ok(());
                    }
                }
                let out = chain.barrier()?;
                output.rows(out, &end).await?;
                output.barrier(epoch, rows.watermark, &end).await?;
                continue;
            }
            read = reader.next() => read?,
            _ = tick.tick(), if rows.processing_time() => {
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
        if handle_read(read, &mut rows, &mut chain, &mut output, &end, &mut idle).await? {
            return Ok(());
        }
    }
}

/// Returns true at the end of the input.
async fn handle_read(
    read: Read,
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
            let batch = rows.prepare(physical)?;
            let out = chain.push(0, 0, batch)?;
            output.rows(out, end).await?;
            if rows.watermark > before {
                let out = chain.watermark(rows.watermark)?;
                output.rows(out, end).await?;
                output.watermark(rows.watermark, end).await?;
            }
            chain.report();
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
            chain.report();
            output.end(end).await?;
            Ok(true)
        }
    }
}
