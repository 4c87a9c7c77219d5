//! The rows one input of a join keeps. Rows stay in Arrow batches ("chunks") so output is
//! gathered from them with `interleave`; entries index them by join key (for probing) and
//! by the whole row (a multiset: equal rows share one entry with a count, so a retraction
//! finds the row it takes back).
//!
//! Every entry has a serial that no other entry of any run of the job has: the run's
//! origin (the epoch the job started from, and the subtask) and a counter. Incremental
//! snapshots name the entries removed since the previous snapshot by serial, and write
//! the entries added or changed since then again; restoring replaces an entry by serial.

use std::collections::{BTreeMap, VecDeque};
use std::hash::BuildHasher;
use std::sync::Arc;

use datafusion::arrow::array::UInt32Array;
use datafusion::arrow::compute::take_record_batch;
use datafusion::arrow::datatypes::SchemaRef;
use datafusion::arrow::record_batch::RecordBatch;
use datafusion::common::{HashMap, HashSet, Result};
use hashbrown::hash_table::Entry as TableEntry;
use hashbrown::{DefaultHashBuilder, HashTable};
use smallvec::SmallVec;

use super::block_vec::BlockVec;
use crate::stream::message::Millis;

pub type EntryId = u32;

/// Where a stored row is: chunk id and row within the chunk.
pub type Loc = (u64, u32);

const DEAD: EntryId = EntryId::MAX;
/// Live rows up to which the newest chunks are merged.
const MERGED_ROWS: usize = 8192;
/// Hash map and entry bookkeeping per entry, for `state_size`.
const ENTRY_OVERHEAD: usize = 96;

/// An entry coming back into memory: where its row is now, and its figures.
pub struct LoadedRow<'a> {
    pub key: &'a [u8],
    pub full: &'a [u8],
    pub loc: Loc,
    pub count: u32,
    pub matches: i64,
    /// Touched and time.
    pub times: (Millis, Millis),
}

/// One distinct row of the input and how many copies of it are live.
pub struct Entry {
    pub loc: Loc,
    pub count: u32,
    /// Rows of the other input this row matches (with their counts). Kept for outer,
    /// semi and anti joins, whose output depends on whether a row has any match.
    pub matches: i64,
    /// Processing time of the last write, for the state TTL.
    pub touched: Millis,
    /// The row's time attribute (interval joins).
    pub time: Millis,
    /// Hash of the row's join key: removing the entry finds its key's list by the hash
    /// and its own id, reading neither the key nor a shared pointer to it (the key's
    /// reference count was a cache miss at every insert and removal).
    key_hash: u64,
    /// The encoded row, when the side finds rows by it.
    full: Option<Arc<[u8]>>,
    /// Index into the side's origins (high 16 bits) and counter (low 48 bits).
    serial: u64,
    /// Added or changed since the previous snapshot (listed in `Side::dirty`).
    dirty: bool,
    /// In a snapshot already: its removal must be recorded.
    persisted: bool,
}

/// A run of the job: the epoch it started from and its subtask, as one number.
pub type Origin = u64;

pub fn origin(epoch: u64, subtask: usize) -> Origin {
    (epoch << 16) | subtask as u64
}

/// An entry's serial as stored in snapshots: its origin and counter.
pub type Serial = (Origin, u64);

const COUNTER_BITS: u32 = 48;

/// Longest join key held in its map slot.
const INLINE_KEY: usize = 22;

/// A join key, in the map's slot when it fits (most keys are one or two numbers), so
/// finding it reads no other memory.
enum StoredKey {
    Inline(u8, [u8; INLINE_KEY]),
    Boxed(Box<[u8]>),
}

impl StoredKey {
    fn new(key: &[u8]) -> Self {
        match key.len() {
            n if n <= INLINE_KEY => {
                let mut bytes = [0; INLINE_KEY];
                bytes[..n].copy_from_slice(key);
                Self::Inline(n as u8, bytes)
            }
            _ => Self::Boxed(key.into()),
        }
    }

    fn bytes(&self) -> &[u8] {
        match self {
            Self::Inline(n, bytes) => &bytes[..*n as usize],
            Self::Boxed(bytes) => bytes,
        }
    }
}

