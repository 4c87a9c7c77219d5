//! Many small records by key, kept on disk as few large ones. A record per group or
//! partition in sled made millions of small ones cost more memory than the state they
//! held (sled's memory grows with the number of records, spacejam/sled#1093). Here the
//! records moved together are packed into runs of about [`RUN_BYTES`], kept in scratch
//! files ([`RunFiles`]), and an index in memory says which run holds a key and where:
//! finding that a key is not on disk costs no read at all, and taking one back reads one
//! run.
//!
//! The index holds a 64-bit hash of each key, not the key (a boxed key cost as much
//! again as its slot: about 80 bytes a key in all, 40 now), so a hit is confirmed
//! against the key stored in the run, which the take reads anyway. A key whose hash
//! another stored key has goes to a second, exact index.
//!
//! A run is a sequence of (key length, key, value length, value). The index is the truth:
//! an entry of a run the index does not point at is dead. A run whose last live entry
//! goes is deleted; one that falls below half live when an entry is taken has its live
//! entries written again as a new run, so dead bytes stay below the bytes taken.

use datafusion::common::{DataFusionError, HashMap, HashSet, Result};

use super::files::{RunFiles, RunPlace};
use super::KeyHasher;

/// Bytes of entries packed into one run.
const RUN_BYTES: usize = 16 << 10;

/// An entry of a run: key, value and the value's slot.
type RunEntry<'a> = (&'a [u8], &'a [u8], Slot);

/// What reads hand each key and value to.
pub type Visit<'a> = dyn FnMut(&[u8], &[u8]) -> Result<()> + 'a;

/// What [`RunStore::visit`] hands each key found to: its position, slot and value.
type VisitSlot<'a> = dyn FnMut(usize, Slot, &[u8]) -> Result<()> + 'a;

/// Where a key's value is: its run, where its entry starts in the run (so that its key
/// is read without walking the entries before it), and the value's length.
#[derive(Clone, Copy, PartialEq, Eq)]
struct Slot {
    run: u64,
    offset: u32,
    len: u32,
}

#[derive(Default)]
struct Run {
    /// Bytes of the run's entries.
    total: usize,
    /// Bytes of its entries the index still points at.
    live: usize,
}

pub struct RunStore {
    files: RunFiles,
    /// Hash of a key -> its slot, for the first stored key of each hash.
    index: HashMap<u64, Slot>,
    /// Keys whose hash another stored key holds in `index`.
    collided: HashMap<Box<[u8]>, Slot>,
    hasher: KeyHasher,
    runs: HashMap<u64, Run>,
    next_run: u64,
    /// Bytes of live keys and values.
    bytes: usize,
}

/// The bytes an entry takes in a run, beside its key and value.
const ENTRY_HEADER: usize = 8;

fn entry_size(key: &[u8], value_len: usize) -> usize {
    ENTRY_HEADER + key.len() + value_len
}

impl RunStore {
    pub fn new(files: RunFiles) -> Self {
        Self {
            files,
            index: HashMap::default(),
            collided: HashMap::default(),
            hasher: KeyHasher::default(),
            runs: HashMap::default(),
            next_run: 0,
            bytes: 0,
        }
    }

    /// Bytes of the live keys and values.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    pub fn len(&self) -> usize {
        self.index.len() + self.collided.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn hash(&self, key: &[u8]) -> u64 {
        self.hasher.hash(key)
    }

    /// Takes `key` (stored at `slot`, as [`RunStore::visit`] found) out of the indexes.
    fn unindex(&mut self, key: &[u8], slot: Slot) {
        if self.collided.remove(key).is_none() {
            let removed = self.index.remove(&self.hash(key));
            debug_assert!(removed == Some(slot));
        }
    }

