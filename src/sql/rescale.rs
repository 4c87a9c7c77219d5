//! `ALTER MATERIALIZED VIEW v SET PARALLELISM = n` and `ALTER JOB 'id' SET PARALLELISM = n`:
//! the job is stopped at a checkpoint and started again from it with `n` subtasks per
//! keyed operator, its state redistributed by key group.

use std::collections::HashMap;

use super::engine::{Engine, Outcome};
use super::error::{SqlError, SqlResult};
use super::parser::Rescaled;
use super::streaming::Start;
use super::CommandTag;
use crate::plan::planner::Mode;
use crate::stream::checkpoint;
use crate::stream::graph::{SinkKind, StreamGraph};
use crate::stream::job::JobState;
use crate::stream::manager::JobKind;

impl Engine {
    pub(super) async fn alter_parallelism(
        &self,
        target: &Rescaled,
        parallelism: usize,
    ) -> SqlResult<Outcome> {
        match target {
            Rescaled::View(name) => self.rescale_view(name, parallelism).await?,
            Rescaled::Job(id) => {
                let kind = self
                    .jobs
                    .list()
                    .into_iter()
                    .find(|j| &j.0 == id)
                    .map(|j| j.4)
                    .ok_or_else(|| super::savepoints::no_job(id))?;
                match kind {
                    JobKind::View(name) => self.rescale_view(&name, parallelism).await?,
                    JobKind::Insert(_) => self.rescale_job(id, parallelism).await?,
                    JobKind::Subscribe => {
                        return Err(SqlError::new(
                            "0A000",
                            format!("job {id} serves a subscription, which ends with its session"),
                        ))
                    }
                }
            }
        }
        Ok(Outcome::Command(CommandTag::new(match target {
            Rescaled::View(_) => "ALTER MATERIALIZED VIEW",
            Rescaled::Job(_) => "ALTER JOB",
        })))
    }

    async fn rescale_view(&self, name: &str, parallelism: usize) -> SqlResult<()> {
        let def = self
            .catalog
            .view(name)
            .filter(|v| v.materialized)
            .ok_or_else(|| {
                SqlError::new(
                    "42P01",
                    format!("materialized view \"{name}\" does not exist"),
                )
            })?;
        let what = format!("materialized view \"{name}\"");
        let (id, rows) = match (self.jobs.job_of_view(name), self.jobs.view(name)) {
            (Some(id), Some(rows)) => (id, rows),
            _ => return Err(not_running(&what)),
        };
        let metadata = with_parallelism(&def.settings, parallelism);
        let plan = self.plan_text(&metadata, &def.query).await?;
        let graph = self.graph(
            &metadata,
            &plan,
            Mode::Continuous,
            SinkKind::View(rows.clone()),
        )?;
        self.check_rescalable(&id, graph, &what, parallelism)?;
        self.stop_at_checkpoint(&id).await?;
        let mut rescaled = (*def).clone();
        rescaled.settings = metadata.clone().into_iter().collect();
        let stored = rescaled.clone();
        self.catalog_write(move |c| c.create_view(stored, true))
            .await?;
        let started = self
            .start_view_job(&metadata, &rescaled, Start::Rescale, Some(rows.clone()))
            .await;
        if let Err(e) = started {
            // It goes on as it was.
            let old = (*def).clone();
            let stored = old.clone();
            self.catalog_write(move |c| c.create_view(stored, true))
                .await?;
            let settings = old.settings.clone().into_iter().collect();
            self.start_view_job(&settings, &old, Start::Rescale, Some(rows))
                .await?;
            return Err(e);
        }
        Ok(())
    }

    async fn rescale_job(&self, id: &str, parallelism: usize) -> SqlResult<()> {
        let def = self
            .catalog
            .jobs()
            .into_iter()
            .find(|j| j.id == id)
            .ok_or_else(|| super::savepoints::no_job(id))?;
        let metadata = with_parallelism(&def.settings, parallelism);
        let plan = self.plan_text(&metadata, &def.statement).await?;
        let (graph, _) = self.insert_graph(&metadata, &plan)?;
        self.check_rescalable(id, graph, &format!("job {id}"), parallelism)?;
        self.stop_at_checkpoint(id).await?;
        let mut rescaled = (*def).clone();
        rescaled.settings = metadata.clone().into_iter().collect();
        self.catalog_write(move |c| c.create_job(rescaled)).await?;
        let started = self
            .start_insert(&metadata, id, &def.statement, &plan, true)
            .await;
        let running = match started {
            Ok((running, _, _)) => running,
            Err(e) => {
                // It goes on as it was.
                let old = (*def).clone();
                self.catalog_write(move |c| c.create_job(old)).await?;
                let settings = def.settings.clone().into_iter().collect();
                let plan = self.plan_text(&settings, &def.statement).await?;
                let (running, _, _) = self
                    .start_insert(&settings, id, &def.statement, &plan, true)
                    .await?;
                self.forget_when_done(running);
                return Err(e);
            }
        };
        self.forget_when_done(running);
        Ok(())
    }

    /// Refuses, before anything stops, a rescale its checkpoint could not be restored
    /// into: a plan whose operators connect differently at the new parallelism has no
    /// place for the old subtasks' state.
    fn check_rescalable(
        &self,
        id: &str,
        mut graph: StreamGraph,
        what: &str,
        parallelism: usize,
    ) -> SqlResult<()> {
        let job = self.jobs.job(id).ok_or_else(|| not_running(what))?;
        checkpoint::rescale::keep_source_parallelism(&mut graph, &job.parallelism);
        if checkpoint::fingerprint(&graph) != job.fingerprint {
            return Err(SqlError::new(
                "0A000",
                format!(
                    "{what} cannot move to parallelism {parallelism}: its operators connect \
                     differently there (EXPLAIN shows both plans), so its state has no place"
                ),
            )
            .with_hint("drop it and create it again after SET 'parallelism.default'"));
        }
        Ok(())
    }

    /// Commits what the job has read so far, then stops it; its newest checkpoint is
    /// where it goes on from.
    async fn stop_at_checkpoint(&self, id: &str) -> SqlResult<()> {
        let job = self.jobs.job(id).ok_or_else(|| not_running(id))?;
        if job.state() != JobState::Running {
            return Err(not_running(&format!("job {id}")));
        }
        self.jobs.flush().await;
        self.jobs.stop_and_wait(id).await;
        Ok(())
    }
}

fn with_parallelism(
    settings: &std::collections::BTreeMap<String, String>,
    parallelism: usize,
) -> HashMap<String, String> {
    let mut metadata: HashMap<String, String> = settings.clone().into_iter().collect();
    metadata.insert("parallelism.default".into(), parallelism.to_string());
    metadata
}

fn not_running(what: &str) -> SqlError {
    SqlError::new(
        "55000",
        format!("{what} has no running job to rescale; SHOW JOBS lists the running jobs"),
    )
}
