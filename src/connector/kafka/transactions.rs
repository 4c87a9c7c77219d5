//! 'transactional' exactly-once Kafka sinks (Flink's default exactly-once mode).
//!
//! A sink subtask writes an epoch's rows inside a Kafka transaction of one of its
//! [`POOL`] producers (transactional ids `<prefix>-<subtask>-<k>`), flushes it at the
//! barrier (pre-commit) and leaves it to the job's coordinator, which commits it once
//! the epoch is durable; meanwhile the next epoch goes on in the next producer.
//!
//! librdkafka cannot resume another process's transaction, so the pre-committed
//! transaction's rows also go into the checkpoint. After a crash the commit of the
//! restored epoch is redone: its transactional id is initialized (which aborts the
//! transaction if it was still open), its messages are looked for with a read_committed
//! consumer from the first offsets it wrote (every message carries the transaction's
//! nonce in a header), and if they are not there the rows are written again in a new
//! transaction under the same id and committed. When a sink starts, it initializes every
//! id of its pool, which aborts the transactions of epochs that never committed, so none
//! is left open to block read_committed consumers.

use std::collections::HashMap;
use std::sync::{Arc, Condvar, LazyLock, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use datafusion::common::Result;
use rdkafka::message::{Headers, Message, OwnedHeaders};
use rdkafka::producer::Producer;
use weir_catalog::TableDef;

use super::kafka_error;
use super::sink::{flush, producer, send, KafkaProducer, Placement};
use crate::connector::factory::to_df;
use crate::connector::io::{EpochWriter, SinkRows, Transaction};
use crate::sql::error::{sqlstate, SqlError, SqlResult};
use crate::stream::message::{ChangeBatch, Epoch};

/// Producers (transactions) per sink subtask: epochs whose commit is still pending
/// before a subtask waits for one.
pub const POOL: usize = 4;
const TIMEOUT: Duration = Duration::from_secs(60);

const JOB: &str = "weir.job";
const TXN: &str = "weir.txn";
const SUBTASK: &str = "weir.subtask";
const SEQ: &str = "weir.seq";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SlotState {
    Idle,
    Open(u64),
    Precommitted(u64),
}

/// One transactional producer of a sink subtask's pool.
struct Slot {
    id: String,
    producer: KafkaProducer,
    state: Mutex<SlotState>,
    changed: Condvar,
}

impl Slot {
    fn set(&self, state: SlotState) {
        *self.state.lock().expect("not poisoned") = state;
        self.changed.notify_all();
    }
}

/// The live pools' producers by transactional id: how the coordinator finds the
/// transaction a sink subtask pre-committed.
static SLOTS: LazyLock<Mutex<HashMap<String, Arc<Slot>>>> = LazyLock::new(Default::default);

/// What happened to which transactional id, for tests.
#[cfg(test)]
pub(super) static EVENTS: Mutex<Vec<String>> = Mutex::new(Vec::new());

fn event(what: &str, id: &str) {
    tracing::debug!("kafka transaction {id}: {what}");
    #[cfg(test)]
    EVENTS
        .lock()
        .expect("not poisoned")
        .push(format!("{what} {id}"));
}

fn transactional_producer(def: &TableDef, id: &str) -> SqlResult<KafkaProducer> {
    let p = producer(def, &[("transactional.id", id)])?;
    p.init_transactions(TIMEOUT)
        .map_err(|e| kafka_error(def, &format!("initialize transactional id '{id}'"), e))?;
    event("init", id);
    Ok(p)
}

fn headers(job: &str, nonce: u64, subtask: u32, seq: u64) -> OwnedHeaders {
    super::stamp_headers([
        (JOB, job.to_string()),
        (TXN, nonce.to_string()),
        (SUBTASK, subtask.to_string()),
        (SEQ, seq.to_string()),
    ])
}

/// A sink subtask's side: writes rows into the open transaction, pre-commits it.
pub(super) struct Transactional {
    def: Arc<TableDef>,
    job: String,
    prefix: String,
    subtask: u32,
    placement: Placement,
    slots: Vec<Arc<Slot>>,
    next: usize,
    open: Option<(Arc<Slot>, u64)>,
    seq: u64,
}

impl Transactional {
    pub(super) fn new(def: &TableDef, subtask: usize, job: &str, placement: Placement) -> Self {
        Self {
            def: Arc::new(def.clone()),
            job: job.to_string(),
            prefix: def
                .options
                .get("sink.transactional-id-prefix")
                .cloned()
                .unwrap_or_default(),
            subtask: subtask as u32,
            placement,
            slots: vec![],
            next: 0,
            open: None,
            seq: 0,
        }
    }

    /// Creates the pool, aborting whatever its ids left open.
    fn init(&mut self) -> SqlResult<()> {
        for k in 0..POOL {
            let id = format!("{}-{}-{k}", self.prefix, self.subtask);
            let slot = Arc::new(Slot {
                producer: transactional_producer(&self.def, &id)?,
                id: id.clone(),
                state: Mutex::new(SlotState::Idle),
                changed: Condvar::new(),
            });
            SLOTS.lock().expect("not poisoned").insert(id, slot.clone());
            self.slots.push(slot);
        }
        Ok(())
    }

    /// The open transaction, begun in the next producer once its last one committed.
    fn transaction(&mut self) -> SqlResult<(Arc<Slot>, u64)> {
        if let Some(open) = &self.open {
            return Ok(open.clone());
        }
        if self.slots.is_empty() {
            self.init()?;
        }
        let slot = self.slots[self.next % POOL].clone();
        {
            let state = slot.state.lock().expect("not poisoned");
            let (state, timeout) = slot
                .changed
                .wait_timeout_while(state, TIMEOUT, |s| *s != SlotState::Idle)
                .expect("not poisoned");
            if timeout.timed_out() {
                return Err(SqlError::new(
                    sqlstate::IO_ERROR,
                    format!(
                        "kafka table \"{}\": the transaction of '{}' was not committed in {} s \
                         (is the job's checkpoint failing?)",
                        self.def.name,
                        slot.id,
                        TIMEOUT.as_secs()
                    ),
                ));
            }
            drop(state);
        }
        slot.producer
            .begin_transaction()
            .map_err(|e| kafka_error(&self.def, "begin a transaction", e))?;
        event("begin", &slot.id);
        slot.producer.context().take_first_offsets();
        let nonce = rand::random::<u64>();
        slot.set(SlotState::Open(nonce));
        self.open = Some((slot.clone(), nonce));
        self.seq = 0;
        Ok((slot, nonce))
    }

    pub fn write(&mut self, batch: &ChangeBatch) -> SqlResult<()> {
        let (slot, nonce) = self.transaction()?;
        for record in self.placement.encoder.records(batch)? {
            let partition = self
                .placement
                .partition(&record, self.subtask as usize, self.seq);
            let h = headers(&self.job, nonce, self.subtask, self.seq);
            send(
                &slot.producer,
                &self.placement.topic,
                &record,
                partition,
                Some(h),
            )
            .map_err(|e| kafka_error(&self.def, "send a message", e))?;
            self.seq += 1;
        }
        Ok(())
    }

    /// Flushes the open transaction and leaves it for the coordinator to commit.
    pub fn precommit(&mut self) -> SqlResult<Option<Transaction>> {
        if self.slots.is_empty() {
            // Abort what an earlier run left open even when this one writes nothing.
            self.init()?;
        }
        let Some((slot, nonce)) = self.open.take() else {
            return Ok(None);
        };
        flush(&self.def, &slot.producer)?;
        slot.set(SlotState::Precommitted(nonce));
        event("precommit", &slot.id);
        self.next += 1;
        Ok(Some(Transaction {
            id: slot.id.clone(),
            nonce,
            offsets: slot.producer.context().take_first_offsets(),
        }))
    }
}

/// The coordinator's side: commits the transactions of a committed epoch, or redoes
/// them after a crash.
pub struct Transactions {
    def: Arc<TableDef>,
    job: String,
    placement: Placement,
}

impl Transactions {
    pub fn open(def: &TableDef, job: &str) -> SqlResult<Self> {
        Ok(Self {
            def: Arc::new(def.clone()),
            job: job.to_string(),
            placement: Placement::of(def)?.0,
        })
    }

    fn commit_all(&self, rows: &[SinkRows], redo: bool) -> SqlResult<()> {
        for r in rows {
            let Some(t) = &r.transaction else { continue };
            let live = SLOTS.lock().expect("not poisoned").get(&t.id).cloned();
            match live {
                Some(slot)
                    if !redo
                        && *slot.state.lock().expect("not poisoned")
                            == SlotState::Precommitted(t.nonce) =>
                {
                    slot.producer
                        .commit_transaction(TIMEOUT)
                        .map_err(|e| kafka_error(&self.def, "commit a transaction", e))?;
                    event("commit", &t.id);
                    slot.set(SlotState::Idle);
                }
                _ => self.redo(r, t)?,
            }
        }
        Ok(())
    }

    /// Commits a pre-committed transaction this process no longer has: aborted by
    /// initializing its id, then written again unless its messages are committed.
    fn redo(&self, r: &SinkRows, t: &Transaction) -> SqlResult<()> {
        let p = transactional_producer(&self.def, &t.id)?;
        if self.committed(t)? {
            return Ok(());
        }
        p.begin_transaction()
            .map_err(|e| kafka_error(&self.def, "begin a transaction", e))?;
        let mut seq = 0;
        for batch in &r.rows {
            for record in self.placement.encoder.records(batch)? {
                let partition = self.placement.partition(&record, r.subtask as usize, seq);
                let h = headers(&self.job, t.nonce, r.subtask, seq);
                send(&p, &self.placement.topic, &record, partition, Some(h))
                    .map_err(|e| kafka_error(&self.def, "send a message", e))?;
                seq += 1;
            }
        }
        flush(&self.def, &p)?;
        p.commit_transaction(TIMEOUT)
            .map_err(|e| kafka_error(&self.def, "commit a transaction", e))?;
        event("rewrite and commit", &t.id);
        Ok(())
    }

    /// Whether a message of transaction `t` is visible to read_committed readers: read
    /// from the first offset it wrote in one of its partitions to the end.
    fn committed(&self, t: &Transaction) -> SqlResult<bool> {
        let Some(&(partition, first)) = t.offsets.first() else {
            return Ok(true);
        };
        let nonce = t.nonce.to_string();
        let mut ours = false;
        let topic = &self.placement.topic;
        super::read_back(&self.def, topic, partition, first, true, |m| {
            ours = m.headers().is_some_and(|h| {
                h.iter()
                    .any(|h| h.key == TXN && h.value == Some(nonce.as_bytes()))
                    && h.iter()
                        .any(|h| h.key == JOB && h.value == Some(self.job.as_bytes()))
            });
            ours
        })?;
        Ok(ours)
    }
}

#[async_trait]
impl EpochWriter for Transactions {
    async fn commit(self: Arc<Self>, _epoch: Epoch, rows: Vec<SinkRows>, redo: bool) -> Result<()> {
        tokio::task::spawn_blocking(move || self.commit_all(&rows, redo))
            .await
            .map_err(|e| to_df(SqlError::internal(format!("kafka commit failed: {e}"))))?
            .map_err(to_df)
    }
}
