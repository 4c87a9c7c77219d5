//! A join's rows under the sled state backend. Each input keeps up to its memory budget
//! of entries in its [`Side`](super::side::Side); beyond it, the entries of keys not used
//! since the previous look go to disk, to a [`RunStore`] (of all keys, when that is not
//! enough): each move writes one record per key (a run of its entries) under the join
//! key and a sequence number, and a map in memory lists each key's sequence numbers (by
//! hash of the key: a record is confirmed by its own key). Before a batch runs, the entries of
//! the keys it probes, and of those whose rows it may find again, come back, so the join
//! itself only ever sees entries in memory. An insert-only input that never looks for its
//! own rows adds to a key without bringing the key's spilled entries back.
//!
//! Interval joins spill too, each run listed under a deadline (the watermark after which
//! its entries can no longer match). An outer input's runs are listed under their
//! earliest entry's and come back when the watermark passes it, before the expiry, which
//! treats their entries as any in memory (the unmatched ones are emitted null-padded as
//! they would be from memory). Other inputs' runs are listed under their latest entry's
//! and, once the watermark passes it, are dropped reading only their entries' serials
//! (until then the join ignores entries past their deadline).
//!
//! A run keeps what snapshots need (each entry's row, figures and serial, and whether it
//! had changed since the previous snapshot when it moved), so snapshots read spilled
//! entries straight from the store's files as the snapshot froze them, off the join's
//! task, a group at a time, and hand them on to be stored as they go: incremental ones
//! those of the runs moved with changes since, whole ones all. A
//! restore stages entries on disk by serial (layers replace and remove entries by it),
//! then makes runs of them; the join starts with everything on disk.

use std::collections::BTreeMap;
use std::sync::Arc;

use datafusion::arrow::array::Int64Array;
use datafusion::arrow::datatypes::SchemaRef;
use datafusion::arrow::record_batch::RecordBatch;
use datafusion::arrow::row::{RowConverter, SortField};
use datafusion::common::{DataFusionError, HashMap, HashSet, Result};
use smallvec::SmallVec;

use super::side::{EntryId, LoadedRow, Serial};
use super::{Encoded, Interval, StreamJoin};
use crate::stream::message::Millis;
use crate::stream::state_backend::files::RunFiles;
use crate::stream::state_backend::runs::{FrozenEntries, RunStore};
use crate::stream::state_backend::{KeyHasher, ScratchDir, SledBackend};

/// Keys moved or read per group, so no group of rows gets big.
const GROUP_KEYS: usize = 4096;
/// Bytes of runs per batch of a whole snapshot's spilled part.
const SNAPSHOT_BYTES: usize = 4 << 20;

pub(super) struct Spill {
    /// Where the stores keep their files.
    dir: ScratchDir,
    /// Each input's runs, by record key ([`run_key`]).
    stores: [RunStore; 2],
    /// Each input's sequence numbers of runs, by hash of the join key.
    pieces: [HashMap<u64, SmallVec<[u64; 2]>>; 2],
    pub(super) hasher: KeyHasher,
    /// Bytes each input keeps in memory.
    memory: usize,
    /// Whole rows of each input, as stored in records (shared with snapshots being read).
    rows: [Arc<RowConverter>; 2],
    /// Runs holding entries changed since the previous snapshot; an entry's mark in a
    /// run not listed here is stale (a snapshot took it since).
    changed: [HashSet<Vec<u8>>; 2],
    /// The next run's sequence number.
    next_run: u64,
    /// Bytes of records of each input.
    bytes: [usize; 2],
    /// While restoring: each input's entries by serial.
    pub(super) staged: [Option<RunStore>; 2],
    /// Interval joins: the bounds that give each entry its deadline, and per input
    /// whether its runs are due with their latest entry (not an outer input).
    interval: Option<(Interval, [bool; 2])>,
    /// Interval joins: the record keys of each input's runs on disk by deadline.
    due: [BTreeMap<Millis, Vec<Vec<u8>>>; 2],
}

/// One input's entries on disk as a snapshot froze them.
pub(super) struct FrozenSide {
    side: usize,
    entries: FrozenEntries,
    rows: Arc<RowConverter>,
    /// Only the entries that had changed when their runs moved.
    changed_only: bool,
}

