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

use super::checkpoint::store::Checkpoints;
use super::message::{ChangeBatch, Epoch, Millis, NO_WATERMARK};
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
    /// The epoch of the view's job its latest publish committed.
    epoch: Epoch,
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
    /// The epoch of the view's job that committed them.
    pub epoch: Epoch,
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
    /// Where the view's job stores its changes per epoch, and the lineage of its
    /// checkpoints: a reader resumes from them after a restart.
    log: RwLock<Option<(Checkpoints, u64)>>,
}

/// What a changefeed subscriber starts from: the rows as of one publish, and a receiver
/// of exactly the publishes after it.
pub struct Followed {
    pub snapshot: Vec<RecordBatch>,
    pub changes: broadcast::Receiver<Arc<Changes>>,
    pub ended: bool,
    /// The epoch the snapshot is as of.
    pub epoch: Epoch,
}

/// What a reader resuming after an epoch starts from: the stored changes of the epochs
/// since, up to `epoch`, and a receiver of exactly the publishes after it.
pub struct Resumed {
    pub changes: Vec<ChangeBatch>,
    pub receiver: broadcast::Receiver<Arc<Changes>>,
    pub ended: bool,
    pub epoch: Epoch,
}

/// Why a reader cannot go on from its place in a view's changes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Unresumable {
    /// The view's checkpoints were made anew since (it was rebuilt, or started from a
    /// savepoint): epochs of another lineage.
    OtherLineage,
    /// The changes after the reader's place were folded into the view's stored rows.
    Folded,
}

impl std::fmt::Display for Unresumable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Unresumable::OtherLineage => "the view was rebuilt since, so its changes start anew",
            Unresumable::Folded => {
                "the view's changes since then were folded into its rows, as no running query \
                 needed them"
            }
        })
    }
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
            log: RwLock::default(),
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
            log: RwLock::default(),
        })
    }

    pub fn schema(&self) -> SchemaRef {
        self.schema.clone()
    }

    /// Makes `changes` visible, all at once, with the watermark they are complete up to;
    /// `epoch` is the epoch of the view's job that committed them.
    pub fn publish(
        &self,
        changes: Vec<ChangeBatch>,
        watermark: Millis,
        ended: bool,
        epoch: Epoch,
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
                    epoch,
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
            c.epoch = c.epoch.max(epoch);
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
            epoch: c.epoch,
        })
    }

    /// The epoch of the latest publish.
    pub fn published_epoch(&self) -> Epoch {
        self.contents
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .epoch
    }

    /// Tells readers where the view's job stores its changes, and their lineage.
    pub fn set_log(&self, checkpoints: Checkpoints, lineage: u64) {
        *self.log.write().unwrap_or_else(|p| p.into_inner()) = Some((checkpoints, lineage));
    }

    /// Where the view's job stores its changes, and their lineage; `None` for a view
    /// whose job keeps none (a subscription's).
    pub fn log(&self) -> Option<(Checkpoints, u64)> {
        self.log.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Whether a reader can go on after `epoch` of `lineage`: the view's checkpoints are
    /// still of that lineage and keep every change after it. If so, where they are.
    pub fn resumable(
        &self,
        lineage: u64,
        epoch: Epoch,
    ) -> Result<std::result::Result<Checkpoints, Unresumable>> {
        let Some((log, current)) = self.log() else {
            return Ok(Err(Unresumable::OtherLineage));
        };
        if current != lineage {
            return Ok(Err(Unresumable::OtherLineage));
        }
        Ok(if log.changes_kept_after()? > epoch {
            Err(Unresumable::Folded)
        } else {
            Ok(log)
        })
    }

    /// Goes on following the changefeed after `epoch` of `lineage`: the stored changes of
    /// the epochs since and every publish after them.
    pub fn resume(
        &self,
        lineage: u64,
        epoch: Epoch,
    ) -> Result<std::result::Result<Resumed, Unresumable>> {
        let log = match self.resumable(lineage, epoch)? {
            Ok(log) => log,
            Err(why) => return Ok(Err(why)),
        };
        // Subscribed before the store is read: every publish up to `upto` was stored
        // before it was published, every later one arrives on the receiver.
        let (receiver, upto, ended) = {
            let c = self.contents.read().unwrap_or_else(|p| p.into_inner());
            (self.feed.subscribe(), c.epoch, c.ended)
        };
        Ok(match log.view_changes_kept(epoch, upto)? {
            Some(changes) => Ok(Resumed {
                changes,
                receiver,
                ended,
                epoch: upto.max(epoch),
            }),
            None => Err(Unresumable::Folded),
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