/// The entries of one join key, and whether the key was used since the sled backend
/// last looked for keys to move out of memory.
struct Keyed {
    key: StoredKey,
    /// Inline up to four: most keys of a side over many keys hold one or two rows, and a
    /// list on the heap was a second cache miss at every insert and removal (for 8 bytes
    /// more than a `Vec`).
    ids: SmallVec<[EntryId; 4]>,
    used: bool,
}

struct Chunk {
    rows: RecordBatch,
    /// The entry each row belongs to, or DEAD.
    owners: Vec<EntryId>,
    live: usize,
}

pub struct Side {
    schema: SchemaRef,
    /// Chunk ids are `first_chunk + position`; chunks die mostly oldest first.
    chunks: VecDeque<Chunk>,
    first_chunk: u64,
    entries: BlockVec<Option<Entry>>,
    free: Vec<EntryId>,
    by_key: HashTable<Keyed>,
    hasher: DefaultHashBuilder,
    /// Entries by their encoded row, for sides whose rows can be taken back (or whose
    /// rows' state TTL a repeated row refreshes); `None` for insert-only sides, whose
    /// equal rows are then separate entries.
    by_row: Option<HashMap<Arc<[u8]>, EntryId>>,
    /// Live entries.
    live: usize,
    /// Interval joins: entries by the watermark after which nothing can match them.
    pub deadlines: BTreeMap<Millis, Vec<EntryId>>,
    /// Chunks that lost rows since the last `settle`.
    thinned: Vec<u64>,
    key_bytes: usize,
    /// Origins of the entries' serials; this run's is `origins[0]`.
    origins: Vec<Origin>,
    next_serial: u64,
    /// Entries added or changed since the previous snapshot (possibly repeated or gone).
    dirty: Vec<EntryId>,
    /// Serials of snapshotted entries removed since the previous snapshot.
    removed: Vec<Serial>,
    /// Entries by serial, while restoring.
    by_serial: HashMap<Serial, EntryId>,
}

impl Side {
    /// A side that finds rows by their whole encoding when `find_rows`.
    pub fn new(schema: SchemaRef, find_rows: bool) -> Self {
        Self {
            schema,
            chunks: VecDeque::new(),
            first_chunk: 0,
            entries: BlockVec::default(),
            free: Vec::new(),
            by_key: HashTable::new(),
            hasher: DefaultHashBuilder::default(),
            by_row: find_rows.then(HashMap::default),
            live: 0,
            deadlines: BTreeMap::new(),
            thinned: Vec::new(),
            key_bytes: 0,
            origins: vec![origin(0, 0)],
            next_serial: 0,
            dirty: Vec::new(),
            removed: Vec::new(),
            by_serial: HashMap::default(),
        }
    }

    /// New entries' serials name this run.
    pub fn set_origin(&mut self, origin: Origin) {
        self.origins[0] = origin;
    }

    /// The stored form of an entry's serial.
    pub fn serial(&self, id: EntryId) -> Serial {
        self.stored_serial(self.entry(id).serial)
    }

    fn stored_serial(&self, serial: u64) -> Serial {
        (
            self.origins[(serial >> COUNTER_BITS) as usize],
            serial & ((1 << COUNTER_BITS) - 1),
        )
    }

    fn mark_dirty(&mut self, id: EntryId) {
        let entry = self.entries[id as usize].as_mut().expect("a live entry");
        if !entry.dirty {
            entry.dirty = true;
            self.dirty.push(id);
        }
    }

    /// The live entries added or changed since the previous snapshot, and the serials
    /// of those removed; what is returned counts as snapshotted.
    pub fn take_changes(&mut self) -> (Vec<EntryId>, Vec<Serial>) {
        let mut dirty = std::mem::take(&mut self.dirty);
        dirty.sort_unstable();
        dirty.dedup();
        dirty.retain(|&id| self.entries[id as usize].as_ref().is_some_and(|e| e.dirty));
        for &id in &dirty {
            let e = self.entries[id as usize].as_mut().expect("live");
            e.dirty = false;
            e.persisted = true;
        }
        (dirty, std::mem::take(&mut self.removed))
    }