/// The entries of `frozen` as snapshot batches of a few MiB, handed to `out` one at a
/// time.
pub(super) fn read_frozen(
    frozen: &FrozenSide,
    out: &mut dyn FnMut(RecordBatch) -> Result<()>,
) -> Result<()> {
    let mut group = Vec::new();
    let mut bytes = 0;
    frozen.entries.for_each(&mut |_, value| {
        bytes += value.len();
        group.push(value.to_vec());
        if bytes >= SNAPSHOT_BYTES || group.len() == GROUP_KEYS {
            out(snapshot_batch(frozen, &group)?)?;
            group.clear();
            bytes = 0;
        }
        Ok(())
    })?;
    if !group.is_empty() {
        out(snapshot_batch(frozen, &group)?)?;
    }
    Ok(())
}

/// The entries of the runs `group` of `frozen`'s input (only those that had changed,
/// when it holds changes) as a snapshot batch.
fn snapshot_batch(frozen: &FrozenSide, group: &[Vec<u8>]) -> Result<RecordBatch> {
    let mut records = Vec::new();
    for value in group {
        let run = Record::parse_run(value)?;
        records.extend(run.into_iter().filter(|r| r.dirty || !frozen.changed_only));
    }
    let rows = &frozen.rows;
    let parser = rows.parser();
    let columns = rows.convert_rows(records.iter().map(|r| parser.parse(r.row)))?;
    let figures = records.iter().map(|r| {
        let serial = (r.serial.0 as i64, r.serial.1 as i64);
        [
            r.count as i64,
            r.matches,
            r.touched,
            r.time,
            serial.0,
            serial.1,
        ]
    });
    super::checkpoint::side_state(frozen.side, columns, figures)
}

/// The record key of a run: its join key's length and bytes (so that one key's runs are
/// a prefix range no other key shares), then the run's sequence number.
fn run_key(key: &[u8], run: u64) -> Vec<u8> {
    let mut out = key_prefix(key);
    out.extend_from_slice(&run.to_be_bytes());
    out
}

/// The join key of a run's record key.
fn key_of(run_key: &[u8]) -> Result<&[u8]> {
    let len = u32::from_be_bytes(run_key.get(..4).ok_or_else(corrupt)?.try_into().unwrap());
    run_key.get(4..4 + len as usize).ok_or_else(corrupt)
}

/// A staged entry's record key: its serial, in order.
fn serial_key(serial: Serial) -> [u8; 16] {
    let mut out = [0; 16];
    out[..8].copy_from_slice(&serial.0.to_be_bytes());
    out[8..].copy_from_slice(&serial.1.to_be_bytes());
    out
}

fn key_prefix(key: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(4 + key.len() + 8);
    out.extend_from_slice(&(key.len() as u32).to_be_bytes());
    out.extend_from_slice(key);
    out
}

/// One entry of a run.
struct Record<'a> {
    serial: Serial,
    count: u32,
    matches: i64,
    touched: Millis,
    time: Millis,
    /// Changed since the previous snapshot when it moved.
    dirty: bool,
    row: &'a [u8],
}

/// Serial, count, matches, touched, time, dirty and the row's length; the row follows.
const FIXED: usize = 16 + 4 + 8 * 3 + 1 + 4;

fn corrupt() -> DataFusionError {
    DataFusionError::Internal("a corrupt sled state backend record".into())
}

impl<'a> Record<'a> {
    fn write(&self, out: &mut Vec<u8>) {
        out.reserve(FIXED + self.row.len());
        out.extend_from_slice(&self.serial.0.to_le_bytes());
        out.extend_from_slice(&self.serial.1.to_le_bytes());
        out.extend_from_slice(&self.count.to_le_bytes());
        for v in [self.matches, self.touched, self.time] {
            out.extend_from_slice(&v.to_le_bytes());
        }
        out.push(self.dirty as u8);
        out.extend_from_slice(&(self.row.len() as u32).to_le_bytes());
        out.extend_from_slice(self.row);
    }

    /// The entries of a run.
    fn parse_run(mut value: &'a [u8]) -> Result<Vec<Self>> {
        let mut records = Vec::new();
        while !value.is_empty() {
            if value.len() < FIXED {
                return Err(corrupt());
            }
            let u64_at = |at: usize| u64::from_le_bytes(value[at..at + 8].try_into().unwrap());
            let len = u32::from_le_bytes(value[FIXED - 4..FIXED].try_into().unwrap()) as usize;
            let row = value.get(FIXED..FIXED + len).ok_or_else(corrupt)?;
            records.push(Record {
                serial: (u64_at(0), u64_at(8)),
                count: u32::from_le_bytes(value[16..20].try_into().unwrap()),
                matches: u64_at(20) as i64,
                touched: u64_at(28) as i64,
                time: u64_at(36) as i64,
                dirty: value[44] != 0,
                row,
            });
            value = &value[FIXED + len..];
        }
        Ok(records)
    }
}

