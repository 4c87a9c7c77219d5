//! Which of a source's numbered units (generated rows and events, files) a split reads,
//! how far it got, and how that carries over to another number of splits.
//!
//! Split k of n reads the units k, k+n, k+2n, ... in that order; its position is how many
//! of them it passed and how far into the next one it got (a file's byte offset; a row
//! or an event has no inside). Such positions cannot be divided when the source is
//! restored at another parallelism, so they become a claim instead: a *layer* records,
//! for every old split, the units it had passed. Every new split restores all the layers
//! and skips the units they claim (going on inside a unit one of them had begun), and
//! drops them once it is past everything they claim. Rescaled again before that, its
//! position carries its layers on and the next merge adds them to the new one: a claim is
//! a fact about what was read, so the union of all of them is what to skip.
//!
//! Without layers a position is the split's unit count and progress alone, the form the
//! readers stored before they could be rescaled.

use std::fmt::Debug;

use crate::sql::error::{SqlError, SqlResult};

/// How far a split got inside a unit; `Default` is its start.
pub trait UnitProgress: Copy + Default + Ord + Debug {
    /// Its size in a position.
    const BYTES: usize;
    fn put(&self, out: &mut Vec<u8>);
    /// Reads it from exactly [`UnitProgress::BYTES`] bytes.
    fn get(bytes: &[u8]) -> Self;
}

/// Units with no inside: generated rows and events.
impl UnitProgress for () {
    const BYTES: usize = 0;
    fn put(&self, _: &mut Vec<u8>) {}
    fn get(_: &[u8]) -> Self {}
}

/// What one old layout of splits had read: per split, the units it passed and how far
/// into its next unit it got.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Layer<P> {
    splits: u64,
    at: Vec<(u64, P)>,
}

impl<P: UnitProgress> Layer<P> {
    /// Every unit below this one was passed by its split.
    fn floor(&self) -> u64 {
        let n = self.splits;
        (0..n)
            .map(|k| k + self.at[k as usize].0 * n)
            .min()
            .unwrap_or(0)
    }

    /// No unit at or beyond this one is claimed.
    fn end(&self) -> u64 {
        let n = self.splits;
        (0..n)
            .map(|k| k + self.at[k as usize].0 * n + 1)
            .max()
            .unwrap_or(0)
    }
}

/// What the layers say about one unit.
enum Claim<P> {
    Passed,
    Begun(P),
    Untouched,
}

/// The units one split reads and where it is among them.
#[derive(Debug)]
pub struct Share<P> {
    split: u64,
    splits: u64,
    /// The split's current unit is `split + next * splits`.
    next: u64,
    /// Units earlier layouts read; empty once the split is past all of them.
    layers: Vec<Layer<P>>,
    /// No unit at or beyond this one is claimed.
    layers_end: u64,
}

fn bad(what: &str) -> SqlError {
    SqlError::internal(format!("bad source position: {what}"))
}

fn word(bytes: &[u8], at: usize) -> SqlResult<u64> {
    bytes
        .get(at..at + 8)
        .map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")))
        .ok_or_else(|| bad("it ends early"))
}

/// A position's parts: units passed, progress in the next, layers.
type Parsed<P> = (u64, P, Vec<Layer<P>>);

fn parse<P: UnitProgress>(bytes: &[u8]) -> SqlResult<Parsed<P>> {
    let next = word(bytes, 0)?;
    let progress = |at: usize| {
        bytes
            .get(at..at + P::BYTES)
            .map(P::get)
            .ok_or_else(|| bad("it ends early"))
    };
    let at = progress(8)?;
    let mut i = 8 + P::BYTES;
    let mut layers = Vec::new();
    while i < bytes.len() {
        let splits = word(bytes, i)?;
        i += 8;
        if splits == 0 || splits > crate::stream::graph::KEY_GROUPS as u64 {
            return Err(bad(&format!("a layer of {splits} splits")));
        }
        let mut units = Vec::with_capacity(splits as usize);
        for _ in 0..splits {
            units.push((word(bytes, i)?, progress(i + 8)?));
            i += 8 + P::BYTES;
        }
        layers.push(Layer { splits, at: units });
    }
    Ok((next, at, layers))
}

fn encode<P: UnitProgress>(next: u64, at: P, layers: &[Layer<P>]) -> Vec<u8> {
    let mut out = next.to_le_bytes().to_vec();
    at.put(&mut out);
    for layer in layers {
        out.extend(layer.splits.to_le_bytes());
        for (n, p) in &layer.at {
            out.extend(n.to_le_bytes());
            p.put(&mut out);
        }
    }
    out
}

