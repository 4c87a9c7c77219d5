//! SUBSCRIBE: a materialized view's changefeed, or a query's through a temporary job,
//! as rows with an `op` column first ('+I', '-U', '+U', '-D', as Flink prints
//! changelogs): the current rows (unless `snapshot = false`), then every later change
//! as the view publishes it at epoch commits.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use datafusion::arrow::array::{ArrayRef, StringArray};
use datafusion::arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use datafusion::arrow::record_batch::RecordBatch;
use tokio::sync::broadcast::error::{RecvError, TryRecvError};
use tokio::sync::broadcast::Receiver;

use super::column_names;
use super::engine::Engine;
use super::error::{sqlstate, SqlError, SqlResult};
use super::streaming::{external, new_job_id};
use super::subscribe_syntax::{Subscribe, SubscribeTarget};
use crate::plan::planner::Mode;
use crate::stream::graph::SinkKind;
use crate::stream::job::{JobState, RunningJob};
use crate::stream::manager::{JobEntry, JobKind, Jobs};
use crate::stream::message::{ChangeBatch, Op};
use crate::stream::mv::{Changes, MvState, FEED_CAPACITY};

/// Name of the column that says what each row does to the result.
pub const OP_COLUMN: &str = "op";

/// A running subscription: rows to hand out, then the changes as they are published.
pub struct Subscription {
    schema: SchemaRef,
    /// Rows received and not yet handed out (the snapshot first).
    pending: VecDeque<RecordBatch>,
    feed: Receiver<Arc<Changes>>,
    /// The job publishing the changes, watched for failure.
    job: Option<Arc<RunningJob>>,
    /// What is followed, for messages.
    what: String,
    ended: bool,
    /// Sticky: a subscription that failed keeps saying why.
    failed: Option<SqlError>,
    /// Warnings about the query's plan (state without a TTL), for the client.
    notices: Vec<String>,
    /// Stops the job of `SUBSCRIBE TO (SELECT ...)` when the subscription goes away.
    _temporary: Option<TemporaryJob>,
}

/// A job that exists for one subscription: stopped (and gone from SHOW JOBS) when the
/// subscription is dropped, however it ends (cancel, disconnect, CLOSE, error).
struct TemporaryJob {
    id: String,
    jobs: Arc<Jobs>,
}

impl Drop for TemporaryJob {
    fn drop(&mut self) {
        self.jobs.stop(&self.id);
    }
}

impl Engine {
    /// The columns a subscription returns: `op`, then the followed rows' columns.
    pub async fn subscribe_schema(
        &self,
        metadata: &HashMap<String, String>,
        spec: &Subscribe,
    ) -> SqlResult<SchemaRef> {
        match &spec.target {
            SubscribeTarget::View(name) => Ok(with_op(&self.subscribed_view(name)?.schema())),
            SubscribeTarget::Query { text, statement } => {
                let plan = self.plan_text(metadata, text).await?;
                Ok(with_op(&column_names::rename(
                    &Arc::new(plan.schema().as_arrow().clone()),
                    &column_names::postgres_names(statement),
                )))
            }
        }
    }