    /// Every entry counts as snapshotted, with no changes since.
    pub fn forget_changes(&mut self) {
        for e in self.entries.iter_mut().flatten() {
            e.dirty = false;
            e.persisted = true;
        }
        self.dirty.clear();
        self.removed.clear();
    }

    /// Gives entry `id` the stored serial `serial` (restoring; an entry that had it was
    /// removed first with [`Side::remove_serial`]).
    pub fn adopt_serial(&mut self, id: EntryId, serial: Serial) {
        self.by_serial.insert(serial, id);
        self.set_serial(id, serial);
    }

    fn set_serial(&mut self, id: EntryId, serial: Serial) {
        let index = match self.origins.iter().position(|&o| o == serial.0) {
            Some(i) => i,
            None => {
                self.origins.push(serial.0);
                self.origins.len() - 1
            }
        };
        self.entries[id as usize]
            .as_mut()
            .expect("a live entry")
            .serial = ((index as u64) << COUNTER_BITS) | serial.1;
    }

    /// Puts back an entry the sled backend had moved out of memory, as it was: serial,
    /// and whether it changed since the previous snapshot. It counts as snapshotted, so
    /// its removal is recorded (harmless if it never was).
    pub fn insert_loaded(&mut self, row: LoadedRow, serial: Serial, dirty: bool) -> EntryId {
        let id = self.insert(row.key, row.full, row.loc, row.matches, row.times);
        self.set_serial(id, serial);
        let entry = self.entries[id as usize].as_mut().expect("just inserted");
        entry.count = row.count;
        entry.persisted = true;
        // `insert` listed it as changed; a clean entry drops out of that list when the
        // next snapshot takes the changes.
        entry.dirty = dirty;
        id
    }

    /// An entry the sled backend kept on disk was removed there: the next snapshot
    /// records its removal (harmless if no snapshot had it).
    pub fn removed_elsewhere(&mut self, serial: Serial) {
        self.removed.push(serial);
    }

    /// Entry `id`'s encoded row, when the side finds rows by it.
    pub fn full(&self, id: EntryId) -> Option<&[u8]> {
        self.entry(id).full.as_deref()
    }

    /// Whether entry `id` changed since the previous snapshot.
    pub fn is_dirty(&self, id: EntryId) -> bool {
        self.entry(id).dirty
    }

    /// Marks `key` as used, so the sled backend keeps its rows in memory a while longer.
    pub fn use_key(&mut self, key: &[u8]) {
        let hash = self.hasher.hash_one(key);
        if let Some(keyed) = self.by_key.find_mut(hash, |k| k.key.bytes() == key) {
            keyed.used = true;
        }
    }

    /// The keys in memory not used since the previous call (all of them when `all`);
    /// every key counts as unused afterwards.
    pub fn keys_to_move(&mut self, all: bool) -> Vec<Box<[u8]>> {
        let mut keys = Vec::new();
        for keyed in self.by_key.iter_mut() {
            if all || !keyed.used {
                keys.push(keyed.key.bytes().into());
            }
            keyed.used = false;
        }
        keys
    }

    /// Removes the entry with the stored serial `serial`, if there is one (restoring).
    pub fn remove_serial(&mut self, serial: Serial) {
        if let Some(id) = self.by_serial.remove(&serial) {
            if self.is_live(id) {
                self.remove(id);
            }
        }
    }

    /// Restoring is over: every entry is in the checkpoint, and the serial index is no
    /// longer needed.
    pub fn restored(&mut self) {
        self.by_serial = HashMap::default();
        self.forget_changes();
    }

    pub fn schema(&self) -> &SchemaRef {
        &self.schema
    }

    /// The entries whose join key is `key`.
    pub fn candidates(&self, key: &[u8]) -> &[EntryId] {
        let hash = self.hasher.hash_one(key);
        self.by_key
            .find(hash, |k| k.key.bytes() == key)
            .map(|k| k.ids.as_slice())
            .unwrap_or(&[])
    }