/// The earliest and latest time among a run's entries (interval joins).
#[derive(Default, Clone, Copy)]
struct Times(Option<(Millis, Millis)>);

impl Times {
    fn add(&mut self, t: Millis) {
        self.0 = Some(match self.0 {
            Some((first, last)) => (first.min(t), last.max(t)),
            None => (t, t),
        });
    }
}

impl Spill {
    /// The spill of a join over `inputs`, or none when an input has no columns to store.
    pub(super) fn open(
        backend: &SledBackend,
        inputs: &[SchemaRef; 2],
        interval: Option<(Interval, [bool; 2])>,
    ) -> Result<Option<Self>> {
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
        let dir = backend.scratch_dir()?;
        Ok(Some(Self {
            stores: [
                RunStore::new(RunFiles::new(dir.clone())),
                RunStore::new(RunFiles::new(dir.clone())),
            ],
            pieces: [HashMap::default(), HashMap::default()],
            hasher: KeyHasher::default(),
            dir,
            memory: backend.memory,
            rows: [
                Arc::new(converter(&inputs[0])?),
                Arc::new(converter(&inputs[1])?),
            ],
            changed: [HashSet::default(), HashSet::default()],
            next_run: 0,
            bytes: [0, 0],
            staged: [None, None],
            interval,
            due: [BTreeMap::new(), BTreeMap::new()],
        }))
    }

    /// The store input `s`'s entries are staged in while restoring.
    fn staging(&mut self, s: usize) -> &mut RunStore {
        let dir = &self.dir;
        self.staged[s].get_or_insert_with(|| RunStore::new(RunFiles::new(dir.clone())))
    }

    /// Writes a run per key of `runs` (each its entries' records) for input `s`.
    fn write_runs(&mut self, s: usize, runs: BTreeMap<Vec<u8>, Vec<u8>>) -> Result<()> {
        let mut records = Vec::with_capacity(runs.len());
        for (key, value) in runs {
            let mut times = Times::default();
            if self.interval.is_some() {
                for r in Record::parse_run(&value)? {
                    times.add(r.time);
                }
            }
            records.push((self.new_run(s, &key, value.len(), times), value));
        }
        self.stores[s].put_all(records.iter().map(|(k, v)| (k.as_slice(), v.as_slice())))
    }

    /// The record key of a new run of `key` of `len` bytes, listed as one of the key's;
    /// an interval join's run is listed as due too, by the deadline of its earliest or
    /// latest entry (`times`: a later time has a later deadline).
    fn new_run(&mut self, s: usize, key: &[u8], len: usize, times: Times) -> Vec<u8> {
        let seq = self.next_run;
        self.next_run += 1;
        let run_key = run_key(key, seq);
        if let Some(deadline) = self.deadline(s, times) {
            self.due[s]
                .entry(deadline)
                .or_default()
                .push(run_key.clone());
        }
        self.bytes[s] += run_key.len() + len;
        let hash = self.hasher.hash(key);
        self.pieces[s].entry(hash).or_default().push(seq);
        run_key
    }

    /// The record keys of the runs of `key` that input `s` may have (its hash's).
    fn runs_of(&self, s: usize, key: &[u8]) -> Vec<Vec<u8>> {
        match self.pieces[s].get(&self.hasher.hash(key)) {
            Some(seqs) => seqs.iter().map(|&seq| run_key(key, seq)).collect(),
            None => Vec::new(),
        }
    }

    /// An interval join's run `run_key` of input `s` (its entries' `times`) came back
    /// before it was due: it is no longer listed.
    fn unlist_due(&mut self, s: usize, run_key: &[u8], times: Times) {
        let Some(deadline) = self.deadline(s, times) else {
            return;
        };
        if let Some(runs) = self.due[s].get_mut(&deadline) {
            runs.retain(|r| r.as_slice() != run_key);
            if runs.is_empty() {
                self.due[s].remove(&deadline);
            }
        }
    }

    /// The deadline an interval join lists a run of input `s` under, by its entries'
    /// `times`.
    fn deadline(&self, s: usize, times: Times) -> Option<Millis> {
        let ((iv, by_last), (first, last)) = (self.interval?, times.0?);
        Some(iv.deadline(s, if by_last[s] { last } else { first }))
    }

