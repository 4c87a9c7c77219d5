//! Checkpoints: what every task of a job hands its coordinator at a barrier (operator
//! state, a source's position, a sink's output waiting for the epoch to commit), how that
//! is stored, and how a restarted job gets it back.

pub mod beyond_memory;
pub mod chunks;
pub mod coordinator;
pub(crate) mod frame;
pub mod rescale;
pub mod snapshot_cost;
pub mod store;
pub mod view_feed;

use std::path::PathBuf;
use std::sync::Arc;

use datafusion::arrow::record_batch::RecordBatch;
use datafusion::common::{DataFusionError, Result};

use super::exchange::Tagged;
use super::graph::StreamGraph;
use super::message::{ChangeBatch, Epoch, Message, Millis};
pub use chunks::StatePart;
use frame::{FrameReader, FrameWriter};

/// What a graph's checkpoints fit: its nodes, what each does, how they are connected and
/// their columns. A checkpoint is only restored into a graph with the same fingerprint;
/// parallelism is not part of it (a checkpoint is redistributed to another one).
pub fn fingerprint(graph: &StreamGraph) -> String {
    graph
        .nodes
        .iter()
        .map(|n| {
            let columns: Vec<String> = n
                .schema
                .fields()
                .iter()
                .map(|f| format!("{} {}", f.name(), f.data_type()))
                .collect();
            let inputs: Vec<String> = n
                .inputs
                .iter()
                .map(|e| format!("{} {}", e.from, e.exchange.describe()))
                .collect();
            format!(
                "{} [{}] <- [{}] ({})",
                n.name,
                n.detail,
                inputs.join(", "),
                columns.join(", ")
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// The checkpoint a job restarts from.
pub struct Restored {
    pub epoch: Epoch,
    /// In task order.
    pub tasks: Vec<TaskSnapshot>,
    /// A view's changes stored since its base.
    pub view_log: coordinator::ViewLog,
}

/// Where a source subtask was at a barrier.
#[derive(Debug, Clone)]
pub struct SourcePosition {
    /// The reader's opaque position.
    pub position: Vec<u8>,
    pub watermark: Millis,
}

/// A sink subtask's output for an epoch, made visible only once the epoch commits
/// (two-phase commit: this is the pre-commit).
#[derive(Debug, Clone)]
pub enum Precommit {
    /// Rows for a materialized view or a table in Weir's log.
    Changes {
        changes: Vec<ChangeBatch>,
        watermark: Millis,
        ended: bool,
    },
    /// Finished hidden files, each renamed to its visible name at the commit.
    Files(Vec<(PathBuf, PathBuf)>),
    /// Rows a sink subtask leaves to the job's [`crate::connector::io::EpochWriter`].
    Rows(crate::connector::io::SinkRows),
}

impl Precommit {
    /// What is left to commit once this was committed: nothing.
    pub fn committed(&self) -> Self {
        match self {
            Precommit::Changes {
                watermark, ended, ..
            } => Precommit::Changes {
                changes: vec![],
                watermark: *watermark,
                ended: *ended,
            },
            Precommit::Files(_) => Precommit::Files(vec![]),
            Precommit::Rows(r) => Precommit::Rows(r.committed()),
        }
    }
}

/// Everything one task holds at a barrier.
#[derive(Debug, Clone, Default)]
pub struct TaskSnapshot {
    /// Per operator of the task's chain, in chain order.
    pub operators: Vec<Vec<StatePart>>,
    /// Per operator: whether its batches are only what changed since this task's
    /// snapshot of the previous epoch (an incremental snapshot), else its whole state.
    pub changes: Vec<bool>,
    /// The watermark of each input channel, so rows after a restore meet the watermarks
    /// they would have met without the interruption.
    pub inputs: Vec<Millis>,
    /// Unaligned checkpoints: messages that came on channels after the barrier came on
    /// another one and before their own (delivered again first after a restore).
    pub in_flight: Vec<Tagged>,
    pub source: Option<SourcePosition>,
    pub sink: Option<Precommit>,
    /// Rows its operators dropped as late in this epoch, for the late-data table.
    pub late: Vec<RecordBatch>,
}

/// Format 4 adds the late rows; 3 has state parts (a batch, or a stored chunk); 2 had
/// batches only.
const FORMAT: u64 = 4;
const WITHOUT_LATE_ROWS: u64 = 3;
const BATCHES_ONLY: u64 = 2;

impl TaskSnapshot {
    pub fn encode(&self) -> Result<Vec<u8>> {
        self.clone().into_bytes()
    }

    /// Encodes the snapshot, freeing each operator batch once it is written: the state
    /// copy and its encoding are not both whole in memory at once (a big state's
    /// checkpoint otherwise needed twice its size).
    pub fn into_bytes(mut self) -> Result<Vec<u8>> {
        let mut w = FrameWriter::default();
        w.reserve(
            self.operators
                .iter()
                .flatten()
                .map(|p| p.batch().map_or(0, crate::stream::batch_bytes) + 1024)
                .sum(),
        );
        w.u64(FORMAT);
        w.u64(self.changes.len() as u64);
        for c in &self.changes {
            w.u64(*c as u64);
        }
        let operators = std::mem::take(&mut self.operators);
        w.u64(operators.len() as u64);
        for parts in operators {
            w.u64(parts.len() as u64);
            for part in parts {
                match part {
                    StatePart::Batch(b) => {
                        w.u64(0);
                        w.batch(&b)?;
                    }
                    StatePart::Stored(chunk) => {
                        if chunk.owned.is_some() {
                            return Err(DataFusionError::Internal(
                                "a chunk cut for a rescale is not stored again".into(),
                            ));
                        }
                        w.u64(1);
                        chunk.encode(&mut w);
                    }
                }
            }
        }
        w.u64(self.inputs.len() as u64);
        for i in &self.inputs {
            w.i64(*i);
        }
        w.u64(self.in_flight.len() as u64);
        for (tag, message) in &self.in_flight {
            w.u64(*tag as u64);
            encode_message(&mut w, message)?;
        }
        match &self.source {
            None => w.u64(0),
            Some(s) => {
                w.u64(1);
                w.bytes(&s.position);
                w.i64(s.watermark);
            }
        }
        match &self.sink {
            None => w.u64(0),
            Some(Precommit::Changes {
                changes,
                watermark,
                ended,
            }) => {
                w.u64(1);
                w.i64(*watermark);
                w.u64(*ended as u64);
                w.u64(changes.len() as u64);
                for c in changes {
                    w.bytes(&encode_changes(c)?);
                }
            }
            Some(Precommit::Files(files)) => {
                w.u64(2);
                w.u64(files.len() as u64);
                for (from, to) in files {
                    w.bytes(from.to_string_lossy().as_bytes());
                    w.bytes(to.to_string_lossy().as_bytes());
                }
            }
            Some(Precommit::Rows(r)) => {
                w.u64(3);
                w.u64(r.subtask as u64);
                w.u64(r.rows.len() as u64);
                for c in &r.rows {
                    w.bytes(&encode_changes(c)?);
                }
                match &r.transaction {
                    None => w.u64(0),
                    Some(t) => {
                        w.u64(1);
                        w.bytes(t.id.as_bytes());
                        w.u64(t.nonce);
                        w.u64(t.offsets.len() as u64);
                        for (p, o) in &t.offsets {
                            w.i64(*p as i64);
                            w.i64(*o);
                        }
                    }
                }
            }
        }
        w.u64(self.late.len() as u64);
        for rows in &self.late {
            w.batch(rows)?;
        }
        Ok(w.bytes)
    }

    /// The format and the operators' change marks.
    fn read_changes(r: &mut FrameReader) -> Result<(u64, Vec<bool>)> {
        let format = r.u64()?;
        if ![FORMAT, WITHOUT_LATE_ROWS, BATCHES_ONLY].contains(&format) {
            return Err(DataFusionError::Internal(
                "a stored checkpoint has a format this version does not read".into(),
            ));
        }
        let changes = (0..r.u64()?)
            .map(|_| Ok(r.u64()? != 0))
            .collect::<Result<_>>()?;
        Ok((format, changes))
    }

    /// Whether operator `k`'s entry holds only its changes.
    pub fn is_changes(&self, k: usize) -> bool {
        self.changes.get(k) == Some(&true)
    }

    /// A snapshot that names no stored chunks.
    pub fn decode(bytes: &[u8]) -> Result<Self> {
        Self::decode_at(bytes, None)
    }

    /// A snapshot stored among `at`, where its chunks are.
    pub fn decode_at(bytes: &[u8], at: Option<&store::Checkpoints>) -> Result<Self> {
        let mut r = FrameReader::new(bytes);
        let (format, changes) = Self::read_changes(&mut r)?;
        let mut operators = Vec::new();
        for _ in 0..r.u64()? {
            let mut parts = Vec::new();
            for _ in 0..r.u64()? {
                let stored = format != BATCHES_ONLY && r.u64()? == 1;
                parts.push(if stored {
                    StatePart::Stored(chunks::StoredChunk::decode(&mut r, at)?)
                } else {
                    StatePart::Batch(r.batch()?)
                });
            }
            operators.push(parts);
        }
        let inputs = (0..r.u64()?).map(|_| r.i64()).collect::<Result<Vec<_>>>()?;
        let in_flight = (0..r.u64()?)
            .map(|_| Ok((r.u64()? as u32, decode_message(&mut r)?)))
            .collect::<Result<Vec<_>>>()?;
        let source = match r.u64()? {
            0 => None,
            _ => Some(SourcePosition {
                position: r.bytes()?.to_vec(),
                watermark: r.i64()?,
            }),
        };
        let sink = match r.u64()? {
            0 => None,
            1 => {
                let watermark = r.i64()?;
                let ended = r.u64()? != 0;
                let mut changes = Vec::new();
                for _ in 0..r.u64()? {
                    changes.push(decode_changes(r.bytes()?)?);
                }
                Some(Precommit::Changes {
                    changes,
                    watermark,
                    ended,
                })
            }
            3 => {
                let subtask = r.u64()? as u32;
                let rows = (0..r.u64()?)
                    .map(|_| decode_changes(r.bytes()?))
                    .collect::<Result<Vec<_>>>()?;
                let transaction = match r.u64()? {
                    0 => None,
                    _ => Some(crate::connector::io::Transaction {
                        id: String::from_utf8_lossy(r.bytes()?).into_owned(),
                        nonce: r.u64()?,
                        offsets: (0..r.u64()?)
                            .map(|_| Ok((r.i64()? as i32, r.i64()?)))
                            .collect::<Result<Vec<_>>>()?,
                    }),
                };
                Some(Precommit::Rows(crate::connector::io::SinkRows {
                    subtask,
                    rows,
                    transaction,
                }))
            }
            _ => {
                let mut files = Vec::new();
                for _ in 0..r.u64()? {
                    let from = String::from_utf8_lossy(r.bytes()?).into_owned();
                    let to = String::from_utf8_lossy(r.bytes()?).into_owned();
                    files.push((PathBuf::from(from), PathBuf::from(to)));
                }
                Some(Precommit::Files(files))
            }
        };
        let late = match format {
            FORMAT => (0..r.u64()?)
                .map(|_| r.batch())
                .collect::<Result<Vec<_>>>()?,
            _ => vec![],
        };
        Ok(Self {
            operators,
            changes,
            in_flight,
            inputs,
            source,
            sink,
            late,
        })
    }
}

/// A message of an unaligned checkpoint's in-flight data.
fn encode_message(w: &mut FrameWriter, message: &Message) -> Result<()> {
    match message {
        Message::Data(batch) => {
            w.u64(0);
            w.bytes(&encode_changes(batch)?);
            match &batch.watermarks {
                Some(watermarks) => {
                    w.u64(1);
                    let column: datafusion::arrow::array::ArrayRef = Arc::new(watermarks.clone());
                    w.batch(&RecordBatch::try_from_iter([("w", column)])?)?;
                }
                None => w.u64(0),
            }
        }
        Message::Watermark(watermark) => {
            w.u64(1);
            w.i64(*watermark);
        }
        Message::Idle => w.u64(2),
        Message::Active => w.u64(3),
        Message::Barrier(_) | Message::End => {
            return Err(DataFusionError::Internal(
                "barriers and ends are not in-flight data".into(),
            ))
        }
    }
    Ok(())
}

fn decode_message(r: &mut FrameReader) -> Result<Message> {
    Ok(match r.u64()? {
        0 => {
            let mut batch = decode_changes(r.bytes()?)?;
            if r.u64()? == 1 {
                let watermarks = r.batch()?;
                batch.watermarks = watermarks
                    .column(0)
                    .as_any()
                    .downcast_ref::<datafusion::arrow::array::Int64Array>()
                    .cloned();
            }
            Message::Data(batch)
        }
        1 => Message::Watermark(r.i64()?),
        2 => Message::Idle,
        3 => Message::Active,
        other => {
            return Err(DataFusionError::Internal(format!(
                "a stored in-flight message of unknown kind {other}"
            )))
        }
    })
}

fn catalog_error(e: weir_catalog::CatalogError) -> DataFusionError {
    DataFusionError::External(Box::new(e))
}

/// Rows and their changes as one IPC stream (the table log's entry format).
pub fn encode_changes(c: &ChangeBatch) -> Result<Vec<u8>> {
    weir_catalog::encode_changes(&weir_catalog::Changes {
        rows: c.rows.clone(),
        ops: c.ops.clone(),
    })
    .map_err(catalog_error)
}

pub fn decode_changes(bytes: &[u8]) -> Result<ChangeBatch> {
    let (rows, ops) = weir_catalog::decode_changes(bytes).map_err(catalog_error)?;
    let mut batch = ChangeBatch::new(rows);
    batch.ops = ops;
    Ok(batch)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stream::message::{change_lines, Op};
    use crate::stream::snapshot;
    use datafusion::arrow::array::{Int64Array, StringArray};
    use datafusion::arrow::datatypes::{DataType, Field, Schema};
    use std::sync::Arc;

    fn rows() -> RecordBatch {
        RecordBatch::try_new(
            Arc::new(Schema::new(vec![
                Field::new("k", DataType::Utf8, true),
                Field::new("v", DataType::Int64, true),
            ])),
            vec![
                Arc::new(StringArray::from(vec![Some("a"), None])),
                Arc::new(Int64Array::from(vec![1, 2])),
            ],
        )
        .unwrap()
    }

    #[test]
    fn a_task_snapshot_round_trips() {
        let state = snapshot::batch("groups", &[7, -3], rows().columns().to_vec()).unwrap();
        let mut changes = ChangeBatch::with_op(rows(), Op::UpdateBefore);
        changes.ops = Some(vec![1i8, 2].into());
        let mut with_watermarks = ChangeBatch::new(rows());
        with_watermarks.watermarks = Some(vec![3i64, 4].into());
        let task = TaskSnapshot {
            operators: vec![
                vec![],
                vec![
                    StatePart::Batch(state.clone()),
                    StatePart::Batch(snapshot::progress(5, 1).unwrap()),
                ],
            ],
            changes: vec![false, true],
            in_flight: vec![
                (1, Message::Data(with_watermarks.clone())),
                (0, Message::Watermark(77)),
                (1, Message::Idle),
            ],
            inputs: vec![i64::MIN, 3],
            source: Some(SourcePosition {
                position: vec![1, 2, 3],
                watermark: -9,
            }),
            sink: Some(Precommit::Changes {
                changes: vec![changes.clone(), ChangeBatch::new(rows())],
                watermark: 42,
                ended: true,
            }),
            late: vec![rows()],
        };
        let back = TaskSnapshot::decode(&task.encode().unwrap()).unwrap();
        assert_eq!(back.late, vec![rows()]);
        let in_flight: Vec<String> = back
            .in_flight
            .iter()
            .map(|(c, m)| match m {
                Message::Data(b) => {
                    format!(
                        "{c}: {:?} {:?}",
                        change_lines(std::slice::from_ref(b)),
                        b.watermarks
                    )
                }
                other => format!("{c}: {other:?}"),
            })
            .collect();
        let expected = format!(
            "1: {:?} {:?}",
            change_lines(std::slice::from_ref(&with_watermarks)),
            with_watermarks.watermarks
        );
        assert_eq!(
            in_flight,
            [expected, "0: Watermark(77)".into(), "1: Idle".into()]
        );
        assert_eq!(back.operators[0].len(), 0);
        assert_eq!(back.changes, vec![false, true]);
        assert_eq!(back.inputs, vec![i64::MIN, 3]);
        assert_eq!(back.operators[1][0].batch(), Some(&state));
        let (kind, head, _) = snapshot::parts(back.operators[1][0].batch().unwrap(), 2).unwrap();
        assert_eq!((kind.as_str(), head), ("groups", vec![7, -3]));
        assert_eq!(back.source.as_ref().unwrap().position, vec![1, 2, 3]);
        assert_eq!(back.source.as_ref().unwrap().watermark, -9);
        let Some(Precommit::Changes {
            changes: back_changes,
            watermark: 42,
            ended: true,
        }) = back.sink
        else {
            panic!("sink pre-commit lost: {:?}", back.sink);
        };
        assert_eq!(
            change_lines(&back_changes),
            vec!["-U a,1", "+U _,2", "+I a,1", "+I _,2"]
        );

        let files = TaskSnapshot {
            sink: Some(Precommit::Files(vec![(".a.inprogress".into(), "a".into())])),
            ..Default::default()
        };
        let back = TaskSnapshot::decode(&files.encode().unwrap()).unwrap();
        assert!(
            matches!(back.sink, Some(Precommit::Files(f)) if f == vec![(PathBuf::from(".a.inprogress"), PathBuf::from("a"))])
        );
        assert!(TaskSnapshot::decode(&files.encode().unwrap()[..9]).is_err());

        // A snapshot of the format before late rows (no count at the end) still reads.
        let mut older = files.encode().unwrap();
        older.truncate(older.len() - 8);
        older[..8].copy_from_slice(&WITHOUT_LATE_ROWS.to_be_bytes());
        let back = TaskSnapshot::decode(&older).unwrap();
        assert!(matches!(back.sink, Some(Precommit::Files(f)) if f.len() == 1));
        assert!(back.late.is_empty());
    }
}