    /// The entry holding rows equal to the encoded row `full`.
    pub fn find(&self, full: &[u8]) -> Option<EntryId> {
        self.by_row.as_ref()?.get(full).copied()
    }

    pub fn entry(&self, id: EntryId) -> &Entry {
        self.entries[id as usize].as_ref().expect("a live entry")
    }

    /// The entry, to change: it counts as changed for the next snapshot.
    pub fn entry_mut(&mut self, id: EntryId) -> &mut Entry {
        self.mark_dirty(id);
        self.entries[id as usize].as_mut().expect("a live entry")
    }

    /// Whether `id` names a live entry (deadline lists may name removed ones).
    pub fn is_live(&self, id: EntryId) -> bool {
        self.entries.get(id as usize).is_some_and(|e| e.is_some())
    }

    /// Ids of every live entry.
    pub fn live_ids(&self) -> Vec<EntryId> {
        (0..self.entries.len() as EntryId)
            .filter(|&id| self.entries[id as usize].is_some())
            .collect()
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.live
    }

    /// Stores `rows` as a new chunk; entries are then created for some of its rows.
    pub fn push_chunk(&mut self, rows: RecordBatch) -> u64 {
        let n = rows.num_rows();
        self.chunks.push_back(Chunk {
            rows,
            owners: vec![DEAD; n],
            live: 0,
        });
        self.first_chunk + self.chunks.len() as u64 - 1
    }

    fn chunk_mut(&mut self, id: u64) -> &mut Chunk {
        let at = (id - self.first_chunk) as usize;
        &mut self.chunks[at]
    }

    /// The batch holding chunk `id`.
    pub fn chunk_rows(&self, id: u64) -> &RecordBatch {
        &self.chunks[(id - self.first_chunk) as usize].rows
    }

    /// A new entry with one copy of the row at `loc`.
    pub fn insert(
        &mut self,
        key: &[u8],
        full: &[u8],
        loc: Loc,
        matches: i64,
        (touched, time): (Millis, Millis),
    ) -> EntryId {
        // One hash lookup finds or makes the key's list.
        let key_hash = self.hasher.hash_one(key);
        let hasher = &self.hasher;
        let keyed = match self.by_key.entry(
            key_hash,
            |k| k.key.bytes() == key,
            |k| hasher.hash_one(k.key.bytes()),
        ) {
            TableEntry::Occupied(o) => o.into_mut(),
            TableEntry::Vacant(v) => {
                self.key_bytes += key.len();
                v.insert(Keyed {
                    key: StoredKey::new(key),
                    ids: SmallVec::new(),
                    used: false,
                })
                .into_mut()
            }
        };
        let id = self
            .free
            .last()
            .copied()
            .unwrap_or(self.entries.len() as EntryId);
        keyed.ids.push(id);
        keyed.used = true;
        let full: Option<Arc<[u8]>> = self.by_row.is_some().then(|| Arc::from(full));
        let entry = Entry {
            loc,
            count: 1,
            matches,
            touched,
            time,
            key_hash,
            full: full.clone(),
            serial: self.next_serial,
            dirty: false,
            persisted: false,
        };
        self.next_serial += 1;
        self.key_bytes += full.as_ref().map_or(0, |f| f.len());
        self.live += 1;
        match self.free.pop() {
            Some(free) => self.entries[free as usize] = Some(entry),
            None => self.entries.push(Some(entry)),
        }
        let chunk = self.chunk_mut(loc.0);
        chunk.owners[loc.1 as usize] = id;
        chunk.live += 1;
        if let (Some(by_row), Some(full)) = (self.by_row.as_mut(), full) {
            by_row.insert(full, id);
        }
        self.mark_dirty(id);
        id
    }

