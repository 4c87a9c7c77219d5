//! Runs of records by id, in append-only scratch files of the process's own. sled holds
//! in memory a copy of every value it stores whatever its `cache_capacity` (heaptrack of
//! q18 under the backend: 198 of 457 MB of heap were sled's copies of runs), so runs kept
//! in sled lowered memory without bounding it. Here a run is written once, at the end of
//! the current segment file, and read back with a positioned read: what is not in use
//! lives in the kernel's page cache, which gives way under memory pressure, not in the
//! process.
//!
//! Space is reclaimed a segment at a time: a segment whose runs are all gone is deleted,
//! and one that falls below half live (and is not the one being written) has its live
//! runs written again at the end, so the files hold at most about twice the live bytes
//! plus one segment. They are scratch, as checkpoints hold the state: a segment's file
//! is deleted with it, and a restarted server clears what a killed one left.

use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;

use datafusion::common::{DataFusionError, HashMap, Result};
use tempfile::NamedTempFile;

use super::ScratchDir;

/// Bytes written to a segment before the next run starts a new one.
const SEGMENT_BYTES: u64 = 64 << 20;

/// Where a run is.
#[derive(Clone, Copy)]
struct Place {
    segment: u64,
    offset: u64,
    len: u32,
}

struct Segment {
    /// Deleted when the last holder drops it: the segment, or a [`RunPlace`] of a
    /// snapshot still reading it.
    file: Arc<NamedTempFile>,
    /// Bytes written.
    len: u64,
    /// Bytes of its runs not removed.
    live: u64,
    /// The runs written to it, some maybe gone or moved since.
    runs: Vec<u64>,
}

pub struct RunFiles {
    /// Where segment files are created.
    dir: ScratchDir,
    segments: HashMap<u64, Segment>,
    /// The segment runs are appended to.
    current: Option<u64>,
    next_segment: u64,
    places: HashMap<u64, Place>,
    /// Tests: a smaller segment size, so that segments fill up.
    segment_bytes: u64,
}

impl RunFiles {
    /// Runs in files in `dir`.
    pub fn new(dir: ScratchDir) -> Self {
        Self {
            dir,
            segments: HashMap::default(),
            current: None,
            next_segment: 0,
            places: HashMap::default(),
            segment_bytes: SEGMENT_BYTES,
        }
    }

    #[cfg(test)]
    pub(super) fn with_segment_bytes(dir: ScratchDir, segment_bytes: u64) -> Self {
        Self {
            segment_bytes,
            ..Self::new(dir)
        }
    }

    /// How many runs there are.
    pub fn len(&self) -> usize {
        self.places.len()
    }

    pub fn is_empty(&self) -> bool {
        self.places.is_empty()
    }

    /// Writes run `id` (a new id).
    pub fn put(&mut self, id: u64, bytes: &[u8]) -> Result<()> {
        debug_assert!(!self.places.contains_key(&id));
        let segment = self.segment_with_room()?;
        let s = self
            .segments
            .get_mut(&segment)
            .expect("the current segment");
        s.file
            .as_file()
            .write_all_at(bytes, s.len)
            .map_err(|e| io_error("writing", self.dir.path(), e))?;
        let place = Place {
            segment,
            offset: s.len,
            len: u32::try_from(bytes.len()).map_err(|_| {
                DataFusionError::Internal("a run of the state backend over 4 GiB".into())
            })?,
        };
        s.len += bytes.len() as u64;
        s.live += bytes.len() as u64;
        s.runs.push(id);
        self.places.insert(id, place);
        Ok(())
    }

    /// The segment the next run goes to: the current one unless it is full.
    fn segment_with_room(&mut self) -> Result<u64> {
        while let Some(current) = self.current {
            if self.segments[&current].len < self.segment_bytes {
                return Ok(current);
            }
            // Full, so no longer written: it may already be below half live.
            self.current = None;
            self.reclaim(current)?;
        }
        let file = tempfile::Builder::new()
            .prefix("runs-")
            .tempfile_in(self.dir.path())
            .map_err(|e| io_error("creating", self.dir.path(), e))?;
        let id = self.next_segment;
        self.next_segment += 1;
        self.segments.insert(
            id,
            Segment {
                file: Arc::new(file),
                len: 0,
                live: 0,
                runs: Vec::new(),
            },
        );
        self.current = Some(id);
        Ok(id)
    }

    /// Run `id`'s bytes, if there is such a run.
    pub fn get(&self, id: u64) -> Result<Option<Vec<u8>>> {
        self.place(id).map(|place| place.read()).transpose()
    }

    /// Where run `id` is, to read it later whatever happens to it here meanwhile.
    pub fn place(&self, id: u64) -> Option<RunPlace> {
        let place = self.places.get(&id)?;
        Some(RunPlace {
            file: self.segments[&place.segment].file.clone(),
            offset: place.offset,
            len: place.len,
        })
    }

    /// Removes run `id`, reclaiming its segment's space when that falls below half live.
    pub fn remove(&mut self, id: u64) -> Result<()> {
        let Some(place) = self.places.remove(&id) else {
            return Ok(());
        };
        let segment = self
            .segments
            .get_mut(&place.segment)
            .expect("a segment of a run");
        segment.live -= u64::from(place.len);
        self.reclaim(place.segment)
    }

