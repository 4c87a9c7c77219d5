//! How a session aggregate keeps a key's sessions on disk under the sled backend: one
//! record per key (the watermark that brings the key back, then each session's changed
//! mark, row and emitted row), and how records are read back into the batches an
//! in-memory snapshot holds.

use std::sync::Arc;

use datafusion::arrow::array::{ArrayRef, AsArray, Int64Array, RecordBatch};
use datafusion::arrow::datatypes::{DataType, Int64Type, SchemaRef};
use datafusion::arrow::row::{RowConverter, SortField};
use datafusion::common::{DataFusionError, Result};

use super::{CHANGED_SESSION, CHANGED_SESSIONS, SESSIONS};
use crate::stream::message::Millis;
use crate::stream::operator::StateReader;
use crate::stream::ops::grouped::AggregateCalls;
use crate::stream::snapshot;
use crate::stream::state_backend::runs::FrozenEntries;

/// Sessions per `sessions` batch of a snapshot's part on disk.
const SNAPSHOT_SESSIONS: usize = 8192;

/// How a key's sessions are written on disk: the place on the due list, then per session
/// whether it changed since the previous snapshot (a byte), its row (start, end, each
/// call's state columns) and its emitted row, if any, each behind its length.
pub(super) struct Codec {
    keys: RowConverter,
    pub(super) sessions: RowConverter,
    pub(super) emitted: RowConverter,
    output: SchemaRef,
    /// The state columns of each call, in order.
    pub(super) state_types: Vec<Vec<DataType>>,
}

/// Session rows decoded, a session an element: bounds and each call's state columns.
pub(super) struct Decoded {
    pub(super) starts: Vec<Millis>,
    pub(super) ends: Vec<Millis>,
    pub(super) states: Vec<Vec<ArrayRef>>,
}

/// A key's record read back: its place on the due list and its sessions.
pub(super) struct Record<'a> {
    pub(super) due: Millis,
    pub(super) sessions: Vec<StoredSession<'a>>,
}

/// A session as a key's record holds it.
pub(super) struct StoredSession<'a> {
    pub(super) changed: bool,
    pub(super) row: &'a [u8],
    pub(super) emitted: Option<&'a [u8]>,
}

impl Codec {
    pub(super) fn new(calls: &AggregateCalls, output: SchemaRef) -> Result<Option<Self>> {
        let state_types: Vec<Vec<DataType>> = calls
            .aggregates
            .iter()
            .map(|a| {
                let fields = a.state_fields()?;
                Ok(fields.iter().map(|f| f.data_type().clone()).collect())
            })
            .collect::<Result<_>>()?;
        let mut sessions = vec![
            SortField::new(DataType::Int64),
            SortField::new(DataType::Int64),
        ];
        sessions.extend(state_types.iter().flatten().cloned().map(SortField::new));
        let emitted: Vec<SortField> = output
            .fields()
            .iter()
            .map(|f| SortField::new(f.data_type().clone()))
            .collect();
        let supported = [&sessions, &emitted]
            .iter()
            .all(|fields| RowConverter::supports_fields(fields));
        if !supported {
            return Ok(None);
        }
        Ok(Some(Codec {
            // The operator's own encoding of keys, which records are keyed by.
            keys: crate::stream::row_converter(calls.key_schema.fields())?,
            sessions: RowConverter::new(sessions)?,
            emitted: RowConverter::new(emitted)?,
            output,
            state_types,
        }))
    }