    /// Starts a subscription.
    pub async fn subscribe(
        &self,
        metadata: &HashMap<String, String>,
        spec: &Subscribe,
    ) -> SqlResult<Subscription> {
        match &spec.target {
            SubscribeTarget::View(name) => {
                let state = self.subscribed_view(name)?;
                let followed = state.follow().map_err(external)?;
                let job = self
                    .jobs
                    .job_of_view(name)
                    .and_then(|id| self.jobs.job(&id));
                let schema = with_op(&state.schema());
                let mut subscription = Subscription {
                    pending: VecDeque::new(),
                    feed: followed.changes,
                    job,
                    what: format!("materialized view \"{name}\""),
                    ended: followed.ended,
                    failed: None,
                    notices: vec![],
                    _temporary: None,
                    schema,
                };
                if spec.snapshot {
                    for batch in followed.snapshot {
                        subscription.push(&ChangeBatch::new(batch))?;
                    }
                }
                Ok(subscription)
            }
            SubscribeTarget::Query { text, statement } => {
                if !spec.snapshot {
                    return Err(SqlError::not_supported(
                        "SUBSCRIBE TO (query) WITH (snapshot = false) is not supported: the \
                         query starts with this subscription, so it has no earlier rows to skip",
                    )
                    .with_hint(
                        "CREATE MATERIALIZED VIEW v AS the query, then SUBSCRIBE TO v WITH \
                         (snapshot = false)",
                    ));
                }
                let plan = self.plan_text(metadata, text).await?;
                let columns = column_names::rename(
                    &Arc::new(plan.schema().as_arrow().clone()),
                    &column_names::postgres_names(statement),
                );
                let state = MvState::feed_only(Arc::new(plan.schema().as_arrow().clone()));
                // Followed before the job starts, so its first publish is not missed.
                let followed = state.follow().map_err(external)?;
                let graph = self.graph(metadata, &plan, Mode::Continuous, SinkKind::View(state))?;
                let notices = graph.notices.clone();
                let id = new_job_id();
                let job =
                    RunningJob::start(id.clone(), graph, self.catalog.clone()).map_err(external)?;
                self.jobs.add(JobEntry {
                    job: job.clone(),
                    statement: format!("SUBSCRIBE TO ({text})"),
                    kind: JobKind::Subscribe,
                });
                Ok(Subscription {
                    schema: with_op(&columns),
                    pending: VecDeque::new(),
                    feed: followed.changes,
                    job: Some(job),
                    what: "the subscribed query".into(),
                    ended: false,
                    failed: None,
                    notices,
                    _temporary: Some(TemporaryJob {
                        id,
                        jobs: self.jobs.clone(),
                    }),
                })
            }
        }
    }

    /// The state of a materialized view SUBSCRIBE can follow, or why there is none.
    fn subscribed_view(&self, name: &str) -> SqlResult<Arc<MvState>> {
        if let Some(state) = self.jobs.view(name) {
            return Ok(state);
        }
        let hint = format!(
            "SUBSCRIBE TO (SELECT * FROM {}) follows a query's rows",
            weir_catalog::quote_ident(name)
        );
        match self.catalog.view(name) {
            Some(v) if v.materialized => Err(SqlError::new(
                "55000",
                format!("materialized view \"{name}\" is not running (its job did not start)"),
            )
            .with_hint("the server log says why; DROP and CREATE the view again")),
            Some(_) => Err(SqlError::new(
                sqlstate::WRONG_OBJECT_TYPE,
                format!("\"{name}\" is a view, not a materialized view: it has no changefeed"),
            )
            .with_hint(hint)),
            None if self.catalog.table(name).is_some() => Err(SqlError::new(
                sqlstate::WRONG_OBJECT_TYPE,
                format!("\"{name}\" is a table, not a materialized view: SUBSCRIBE TO names a materialized view"),
            )
            .with_hint(hint)),
            None => Err(SqlError::undefined_table(name)),
        }
    }
}

/// `op` first, then `columns` (nullable: the rows decide).
fn with_op(columns: &SchemaRef) -> SchemaRef {
    let mut fields = vec![Arc::new(Field::new(OP_COLUMN, DataType::Utf8, false))];
    fields.extend(
        columns
            .fields()
            .iter()
            .map(|f| Arc::new(f.as_ref().clone().with_nullable(true))),
    );
    Arc::new(Schema::new(fields))
}

impl Subscription {
    pub fn schema(&self) -> SchemaRef {
        self.schema.clone()
    }

    /// Warnings to send before the rows.
    pub fn take_notices(&mut self) -> Vec<String> {
        std::mem::take(&mut self.notices)
    }