    /// Removes entry `id` with all its copies.
    pub fn remove(&mut self, id: EntryId) {
        let Some(entry) = self.drop_entry(id) else {
            return;
        };
        if entry.persisted {
            let serial = self.stored_serial(entry.serial);
            self.removed.push(serial);
        }
        // The key's list is the one holding `id` among those with the key's hash.
        // Ids stay in arrival order: rows mostly go oldest first (expiry), so the search
        // ends near the front.
        let found = self
            .by_key
            .find_entry(entry.key_hash, |k| k.ids.contains(&id));
        if let Ok(mut keyed) = found {
            let ids = &mut keyed.get_mut().ids;
            let at = ids.iter().position(|&i| i == id).expect("found by it");
            ids.remove(at);
            if ids.is_empty() {
                let (keyed, _) = keyed.remove();
                self.key_bytes -= keyed.key.bytes().len();
            }
        }
    }

    /// Takes every entry of `key` out of memory because the sled backend keeps them now:
    /// unlike [`Side::remove`], no removal a snapshot records.
    pub fn move_out_key(&mut self, key: &[u8]) {
        let hash = self.hasher.hash_one(key);
        if let Ok(keyed) = self.by_key.find_entry(hash, |k| k.key.bytes() == key) {
            let (keyed, _) = keyed.remove();
            self.key_bytes -= keyed.key.bytes().len();
            for id in keyed.ids {
                self.drop_entry(id);
            }
        }
    }

    /// Interval joins: takes the entries `moved` (deadline and id) out of the deadline
    /// lists, after [`Side::move_out_key`] took them out of memory (before any insert
    /// can reuse their ids).
    pub fn unlist_deadlines(&mut self, mut moved: Vec<(Millis, EntryId)>) {
        moved.sort_unstable();
        for run in moved.chunk_by(|a, b| a.0 == b.0) {
            let deadline = run[0].0;
            let Some(ids) = self.deadlines.get_mut(&deadline) else {
                continue;
            };
            if run.len() == 1 {
                ids.retain(|&id| id != run[0].1);
            } else {
                let gone: HashSet<EntryId> = run.iter().map(|m| m.1).collect();
                ids.retain(|id| !gone.contains(id));
            }
            if ids.is_empty() {
                self.deadlines.remove(&deadline);
            }
        }
    }

    /// Takes entry `id` out of the entries, the row index and its chunk (not out of
    /// `by_key`).
    fn drop_entry(&mut self, id: EntryId) -> Option<Entry> {
        let entry = self.entries[id as usize].take()?;
        self.free.push(id);
        self.live -= 1;
        if let (Some(by_row), Some(full)) = (self.by_row.as_mut(), &entry.full) {
            self.key_bytes -= full.len();
            by_row.remove(full);
        }
        let (chunk_id, row) = entry.loc;
        let chunk = self.chunk_mut(chunk_id);
        chunk.owners[row as usize] = DEAD;
        chunk.live -= 1;
        self.thinned.push(chunk_id);
        Some(entry)
    }

    /// Takes one copy of entry `id` away; the entry goes with its last copy.
    pub fn retract(&mut self, id: EntryId, now: Millis) {
        let entry = self.entry_mut(id);
        if entry.count > 1 {
            entry.count -= 1;
            entry.touched = now;
        } else {
            self.remove(id);
        }
    }

    /// Frees the memory of removed rows, once a batch's changes are done and nothing
    /// refers to chunk rows by position any more.
    pub fn settle(&mut self) -> Result<()> {
        let mut thinned = std::mem::take(&mut self.thinned);
        thinned.sort_unstable();
        thinned.dedup();
        for id in thinned {
            if id < self.first_chunk || id >= self.first_chunk + self.chunks.len() as u64 {
                continue;
            }
            let empty = RecordBatch::new_empty(self.schema.clone());
            let chunk = self.chunk_mut(id);
            let rows = chunk.rows.num_rows();
            if chunk.live == 0 {
                // A slice would keep the buffers alive.
                chunk.rows = empty;
                chunk.owners = Vec::new();
            } else if rows >= 64 && chunk.live * 4 < rows {
                self.compact(&[id])?;
            }
        }
        // Merge the newest two chunks while the newer holds at least half as many live
        // rows as the older, up to MERGED_ROWS: small batches do not each stay a chunk,
        // and each row is copied a few times at most, never again once in a full chunk.
        while self.chunks.len() >= 2 {
            let n = self.chunks.len();
            let (older, newer) = (self.chunks[n - 2].live, self.chunks[n - 1].live);
            if newer * 2 < older || older + newer > MERGED_ROWS {
                break;
            }
            let last = self.first_chunk + n as u64 - 1;
            self.compact(&[last - 1, last])?;
        }
        while self.chunks.front().is_some_and(|c| c.live == 0) {
            self.chunks.pop_front();
            self.first_chunk += 1;
        }
        Ok(())
    }