    /// Writes the records, replacing those of the same keys; a key given twice keeps
    /// its last value.
    pub fn put_all<'a>(
        &mut self,
        records: impl IntoIterator<Item = (&'a [u8], &'a [u8])>,
    ) -> Result<()> {
        let records: Vec<(&[u8], &[u8])> = records.into_iter().collect();
        // A key's last record: earlier ones would be entries of this very call to
        // replace.
        let mut seen: HashSet<&[u8]> = HashSet::default();
        let mut last = vec![false; records.len()];
        for (i, (key, _)) in records.iter().enumerate().rev() {
            last[i] = seen.insert(*key);
        }
        let kept: Vec<(&[u8], &[u8])> = records
            .iter()
            .zip(&last)
            .filter(|(_, last)| **last)
            .map(|(record, _)| *record)
            .collect();
        // The slots the keys replace, all found at once: each run holding some is read
        // once (a lookup per key read a run per key).
        let keys: Vec<&[u8]> = kept.iter().map(|(key, _)| *key).collect();
        let mut replaced: Vec<Option<Slot>> = vec![None; kept.len()];
        self.visit(&keys, &mut |i, slot, _| {
            replaced[i] = Some(slot);
            Ok(())
        })?;
        let mut run: Vec<u8> = Vec::new();
        let mut slots: Vec<(&[u8], Slot, Option<Slot>)> = Vec::new();
        for (&(key, value), old) in kept.iter().zip(replaced) {
            if run.len() >= RUN_BYTES {
                self.seal(&mut run, &mut slots)?;
            }
            let offset = run.len();
            run.extend_from_slice(&(key.len() as u32).to_le_bytes());
            run.extend_from_slice(key);
            run.extend_from_slice(&(value.len() as u32).to_le_bytes());
            run.extend_from_slice(value);
            let slot = Slot {
                run: self.next_run,
                offset: offset as u32,
                len: value.len() as u32,
            };
            slots.push((key, slot, old));
        }
        if !run.is_empty() {
            self.seal(&mut run, &mut slots)?;
        }
        Ok(())
    }

    /// Ends the run being built: indexes its entries (releasing the slots they replace,
    /// given with them) and writes it.
    fn seal(
        &mut self,
        run: &mut Vec<u8>,
        slots: &mut Vec<(&[u8], Slot, Option<Slot>)>,
    ) -> Result<()> {
        let id = self.next_run;
        self.next_run += 1;
        self.files.put(id, run)?;
        let mut info = Run {
            total: run.len(),
            live: 0,
        };
        run.clear();
        for (key, slot, old) in slots.drain(..) {
            if let Some(old) = old {
                self.unindex(key, old);
                self.release(old, entry_size(key, old.len as usize))?;
            }
            let hash = self.hash(key);
            if self.index.contains_key(&hash) {
                self.collided.insert(key.into(), slot);
            } else {
                self.index.insert(hash, slot);
            }
            let size = entry_size(key, slot.len as usize);
            info.live += size;
            self.bytes += size - ENTRY_HEADER;
        }
        self.runs.insert(id, info);
        Ok(())
    }

    /// A slot is no longer pointed at: its run loses `size` live bytes and goes when
    /// nothing in it is live (whether it went).
    fn release(&mut self, slot: Slot, size: usize) -> Result<()> {
        self.bytes -= size - ENTRY_HEADER;
        let run = self.runs.get_mut(&slot.run).expect("a run of the index");
        run.live -= size;
        if run.live == 0 {
            self.runs.remove(&slot.run);
            self.files.remove(slot.run)?;
        }
        Ok(())
    }

    /// Takes the value of `key` out of the store.
    pub fn take(&mut self, key: &[u8]) -> Result<Option<Vec<u8>>> {
        Ok(self.take_all(&[key])?.pop().map(|(_, value)| value))
    }

    /// Deletes `key`'s value; whether there was one.
    pub fn remove(&mut self, key: &[u8]) -> Result<bool> {
        Ok(!self.take_all(&[key])?.is_empty())
    }

    /// Takes the values of `keys` (distinct) out of the store, each run read once: the
    /// position in `keys` and the value of each key found. Runs that fall below half
    /// live have what is left written again as new runs.
    pub fn take_all(&mut self, keys: &[&[u8]]) -> Result<Vec<(usize, Vec<u8>)>> {
        let mut found: Vec<(usize, Slot, Vec<u8>)> = Vec::new();
        self.visit(keys, &mut |i, slot, value| {
            found.push((i, slot, value.to_vec()));
            Ok(())
        })?;
        let taken: Vec<(&[u8], Slot)> =
            found.iter().map(|(i, slot, _)| (keys[*i], *slot)).collect();
        self.release_taken(&taken)?;
        Ok(found.into_iter().map(|(i, _, value)| (i, value)).collect())
    }

    /// The hash the index files `key` under: who lists keys on disk by it (instead of
    /// keeping the keys) takes them back with [`RunStore::take_hashed`].
    pub fn hash_of(&self, key: &[u8]) -> u64 {
        self.hash(key)
    }

    /// Takes out every key whose hash is one of `hashes` (most often one key a hash),
    /// with its value, each run read once.
    pub fn take_hashed(&mut self, hashes: &[u64]) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
        let wanted: HashSet<u64> = hashes.iter().copied().collect();
        let mut slots: Vec<Slot> = wanted
            .iter()
            .filter_map(|h| self.index.get(h).copied())
            .collect();
        slots.extend(
            self.collided
                .iter()
                .filter(|(key, _)| wanted.contains(&self.hash(key)))
                .map(|(_, slot)| *slot),
        );
        slots.sort_unstable_by_key(|s| (s.run, s.offset));
        let mut found: Vec<(Vec<u8>, Slot, Vec<u8>)> = Vec::with_capacity(slots.len());
        let mut current: Option<(u64, Vec<u8>)> = None;
        for slot in slots {
            if current.as_ref().is_none_or(|(run, _)| *run != slot.run) {
                current = Some((slot.run, self.read_run(slot.run)?));
            }
            let (_, record) = current.as_ref().expect("read");
            found.push((
                key_at(record, slot)?.to_vec(),
                slot,
                value_at(record, slot)?.to_vec(),
            ));
        }
        let taken: Vec<(&[u8], Slot)> = found
            .iter()
            .map(|(key, slot, _)| (key.as_slice(), *slot))
            .collect();
        self.release_taken(&taken)?;
        Ok(found
            .into_iter()
            .map(|(key, _, value)| (key, value))
            .collect())
    }

    /// Takes the entries found at their slots out of the indexes; runs that fall below
    /// half live have what is left written again.
    fn release_taken(&mut self, taken: &[(&[u8], Slot)]) -> Result<()> {
        // Every entry is released before any run is rewritten: a rewrite moves the
        // entries of its run still indexed.
        for (key, slot) in taken {
            self.unindex(key, *slot);
            self.release(*slot, entry_size(key, slot.len as usize))?;
        }
        let mut runs: Vec<u64> = taken.iter().map(|(_, slot)| slot.run).collect();
        runs.sort_unstable();
        runs.dedup();
        for run in runs {
            self.compact_if_sparse(run)?;
        }
        Ok(())
    }

    /// Writes the live entries of run `id` again as a new run when less than half of it
    /// is live.
    fn compact_if_sparse(&mut self, id: u64) -> Result<()> {
        if self
            .runs
            .get(&id)
            .is_none_or(|run| run.live * 2 >= run.total)
        {
            return Ok(());
        }
        let record = self.read_run(id)?;
        let live = self.live_entries(&record, id)?;
        self.runs.remove(&id);
        self.files.remove(id)?;
        for (k, v, at) in &live {
            self.bytes -= k.len() + v.len();
            self.unindex(k, *at);
        }
        self.put_all(live.iter().map(|(k, v, _)| (*k, *v)))
    }

    /// The values of `keys` (those in the store), each run read once, handed to `f`.
    pub fn read(&self, keys: &[&[u8]], f: &mut Visit) -> Result<()> {
        self.visit(keys, &mut |i, _, value| f(keys[i], value))
    }

    /// Hands each of `keys` in the store to `f` with its position in `keys`, its slot
    /// and its value, reading each run once.
    fn visit(&self, keys: &[&[u8]], f: &mut VisitSlot) -> Result<()> {
        if self.is_empty() {
            return Ok(());
        }
        // Candidates by hash, confirmed when their run is read.
        let mut slots: Vec<(Slot, usize)> = keys
            .iter()
            .enumerate()
            .filter_map(|(i, k)| {
                let slot = self
                    .collided
                    .get(*k)
                    .or_else(|| self.index.get(&self.hash(k)));
                slot.map(|s| (*s, i))
            })
            .collect();
        slots.sort_unstable_by_key(|(s, _)| (s.run, s.offset));
        let mut current: Option<(u64, Vec<u8>)> = None;
        for (slot, i) in slots {
            if current.as_ref().is_none_or(|(run, _)| *run != slot.run) {
                current = Some((slot.run, self.read_run(slot.run)?));
            }
            let (_, record) = current.as_ref().expect("read");
            if key_at(record, slot)? == keys[i] {
                f(i, slot, value_at(record, slot)?)?;
            }
        }
        Ok(())
    }

    /// Every live key and value, a run at a time.
    pub fn for_each(&self, f: &mut Visit) -> Result<()> {
        for id in self.files.ids() {
            let record = self.read_run(id)?;
            for (key, value, _) in self.live_entries(&record, id)? {
                f(key, value)?;
            }
        }
        Ok(())
    }

    /// The entries of `keys` (every entry, when `None`) as they are now, to be read
    /// later, off the operator's task, while the store goes on changing.
    pub fn freeze(&self, keys: Option<Vec<Vec<u8>>>) -> Result<FrozenEntries> {
        // The index is the truth: the slots it points at are the live entries.
        let mut slots: Vec<(Slot, Option<usize>)> = match &keys {
            None => self
                .index
                .values()
                .chain(self.collided.values())
                .map(|s| (*s, None))
                .collect(),
            // Candidates by hash, confirmed against their keys when read.
            Some(keys) => keys
                .iter()
                .enumerate()
                .filter_map(|(i, k)| {
                    let slot = self
                        .collided
                        .get(k.as_slice())
                        .or_else(|| self.index.get(&self.hash(k)));
                    slot.map(|s| (*s, Some(i)))
                })
                .collect(),
        };
        slots.sort_unstable_by_key(|(s, _)| (s.run, s.offset));
        let mut runs: Vec<FrozenRun> = Vec::new();
        for (slot, key) in slots {
            if runs.last().is_none_or(|r| r.id != slot.run) {
                runs.push(FrozenRun {
                    id: slot.run,
                    place: self.files.place(slot.run).ok_or_else(corrupt)?,
                    wanted: Vec::new(),
                });
            }
            let run = runs.last_mut().expect("pushed");
            run.wanted.push((slot.offset, key));
        }
        Ok(FrozenEntries {
            runs,
            keys: keys.unwrap_or_default(),
        })
    }

    /// What a snapshot holds on disk, as it is now: every entry when `whole`, else the
    /// entries of `changed` (the keys changed since the previous snapshot), which is
    /// emptied either way as they count as snapshotted; `None` when that is nothing.
    pub fn freeze_snapshot(
        &self,
        changed: &mut datafusion::common::HashSet<Vec<u8>>,
        whole: bool,
    ) -> Result<Option<FrozenEntries>> {
        let keys = if whole {
            changed.clear();
            None
        } else {
            Some(changed.drain().collect())
        };
        let entries = self.freeze(keys)?;
        Ok((!entries.is_empty()).then_some(entries))
    }

    fn read_run(&self, run: u64) -> Result<Vec<u8>> {
        self.files.get(run)?.ok_or_else(corrupt)
    }

    /// The entries of run `id` the indexes still point at, with their slots.
    fn live_entries<'a>(&self, record: &'a [u8], id: u64) -> Result<Vec<RunEntry<'a>>> {
        let mut out = Vec::new();
        for entry in entries(record, id) {
            let (key, value, here) = entry?;
            // A slot names one entry: the index pointing at it is the key's.
            let pointed = self.collided.get(key) == Some(&here)
                || self.index.get(&self.hash(key)) == Some(&here);
            if pointed {
                out.push((key, value, here));
            }
        }
        Ok(out)
    }
}

