//! The sending and receiving ends of the channels between tasks.
//!
//! Every subtask has one bounded receiver shared by all its input channels; messages are
//! tagged with the channel they came on. The receiving side tracks each channel's
//! watermark (the operator's watermark is the minimum over live channels) and aligns
//! barriers: a channel whose barrier came first is held back until every channel has
//! delivered it.

use std::collections::VecDeque;
use std::sync::Arc;

use datafusion::arrow::array::{Array, Int64Array, UInt32Array};
use datafusion::arrow::compute::max;
use datafusion::common::hash_utils::{create_hashes, RandomState};
use datafusion::common::{DataFusionError, Result};
use datafusion::physical_expr::PhysicalExpr;
use tokio::sync::mpsc;

use super::graph::KEY_GROUPS;
use super::message::{ChangeBatch, Epoch, Message, Millis, END_OF_TIME, NO_WATERMARK};

pub type Tagged = (u32, Message);

/// Channel capacity, in messages: bounded, so a slow consumer back-pressures producers.
pub const CHANNEL_CAPACITY: usize = 16;

/// The subtask that owns `key_group` when a node has `parallelism` subtasks.
pub fn subtask_of_key_group(key_group: usize, parallelism: usize) -> usize {
    key_group * parallelism / KEY_GROUPS
}

const HASH_STATE: RandomState = RandomState::with_seed(0x5745_4952);

/// The key group of each row of `keys` (a batch's key columns); `hashes` is scratch space.
pub fn key_group_of<'a>(
    keys: &[datafusion::arrow::array::ArrayRef],
    hashes: &'a mut Vec<u64>,
) -> Result<impl Iterator<Item = usize> + 'a> {
    hashes.clear();
    hashes.resize(keys.first().map_or(0, |k| k.len()), 0);
    create_hashes(keys, &HASH_STATE, hashes)?;
    Ok(hashes.iter().map(|h| (*h % KEY_GROUPS as u64) as usize))
}

pub enum Partitioner {
    /// One receiver.
    Single,
    Hash(Vec<Arc<dyn PhysicalExpr>>),
}

/// Where a task's output goes.
pub struct Outlet {
    senders: Vec<mpsc::Sender<Tagged>>,
    tag: u32,
    partitioner: Partitioner,
    hashes: Vec<u64>,
}

fn gone() -> DataFusionError {
    DataFusionError::Execution("downstream task stopped".into())
}

impl Outlet {
    pub fn new(senders: Vec<mpsc::Sender<Tagged>>, tag: u32, partitioner: Partitioner) -> Self {
        Self {
            senders,
            tag,
            partitioner,
            hashes: Vec::new(),
        }
    }

    pub async fn send(&mut self, batch: ChangeBatch) -> Result<()> {
        if batch.num_rows() == 0 {
            return Ok(());
        }
        match &mut self.partitioner {
            Partitioner::Single => self.send_to(0, batch).await,
            Partitioner::Hash(keys) => {
                let parallelism = self.senders.len();
                if parallelism == 1 {
                    return self.send_to(0, batch).await;
                }
                let rows = batch.num_rows();
                let columns = keys
                    .iter()
                    .map(|k| k.evaluate(&batch.rows)?.into_array(rows))
                    .collect::<Result<Vec<_>>>()?;
                let mut indices: Vec<Vec<u32>> = vec![Vec::new(); parallelism];
                for (row, group) in key_group_of(&columns, &mut self.hashes)?.enumerate() {
                    indices[subtask_of_key_group(group, parallelism)].push(row as u32);
                }
                for (to, rows) in indices.into_iter().enumerate() {
                    if !rows.is_empty() {
                        let part = batch.take(&UInt32Array::from(rows))?;
                        self.send_to(to, part).await?;
                    }
                }
                Ok(())
            }
        }
    }

    async fn send_to(&self, to: usize, batch: ChangeBatch) -> Result<()> {
        self.senders[to]
            .send((self.tag, Message::Data(batch)))
            .await
            .map_err(|_| gone())
    }

    /// Watermarks, barriers, idleness and the end go to every receiver.
    pub async fn broadcast(&self, message: Message) -> Result<()> {
        for sender in &self.senders {
            sender
                .send((self.tag, message.clone()))
                .await
                .map_err(|_| gone())?;
        }
        Ok(())
    }
}

#[derive(Debug, Clone)]
struct Channel {
    input: usize,
    watermark: Millis,
    idle: bool,
    ended: bool,
    /// Its barrier for the epoch being aligned has arrived.
    aligned: bool,
    /// Unaligned: held back, because it brought the next epoch's barrier before the
    /// current one came on every channel.
    holding: bool,
}

