//! Statements that start, inspect and stop continuous queries: CREATE MATERIALIZED VIEW,
//! INSERT INTO ... SELECT jobs, SHOW JOBS, STOP JOB, FLUSH, SELECT over bounded
//! connector inputs, and EXPLAIN of streaming plans.

use std::collections::HashMap;
use std::sync::Arc;

use datafusion::arrow::array::{ArrayRef, Int64Array, StringArray, TimestampMillisecondArray};
use datafusion::arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use datafusion::arrow::record_batch::RecordBatch;
use datafusion::common::tree_node::{TreeNode, TreeNodeRecursion};
use datafusion::common::DataFusionError;
use datafusion::datasource::{source_as_provider, ViewTable};
use datafusion::execution::SessionState;
use datafusion::logical_expr::{DmlStatement, LogicalPlan, WriteOp};
use datafusion::sql::parser::Statement as DFStatement;
use weir_catalog::{Catalog, JobDef, TableDef, ViewDef};

use super::engine::{Engine, Outcome};
use super::error::{SqlError, SqlResult};
use super::parser::{self, Statement};
use super::CommandTag;
use crate::connector::connector_table::ConnectorTable;
use crate::plan::planner::{Mode, Planner};
use crate::plan::window_table::WindowTvfTable;
use crate::stream::checkpoint::coordinator::{recover, Committer, Durable};
use crate::stream::checkpoint::store::Checkpoints;
use crate::stream::checkpoint::{self, view_feed};
use crate::stream::graph::{SinkKind, StreamGraph};
use crate::stream::job::{JobOptions, JobState, RunningJob};
use crate::stream::late::LateRows;
use crate::stream::manager::{JobEntry, JobKind};
use crate::stream::message::NO_WATERMARK;
use crate::stream::mv::MvState;
use crate::stream::state_backend::SledBackend;

/// Whether `plan` reads something only the streaming engine can read: a connector
/// table or a window table function (through views too).
pub fn needs_streaming(plan: &LogicalPlan) -> bool {
    let mut found = false;
    let _ = plan.apply(|node| {
        if let LogicalPlan::TableScan(scan) = node {
            if let Ok(provider) = source_as_provider(&scan.source) {
                let any: &dyn std::any::Any = provider.as_ref();
                if any.is::<WindowTvfTable>() || any.is::<ConnectorTable>() {
                    found = true;
                } else if let Some(view) = any.downcast_ref::<ViewTable>() {
                    found = needs_streaming(view.logical_plan());
                }
            }
        }
        let _ = node.apply_subqueries(|sub| {
            found |= needs_streaming(sub);
            Ok(TreeNodeRecursion::Continue)
        });
        Ok(if found {
            TreeNodeRecursion::Stop
        } else {
            TreeNodeRecursion::Continue
        })
    });
    found
}

/// An INSERT that runs as a continuous job: into a connector table, or from anything
/// only the streaming engine reads. Other INSERTs append once, like Postgres.
pub fn is_job(plan: &LogicalPlan) -> bool {
    let LogicalPlan::Dml(DmlStatement {
        op: WriteOp::Insert(_),
        target,
        input,
        ..
    }) = plan
    else {
        return false;
    };
    let into_connector = source_as_provider(target)
        .map(|p| {
            let any: &dyn std::any::Any = p.as_ref();
            any.is::<ConnectorTable>()
        })
        .unwrap_or(false);
    into_connector || needs_streaming(input)
}

pub fn explain_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![Field::new(
        "QUERY PLAN",
        DataType::Utf8,
        false,
    )]))
}

/// The row an INSERT job returns.
pub fn job_id_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![Field::new(
        "job_id",
        DataType::Utf8,
        false,
    )]))
}

pub(super) fn show_checkpoints_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("job_id", DataType::Utf8, false),
        Field::new("maintains", DataType::Utf8, false),
        Field::new("epoch", DataType::Int64, false),
        Field::new(
            "started",
            DataType::Timestamp(TimeUnit::Millisecond, None),
            false,
        ),
        Field::new("duration_ms", DataType::Int64, false),
        Field::new("alignment_ms", DataType::Int64, false),
        Field::new("bytes_written", DataType::Int64, false),
        Field::new("operator_state_bytes", DataType::Utf8, false),
        Field::new("status", DataType::Utf8, false),
    ]))
}

pub(super) fn external(e: DataFusionError) -> SqlError {
    SqlError::from(e)
}

/// 'state.backend.sled.memory' when not set (the variable's default, '1 mb'): larger
/// budgets made sled itself hold more memory than they kept out of it, and ran slower
/// (benches/README.md, "State on disk").
const DEFAULT_SLED_MEMORY: usize = 1 << 20;

