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
}

/// What the receiving side hands its task.
// Data is nearly every event; boxing it would allocate once per batch for nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub enum Event {
    Data(usize, ChangeBatch),
    Watermark(Millis),
    Barrier(Epoch),
    Idle,
    Active,
    End,
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
}

impl Inlet {
    /// `inputs[c]` is the operator input channel `c` feeds.
    pub fn new(receiver: mpsc::Receiver<Tagged>, inputs: Vec<usize>) -> Self {
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
        }
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
            if self.channels[c].aligned && !matches!(message, Message::End) {
                self.held.push_back((tag, message));
                continue;
            }
            self.on_message(c, message);
        }
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
                if self.aligning.is_none() {
                    self.aligning_since = Some(std::time::Instant::now());
                }
                self.aligning = Some(epoch);
                self.channels[c].aligned = true;
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
        if !self.channels.iter().all(|c| c.aligned || c.ended) {
            return;
        }
        for c in &mut self.channels {
            c.aligned = false;
        }
        self.aligning = None;
        self.last_alignment = self
            .aligning_since
            .take()
            .map_or(std::time::Duration::ZERO, |t| t.elapsed());
        self.pending.push_back(Event::Barrier(epoch));
        let held = std::mem::take(&mut self.held);
        self.replay.extend(held);
    }
}
