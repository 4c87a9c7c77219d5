//! Every continuous query of the server: materialized views and INSERT jobs, the epochs
//! they publish at, and FLUSH.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use super::checkpoint::coordinator::CheckpointHistory;
use super::job::{JobState, RunningJob};
use super::message::Epoch;
use super::mv::MvState;

/// What a job maintains.
#[derive(Debug, Clone)]
pub enum JobKind {
    View(String),
    Insert(String),
    /// Runs the query of a `SUBSCRIBE TO (SELECT ...)` while the subscription lasts.
    Subscribe,
}

pub struct JobEntry {
    pub job: Arc<RunningJob>,
    pub statement: String,
    pub kind: JobKind,
}

#[derive(Default)]
pub struct Jobs {
    jobs: Mutex<BTreeMap<String, JobEntry>>,
    views: RwLock<HashMap<String, Arc<MvState>>>,
    epoch: AtomicU64,
    /// Barriers reach every source in epoch order.
    injecting: Mutex<()>,
    /// Every durable job's latest checkpoints, for SHOW CHECKPOINTS.
    pub history: Arc<CheckpointHistory>,
    /// 'execution.checkpointing.interval' in milliseconds (0 until set: the default).
    interval_ms: AtomicU64,
    /// Epochs FLUSH asked for: they align even where checkpoints are unaligned.
    pub aligned_epochs: Arc<super::exchange::AlignedEpochs>,
}

impl std::fmt::Debug for Jobs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Jobs").finish_non_exhaustive()
    }
}

/// The interval epochs commit at when nobody asks for one.
pub const DEFAULT_EPOCH_INTERVAL: Duration = Duration::from_secs(1);

impl Jobs {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Commits an epoch every `interval` while the server runs.
    pub fn start_epochs(self: &Arc<Self>, interval: Duration) {
        self.set_epoch_interval(interval);
        let weak = Arc::downgrade(self);
        tokio::spawn(async move {
            loop {
                let Some(interval) = weak.upgrade().map(|j| j.epoch_interval()) else {
                    return;
                };
                tokio::time::sleep(interval).await;
                let Some(jobs) = weak.upgrade() else {
                    return;
                };
                jobs.flush_once(false).await;
            }
        });
    }

    /// Sets how often epochs commit, server-wide (the last SET wins).
    pub fn set_epoch_interval(&self, interval: Duration) {
        let ms = interval.as_millis().clamp(1, u64::MAX as u128) as u64;
        self.interval_ms.store(ms, Ordering::Relaxed);
    }

    pub fn epoch_interval(&self) -> Duration {
        match self.interval_ms.load(Ordering::Relaxed) {
            0 => DEFAULT_EPOCH_INTERVAL,
            ms => Duration::from_millis(ms),
        }
    }

    /// Numbers the next epochs after `epoch` (the newest one checkpoints before a
    /// restart committed), so epochs keep increasing across restarts.
    pub fn advance_epoch_to(&self, epoch: Epoch) {
        self.epoch.fetch_max(epoch, Ordering::SeqCst);
    }

    pub fn view(&self, name: &str) -> Option<Arc<MvState>> {
        self.views
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(name)
            .cloned()
    }

    pub fn add_view(&self, name: &str, state: Arc<MvState>) {
        self.views
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(name.to_string(), state);
    }

    pub fn remove_view(&self, name: &str) {
        self.views
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(name);
    }

    pub fn add(&self, entry: JobEntry) {
        self.jobs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(entry.job.id.clone(), entry);
    }

    /// Stops and forgets a job; false when there is none with that id.
    pub fn stop(&self, id: &str) -> bool {
        let entry = self
            .jobs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(id);
        match entry {
            Some(entry) => {
                entry.job.stop();
                true
            }
            None => false,
        }
    }

    /// Stops a job and waits until its tasks and any checkpoint being written are gone;
    /// false when there is none with that id.
    pub async fn stop_and_wait(&self, id: &str) -> bool {
        let Some(job) = self.job(id) else {
            return false;
        };
        self.stop(id);
        job.finished().await;
        true
    }

    pub fn job_of_view(&self, view: &str) -> Option<String> {
        self.jobs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .find(|e| matches!(&e.kind, JobKind::View(v) if v == view))
            .map(|e| e.job.id.clone())
    }

    pub fn job(&self, id: &str) -> Option<Arc<RunningJob>> {
        self.jobs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(id)
            .map(|e| e.job.clone())
    }

    pub fn contains(&self, id: &str) -> bool {
        self.jobs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains_key(id)
    }

    /// A snapshot of every job, for SHOW JOBS.
    pub fn list(&self) -> Vec<(String, String, JobState, Arc<RunningJob>, JobKind)> {
        self.jobs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .map(|e| {
                (
                    e.job.id.clone(),
                    e.statement.clone(),
                    e.job.state(),
                    e.job.clone(),
                    e.kind.clone(),
                )
            })
            .collect()
    }

    /// Commits a new epoch in every running job: returns once everything their sources had
    /// read or could read when it was called is published.
    pub async fn flush(&self) -> Epoch {
        // A job reading a view sees at its barrier what the view published before it:
        // one more epoch per job that reads views covers any chain of views over views.
        let rounds = 1 + self
            .jobs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .filter(|e| e.job.reads_views && e.job.state() == JobState::Running)
            .count();
        let mut epoch = 0;
        for _ in 0..rounds {
            epoch = self.flush_once(true).await;
        }
        epoch
    }

    /// Commits one epoch in every running job. `aligned`: its barriers align even in jobs
    /// with unaligned checkpoints, so that it holds everything read before it.
    async fn flush_once(&self, aligned: bool) -> Epoch {
        let (epoch, running) = {
            let _order = self.injecting.lock().unwrap_or_else(|p| p.into_inner());
            let epoch = self.epoch.fetch_add(1, Ordering::SeqCst) + 1;
            if aligned {
                self.aligned_epochs.insert(epoch);
            }
            let running: Vec<Arc<RunningJob>> = self
                .jobs
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .values()
                .filter(|e| e.job.state() == JobState::Running)
                .map(|e| e.job.clone())
                .collect();
            for job in &running {
                job.request_barrier(epoch);
            }
            (epoch, running)
        };
        futures::future::join_all(running.iter().map(|j| j.committed(epoch))).await;
        epoch
    }

    /// Stops every job and waits until their tasks, and checkpoints being written, are
    /// gone (server shutdown): nothing uses the store after this returns.
    pub async fn stop_all(&self) {
        let jobs = std::mem::take(&mut *self.jobs.lock().unwrap_or_else(|p| p.into_inner()));
        for entry in jobs.values() {
            entry.job.stop();
        }
        for entry in jobs.values() {
            entry.job.finished().await;
        }
    }
}
