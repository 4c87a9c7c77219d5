//! Sink subtasks: where a job's rows end up. Rows become visible at barriers (one epoch
//! at a time, so readers see whole epochs) and at the end of the input.

use std::sync::Arc;

use datafusion::common::{DataFusionError, Result};
use weir_catalog::Catalog;

use super::graph::SinkKind;
use super::message::{ChangeBatch, Millis};
use crate::connector::io::SinkWriter;

pub struct Sink {
    kind: SinkKind,
    catalog: Arc<Catalog>,
    pending: Vec<ChangeBatch>,
    writer: Option<Box<dyn SinkWriter>>,
}

impl Sink {
    pub fn open(
        kind: &SinkKind,
        catalog: &Arc<Catalog>,
        subtask: usize,
        job: &str,
    ) -> Result<Self> {
        let writer = match kind {
            SinkKind::Connector(def) => Some(
                crate::connector::factory::open_sink(def, subtask, job)
                    .map_err(|e| DataFusionError::External(Box::new(e)))?,
            ),
            _ => None,
        };
        Ok(Self {
            kind: kind.clone(),
            catalog: catalog.clone(),
            pending: Vec::new(),
            writer,
        })
    }

    pub async fn write(&mut self, batch: ChangeBatch) -> Result<()> {
        match (&self.kind, &mut self.writer) {
            (SinkKind::Collect(tx), _) => tx
                .send(Ok(batch))
                .await
                .map_err(|_| DataFusionError::Execution("the query was cancelled".into())),
            (_, Some(writer)) => writer.write_changes(batch).await,
            _ => {
                self.pending.push(batch);
                Ok(())
            }
        }
    }

    /// Publishes everything written since the last commit.
    pub async fn commit(&mut self, watermark: Millis, ended: bool) -> Result<()> {
        let pending = std::mem::take(&mut self.pending);
        match (&self.kind, &mut self.writer) {
            (SinkKind::View(state), _) => state.publish(pending, watermark, ended)?,
            (SinkKind::Log(def), _) if !pending.is_empty() => {
                crate::connector::log_table::append_changes(self.catalog.table_log(), def, pending)
                    .await?
            }
            (_, Some(writer)) => writer.flush().await?,
            _ => {}
        }
        Ok(())
    }
}