/// Entries of a [`RunStore`] as they were when frozen: where their runs are, and which
/// of their entries were live. It takes about 4 bytes an entry, as the values stay on
/// disk until read.
pub struct FrozenEntries {
    /// In run order.
    runs: Vec<FrozenRun>,
    /// The keys asked for, when not every entry was.
    keys: Vec<Vec<u8>>,
}

struct FrozenRun {
    id: u64,
    place: RunPlace,
    /// The offsets of the wanted entries in the run, ascending, each with the position
    /// in `keys` of the key it must have (`None`: any, the index pointed at it).
    wanted: Vec<(u32, Option<usize>)>,
}

impl FrozenEntries {
    pub fn is_empty(&self) -> bool {
        self.runs.is_empty()
    }

    /// Each entry, as [`RunStore::for_each`] or [`RunStore::read`] would have handed it
    /// out when frozen, reading each run once.
    pub fn for_each(&self, f: &mut Visit) -> Result<()> {
        for run in &self.runs {
            let record = run.place.read()?;
            let mut wanted = run.wanted.iter().peekable();
            for entry in entries(&record, run.id) {
                let Some(&&(offset, _)) = wanted.peek() else {
                    break;
                };
                let (key, value, here) = entry?;
                if here.offset < offset {
                    continue;
                }
                if here.offset > offset {
                    return Err(corrupt());
                }
                // Keys of one hash may be candidates for the same slot.
                while let Some((_, expected)) = wanted.next_if(|(o, _)| *o == offset) {
                    if expected.is_none_or(|i| self.keys[i] == key) {
                        f(key, value)?;
                    }
                }
            }
            if wanted.peek().is_some() {
                return Err(corrupt());
            }
        }
        Ok(())
    }
}

