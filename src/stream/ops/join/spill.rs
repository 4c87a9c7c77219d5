//! A join's rows under the sled state backend. Each input keeps up to its memory budget
//! of entries in its [`Side`](super::side::Side); beyond it, the entries of keys not used
//! since the previous look go to a sled tree (of all keys, when that is not enough), one
//! record per entry under its join key and serial. Before a batch runs, the entries of
//! the keys it probes, and of those whose rows it may find again, come back, so the join
//! itself only ever sees entries in memory. An insert-only input that never looks for its
//! own rows adds to a key without bringing the key's spilled entries back.
//!
//! A record keeps what snapshots need (an entry's row, figures and serial), so snapshots
//! read spilled entries straight from sled: incremental ones those listed as changed
//! since the previous snapshot when they were moved, whole ones all.

use std::collections::HashSet;
use std::sync::Arc;

use datafusion::arrow::array::{ArrayRef, Int64Array};
use datafusion::arrow::datatypes::SchemaRef;
use datafusion::arrow::record_batch::RecordBatch;
use datafusion::arrow::row::{RowConverter, SortField};
use datafusion::common::{DataFusionError, Result};

use super::side::{EntryId, LoadedRow, Serial};
use super::{Encoded, StreamJoin};
use crate::stream::message::Millis;
use crate::stream::state_backend::{sled_error, SledBackend};

/// Keys moved or read per group, so no group of rows gets big.
const GROUP_KEYS: usize = 4096;
/// Entries per batch of a snapshot's spilled part.
const SNAPSHOT_ROWS: usize = 8192;

pub(super) struct Spill {
    /// Holds the database open (and deletes it when the join goes).
    _db: sled::Db,
    trees: [sled::Tree; 2],
    /// Bytes each input keeps in memory.
    memory: usize,
    /// Whole rows of each input, as stored in records.
    rows: [RowConverter; 2],
    /// Record keys of spilled entries changed since the previous snapshot (sled only
    /// holds what does not change until an entry comes back).
    changed: [HashSet<Vec<u8>>; 2],
    /// Bytes of records in each tree.
    bytes: [usize; 2],
}

/// The record key of an entry: its join key's length and bytes (so that one key's
/// entries are a prefix range no other key shares), then its serial.
fn record_key(key: &[u8], serial: Serial) -> Vec<u8> {
    let mut out = key_prefix(key);
    out.extend_from_slice(&serial.0.to_be_bytes());
    out.extend_from_slice(&serial.1.to_be_bytes());
    out
}

fn key_prefix(key: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(4 + key.len() + 16);
    out.extend_from_slice(&(key.len() as u32).to_be_bytes());
    out.extend_from_slice(key);
    out
}

/// One spilled entry.
struct Record<'a> {
    key: &'a [u8],
    serial: Serial,
    count: u32,
    matches: i64,
    touched: Millis,
    time: Millis,
    row: &'a [u8],
}

/// Count, matches, touched, time; the row follows.
const FIGURES: usize = 4 + 8 * 3;

fn corrupt() -> DataFusionError {
    DataFusionError::Internal("a corrupt sled state backend record".into())
}

impl<'a> Record<'a> {
    fn value(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(FIGURES + self.row.len());
        out.extend_from_slice(&self.count.to_le_bytes());
        for v in [self.matches, self.touched, self.time] {
            out.extend_from_slice(&v.to_le_bytes());
        }
        out.extend_from_slice(self.row);
        out
    }

    fn parse(record_key: &'a [u8], value: &'a [u8]) -> Result<Self> {
        let len = u32::from_be_bytes(record_key.get(..4).ok_or_else(corrupt)?.try_into().unwrap())
            as usize;
        if record_key.len() != 4 + len + 16 || value.len() < FIGURES {
            return Err(corrupt());
        }
        let u64_at = |b: &[u8], at: usize| u64::from_le_bytes(b[at..at + 8].try_into().unwrap());
        let serial_at = |at: usize| u64::from_be_bytes(record_key[at..at + 8].try_into().unwrap());
        Ok(Record {
            key: &record_key[4..4 + len],
            serial: (serial_at(4 + len), serial_at(12 + len)),
            count: u32::from_le_bytes(value[..4].try_into().unwrap()),
            matches: u64_at(value, 4) as i64,
            touched: u64_at(value, 12) as i64,
            time: u64_at(value, 20) as i64,
            row: &value[FIGURES..],
        })
    }
}

