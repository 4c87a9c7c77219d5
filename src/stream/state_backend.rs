//! `SET 'state.backend' = 'sled'`: operators that support it (regular joins, unbounded
//! GROUP BY, TopN, the last two without a state TTL; window and session aggregates for
//! their partial states) keep a bounded amount of keyed state in memory and the rest on
//! disk, in scratch files of their own
//! ([`files::RunFiles`]), in a directory per operator subtask under the data directory's
//! `spill`. The name is the setting Weir started with, when this state went
//! to a scratch sled database: sled keeps a copy of every value it holds in memory, so
//! it lowered memory without bounding it. The scratch data is only a working copy:
//! checkpoints (in the sled store) still hold the state, and a restart rebuilds it from
//! them, so nothing in it needs to survive the process (the directory goes with the
//! operator, and a restarted server clears what a killed one left).

pub mod batches;
pub mod files;
pub mod runs;

use std::hash::BuildHasher;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use datafusion::common::{DataFusionError, Result};

/// An operator subtask's directory of scratch files, removed when its last user goes.
pub type ScratchDir = Arc<tempfile::TempDir>;

/// 64-bit hashes of keys, for the in-memory indexes of state on disk (a hit is confirmed
/// against the key stored with the value). Tests cut them to a few values, so that keys
/// collide.
#[derive(Default)]
pub struct KeyHasher {
    state: hashbrown::DefaultHashBuilder,
    #[cfg(test)]
    pub few: Option<u64>,
}

impl KeyHasher {
    pub fn hash(&self, key: &[u8]) -> u64 {
        let hash = self.state.hash_one(key);
        #[cfg(test)]
        if let Some(few) = self.few {
            return hash % few;
        }
        hash
    }
}

/// Where operators keep the keyed state that does not stay in memory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SledBackend {
    /// The directory under which each operator instance opens its own database.
    pub root: PathBuf,
    /// Bytes of state each stateful input of an operator subtask keeps in memory.
    pub memory: usize,
}

/// State changed since the last barrier that an operator which emits at barriers (GROUP
/// BY, TopN) may hold in memory beyond its budget: past it, the operator emits its
/// results early and moves its state to disk, as Flink's mini-batches flush when full.
/// Without this, memory grew with what one checkpoint interval changes.
pub const EARLY_EMIT_SLACK: usize = 32 << 20;

/// When such an operator moves state out before the barrier: once the bytes it holds in
/// memory pass what stayed after its previous move (at least the budget) by a slack.
#[derive(Debug, Clone, Copy)]
pub struct EarlyEmitMark {
    budget: usize,
    slack: usize,
    past: usize,
}

impl EarlyEmitMark {
    /// The mark of a memory budget, with [`EARLY_EMIT_SLACK`].
    pub fn new(budget: usize) -> Self {
        Self::with_slack(budget, EARLY_EMIT_SLACK)
    }

    pub fn with_slack(budget: usize, slack: usize) -> Self {
        Self {
            budget,
            slack,
            past: budget.saturating_add(slack),
        }
    }

    pub fn is_passed(&self, bytes: usize) -> bool {
        bytes > self.past
    }

    /// After a move, `stayed` bytes are left in memory.
    pub fn moved(&mut self, stayed: usize) {
        self.past = stayed.max(self.budget).saturating_add(self.slack);
    }
}

/// How long state must have gone unused before it counts as cold: early emits can
/// come a fraction of a second apart, and state used every second (count DISTINCT of
/// a channel) would go to disk and come back at each.
pub const MIN_IDLE: Duration = Duration::from_millis(500);

/// When an operator last looked for cold state (unused since the previous look, which
/// is at least a minimum idle time ago).
#[derive(Debug, Clone, Copy)]
pub struct IdleClock {
    last: Instant,
    min_idle: Duration,
}

impl IdleClock {
    pub fn new(min_idle: Duration) -> Self {
        Self {
            last: Instant::now(),
            min_idle,
        }
    }

    /// A new look, unless the previous one is more recent than the minimum idle time:
    /// when the previous one was (state unused since is cold).
    pub fn look(&mut self) -> Option<Instant> {
        let now = Instant::now();
        if now.duration_since(self.last) < self.min_idle {
            return None;
        }
        Some(std::mem::replace(&mut self.last, now))
    }
}

impl SledBackend {
    /// A new scratch directory for an operator subtask.
    pub fn scratch_dir(&self) -> Result<ScratchDir> {
        std::fs::create_dir_all(&self.root)
            .and_then(|_| {
                tempfile::Builder::new()
                    .prefix("op-")
                    .tempdir_in(&self.root)
            })
            .map(Arc::new)
            .map_err(|e| {
                DataFusionError::External(
                    format!(
                        "state backend: creating a scratch directory in {}: {e}",
                        self.root.display()
                    )
                    .into(),
                )
            })
    }

    /// What EXPLAIN says about where state beyond memory goes.
    pub fn describe(&self) -> String {
        format!("on disk beyond {} per input", human_bytes(self.memory))
    }

    /// What EXPLAIN says about a window aggregate's merges in parts: beyond `factor`
    /// times the budget.
    pub fn describe_merges(&self, factor: usize) -> String {
        format!(
            "a window merged in parts beyond {} of them",
            human_bytes(self.memory.saturating_mul(factor))
        )
    }
}

fn human_bytes(bytes: usize) -> String {
    const MIB: usize = 1 << 20;
    const KIB: usize = 1 << 10;
    if bytes >= MIB && bytes.is_multiple_of(MIB) {
        format!("{} MiB", bytes / MIB)
    } else if bytes >= KIB && bytes.is_multiple_of(KIB) {
        format!("{} KiB", bytes / KIB)
    } else {
        format!("{bytes} bytes")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_idle_clock_counts_a_look_only_after_the_minimum_idle_time() {
        let mut clock = IdleClock::new(Duration::from_secs(3600));
        assert_eq!(clock.look(), None);
        let mut clock = IdleClock::new(Duration::ZERO);
        let first = clock.look().unwrap();
        assert!(clock.look().unwrap() >= first);
    }
}