    /// Drops segment `id` when nothing in it is live, or when it is not written any more
    /// and less than half live, after writing its live runs again.
    fn reclaim(&mut self, id: u64) -> Result<()> {
        let segment = &self.segments[&id];
        let written = self.current == Some(id);
        if segment.live > 0 && (written || segment.live * 2 >= segment.len) {
            return Ok(());
        }
        let segment = self.segments.remove(&id).expect("checked");
        if self.current == Some(id) {
            self.current = None;
        }
        for run in segment.runs {
            let Some(place) = self.places.get(&run).copied() else {
                continue;
            };
            if place.segment != id {
                continue;
            }
            let mut bytes = vec![0; place.len as usize];
            segment
                .file
                .as_file()
                .read_exact_at(&mut bytes, place.offset)
                .map_err(|e| io_error("reading", self.dir.path(), e))?;
            self.places.remove(&run);
            self.put(run, &bytes)?;
        }
        Ok(())
    }

    /// The ids of all runs, in order.
    pub fn ids(&self) -> Vec<u64> {
        let mut ids: Vec<u64> = self.places.keys().copied().collect();
        ids.sort_unstable();
        ids
    }

    /// Bytes the segment files hold, dead ones included.
    #[cfg(test)]
    fn file_bytes(&self) -> u64 {
        self.segments.values().map(|s| s.len).sum()
    }
}

/// A run's bytes as written. Runs are written once, at the end of a segment, and
/// segments are never written over, so they stay what they were; the segment's file stays
/// while this is held (open, even once deleted), after the run moved or went.
pub struct RunPlace {
    file: Arc<NamedTempFile>,
    offset: u64,
    len: u32,
}

impl RunPlace {
    pub fn read(&self) -> Result<Vec<u8>> {
        let mut bytes = vec![0; self.len as usize];
        self.file
            .as_file()
            .read_exact_at(&mut bytes, self.offset)
            .map_err(|e| {
                let path = self.file.path();
                io_error("reading", path.parent().unwrap_or(path), e)
            })?;
        Ok(bytes)
    }
}

fn io_error(doing: &str, dir: &Path, e: std::io::Error) -> DataFusionError {
    DataFusionError::External(
        format!(
            "state backend: {doing} a scratch file in {}: {e}",
            dir.display()
        )
        .into(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch() -> ScratchDir {
        std::sync::Arc::new(tempfile::tempdir().unwrap())
    }

    /// Files in the directory, and their bytes.
    fn on_disk(dir: &ScratchDir) -> (usize, u64) {
        let files: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|f| f.unwrap().metadata().unwrap().len())
            .collect();
        (files.len(), files.iter().sum())
    }

    fn run(id: u64) -> Vec<u8> {
        vec![id as u8; 100 + id as usize]
    }

    #[test]
    fn runs_come_back_and_go() {
        let dir = scratch();
        let mut files = RunFiles::new(dir.clone());
        assert_eq!(files.get(1).unwrap(), None);
        for id in 0..10 {
            files.put(id, &run(id)).unwrap();
        }
        assert_eq!(files.len(), 10);
        assert_eq!(files.get(7).unwrap(), Some(run(7)));
        files.remove(7).unwrap();
        files.remove(7).unwrap();
        assert_eq!(files.get(7).unwrap(), None);
        assert_eq!(files.ids(), [0, 1, 2, 3, 4, 5, 6, 8, 9]);
        let written: u64 = (0..10).map(|id| run(id).len() as u64).sum();
        assert_eq!(on_disk(&dir), (1, written));
        // The files go with the store.
        drop(files);
        assert_eq!(on_disk(&dir), (0, 0));
    }

    #[test]
    fn segments_below_half_live_are_written_again_and_empty_ones_dropped() {
        let dir = scratch();
        // About 1 KB a segment: a segment of 10 runs of 100..110 bytes.
        let mut files = RunFiles::with_segment_bytes(dir.clone(), 1000);
        for id in 0..100 {
            files.put(id, &run(id % 10)).unwrap();
        }
        assert_eq!(files.segments.len(), 10);
        assert_eq!(on_disk(&dir).0, 10);
        // Taking 6 runs of each full segment: each is written again in a new one.
        let removed: Vec<u64> = (0..100).filter(|id| id % 10 < 6).collect();
        for id in &removed {
            files.remove(*id).unwrap();
        }
        assert_eq!(files.len(), 40);
        for id in 0..100 {
            let expected = (id % 10 >= 6).then(|| run(id % 10));
            assert_eq!(files.get(id).unwrap(), expected, "run {id}");
        }
        let live: u64 = (6..10).map(|i| run(i).len() as u64).sum::<u64>() * 10;
        assert!(
            files.file_bytes() <= 2 * live + 1000,
            "{}",
            files.file_bytes()
        );
        assert_eq!(on_disk(&dir).1, files.file_bytes());
        // Removing everything leaves only the segment being written, empty.
        for id in files.ids() {
            files.remove(id).unwrap();
        }
        assert!(files.is_empty());
        assert!(files.segments.len() <= 1);
        assert!(files.segments.values().all(|s| s.live == 0));
        assert!(on_disk(&dir).0 <= 1);
    }
}
