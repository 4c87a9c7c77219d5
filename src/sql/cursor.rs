//! The cursors of one connection, for drivers that read whole results at once (psycopg,
//! JDBC): `DECLARE c CURSOR FOR SUBSCRIBE ...` follows a changefeed that each FETCH reads
//! a piece of, waiting for changes; `DECLARE c CURSOR FOR SELECT ...` hands out rows
//! computed at DECLARE. Cursors declared in a transaction close when it ends.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use datafusion::arrow::datatypes::SchemaRef;
use datafusion::arrow::record_batch::RecordBatch;

use super::column_names;
use super::engine::{Engine, Outcome};
use super::error::{SqlError, SqlResult};
use super::subscribe::Subscription;
use super::subscribe_syntax::{CursorQuery, Declare, Fetch};

/// A declared cursor.
pub struct Cursor {
    schema: SchemaRef,
    source: Source,
    /// Warnings about the query's plan, for the client.
    notices: Vec<String>,
}

enum Source {
    Changes(Subscription),
    Rows(VecDeque<RecordBatch>),
}

impl Cursor {
    /// Runs what DECLARE names: starts the subscription, or computes the query's rows.
    pub async fn open(
        engine: &Engine,
        metadata: &HashMap<String, String>,
        declare: &Declare,
    ) -> SqlResult<Self> {
        match &declare.query {
            CursorQuery::Subscribe(spec) => {
                let mut subscription = engine.subscribe(metadata, spec).await?;
                Ok(Self {
                    schema: subscription.schema(),
                    notices: subscription.take_notices(),
                    source: Source::Changes(subscription),
                })
            }
            CursorQuery::Query(statement) => {
                let (notices, outcome) =
                    match engine.execute(metadata, statement, None, None).await? {
                        Outcome::Noticed(notices, outcome) => (notices, *outcome),
                        outcome => (vec![], outcome),
                    };
                match outcome {
                    Outcome::Rows(df, names) => {
                        let schema = column_names::rename(
                            &std::sync::Arc::new(df.schema().as_arrow().clone()),
                            &names,
                        );
                        let rows = df
                            .collect()
                            .await?
                            .into_iter()
                            .map(|b| {
                                crate::stream::batch_of(
                                    schema.clone(),
                                    b.columns().to_vec(),
                                    b.num_rows(),
                                )
                            })
                            .collect::<Result<_, _>>()?;
                        Ok(Self {
                            schema,
                            source: Source::Rows(rows),
                            notices,
                        })
                    }
                    _ => Err(SqlError::syntax(
                        "DECLARE CURSOR takes a query that returns rows",
                    )),
                }
            }
        }
    }

    pub fn schema(&self) -> SchemaRef {
        self.schema.clone()
    }

    /// Warnings to send with DECLARE's reply.
    pub fn take_notices(&mut self) -> Vec<String> {
        std::mem::take(&mut self.notices)
    }

    /// Up to `count` rows (`None`: all there are). A changefeed cursor waits until at least
    /// one row is there, or `timeout` passes (then it returns none), and then returns
    /// what is there without waiting for more.
    async fn fetch(
        &mut self,
        count: Option<u64>,
        timeout: Option<Duration>,
    ) -> SqlResult<Vec<RecordBatch>> {
        let limit = count.map_or(usize::MAX, |c| usize::try_from(c).unwrap_or(usize::MAX));
        let mut out = Out {
            batches: vec![],
            rows: 0,
            limit,
        };
        match &mut self.source {
            Source::Rows(rows) => {
                while let Some(batch) = rows.pop_front() {
                    if let Some(rest) = out.take(batch) {
                        rows.push_front(rest);
                        break;
                    }
                }
            }
            Source::Changes(subscription) => {
                if limit == 0 {
                    return Ok(vec![]);
                }
                out.ready(subscription)?;
                if out.rows == 0 && !subscription.is_done() {
                    let first = match timeout {
                        Some(t) => tokio::time::timeout(t, subscription.next())
                            .await
                            .unwrap_or(Ok(None))?,
                        None => subscription.next().await?,
                    };
                    if let Some(batch) = first {
                        if let Some(rest) = out.take(batch) {
                            subscription.unread(rest);
                        }
                        out.ready(subscription)?;
                    }
                }
            }
        }
        Ok(out.batches)
    }
}