/// What the receiving side hands its task.
// Data is nearly every event; boxing it would allocate once per batch for nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub enum Event {
    Data(usize, ChangeBatch),
    Watermark(Millis),
    Barrier(Epoch),
    /// Unaligned checkpoints: the barrier of this epoch came on every channel; these are
    /// the messages that came after the first one on channels whose barrier had not come
    /// yet (they belong to the epoch, and go into its checkpoint).
    InFlight(Epoch, Vec<Tagged>),
    Idle,
    Active,
    End,
}

/// Epochs whose barriers align even when a job's checkpoints are unaligned: those FLUSH,
/// savepoints and rescaling ask for, whose commit must hold everything read before them
/// (an unaligned epoch's in-flight rows only reach the sinks in the next one).
#[derive(Debug, Default)]
pub struct AlignedEpochs(std::sync::Mutex<std::collections::BTreeSet<Epoch>>);

impl AlignedEpochs {
    pub fn insert(&self, epoch: Epoch) {
        let mut epochs = self.0.lock().unwrap_or_else(|p| p.into_inner());
        // Barriers of older epochs are long gone.
        while epochs.len() > 1024 {
            epochs.pop_first();
        }
        epochs.insert(epoch);
    }

    pub fn contains(&self, epoch: Epoch) -> bool {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(&epoch)
    }
}

pub struct Inlet {
    receiver: mpsc::Receiver<Tagged>,
    channels: Vec<Channel>,
    /// Messages of channels held back by barrier alignment.
    held: VecDeque<Tagged>,
    /// Released after an alignment completed: delivered before new messages.
    replay: VecDeque<Tagged>,
    aligning: Option<Epoch>,
    /// When the first barrier of the alignment in progress arrived.
    aligning_since: Option<std::time::Instant>,
    last_alignment: std::time::Duration,
    watermark: Millis,
    idle: bool,
    pending: VecDeque<Event>,
    /// Unaligned checkpoints: a barrier (but of these epochs) is passed on as soon as it
    /// comes on one channel, and the other channels' messages until theirs come are
    /// recorded.
    unaligned: Option<Arc<AlignedEpochs>>,
    /// The in-flight messages of the unaligned epoch in progress.
    recording: Option<Vec<Tagged>>,
}

impl Inlet {
    /// `inputs[c]` is the operator input channel `c` feeds.
    pub fn new(
        receiver: mpsc::Receiver<Tagged>,
        inputs: Vec<usize>,
        unaligned: Option<Arc<AlignedEpochs>>,
    ) -> Self {
        Self {
            receiver,
            channels: inputs
                .into_iter()
                .map(|input| Channel {
                    input,
                    watermark: NO_WATERMARK,
                    idle: false,
                    ended: false,
                    aligned: false,
                    holding: false,
                })
                .collect(),
            held: VecDeque::new(),
            replay: VecDeque::new(),
            aligning: None,
            aligning_since: None,
            last_alignment: std::time::Duration::ZERO,
            watermark: NO_WATERMARK,
            idle: false,
            pending: VecDeque::new(),
            unaligned,
            recording: None,
        }
    }

    /// Whether a barrier passed on is still waiting for its in-flight messages (an
    /// unaligned checkpoint): its snapshot is acknowledged at [`Event::InFlight`].
    pub fn recording(&self) -> bool {
        self.recording.is_some()
    }

    /// Puts back the in-flight messages of an unaligned checkpoint: they are delivered
    /// before anything new, as if they had just come.
    pub fn restore_in_flight(&mut self, messages: Vec<Tagged>) {
        let valid = messages
            .into_iter()
            .filter(|(tag, _)| (*tag as usize) < self.channels.len());
        let mut replay: VecDeque<Tagged> = valid.collect();
        replay.append(&mut self.replay);
        self.replay = replay;
    }

    pub fn watermark(&self) -> Millis {
        self.watermark
    }

    /// Each channel's watermark, for a checkpoint.
    pub fn channel_watermarks(&self) -> Vec<Millis> {
        self.channels.iter().map(|c| c.watermark).collect()
    }

    /// Puts back the channel watermarks a checkpoint recorded.
    pub fn restore_watermarks(&mut self, watermarks: &[Millis]) {
        if watermarks.len() != self.channels.len() {
            return;
        }
        for (c, w) in self.channels.iter_mut().zip(watermarks) {
            c.watermark = *w;
        }
        self.watermark = self.live_min(None).unwrap_or(NO_WATERMARK);
    }

    /// How long the last barrier alignment held channels back.
    pub fn last_alignment(&self) -> std::time::Duration {
        self.last_alignment
    }