    /// Run `run_key` of input `s` is no longer on disk.
    fn forget_run(&mut self, s: usize, run_key: &[u8]) -> Result<()> {
        let key = key_of(run_key)?;
        let seq = u64::from_be_bytes(run_key[run_key.len() - 8..].try_into().expect("8 bytes"));
        let hash = self.hasher.hash(key);
        if let Some(seqs) = self.pieces[s].get_mut(&hash) {
            seqs.retain(|q| *q != seq);
            if seqs.is_empty() {
                self.pieces[s].remove(&hash);
            }
        }
        Ok(())
    }

    pub(super) fn bytes(&self) -> usize {
        self.bytes[0] + self.bytes[1]
    }

    /// Runs of each input on disk.
    #[cfg(test)]
    pub(super) fn records(&self) -> [usize; 2] {
        [self.stores[0].len(), self.stores[1].len()]
    }

    /// Runs of each input listed as due at some watermark.
    #[cfg(test)]
    pub(super) fn listed_due(&self) -> [usize; 2] {
        self.due.each_ref().map(|d| d.values().map(Vec::len).sum())
    }
}

impl StreamJoin {
    /// Brings back input `s`'s spilled entries of the keys of `keys`' `n` rows.
    pub(super) fn bring_back_rows(&mut self, s: usize, keys: &Encoded, n: usize) -> Result<()> {
        if self.spill.is_none() {
            return Ok(());
        }
        let mut seen: HashSet<&[u8]> = HashSet::default();
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
        let mut run_keys = Vec::new();
        for key in keys {
            let key = key.as_ref();
            side.use_key(key);
            run_keys.extend(spill.runs_of(s, key));
        }
        self.bring_back_runs(s, &run_keys)
    }

    /// Brings input `s`'s runs `run_keys` (those still on disk) back into memory.
    fn bring_back_runs(&mut self, s: usize, run_keys: &[Vec<u8>]) -> Result<()> {
        let Some(spill) = self.spill.as_mut() else {
            return Ok(());
        };
        if run_keys.is_empty() {
            return Ok(());
        }
        let side = &mut self.sides[s];
        let wanted: Vec<&[u8]> = run_keys.iter().map(Vec::as_slice).collect();
        let runs: Vec<(&[u8], Vec<u8>)> = spill.stores[s]
            .take_all(&wanted)?
            .into_iter()
            .map(|(i, value)| (wanted[i], value))
            .collect();
        let mut records = Vec::new();
        for (run_key, value) in &runs {
            spill.bytes[s] -= run_key.len() + value.len();
            spill.forget_run(s, run_key)?;
            let current = spill.changed[s].remove(*run_key);
            let key = key_of(run_key)?;
            let mut times = Times::default();
            for mut record in Record::parse_run(value)? {
                record.dirty &= current;
                times.add(record.time);
                records.push((key, record));
            }
            spill.unlist_due(s, run_key, times);
        }
        let parser = spill.rows[s].parser();
        let columns =
            spill.rows[s].convert_rows(records.iter().map(|(_, r)| parser.parse(r.row)))?;
        let rows = crate::stream::batch_of(self.spec.inputs[s].clone(), columns, records.len())?;
        // A side that finds rows by their encoding has it in the record already (its
        // encoder and the record's have the same fields).
        let finds_rows = self.rows[s].is_some();
        let chunk = side.push_chunk(rows);
        for (i, (key, r)) in records.iter().enumerate() {
            let row = LoadedRow {
                key,
                full: if finds_rows { r.row } else { &[] },
                loc: (chunk, i as u32),
                count: r.count,
                matches: r.matches,
                times: (r.touched, r.time),
            };
            let id = side.insert_loaded(row, r.serial, r.dirty);
            if let Some((iv, _)) = spill.interval {
                side.deadlines
                    .entry(iv.deadline(s, r.time))
                    .or_default()
                    .push(id);
            }
        }
        side.settle()
    }