    /// A key's record: `due`, then each session's row and emitted row.
    pub(super) fn record<'a>(
        due: Millis,
        sessions: impl Iterator<Item = StoredSession<'a>>,
    ) -> Vec<u8> {
        let mut out = due.to_le_bytes().to_vec();
        for session in sessions {
            out.push(session.changed as u8);
            for part in [session.row, session.emitted.unwrap_or_default()] {
                out.extend_from_slice(&(part.len() as u32).to_le_bytes());
                out.extend_from_slice(part);
            }
        }
        out
    }

    pub(super) fn parse(record: &[u8]) -> Result<Record<'_>> {
        let corrupt = || DataFusionError::Internal("a session record on disk is cut short".into());
        let bytes = |from: usize, len: usize| record.get(from..from + len).ok_or_else(corrupt);
        let due = Millis::from_le_bytes(bytes(0, 8)?.try_into().expect("8 bytes"));
        let mut at = 8;
        let part = |at: &mut usize| -> Result<&[u8]> {
            let len = u32::from_le_bytes(bytes(*at, 4)?.try_into().expect("4 bytes")) as usize;
            let part = bytes(*at + 4, len)?;
            *at += 4 + len;
            Ok(part)
        };
        let mut sessions = Vec::new();
        while at < record.len() {
            let changed = bytes(at, 1)?[0] != 0;
            at += 1;
            let row = part(&mut at)?;
            // An emitted row is never empty: it has the output's columns.
            let emitted = Some(part(&mut at)?).filter(|e| !e.is_empty());
            sessions.push(StoredSession {
                changed,
                row,
                emitted,
            });
        }
        Ok(Record { due, sessions })
    }

    pub(super) fn decode_sessions<'a>(
        &self,
        rows: impl IntoIterator<Item = &'a [u8]>,
    ) -> Result<Decoded> {
        let parser = self.sessions.parser();
        let columns = self
            .sessions
            .convert_rows(rows.into_iter().map(|r| parser.parse(r)))?;
        let bound = |c: &ArrayRef| c.as_primitive::<Int64Type>().values().to_vec();
        let (starts, ends) = (bound(&columns[0]), bound(&columns[1]));
        let mut states = Vec::with_capacity(self.state_types.len());
        let mut at = 2;
        for types in &self.state_types {
            states.push(columns[at..at + types.len()].to_vec());
            at += types.len();
        }
        Ok(Decoded {
            starts,
            ends,
            states,
        })
    }

    /// A batch of emitted rows decoded.
    pub(super) fn decode_emitted(&self, rows: &[&[u8]]) -> Result<RecordBatch> {
        let parser = self.emitted.parser();
        let columns = self
            .emitted
            .convert_rows(rows.iter().map(|r| parser.parse(r)))?;
        crate::stream::batch_of(self.output.clone(), columns, rows.len())
    }

    pub(super) fn decode_keys(&self, keys: &[&[u8]]) -> Result<Vec<ArrayRef>> {
        let parser = self.keys.parser();
        Ok(self
            .keys
            .convert_rows(keys.iter().map(|k| parser.parse(k)))?)
    }
}

/// Sessions on disk as they are now (`entries`), read later off the task into the batches
/// an in-memory snapshot holds: of a whole snapshot, or of the snapshot of changes
/// numbered `changes`. Sessions kept for an allowed lateness each get a batch of their own
/// followed by their emitted rows.
pub(super) fn snapshot_reader(
    entries: FrozenEntries,
    codec: Arc<Codec>,
    changes: Option<i64>,
) -> StateReader {
    Box::new(move |out| {
        // Sessions without emitted rows, gathered: (key, session row).
        let mut plain: Vec<(Vec<u8>, Vec<u8>)> = Vec::new();
        let flush = |plain: &mut Vec<(Vec<u8>, Vec<u8>)>,
                     out: &mut dyn FnMut(RecordBatch) -> Result<()>|
         -> Result<()> {
            let keys: Vec<&[u8]> = plain.iter().map(|(k, _)| k.as_slice()).collect();
            let rows = plain.iter().map(|(_, r)| r.as_slice());
            let Decoded {
                starts,
                ends,
                states,
            } = codec.decode_sessions(rows)?;
            let n = starts.len();
            let mut columns: Vec<ArrayRef> = vec![
                Arc::new(Int64Array::from(starts)),
                Arc::new(Int64Array::from(ends)),
            ];
            let kind = match changes {
                Some(number) => {
                    columns.push(Arc::new(Int64Array::from(vec![number; n])));
                    CHANGED_SESSIONS
                }
                None => SESSIONS,
            };
            columns.extend(codec.decode_keys(&keys)?);
            columns.extend(states.into_iter().flatten());
            plain.clear();
            out(snapshot::batch(kind, &[], columns)?)
        };
        entries.for_each(&mut |key, record| {
            let record = Codec::parse(record)?;
            for StoredSession { row, emitted, .. } in record.sessions {
                let Some(emitted) = emitted else {
                    plain.push((key.to_vec(), row.to_vec()));
                    if plain.len() == SNAPSHOT_SESSIONS {
                        flush(&mut plain, out)?;
                    }
                    continue;
                };
                let one = codec.decode_sessions([row])?;
                let mut columns = codec.decode_keys(&[key])?;
                columns.extend(one.states.into_iter().flatten());
                let (start, end) = (one.starts[0], one.ends[0]);
                out(match changes {
                    Some(number) => {
                        snapshot::batch(CHANGED_SESSION, &[start, end, number], columns)?
                    }
                    None => snapshot::batch("session", &[start, end], columns)?,
                })?;
                let rows = codec.decode_emitted(&[emitted])?;
                out(super::emitted_batch(&rows)?)?;
            }
            Ok(())
        })?;
        if !plain.is_empty() {
            flush(&mut plain, out)?;
        }
        Ok(())
    })
}