    /// The next event; `None` once every channel ended and everything was delivered.
    pub async fn next(&mut self) -> Option<Event> {
        loop {
            if let Some(event) = self.pending.pop_front() {
                return Some(event);
            }
            if self.channels.iter().all(|c| c.ended) && self.replay.is_empty() {
                return None;
            }
            let (tag, message) = match self.replay.pop_front() {
                Some(m) => m,
                None => self.receiver.recv().await?,
            };
            let c = tag as usize;
            if self.held_back(c, &message) {
                self.held.push_back((tag, message));
                continue;
            }
            if let Some(log) = &mut self.recording {
                let recorded = !matches!(message, Message::Barrier(_) | Message::End);
                if !self.channels[c].aligned && recorded {
                    log.push((tag, message.clone()));
                }
            }
            self.on_message(c, message);
        }
    }

    /// Aligned, a channel whose barrier came waits for the others (its end too: nothing
    /// it sent before may come after it); unaligned, it goes on until it brings the next
    /// barrier first.
    fn held_back(&mut self, c: usize, message: &Message) -> bool {
        if !self.channels[c].aligned {
            return false;
        }
        if self.recording.is_none() {
            return true;
        }
        let channel = &mut self.channels[c];
        channel.holding |= matches!(message, Message::Barrier(_));
        channel.holding
    }

    fn live_min(&self, except: Option<usize>) -> Option<Millis> {
        self.channels
            .iter()
            .enumerate()
            .filter(|(i, c)| Some(*i) != except && !c.ended && !c.idle)
            .map(|(_, c)| c.watermark)
            .min()
    }

    fn on_message(&mut self, c: usize, message: Message) {
        match message {
            Message::Data(mut batch) => {
                if self.channels[c].idle {
                    self.channels[c].idle = false;
                    self.update_idle();
                }
                // A row meets the lowest watermark among its own (per row) and the
                // other channels' current ones. On the common path nothing is copied.
                let others = self.live_min(Some(c)).unwrap_or(END_OF_TIME);
                let own = self.channels[c].watermark;
                batch.watermarks = match batch.watermarks.take() {
                    // No other channel is lower than any row's own watermark.
                    Some(w) if w.null_count() == 0 && max(&w).is_none_or(|m| m <= others) => {
                        Some(w)
                    }
                    Some(w) => Some(
                        w.iter()
                            .map(|w| Some(w.unwrap_or(own).min(others)))
                            .collect(),
                    ),
                    // Rows meet the channels' minimum, which is the watermark the operator
                    // last received (None says exactly that)...
                    None if own.min(others) >= self.watermark => None,
                    // ...unless a channel that resumed lags behind it.
                    None => Some(Int64Array::from(vec![own.min(others); batch.num_rows()])),
                };
                let input = self.channels[c].input;
                self.pending.push_back(Event::Data(input, batch));
            }
            Message::Watermark(w) => {
                let ch = &mut self.channels[c];
                ch.watermark = ch.watermark.max(w);
                self.advance();
            }
            Message::Idle => {
                self.channels[c].idle = true;
                self.update_idle();
                self.advance();
            }
            Message::Active => {
                self.channels[c].idle = false;
                self.update_idle();
            }
            Message::Barrier(epoch) => {
                let first = self.aligning.is_none();
                if first {
                    self.aligning_since = Some(std::time::Instant::now());
                }
                self.aligning = Some(epoch);
                self.channels[c].aligned = true;
                let unaligned = self.unaligned.as_ref().is_some_and(|a| !a.contains(epoch));
                if first && unaligned && !self.all_aligned() {
                    // Passed on at once; what the other channels bring until their
                    // barrier is recorded for the checkpoint.
                    self.last_alignment = std::time::Duration::ZERO;
                    self.pending.push_back(Event::Barrier(epoch));
                    self.recording = Some(Vec::new());
                    return;
                }
                self.try_complete_alignment();
            }
            Message::End => {
                let ch = &mut self.channels[c];
                ch.ended = true;
                ch.watermark = END_OF_TIME;
                self.advance();
                self.try_complete_alignment();
                if self.channels.iter().all(|c| c.ended) {
                    self.pending.push_back(Event::End);
                }
            }
        }
    }

    fn update_idle(&mut self) {
        let idle =
            self.channels.iter().all(|c| c.ended || c.idle) && self.channels.iter().any(|c| c.idle);
        if idle != self.idle {
            self.idle = idle;
            self.pending
                .push_back(if idle { Event::Idle } else { Event::Active });
        }
    }

    fn advance(&mut self) {
        let Some(min) = self
            .live_min(None)
            .or_else(|| self.channels.iter().all(|c| c.ended).then_some(END_OF_TIME))
        else {
            return;
        };
        if min > self.watermark {
            self.watermark = min;
            self.pending.push_back(Event::Watermark(min));
        }
    }