    /// Moves input `s`'s entries of `keys` from memory to disk, a run per key.
    fn move_to_disk(&mut self, s: usize, keys: Vec<Box<[u8]>>) -> Result<()> {
        let Some(spill) = self.spill.as_mut() else {
            return Ok(());
        };
        let side = &mut self.sides[s];
        for group in keys.chunks(GROUP_KEYS) {
            let ids: Vec<EntryId> = group
                .iter()
                .flat_map(|k| side.candidates(k).iter().copied())
                .collect();
            // Entries that keep their encoded row are not encoded again.
            let encoded = match ids.first().map(|&id| side.full(id).is_some()) {
                Some(false) => Some(spill.rows[s].convert_columns(side.gather(&ids)?.columns())?),
                _ => None,
            };
            let mut moved = Vec::with_capacity(group.len());
            let mut unlisted = Vec::new();
            let mut at = 0;
            for key in group {
                let mut value = Vec::new();
                let mut changed = false;
                let mut times = Times::default();
                for &id in side.candidates(key) {
                    let e = side.entry(id);
                    let dirty = side.is_dirty(id);
                    changed |= dirty;
                    if let Some((iv, _)) = spill.interval {
                        times.add(e.time);
                        unlisted.push((iv.deadline(s, e.time), id));
                    }
                    Record {
                        serial: side.serial(id),
                        count: e.count,
                        matches: e.matches,
                        touched: e.touched,
                        time: e.time,
                        dirty,
                        row: match &encoded {
                            Some(rows) => rows.row(at).data(),
                            None => side.full(id).expect("an encoded row"),
                        },
                    }
                    .write(&mut value);
                    at += 1;
                }
                let run_key = spill.new_run(s, key, value.len(), times);
                if changed {
                    spill.changed[s].insert(run_key.clone());
                }
                moved.push((run_key, value));
            }
            spill.stores[s].put_all(moved.iter().map(|(k, v)| (k.as_slice(), v.as_slice())))?;
            for key in group {
                side.move_out_key(key);
            }
            side.unlist_deadlines(unlisted);
        }
        side.settle()
    }

    /// Interval joins: brings back input `s`'s spilled runs whose deadline the watermark
    /// passed, so that the expiry finds their entries in memory; `each` runs after every
    /// group of runs (the expiry itself, so that a large jump of the watermark does not
    /// bring everything back at once).
    pub(super) fn bring_back_due(
        &mut self,
        s: usize,
        each: &mut dyn FnMut(&mut Self) -> Result<()>,
    ) -> Result<()> {
        let Some(spill) = self.spill.as_mut() else {
            return Ok(());
        };
        let watermark = self.watermark;
        if spill.due[s]
            .first_key_value()
            .is_none_or(|(d, _)| *d >= watermark)
        {
            return Ok(());
        }
        let later = spill.due[s].split_off(&watermark);
        let due = std::mem::replace(&mut spill.due[s], later);
        let by_last = spill.interval.is_some_and(|(_, by_last)| by_last[s]);
        let runs: Vec<Vec<u8>> = due.into_values().flatten().collect();
        for group in runs.chunks(GROUP_KEYS) {
            if by_last {
                self.drop_runs(s, group)?;
            } else {
                self.bring_back_runs(s, group)?;
                each(self)?;
            }
        }
        Ok(())
    }

    /// Takes input `s`'s runs `run_keys` (those still on disk) off the disk, all their
    /// entries past their deadline and not outer, so without output: only their serials
    /// are read, for the next snapshot to record them removed.
    fn drop_runs(&mut self, s: usize, run_keys: &[Vec<u8>]) -> Result<()> {
        let Some(spill) = self.spill.as_mut() else {
            return Ok(());
        };
        let wanted: Vec<&[u8]> = run_keys.iter().map(Vec::as_slice).collect();
        for (i, value) in spill.stores[s].take_all(&wanted)? {
            let run_key = wanted[i];
            spill.bytes[s] -= run_key.len() + value.len();
            spill.forget_run(s, run_key)?;
            spill.changed[s].remove(run_key);
            for record in Record::parse_run(&value)? {
                self.sides[s].removed_elsewhere(record.serial);
            }
        }
        Ok(())
    }

    /// Keeps input `s` within its memory: first the keys not used since the previous
    /// look go to disk, then all of them if that leaves more than three quarters.
    pub(super) fn shed(&mut self, s: usize) -> Result<()> {
        let Some(memory) = self.spill.as_ref().map(|spill| spill.memory) else {
            return Ok(());
        };
        if self.sides[s].size() <= memory {
            return Ok(());
        }
        let unused = self.sides[s].keys_to_move(false);
        self.move_to_disk(s, unused)?;
        if self.sides[s].size() > memory / 4 * 3 {
            let all = self.sides[s].keys_to_move(true);
            self.move_to_disk(s, all)?;
        }
        Ok(())
    }