/// Rows a FETCH collects, up to its limit.
struct Out {
    batches: Vec<RecordBatch>,
    rows: usize,
    limit: usize,
}

impl Out {
    /// Takes what fits of `batch`; returns the rest.
    fn take(&mut self, batch: RecordBatch) -> Option<RecordBatch> {
        let room = self.limit - self.rows;
        if batch.num_rows() <= room {
            self.rows += batch.num_rows();
            self.batches.push(batch);
            return None;
        }
        self.rows += room;
        self.batches.push(batch.slice(0, room));
        Some(batch.slice(room, batch.num_rows() - room))
    }

    /// Takes what the subscription has ready. An error after some rows waits for the
    /// next FETCH, so the rows before it are not lost.
    fn ready(&mut self, subscription: &mut Subscription) -> SqlResult<()> {
        while self.rows < self.limit {
            match subscription.try_next() {
                Ok(Some(batch)) => {
                    if let Some(rest) = self.take(batch) {
                        subscription.unread(rest);
                    }
                }
                Ok(None) => break,
                Err(_) if self.rows > 0 => break,
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}

struct Entry {
    schema: SchemaRef,
    /// Closed when the transaction that declared it ends.
    in_transaction: bool,
    cursor: Arc<tokio::sync::Mutex<Cursor>>,
}

/// A connection's cursors by name. Dropped with the connection, which stops their
/// subscriptions.
#[derive(Default)]
pub struct Cursors {
    cursors: Mutex<HashMap<String, Entry>>,
}

fn undefined(name: &str) -> SqlError {
    SqlError::new("34000", format!("cursor \"{name}\" does not exist")).with_hint(
        "DECLARE it first; cursors declared in a transaction close at its COMMIT or ROLLBACK",
    )
}

impl Cursors {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Entry>> {
        self.cursors.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn declare(&self, name: &str, cursor: Cursor, in_transaction: bool) -> SqlResult<()> {
        let mut cursors = self.lock();
        if cursors.contains_key(name) {
            return Err(
                SqlError::new("42P03", format!("cursor \"{name}\" already exists"))
                    .with_hint(format!("CLOSE {name} first, or pick another name")),
            );
        }
        cursors.insert(
            name.to_string(),
            Entry {
                schema: cursor.schema(),
                in_transaction,
                cursor: Arc::new(tokio::sync::Mutex::new(cursor)),
            },
        );
        Ok(())
    }

    /// The columns FETCH from `name` returns, if it exists.
    pub fn schema(&self, name: &str) -> Option<SchemaRef> {
        self.lock().get(name).map(|e| e.schema.clone())
    }

    pub async fn fetch(&self, fetch: &Fetch) -> SqlResult<(SchemaRef, Vec<RecordBatch>)> {
        let (schema, cursor) = {
            let cursors = self.lock();
            let entry = cursors
                .get(&fetch.cursor)
                .ok_or_else(|| undefined(&fetch.cursor))?;
            (entry.schema.clone(), entry.cursor.clone())
        };
        let rows = cursor
            .lock()
            .await
            .fetch(fetch.count, fetch.timeout)
            .await?;
        Ok((schema, rows))
    }

    /// Closes `name` (`None`: all); returns the names closed.
    pub fn close(&self, name: Option<&str>) -> SqlResult<Vec<String>> {
        let mut cursors = self.lock();
        match name {
            None => Ok(cursors.drain().map(|(n, _)| n).collect()),
            Some(name) => match cursors.remove(name) {
                Some(_) => Ok(vec![name.to_string()]),
                None => Err(undefined(name)),
            },
        }
    }

    /// The transaction ended: closes the cursors declared in it; returns their names.
    pub fn end_transaction(&self) -> Vec<String> {
        let mut cursors = self.lock();
        let ended: Vec<String> = cursors
            .iter()
            .filter(|(_, e)| e.in_transaction)
            .map(|(n, _)| n.clone())
            .collect();
        for name in &ended {
            cursors.remove(name);
        }
        ended
    }
}