fn corrupt() -> DataFusionError {
    DataFusionError::Internal("the state backend lost a run of records".into())
}

/// The value of the entry at `slot`.
fn value_at(record: &[u8], slot: Slot) -> Result<&[u8]> {
    entry_of(record, slot).map(|(_, value, _)| value)
}

/// The key of the entry at `slot`.
fn key_at(record: &[u8], slot: Slot) -> Result<&[u8]> {
    entry_of(record, slot).map(|(key, _, _)| key)
}

/// The entry at `slot`, which must be where it says.
fn entry_of(record: &[u8], slot: Slot) -> Result<RunEntry<'_>> {
    let entry = entry_at(record, slot.offset as usize, slot.run)?;
    if entry.2 != slot {
        return Err(corrupt());
    }
    Ok(entry)
}

/// Each entry of run `id`.
fn entries(record: &[u8], id: u64) -> impl Iterator<Item = Result<RunEntry<'_>>> {
    let mut at = 0;
    std::iter::from_fn(move || {
        if at >= record.len() {
            return None;
        }
        let entry = entry_at(record, at, id);
        // After a cut-short entry, nothing more.
        at = entry.as_ref().map_or(record.len(), |(key, value, _)| {
            at + ENTRY_HEADER + key.len() + value.len()
        });
        Some(entry)
    })
}