/// One position every split of a new layout restores, from the positions of all splits
/// of the old one, in split order: the old splits' places become a layer, added to the
/// layers they carried.
pub fn merge<P: UnitProgress>(positions: &[&[u8]]) -> SqlResult<Vec<u8>> {
    let mut current = Layer {
        splits: positions.len() as u64,
        at: Vec::with_capacity(positions.len()),
    };
    let mut layers: Vec<Layer<P>> = Vec::new();
    for position in positions {
        let (next, at, carried) = parse::<P>(position)?;
        current.at.push((next, at));
        for layer in carried {
            if !layers.contains(&layer) {
                layers.push(layer);
            }
        }
    }
    layers.push(current);
    // A layer whose claims all lie below another's floor says nothing that one does not.
    let floors: Vec<u64> = layers.iter().map(Layer::floor).collect();
    let kept: Vec<Layer<P>> = layers
        .iter()
        .filter(|l| !floors.iter().any(|&f| l.end() <= f))
        .cloned()
        .collect();
    Ok(encode(0, P::default(), &kept))
}

impl<P: UnitProgress> Share<P> {
    pub fn new(split: usize, splits: usize) -> Self {
        Self {
            split: split as u64,
            splits: splits.max(1) as u64,
            next: 0,
            layers: Vec::new(),
            layers_end: 0,
        }
    }

    /// The current unit.
    pub fn unit(&self) -> u64 {
        self.split + self.next * self.splits
    }

    /// How many of the split's units came before the current one.
    pub fn passed(&self) -> u64 {
        self.next
    }

    /// The split's units below `total` not yet passed (those an earlier layout read
    /// included, until they are skipped).
    pub fn left_below(&self, total: u64) -> u64 {
        let mine = if total > self.split {
            (total - self.split).div_ceil(self.splits)
        } else {
            0
        };
        mine.saturating_sub(self.next)
    }

    /// Up to `n` of the split's units below `total` not read before, passed; with no
    /// layers to skip, at once.
    pub fn take_units(&mut self, n: u64, total: u64) -> Vec<u64> {
        if self.layers.is_empty() {
            let n = n.min(self.left_below(total));
            let (split, splits, next) = (self.split, self.splits, self.next);
            self.next += n;
            return (next..next + n).map(|j| split + j * splits).collect();
        }
        let mut units = Vec::new();
        while (units.len() as u64) < n && self.unit() < total {
            units.push(self.unit());
            self.pass();
        }
        units
    }

    /// The current unit is done: moves to the next one not read before, and returns
    /// where in it to begin.
    pub fn pass(&mut self) -> P {
        self.next += 1;
        self.skip_claimed()
    }

    fn claim(&self, unit: u64) -> Claim<P> {
        let mut begun: Option<P> = None;
        for layer in &self.layers {
            let (k, j) = (unit % layer.splits, unit / layer.splits);
            let (next, at) = layer.at[k as usize];
            if j < next {
                return Claim::Passed;
            }
            if j == next && at != P::default() {
                begun = begun.max(Some(at));
            }
        }
        begun.map_or(Claim::Untouched, Claim::Begun)
    }

    fn skip_claimed(&mut self) -> P {
        while !self.layers.is_empty() {
            if self.unit() >= self.layers_end {
                self.layers.clear();
                break;
            }
            match self.claim(self.unit()) {
                Claim::Passed => self.next += 1,
                Claim::Begun(at) => return at,
                Claim::Untouched => break,
            }
        }
        P::default()
    }

    /// Where the split is, `at` into its current unit.
    pub fn position(&self, at: P) -> Vec<u8> {
        encode(self.next, at, &self.layers)
    }

