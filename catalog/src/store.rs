//! The one storage interface Weir writes through, so the backing store can be swapped.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};

use crate::error::Result;
use crate::value_files::{self, ValueFiles, FILE_VALUE_BYTES};

/// Puts and deletes applied together by [`StateStore::apply`]: all or nothing.
#[derive(Debug, Default, Clone)]
pub struct WriteBatch {
    ops: Vec<(Vec<u8>, Option<Vec<u8>>)>,
}

impl WriteBatch {
    pub fn put(&mut self, key: impl Into<Vec<u8>>, value: impl Into<Vec<u8>>) {
        self.ops.push((key.into(), Some(value.into())));
    }

    pub fn delete(&mut self, key: impl Into<Vec<u8>>) {
        self.ops.push((key.into(), None));
    }

    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }
}

/// An ordered key-value store: get, put, delete, prefix scan, atomic batch, flush.
///
/// Writes become durable at [`StateStore::flush`]; a crash before it may lose them, but an
/// applied batch is never seen half-done.
pub trait StateStore: Send + Sync + std::fmt::Debug + 'static {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>>;
    fn put(&self, key: &[u8], value: &[u8]) -> Result<()>;
    fn delete(&self, key: &[u8]) -> Result<()>;
    /// Entries whose key starts with `prefix` and is `>= start`, in key order.
    fn scan_prefix_from(&self, prefix: &[u8], start: &[u8]) -> Result<Vec<(Vec<u8>, Vec<u8>)>>;
    fn apply(&self, batch: WriteBatch) -> Result<()>;
    fn flush(&self) -> Result<()>;

    fn scan_prefix(&self, prefix: &[u8]) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
        self.scan_prefix_from(prefix, prefix)
    }

    /// The keys starting with `prefix`, in order, without reading their values (which
    /// may be large).
    fn scan_keys(&self, prefix: &[u8]) -> Result<Vec<Vec<u8>>> {
        Ok(self
            .scan_prefix(prefix)?
            .into_iter()
            .map(|(k, _)| k)
            .collect())
    }
}

/// The durable store: one sled tree, with large values in files beside it (see
/// `value_files`).
#[derive(Debug, Clone)]
pub struct SledStore {
    db: sled::Db,
    values: Arc<ValueFiles>,
}

impl SledStore {
    /// Opens the store in `dir`. sled's background flusher may hold the directory lock for
    /// a moment after the previous owner closed it, so a busy lock is retried briefly.
    pub fn open(dir: &std::path::Path) -> Result<Self> {
        let mut attempts = 0;
        let db = loop {
            match sled::Config::new().path(dir).open() {
                Ok(db) => break db,
                // sled reports the busy lock as an I/O error whose text names it.
                Err(sled::Error::Io(e))
                    if e.to_string().contains("could not acquire lock") && attempts < 40 =>
                {
                    attempts += 1;
                    std::thread::sleep(std::time::Duration::from_millis(50));
                }
                Err(e) => return Err(e.into()),
            }
        };
        let values = ValueFiles::open(&dir.join("weir-values"), |key, name| {
            Ok(db
                .get(key)?
                .is_some_and(|v| value_files::name_of(&v) == Some(name)))
        })?;
        Ok(Self {
            db,
            values: Arc::new(values),
        })
    }
}

impl StateStore for SledStore {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>> {
        self.db
            .get(key)?
            .map(|v| self.values.resolve(v.to_vec()))
            .transpose()
    }

    fn put(&self, key: &[u8], value: &[u8]) -> Result<()> {
        let mut batch = WriteBatch::default();
        batch.put(key, value);
        self.apply(batch)
    }

    fn delete(&self, key: &[u8]) -> Result<()> {
        let mut batch = WriteBatch::default();
        batch.delete(key);
        self.apply(batch)
    }

    fn scan_prefix_from(&self, prefix: &[u8], start: &[u8]) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
        let mut out = Vec::new();
        for item in self.db.range(start..) {
            let (k, v) = item?;
            if !k.starts_with(prefix) {
                break;
            }
            out.push((k.to_vec(), self.values.resolve(v.to_vec())?));
        }
        Ok(out)
    }

    fn scan_keys(&self, prefix: &[u8]) -> Result<Vec<Vec<u8>>> {
        self.db
            .scan_prefix(prefix)
            .keys()
            .map(|k| Ok(k?.to_vec()))
            .collect()
    }

    fn apply(&self, batch: WriteBatch) -> Result<()> {
        let mut sled_batch = sled::Batch::default();
        // Files of the values this batch replaces or deletes, and of those it writes (by
        // key: a key written twice in one batch keeps only its last file).
        let mut replaced = Vec::new();
        let mut written: HashMap<Vec<u8>, std::path::PathBuf> = HashMap::new();
        let mut seen = HashSet::new();
        for (k, v) in batch.ops {
            if seen.insert(k.clone()) {
                if let Some(old) = self.db.get(&k)? {
                    replaced.extend(self.values.file_of(&old));
                }
            }
            replaced.extend(written.remove(&k));
            match v {
                Some(v) if v.len() >= FILE_VALUE_BYTES => {
                    let pointer = self.values.write(&k, &v)?;
                    written.extend(self.values.file_of(&pointer).map(|f| (k.clone(), f)));
                    sled_batch.insert(k, pointer);
                }
                Some(v) => sled_batch.insert(k, v),
                None => sled_batch.remove(k),
            }
        }
        if !written.is_empty() {
            self.values.sync_dir()?;
        }
        if let Err(e) = self.db.apply_batch(sled_batch) {
            // Nothing points at the new files.
            self.values.retire(written.into_values());
            return Err(e.into());
        }
        self.values.retire(replaced);
        Ok(())
    }

    fn flush(&self) -> Result<()> {
        let retired = self.values.take_retired();
        self.db.flush()?;
        self.values.remove(retired)
    }
}