fn entry_at(record: &[u8], at: usize, id: u64) -> Result<RunEntry<'_>> {
    let u32_at = |at: usize| -> Result<usize> {
        let bytes = record.get(at..at + 4).ok_or_else(corrupt)?;
        Ok(u32::from_le_bytes(bytes.try_into().expect("4 bytes")) as usize)
    };
    let key_len = u32_at(at)?;
    let key = record.get(at + 4..at + 4 + key_len).ok_or_else(corrupt)?;
    let value_len = u32_at(at + 4 + key_len)?;
    let from = at + ENTRY_HEADER + key_len;
    let value = record.get(from..from + value_len).ok_or_else(corrupt)?;
    let slot = Slot {
        run: id,
        offset: at as u32,
        len: value_len as u32,
    };
    Ok((key, value, slot))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store() -> RunStore {
        let dir = std::sync::Arc::new(tempfile::tempdir().unwrap());
        RunStore::new(RunFiles::new(dir))
    }

    fn all(s: &RunStore) -> Vec<(Vec<u8>, Vec<u8>)> {
        let mut out = Vec::new();
        s.for_each(&mut |k, v| {
            out.push((k.to_vec(), v.to_vec()));
            Ok(())
        })
        .unwrap();
        out.sort();
        out
    }

    fn key(i: u32) -> Vec<u8> {
        format!("key{i}").into_bytes()
    }

    #[test]
    fn records_come_back_replaced_and_removed_and_dead_runs_go() {
        for few_hashes in [false, true] {
            let mut s = store();
            // Keys of the same hash go to the exact index.
            s.hasher.few = few_hashes.then_some(3);
            come_back_replaced_and_removed(&mut s);
            assert_eq!(s.collided.len(), 0);
        }
    }

    fn come_back_replaced_and_removed(s: &mut RunStore) {
        let value = vec![7u8; 1000];
        // 100 entries of about 1 KB: several runs.
        let keys: Vec<Vec<u8>> = (0..100).map(key).collect();
        s.put_all(keys.iter().map(|k| (k.as_slice(), value.as_slice())))
            .unwrap();
        assert!(s.files.len() > 4, "{}", s.files.len());
        assert_eq!(s.len(), 100);
        assert_eq!(s.bytes(), 100 * (5 + 1000) - 10);
        assert_eq!(s.take(b"nope").unwrap(), None);
        if s.hasher.few.is_some() {
            assert_eq!(s.collided.len(), 97);
        }
        // Replacing a key (twice in one call: the last wins).
        s.put_all([
            (key(3).as_slice(), &b"new"[..]),
            (key(3).as_slice(), &b"newer"[..]),
        ])
        .unwrap();
        assert_eq!(s.take(&key(3)).unwrap().as_deref(), Some(&b"newer"[..]));
        assert_eq!(s.take(&key(3)).unwrap(), None);
        assert!(s.remove(&key(4)).unwrap());
        assert!(!s.remove(&key(4)).unwrap());
        let mut expected: Vec<(Vec<u8>, Vec<u8>)> = keys
            .iter()
            .filter(|k| **k != key(3) && **k != key(4))
            .map(|k| (k.clone(), value.clone()))
            .collect();
        expected.sort();
        assert_eq!(all(s), expected);
        let mut read = Vec::new();
        s.read(&[&key(9), &key(3), &key(50)], &mut |k, v| {
            read.push((k.to_vec(), v.len()));
            Ok(())
        })
        .unwrap();
        assert_eq!(read, [(key(9), 1000), (key(50), 1000)]);
        // Taking many at once: those there, by position.
        let (k60, k3, k10) = (key(60), key(3), key(10));
        let some: Vec<&[u8]> = vec![b"nope", &k60, &k3, &k10];
        let taken = s.take_all(&some).unwrap();
        let mut positions: Vec<usize> = taken.iter().map(|(i, _)| *i).collect();
        positions.sort();
        assert_eq!(positions, [1, 3]);
        assert!(taken.iter().all(|(_, v)| *v == value));
        assert_eq!(s.len(), 96);
        // Taking everything deletes every run.
        let all_keys: Vec<&[u8]> = keys.iter().map(Vec::as_slice).collect();
        assert_eq!(s.take_all(&all_keys).unwrap().len(), 96);
        assert_eq!(
            (s.len(), s.bytes(), s.files.len(), s.runs.len()),
            (0, 0, 0, 0)
        );
    }

    fn frozen(f: &FrozenEntries) -> Vec<(Vec<u8>, Vec<u8>)> {
        let mut out = Vec::new();
        f.for_each(&mut |k, v| {
            out.push((k.to_vec(), v.to_vec()));
            Ok(())
        })
        .unwrap();
        out
    }

    #[test]
    fn frozen_entries_read_as_they_were_while_the_store_changes() {
        for few_hashes in [false, true] {
            let dir = std::sync::Arc::new(tempfile::tempdir().unwrap());
            let mut s = RunStore::new(RunFiles::with_segment_bytes(dir.clone(), 50_000));
            s.hasher.few = few_hashes.then_some(3);
            let keys: Vec<Vec<u8>> = (0..200).map(key).collect();
            let refs: Vec<&[u8]> = keys.iter().map(Vec::as_slice).collect();
            let values = |version: u8| -> Vec<Vec<u8>> {
                (0..200).map(|i| vec![version; 500 + i]).collect()
            };
            let first = values(1);
            s.put_all(refs.iter().zip(&first).map(|(k, v)| (*k, v.as_slice())))
                .unwrap();
            s.remove(&key(7)).unwrap();
            let before = all(&s);
            let mut read_before = Vec::new();
            let asked = vec![key(9), key(7), key(150), b"nope".to_vec()];
            let asked_refs: Vec<&[u8]> = asked.iter().map(Vec::as_slice).collect();
            s.read(&asked_refs, &mut |k, v| {
                read_before.push((k.to_vec(), v.to_vec()));
                Ok(())
            })
            .unwrap();
            let every = s.freeze(None).unwrap();
            let some = s.freeze(Some(asked.clone())).unwrap();
            // Everything taken, rewritten and replaced: runs and segments go.
            s.take_all(&refs[..150]).unwrap();
            let newer = values(2);
            s.put_all(refs.iter().zip(&newer).map(|(k, v)| (*k, v.as_slice())))
                .unwrap();
            let mut whole = frozen(&every);
            whole.sort();
            assert_eq!(whole, before);
            let mut read = frozen(&some);
            read.sort();
            read_before.sort();
            assert_eq!(read, read_before);
            assert_eq!(read.len(), 2);
            // The files of runs gone are deleted once the frozen entries go.
            let files = || std::fs::read_dir(dir.path()).unwrap().count();
            let held = files();
            drop((every, some));
            assert!(files() < held, "{} files held, {} after", held, files());
            assert_eq!(all(&s).len(), 200);
        }
    }

    /// Keys taken back by their hashes, one hash shared by several keys (the exact
    /// index's) included: each comes back once with its value, and the rest stay.
    #[test]
    fn keys_are_taken_back_by_their_hashes() {
        for few_hashes in [false, true] {
            let mut s = store();
            s.hasher.few = few_hashes.then_some(3);
            let keys: Vec<Vec<u8>> = (0..300).map(key).collect();
            let value = |k: &[u8]| [k, b"-value"].concat();
            let values: Vec<Vec<u8>> = keys.iter().map(|k| value(k)).collect();
            s.put_all(
                keys.iter()
                    .zip(&values)
                    .map(|(k, v)| (k.as_slice(), v.as_slice())),
            )
            .unwrap();
            let asked: Vec<u64> = [5, 77, 150, 299].map(|i| s.hash_of(&key(i))).to_vec();
            let mut taken = s.take_hashed(&asked).unwrap();
            taken.sort();
            let mut expected: Vec<(Vec<u8>, Vec<u8>)> = keys
                .iter()
                .filter(|k| asked.contains(&s.hash_of(k)))
                .map(|k| (k.clone(), value(k)))
                .collect();
            expected.sort();
            assert_eq!(taken, expected);
            if few_hashes {
                assert!(taken.len() > 4, "keys share the hashes asked for");
            } else {
                assert_eq!(taken.len(), 4);
            }
            let left = all(&s);
            assert_eq!(left.len(), 300 - taken.len());
            assert!(left
                .iter()
                .all(|(k, v)| !asked.contains(&s.hash_of(k)) && *v == value(k)));
            assert!(s.take_hashed(&asked).unwrap().is_empty(), "taken once");
        }
    }

    #[test]
    fn a_run_below_half_live_is_written_again() {
        for few_hashes in [false, true] {
            let mut s = store();
            s.hasher.few = few_hashes.then_some(3);
            written_again(&mut s);
        }
    }

    fn written_again(s: &mut RunStore) {
        let value = vec![1u8; 100];
        let keys: Vec<Vec<u8>> = (0..100).map(key).collect();
        // One run of about 10 KB.
        s.put_all(keys.iter().map(|k| (k.as_slice(), value.as_slice())))
            .unwrap();
        assert_eq!(s.files.len(), 1);
        for k in &keys[..51] {
            assert_eq!(s.take(k).unwrap().as_deref(), Some(value.as_slice()));
        }
        // The 49 left moved to a new, fully live run.
        assert_eq!(s.files.len(), 1);
        let run = s.runs.values().next().unwrap();
        assert_eq!(run.live, run.total);
        assert_eq!(all(s).len(), 49);
        assert_eq!(s.bytes(), 49 * (value.len() + 5));
    }
}