/// The session settings that change how a continuous query is planned: stored with a
/// view or job so that a restart plans the same graph its checkpoints were taken from.
const PLANNING_SETTINGS: &[&str] = &[
    "execution.checkpointing.unaligned",
    "parallelism.default",
    "state.backend",
    "state.backend.sled.memory",
    "table.local-time-zone",
    "table.exec.emit.allow-lateness",
    "table.exec.state.ttl",
    "weir.late-data-table",
];

pub(super) fn planning_settings(
    metadata: &HashMap<String, String>,
) -> std::collections::BTreeMap<String, String> {
    let mut settings: std::collections::BTreeMap<String, String> = PLANNING_SETTINGS
        .iter()
        .filter_map(|k| metadata.get(*k).map(|v| (k.to_string(), v.clone())))
        .collect();
    // The default depends on the machine: a restart elsewhere must not change it.
    settings.insert(
        "parallelism.default".into(),
        Engine::parallelism(metadata).to_string(),
    );
    settings
}

/// Where a view or job starts from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Start<'a> {
    /// New: nothing to restore.
    Fresh,
    /// After a restart: its own newest checkpoint.
    Resume,
    /// Its own newest checkpoint, taken when it was stopped to change its parallelism: a
    /// view's rows are still in memory and published up to it.
    Rescale,
    /// A savepoint ('execution.savepoint.path').
    Savepoint(&'a str),
}

impl<'a> Start<'a> {
    pub(super) fn of(resume: bool, metadata: &'a HashMap<String, String>) -> Self {
        if resume {
            return Start::Resume;
        }
        match metadata
            .get("execution.savepoint.path")
            .filter(|p| !p.is_empty())
        {
            Some(name) => Start::Savepoint(name),
            None => Start::Fresh,
        }
    }
}

pub(super) fn new_job_id() -> String {
    format!("{:016x}", rand::random::<u64>())
}

impl Engine {
    /// The session state a statement plans in: the shared one, with the session's time zone.
    pub(super) fn session_state(&self, metadata: &HashMap<String, String>) -> SessionState {
        let mut state = self.state();
        if let Some(tz) = metadata.get("table.local-time-zone") {
            state.config_mut().options_mut().execution.time_zone = Some(tz.clone());
        }
        state
    }

