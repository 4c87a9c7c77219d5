//! Sink subtasks: where a job's rows end up. A view, a log table or a filesystem sink
//! holds an epoch's rows back until the epoch commits (readers see whole committed
//! epochs); other connectors write at once and flush at barriers.

use datafusion::common::{DataFusionError, Result};

use super::checkpoint::Precommit;
use super::graph::SinkKind;
use super::latency::LatencyColumn;
use super::message::{ChangeBatch, Millis};
use crate::connector::io::SinkWriter;

pub struct Sink {
    kind: SinkKind,
    pending: Vec<ChangeBatch>,
    writer: Option<Box<dyn SinkWriter>>,
    latency: Option<LatencyColumn>,
}

impl Sink {
    pub fn open(kind: &SinkKind, subtask: usize, job: &str) -> Result<Self> {
        let to_df = |e| DataFusionError::External(Box::new(e));
        let latency = match kind {
            SinkKind::Connector(def) => LatencyColumn::of(def).map_err(to_df)?,
            _ => None,
        };
        let writer = match kind {
            SinkKind::Connector(def) => {
                Some(crate::connector::factory::open_sink(def, subtask, job).map_err(to_df)?)
            }
            _ => None,
        };
        Ok(Self {
            kind: kind.clone(),
            pending: Vec::new(),
            writer,
            latency,
        })
    }

    /// The column whose time the rows' latency is measured from, if the table names one.
    pub fn latency_column(&self) -> Option<LatencyColumn> {
        self.latency
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

    /// What this subtask took since the last barrier, held back until the epoch commits
    /// (the job's coordinator then publishes it).
    pub async fn precommit(&mut self, watermark: Millis, ended: bool) -> Result<Option<Precommit>> {
        let changes = std::mem::take(&mut self.pending);
        match (&self.kind, &mut self.writer) {
            (SinkKind::View(_) | SinkKind::Log(_), _) => Ok(Some(Precommit::Changes {
                changes,
                watermark,
                ended,
            })),
            (_, Some(writer)) => writer.precommit().await,
            _ => Ok(None),
        }
    }
}
