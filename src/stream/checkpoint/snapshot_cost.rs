//! When an operator that can snapshot only its changes takes a whole snapshot again.
//!
//! A restore reads an operator's last whole snapshot and every incremental one since, so
//! the chain is kept to about twice the state it restores: a whole snapshot is due once
//! the chain outgrows twice the state (as measured by the operator, scaled by what its
//! last whole snapshot took per byte of that measure). State that only grows (an
//! insert-only join side, a GROUP BY of new keys) then writes each change once, where a
//! rule of "changes since the last whole one outweigh it" rewrote the whole state each
//! time it doubled: a checkpoint of 4-7 times the usual bytes and time at epochs 4, 9,
//! 19, ... (`cargo bench --bench checkpoints`). A whole snapshot is also due after
//! [`MAX_LAYERS`] incremental ones, so a restore never reads more than that many.

/// Incremental snapshots after which a whole one is due regardless.
pub const MAX_LAYERS: usize = 64;

/// Below this state size (the operator's measure) at a whole snapshot, its bytes per
/// byte of state are not trusted (near-empty state, fixed overheads), and the chain is
/// compared with the whole snapshot itself.
const MIN_MEASURED_STATE: usize = 1 << 20;

/// An operator's snapshots since its last whole one.
#[derive(Default, Clone, Copy, Debug)]
pub struct SnapshotCost {
    /// Bytes of the last whole snapshot.
    whole: Option<usize>,
    /// Bytes of the incremental snapshots since.
    changes: usize,
    layers: usize,
    /// Snapshot bytes per byte of the operator's state size, at the last whole snapshot.
    ratio: Option<f64>,
    /// The operator's state size at its last whole snapshot.
    whole_state: usize,
}

impl SnapshotCost {
    /// Whether the next snapshot must be whole, the operator's state measuring
    /// `state_size` now.
    pub fn whole_due(&self, state_size: usize) -> bool {
        let Some(whole) = self.whole else {
            return true;
        };
        if self.layers >= MAX_LAYERS {
            return true;
        }
        match self.ratio {
            Some(ratio) => (whole + self.changes) as f64 > 2.0 * ratio * state_size as f64,
            None => self.changes > whole,
        }
    }

    /// Counts a snapshot of `bytes`, whole or not, taken when the state measured
    /// `state_size`.
    pub fn record(&mut self, whole: bool, bytes: usize, state_size: usize) {
        if whole {
            *self = SnapshotCost {
                whole: Some(bytes),
                changes: 0,
                layers: 0,
                ratio: None,
                whole_state: state_size,
            };
            self.measure_ratio();
        } else {
            self.changes += bytes;
            self.layers += 1;
        }
    }

    /// The latest snapshot took `bytes` more, stored after it was counted (what the
    /// operator keeps beyond memory).
    pub fn add_stored(&mut self, bytes: usize) {
        match &mut self.whole {
            Some(whole) if self.layers == 0 => {
                *whole += bytes;
                self.measure_ratio();
            }
            _ => self.changes += bytes,
        }
    }

    fn measure_ratio(&mut self) {
        self.ratio = match self.whole {
            Some(whole) if self.whole_state >= MIN_MEASURED_STATE => {
                Some(whole as f64 / self.whole_state as f64)
            }
            _ => None,
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MB: usize = 1 << 20;

    /// Snapshots taken over `epochs`, each epoch's (changes in bytes, state size after):
    /// which were whole.
    fn wholes(epochs: &[(usize, usize)]) -> Vec<bool> {
        wholes_stored(epochs, 0.0)
    }

    /// The same, with a share `later` of each snapshot's bytes stored after it was
    /// counted (state beyond memory).
    fn wholes_stored(epochs: &[(usize, usize)], later: f64) -> Vec<bool> {
        let mut cost = SnapshotCost::default();
        epochs
            .iter()
            .map(|&(changes, state)| {
                let whole = cost.whole_due(state);
                // A whole snapshot writes the state (1 byte a byte here).
                let bytes = if whole { state } else { changes };
                let stored = (bytes as f64 * later) as usize;
                cost.record(whole, bytes - stored, state);
                cost.add_stored(stored);
                whole
            })
            .collect()
    }

    #[test]
    fn bytes_stored_after_a_snapshot_count_as_its_own() {
        let epochs: Vec<(usize, usize)> =
            (1..=30).map(|e| (30 * MB, 100 * MB + 5 * MB * e)).collect();
        let at_once = wholes(&epochs);
        assert!(at_once[1..].contains(&true), "{at_once:?}");
        for later in [0.5, 1.0] {
            assert_eq!(wholes_stored(&epochs, later), at_once, "{later}");
        }
    }

    #[test]
    fn growing_state_with_only_new_keys_is_written_once() {
        // 10 MB of new keys an epoch: the chain is the state itself.
        let epochs: Vec<(usize, usize)> = (1..=40).map(|e| (10 * MB, 10 * MB * e)).collect();
        let wholes = wholes(&epochs);
        assert!(wholes[0]);
        assert!(wholes[1..].iter().all(|w| !w), "{wholes:?}");
    }

    #[test]
    fn state_rewritten_in_place_is_whole_again_once_the_chain_doubles_it() {
        // 100 MB of state, 30 MB of it changed an epoch: the chain passes 200 MB at the
        // fourth incremental snapshot.
        let wholes = wholes(&[(30 * MB, 100 * MB); 10]);
        assert_eq!(
            wholes,
            [true, false, false, false, false, true, false, false, false, false]
        );
    }

    #[test]
    fn state_that_shrinks_is_whole_sooner() {
        let wholes = wholes(&[(0, 100 * MB), (10 * MB, 60 * MB), (10 * MB, 40 * MB)]);
        assert_eq!(wholes, [true, false, true]);
    }

    #[test]
    fn a_long_chain_ends_in_a_whole_snapshot() {
        let epochs: Vec<(usize, usize)> = (1..=2 * MAX_LAYERS + 3)
            .map(|e| (MB, 100 * MB + MB * e))
            .collect();
        let wholes = wholes(&epochs);
        let at: Vec<usize> = (0..wholes.len()).filter(|&i| wholes[i]).collect();
        assert_eq!(at, [0, MAX_LAYERS + 1, 2 * MAX_LAYERS + 2]);
    }

    #[test]
    fn tiny_state_compares_changes_with_the_whole_snapshot() {
        // 1 KB of state measured: its ratio is not trusted, the old rule applies.
        let wholes = wholes(&[(0, 1000), (600, 1000), (600, 1000), (600, 1000)]);
        assert_eq!(wholes, [true, false, false, true]);
    }
}
