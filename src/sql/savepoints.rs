//! Savepoints: `STOP JOB 'id' WITH SAVEPOINT`, `STOP MATERIALIZED VIEW v WITH SAVEPOINT`,
//! `SHOW SAVEPOINTS`, `DROP SAVEPOINT 'name'`, and starting a job or view from one with
//! `SET 'execution.savepoint.path' = 'name'` (Flink's key) before it is created.

use std::sync::Arc;

use datafusion::arrow::array::{ArrayRef, Int64Array, StringArray, TimestampMillisecondArray};
use datafusion::arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use datafusion::arrow::record_batch::RecordBatch;

use super::engine::{Engine, Outcome};
use super::error::{SqlError, SqlResult};
use super::streaming::{external, materialized_views};
use crate::stream::checkpoint::store::{self, Checkpoints};
use crate::stream::checkpoint::view_feed;
use crate::stream::manager::JobKind;

pub(super) fn savepoint_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![Field::new(
        "savepoint",
        DataType::Utf8,
        false,
    )]))
}

pub(super) fn show_savepoints_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("savepoint", DataType::Utf8, false),
        Field::new("epoch", DataType::Int64, false),
        Field::new(
            "taken",
            DataType::Timestamp(TimeUnit::Millisecond, None),
            false,
        ),
        Field::new("bytes", DataType::Int64, false),
        Field::new("statement", DataType::Utf8, false),
        // The updating views that keep their changes for it (until DROP SAVEPOINT).
        Field::new("keeps_changes_of", DataType::Utf8, false),
    ]))
}

impl Engine {
    /// Commits one more epoch, stops the job (its tasks are gone when this returns), and
    /// keeps its newest checkpoint as savepoint `sp-<id>-<epoch>`. The updating views
    /// the job read keep their changes after it for the savepoint: a notice names them.
    async fn stop_with_savepoint(
        &self,
        id: &str,
        key: &str,
        statement: &str,
    ) -> SqlResult<(String, Vec<String>)> {
        self.jobs.job(id).ok_or_else(|| no_job(id))?;
        self.jobs.flush().await;
        self.jobs.stop_and_wait(id).await;
        let checkpoints = Checkpoints::new(self.catalog.store(), key);
        let store = self.catalog.store();
        let statement = statement.to_string();
        let id = id.to_string();
        let views = materialized_views(&self.catalog);
        let (name, pinned) = tokio::task::spawn_blocking(move || {
            let epoch = checkpoints.latest()?.map(|m| m.epoch).ok_or_else(|| {
                datafusion::common::DataFusionError::Execution(format!(
                    "job {id} has no checkpoint to keep"
                ))
            })?;
            let name = format!("sp-{id}-{epoch}");
            let savepoint = store::savepoint(store.clone(), &name);
            checkpoints.copy_latest_to(&savepoint, Some(&name), &statement)?;
            let pinned = view_feed::pin_for_savepoint(&store, views, &checkpoints, &savepoint)?;
            Ok((name, pinned))
        })
        .await
        .map_err(|e| SqlError::internal(e.to_string()))?
        .map_err(external)?;
        let notices = pinned
            .into_iter()
            .map(|(view, epoch)| {
                format!(
                    "materialized view {view} keeps its changes after its epoch {epoch} for \
                     savepoint '{name}' until DROP SAVEPOINT '{name}'"
                )
            })
            .collect();
        Ok((name, notices))
    }

    /// `DROP SAVEPOINT 'name'`: its state goes, and so do the changes updating views kept
    /// for it.
    pub(super) async fn drop_savepoint(&self, name: &str) -> SqlResult<Outcome> {
        let store = self.catalog.store();
        let savepoint = store::savepoint(store.clone(), name);
        let views = materialized_views(&self.catalog);
        let dropped = tokio::task::spawn_blocking(move || {
            if savepoint.latest()?.is_none() {
                return Ok(false);
            }
            view_feed::unregister(&store, views, &savepoint)?;
            savepoint.remove()?;
            Ok(true)
        })
        .await
        .map_err(|e| SqlError::internal(e.to_string()))?
        .map_err(external)?;
        if !dropped {
            return Err(SqlError::new(
                "42704",
                format!("savepoint '{name}' does not exist; SHOW SAVEPOINTS lists them"),
            ));
        }
        Ok(Outcome::Command(super::CommandTag::new("DROP SAVEPOINT")))
    }

    /// `STOP JOB 'id' [WITH SAVEPOINT]`.
    pub(super) async fn stop_job(&self, id: &str, savepoint: bool) -> SqlResult<Outcome> {
        let entry = self.jobs.list().into_iter().find(|j| j.0 == id);
        if let Some((_, _, _, _, JobKind::View(name))) = &entry {
            return Err(SqlError::new(
                "55000",
                format!("job {id} maintains materialized view \"{name}\""),
            )
            .with_hint(format!(
                "DROP MATERIALIZED VIEW {name}, or STOP MATERIALIZED VIEW {name} WITH SAVEPOINT"
            )));
        }
        let Some((_, statement, ..)) = entry else {
            return Err(no_job(id));
        };
        let saved = if savepoint {
            Some(
                self.stop_with_savepoint(id, &format!("job/{id}"), &statement)
                    .await?,
            )
        } else {
            self.jobs.stop_and_wait(id).await;
            None
        };
        let job = id.to_string();
        self.catalog_write(move |c| c.drop_job(&job)).await?;
        self.remove_checkpoints(format!("job/{id}")).await?;
        match saved {
            Some((name, notices)) => Ok(Outcome::noticed(notices, self.savepoint_row(name)?)),
            None => Ok(Outcome::Command(super::CommandTag::new("STOP JOB"))),
        }
    }

