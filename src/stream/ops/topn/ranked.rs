//! The rows of one TopN partition in rank order, each with how often it is present.
//!
//! A row is stored as its sort key followed by the whole row, both in arrow's row format.
//! That format is prefix-free, so comparing the concatenated bytes orders rows by sort
//! key and breaks ties by the row itself, whatever order they arrived in. Partitions
//! hold few rows (at most N + 1 over inserts only), kept in a sorted vector; a partition
//! of a retracting input that grows past [`FEW`] rows moves into a B-tree.

use std::cmp::Ordering;
use std::collections::BTreeMap;
use std::sync::Arc;

use smallvec::SmallVec;

/// A partition's row: sort key bytes, then row bytes. Shared (not copied) by the
/// partition's emitted rows.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Entry {
    bytes: Arc<[u8]>,
    sort_len: u32,
}

impl Entry {
    pub fn new(sort: &[u8], row: &[u8]) -> Self {
        // Written in place: a Vec turned into an `Arc` is allocated and copied twice.
        let mut bytes = Arc::<[u8]>::new_uninit_slice(sort.len() + row.len());
        let place = Arc::get_mut(&mut bytes).expect("not shared yet");
        let (front, back) = place.split_at_mut(sort.len());
        for (to, from) in [(front, sort), (back, row)] {
            // SAFETY: `to` and `from` have the same length, and `to` is fresh memory.
            unsafe {
                std::ptr::copy_nonoverlapping(from.as_ptr(), to.as_mut_ptr().cast(), from.len())
            };
        }
        Self {
            // SAFETY: both parts were written above.
            bytes: unsafe { bytes.assume_init() },
            sort_len: sort.len() as u32,
        }
    }

    /// Whether both are the same row (often the very same bytes, shared).
    pub fn same_row(&self, other: &Entry) -> bool {
        Arc::ptr_eq(&self.bytes, &other.bytes) || self.row() == other.row()
    }

    pub fn sort(&self) -> &[u8] {
        &self.bytes[..self.sort_len as usize]
    }

    pub fn row(&self) -> &[u8] {
        &self.bytes[self.sort_len as usize..]
    }

    /// Heap and inline bytes, for `SHOW JOBS`.
    pub fn size(&self) -> usize {
        self.bytes.len() + ENTRY_OVERHEAD
    }

    /// How this entry ranks against the row `(sort, row)`.
    fn cmp_parts(&self, sort: &[u8], row: &[u8]) -> Ordering {
        self.sort().cmp(sort).then_with(|| self.row().cmp(row))
    }
}

/// An entry's own fields, its count and its shared allocation's counts, beside its bytes.
const ENTRY_OVERHEAD: usize = 48;

/// Rows past which a partition moves from a sorted vector into a B-tree.
const FEW: usize = 32;

/// A partition's rows while few: one of them inline (a dedup's partition holds one row,
/// and most partitions of a TopN over many keys hold a handful), the rest on the heap.
type FewRows = SmallVec<[(Entry, i64); 1]>;

#[derive(Clone)]
pub enum Ranked {
    Few(FewRows),
    Many(BTreeMap<Entry, i64>),
}

impl Default for Ranked {
    fn default() -> Self {
        Ranked::Few(FewRows::new())
    }
}

impl Ranked {
    pub fn is_empty(&self) -> bool {
        match self {
            Ranked::Few(v) => v.is_empty(),
            Ranked::Many(m) => m.is_empty(),
        }
    }

    /// Adds `count` copies of the row (a negative count removes them); returns how many
    /// bytes of state that added (negative when an entry went away).
    pub fn add(&mut self, sort: &[u8], row: &[u8], count: i64) -> isize {
        match self {
            Ranked::Few(v) => match v.binary_search_by(|(e, _)| e.cmp_parts(sort, row)) {
                Ok(at) => {
                    v[at].1 += count;
                    if v[at].1 == 0 {
                        let (gone, _) = v.remove(at);
                        return -(gone.size() as isize);
                    }
                    0
                }
                Err(at) => {
                    let entry = Entry::new(sort, row);
                    let size = entry.size() as isize;
                    v.insert(at, (entry, count));
                    if v.len() > FEW {
                        *self = Ranked::Many(std::mem::take(v).into_iter().collect());
                    }
                    size
                }
            },
            Ranked::Many(m) => {
                let entry = Entry::new(sort, row);
                let size = entry.size() as isize;
                match m.entry(entry) {
                    std::collections::btree_map::Entry::Occupied(mut o) => {
                        *o.get_mut() += count;
                        if *o.get() == 0 {
                            o.remove();
                            return -size;
                        }
                        0
                    }
                    std::collections::btree_map::Entry::Vacant(v) => {
                        v.insert(count);
                        size
                    }
                }
            }
        }
    }