impl Spill {
    /// The spill of a join over `inputs`, or none when an input has no columns to store.
    pub(super) fn open(backend: &SledBackend, inputs: &[SchemaRef; 2]) -> Result<Option<Self>> {
        if inputs.iter().any(|s| s.fields().is_empty()) {
            return Ok(None);
        }
        let converter = |s: &SchemaRef| {
            RowConverter::new(
                s.fields()
                    .iter()
                    .map(|f| SortField::new(f.data_type().clone()))
                    .collect(),
            )
        };
        let db = backend.open_scratch()?;
        let tree = |name: &str| db.open_tree(name).map_err(sled_error);
        Ok(Some(Self {
            trees: [tree("left")?, tree("right")?],
            _db: db,
            memory: backend.memory,
            rows: [converter(&inputs[0])?, converter(&inputs[1])?],
            changed: [HashSet::new(), HashSet::new()],
            bytes: [0, 0],
        }))
    }

    pub(super) fn bytes(&self) -> usize {
        self.bytes[0] + self.bytes[1]
    }

    /// Entries of each input in sled.
    #[cfg(test)]
    pub(super) fn records(&self) -> [usize; 2] {
        [self.trees[0].len(), self.trees[1].len()]
    }

    /// The spilled records `group` of input `s` as a snapshot batch: rows, then the
    /// figures of [`StreamJoin::side_batch`].
    fn snapshot_batch(&self, s: usize, group: &[(sled::IVec, sled::IVec)]) -> Result<RecordBatch> {
        let records = group
            .iter()
            .map(|(key, value)| Record::parse(key, value))
            .collect::<Result<Vec<_>>>()?;
        let parser = self.rows[s].parser();
        let mut columns = self.rows[s].convert_rows(records.iter().map(|r| parser.parse(r.row)))?;
        let figure = |f: &dyn Fn(&Record) -> i64| -> ArrayRef {
            Arc::new(Int64Array::from_iter_values(records.iter().map(f)))
        };
        columns.push(figure(&|r| r.count as i64));
        columns.push(figure(&|r| r.matches));
        columns.push(figure(&|r| r.touched));
        columns.push(figure(&|r| r.time));
        columns.push(figure(&|r| r.serial.0 as i64));
        columns.push(figure(&|r| r.serial.1 as i64));
        crate::stream::snapshot::batch(super::checkpoint::SIDE_KINDS[s], &[], columns)
    }
}

impl StreamJoin {
    /// Brings back input `s`'s spilled entries of the keys of `keys`' `n` rows.
    pub(super) fn bring_back_rows(&mut self, s: usize, keys: &Encoded, n: usize) -> Result<()> {
        if self.spill.is_none() {
            return Ok(());
        }
        let mut seen: HashSet<&[u8]> = HashSet::new();
        let wanted: Vec<&[u8]> = (0..n)
            .map(|i| keys.get(i))
            .filter(|k| seen.insert(k))
            .collect();
        self.bring_back(s, &wanted)
    }

    /// Brings input `s`'s spilled entries of `keys` (distinct) back into memory.
    fn bring_back<K: AsRef<[u8]>>(&mut self, s: usize, keys: &[K]) -> Result<()> {
        let Some(spill) = self.spill.as_mut() else {
            return Ok(());
        };
        let side = &mut self.sides[s];
        let mut found = Vec::new();
        for key in keys {
            let key = key.as_ref();
            side.use_key(key);
            for item in spill.trees[s].scan_prefix(key_prefix(key)) {
                found.push(item.map_err(sled_error)?);
            }
        }
        if found.is_empty() {
            return Ok(());
        }
        let mut taken = sled::Batch::default();
        let mut records = Vec::with_capacity(found.len());
        let mut changed = Vec::with_capacity(found.len());
        for (key, value) in &found {
            spill.bytes[s] -= key.len() + value.len();
            changed.push(spill.changed[s].remove(key.as_ref()));
            taken.remove(key);
            records.push(Record::parse(key, value)?);
        }
        spill.trees[s].apply_batch(taken).map_err(sled_error)?;
        let parser = spill.rows[s].parser();
        let columns = spill.rows[s].convert_rows(records.iter().map(|r| parser.parse(r.row)))?;
        let rows = crate::stream::batch_of(self.spec.inputs[s].clone(), columns, records.len())?;
        let full = Encoded::new(&self.rows[s], rows.columns())?;
        let chunk = side.push_chunk(rows);
        for (i, r) in records.iter().enumerate() {
            let row = LoadedRow {
                key: r.key,
                full: full.get(i),
                loc: (chunk, i as u32),
                count: r.count,
                matches: r.matches,
                times: (r.touched, r.time),
            };
            side.insert_loaded(row, r.serial, changed[i]);
        }
        side.settle()
    }

