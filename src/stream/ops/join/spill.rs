//! A join's rows under the sled state backend. Each input keeps up to its memory budget
//! of entries in its [`Side`]; beyond it, keys not used since the previous look go to a
//! sled tree (all keys, when that is not enough), one record per join key holding every
//! entry of the key. A batch brings back the keys it probes or changes before it runs,
//! so the join itself only ever sees entries in memory, and a key is never in both.
//!
//! A record keeps what snapshots need: an entry's figures, serial and whether it changed
//! since the previous snapshot. Incremental snapshots bring changed keys back first;
//! whole snapshots read the spilled keys straight from sled.

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
/// Entries per batch of a whole snapshot's spilled part.
const SNAPSHOT_ROWS: usize = 8192;

pub(super) struct Spill {
    /// Holds the database open (and deletes it when the join goes).
    _db: sled::Db,
    trees: [sled::Tree; 2],
    /// Bytes each input keeps in memory.
    memory: usize,
    /// Whole rows of each input, as stored in records.
    rows: [RowConverter; 2],
    /// Spilled keys with entries changed since the previous snapshot.
    changed: [HashSet<Vec<u8>>; 2],
    /// Bytes of records in each tree.
    bytes: [usize; 2],
}

/// One entry of a record.
struct Record<'a> {
    count: u32,
    matches: i64,
    touched: Millis,
    time: Millis,
    serial: Serial,
    dirty: bool,
    row: &'a [u8],
}

const FIXED: usize = 4 + 8 * 5 + 1 + 4;

impl Record<'_> {
    fn write(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.count.to_le_bytes());
        for v in [self.matches, self.touched, self.time] {
            out.extend_from_slice(&v.to_le_bytes());
        }
        out.extend_from_slice(&self.serial.0.to_le_bytes());
        out.extend_from_slice(&self.serial.1.to_le_bytes());
        out.push(self.dirty as u8);
        out.extend_from_slice(&(self.row.len() as u32).to_le_bytes());
        out.extend_from_slice(self.row);
    }

    /// The entries of a record value.
    fn parse_all(mut value: &[u8]) -> Result<Vec<Record<'_>>> {
        let corrupt = || DataFusionError::Internal("a corrupt sled state backend record".into());
        let mut records = Vec::new();
        while !value.is_empty() {
            if value.len() < FIXED {
                return Err(corrupt());
            }
            let u64_at = |at: usize| u64::from_le_bytes(value[at..at + 8].try_into().unwrap());
            let len = u32::from_le_bytes(value[FIXED - 4..FIXED].try_into().unwrap()) as usize;
            if value.len() < FIXED + len {
                return Err(corrupt());
            }
            records.push(Record {
                count: u32::from_le_bytes(value[..4].try_into().unwrap()),
                matches: u64_at(4) as i64,
                touched: u64_at(12) as i64,
                time: u64_at(20) as i64,
                serial: (u64_at(28), u64_at(36)),
                dirty: value[44] != 0,
                row: &value[FIXED..FIXED + len],
            });
            value = &value[FIXED + len..];
        }
        Ok(records)
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

    /// The entries of the records `group` of input `s` as a snapshot batch; records
    /// with entries marked as changed are written again without the marks.
    fn snapshot_batch(
        &mut self,
        s: usize,
        group: &[(sled::IVec, sled::IVec)],
    ) -> Result<RecordBatch> {
        let mut records = Vec::new();
        let mut rewritten = sled::Batch::default();
        for (key, value) in group {
            let parsed = Record::parse_all(value)?;
            if parsed.iter().any(|r| r.dirty) {
                let mut clean = Vec::with_capacity(value.len());
                for mut r in Record::parse_all(value)? {
                    r.dirty = false;
                    r.write(&mut clean);
                }
                rewritten.insert(key, clean);
            }
            records.extend(parsed);
        }
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
        let batch = crate::stream::snapshot::batch(super::checkpoint::SIDE_KINDS[s], &[], columns)?;
        // Written while the tree is read: sled's iterator goes on past rewritten keys.
        self.trees[s].apply_batch(rewritten).map_err(sled_error)?;
        Ok(batch)
    }

    pub(super) fn bytes(&self) -> usize {
        self.bytes[0] + self.bytes[1]
    }
}

impl StreamJoin {
    /// Brings input `s`'s spilled entries of the keys of `rows` back into memory.
    pub(super) fn bring_back_rows(&mut self, s: usize, keys: &Encoded, n: usize) -> Result<()> {
        if self.spill.is_none() {
            return Ok(());
        }
        let mut seen: HashSet<&[u8]> = HashSet::new();
        let wanted: Vec<&[u8]> = (0..n)
            .map(|i| keys.get(i))
            .filter(|k| seen.insert(k))
            .collect();
        self.bring_back(s, wanted)
    }