    /// `STOP MATERIALIZED VIEW v WITH SAVEPOINT`: the view's state is kept, the view goes.
    pub(super) async fn stop_view(&self, name: &str) -> SqlResult<Outcome> {
        if !self.catalog.view(name).is_some_and(|v| v.materialized) {
            return Err(SqlError::new(
                "42P01",
                format!("materialized view \"{name}\" does not exist"),
            ));
        }
        if let Some(dependent) = self
            .catalog
            .views()
            .into_iter()
            .find(|v| v.depends_on.iter().any(|d| d == name))
        {
            return Err(SqlError::new(
                "2BP01",
                format!(
                    "cannot stop materialized view {name} because view {} depends on it",
                    dependent.name
                ),
            ));
        }
        let id = self.jobs.job_of_view(name).ok_or_else(|| {
            SqlError::new(
                "55000",
                format!("materialized view \"{name}\" has no running job to take a savepoint of"),
            )
        })?;
        let statement = self
            .jobs
            .list()
            .into_iter()
            .find(|j| j.0 == id)
            .map(|j| j.1)
            .unwrap_or_default();
        let (savepoint, notices) = self
            .stop_with_savepoint(&id, &format!("view/{name}"), &statement)
            .await?;
        self.drop_materialized_view(name).await?;
        Ok(Outcome::noticed(notices, self.savepoint_row(savepoint)?))
    }

    fn savepoint_row(&self, name: String) -> SqlResult<Outcome> {
        let column: ArrayRef = Arc::new(StringArray::from(vec![name]));
        self.rows(RecordBatch::try_new(savepoint_schema(), vec![column])?)
    }

    pub(super) async fn show_savepoints(&self) -> SqlResult<Outcome> {
        let store = self.catalog.store();
        let views = materialized_views(&self.catalog);
        let (savepoints, keeps) = tokio::task::spawn_blocking(move || {
            let savepoints = store::savepoints(&store)?;
            let keeps = savepoints
                .iter()
                .map(|(m, _)| {
                    let name = m.savepoint.clone().unwrap_or_default();
                    let pins = view_feed::pinned_by(
                        &store,
                        &views,
                        &store::savepoint(store.clone(), &name),
                    )?;
                    Ok(pins
                        .iter()
                        .map(|(view, epoch)| format!("{view} after epoch {epoch}"))
                        .collect::<Vec<_>>()
                        .join(", "))
                })
                .collect::<datafusion::common::Result<Vec<String>>>()?;
            Ok::<_, datafusion::common::DataFusionError>((savepoints, keeps))
        })
        .await
        .map_err(|e| SqlError::internal(e.to_string()))?
        .map_err(external)?;
        let columns: Vec<ArrayRef> = vec![
            Arc::new(StringArray::from_iter_values(
                savepoints
                    .iter()
                    .map(|(m, _)| m.savepoint.clone().unwrap_or_default()),
            )),
            Arc::new(Int64Array::from_iter_values(
                savepoints.iter().map(|(m, _)| m.epoch as i64),
            )),
            Arc::new(TimestampMillisecondArray::from_iter_values(
                savepoints.iter().map(|(m, _)| m.started_ms),
            )),
            Arc::new(Int64Array::from_iter_values(
                savepoints.iter().map(|(m, _)| m.bytes as i64),
            )),
            Arc::new(StringArray::from_iter_values(
                savepoints
                    .iter()
                    .map(|(_, s)| crate::plan::window_tvf::readable(s)),
            )),
            Arc::new(StringArray::from_iter_values(keeps)),
        ];
        self.rows(RecordBatch::try_new(show_savepoints_schema(), columns)?)
    }

    /// Puts savepoint `name` in place as the newest checkpoint of the view or job under
    /// `key`, so that it starts from it.
    pub(super) async fn seed_from_savepoint(&self, name: &str, key: &str) -> SqlResult<()> {
        let source = store::savepoint(self.catalog.store(), name);
        let target = Checkpoints::new(self.catalog.store(), key);
        let copied = tokio::task::spawn_blocking(move || source.copy_latest_to(&target, None, ""))
            .await
            .map_err(|e| SqlError::internal(e.to_string()))?
            .map_err(external)?;
        match copied {
            Some(_) => Ok(()),
            None => Err(SqlError::new(
                "42704",
                format!("savepoint '{name}' does not exist; SHOW SAVEPOINTS lists them"),
            )
            .with_hint("RESET 'execution.savepoint.path' to start from scratch")),
        }
    }
}

pub(super) fn no_job(id: &str) -> SqlError {
    SqlError::new(
        "42704",
        format!("job '{id}' does not exist; SHOW JOBS lists the running jobs"),
    )
}