    /// Rewrites the live rows of chunks `ids` (consecutive, oldest first) into the first.
    fn compact(&mut self, ids: &[u64]) -> Result<()> {
        let mut sources = Vec::new();
        let mut picks = Vec::new();
        let mut owners = Vec::new();
        for (s, &id) in ids.iter().enumerate() {
            let chunk = &self.chunks[(id - self.first_chunk) as usize];
            sources.push(&chunk.rows);
            for (row, &owner) in chunk.owners.iter().enumerate() {
                if owner != DEAD {
                    picks.push((s, row));
                    owners.push(owner);
                }
            }
        }
        let rows = if sources.len() == 1 {
            let indices = UInt32Array::from_iter_values(picks.iter().map(|p| p.1 as u32));
            take_record_batch(sources[0], &indices)?
        } else {
            datafusion::arrow::compute::interleave_record_batch(&sources, &picks)?
        };
        let target = ids[0];
        for (row, &owner) in owners.iter().enumerate() {
            self.entries[owner as usize]
                .as_mut()
                .expect("an owner is live")
                .loc = (target, row as u32);
        }
        let live = owners.len();
        *self.chunk_mut(target) = Chunk { rows, owners, live };
        for &id in ids[1..].iter().rev() {
            // Only the newest chunks are merged, so the others are at the back.
            debug_assert_eq!(id, self.first_chunk + self.chunks.len() as u64 - 1);
            self.chunks.pop_back();
        }
        Ok(())
    }

    /// Bytes held: chunk arrays plus the entries and their encoded rows.
    pub fn size(&self) -> usize {
        self.chunks
            .iter()
            .map(|c| c.rows.get_array_memory_size() + c.owners.capacity() * 4)
            .sum::<usize>()
            + self.key_bytes
            + self.live * ENTRY_OVERHEAD
            + self.deadlines.len() * 32
    }

    /// Every live entry's row, in the order of `ids`.
    pub fn gather(&self, ids: &[EntryId]) -> Result<RecordBatch> {
        let locs: Vec<Loc> = ids.iter().map(|&id| self.entry(id).loc).collect();
        self.rows_at(&locs)
    }

    /// The rows of entries `ids`, consecutive rows of one chunk ([`Side::run_len`]), as a
    /// slice sharing the chunk's buffers.
    pub fn run_rows(&self, ids: &[EntryId]) -> RecordBatch {
        debug_assert_eq!(self.run_len(ids), ids.len());
        let (chunk, first) = self.entry(ids[0]).loc;
        self.chunk_rows(chunk).slice(first as usize, ids.len())
    }

    /// How many of `ids`, from the first, are consecutive rows of one chunk.
    pub fn run_len(&self, ids: &[EntryId]) -> usize {
        let Some(&first) = ids.first() else {
            return 0;
        };
        let (chunk, row) = self.entry(first).loc;
        1 + ids[1..]
            .iter()
            .enumerate()
            .take_while(|&(i, &id)| self.entry(id).loc == (chunk, row + 1 + i as u32))
            .count()
    }

    /// The rows at `locs`.
    pub fn rows_at(&self, locs: &[Loc]) -> Result<RecordBatch> {
        let mut slot: HashMap<u64, usize> = HashMap::new();
        let mut sources: Vec<&RecordBatch> = Vec::new();
        let picks: Vec<(usize, usize)> = locs
            .iter()
            .map(|&(chunk, row)| {
                let s = *slot.entry(chunk).or_insert_with(|| {
                    sources.push(self.chunk_rows(chunk));
                    sources.len() - 1
                });
                (s, row as usize)
            })
            .collect();
        if sources.is_empty() {
            return Ok(RecordBatch::new_empty(self.schema.clone()));
        }
        Ok(datafusion::arrow::compute::interleave_record_batch(
            &sources, &picks,
        )?)
    }
}

