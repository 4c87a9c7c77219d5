//! A materialized view's contents: rows published by its job at barriers, read as a
//! consistent snapshot by queries, followed as a stream by views over views, and as a
//! changefeed (snapshot, then every later publish) by SUBSCRIBE.

use std::sync::{Arc, RwLock};

use async_trait::async_trait;
use datafusion::arrow::datatypes::SchemaRef;
use datafusion::arrow::record_batch::RecordBatch;
use datafusion::catalog::{Session, TableProvider};
use datafusion::common::Result;
use datafusion::datasource::memory::MemorySourceConfig;
use datafusion::datasource::TableType;
use datafusion::logical_expr::Expr;
use datafusion::physical_plan::ExecutionPlan;
use tokio::sync::{broadcast, watch};

use super::message::{ChangeBatch, Millis, NO_WATERMARK};
use super::view_rows::UpdatingRows;

#[derive(Default)]
struct Contents {
    /// An insert-only view's batches as published (followers read them by index).
    batches: Vec<RecordBatch>,
    /// An updating view's rows, changed in place by each publish.
    updating: Option<UpdatingRows>,
    rows: usize,
    bytes: usize,
    watermark: Option<Millis>,
    ended: bool,
}

/// Publishes a changefeed subscriber may fall behind by before it is dropped: the view's
/// job never waits for a subscriber, so a slow one cannot hold everything back.
pub const FEED_CAPACITY: usize = 128;

/// One publish, as changefeed subscribers receive it.
#[derive(Debug)]
pub struct Changes {
    pub changes: Vec<ChangeBatch>,
    /// The view's input ended with this publish: nothing follows.
    pub ended: bool,
}

/// Contents: an insert-only view appends at every publish, so a follower's position is a
/// batch index; an updating view changes its rows in place and is read as a snapshot.
pub struct MvState {
    schema: SchemaRef,
    /// Its rows change after they are published (retractions): views over it cannot
    /// follow it as an insert-only stream.
    pub updating: bool,
    /// False for a subscription's private state: only its changefeed is read, so
    /// keeping (and rebuilding) the rows would cost memory and time for nothing.
    keep_contents: bool,
    contents: RwLock<Contents>,
    version: watch::Sender<u64>,
    feed: broadcast::Sender<Arc<Changes>>,
}

/// What a changefeed subscriber starts from: the rows as of one publish, and a receiver
/// of exactly the publishes after it.
pub struct Followed {
    pub snapshot: Vec<RecordBatch>,
    pub changes: broadcast::Receiver<Arc<Changes>>,
    pub ended: bool,
}

/// What a follower reads past its position.
pub struct Published {
    pub batches: Vec<RecordBatch>,
    pub next: usize,
    pub watermark: Millis,
    pub ended: bool,
}

impl MvState {
    pub fn new(schema: SchemaRef, updating: bool) -> Arc<Self> {
        Arc::new(Self {
            schema,
            updating,
            keep_contents: true,
            contents: RwLock::default(),
            version: watch::Sender::new(0),
            feed: broadcast::Sender::new(FEED_CAPACITY),
        })
    }

    /// A state that only feeds subscribers (SUBSCRIBE TO (SELECT ...)): no snapshot.
    pub fn feed_only(schema: SchemaRef) -> Arc<Self> {
        Arc::new(Self {
            schema,
            updating: true,
            keep_contents: false,
            contents: RwLock::default(),
            version: watch::Sender::new(0),
            feed: broadcast::Sender::new(FEED_CAPACITY),
        })
    }

    pub fn schema(&self) -> SchemaRef {
        self.schema.clone()
    }