    /// Goes back to `position` (its own, or one [`merge`] made), and returns where in
    /// the current unit to begin.
    pub fn restore(&mut self, position: &[u8]) -> SqlResult<P> {
        let (next, at, layers) = parse::<P>(position)?;
        self.next = next;
        self.layers_end = layers.iter().map(Layer::end).max().unwrap_or(0);
        // Everything below a layer's floor was read: start at the first unit above.
        let floor = layers.iter().map(Layer::floor).max().unwrap_or(0);
        if floor > self.split {
            self.next = self.next.max((floor - self.split).div_ceil(self.splits));
        }
        self.layers = layers;
        let claimed = self.skip_claimed();
        Ok(if self.next == next {
            at.max(claimed)
        } else {
            claimed
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::SmallRng;
    use rand::{RngExt, SeedableRng};

    /// A unit read in parts: progress counts the parts read.
    #[derive(Clone, Copy, Default, Debug, PartialEq, Eq, PartialOrd, Ord)]
    struct Parts(u64);

    impl UnitProgress for Parts {
        const BYTES: usize = 8;
        fn put(&self, out: &mut Vec<u8>) {
            out.extend(self.0.to_le_bytes());
        }
        fn get(bytes: &[u8]) -> Self {
            Parts(u64::from_le_bytes(bytes.try_into().unwrap()))
        }
    }

    const PARTS: u64 = 3;

    /// A split reading units below `total` in parts, recording every (unit, part) read.
    struct Reader {
        share: Share<Parts>,
        at: Parts,
    }

    impl Reader {
        fn open(split: usize, splits: usize, position: Option<&[u8]>) -> Self {
            let mut share = Share::new(split, splits);
            let at = position.map_or(Parts::default(), |p| share.restore(p).unwrap());
            Self { share, at }
        }

        /// Reads up to `steps` parts.
        fn read(&mut self, steps: u64, total: u64, seen: &mut Vec<(u64, u64)>) {
            for _ in 0..steps {
                if self.share.unit() >= total {
                    return;
                }
                seen.push((self.share.unit(), self.at.0));
                self.at.0 += 1;
                if self.at.0 == PARTS {
                    self.at = self.share.pass();
                }
            }
        }

        fn position(&self) -> Vec<u8> {
            self.share.position(self.at)
        }
    }

    /// Runs `total` units through layouts of the given sizes, each split reading a
    /// random number of parts before the next rescale: every part is read exactly once.
    fn run(rng: &mut SmallRng, total: u64, layouts: &[usize], uneven: u64) {
        let mut seen = Vec::new();
        let mut merged: Option<Vec<u8>> = None;
        for (i, &splits) in layouts.iter().enumerate() {
            let last = i + 1 == layouts.len();
            let mut positions = Vec::new();
            for k in 0..splits {
                let mut r = Reader::open(k, splits, merged.as_deref());
                // Restoring its own position again changes nothing.
                let again = Reader::open(k, splits, Some(&r.position()));
                assert_eq!((again.share.unit(), again.at), (r.share.unit(), r.at));
                let steps = if last {
                    u64::MAX
                } else {
                    rng.random_range(0..uneven)
                };
                r.read(steps, total, &mut seen);
                positions.push(r.position());
            }
            let refs: Vec<&[u8]> = positions.iter().map(Vec::as_slice).collect();
            merged = Some(merge::<Parts>(&refs).unwrap());
        }
        seen.sort();
        let all: Vec<(u64, u64)> = (0..total)
            .flat_map(|u| (0..PARTS).map(move |p| (u, p)))
            .collect();
        assert_eq!(seen, all, "layouts {layouts:?}");
    }

    #[test]
    fn every_part_is_read_once_across_rescales() {
        let mut rng = SmallRng::seed_from_u64(7);
        for _ in 0..300 {
            let layouts: Vec<usize> = (0..rng.random_range(2..6))
                .map(|_| rng.random_range(1..9))
                .collect();
            let total = rng.random_range(0..400);
            let uneven = rng.random_range(1..200);
            run(&mut rng, total, &layouts, uneven);
        }
    }

    #[test]
    fn a_position_without_layers_is_the_count_and_progress_alone() {
        let mut share: Share<Parts> = Share::new(1, 3);
        assert_eq!(share.pass(), Parts(0));
        assert_eq!(share.unit(), 4);
        let p = share.position(Parts(2));
        assert_eq!(
            p,
            [1u64, 2]
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect::<Vec<_>>()
        );
        let mut back: Share<Parts> = Share::new(1, 3);
        assert_eq!(back.restore(&p).unwrap(), Parts(2));
        assert_eq!(back.unit(), 4);
    }

    #[test]
    fn a_new_split_starts_past_what_every_old_split_read_and_drops_the_layer_after() {
        // Two old splits of units 0..: split 0 passed 0, 2, 4 and is 1 part into 6;
        // split 1 passed 1 and 3.
        let old: Vec<Vec<u8>> = vec![encode(3, Parts(1), &[]), encode::<Parts>(2, Parts(0), &[])];
        let refs: Vec<&[u8]> = old.iter().map(Vec::as_slice).collect();
        let merged = merge::<Parts>(&refs).unwrap();
        // Split 0 of 3 owns 0, 3, 6, 9: starts at 6, one part in.
        let mut s0: Share<Parts> = Share::new(0, 3);
        assert_eq!(s0.restore(&merged).unwrap(), Parts(1));
        assert_eq!(s0.unit(), 6);
        assert!(!s0.layers.is_empty());
        assert_eq!(s0.pass(), Parts(0));
        assert_eq!(s0.unit(), 9);
        assert!(s0.layers.is_empty(), "past every claim");
        // Split 2 of 3 owns 2, 5, 8: 2 was read, 5 was not.
        let mut s2: Share<Parts> = Share::new(2, 3);
        assert_eq!(s2.restore(&merged).unwrap(), Parts(0));
        assert_eq!(s2.unit(), 5);
        // Split 1 owns 1, 4, 7: 1 and 4 were read.
        let mut s1: Share<Parts> = Share::new(1, 3);
        s1.restore(&merged).unwrap();
        assert_eq!(s1.unit(), 7);
    }

    #[test]
    fn malformed_positions_are_refused() {
        let mut share: Share<()> = Share::new(0, 1);
        assert!(share.restore(&[1, 2, 3]).is_err());
        let mut zero = 5u64.to_le_bytes().to_vec();
        zero.extend(0u64.to_le_bytes());
        assert!(share.restore(&zero).is_err(), "a layer of no splits");
        let mut short = 5u64.to_le_bytes().to_vec();
        short.extend(2u64.to_le_bytes());
        short.extend(1u64.to_le_bytes());
        assert!(share.restore(&short).is_err(), "a layer missing a split");
    }
}