    /// Input `s`'s spilled entries as they are now (all, when `whole`, else those changed
    /// since the previous snapshot), read later as snapshot batches by [`read_frozen`];
    /// they count as snapshotted.
    pub(super) fn freeze_spilled(&mut self, s: usize, whole: bool) -> Result<Option<FrozenSide>> {
        let Some(spill) = self.spill.as_mut() else {
            return Ok(None);
        };
        let entries = spill.stores[s].freeze_snapshot(&mut spill.changed[s], whole)?;
        Ok(entries.map(|entries| FrozenSide {
            side: s,
            entries,
            rows: spill.rows[s].clone(),
            changed_only: !whole,
        }))
    }

    /// Restoring under the backend: input `s`'s entries of a snapshot batch go to a
    /// store by serial, where a later layer's entry replaces the earlier one as in
    /// memory; [`StreamJoin::runs_of_restored`] makes them runs once all are there. So a
    /// restore holds one batch in memory, not the state.
    pub(super) fn stage_restored(
        &mut self,
        s: usize,
        batch: &RecordBatch,
        serials: (&Int64Array, &Int64Array),
        figures: [&Int64Array; 4],
    ) -> Result<()> {
        let width = self.spec.inputs[s].fields().len();
        let n = batch.num_rows();
        let rows = crate::stream::batch_of(
            self.spec.inputs[s].clone(),
            batch.columns()[..width].to_vec(),
            n,
        )?;
        let keys = Encoded::new(&self.keys, &self.key_columns(s, &rows)?)?;
        let spill = self.spill.as_mut().expect("staging needs the backend");
        let encoded = spill.rows[s].convert_columns(rows.columns())?;
        let [count, matches, touched, time] = figures;
        let mut staged = Vec::with_capacity(n);
        for i in 0..n {
            let serial = (serials.0.value(i) as u64, serials.1.value(i) as u64);
            let key = keys.get(i);
            let mut value = key_prefix(key);
            Record {
                serial,
                count: count.value(i) as u32,
                matches: matches.value(i),
                touched: touched.value(i),
                time: time.value(i),
                dirty: false,
                row: encoded.row(i).data(),
            }
            .write(&mut value);
            staged.push((serial_key(serial), value));
        }
        spill
            .staging(s)
            .put_all(staged.iter().map(|(k, v)| (k.as_slice(), v.as_slice())))
    }

    /// Restoring under the backend: a later layer removed these entries of input `s`.
    pub(super) fn unstage_removed(&mut self, s: usize, serials: &[Serial]) -> Result<()> {
        let spill = self.spill.as_mut().expect("staging needs the backend");
        let removed: Vec<[u8; 16]> = serials.iter().map(|&serial| serial_key(serial)).collect();
        let removed: Vec<&[u8]> = removed.iter().map(|k| k.as_slice()).collect();
        spill.staging(s).take_all(&removed)?;
        Ok(())
    }

    /// The staged entries of a restore become runs: a group of entries at a time, a run
    /// per key in the group.
    pub(super) fn runs_of_restored(&mut self) -> Result<()> {
        let Some(spill) = self.spill.as_mut() else {
            return Ok(());
        };
        for s in 0..2 {
            let Some(staged) = spill.staged[s].take() else {
                continue;
            };
            let mut runs: BTreeMap<Vec<u8>, Vec<u8>> = BTreeMap::new();
            let mut bytes = 0;
            staged.for_each(&mut |_, value| {
                let key = key_of(value)?;
                let record = &value[4 + key.len()..];
                bytes += record.len();
                runs.entry(key.to_vec())
                    .or_default()
                    .extend_from_slice(record);
                if bytes >= SNAPSHOT_BYTES {
                    spill.write_runs(s, std::mem::take(&mut runs))?;
                    bytes = 0;
                }
                Ok(())
            })?;
            spill.write_runs(s, runs)?;
        }
        Ok(())
    }

    /// The state TTL's sweep over input `s`'s spilled entries: the keys of those not
    /// written since `deadline` come back a group at a time, lose their expired entries
    /// and go back when memory is short.
    pub(super) fn sweep_spilled(&mut self, s: usize, deadline: Millis) -> Result<()> {
        let Some(spill) = self.spill.as_ref() else {
            return Ok(());
        };
        let mut keys: Vec<Vec<u8>> = Vec::new();
        let mut listed: HashSet<Vec<u8>> = HashSet::default();
        spill.stores[s].for_each(&mut |run_key, value| {
            let key = key_of(run_key)?;
            let expired = Record::parse_run(value)?
                .iter()
                .any(|r| r.touched <= deadline);
            if expired && listed.insert(key.to_vec()) {
                keys.push(key.to_vec());
            }
            Ok(())
        })?;
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