    /// Makes `changes` visible, all at once, with the watermark they are complete up to.
    pub fn publish(
        &self,
        changes: Vec<ChangeBatch>,
        watermark: Millis,
        ended: bool,
    ) -> datafusion::common::Result<()> {
        let changes: Vec<ChangeBatch> = changes.into_iter().filter(|c| c.num_rows() > 0).collect();
        {
            let mut c = self.contents.write().unwrap_or_else(|p| p.into_inner());
            // Sent under the lock that `follow` reads the snapshot under: a subscriber
            // gets each publish either in its snapshot or on its receiver, never both.
            if (!changes.is_empty() || ended) && self.feed.receiver_count() > 0 {
                let _ = self.feed.send(Arc::new(Changes {
                    changes: changes.clone(),
                    ended,
                }));
            }
            if self.keep_contents && self.updating {
                let rows = match &mut c.updating {
                    Some(rows) => rows,
                    None => c.updating.insert(UpdatingRows::new(&self.schema)?),
                };
                rows.apply(&changes)?;
                (c.rows, c.bytes) = (rows.rows(), rows.bytes());
            } else if self.keep_contents {
                let current = std::mem::take(&mut c.batches);
                c.batches = super::changelog::apply(&self.schema, current, changes)?;
                c.rows = c.batches.iter().map(|b| b.num_rows()).sum();
                c.bytes = c.batches.iter().map(|b| b.get_array_memory_size()).sum();
            }
            c.watermark = Some(watermark.max(c.watermark.unwrap_or(NO_WATERMARK)));
            c.ended |= ended;
        }
        self.version.send_modify(|v| *v += 1);
        Ok(())
    }

    /// Forgets everything (the view's job restarts from the beginning).
    pub fn reset(&self) {
        *self.contents.write().unwrap_or_else(|p| p.into_inner()) = Contents::default();
        self.version.send_modify(|v| *v += 1);
    }

    pub fn snapshot(&self) -> Result<Vec<RecordBatch>> {
        // Readers share the lock unless an updating view's rows must be turned into
        // batches first.
        let c = self.contents.read().unwrap_or_else(|p| p.into_inner());
        if let Some(rows) = c.ready_rows() {
            return Ok(rows);
        }
        drop(c);
        self.contents
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .rows()
    }

    pub fn size(&self) -> (usize, usize) {
        let c = self.contents.read().unwrap_or_else(|p| p.into_inner());
        (c.rows, c.bytes)
    }

    pub fn read_from(&self, position: usize) -> Published {
        let c = self.contents.read().unwrap_or_else(|p| p.into_inner());
        Published {
            batches: c.batches.get(position..).unwrap_or_default().to_vec(),
            next: c.batches.len(),
            watermark: c.watermark.unwrap_or(NO_WATERMARK),
            ended: c.ended,
        }
    }

    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.version.subscribe()
    }

    /// Starts following the changefeed: the current rows and every publish after them.
    pub fn follow(&self) -> Result<Followed> {
        let mut c = self.contents.write().unwrap_or_else(|p| p.into_inner());
        Ok(Followed {
            snapshot: c.rows()?,
            changes: self.feed.subscribe(),
            ended: c.ended,
        })
    }
}

impl Contents {
    /// The view's rows as batches, if they need no building.
    fn ready_rows(&self) -> Option<Vec<RecordBatch>> {
        match &self.updating {
            Some(rows) => rows.built(),
            None => Some(self.batches.clone()),
        }
    }

    /// The view's rows as batches.
    fn rows(&mut self) -> Result<Vec<RecordBatch>> {
        match &mut self.updating {
            Some(rows) => rows.batches(),
            None => Ok(self.batches.clone()),
        }
    }
}

impl std::fmt::Debug for MvState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MvState")
            .field("schema", &self.schema)
            .field("updating", &self.updating)
            .finish_non_exhaustive()
    }
}

/// A materialized view as DataFusion reads it: its current snapshot.
#[derive(Debug)]
pub struct MvTable {
    pub state: Arc<MvState>,
}

#[async_trait]
impl TableProvider for MvTable {
    fn schema(&self) -> SchemaRef {
        self.state.schema()
    }

    fn table_type(&self) -> TableType {
        TableType::View
    }

    async fn scan(
        &self,
        _state: &dyn Session,
        projection: Option<&Vec<usize>>,
        _filters: &[Expr],
        _limit: Option<usize>,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        Ok(MemorySourceConfig::try_new_exec(
            &[self.state.snapshot()?],
            self.state.schema(),
            projection.cloned(),
        )?)
    }
}