#[cfg(test)]
mod tests {
    use datafusion::arrow::array::Int64Array;
    use datafusion::arrow::datatypes::{DataType, Field, Schema};

    use super::*;

    fn batch(values: &[i64]) -> RecordBatch {
        let schema = Arc::new(Schema::new(vec![Field::new("v", DataType::Int64, false)]));
        RecordBatch::try_new(schema, vec![Arc::new(Int64Array::from(values.to_vec()))]).unwrap()
    }

    fn values(side: &Side) -> Vec<i64> {
        let mut ids = side.live_ids();
        ids.sort_by_key(|&id| side.entry(id).full.as_deref().map(<[u8]>::to_vec));
        let rows = side.gather(&ids).unwrap();
        let col = rows
            .column(0)
            .as_any()
            .downcast_ref::<Int64Array>()
            .unwrap();
        let mut v: Vec<i64> = col.values().to_vec();
        v.sort();
        v
    }

    #[test]
    fn keys_inline_or_boxed_find_their_entries_and_go_with_the_last() {
        let mut side = Side::new(batch(&[]).schema(), false);
        let chunk = side.push_chunk(batch(&(0..8).collect::<Vec<_>>()));
        // Lengths around the inline limit; two rows for each key.
        let keys: Vec<Vec<u8>> = [0, 1, INLINE_KEY, INLINE_KEY + 1, 100]
            .iter()
            .map(|&n| vec![7; n])
            .collect();
        let mut ids = Vec::new();
        for (row, key) in keys.iter().chain(keys.iter()).enumerate() {
            let loc = (chunk, (row % 8) as u32);
            ids.push((key.clone(), side.insert(key, &[], loc, 0, (0, 0))));
        }
        for key in &keys {
            let expected: Vec<EntryId> =
                ids.iter().filter(|(k, _)| k == key).map(|p| p.1).collect();
            assert_eq!(side.candidates(key), expected);
        }
        assert!(side.candidates(&[7; 2]).is_empty());
        for (i, (key, id)) in ids.iter().enumerate() {
            side.remove(*id);
            let left: Vec<EntryId> = ids[i + 1..]
                .iter()
                .filter(|(k, _)| k == key)
                .map(|p| p.1)
                .collect();
            assert_eq!(side.candidates(key), left, "key of {} bytes", key.len());
        }
        assert_eq!(side.key_bytes, 0);
        assert_eq!(side.by_key.len(), 0);
    }

    #[test]
    fn chunks_merge_and_shrink_while_entries_keep_their_rows() {
        let mut side = Side::new(batch(&[]).schema(), true);
        let mut next = 0i64;
        let mut ids = Vec::new();
        for round in 0..40 {
            let n = 1 + round % 7;
            let vals: Vec<i64> = (next..next + n).collect();
            next += n;
            let chunk = side.push_chunk(batch(&vals));
            for (row, v) in vals.iter().enumerate() {
                let bytes = v.to_be_bytes();
                ids.push(side.insert(&bytes[..1], &bytes, (chunk, row as u32), 0, (0, 0)));
            }
            // Remove every third row inserted so far that is still there.
            if round % 3 == 0 {
                for id in ids.iter().step_by(3) {
                    if side.is_live(*id) {
                        side.remove(*id);
                    }
                }
            }
            side.settle().unwrap();
            assert!(side.chunks.len() <= 12, "{} chunks", side.chunks.len());
        }
        let expected: Vec<i64> = {
            let mut v: Vec<i64> = side
                .live_ids()
                .iter()
                .map(|&id| {
                    i64::from_be_bytes(side.entry(id).full.as_deref().unwrap().try_into().unwrap())
                })
                .collect();
            v.sort();
            v
        };
        assert_eq!(values(&side), expected);
        assert_eq!(side.len(), expected.len());
        for id in side.live_ids() {
            side.remove(id);
        }
        side.settle().unwrap();
        assert_eq!(side.chunks.len(), 0);
        assert_eq!(side.size(), 0);
    }
}
