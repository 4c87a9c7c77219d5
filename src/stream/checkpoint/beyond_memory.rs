//! The state operators keep beyond memory (a state backend's) goes into a checkpoint off
//! the task: at the barrier each operator freezes what its snapshot holds on disk (where
//! its entries are, in files that are never written over) and goes on processing, while a
//! blocking thread reads the frozen entries, writes them to the store in chunks
//! ([`ChunkWriter`]) and then acknowledges the barrier, as Flink's RocksDB backend takes
//! a checkpoint's synchronous part (hard links to its files) at the barrier and uploads
//! it asynchronously. A task waits for it at its next barrier (or its end) only, so it has
//! one snapshot being stored at a time and acknowledges epochs in order. The same thread
//! stores the big batches of state a task's snapshot holds in memory
//! ([`store_large_batches`]), so they are not encoded at once with the epoch.

use datafusion::common::{DataFusionError, Result};

use super::chunks::{store_large_batches, ChunkWriter};
use super::store::Checkpoints;
use super::{StatePart, TaskSnapshot};
use crate::stream::failpoint;
use crate::stream::message::Epoch;
use crate::stream::operator::StateReader;

/// A task's snapshot whose state beyond memory is being read and stored.
pub struct StoringSnapshot {
    /// The bytes each operator's part beyond memory took, by position in the chain.
    written: tokio::task::JoinHandle<Vec<(usize, usize)>>,
}

/// Stores the big batches of `snapshot` as chunks in `chunks` (when the job keeps
/// checkpoints), reads what `readers` (each with its operator's position in the chain)
/// froze, as epoch `epoch`'s and task `task`'s chunks in `chunks` (kept as batches
/// without a store), adds them to the operators' parts of `snapshot`, and hands the
/// snapshot, or why it could not be stored, to `done`, all on a blocking thread.
pub fn store(
    readers: Vec<(usize, StateReader)>,
    chunks: Option<Checkpoints>,
    epoch: Epoch,
    task: usize,
    mut snapshot: TaskSnapshot,
    done: impl FnOnce(Result<TaskSnapshot>) + Send + 'static,
) -> StoringSnapshot {
    let written = tokio::task::spawn_blocking(move || {
        let mut written = Vec::with_capacity(readers.len());
        let read_all = || -> Result<()> {
            if let Some(at) = &chunks {
                store_large_batches(&mut snapshot, at, epoch, task)?;
            }
            for (k, read) in readers {
                let mut writer = ChunkWriter::new(chunks.clone(), epoch, task, k);
                read(&mut |batch| writer.push(batch))?;
                if failpoint::hit(failpoint::at::STORING_BEYOND_MEMORY) {
                    return Err(DataFusionError::Execution(format!(
                        "failpoint {}",
                        failpoint::at::STORING_BEYOND_MEMORY
                    )));
                }
                let parts = writer.finish()?;
                written.push((k, parts.iter().map(StatePart::bytes).sum()));
                snapshot.operators[k].extend(parts);
            }
            Ok(())
        };
        let stored = read_all();
        done(stored.map(|()| snapshot));
        written
    });
    StoringSnapshot { written }
}

impl StoringSnapshot {
    /// Waits until the snapshot is stored and acknowledged, or its failure reported: the
    /// bytes each operator's part beyond memory took.
    pub async fn finished(self) -> Result<Vec<(usize, usize)>> {
        self.written
            .await
            .map_err(|e| DataFusionError::External(Box::new(e)))
    }
}