    fn try_complete_alignment(&mut self) {
        let Some(epoch) = self.aligning else {
            return;
        };
        if !self.all_aligned() {
            return;
        }
        for c in &mut self.channels {
            c.aligned = false;
            c.holding = false;
        }
        self.aligning = None;
        let since = self.aligning_since.take();
        match self.recording.take() {
            Some(log) => self.pending.push_back(Event::InFlight(epoch, log)),
            None => {
                self.last_alignment = since.map_or(std::time::Duration::ZERO, |t| t.elapsed());
                self.pending.push_back(Event::Barrier(epoch));
            }
        }
        let held = std::mem::take(&mut self.held);
        self.replay.extend(held);
    }

    fn all_aligned(&self) -> bool {
        self.channels.iter().all(|c| c.aligned || c.ended)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use datafusion::arrow::array::RecordBatch;

    use super::*;

    fn data(v: i64) -> Message {
        let column: datafusion::arrow::array::ArrayRef = Arc::new(Int64Array::from(vec![v]));
        Message::Data(ChangeBatch::new(
            RecordBatch::try_from_iter([("v", column)]).unwrap(),
        ))
    }

    fn value(batch: &ChangeBatch) -> i64 {
        let column = batch.rows.column(0);
        column
            .as_any()
            .downcast_ref::<Int64Array>()
            .unwrap()
            .value(0)
    }

    /// What the inlet delivers for `messages` (channel, message), as short strings.
    async fn deliver(unaligned: bool, messages: Vec<Tagged>) -> Vec<String> {
        deliver_with(unaligned, &[], messages).await
    }

    /// Also with epochs `aligned` forced to align (FLUSH).
    async fn deliver_with(
        unaligned: bool,
        aligned: &[Epoch],
        messages: Vec<Tagged>,
    ) -> Vec<String> {
        let (tx, rx) = mpsc::channel(64);
        for m in messages {
            tx.send(m).await.unwrap();
        }
        drop(tx);
        let mut inlet = Inlet::new(
            rx,
            vec![0, 0],
            unaligned.then(|| {
                let epochs = AlignedEpochs::default();
                aligned.iter().for_each(|e| epochs.insert(*e));
                Arc::new(epochs)
            }),
        );
        let mut out = Vec::new();
        while let Some(event) = inlet.next().await {
            out.push(match event {
                Event::Data(_, b) => format!("data {}", value(&b)),
                Event::Barrier(e) => format!("barrier {e} recording={}", inlet.recording()),
                Event::InFlight(e, messages) => {
                    let logged: Vec<String> = messages
                        .iter()
                        .map(|(c, m)| match m {
                            Message::Data(b) => format!("{c}:{}", value(b)),
                            Message::Watermark(w) => format!("{c}:wm{w}"),
                            _ => format!("{c}:other"),
                        })
                        .collect();
                    format!("in-flight {e} [{}]", logged.join(" "))
                }
                Event::Watermark(w) => format!("watermark {w}"),
                Event::End => "end".into(),
                Event::Idle | Event::Active => "idle".into(),
            });
        }
        out
    }

    fn messages() -> Vec<Tagged> {
        vec![
            (0, Message::Barrier(1)),
            (0, data(10)),
            (1, data(1)),
            (1, Message::Watermark(5)),
            (0, Message::Barrier(2)),
            (0, data(20)),
            (1, Message::Barrier(1)),
            (1, data(2)),
            (0, Message::End),
            (1, Message::End),
        ]
    }

    #[tokio::test]
    async fn aligned_barriers_hold_back_the_channel_whose_barrier_came_first() {
        assert_eq!(
            deliver(false, messages()).await,
            [
                "data 1",
                "barrier 1 recording=false",
                "data 10",
                "data 2",
                // Channel 1 ended: the alignment of epoch 2 completes without it; channel
                // 0's row after its barrier comes before its end.
                "barrier 2 recording=false",
                "data 20",
                "watermark 9223372036854775807",
                "end",
            ]
        );
    }

    #[tokio::test]
    async fn unaligned_barriers_pass_at_once_and_record_what_the_others_bring() {
        assert_eq!(
            deliver(true, messages()).await,
            [
                "barrier 1 recording=true",
                "data 10",
                "data 1",
                // Channel 0's next barrier waits for the epoch in progress.
                "in-flight 1 [1:1 1:wm5]",
                "barrier 2 recording=true",
                "data 20",
                "data 2",
                "watermark 5",
                "watermark 9223372036854775807",
                "in-flight 2 [1:2]",
                "end",
            ]
        );
    }

    #[tokio::test]
    async fn a_flushed_epoch_aligns_even_when_checkpoints_are_unaligned() {
        assert_eq!(
            deliver_with(true, &[2], messages()).await,
            [
                "barrier 1 recording=true",
                "data 10",
                "data 1",
                "in-flight 1 [1:1 1:wm5]",
                // Epoch 2 aligns: channel 0 waits after its barrier.
                "data 2",
                "barrier 2 recording=false",
                "data 20",
                "watermark 9223372036854775807",
                "end",
            ]
        );
    }
}