    /// The next rows, waiting for changes; `None` once the changelog ended (its input
    /// was bounded). Cancel-safe: dropping the future loses nothing.
    pub async fn next(&mut self) -> SqlResult<Option<RecordBatch>> {
        loop {
            if let Some(ready) = self.try_next()? {
                return Ok(Some(ready));
            }
            if self.is_done() {
                return Ok(None);
            }
            let job = self.job.clone();
            tokio::select! {
                received = self.feed.recv() => match received {
                    Ok(changes) => self.accept(&changes)?,
                    Err(RecvError::Lagged(n)) => self.lagged(n),
                    Err(RecvError::Closed) => self.closed(),
                },
                state = finished(job) => self.job_finished(state)?,
            }
        }
    }

    /// Rows available now, without waiting; `None` when there are none yet (or the
    /// changelog ended: see [`Subscription::is_done`]).
    pub fn try_next(&mut self) -> SqlResult<Option<RecordBatch>> {
        loop {
            if let Some(batch) = self.pending.pop_front() {
                return Ok(Some(batch));
            }
            if let Some(e) = &self.failed {
                return Err(e.clone());
            }
            if self.ended {
                return Ok(None);
            }
            match self.feed.try_recv() {
                Ok(changes) => self.accept(&changes)?,
                Err(TryRecvError::Lagged(n)) => self.lagged(n),
                Err(TryRecvError::Closed) => self.closed(),
                Err(TryRecvError::Empty) => match self.job.as_ref().map(|j| j.state()) {
                    Some(JobState::Running) | None => return Ok(None),
                    Some(state) => self.job_finished(state)?,
                },
            }
        }
    }

    /// Rows taken by [`Subscription::next`] but not handed out go back first in line.
    pub fn unread(&mut self, batch: RecordBatch) {
        self.pending.push_front(batch);
    }

    /// Nothing more will come: every row was handed out and the changelog ended or failed.
    pub fn is_done(&self) -> bool {
        self.pending.is_empty() && (self.ended || self.failed.is_some())
    }

    fn accept(&mut self, changes: &Changes) -> SqlResult<()> {
        for change in &changes.changes {
            self.push(change)?;
        }
        self.ended |= changes.ended;
        Ok(())
    }

    fn push(&mut self, change: &ChangeBatch) -> SqlResult<()> {
        let n = change.num_rows();
        if n == 0 {
            return Ok(());
        }
        let ops: ArrayRef = Arc::new(match &change.ops {
            None => StringArray::from(vec!["+I"; n]),
            Some(ops) => StringArray::from_iter_values(ops.values().iter().map(|c| Op::name(*c))),
        });
        let columns = std::iter::once(ops)
            .chain(change.rows.columns().iter().cloned())
            .collect();
        self.pending
            .push_back(crate::stream::batch_of(self.schema.clone(), columns, n)?);
        Ok(())
    }

    fn lagged(&mut self, missed: u64) {
        self.failed = Some(
            SqlError::new(
                sqlstate::INSUFFICIENT_RESOURCES,
                format!(
                    "subscription to {} fell behind and lost its place in the changelog: {missed} \
                     publishes were dropped because the server keeps at most {FEED_CAPACITY} for \
                     a subscriber that does not read them",
                    self.what
                ),
            )
            .with_hint(
                "read rows as they come (FETCH more rows or more often), then SUBSCRIBE again: \
                 it starts over from the current rows",
            ),
        );
    }

    /// The followed state is gone: its view was dropped and its job stopped.
    fn closed(&mut self) {
        self.failed = Some(self.stopped());
    }

    fn stopped(&self) -> SqlError {
        SqlError::new(
            "55000",
            format!(
                "subscription ended: the job maintaining {} was stopped (DROP MATERIALIZED \
                 VIEW, STOP JOB or server shutdown)",
                self.what
            ),
        )
    }

    /// Takes what the job published before it finished, then ends as it did.
    fn job_finished(&mut self, state: JobState) -> SqlResult<()> {
        loop {
            match self.feed.try_recv() {
                Ok(changes) => self.accept(&changes)?,
                Err(TryRecvError::Lagged(n)) => {
                    self.lagged(n);
                    return Ok(());
                }
                Err(_) => break,
            }
        }
        if self.ended {
            return Ok(());
        }
        match state {
            JobState::Running | JobState::Finished => self.ended = true,
            JobState::Failed(code, message) => {
                self.failed = Some(SqlError::new(
                    code,
                    format!("subscription ended: {} failed: {message}", self.what),
                ))
            }
            JobState::Stopped => self.failed = Some(self.stopped()),
        }
        Ok(())
    }
}

