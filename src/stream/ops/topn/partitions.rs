//! The TopN's partitions in memory: slots numbered once, found by key through a hash
//! table of slot numbers. The lists of partitions to emit or snapshot name slots, so a
//! barrier reaches each partition without looking its key up again, and a partition
//! costs no allocation of its own (Nexmark q18 makes a partition of almost every row).
//!
//! Slots live in fixed pages, so growing never moves them; a slot freed is reused by the
//! next partition, so a list may name a slot that since holds another partition: its
//! users check the partition's own flags.

use std::hash::BuildHasher;
use std::sync::Arc;

use hashbrown::{DefaultHashBuilder, HashTable};

use super::Partition;

/// A slot's number.
pub(super) type Id = u32;

/// Slots per page (about half a MiB of them).
const PAGE: usize = 4096;

struct Slot {
    /// `None` while the slot is free.
    key: Option<Arc<[u8]>>,
    partition: Partition,
}

/// What a partition costs besides its key and rows: its slot and index entry.
pub(super) const SLOT_BYTES: usize = std::mem::size_of::<Slot>() + std::mem::size_of::<(Id, u32)>();

#[derive(Default)]
pub(super) struct Partitions {
    pages: Vec<Vec<Slot>>,
    free: Vec<Id>,
    /// Each partition's slot and the low half of its key's hash: growing the table
    /// rehashes from the entries alone, and a probe compares keys only on equal hashes.
    index: HashTable<(Id, u32)>,
    hasher: DefaultHashBuilder,
}

/// The table's hash of a key's 32-bit hash: its tag bits (the top ones) depend on all of
/// them, and its low bits are a bijection of theirs.
fn spread(hash: u32) -> u64 {
    (hash as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15)
}

impl Partitions {
    pub(super) fn len(&self) -> usize {
        self.index.len()
    }

    fn hash(&self, key: &[u8]) -> u32 {
        self.hasher.hash_one(key) as u32
    }

    fn slot(&self, id: Id) -> &Slot {
        &self.pages[id as usize / PAGE][id as usize % PAGE]
    }

    fn slot_mut(&mut self, id: Id) -> &mut Slot {
        &mut self.pages[id as usize / PAGE][id as usize % PAGE]
    }

    /// The slot holding `key`'s partition.
    pub(super) fn find(&self, key: &[u8]) -> Option<Id> {
        let hash = self.hash(key);
        self.index
            .find(spread(hash), |&(id, h)| {
                h == hash && self.slot(id).key.as_deref() == Some(key)
            })
            .map(|&(id, _)| id)
    }

    pub(super) fn contains(&self, key: &[u8]) -> bool {
        self.find(key).is_some()
    }

    pub(super) fn get_mut(&mut self, key: &[u8]) -> Option<&mut Partition> {
        let id = self.find(key)?;
        Some(&mut self.slot_mut(id).partition)
    }

    /// The key and partition in slot `id`, if it holds one.
    /// (A listed slot may be gone with its page, see [`Partitions::remove_at`].)
    pub(super) fn at(&self, id: Id) -> Option<(&Arc<[u8]>, &Partition)> {
        let slot = self
            .pages
            .get(id as usize / PAGE)?
            .get(id as usize % PAGE)?;
        slot.key.as_ref().map(|key| (key, &slot.partition))
    }

    pub(super) fn at_mut(&mut self, id: Id) -> Option<(&Arc<[u8]>, &mut Partition)> {
        let page = self.pages.get_mut(id as usize / PAGE)?;
        let slot = page.get_mut(id as usize % PAGE)?;
        slot.key.as_ref().map(|key| (key, &mut slot.partition))
    }

    /// The slot of `key`'s partition and the partition, made by `new` if there was none
    /// (and then `true`).
    pub(super) fn find_or_insert(
        &mut self,
        key: &[u8],
        new: impl FnOnce() -> Partition,
    ) -> (Id, bool, &mut Partition) {
        let hash = self.hash(key);
        let pages = &self.pages;
        let found = self.index.find(spread(hash), |&(id, h)| {
            h == hash && pages[id as usize / PAGE][id as usize % PAGE].key.as_deref() == Some(key)
        });
        let (id, created) = match found {
            Some(&(id, _)) => (id, false),
            None => (self.put(hash, key.into(), new()), true),
        };
        (id, created, &mut self.slot_mut(id).partition)
    }

    /// Adds `key`'s partition, which must not be there yet.
    pub(super) fn insert(&mut self, key: Arc<[u8]>, partition: Partition) -> Id {
        debug_assert!(!self.contains(&key));
        let hash = self.hash(&key);
        self.put(hash, key, partition)
    }

    fn put(&mut self, hash: u32, key: Arc<[u8]>, partition: Partition) -> Id {
        let slot = Slot {
            key: Some(key),
            partition,
        };
        let id = match self.free.pop() {
            Some(id) => {
                *self.slot_mut(id) = slot;
                id
            }
            None => {
                if self.pages.last().is_none_or(|p| p.len() == PAGE) {
                    self.pages.push(Vec::with_capacity(PAGE));
                }
                let id = ((self.pages.len() - 1) * PAGE + self.pages.last().expect("a page").len())
                    as Id;
                self.pages.last_mut().expect("a page").push(slot);
                id
            }
        };
        self.index
            .insert_unique(spread(hash), (id, hash), |&(_, h)| spread(h));
        id
    }