    /// Whether the row `(sort, row)` ranks before the last row.
    pub fn before_last(&self, sort: &[u8], row: &[u8]) -> bool {
        let last = match self {
            Ranked::Few(v) => v.last().map(|(e, _)| e),
            Ranked::Many(m) => m.last_key_value().map(|(e, _)| e),
        };
        last.is_none_or(|e| e.cmp_parts(sort, row) == Ordering::Greater)
    }

    /// Removes up to `n` copies of the last row; returns how many were removed and the
    /// bytes of state that freed.
    pub fn drop_last(&mut self, n: i64) -> (i64, usize) {
        let last = match self {
            Ranked::Few(v) => v.last_mut().map(|(_, c)| c),
            Ranked::Many(m) => m.values_mut().next_back(),
        };
        let Some(count) = last else {
            return (0, 0);
        };
        let removed = n.min(*count);
        *count -= removed;
        if *count > 0 {
            return (removed, 0);
        }
        let gone = match self {
            Ranked::Few(v) => v.pop().map(|(e, _)| e),
            Ranked::Many(m) => m.pop_last().map(|(e, _)| e),
        };
        (removed, gone.map_or(0, |e| e.size()))
    }

    /// Entries in rank order with their counts.
    pub fn iter(&self) -> Iter<'_> {
        match self {
            Ranked::Few(v) => Iter::Few(v.iter()),
            Ranked::Many(m) => Iter::Many(m.iter()),
        }
    }

    /// Asks the CPU for the first row's memory ahead of its use (a barrier walks
    /// millions of partitions, each row's a cache miss).
    pub fn prefetch_first(&self) {
        let first = match self {
            Ranked::Few(v) => v.first().map(|(e, _)| e),
            Ranked::Many(_) => None,
        };
        if let Some(entry) = first {
            prefetch(Arc::as_ptr(&entry.bytes).cast());
        }
    }
}

/// [`Ranked::iter`]: not boxed, as it runs for every partition a barrier emits.
pub enum Iter<'a> {
    Few(std::slice::Iter<'a, (Entry, i64)>),
    Many(std::collections::btree_map::Iter<'a, Entry, i64>),
}

impl<'a> Iterator for Iter<'a> {
    type Item = (&'a Entry, i64);

    fn next(&mut self) -> Option<Self::Item> {
        match self {
            Iter::Few(it) => it.next().map(|(e, c)| (e, *c)),
            Iter::Many(it) => it.next().map(|(e, c)| (e, *c)),
        }
    }
}

/// Brings the cache line at `at` in (nothing where the target has no such hint).
fn prefetch(at: *const u8) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: a prefetch is only a hint: it never faults, whatever the address.
    unsafe {
        std::arch::x86_64::_mm_prefetch(at.cast(), std::arch::x86_64::_MM_HINT_T0)
    };
    #[cfg(not(target_arch = "x86_64"))]
    let _ = at;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rows(r: &Ranked) -> Vec<(Vec<u8>, Vec<u8>, i64)> {
        r.iter()
            .map(|(e, c)| (e.sort().to_vec(), e.row().to_vec(), c))
            .collect()
    }

    #[test]
    fn rows_rank_by_sort_key_then_row_in_both_shapes() {
        for n in [3u8, 40] {
            let mut r = Ranked::default();
            let mut bytes = 0isize;
            // Arrival order is reversed; ties on the sort key rank by the row.
            for i in (0..n).rev() {
                bytes += r.add(&[i / 2], &[i], 1);
            }
            assert_eq!(matches!(r, Ranked::Many(_)), n as usize > FEW);
            let got = rows(&r);
            assert_eq!(got.len(), n as usize);
            assert!(got
                .windows(2)
                .all(|w| (&w[0].0, &w[0].1) < (&w[1].0, &w[1].1)));
            assert!(r.before_last(&[0], &[0]));
            assert!(!r.before_last(&[(n - 1) / 2], &[n - 1]));
            // A second copy counts; removing both frees the entry.
            assert_eq!(r.add(&[0], &[0], 1), 0);
            assert_eq!(r.add(&[0], &[0], -2), -((2 + ENTRY_OVERHEAD) as isize));
            bytes -= (2 + ENTRY_OVERHEAD) as isize;
            let (removed, freed) = r.drop_last(5);
            assert_eq!((removed, freed), (1, 2 + ENTRY_OVERHEAD));
            bytes -= freed as isize;
            let left: usize = r.iter().map(|(e, _)| e.size()).sum();
            assert_eq!(left as isize, bytes);
        }
    }
}