/// When `job` ends; never without one.
async fn finished(job: Option<Arc<RunningJob>>) -> JobState {
    match job {
        Some(job) => job.finished().await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use datafusion::arrow::array::{Int64Array, Int8Array};

    use super::*;

    fn rows(schema: &SchemaRef, values: &[i64]) -> RecordBatch {
        RecordBatch::try_new(
            schema.clone(),
            vec![Arc::new(Int64Array::from(values.to_vec()))],
        )
        .unwrap()
    }

    fn texts(batch: &RecordBatch) -> Vec<String> {
        let ops = batch
            .column(0)
            .as_any()
            .downcast_ref::<StringArray>()
            .unwrap();
        let values = batch
            .column(1)
            .as_any()
            .downcast_ref::<Int64Array>()
            .unwrap();
        (0..batch.num_rows())
            .map(|i| format!("{} {}", ops.value(i), values.value(i)))
            .collect()
    }

    fn following(state: &Arc<MvState>, snapshot: bool) -> Subscription {
        let followed = state.follow().unwrap();
        let mut s = Subscription {
            schema: with_op(&state.schema()),
            pending: VecDeque::new(),
            feed: followed.changes,
            job: None,
            what: "test".into(),
            ended: followed.ended,
            failed: None,
            notices: vec![],
            _temporary: None,
        };
        if snapshot {
            for b in followed.snapshot {
                s.push(&ChangeBatch::new(b)).unwrap();
            }
        }
        s
    }

    #[tokio::test]
    async fn snapshot_then_exactly_the_later_publishes() {
        let schema: SchemaRef =
            Arc::new(Schema::new(vec![Field::new("v", DataType::Int64, false)]));
        let state = MvState::new(schema.clone(), true);
        state
            .publish(vec![ChangeBatch::new(rows(&schema, &[1, 2]))], 0, false, 1)
            .unwrap();
        let mut s = following(&state, true);
        let mut no_snapshot = following(&state, false);
        let mut change = ChangeBatch::new(rows(&schema, &[1, 3]));
        change.ops = Some(Int8Array::from(vec![
            Op::UpdateBefore as i8,
            Op::UpdateAfter as i8,
        ]));
        state.publish(vec![change], 0, true, 2).unwrap();
        assert_eq!(texts(&s.next().await.unwrap().unwrap()), ["+I 1", "+I 2"]);
        assert_eq!(texts(&s.next().await.unwrap().unwrap()), ["-U 1", "+U 3"]);
        assert!(s.next().await.unwrap().is_none());
        assert_eq!(
            texts(&no_snapshot.next().await.unwrap().unwrap()),
            ["-U 1", "+U 3"]
        );
        assert!(no_snapshot.is_done());
    }

    #[tokio::test]
    async fn a_subscriber_that_falls_behind_fails_and_stays_failed() {
        let schema: SchemaRef =
            Arc::new(Schema::new(vec![Field::new("v", DataType::Int64, false)]));
        let state = MvState::new(schema.clone(), false);
        let mut s = following(&state, true);
        for i in 0..FEED_CAPACITY as i64 + 5 {
            state
                .publish(
                    vec![ChangeBatch::new(rows(&schema, &[i]))],
                    0,
                    false,
                    i as u64,
                )
                .unwrap();
        }
        let e = s.next().await.unwrap_err();
        assert_eq!(e.code, "53000");
        assert!(e.message.contains("fell behind"), "{}", e.message);
        assert_eq!(s.try_next().unwrap_err().code, "53000");
        // The view itself kept every row.
        assert_eq!(state.size().0, FEED_CAPACITY + 5);
    }
}
