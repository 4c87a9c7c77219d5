//! Large values kept in files beside sled, with a short pointer in sled.
//!
//! Checkpoints write values of megabytes every epoch. In sled they pile up in its log
//! until it is cleaned, and opening the store after a crash replays that log: the
//! restart then takes seconds per hundred megabytes. A file per large value is written
//! and synced before the batch that points at it, and removed only once sled has made the
//! batch that dropped the pointer durable, so a crash at any moment leaves every pointer
//! with its file; files no pointer names (a crash between the two) go at the next open.

use std::fs;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use crate::error::{CatalogError, Result};

/// Values this large or larger go to files.
pub const FILE_VALUE_BYTES: usize = 256 * 1024;

/// What a pointer value starts with; the file's name follows.
const POINTER: &[u8] = b"\0weir-value-file\0";

fn io(e: std::io::Error) -> CatalogError {
    CatalogError::Storage(e.to_string())
}

#[derive(Debug)]
pub struct ValueFiles {
    dir: PathBuf,
    next: AtomicU64,
    /// Files whose pointers were replaced or deleted: removed at the next flush, once
    /// sled made that durable.
    obsolete: Mutex<Vec<PathBuf>>,
}

impl ValueFiles {
    /// The files in `dir`; those that `points_to(key, name)` says no pointer names are
    /// removed.
    pub fn open(dir: &Path, points_to: impl Fn(&[u8], &str) -> Result<bool>) -> Result<Self> {
        fs::create_dir_all(dir).map_err(io)?;
        let mut next = 0;
        for entry in fs::read_dir(dir).map_err(io)? {
            let path = entry.map_err(io)?.path();
            let Some(name) = path
                .file_name()
                .and_then(|n| n.to_str())
                .map(str::to_string)
            else {
                continue;
            };
            // Only files this module named are its to judge.
            let Some(n) = name
                .strip_suffix(".value")
                .and_then(|n| n.parse::<u64>().ok())
            else {
                continue;
            };
            next = next.max(n + 1);
            let key = read_key(&path)?;
            if !key.is_some_and(|k| points_to(&k, &name).unwrap_or(true)) {
                fs::remove_file(&path).map_err(io)?;
            }
        }
        Ok(Self {
            dir: dir.to_path_buf(),
            next: AtomicU64::new(next),
            obsolete: Mutex::new(Vec::new()),
        })
    }

    /// Writes `value` of `key` to a new synced file; returns the pointer to store instead.
    pub fn write(&self, key: &[u8], value: &[u8]) -> Result<Vec<u8>> {
        let name = format!("{}.value", self.next.fetch_add(1, Ordering::Relaxed));
        let mut file = fs::File::create(self.dir.join(&name)).map_err(io)?;
        file.write_all(&(key.len() as u32).to_le_bytes())
            .and_then(|_| file.write_all(key))
            .and_then(|_| file.write_all(value))
            .and_then(|_| file.sync_all())
            .map_err(io)?;
        Ok([POINTER, name.as_bytes()].concat())
    }

    /// Makes the new files' names durable too.
    pub fn sync_dir(&self) -> Result<()> {
        fs::File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(io)
    }

    /// The file a stored value points to, if it is a pointer.
    pub fn file_of(&self, stored: &[u8]) -> Option<PathBuf> {
        name_of(stored).map(|n| self.dir.join(n))
    }

    /// The value itself: read from its file when `stored` is a pointer.
    pub fn resolve(&self, stored: Vec<u8>) -> Result<Vec<u8>> {
        let Some(path) = self.file_of(&stored) else {
            return Ok(stored);
        };
        let mut file = fs::File::open(&path).map_err(|e| {
            CatalogError::Storage(format!("value file {} is unreadable: {e}", path.display()))
        })?;
        let mut len = [0u8; 4];
        file.read_exact(&mut len).map_err(io)?;
        let mut key = vec![0u8; u32::from_le_bytes(len) as usize];
        file.read_exact(&mut key).map_err(io)?;
        let mut value = Vec::new();
        file.read_to_end(&mut value).map_err(io)?;
        Ok(value)
    }

    pub fn retire(&self, files: impl IntoIterator<Item = PathBuf>) {
        self.obsolete
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend(files);
    }

    /// The files retired so far, to remove once a flush that starts now has made their
    /// retirement durable ([`ValueFiles::remove`]).
    pub fn take_retired(&self) -> Vec<PathBuf> {
        std::mem::take(&mut *self.obsolete.lock().unwrap_or_else(|p| p.into_inner()))
    }

    pub fn remove(&self, files: Vec<PathBuf>) -> Result<()> {
        for f in files {
            match fs::remove_file(&f) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(io(e)),
                _ => {}
            }
        }
        Ok(())
    }
}

/// The file name a pointer value holds.
pub fn name_of(stored: &[u8]) -> Option<&str> {
    stored
        .strip_prefix(POINTER)
        .and_then(|n| std::str::from_utf8(n).ok())
        .filter(|n| n.ends_with(".value") && !n.contains('/'))
}

/// The key a value file was written for; `None` for a file cut short.
fn read_key(path: &Path) -> Result<Option<Vec<u8>>> {
    let mut file = fs::File::open(path).map_err(io)?;
    let mut len = [0u8; 4];
    if file.read_exact(&mut len).is_err() {
        return Ok(None);
    }
    let mut key = vec![0u8; u32::from_le_bytes(len) as usize];
    Ok(file.read_exact(&mut key).ok().map(|_| key))
}
