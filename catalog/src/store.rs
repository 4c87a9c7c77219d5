//! The one storage interface Weir writes through, so the backing store can be swapped.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use crate::error::Result;

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
}

/// The durable store: one sled tree.
#[derive(Debug, Clone)]
pub struct SledStore {
    db: sled::Db,
}

impl SledStore {
    /// Opens the store in `dir`. sled's background flusher may hold the directory lock for
    /// a moment after the previous owner closed it, so a busy lock is retried briefly.
    pub fn open(dir: &std::path::Path) -> Result<Self> {
        let mut attempts = 0;
        loop {
            match sled::Config::new().path(dir).open() {
                Ok(db) => return Ok(Self { db }),
                // sled reports the busy lock as an I/O error whose text names it.
                Err(sled::Error::Io(e))
                    if e.to_string().contains("could not acquire lock") && attempts < 40 =>
                {
                    attempts += 1;
                    std::thread::sleep(std::time::Duration::from_millis(50));
                }
                Err(e) => return Err(e.into()),
            }
        }
    }
}

impl StateStore for SledStore {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>> {
        Ok(self.db.get(key)?.map(|v| v.to_vec()))
    }

    fn put(&self, key: &[u8], value: &[u8]) -> Result<()> {
        self.db.insert(key, value)?;
        Ok(())
    }

    fn delete(&self, key: &[u8]) -> Result<()> {
        self.db.remove(key)?;
        Ok(())
    }

    fn scan_prefix_from(&self, prefix: &[u8], start: &[u8]) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
        let mut out = Vec::new();
        for item in self.db.range(start..) {
            let (k, v) = item?;
            if !k.starts_with(prefix) {
                break;
            }
            out.push((k.to_vec(), v.to_vec()));
        }
        Ok(out)
    }

    fn apply(&self, batch: WriteBatch) -> Result<()> {
        let mut sled_batch = sled::Batch::default();
        for (k, v) in batch.ops {
            match v {
                Some(v) => sled_batch.insert(k, v),
                None => sled_batch.remove(k),
            }
        }
        self.db.apply_batch(sled_batch)?;
        Ok(())
    }

    fn flush(&self) -> Result<()> {
        self.db.flush()?;
        Ok(())
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
        store.delete(b"b/1").unwrap();
        assert_eq!(store.get(b"b/1").unwrap(), None);
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