/// A store that forgets everything when dropped: for tests and scratch sessions.
#[derive(Debug, Default, Clone)]
pub struct MemoryStore {
    map: Arc<Mutex<BTreeMap<Vec<u8>, Vec<u8>>>>,
}

impl StateStore for MemoryStore {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>> {
        Ok(self.map.lock().unwrap().get(key).cloned())
    }

    fn put(&self, key: &[u8], value: &[u8]) -> Result<()> {
        self.map
            .lock()
            .unwrap()
            .insert(key.to_vec(), value.to_vec());
        Ok(())
    }

    fn delete(&self, key: &[u8]) -> Result<()> {
        self.map.lock().unwrap().remove(key);
        Ok(())
    }

    fn scan_prefix_from(&self, prefix: &[u8], start: &[u8]) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
        let map = self.map.lock().unwrap();
        Ok(map
            .range(start.to_vec()..)
            .take_while(|(k, _)| k.starts_with(prefix))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect())
    }

    fn apply(&self, batch: WriteBatch) -> Result<()> {
        let mut map = self.map.lock().unwrap();
        for (k, v) in batch.ops {
            match v {
                Some(v) => map.insert(k, v),
                None => map.remove(&k),
            };
        }
        Ok(())
    }

    fn flush(&self) -> Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exercise(store: &dyn StateStore) {
        store.put(b"a/1", b"x").unwrap();
        let mut batch = WriteBatch::default();
        batch.put(b"a/2".to_vec(), b"y".to_vec());
        batch.put(b"b/1".to_vec(), b"z".to_vec());
        batch.delete(b"a/1".to_vec());
        store.apply(batch).unwrap();
        store.flush().unwrap();
        assert_eq!(store.get(b"a/1").unwrap(), None);
        let scanned = store.scan_prefix(b"a/").unwrap();
        assert_eq!(scanned, vec![(b"a/2".to_vec(), b"y".to_vec())]);
        assert_eq!(store.scan_prefix_from(b"a/", b"a/3").unwrap(), vec![]);
        assert_eq!(store.scan_keys(b"a/").unwrap(), vec![b"a/2".to_vec()]);
        store.delete(b"b/1").unwrap();
        assert_eq!(store.get(b"b/1").unwrap(), None);
    }

    #[test]
    fn large_values_live_in_files_that_go_once_nothing_points_at_them() {
        let dir = tempfile::tempdir().unwrap();
        let files = || {
            std::fs::read_dir(dir.path().join("weir-values"))
                .unwrap()
                .count()
        };
        let big = |b: u8| vec![b; FILE_VALUE_BYTES + 1];
        {
            let store = SledStore::open(dir.path()).unwrap();
            store.put(b"k/1", &big(1)).unwrap();
            let mut batch = WriteBatch::default();
            batch.put(b"k/2".to_vec(), big(2));
            batch.put(b"k/2".to_vec(), big(3));
            batch.put(b"k/3".to_vec(), b"small".to_vec());
            store.apply(batch).unwrap();
            store.flush().unwrap();
            assert_eq!(store.get(b"k/1").unwrap(), Some(big(1)));
            assert_eq!(store.get(b"k/2").unwrap(), Some(big(3)));
            assert_eq!(files(), 2, "the first value of k/2 was never pointed at");
            let scanned: Vec<Vec<u8>> = store
                .scan_prefix(b"k/")
                .unwrap()
                .into_iter()
                .map(|(_, v)| v)
                .collect();
            assert_eq!(scanned, vec![big(1), big(3), b"small".to_vec()]);
            store.put(b"k/1", b"now small").unwrap();
            assert_eq!(files(), 2, "removed only once the change is durable");
            store.flush().unwrap();
            assert_eq!(files(), 1);
        }
        // A file no pointer names (a crash between writing it and the batch) goes at open.
        let orphan = dir.path().join("weir-values").join("999.value");
        std::fs::write(&orphan, [3, 0, 0, 0, b'k', b'/', b'9', 1, 2]).unwrap();
        let store = SledStore::open(dir.path()).unwrap();
        assert!(!orphan.exists());
        assert_eq!(store.get(b"k/2").unwrap(), Some(big(3)));
        store.delete(b"k/2").unwrap();
        store.flush().unwrap();
        assert_eq!(files(), 0);
    }

    #[test]
    fn memory_store_behaves() {
        exercise(&MemoryStore::default());
    }

    #[test]
    fn sled_store_behaves_and_persists() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = SledStore::open(dir.path()).unwrap();
            exercise(&store);
        }
        let store = SledStore::open(dir.path()).unwrap();
        assert_eq!(store.get(b"a/2").unwrap(), Some(b"y".to_vec()));
    }
}