    /// Brings input `s`'s spilled entries of `keys` (distinct) back into memory.
    fn bring_back<K: AsRef<[u8]>>(&mut self, s: usize, keys: Vec<K>) -> Result<()> {
        let Some(spill) = self.spill.as_mut() else {
            return Ok(());
        };
        let side = &mut self.sides[s];
        let mut values = Vec::new();
        for key in &keys {
            let key = key.as_ref();
            if side.use_key(key) {
                continue;
            }
            if let Some(value) = spill.trees[s].remove(key).map_err(sled_error)? {
                spill.bytes[s] -= value.len();
                spill.changed[s].remove(key);
                values.push((key.to_vec(), value));
            }
        }
        if values.is_empty() {
            return Ok(());
        }
        let mut records = Vec::new();
        for (key, value) in &values {
            for record in Record::parse_all(value)? {
                records.push((key.as_slice(), record));
            }
        }
        let parser = spill.rows[s].parser();
        let columns =
            spill.rows[s].convert_rows(records.iter().map(|(_, r)| parser.parse(r.row)))?;
        let rows = crate::stream::batch_of(self.spec.inputs[s].clone(), columns, records.len())?;
        let full = Encoded::new(&self.rows[s], rows.columns())?;
        let side = &mut self.sides[s];
        let chunk = side.push_chunk(rows);
        for (i, (key, r)) in records.iter().enumerate() {
            let row = LoadedRow {
                key,
                full: full.get(i),
                loc: (chunk, i as u32),
                count: r.count,
                matches: r.matches,
                times: (r.touched, r.time),
            };
            side.insert_loaded(row, r.serial, r.dirty);
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
            let mut at = 0;
            for key in group {
                let mut value = Vec::new();
                let mut changed = false;
                for &id in side.candidates(key) {
                    let e = side.entry(id);
                    changed |= side.is_dirty(id);
                    Record {
                        count: e.count,
                        matches: e.matches,
                        touched: e.touched,
                        time: e.time,
                        serial: side.serial(id),
                        dirty: side.is_dirty(id),
                        row: encoded.row(at).data(),
                    }
                    .write(&mut value);
                    at += 1;
                }
                if changed {
                    spill.changed[s].insert(key.to_vec());
                }
                spill.bytes[s] += value.len();
                batch.insert(&key[..], value);
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

    /// Brings back the spilled keys of input `s` with entries changed since the previous
    /// snapshot, so that the snapshot finds them in memory.
    pub(super) fn bring_back_changed(&mut self, s: usize) -> Result<()> {
        let Some(spill) = self.spill.as_mut() else {
            return Ok(());
        };
        let keys: Vec<Vec<u8>> = spill.changed[s].drain().collect();
        self.bring_back(s, keys)
    }

    /// Input `s`'s spilled entries as snapshot batches (rows, then the figures of
    /// [`StreamJoin::side_batch`]); they all count as snapshotted afterwards.
    pub(super) fn spilled_batches(&mut self, s: usize) -> Result<Vec<RecordBatch>> {
        let Some(spill) = self.spill.as_mut() else {
            return Ok(Vec::new());
        };
        spill.changed[s].clear();
        let mut batches = Vec::new();
        let mut group: Vec<(sled::IVec, sled::IVec)> = Vec::new();
        let mut entries = 0;
        let mut iter = spill.trees[s].iter();
        loop {
            let item = iter.next().transpose().map_err(sled_error)?;
            let done = item.is_none();
            if let Some((key, value)) = item {
                entries += Record::parse_all(&value)?.len();
                group.push((key, value));
            }
            if entries >= SNAPSHOT_ROWS || (done && !group.is_empty()) {
                batches.push(spill.snapshot_batch(s, &group)?);
                group.clear();
                entries = 0;
            }
            if done {
                return Ok(batches);
            }
        }
    }

    /// The state TTL's sweep over input `s`'s spilled keys: those with an entry not
    /// written since `deadline` come back a group at a time, lose their expired entries
    /// and go back when memory is short.
    pub(super) fn sweep_spilled(&mut self, s: usize, deadline: Millis) -> Result<()> {
        let Some(spill) = self.spill.as_ref() else {
            return Ok(());
        };
        let mut keys = Vec::new();
        for item in spill.trees[s].iter() {
            let (key, value) = item.map_err(sled_error)?;
            if Record::parse_all(&value)?
                .iter()
                .any(|r| r.touched <= deadline)
            {
                keys.push(key.to_vec());
            }
        }
        for group in keys.chunks(GROUP_KEYS) {
            self.bring_back(s, group.to_vec())?;
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