    pub(super) fn parallelism(metadata: &HashMap<String, String>) -> usize {
        match metadata
            .get("parallelism.default")
            .and_then(|p| p.parse::<usize>().ok())
        {
            Some(n) if n > 0 => n,
            _ => std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1),
        }
    }

    pub(super) fn graph(
        &self,
        metadata: &HashMap<String, String>,
        plan: &LogicalPlan,
        mode: Mode,
        sink: SinkKind,
    ) -> SqlResult<StreamGraph> {
        let state = self.session_state(metadata);
        Planner::new(&state, &self.catalog, Self::parallelism(metadata), mode)
            .with_late_rows(self.late_rows(metadata)?)
            .with_lateness(
                metadata
                    .get("table.exec.emit.allow-lateness")
                    .and_then(|d| crate::connector::options::parse_duration(d))
                    .map_or(0, |d| d.as_millis() as i64),
            )
            .with_state_ttl(
                metadata
                    .get("table.exec.state.ttl")
                    .and_then(|d| crate::connector::options::parse_duration(d))
                    .filter(|d| !d.is_zero()),
            )
            .with_state_backend(self.state_backend(metadata))
            .plan(plan, sink)
            .map(|mut graph| {
                graph.unaligned_checkpoints = metadata
                    .get("execution.checkpointing.unaligned")
                    .is_some_and(|v| v == "true");
                graph
            })
            .map_err(external)
    }

    /// 'state.backend' = 'sled': operators' scratch databases go under the engine's
    /// spill directory.
    fn state_backend(&self, metadata: &HashMap<String, String>) -> Option<SledBackend> {
        if metadata.get("state.backend").map(String::as_str) != Some("sled") {
            return None;
        }
        Some(SledBackend {
            root: self.spill_root.clone(),
            memory: metadata
                .get("state.backend.sled.memory")
                .and_then(|m| crate::connector::options::parse_memory_size(m))
                .unwrap_or(DEFAULT_SLED_MEMORY),
        })
    }

    /// The late-data table the session named, if any.
    fn late_rows(&self, metadata: &HashMap<String, String>) -> SqlResult<Option<Arc<LateRows>>> {
        let Some(name) = metadata
            .get("weir.late-data-table")
            .filter(|n| !n.is_empty())
        else {
            return Ok(None);
        };
        let def = self.catalog.table(name).ok_or_else(|| {
            SqlError::undefined_table(name).with_hint(
                "create the late-data table first, e.g. with the columns of the windowed table \
                 plus late_watermark TIMESTAMP(3) and late_operator STRING",
            )
        })?;
        if def.connector().is_some() {
            return Err(SqlError::new(
                "42809",
                format!(
                    "late-data table \"{name}\" must be a table in Weir's log, without a connector"
                ),
            ));
        }
        Ok(Some(LateRows::new(def, self.catalog.clone())))
    }

    /// Runs a query over bounded inputs to the end and returns its rows.
    pub(super) async fn run_bounded(
        &self,
        metadata: &HashMap<String, String>,
        plan: &LogicalPlan,
    ) -> SqlResult<Vec<RecordBatch>> {
        let (tx, mut rx) = tokio::sync::mpsc::channel(16);
        let graph = self.graph(metadata, plan, Mode::Bounded, SinkKind::Collect(tx))?;
        let job = RunningJob::start(new_job_id(), graph, self.catalog.clone()).map_err(external)?;
        let schema = Arc::new(plan.schema().as_arrow().clone());
        let mut changes = Vec::new();
        while let Some(batch) = rx.recv().await {
            changes.push(batch.map_err(external)?);
        }
        match job.finished().await {
            JobState::Failed(code, message) => Err(SqlError::new(code, message)),
            _ => Ok(crate::stream::changelog::apply(&schema, vec![], changes)?),
        }
    }

    /// EXPLAIN of a query that runs as a stream: its operator graph.
    pub(super) fn explain_stream(
        &self,
        metadata: &HashMap<String, String>,
        plan: &LogicalPlan,
        mode: Mode,
    ) -> SqlResult<Outcome> {
        let (tx, _rx) = tokio::sync::mpsc::channel(1);
        let graph = self.graph(metadata, plan, mode, SinkKind::Collect(tx))?;
        self.explain_rows(&graph)
    }

    /// EXPLAIN CREATE MATERIALIZED VIEW: the graph the view's job would run.
    pub(super) async fn explain_view(
        &self,
        metadata: &HashMap<String, String>,
        query: &str,
    ) -> SqlResult<Outcome> {
        let plan = self.plan_text(metadata, query).await?;
        let state = MvState::new(Arc::new(plan.schema().as_arrow().clone()), true);
        let graph = self.graph(metadata, &plan, Mode::Continuous, SinkKind::View(state))?;
        self.explain_rows(&graph)
    }

    fn explain_rows(&self, graph: &StreamGraph) -> SqlResult<Outcome> {
        let text = crate::plan::explain::render(graph);
        let schema = explain_schema();
        let lines: ArrayRef = Arc::new(StringArray::from_iter_values(
            text.lines().collect::<Vec<_>>(),
        ));
        self.rows(RecordBatch::try_new(schema, vec![lines])?)
    }

    pub(super) async fn create_materialized_view(
        &self,
        metadata: &HashMap<String, String>,
        def: ViewDef,
    ) -> SqlResult<Outcome> {
        let notices = self.start_view(metadata, &def, false).await?;
        let name = def.name.clone();
        if let Err(e) = self.catalog_write(move |c| c.create_view(def, false)).await {
            if let Some(id) = self.jobs.job_of_view(&name) {
                self.jobs.stop(&id);
            }
            self.jobs.remove_view(&name);
            return Err(e);
        }
        Ok(Outcome::noticed(
            notices,
            Outcome::Command(CommandTag::new("CREATE MATERIALIZED VIEW")),
        ))
    }

    pub(super) async fn plan_text(
        &self,
        metadata: &HashMap<String, String>,
        text: &str,
    ) -> SqlResult<LogicalPlan> {
        let statement = match parser::parse(text)?.pop().map(|p| p.statement) {
            Some(Statement::Sql(s)) => s,
            _ => {
                return Err(SqlError::internal(format!(
                    "stored statement is not SQL: {text}"
                )))
            }
        };
        let mut statement = *statement;
        super::rewrite::rewrite(&mut statement, metadata)?;
        Ok(self
            .session_state(metadata)
            .statement_to_plan(DFStatement::Statement(Box::new(statement)))
            .await?)
    }

    /// Plans and starts the job maintaining a materialized view.
    /// Starts a view's job; returns the plan's notices.
    async fn start_view(
        &self,
        metadata: &HashMap<String, String>,
        def: &ViewDef,
        resume: bool,
    ) -> SqlResult<Vec<String>> {
        self.start_view_job(metadata, def, Start::of(resume, metadata), None)
            .await
    }

    /// Starts the job of view `def`, into `rows` when the view's rows are kept (a
    /// rescale), else into new ones.
    pub(super) async fn start_view_job(
        &self,
        metadata: &HashMap<String, String>,
        def: &ViewDef,
        start: Start<'_>,
        rows: Option<Arc<MvState>>,
    ) -> SqlResult<Vec<String>> {
        let plan = self.plan_text(metadata, &def.query).await?;
        let state = match rows {
            Some(rows) => rows,
            None => {
                let schema = Arc::new(plan.schema().as_arrow().clone());
                let (probe, _) = tokio::sync::mpsc::channel(1);
                let updating = self
                    .graph(metadata, &plan, Mode::Continuous, SinkKind::Collect(probe))?
                    .nodes
                    .iter()
                    .any(|n| n.changelog != crate::stream::graph::ChangelogMode::InsertOnly);
                MvState::new(schema, updating)
            }
        };
        let graph = self.graph(
            metadata,
            &plan,
            Mode::Continuous,
            SinkKind::View(state.clone()),
        )?;
        let notices = graph.notices.clone();
        let key = format!("view/{}", def.name);
        let job = match self
            .start_durable(new_job_id(), &key, graph.clone(), start)
            .await
        {
            Ok(job) => job,
            // A view is derived data: when its checkpoint cannot be used it is rebuilt.
            Err(e) if start == Start::Resume => {
                tracing::warn!(
                    "materialized view {} is rebuilt from its inputs: {}",
                    def.name,
                    e.message
                );
                state.reset();
                self.start_durable(new_job_id(), &key, graph, Start::Fresh)
                    .await?
            }
            Err(e) => return Err(e),
        };
        self.jobs.add_view(&def.name, state);
        self.jobs.add(JobEntry {
            job,
            statement: format!("CREATE MATERIALIZED VIEW {} AS {}", def.name, def.query),
            kind: JobKind::View(def.name.clone()),
        });
        Ok(notices)
    }

    pub(super) async fn drop_materialized_view(&self, name: &str) -> SqlResult<bool> {
        let view = name.to_string();
        let dropped = self.catalog_write(move |c| c.drop_view(&view)).await?;
        if let Some(id) = self.jobs.job_of_view(name) {
            self.jobs.stop_and_wait(&id).await;
        }
        self.jobs.remove_view(name);
        self.remove_checkpoints(format!("view/{name}")).await?;
        Ok(dropped)
    }

    /// Starts a view's or job's graph checkpointing under `key`. With `resume` (a
    /// restart) it continues from its newest checkpoint, whose commit is redone first;
    /// otherwise checkpoints an earlier one of the same name left are removed.
    async fn start_durable(
        &self,
        id: String,
        key: &str,
        mut graph: StreamGraph,
        start: Start<'_>,
    ) -> SqlResult<Arc<RunningJob>> {
        let checkpoints = Checkpoints::new(self.catalog.store(), key);
        let committer = match crate::stream::job::committer(&graph, &self.catalog, &id)? {
            // Nothing to put back into rows that stayed published.
            Committer::View(_) if start == Start::Rescale => Committer::Direct,
            committer => committer,
        };
        let followed = view_feed::followed_views(&graph);
        let restore = if let Start::Savepoint(name) = start {
            self.seed_from_savepoint(name, key).await?;
            let restored = match restore_into(&checkpoints, &mut graph, &committer).await {
                Ok(restored) => restored,
                Err(e) => {
                    self.remove_checkpoints(key.to_string()).await?;
                    return Err(SqlError::new(
                        "55000",
                        format!(
                            "cannot start from savepoint '{name}': {}",
                            SqlError::from(e).message
                        ),
                    )
                    .with_hint(
                        "a savepoint restores only the same query (at any parallelism); \
                         RESET 'execution.savepoint.path' to start from scratch",
                    ));
                }
            };
            if let Some(why) = follow_from(&followed, &checkpoints, restored.as_ref()).await? {
                self.remove_checkpoints(key.to_string()).await?;
                return Err(SqlError::new(
                    "55000",
                    format!("cannot start from savepoint '{name}': {why}"),
                )
                .with_hint("RESET 'execution.savepoint.path' to start from scratch"));
            }
            restored
        } else if matches!(start, Start::Resume | Start::Rescale) {
            let restored = restore_into(&checkpoints, &mut graph, &committer)
                .await
                .map_err(|e| {
                    SqlError::new(
                        "55000",
                        format!(
                            "cannot resume from its checkpoint: {}",
                            SqlError::from(e).message
                        ),
                    )
                })?;
            match follow_from(&followed, &checkpoints, restored.as_ref()).await? {
                None => restored,
                // A view is rebuilt by its caller; a job starts over from the views'
                // rows, as it would have before readers kept their place.
                Some(why) if start == Start::Resume && key.starts_with("job/") => {
                    tracing::warn!("job {id} starts over: {why}");
                    self.start_afresh(key, &followed, &checkpoints).await?;
                    None
                }
                Some(why) => {
                    return Err(SqlError::new(
                        "55000",
                        format!("cannot resume from its checkpoint: {why}"),
                    ))
                }
            }
        } else {
            self.start_afresh(key, &followed, &checkpoints).await?;
            None
        };
        if let Committer::View(state) = &committer {
            let store = checkpoints.clone();
            let lineage = tokio::task::spawn_blocking(move || store.lineage())
                .await
                .map_err(|e| SqlError::internal(e.to_string()))?
                .map_err(external)?;
            state.set_log(checkpoints.clone(), lineage);
        }
        let options = JobOptions {
            durable: Some(Durable {
                checkpoints,
                fingerprint: checkpoint::fingerprint(&graph),
                parallelism: checkpoint::rescale::parallelism(&graph),
            }),
            history: self.jobs.history.clone(),
            restore,
            aligned_epochs: self.jobs.aligned_epochs.clone(),
        };
        RunningJob::start_with(id, graph, self.catalog.clone(), options).map_err(external)
    }

    /// Removes a view's or job's checkpoints, and its places in the views it read.
    pub(super) async fn remove_checkpoints(&self, key: String) -> SqlResult<()> {
        let checkpoints = Checkpoints::new(self.catalog.store(), &key);
        let catalog = self.catalog.clone();
        tokio::task::spawn_blocking(move || remove_checkpoints(&catalog, &checkpoints))
            .await
            .map_err(|e| SqlError::internal(e.to_string()))?
            .map_err(external)
    }

    /// Removes what an earlier view or job of the same name left, and registers the
    /// new one at the views it follows from their rows as they are now.
    async fn start_afresh(
        &self,
        key: &str,
        followed: &[view_feed::FollowedView],
        checkpoints: &Checkpoints,
    ) -> SqlResult<()> {
        self.remove_checkpoints(key.to_string()).await?;
        let (followed, reader) = (followed.to_vec(), checkpoints.clone());
        tokio::task::spawn_blocking(move || view_feed::register_fresh(&followed, &reader))
            .await
            .map_err(|e| SqlError::internal(e.to_string()))?
            .map_err(external)
    }

    /// Starts `INSERT INTO sink SELECT ...` as a job; with 'table.dml-sync' waits for it.
    pub(super) async fn insert_job(
        &self,
        metadata: &HashMap<String, String>,
        statement: String,
        plan: &LogicalPlan,
    ) -> SqlResult<Outcome> {
        let (id, notices) = self.start_insert_job(metadata, statement, plan).await?;
        let ids: ArrayRef = Arc::new(StringArray::from(vec![id]));
        Ok(Outcome::noticed(
            notices,
            self.rows(RecordBatch::try_new(job_id_schema(), vec![ids])?)?,
        ))
    }

    /// `CREATE TABLE t [WITH (...)] AS query`: the table takes the query's columns, then
    /// an INSERT fills it (a job when the query reads streams).
    pub(super) async fn create_table_as(
        &self,
        metadata: &HashMap<String, String>,
        create: &super::ddl::CreateTable,
        query: &str,
    ) -> SqlResult<Outcome> {
        let tag = Outcome::Command(CommandTag::new("CREATE TABLE"));
        if self.catalog.exists(&create.name) {
            if create.if_not_exists {
                return Ok(tag);
            }
            return Err(SqlError::new(
                "42P07",
                format!("relation \"{}\" already exists", create.name),
            ));
        }
        crate::connector::options::validate(&create.options)?;
        let plan = self.plan_text(metadata, query).await?;
        let columns = plan
            .schema()
            .fields()
            .iter()
            .map(|f| {
                let data_type =
                    weir_catalog::SqlType::from_arrow(f.data_type()).ok_or_else(|| {
                        SqlError::new(
                            "42804",
                            format!(
                                "column \"{}\" has type {}, which a table cannot hold",
                                f.name(),
                                f.data_type()
                            ),
                        )
                    })?;
                Ok(weir_catalog::ColumnDef {
                    name: f.name().clone(),
                    data_type,
                    nullable: true,
                    metadata: None,
                })
            })
            .collect::<SqlResult<Vec<_>>>()?;
        let def = TableDef {
            id: weir_catalog::TableId(0),
            name: create.name.clone(),
            columns,
            computed: vec![],
            primary_key: vec![],
            watermark: None,
            options: create.options.clone(),
        };
        self.catalog_write(move |c| c.create_table(def, false))
            .await?;
        let insert = format!(
            "INSERT INTO {} {query}",
            weir_catalog::quote_ident(&create.name)
        );
        let filled = async {
            let plan = self.plan_text(metadata, &insert).await?;
            if is_job(&plan) {
                self.start_insert_job(metadata, insert.clone(), &plan)
                    .await?;
            } else {
                datafusion::dataframe::DataFrame::new(self.session_state(metadata), plan)
                    .collect()
                    .await?;
            }
            SqlResult::Ok(())
        };
        if let Err(e) = filled.await {
            let name = create.name.clone();
            let _ = self.catalog_write(move |c| c.drop_table(&name)).await;
            return Err(e);
        }
        Ok(tag)
    }

    /// Starts an INSERT job and returns its id.
    async fn start_insert_job(
        &self,
        metadata: &HashMap<String, String>,
        statement: String,
        plan: &LogicalPlan,
    ) -> SqlResult<(String, Vec<String>)> {
        let id = new_job_id();
        let (job, def, notices) = self
            .start_insert(metadata, &id, &statement, plan, false)
            .await?;
        let depends_on = std::iter::once(def.name.clone())
            .chain(sources_of(plan))
            .collect();
        let job_def = JobDef {
            id: id.clone(),
            statement: statement.clone(),
            depends_on,
            settings: planning_settings(metadata),
        };
        let sync = metadata.get("table.dml-sync").is_some_and(|v| v == "true");
        if sync {
            let state = job.finished().await;
            self.jobs.stop_and_wait(&id).await;
            self.remove_checkpoints(format!("job/{id}")).await?;
            if let JobState::Failed(code, message) = state {
                return Err(SqlError::new(code, format!("job {id} failed: {message}")));
            }
        } else {
            self.catalog_write(move |c| c.create_job(job_def)).await?;
            self.forget_when_done(job);
        }
        Ok((id, notices))
    }

    /// The graph of an INSERT job: its query into the target's physical columns.
    pub(super) fn insert_graph(
        &self,
        metadata: &HashMap<String, String>,
        plan: &LogicalPlan,
    ) -> SqlResult<(StreamGraph, Arc<TableDef>)> {
        let LogicalPlan::Dml(dml) = plan else {
            return Err(SqlError::internal("not an INSERT"));
        };
        let name = dml.table_name.table().to_string();
        let def = self
            .catalog
            .table(&name)
            .ok_or_else(|| SqlError::undefined_table(&name))?;
        let physical = def.physical_schema().fields().len();
        let input = datafusion::logical_expr::LogicalPlanBuilder::from(dml.input.as_ref().clone())
            .project(
                dml.input
                    .schema()
                    .columns()
                    .into_iter()
                    .take(physical)
                    .map(datafusion::logical_expr::Expr::Column),
            )?
            .build()?;
        let sink = match def.connector() {
            None => SinkKind::Log(def.clone()),
            Some(connector) => {
                if matches!(connector, "kafka" | "upsert-kafka") {
                    crate::connector::kafka::sink::check_sink(&def, self.jobs.epoch_interval())?;
                }
                SinkKind::Connector(def.clone())
            }
        };
        Ok((self.graph(metadata, &input, Mode::Continuous, sink)?, def))
    }

    /// EXPLAIN of an INSERT job.
    pub(super) fn explain_insert(
        &self,
        metadata: &HashMap<String, String>,
        plan: &LogicalPlan,
    ) -> SqlResult<Outcome> {
        let (graph, _) = self.insert_graph(metadata, plan)?;
        self.explain_rows(&graph)
    }

    pub(super) async fn start_insert(
        &self,
        metadata: &HashMap<String, String>,
        id: &str,
        statement: &str,
        plan: &LogicalPlan,
        resume: bool,
    ) -> SqlResult<(Arc<RunningJob>, Arc<TableDef>, Vec<String>)> {
        let (graph, def) = self.insert_graph(metadata, plan)?;
        let notices = graph.notices.clone();
        let job = self
            .start_durable(
                id.to_string(),
                &format!("job/{id}"),
                graph,
                Start::of(resume, metadata),
            )
            .await?;
        self.jobs.add(JobEntry {
            job: job.clone(),
            statement: statement.to_string(),
            kind: JobKind::Insert(def.name.clone()),
        });
        Ok((job, def, notices))
    }

    pub(super) fn show_jobs(&self) -> SqlResult<Outcome> {
        let jobs = self.jobs.list();
        let schema = self.show_jobs_schema();
        self.show_jobs_rows(schema, jobs)
    }

    /// SHOW CHECKPOINTS: the latest checkpoints of every view and job, oldest first.
    pub(super) fn show_checkpoints(&self) -> SqlResult<Outcome> {
        let records = self.jobs.history.list();
        let owner = |job: &str| {
            self.jobs
                .list()
                .into_iter()
                .find(|j| j.0 == job)
                .map(|j| match j.4 {
                    JobKind::View(v) => format!("materialized view {v}"),
                    _ => format!("job {job}"),
                })
                .unwrap_or_else(|| format!("job {job}"))
        };
        let millis = |d: std::time::Duration| d.as_millis() as i64;
        let columns: Vec<ArrayRef> = vec![
            Arc::new(StringArray::from_iter_values(
                records.iter().map(|r| &r.job),
            )),
            Arc::new(StringArray::from_iter_values(
                records.iter().map(|r| owner(&r.job)),
            )),
            Arc::new(Int64Array::from_iter_values(
                records.iter().map(|r| r.epoch as i64),
            )),
            Arc::new(TimestampMillisecondArray::from_iter_values(
                records.iter().map(|r| r.started_ms),
            )),
            Arc::new(Int64Array::from_iter_values(
                records.iter().map(|r| millis(r.duration)),
            )),
            Arc::new(Int64Array::from_iter_values(
                records.iter().map(|r| millis(r.alignment)),
            )),
            Arc::new(Int64Array::from_iter_values(
                records.iter().map(|r| r.bytes as i64),
            )),
            Arc::new(StringArray::from_iter_values(
                records.iter().map(|r| &r.state),
            )),
            Arc::new(StringArray::from_iter_values(
                records.iter().map(|r| &r.status),
            )),
        ];
        self.rows(RecordBatch::try_new(show_checkpoints_schema(), columns)?)
    }

    pub(super) fn show_jobs_schema(&self) -> SchemaRef {
        Arc::new(Schema::new(vec![
            Field::new("job_id", DataType::Utf8, false),
            Field::new("statement", DataType::Utf8, false),
            Field::new("state", DataType::Utf8, false),
            Field::new("rows_in", DataType::Int64, false),
            Field::new("rows_out", DataType::Int64, false),
            Field::new(
                "watermark",
                DataType::Timestamp(TimeUnit::Millisecond, None),
                true,
            ),
            Field::new("late_rows_dropped", DataType::Int64, false),
            Field::new("state_bytes", DataType::Int64, false),
            Field::new("bad_records_skipped", DataType::Int64, false),
            Field::new("latency_p50_ms", DataType::Int64, true),
            Field::new("latency_p99_ms", DataType::Int64, true),
        ]))
    }

    fn show_jobs_rows(
        &self,
        schema: SchemaRef,
        jobs: Vec<(String, String, JobState, Arc<RunningJob>, JobKind)>,
    ) -> SqlResult<Outcome> {
        use std::sync::atomic::Ordering::Relaxed;
        let watermark = |j: &RunningJob| {
            let w = j.metrics.watermark.load(Relaxed);
            (w != NO_WATERMARK && w != i64::MAX).then_some(w)
        };
        let latency = |q: f64| -> ArrayRef {
            Arc::new(Int64Array::from_iter(jobs.iter().map(|j| {
                crate::stream::latency::quantile(&j.3.metrics.latency, q).map(|ms| ms as i64)
            })))
        };
        let columns: Vec<ArrayRef> = vec![
            Arc::new(StringArray::from_iter_values(jobs.iter().map(|j| &j.0))),
            Arc::new(StringArray::from_iter_values(
                jobs.iter().map(|j| crate::plan::window_tvf::readable(&j.1)),
            )),
            Arc::new(StringArray::from_iter_values(
                jobs.iter().map(|j| j.2.to_string()),
            )),
            Arc::new(Int64Array::from_iter_values(
                jobs.iter()
                    .map(|j| j.3.metrics.rows_in.load(Relaxed) as i64),
            )),
            Arc::new(Int64Array::from_iter_values(
                jobs.iter()
                    .map(|j| j.3.metrics.rows_out.load(Relaxed) as i64),
            )),
            Arc::new(TimestampMillisecondArray::from_iter(
                jobs.iter().map(|j| watermark(&j.3)),
            )),
            Arc::new(Int64Array::from_iter_values(
                jobs.iter().map(|j| j.3.metrics.late_rows() as i64),
            )),
            Arc::new(Int64Array::from_iter_values(jobs.iter().map(|j| {
                let view = match &j.4 {
                    JobKind::View(name) => self.jobs.view(name).map(|s| s.size().1).unwrap_or(0),
                    JobKind::Insert(_) | JobKind::Subscribe => 0,
                };
                (j.3.metrics.state_bytes() + view) as i64
            }))),
            Arc::new(Int64Array::from_iter_values(
                jobs.iter()
                    .map(|j| j.3.metrics.bad_records_skipped.load(Relaxed) as i64),
            )),
            latency(0.5),
            latency(0.99),
        ];
        self.rows(RecordBatch::try_new(schema, columns)?)
    }

    pub(super) async fn flush(&self) -> SqlResult<Outcome> {
        self.jobs.flush().await;
        Ok(Outcome::Command(CommandTag::new("FLUSH")))
    }

    /// Starts the views and jobs in the catalog again after a restart, each from its
    /// newest checkpoint. One that cannot start is logged and left stopped.
    pub async fn resume(&self) {
        match checkpoint::store::latest_epoch(&self.catalog.store()) {
            Ok(epoch) => self.jobs.advance_epoch_to(epoch),
            Err(e) => tracing::error!("checkpoints cannot be read: {e}"),
        }
        let mut views: Vec<Arc<ViewDef>> = self
            .catalog
            .views()
            .into_iter()
            .filter(|v| v.materialized)
            .collect();
        // A view over another view starts after it.
        while !views.is_empty() {
            let ready = views.iter().position(|v| {
                v.depends_on
                    .iter()
                    .all(|d| !views.iter().any(|w| &w.name == d))
            });
            let view = views.remove(ready.unwrap_or(0));
            let metadata: HashMap<String, String> = view.settings.clone().into_iter().collect();
            if let Err(e) = self.start_view(&metadata, &view, true).await {
                tracing::error!(
                    "materialized view {} did not start: {}",
                    view.name,
                    e.message
                );
            }
        }
        for job in self.catalog.jobs() {
            let metadata: HashMap<String, String> = job.settings.clone().into_iter().collect();
            let started = async {
                let plan = self.plan_text(&metadata, &job.statement).await?;
                self.start_insert(&metadata, &job.id, &job.statement, &plan, true)
                    .await
            };
            match started.await {
                Ok((running, _, _)) => self.forget_when_done(running),
                Err(e) => tracing::error!("job {} did not start: {}", job.id, e.message),
            }
        }
    }

    /// A job that finished (its inputs were bounded) or failed is not started again after
    /// a restart: its catalog entry and checkpoints go; SHOW JOBS lists it until then.
    pub(super) fn forget_when_done(&self, job: Arc<RunningJob>) {
        let catalog = self.catalog.clone();
        tokio::spawn(async move {
            if job.finished().await == JobState::Stopped {
                return;
            }
            let id = job.id.clone();
            let checkpoints = Checkpoints::new(catalog.store(), &format!("job/{id}"));
            let dropped = tokio::task::spawn_blocking(move || {
                catalog.drop_job(&id)?;
                remove_checkpoints(&catalog, &checkpoints)
                    .map_err(|e| weir_catalog::CatalogError::Unsupported(e.to_string()))
            })
            .await;
            if let Ok(Err(e)) = dropped {
                tracing::error!("finished job {} stays in the catalog: {e}", job.id);
            }
        });
    }
}

