//! A materialized view's contents: rows published by its job at barriers, read as a
//! consistent snapshot by queries and followed as a stream by views over views.

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
use tokio::sync::watch;

use super::message::{ChangeBatch, Millis, NO_WATERMARK};

#[derive(Debug, Default)]
struct Contents {
    batches: Vec<RecordBatch>,
    rows: usize,
    bytes: usize,
    watermark: Option<Millis>,
    ended: bool,
}

/// Contents: an insert-only view appends at every publish, so a follower's position is a
/// batch index; an updating view is rebuilt and only read as a snapshot.
#[derive(Debug)]
pub struct MvState {
    schema: SchemaRef,
    /// Its rows change after they are published (retractions): views over it cannot
    /// follow it as an insert-only stream.
    pub updating: bool,
    contents: RwLock<Contents>,
    version: watch::Sender<u64>,
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
            contents: RwLock::default(),
            version: watch::Sender::new(0),
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
        {
            let mut c = self.contents.write().unwrap_or_else(|p| p.into_inner());
            let current = std::mem::take(&mut c.batches);
            c.batches = super::changelog::apply(&self.schema, current, changes)?;
            c.rows = c.batches.iter().map(|b| b.num_rows()).sum();
            c.bytes = c.batches.iter().map(|b| b.get_array_memory_size()).sum();
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

    pub fn snapshot(&self) -> Vec<RecordBatch> {
        self.contents
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .batches
            .clone()
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
            &[self.state.snapshot()],
            self.state.schema(),
            projection.cloned(),
        )?)
    }
}
