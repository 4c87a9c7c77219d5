//! A vector in fixed blocks: growing it never moves what it holds. A join side's entries
//! grow to millions; in a `Vec` each doubling copied them all into fresh memory the
//! kernel zeroes first (a tenth of Nexmark q20's time) and briefly held both copies.

use std::ops::{Index, IndexMut};

/// Elements per block.
const BLOCK: usize = 4096;

pub struct BlockVec<T> {
    blocks: Vec<Vec<T>>,
    len: usize,
}

impl<T> Default for BlockVec<T> {
    fn default() -> Self {
        Self {
            blocks: Vec::new(),
            len: 0,
        }
    }
}

impl<T> BlockVec<T> {
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn push(&mut self, value: T) {
        if self.len.is_multiple_of(BLOCK) {
            self.blocks.push(Vec::with_capacity(BLOCK));
        }
        self.blocks.last_mut().expect("a block").push(value);
        self.len += 1;
    }

    pub fn get(&self, i: usize) -> Option<&T> {
        self.blocks.get(i / BLOCK).and_then(|b| b.get(i % BLOCK))
    }

    pub fn iter_mut(&mut self) -> impl Iterator<Item = &mut T> {
        self.blocks.iter_mut().flatten()
    }
}

impl<T> Index<usize> for BlockVec<T> {
    type Output = T;

    fn index(&self, i: usize) -> &T {
        &self.blocks[i / BLOCK][i % BLOCK]
    }
}

impl<T> IndexMut<usize> for BlockVec<T> {
    fn index_mut(&mut self, i: usize) -> &mut T {
        &mut self.blocks[i / BLOCK][i % BLOCK]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn elements_stay_where_they_were_put_across_blocks() {
        let mut v = BlockVec::default();
        for i in 0..3 * BLOCK + 5 {
            v.push(i);
        }
        assert_eq!(v.len(), 3 * BLOCK + 5);
        let first = &v[0] as *const usize;
        v.push(0);
        assert_eq!(first, &v[0] as *const usize, "growing moved an element");
        v[BLOCK] = 7;
        assert_eq!(
            (v[BLOCK - 1], v[BLOCK], v[3 * BLOCK + 4]),
            (BLOCK - 1, 7, 3 * BLOCK + 4)
        );
        assert_eq!(v.get(3 * BLOCK + 6), None);
        assert_eq!(
            v.iter_mut().map(|x| *x).sum::<usize>(),
            (0..3 * BLOCK + 5).sum::<usize>() - BLOCK + 7
        );
    }
}