    /// Asks for the memory of the first row of slot `id`'s partition ahead of its use.
    pub(super) fn prefetch(&self, id: Id) {
        if let Some((_, p)) = self.at(id) {
            p.rows.prefetch_first();
        }
    }

    /// Takes `key`'s partition out.
    pub(super) fn remove(&mut self, key: &[u8]) -> Option<(Arc<[u8]>, Partition)> {
        let id = self.find(key)?;
        Some(self.remove_at(id))
    }

    /// Takes the partition of slot `id` (which holds one) out, freeing the slot. The
    /// last partition out gives back the pages but the first (a burst of partitions
    /// gone by their TTL would otherwise keep its slots for good).
    pub(super) fn remove_at(&mut self, id: Id) -> (Arc<[u8]>, Partition) {
        let slot = std::mem::replace(
            self.slot_mut(id),
            Slot {
                key: None,
                partition: Partition::default(),
            },
        );
        let key = slot.key.expect("a partition in the slot");
        let hash = self.hash(&key);
        self.index
            .find_entry(spread(hash), |&(at, _)| at == id)
            .expect("indexed")
            .remove();
        self.free.push(id);
        if self.index.is_empty() && self.pages.len() > 1 {
            self.pages.truncate(1);
            self.pages[0].clear();
            self.free.clear();
            self.index.shrink_to_fit(|_| unreachable!("empty"));
        }
        (key, slot.partition)
    }

    /// Every partition with its slot and key.
    pub(super) fn iter(&self) -> impl Iterator<Item = (Id, &Arc<[u8]>, &Partition)> {
        self.pages
            .iter()
            .flatten()
            .enumerate()
            .filter_map(|(id, slot)| {
                slot.key
                    .as_ref()
                    .map(|key| (id as Id, key, &slot.partition))
            })
    }

    pub(super) fn iter_mut(&mut self) -> impl Iterator<Item = (Id, &Arc<[u8]>, &mut Partition)> {
        self.pages
            .iter_mut()
            .flatten()
            .enumerate()
            .filter_map(|(id, slot)| {
                slot.key
                    .as_ref()
                    .map(|key| (id as Id, key, &mut slot.partition))
            })
    }

    #[cfg(test)]
    pub(super) fn values(&self) -> impl Iterator<Item = &Partition> {
        self.iter().map(|(_, _, p)| p)
    }

    pub(super) fn values_mut(&mut self) -> impl Iterator<Item = &mut Partition> {
        self.iter_mut().map(|(_, _, p)| p)
    }

    /// The slots of the partitions `pick` says yes to, every partition asked once.
    pub(super) fn slots_where(&mut self, mut pick: impl FnMut(&mut Partition) -> bool) -> Vec<Id> {
        self.iter_mut()
            .filter_map(|(id, _, p)| pick(p).then_some(id))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_present(present: i64) -> Partition {
        Partition {
            present,
            ..Partition::default()
        }
    }

    #[test]
    fn slots_are_found_by_key_freed_and_reused() {
        let mut parts = Partitions::default();
        let keys: Vec<Vec<u8>> = (0..PAGE as u32 + 10)
            .map(|i| i.to_le_bytes().to_vec())
            .collect();
        for (i, key) in keys.iter().enumerate() {
            let (id, new, p) = parts.find_or_insert(key, || with_present(i as i64));
            assert_eq!((id, new, p.present), (i as Id, true, i as i64));
        }
        let (id, new, p) = parts.find_or_insert(&keys[7], Partition::default);
        assert_eq!((id, new, p.present), (7, false, 7));
        assert_eq!(parts.len(), keys.len());
        // Across the page boundary too.
        let last = keys.len() - 1;
        assert_eq!(parts.at(last as Id).unwrap().1.present, last as i64);
        let (key, p) = parts.remove(&keys[3]).unwrap();
        assert_eq!((&*key, p.present), (&keys[3][..], 3));
        assert!(parts.at(3).is_none() && !parts.contains(&keys[3]));
        assert_eq!(parts.len(), keys.len() - 1);
        // The freed slot takes the next partition; the others stay where they were.
        let id = parts.insert(Arc::from(&b"new"[..]), with_present(-1));
        assert_eq!(id, 3);
        assert_eq!(parts.get_mut(b"new").unwrap().present, -1);
        assert_eq!(parts.find(&keys[4]), Some(4));
        let odd = parts.slots_where(|p| p.present % 2 != 0);
        assert!(odd
            .iter()
            .all(|&id| parts.at(id).unwrap().1.present % 2 != 0));
        assert_eq!(odd.len(), keys.len() / 2);
        for id in odd {
            parts.remove_at(id);
        }
        assert!(parts.values().all(|p| p.present % 2 == 0));
        assert_eq!(parts.iter().count(), parts.len());
        // The last one out gives back all pages but the first; old slot numbers find
        // nothing, and numbering starts again.
        let all = parts.slots_where(|_| true);
        for &id in &all {
            parts.remove_at(id);
        }
        assert_eq!((parts.len(), parts.pages.len()), (0, 1));
        assert!(all.iter().all(|&id| parts.at(id).is_none()));
        parts.prefetch(all[all.len() - 1]);
        assert_eq!(parts.find_or_insert(b"again", Partition::default).0, 0);
    }
}
