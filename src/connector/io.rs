//! What the streaming runtime asks of a connector: split readers that produce Arrow
//! batches of a table's physical columns (with each row's change, for changelog formats),
//! and sink writers that take them.
//!
//! A reader's position is opaque bytes so checkpoints can record and restore it
//! without knowing the connector.

use async_trait::async_trait;
use datafusion::arrow::record_batch::RecordBatch;
use datafusion::common::Result;

use crate::stream::checkpoint::Precommit;
use crate::stream::message::ChangeBatch;
use crate::stream::message::Epoch;

/// One split (partition) of a source table, read by one source subtask.
#[async_trait]
pub trait SplitReader: Send {
    /// The next batch of rows — the table's physical columns in declaration order
    /// (`TableDef::physical_schema`) — waiting while an unbounded input has nothing new.
    /// `ops` is `None` for inserts (every format but changelog ones such as
    /// 'debezium-json'); watermarks are left to the source task. `Ok(None)` once a
    /// bounded input is exhausted.
    async fn next_batch(&mut self) -> Result<Option<ChangeBatch>>;

    /// Where the reader is: [`SplitReader::restore`] with it resumes right after the last
    /// batch returned.
    fn position(&self) -> Vec<u8>;

    fn restore(&mut self, position: &[u8]) -> Result<()>;

    /// For a reader of several partitions (Kafka): which of how many partitions the last
    /// batch came from. The source then keeps a watermark per partition and moves on
    /// with the lowest of those not idle.
    fn lane(&self) -> crate::stream::source::LaneOf {
        None
    }

    /// Malformed records skipped so far (by a source told to ignore parse errors).
    fn skipped_records(&self) -> u64 {
        0
    }
}

/// Where one sink subtask writes insert-only rows.
#[async_trait]
pub trait SinkWriter: Send {
    async fn write(&mut self, batch: RecordBatch) -> Result<()>;

    /// Rows with their changes. Sinks that take inserts only never see retractions (the
    /// planner refuses updating queries for them): by default the rows are written.
    async fn write_changes(&mut self, batch: ChangeBatch) -> Result<()> {
        self.write(batch.rows).await
    }

    /// Makes everything written so far visible to readers of the sink.
    async fn flush(&mut self) -> Result<()>;

    /// At a barrier or the end of the input: a sink that can hold its output back until
    /// the epoch commits returns what to publish then (two-phase commit); others flush
    /// and return `None` (at-least-once).
    async fn precommit(&mut self) -> Result<Option<Precommit>> {
        self.flush().await?;
        Ok(None)
    }
}

/// What a sink subtask that cannot publish its output itself leaves to its job's
/// [`EpochWriter`] at a barrier.
#[derive(Debug, Clone)]
pub struct SinkRows {
    pub subtask: u32,
    /// The epoch's rows: written at the commit (write-ahead), or kept to write them
    /// again if their transaction cannot be committed after a crash.
    pub rows: Vec<ChangeBatch>,
    /// The pre-committed Kafka transaction holding the rows ('transactional' mode).
    pub transaction: Option<Transaction>,
}

impl SinkRows {
    /// What is left once committed: nothing.
    pub fn committed(&self) -> Self {
        Self {
            subtask: self.subtask,
            rows: vec![],
            transaction: None,
        }
    }
}

/// A pre-committed Kafka transaction: its producer's transactional id, the nonce its
/// messages carry in a header, and the first offset it wrote in each partition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transaction {
    pub id: String,
    pub nonce: u64,
    pub offsets: Vec<(i32, i64)>,
}

/// Writes the rows sink subtasks kept for an epoch (`Precommit::Rows`), once the epoch
/// committed: a sink that can only make output visible by writing it (Kafka's
/// write-ahead mode). `redo` is set when the commit of a restored epoch is done again
/// after a crash: what was written before it must not be written twice.
#[async_trait]
pub trait EpochWriter: Send + Sync {
    async fn commit(
        self: std::sync::Arc<Self>,
        epoch: Epoch,
        rows: Vec<SinkRows>,
        redo: bool,
    ) -> Result<()>;
}