    /// Moves input `s`'s entries of `keys` from memory to sled.
    fn move_to_sled(&mut self, s: usize, keys: Vec<Arc<[u8]>>) -> Result<()> {
        let Some(spill) = self.spill.as_mut() else {
            return Ok(());
        };
        let side = &mut self.sides[s];
        for group in keys.chunks(GROUP_KEYS) {
            let ids: Vec<EntryId> = group
                .iter()
                .flat_map(|k| side.candidates(k).iter().copied())
                .collect();
            let rows = side.gather(&ids)?;
            let encoded = spill.rows[s].convert_columns(rows.columns())?;
            let mut batch = sled::Batch::default();
            for (at, &id) in ids.iter().enumerate() {
                let e = side.entry(id);
                let record = Record {
                    key: e.key(),
                    serial: side.serial(id),
                    count: e.count,
                    matches: e.matches,
                    touched: e.touched,
                    time: e.time,
                    row: encoded.row(at).data(),
                };
                let key = record_key(record.key, record.serial);
                let value = record.value();
                spill.bytes[s] += key.len() + value.len();
                if side.is_dirty(id) {
                    spill.changed[s].insert(key.clone());
                }
                batch.insert(key, value);
            }
            spill.trees[s].apply_batch(batch).map_err(sled_error)?;
            for id in ids {
                side.move_out(id);
            }
        }
        side.settle()
    }

    /// Keeps input `s` within its memory: first the keys not used since the previous
    /// look go to sled, then all of them if that leaves more than three quarters.
    pub(super) fn shed(&mut self, s: usize) -> Result<()> {
        let Some(memory) = self.spill.as_ref().map(|spill| spill.memory) else {
            return Ok(());
        };
        if self.sides[s].size() <= memory {
            return Ok(());
        }
        let unused = self.sides[s].keys_to_move(false);
        self.move_to_sled(s, unused)?;
        if self.sides[s].size() > memory / 4 * 3 {
            let all = self.sides[s].keys_to_move(true);
            self.move_to_sled(s, all)?;
        }
        Ok(())
    }

    /// The spilled entries of input `s` changed since the previous snapshot, as snapshot
    /// batches read from sled; they count as snapshotted afterwards.
    pub(super) fn changed_spilled_batches(&mut self, s: usize) -> Result<Vec<RecordBatch>> {
        let Some(spill) = self.spill.as_mut() else {
            return Ok(Vec::new());
        };
        let keys: Vec<Vec<u8>> = spill.changed[s].drain().collect();
        let mut batches = Vec::new();
        for group in keys.chunks(SNAPSHOT_ROWS) {
            let mut records = Vec::with_capacity(group.len());
            for key in group {
                if let Some(value) = spill.trees[s].get(key).map_err(sled_error)? {
                    records.push((sled::IVec::from(key.as_slice()), value));
                }
            }
            batches.push(spill.snapshot_batch(s, &records)?);
        }
        Ok(batches)
    }

    /// Every spilled entry of input `s` as snapshot batches; they all count as
    /// snapshotted afterwards.
    pub(super) fn spilled_batches(&mut self, s: usize) -> Result<Vec<RecordBatch>> {
        let Some(spill) = self.spill.as_mut() else {
            return Ok(Vec::new());
        };
        spill.changed[s].clear();
        let mut batches = Vec::new();
        let mut group = Vec::with_capacity(SNAPSHOT_ROWS);
        for item in spill.trees[s].iter() {
            group.push(item.map_err(sled_error)?);
            if group.len() == SNAPSHOT_ROWS {
                batches.push(spill.snapshot_batch(s, &group)?);
                group.clear();
            }
        }
        if !group.is_empty() {
            batches.push(spill.snapshot_batch(s, &group)?);
        }
        Ok(batches)
    }

    /// The state TTL's sweep over input `s`'s spilled entries: the keys of those not
    /// written since `deadline` come back a group at a time, lose their expired entries
    /// and go back when memory is short.
    pub(super) fn sweep_spilled(&mut self, s: usize, deadline: Millis) -> Result<()> {
        let Some(spill) = self.spill.as_ref() else {
            return Ok(());
        };
        let mut keys = Vec::new();
        for item in spill.trees[s].iter() {
            let (key, value) = item.map_err(sled_error)?;
            let record = Record::parse(&key, &value)?;
            if record.touched <= deadline && keys.last().is_none_or(|k: &Vec<u8>| k != record.key) {
                keys.push(record.key.to_vec());
            }
        }
        for group in keys.chunks(GROUP_KEYS) {
            self.bring_back(s, group)?;
            let side = &mut self.sides[s];
            for key in group {
                let expired: Vec<EntryId> = side
                    .candidates(key)
                    .iter()
                    .copied()
                    .filter(|&id| side.entry(id).touched <= deadline)
                    .collect();
                for id in expired {
                    side.remove(id);
                }
            }
            side.settle()?;
            self.shed(s)?;
        }
        Ok(())
    }
}