/// Tables and views an INSERT's query reads.
fn sources_of(plan: &LogicalPlan) -> Vec<String> {
    let mut names = Vec::new();
    let LogicalPlan::Dml(dml) = plan else {
        return names;
    };
    let _ = dml.input.apply(|node| {
        if let LogicalPlan::TableScan(scan) = node {
            let name = scan.table_name.table().to_string();
            match crate::plan::window_tvf::WindowSpec::from_table_name(&name) {
                Some(spec) => names.push(spec.table),
                None => names.push(name),
            }
        }
        Ok(TreeNodeRecursion::Continue)
    });
    names.sort();
    names.dedup();
    names
}

/// The names of the materialized views.
pub(super) fn materialized_views(catalog: &Catalog) -> Vec<String> {
    catalog
        .views()
        .into_iter()
        .filter(|v| v.materialized)
        .map(|v| v.name.clone())
        .collect()
}

/// Removes a view's or job's checkpoints, and its places in the views it read.
fn remove_checkpoints(
    catalog: &Catalog,
    checkpoints: &Checkpoints,
) -> datafusion::common::Result<()> {
    view_feed::unregister(&catalog.store(), materialized_views(catalog), checkpoints)?;
    checkpoints.remove()
}

/// Registers a restored reader at the views it follows, where its checkpoint resumes
/// (before anything is read: a fold must keep what it needs); why it cannot go on
/// there, if so.
async fn follow_from(
    followed: &[view_feed::FollowedView],
    reader: &Checkpoints,
    restored: Option<&crate::stream::checkpoint::Restored>,
) -> SqlResult<Option<String>> {
    let Some(restored) = restored.filter(|_| !followed.is_empty()) else {
        return Ok(None);
    };
    let sources: Vec<_> = restored.tasks.iter().map(|t| t.source.clone()).collect();
    let (followed, reader) = (followed.to_vec(), reader.clone());
    tokio::task::spawn_blocking(move || {
        view_feed::register_restored(&followed, &reader, &sources)?;
        view_feed::unresumable(&followed, &sources)
    })
    .await
    .map_err(|e| SqlError::internal(e.to_string()))?
    .map_err(external)
}

/// The newest checkpoint under `checkpoints`, restored into `graph`: its sources keep the
/// parallelism they were checkpointed at, everything else is redistributed to the graph's.
async fn restore_into(
    checkpoints: &Checkpoints,
    graph: &mut StreamGraph,
    committer: &Committer,
) -> datafusion::common::Result<Option<crate::stream::checkpoint::Restored>> {
    let stored = checkpoints.clone();
    let latest = tokio::task::spawn_blocking(move || stored.latest())
        .await
        .map_err(|e| DataFusionError::External(Box::new(e)))??;
    if let Some(meta) = latest {
        checkpoint::rescale::keep_source_parallelism(graph, &meta.parallelism);
    }
    recover(checkpoints, graph, committer).await
}
