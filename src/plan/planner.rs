//! Turns an optimized DataFusion LogicalPlan into a [`StreamGraph`].
//!
//! Each plan node becomes a streaming node: scans become sources, projections and filters
//! stateless operators, window table functions and the aggregates, ranks and joins over
//! their windows become window operators. What has no streaming form yet runs once at the
//! end of a bounded input (a SELECT over bounded sources) and is refused for continuous
//! queries with a message that says what to write instead.

use std::sync::Arc;

use datafusion::arrow::datatypes::{Schema, SchemaRef};
use datafusion::catalog::TableProvider;
use datafusion::common::{Column, DFSchema, DFSchemaRef, DataFusionError, Result};
use datafusion::datasource::source_as_provider;
use datafusion::datasource::ViewTable;
use datafusion::execution::SessionState;
use datafusion::logical_expr::{Expr, GroupingSet, LogicalPlan, TableScan};
use datafusion::physical_expr::utils::collect_columns;
use datafusion::physical_expr::PhysicalExpr;
// The one-call form of DataFusion's aggregate lowering; its builder replacement plans
// whole aggregate nodes, not single calls against a given input.
#[allow(deprecated)]
use datafusion::physical_planner::create_aggregate_expr_and_maybe_filter;
use weir_catalog::{Catalog, TableDef};

use super::window_table::{WindowTvfTable, WINDOW_END, WINDOW_START, WINDOW_TIME};
use super::window_tvf::WindowKind;
use crate::connector::connector_table::ConnectorTable;
use crate::connector::log_table::LogTable;
use crate::sql::error::{sqlstate, SqlError};
use crate::stream::graph::{
    ChangelogMode, Edge, Exchange, NodeKind, SinkKind, SourceKind, SourceSpec, StreamGraph,
    StreamNode, TimeSource,
};
use crate::stream::late::{LateRecorder, LateRows};
use crate::stream::mv::MvTable;
use crate::stream::ops::fragment::Fragment;
use crate::stream::ops::group_agg::GroupAggregate;
use crate::stream::ops::grouped::AggregateCalls;
use crate::stream::ops::session_agg::SessionAggregate;
use crate::stream::ops::stateless::{Filter, Project, Union};
use crate::stream::ops::topn::{SortKey, TopN};
use crate::stream::ops::window_agg::{OutputColumn, WindowAggregate};
use crate::stream::ops::window_assign::{Assign, WindowAssign};
use crate::stream::state_backend::SledBackend;
use crate::stream::window::Slicing;

mod join;
mod updating;

/// A source's computed columns, how it generates time, and how EXPLAIN describes it.
type SourceTime = (Vec<Arc<dyn PhysicalExpr>>, TimeSource, String);

/// Window columns a stream carries.
#[derive(Debug, Clone, Copy)]
struct WindowColumns {
    start: usize,
    end: usize,
    time: Option<usize>,
    /// The columns hold slice bounds for the window aggregate above (see [`Assign`]).
    sliced: bool,
}

/// The output of a planned node.
#[derive(Clone)]
struct Stream {
    node: usize,
    schema: DFSchemaRef,
    parallelism: usize,
    windows: Option<WindowColumns>,
    /// For sliced window columns: the window kind the slices belong to.
    slicing: Option<Slicing>,
    changelog: ChangelogMode,
    /// The operator whose output rows change after they are emitted, for errors of
    /// consumers that cannot take updates.
    updated_by: Option<String>,
    /// Columns that identify a row of an updating stream (its upsert key), if known.
    upsert_key: Option<Vec<usize>>,
}

/// Reading bounded inputs to their end (a SELECT), or following them forever (a job).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Bounded,
    Continuous,
}

pub struct Planner<'a> {
    state: &'a SessionState,
    catalog: &'a Arc<Catalog>,
    parallelism: usize,
    mode: Mode,
    graph: StreamGraph,
    /// The next window table function scan is planned with slice bounds.
    slice_next: bool,
    late_rows: Option<Arc<LateRows>>,
    /// 'table.exec.emit.allow-lateness' of window aggregates.
    lateness: i64,
    /// 'table.exec.state.ttl' of unbounded operators; `None` keeps state forever.
    state_ttl: Option<std::time::Duration>,
    /// 'state.backend' = 'sled': where operators keep state beyond their memory budget.
    backend: Option<SledBackend>,
    /// Subplans planned so far (with `slice_next` before and after), so a part of the
    /// query that reads, aggregates or joins alike twice is computed once and shared
    /// (Flink's sub-plan reuse).
    planned: std::collections::HashMap<(LogicalPlan, bool), (Stream, bool)>,
    /// Sources planned so far, by what they read and how they make watermarks: scans of
    /// one table read it once (Flink's source reuse), each taking the columns it needs.
    sources: std::collections::HashMap<String, Stream>,
    /// Shared sources a scan reads every column of: no later scan narrows them.
    sources_read_whole: std::collections::HashSet<usize>,
}

fn refuse(message: impl Into<String>) -> DataFusionError {
    DataFusionError::External(Box::new(SqlError::not_supported(message)))
}

impl<'a> Planner<'a> {
    pub fn new(
        state: &'a SessionState,
        catalog: &'a Arc<Catalog>,
        parallelism: usize,
        mode: Mode,
    ) -> Self {
        Self {
            state,
            catalog,
            parallelism: parallelism.max(1),
            mode,
            graph: StreamGraph::default(),
            slice_next: false,
            late_rows: None,
            lateness: 0,
            state_ttl: None,
            backend: None,
            planned: std::collections::HashMap::new(),
            sources: std::collections::HashMap::new(),
            sources_read_whole: std::collections::HashSet::new(),
        }
    }

    /// Operators that support it keep state beyond `backend`'s memory budget on disk.
    pub fn with_state_backend(mut self, backend: Option<SledBackend>) -> Self {
        self.backend = backend;
        self
    }

    /// Unbounded operators forget a key's state this long after it was last touched.
    pub fn with_state_ttl(mut self, ttl: Option<std::time::Duration>) -> Self {
        self.state_ttl = ttl;
        self
    }

    /// The state TTL of an operator over `input`: a STATE_TTL hint on it, else the
    /// session's 'table.exec.state.ttl'.
    fn ttl_of(&self, input: &LogicalPlan) -> Option<std::time::Duration> {
        join::hinted_ttl(input)
            .map(|ms| std::time::Duration::from_millis(ms.max(0) as u64))
            .or(self.state_ttl)
    }

    /// Warns (NOTICE at CREATE, a line in EXPLAIN) about `operator` keeping state for
    /// every key it ever sees when no TTL bounds it.
    fn unbounded_state(&mut self, operator: &str) {
        if self.mode == Mode::Continuous && self.state_ttl.is_none() {
            self.graph.notices.push(format!(
                "{operator} keeps state for every key it ever sees and grows without bound; \
                 SET 'table.exec.state.ttl' = '1 h' (or a /*+ STATE_TTL(...) */ hint) to bound it"
            ));
        }
    }

    /// Window aggregates keep fired windows this long and correct them with retractions.
    pub fn with_lateness(mut self, lateness: i64) -> Self {
        self.lateness = lateness;
        self
    }

    /// Rows hashed by `keys` to every subtask, or all to one when there are no keys.
    fn keyed(&self, keys: Vec<Arc<dyn PhysicalExpr>>) -> (Exchange, usize) {
        if keys.is_empty() {
            (Exchange::Gather, 1)
        } else {
            (Exchange::Hash(keys), self.parallelism)
        }
    }

    fn set_changelog(&mut self, stream: &mut Stream, mode: ChangelogMode) {
        stream.changelog = mode;
        self.graph.nodes[stream.node].changelog = mode;
    }

    /// Marks `stream` as updating, produced by the operator EXPLAIN calls `by`.
    fn set_updating(&mut self, stream: &mut Stream, by: String) {
        self.set_changelog(stream, ChangelogMode::Retract);
        stream.updated_by = Some(by);
    }

    /// Records that `key` (column indices) identifies a row of `stream`'s updates.
    fn set_upsert_key(&mut self, stream: &mut Stream, key: Vec<usize>) {
        let names = key
            .iter()
            .map(|&i| stream.schema.field(i).name().clone())
            .collect::<Vec<_>>()
            .join(", ");
        self.graph.upsert_keys.insert(stream.node, names);
        stream.upsert_key = Some(key);
    }

    /// Window operators append the rows they drop as late to this table.
    pub fn with_late_rows(mut self, late_rows: Option<Arc<LateRows>>) -> Self {
        self.late_rows = late_rows;
        self
    }

    /// Plans `plan` (optimized here) into a graph ending in `sink`. For log and connector
    /// sinks only the table's physical columns are written.
    pub fn plan(mut self, plan: &LogicalPlan, sink: SinkKind) -> Result<StreamGraph> {
        let plan = self.state.optimize(plan)?;
        let stream = self.plan_node(&plan)?;
        // A blackhole takes anything, print prints changes as Flink does (-U[...]), and a
        // table of Weir's log with a primary key takes updates; other sinks write rows
        // as they come.
        let takes_updates = match &sink {
            SinkKind::Log(def) => !def.primary_key.is_empty(),
            SinkKind::Connector(def) => {
                matches!(
                    def.connector(),
                    Some("blackhole" | "print" | "upsert-kafka")
                )
            }
            _ => true,
        };
        if let (SinkKind::Log(def) | SinkKind::Connector(def), false) = (&sink, takes_updates) {
            self.insert_only(
                &stream,
                &format!("table \"{}\", which takes inserts only,", def.name),
            )?;
        }
        let schema = Arc::new(stream.schema.as_arrow().clone());
        // Views and tables gather into one subtask at any parallelism, so that a job's
        // graph has the same shape at every parallelism it can be rescaled to.
        let (exchange, parallelism) = match &sink {
            // An upsert sink gets each key's changes in order from one subtask.
            SinkKind::Connector(def) if def.connector() == Some("upsert-kafka") => {
                let keys = def
                    .primary_key
                    .iter()
                    .map(|k| {
                        let i = def
                            .columns
                            .iter()
                            .position(|c| &c.name == k)
                            .ok_or_else(|| {
                                DataFusionError::Plan(format!("no primary key column \"{k}\""))
                            })?;
                        Ok(
                            Arc::new(datafusion::physical_expr::expressions::Column::new(k, i))
                                as Arc<dyn datafusion::physical_expr::PhysicalExpr>,
                        )
                    })
                    .collect::<Result<Vec<_>>>()?;
                (Exchange::Hash(keys), stream.parallelism)
            }
            SinkKind::Connector(_) => (Exchange::Forward, stream.parallelism),
            SinkKind::Collect(_) if stream.parallelism == 1 => (Exchange::Forward, 1),
            _ => (Exchange::Gather, 1),
        };
        self.graph.add(StreamNode {
            name: "Sink".into(),
            detail: match &sink {
                SinkKind::Collect(_) => "query result".into(),
                SinkKind::View(_) => "materialized view".into(),
                SinkKind::Log(def) => format!("table {}", def.name),
                SinkKind::Connector(def) => format!(
                    "table {} ({})",
                    def.name,
                    def.connector().unwrap_or_default()
                ),
            },
            state: match &sink {
                SinkKind::View(_) => "the view's rows".into(),
                SinkKind::Log(_) => "rows of the current epoch".into(),
                _ => "none".into(),
            },
            parallelism,
            inputs: vec![Edge {
                from: stream.node,
                exchange,
            }],
            kind: NodeKind::Sink(sink),
            schema,
            changelog: ChangelogMode::InsertOnly,
        });
        Ok(self.graph)
    }

    fn physical(&self, expr: &Expr, schema: &DFSchema) -> Result<Arc<dyn PhysicalExpr>> {
        let physical = self.state.create_physical_expr(expr.clone(), schema)?;
        crate::plan::string_lookup::speed_up(crate::plan::string_in_list::speed_up(physical)?)
    }

    fn add(&mut self, node: StreamNode) -> usize {
        self.graph.add(node)
    }

    /// A single-input operator after `input`.
    fn operator(
        &mut self,
        input: &Stream,
        exchange: Exchange,
        parallelism: usize,
        (name, detail, state): (&str, String, &str),
        schema: DFSchemaRef,
        factory: crate::stream::graph::OperatorFactory,
    ) -> Stream {
        let node = self.add(StreamNode {
            name: name.into(),
            detail,
            state: state.into(),
            parallelism,
            inputs: vec![Edge {
                from: input.node,
                exchange,
            }],
            kind: NodeKind::Operator(factory),
            schema: Arc::new(schema.as_arrow().clone()),
            changelog: ChangelogMode::InsertOnly,
        });
        Stream {
            node,
            schema,
            parallelism,
            windows: None,
            slicing: None,
            changelog: ChangelogMode::InsertOnly,
            updated_by: None,
            upsert_key: None,
        }
    }

    /// Refuses to feed `consumer` from an input whose rows change after they are emitted.
    fn insert_only(&self, input: &Stream, consumer: &str) -> Result<()> {
        if input.changelog == ChangelogMode::InsertOnly {
            return Ok(());
        }
        let by = input.updated_by.as_deref().unwrap_or("an operator");
        Err(refuse(format!(
            "{consumer} cannot take rows that are later corrected (retractions), which {by} \
             produces; read the corrected rows from a materialized view or SUBSCRIBE instead"
        )))
    }

    /// A projection of `input` to `exprs`, keeping track of the window columns it passes on.
    fn project(&mut self, input: &Stream, exprs: &[Expr], schema: DFSchemaRef) -> Result<Stream> {
        let physical = exprs
            .iter()
            .map(|e| self.physical(e, &input.schema))
            .collect::<Result<Vec<_>>>()?;
        let passed: Vec<Option<usize>> = exprs
            .iter()
            .map(|e| passthrough(e, &input.schema))
            .collect();
        let detail = exprs
            .iter()
            .map(|e| e.to_string())
            .collect::<Vec<_>>()
            .join(", ");
        let arrow = Arc::new(schema.as_arrow().clone());
        let mut out = self.operator(
            input,
            Exchange::Forward,
            input.parallelism,
            ("Project", detail, "none"),
            schema,
            Arc::new(move |_| {
                Ok(Box::new(Project {
                    exprs: physical.clone(),
                    schema: arrow.clone(),
                }) as _)
            }),
        );
        out.windows = input.windows.and_then(|w| {
            let find = |i: usize| passed.iter().position(|p| *p == Some(i));
            Some(WindowColumns {
                start: find(w.start)?,
                end: find(w.end)?,
                time: w.time.and_then(find),
                sliced: w.sliced,
            })
        });
        out.slicing = input.slicing.clone();
        self.set_changelog(&mut out, input.changelog);
        out.updated_by = input.updated_by.clone();
        if let Some(key) = &input.upsert_key {
            let find = |i: &usize| passed.iter().position(|p| *p == Some(*i));
            if let Some(key) = key.iter().map(find).collect::<Option<Vec<_>>>() {
                self.set_upsert_key(&mut out, key);
            }
        }
        Ok(out)
    }

    fn filter(&mut self, input: &Stream, predicate: &Expr) -> Result<Stream> {
        let physical = self.physical(predicate, &input.schema)?;
        let mut out = self.operator(
            input,
            Exchange::Forward,
            input.parallelism,
            ("Filter", predicate.to_string(), "none"),
            input.schema.clone(),
            Arc::new(move |_| {
                Ok(Box::new(Filter {
                    predicate: physical.clone(),
                }) as _)
            }),
        );
        out.windows = input.windows;
        out.slicing = input.slicing.clone();
        self.set_changelog(&mut out, input.changelog);
        out.updated_by = input.updated_by.clone();
        if let Some(key) = input.upsert_key.clone() {
            self.set_upsert_key(&mut out, key);
        }
        Ok(out)
    }

    fn plan_node(&mut self, plan: &LogicalPlan) -> Result<Stream> {
        // Scans and stateful operators are worth sharing; a shared node's consumers each
        // take its rows over a channel, which costs more than a projection or filter.
        let shareable = matches!(
            plan,
            LogicalPlan::TableScan(_)
                | LogicalPlan::Aggregate(_)
                | LogicalPlan::Join(_)
                | LogicalPlan::Window(_)
        );
        if !shareable {
            return self.plan_new_node(plan);
        }
        let key = (plan.clone(), self.slice_next);
        if let Some((stream, slice_next)) = self.planned.get(&key) {
            self.slice_next = *slice_next;
            return Ok(stream.clone());
        }
        let stream = self.plan_new_node(plan)?;
        self.planned.insert(key, (stream.clone(), self.slice_next));
        Ok(stream)
    }

    fn plan_new_node(&mut self, plan: &LogicalPlan) -> Result<Stream> {
        match plan {
            LogicalPlan::TableScan(scan) => self.plan_scan(scan),
            LogicalPlan::Projection(p) => {
                if let Some(shared) = crate::plan::shared_subexpressions::share_with_filter(p)? {
                    return self.plan_node(&shared);
                }
                let input = self.plan_node(&p.input)?;
                self.project(&input, &p.expr, p.schema.clone())
            }
            LogicalPlan::Filter(f) => {
                if let Some(top) = self.top_n(f)? {
                    return Ok(top);
                }
                let input = self.plan_node(&f.input)?;
                self.filter(&input, &f.predicate)
            }
            LogicalPlan::SubqueryAlias(a) => {
                let mut input = self.plan_node(&a.input)?;
                input.schema = a.schema.clone();
                Ok(input)
            }
            LogicalPlan::Aggregate(agg) => self.plan_aggregate(plan, agg),
            LogicalPlan::Window(w) => {
                let input = self.plan_node(&w.input)?;
                self.plan_window(plan, w, input)
            }
            LogicalPlan::Join(join) => {
                let left = self.plan_node(&join.left)?;
                let right = self.plan_node(&join.right)?;
                let window_join = match (left.windows, right.windows) {
                    (Some(l), Some(r)) => {
                        let on: Vec<(Option<usize>, Option<usize>)> = join
                            .on
                            .iter()
                            .map(|(a, b)| {
                                (passthrough(a, &left.schema), passthrough(b, &right.schema))
                            })
                            .collect();
                        on.contains(&(Some(l.start), Some(r.start)))
                            && on.contains(&(Some(l.end), Some(r.end)))
                    }
                    _ => false,
                };
                if window_join {
                    self.insert_only(&left, "a window join")?;
                    self.insert_only(&right, "a window join")?;
                    self.windowed_fragment(plan, vec![left, right], "WindowJoin")
                } else if self.mode == Mode::Continuous
                    || left.changelog != ChangelogMode::InsertOnly
                    || right.changelog != ChangelogMode::InsertOnly
                {
                    // The end-of-input fragment is faster over bounded inserts; it takes
                    // no retractions.
                    self.plan_join(plan, join, left, right)
                } else {
                    self.end_fragment(
                        plan,
                        vec![left, right],
                        "joins other than window joins are not supported in continuous queries yet; \
                         join two window table functions ON l.window_start = r.window_start AND \
                         l.window_end = r.window_end",
                    )
                }
            }
            LogicalPlan::Union(u) => {
                let inputs = u
                    .inputs
                    .iter()
                    .map(|i| self.plan_node(i))
                    .collect::<Result<Vec<_>>>()?;
                if self.mode == Mode::Continuous {
                    return self.union(u, inputs);
                }
                self.end_fragment(plan, inputs, "")
            }
            LogicalPlan::Values(_) | LogicalPlan::EmptyRelation(_) => self.constant(plan),
            LogicalPlan::Sort(_) | LogicalPlan::Limit(_) | LogicalPlan::Distinct(_) => {
                let inputs = plan
                    .inputs()
                    .into_iter()
                    .map(|i| self.plan_node(i))
                    .collect::<Result<Vec<_>>>()?;
                self.end_fragment(
                    plan,
                    inputs,
                    "ORDER BY and LIMIT need the whole input; a continuous query has no end. \
                     Order or limit when reading the view (SELECT ... FROM v ORDER BY ...)",
                )
            }
            other => Err(refuse(format!(
                "{} cannot run as a streaming query",
                other.display()
            ))),
        }
    }

    /// OVER (...) in a query: ranks per window, or at the end of a bounded input.
    fn plan_window(
        &mut self,
        plan: &LogicalPlan,
        w: &datafusion::logical_expr::Window,
        input: Stream,
    ) -> Result<Stream> {
        if partitioned_by_window(w, &input) {
            self.insert_only(&input, "a window TopN")?;
            return self.windowed_fragment(plan, vec![input], "WindowRank");
        }
        self.end_fragment(
            plan,
            vec![input],
            "OVER (...) is supported in continuous queries as TopN: filter ROW_NUMBER() OVER \
             (PARTITION BY ... ORDER BY ...) AS rn with WHERE rn <= N, or rank per window \
             (PARTITION BY window_start, window_end, ...)",
        )
    }

    /// A subplan without stream sources, computed now.
    fn constant(&mut self, plan: &LogicalPlan) -> Result<Stream> {
        let mut state = self.state.clone();
        state.config_mut().options_mut().execution.target_partitions = 1;
        let physical_plan = plan.clone();
        let batches = crate::stream::block_on(async move {
            let physical = state.create_physical_plan(&physical_plan).await?;
            datafusion::physical_plan::collect(physical, state.task_ctx()).await
        })?;
        let schema = plan.schema().clone();
        let node = self.add(StreamNode {
            name: "Values".into(),
            detail: format!(
                "{} rows",
                batches.iter().map(|b| b.num_rows()).sum::<usize>()
            ),
            state: "none".into(),
            parallelism: 1,
            inputs: vec![],
            kind: NodeKind::Source(SourceSpec {
                kind: SourceKind::Batches(batches),
                computed: vec![],
                time: TimeSource::None,
            }),
            schema: Arc::new(schema.as_arrow().clone()),
            changelog: ChangelogMode::InsertOnly,
        });
        Ok(Stream {
            node,
            schema,
            parallelism: 1,
            windows: None,
            slicing: None,
            changelog: ChangelogMode::InsertOnly,
            updated_by: None,
            upsert_key: None,
        })
    }

    fn plan_scan(&mut self, scan: &TableScan) -> Result<Stream> {
        let provider = source_as_provider(&scan.source)?;
        let name = scan.table_name.table().to_string();
        let full = self.plan_provider(&name, provider.clone(), None)?;
        let any: &dyn std::any::Any = provider.as_ref();
        let window = any.downcast_ref::<WindowTvfTable>();
        // The source this scan reads: a window table function's is its assigner's input.
        let source = match window {
            Some(_) => self.graph.nodes[full.node].inputs[0].from,
            None => full.node,
        };
        match (&scan.projection, window) {
            // A window table function's columns are its input's, then the window's; its
            // input (the window assigner's) reads the time column too.
            (Some(projection), Some(window)) if scan.filters.is_empty() => {
                let columns = window.input.schema().fields().len();
                let time = window
                    .input
                    .schema()
                    .index_of(&window.spec.time_column)
                    .ok();
                let read: Vec<usize> = projection
                    .iter()
                    .copied()
                    .filter(|&i| i < columns)
                    .chain(time)
                    .collect();
                self.read_only(source, &read);
            }
            (Some(projection), None) if scan.filters.is_empty() => {
                self.read_only(source, projection)
            }
            // Filters, or no projection: every column.
            _ => self.read_whole(source),
        }
        let mut stream = full;
        let qualified = DFSchema::try_from_qualified_schema(
            scan.table_name.clone(),
            &Schema::new(stream.schema.as_arrow().fields().clone()),
        )?;
        stream.schema = Arc::new(qualified);
        if let Some(projection) = &scan.projection {
            let exprs: Vec<Expr> = projection
                .iter()
                .map(|&i| Expr::Column(Column::from(stream.schema.qualified_field(i))))
                .collect();
            stream = self.project(&stream, &exprs, scan.projected_schema.clone())?;
        } else {
            stream.schema = scan.projected_schema.clone();
        }
        for filter in &scan.filters {
            stream = self.filter(&stream, filter)?;
        }
        Ok(stream)
    }

    /// Tells a connector source which physical columns the plan reads: the projected ones
    /// and those its computed columns and watermark use (Flink's projection push-down,
    /// keeping the source's schema: a reader may leave the others NULL).
    ///
    /// A source shared by several scans reads the columns any of them reads.
    fn read_only(&mut self, node: usize, projection: &[usize]) {
        if self.sources_read_whole.contains(&node) {
            return;
        }
        let NodeKind::Source(spec) = &mut self.graph.nodes[node].kind else {
            return;
        };
        let SourceKind::Connector { def, .. } = &spec.kind else {
            return;
        };
        let mut read = vec![false; def.physical_schema().fields().len()];
        let watermark = match &spec.time {
            TimeSource::Watermark { expr, .. } => Some(expr),
            _ => None,
        };
        let used = spec
            .computed
            .iter()
            .chain(watermark)
            .flat_map(collect_columns)
            .map(|c| c.index())
            .chain(projection.iter().copied());
        for i in used {
            if let Some(r) = read.get_mut(i) {
                *r = true;
            }
        }
        if let SourceKind::Connector { read: r, .. } = &mut spec.kind {
            if let Some(before) = r.as_deref() {
                for (now, was) in read.iter_mut().zip(before) {
                    *now |= was;
                }
            }
            *r = Some(read.into());
        }
    }

    /// A scan of source `node` (if it is one) reads every column.
    fn read_whole(&mut self, node: usize) {
        let NodeKind::Source(spec) = &mut self.graph.nodes[node].kind else {
            return;
        };
        if let SourceKind::Connector { read, .. } = &mut spec.kind {
            *read = None;
        }
        self.sources_read_whole.insert(node);
    }

    /// A source reading `provider` (every column, unqualified). `time` names the column
    /// a window is defined on, which decides how watermarks are generated.
    fn plan_provider(
        &mut self,
        name: &str,
        provider: Arc<dyn TableProvider>,
        time: Option<&str>,
    ) -> Result<Stream> {
        let any: &dyn std::any::Any = provider.as_ref();
        if let Some(window) = any.downcast_ref::<WindowTvfTable>() {
            return self.plan_window_tvf(window);
        }
        if let Some(view) = any.downcast_ref::<ViewTable>() {
            let plan = self.state.optimize(view.logical_plan())?;
            let mut stream = self.plan_node(&plan)?;
            stream.schema = Arc::new(DFSchema::try_from(stream.schema.as_arrow().clone())?);
            return Ok(stream);
        }
        let (kind, def, parallelism): (SourceKind, Option<Arc<TableDef>>, usize) = if let Some(
            log,
        ) =
            any.downcast_ref::<LogTable>()
        {
            let def = log.def().clone();
            let until = match self.mode {
                Mode::Bounded => Some(
                    self.catalog
                        .table_log()
                        .next_offset(def.id)
                        .map_err(|e| DataFusionError::External(Box::new(e)))?,
                ),
                Mode::Continuous => None,
            };
            (
                SourceKind::Log {
                    def: def.clone(),
                    until,
                },
                Some(def),
                1,
            )
        } else if let Some(table) = any.downcast_ref::<ConnectorTable>() {
            let def = table.def().clone();
            if self.mode == Mode::Bounded && !crate::connector::factory::is_bounded(&def) {
                return Err(DataFusionError::External(Box::new(
                        SqlError::not_supported(format!(
                            "table \"{}\" is an unbounded '{}' source, so a SELECT over it would never end",
                            def.name,
                            def.connector().unwrap_or_default()
                        ))
                        .with_hint("CREATE MATERIALIZED VIEW v AS SELECT ... and query the view, or bound the source (e.g. 'number-of-rows')"),
                    )));
            }
            let parallelism = crate::connector::factory::max_splits(&def)
                .map_or(self.parallelism, |n| n.min(self.parallelism));
            (
                SourceKind::Connector {
                    def: def.clone(),
                    read: None,
                },
                Some(def),
                parallelism,
            )
        } else if let Some(view) = any.downcast_ref::<MvTable>() {
            (
                SourceKind::View {
                    state: view.state.clone(),
                    bounded: self.mode == Mode::Bounded,
                },
                None,
                1,
            )
        } else {
            return Err(refuse(format!(
                "\"{name}\" cannot be read by a streaming query"
            )));
        };
        let schema = Arc::new(DFSchema::try_from(provider.schema().as_ref().clone())?);
        let (computed, time_source, detail) = match &def {
            Some(def) => self.source_time(def, &schema, time)?,
            None => (vec![], TimeSource::Upstream, format!("view {name}")),
        };
        // The detail names the table and how its watermarks are made.
        if let Some(shared) = self.sources.get(&detail) {
            return Ok(shared.clone());
        }
        let node = self.add(StreamNode {
            name: "Source".into(),
            detail: detail.clone(),
            state: "read position".into(),
            parallelism,
            inputs: vec![],
            kind: NodeKind::Source(SourceSpec {
                kind,
                computed,
                time: time_source,
            }),
            schema: Arc::new(schema.as_arrow().clone()),
            changelog: ChangelogMode::InsertOnly,
        });
        let changelog = def.as_deref().map_or(ChangelogMode::InsertOnly, |d| {
            crate::connector::factory::source_changelog(d)
        });
        // A view of window results keeps its window columns for windows over windows.
        let windows = match (
            &def,
            schema.index_of_column_by_name(None, WINDOW_START),
            schema.index_of_column_by_name(None, WINDOW_END),
        ) {
            (None, Some(start), Some(end)) => Some(WindowColumns {
                start,
                end,
                time: schema.index_of_column_by_name(None, WINDOW_TIME),
                sliced: false,
            }),
            _ => None,
        };
        let mut stream = Stream {
            node,
            schema,
            parallelism,
            windows,
            slicing: None,
            changelog: ChangelogMode::InsertOnly,
            updated_by: None,
            upsert_key: None,
        };
        let view_updates = any
            .downcast_ref::<MvTable>()
            .is_some_and(|v| v.state.updating && self.mode == Mode::Continuous);
        if view_updates {
            self.set_updating(
                &mut stream,
                format!("view {name}, whose rows are corrected"),
            );
        }
        if changelog != ChangelogMode::InsertOnly {
            self.set_updating(&mut stream, format!("table {name}, a changelog source"));
            let key = def.as_ref().map_or(vec![], |d| {
                d.primary_key
                    .iter()
                    .filter_map(|k| stream.schema.index_of_column_by_name(None, k))
                    .collect()
            });
            if !key.is_empty() {
                self.set_upsert_key(&mut stream, key);
            }
        }
        self.sources.insert(detail, stream.clone());
        Ok(stream)
    }

    /// Computed columns and the watermark of a table's source.
    fn source_time(
        &self,
        def: &Arc<TableDef>,
        schema: &DFSchemaRef,
        time: Option<&str>,
    ) -> Result<SourceTime> {
        let physical = DFSchema::try_from(def.physical_schema().as_ref().clone())?;
        let computed = def
            .computed
            .iter()
            .map(|c| {
                let expr = crate::sql::expr::parse_sql_expr(&c.expr, &physical, self.state)?;
                self.physical(&expr, &physical)
            })
            .collect::<Result<Vec<_>>>()?;
        let proctime = |column: &str| {
            def.computed
                .iter()
                .any(|c| c.name == column && c.expr.to_ascii_lowercase().starts_with("proctime"))
        };
        let mut detail = format!("table {}", def.name);
        let time_source = match (time, &def.watermark) {
            (Some(column), _) if proctime(column) => {
                detail.push_str(&format!(", processing time {column}"));
                TimeSource::Processing
            }
            (Some(column), Some(w)) if w.column != column => {
                return Err(not_time_attribute(def, column))
            }
            (Some(column), None) => return Err(not_time_attribute(def, column)),
            (_, Some(w)) => {
                let expr = crate::sql::expr::parse_sql_expr(&w.expr, schema, self.state)?;
                let idle_timeout = def
                    .options
                    .get("scan.watermark.idle-timeout")
                    .and_then(|t| crate::connector::options::parse_duration(t));
                detail.push_str(&format!(", watermark {} = {}", w.column, w.expr));
                if let Some(t) = idle_timeout {
                    detail.push_str(&format!(", idle after {t:?}"));
                }
                TimeSource::Watermark {
                    expr: self.physical(&expr, schema)?,
                    idle_timeout,
                }
            }
            (None, None) => TimeSource::None,
        };
        Ok((computed, time_source, detail))
    }

    fn plan_window_tvf(&mut self, window: &WindowTvfTable) -> Result<Stream> {
        let spec = &window.spec;
        let sliced = std::mem::take(&mut self.slice_next);
        if matches!(spec.kind, WindowKind::Session { .. }) && !sliced {
            return Err(refuse(
                "SESSION windows can only be aggregated: SELECT window_start, window_end, k, \
                 count(*) FROM TABLE(SESSION(TABLE t PARTITION BY k, DESCRIPTOR(ts), gap)) \
                 GROUP BY window_start, window_end, k",
            ));
        }
        let input =
            self.plan_provider(&spec.table, window.input.clone(), Some(&spec.time_column))?;
        self.insert_only(&input, "a window table function")?;
        let time_column = input
            .schema
            .index_of_column_by_name(None, &spec.time_column)
            .ok_or_else(|| DataFusionError::Plan(format!("no column {}", spec.time_column)))?;
        let arrow = window.schema();
        let schema = Arc::new(DFSchema::try_from(arrow.as_ref().clone())?);
        let slicing = Slicing::new(&spec.kind);
        let assign = if sliced {
            Assign::Slices
        } else {
            Assign::Windows
        };
        let factory_slicing = slicing.clone();
        let n = arrow.fields().len();
        let mut out = self.operator(
            &input,
            Exchange::Forward,
            input.parallelism,
            (
                "WindowAssign",
                format!(
                    "{spec}{}",
                    if sliced {
                        " (rows carry their slice)"
                    } else {
                        ""
                    }
                ),
                "none",
            ),
            schema,
            Arc::new(move |_| {
                Ok(Box::new(WindowAssign {
                    slicing: factory_slicing.clone(),
                    time_column,
                    assign,
                    schema: arrow.clone(),
                }) as _)
            }),
        );
        out.windows = Some(WindowColumns {
            start: n - 3,
            end: n - 2,
            time: Some(n - 1),
            sliced,
        });
        out.slicing = sliced.then_some(slicing);
        Ok(out)
    }

    fn plan_aggregate(
        &mut self,
        plan: &LogicalPlan,
        agg: &datafusion::logical_expr::Aggregate,
    ) -> Result<Stream> {
        let grouping_sets = agg
            .group_expr
            .iter()
            .any(|e| matches!(e, Expr::GroupingSet(_)));
        self.slice_next = !grouping_sets && sliceable(&agg.input, &agg.group_expr);
        let input = self.plan_node(&agg.input)?;
        self.slice_next = false;
        let groups_windows = input.windows.filter(|cols| {
            let roles: Vec<Option<usize>> = agg
                .group_expr
                .iter()
                .map(|e| passthrough(e, &input.schema))
                .collect();
            grouping_sets || (roles.contains(&Some(cols.start)) && roles.contains(&Some(cols.end)))
        });
        let Some(cols) = groups_windows else {
            if self.mode == Mode::Continuous {
                return self.group_aggregate(agg, input);
            }
            return self.end_fragment(plan, vec![input], "");
        };
        self.insert_only(&input, "a window aggregate")?;
        let group_exprs: Vec<&Expr> = match agg.group_expr.as_slice() {
            [Expr::GroupingSet(
                GroupingSet::GroupingSets(_) | GroupingSet::Cube(_) | GroupingSet::Rollup(_),
            )] => {
                if cols.sliced {
                    return Err(DataFusionError::Internal(
                        "grouping sets over slices".into(),
                    ));
                }
                return self.windowed_fragment(plan, vec![input], "WindowAggregate");
            }
            exprs => exprs.iter().collect(),
        };
        let roles: Vec<Option<usize>> = group_exprs
            .iter()
            .map(|e| passthrough(e, &input.schema))
            .collect();
        let mut output = Vec::new();
        let mut keys = Vec::new();
        let mut key_fields = Vec::new();
        for (i, (expr, role)) in group_exprs.iter().zip(&roles).enumerate() {
            output.push(match *role {
                Some(c) if c == cols.start => OutputColumn::WindowStart,
                Some(c) if c == cols.end => OutputColumn::WindowEnd,
                Some(c) if Some(c) == cols.time => OutputColumn::WindowTime,
                _ => {
                    keys.push(self.physical(expr, &input.schema)?);
                    key_fields.push(agg.schema.field(i).as_ref().clone());
                    OutputColumn::Key(keys.len() - 1)
                }
            });
        }
        for i in 0..agg.aggr_expr.len() {
            output.push(OutputColumn::Aggregate(i));
        }
        let calls = Arc::new(self.aggregate_calls(agg, &input, keys.clone(), key_fields)?);
        if let Some(Slicing::Session { gap, partition_by }) = &input.slicing {
            let mut keys_named: Vec<String> = group_exprs
                .iter()
                .zip(&output)
                .filter(|(_, o)| matches!(o, OutputColumn::Key(_)))
                .map(|(e, _)| match strip_alias(e) {
                    Expr::Column(c) => c.name.clone(),
                    other => other.to_string(),
                })
                .collect();
            keys_named.sort();
            let mut partition = partition_by.clone();
            partition.sort();
            if keys_named != partition {
                return Err(DataFusionError::External(Box::new(SqlError::new(
                    sqlstate::GROUPING_ERROR,
                    format!(
                        "a SESSION window aggregate must GROUP BY window_start, window_end and exactly \
                         its PARTITION BY columns ({}); it groups by {}",
                        if partition.is_empty() { "none".to_string() } else { partition.join(", ") },
                        if keys_named.is_empty() { "no other column".to_string() } else { keys_named.join(", ") }
                    ),
                ))));
            }
            let gap = *gap;
            let (exchange, parallelism) = self.keyed(keys.clone());
            let schema = agg.schema.clone();
            let arrow: SchemaRef = Arc::new(schema.as_arrow().clone());
            let factory_output = output.clone();
            let time_column = cols.start;
            let late_rows = self.late_rows.clone();
            self.graph.late_rows = self.graph.late_rows.take().or(late_rows.clone());
            let lateness = self.lateness;
            let detail = format!("gap {gap} ms, {}", describe_aggregate(agg));
            let spills = SessionAggregate::try_new(
                calls.clone(),
                gap,
                time_column,
                factory_output.clone(),
                arrow.clone(),
            )?
            .can_spill()?;
            let backend = self.backend.clone().filter(|_| spills);
            let mut state = "open sessions per key with their partial aggregates".to_string();
            if let Some(b) = &backend {
                state.push_str(&format!(" (the sessions {})", b.describe()));
            }
            let out = self.operator(
                &input,
                exchange,
                parallelism,
                ("SessionAggregate", detail, &state),
                schema,
                Arc::new(move |_| {
                    let mut op = SessionAggregate::try_new(
                        calls.clone(),
                        gap,
                        time_column,
                        factory_output.clone(),
                        arrow.clone(),
                    )?;
                    op.late_rows = late_rows.clone().map(LateRecorder::new);
                    op.lateness = lateness;
                    Ok(Box::new(op.with_backend(backend.as_ref())?) as _)
                }),
            );
            return Ok(self.window_result(out, lateness, &output));
        }
        let slicing = if cols.sliced {
            input
                .slicing
                .clone()
                .ok_or_else(|| DataFusionError::Internal("sliced input without slicing".into()))?
        } else {
            Slicing::Given
        };
        let (exchange, parallelism) = self.keyed(keys);
        let schema = agg.schema.clone();
        let arrow: SchemaRef = Arc::new(schema.as_arrow().clone());
        let detail = format!(
            "{}{}",
            if cols.sliced { "by slices, " } else { "" },
            describe_aggregate(agg)
        );
        let factory_output = output.clone();
        let late_rows = self.late_rows.clone();
        self.graph.late_rows = self.graph.late_rows.take().or(late_rows.clone());
        let lateness = self.lateness;
        let backend = self.backend.clone();
        let mut state = match lateness {
            0 => "partial aggregates per slice and key, until the last window of the slice fires",
            _ => {
                "partial aggregates per slice and key, and each fired window's rows, until the \
                  allowed lateness after the window (the slice's last) fires"
            }
        }
        .to_string();
        if let Some(b) = &backend {
            state.push_str(&format!(
                " ({} {}, {})",
                if lateness > 0 {
                    "frozen ones and fired rows"
                } else {
                    "frozen ones"
                },
                b.describe(),
                b.describe_merges(crate::stream::ops::window_agg::MERGED_IN_PARTS)
            ));
        }
        let out = self.operator(
            &input,
            exchange,
            parallelism,
            ("WindowAggregate", detail, &state),
            schema,
            Arc::new(move |_| {
                let mut op = WindowAggregate::new(
                    calls.clone(),
                    slicing.clone(),
                    (cols.start, cols.end),
                    factory_output.clone(),
                    arrow.clone(),
                );
                op.late_rows = late_rows.clone().map(LateRecorder::new);
                op.lateness = lateness;
                Ok(Box::new(op.with_backend(backend.as_ref())?) as _)
            }),
        );
        Ok(self.window_result(out, lateness, &output))
    }

    /// The aggregate calls of `agg` over `input`, grouped by `keys`. GroupValues needs a
    /// key: a global aggregate groups by one constant.
    fn aggregate_calls(
        &self,
        agg: &datafusion::logical_expr::Aggregate,
        input: &Stream,
        keys: Vec<Arc<dyn PhysicalExpr>>,
        key_fields: Vec<datafusion::arrow::datatypes::Field>,
    ) -> Result<AggregateCalls> {
        let input_arrow = input.schema.as_arrow();
        let mut aggregates = Vec::new();
        let mut filters = Vec::new();
        for e in &agg.aggr_expr {
            #[allow(deprecated)]
            let (aggregate, filter, _order) = create_aggregate_expr_and_maybe_filter(
                e,
                &input.schema,
                input_arrow,
                self.state.execution_props(),
            )?;
            aggregates.push(aggregate);
            filters.push(filter);
        }
        let (keys, key_fields) = if keys.is_empty() {
            let unit: Arc<dyn PhysicalExpr> = Arc::new(
                datafusion::physical_expr::expressions::Literal::new(true.into()),
            );
            let field = datafusion::arrow::datatypes::Field::new(
                "unit",
                datafusion::arrow::datatypes::DataType::Boolean,
                false,
            );
            (vec![unit], vec![field])
        } else {
            (keys, key_fields)
        };
        Ok(AggregateCalls {
            keys,
            key_schema: Arc::new(Schema::new(key_fields)),
            aggregates,
            filters,
        })
    }

    /// A window aggregate's output: corrected by retractions under allow-lateness, and
    /// carrying window columns when it keeps window_start and window_end.
    fn window_result(&mut self, mut out: Stream, lateness: i64, output: &[OutputColumn]) -> Stream {
        if lateness > 0 {
            let by = format!(
                "{}, because 'table.exec.emit.allow-lateness' is set",
                self.graph.nodes[out.node].name
            );
            self.set_updating(&mut out, by);
        }
        out.windows = output_windows(output);
        out
    }

    /// `plan` run by DataFusion per window, on rows hashed by their window.
    fn windowed_fragment(
        &mut self,
        plan: &LogicalPlan,
        inputs: Vec<Stream>,
        name: &str,
    ) -> Result<Stream> {
        let windows: Vec<(usize, usize)> = inputs
            .iter()
            .map(|i| i.windows.map(|w| (w.start, w.end)))
            .collect::<Option<_>>()
            .ok_or_else(|| DataFusionError::Internal("windowed fragment without windows".into()))?;
        let mut edges = Vec::new();
        for (input, (start, end)) in inputs.iter().zip(&windows) {
            let keys: Vec<Arc<dyn PhysicalExpr>> = vec![
                Arc::new(datafusion::physical_expr::expressions::Column::new(
                    input.schema.field(*start).name(),
                    *start,
                )),
                Arc::new(datafusion::physical_expr::expressions::Column::new(
                    input.schema.field(*end).name(),
                    *end,
                )),
            ];
            edges.push(Edge {
                from: input.node,
                exchange: Exchange::Hash(keys),
            });
        }
        let out = self.fragment(
            plan,
            edges,
            self.parallelism,
            Some(windows),
            name,
            "rows of each open window",
        )?;
        let schema = plan.schema();
        let mut out = out;
        out.windows = match (
            schema.index_of_column_by_name(None, WINDOW_START),
            schema.index_of_column_by_name(None, WINDOW_END),
        ) {
            (Some(start), Some(end)) => Some(WindowColumns {
                start,
                end,
                time: schema.index_of_column_by_name(None, WINDOW_TIME),
                sliced: false,
            }),
            _ => None,
        };
        Ok(out)
    }

    /// `plan` run once at the end of bounded inputs; refused in continuous queries.
    fn end_fragment(
        &mut self,
        plan: &LogicalPlan,
        inputs: Vec<Stream>,
        refusal: &str,
    ) -> Result<Stream> {
        if self.mode == Mode::Continuous {
            return Err(refuse(refusal));
        }
        let edges = inputs
            .iter()
            .map(|i| Edge {
                from: i.node,
                exchange: if i.parallelism == 1 {
                    Exchange::Forward
                } else {
                    Exchange::Gather
                },
            })
            .collect();
        let name = match plan {
            LogicalPlan::Aggregate(_) => "Aggregate",
            LogicalPlan::Sort(_) => "Sort",
            LogicalPlan::Limit(_) => "Limit",
            LogicalPlan::Join(_) => "Join",
            LogicalPlan::Window(_) => "Over",
            _ => "Batch",
        };
        self.fragment(
            plan,
            edges,
            1,
            None,
            &format!("{name} (at end of input)"),
            "every input row",
        )
    }

    fn fragment(
        &mut self,
        plan: &LogicalPlan,
        inputs: Vec<Edge>,
        parallelism: usize,
        windows: Option<Vec<(usize, usize)>>,
        name: &str,
        state: &str,
    ) -> Result<Stream> {
        let schema = plan.schema().clone();
        let arrow: SchemaRef = Arc::new(schema.as_arrow().clone());
        let node_plan = plan.clone();
        let session = self.state.clone();
        let factory_arrow = arrow.clone();
        let late_rows = self.late_rows.clone();
        self.graph.late_rows = self.graph.late_rows.take().or(late_rows.clone());
        // Only windows can be corrected; an end-of-input fragment runs once.
        let lateness = if windows.is_some() { self.lateness } else { 0 };
        let changelog = if lateness > 0 {
            ChangelogMode::Retract
        } else {
            ChangelogMode::InsertOnly
        };
        let detail = format!("{}", plan.display());
        // Windows' buffered rows may go to disk; an end-of-input fragment's stay.
        let backend = if windows.is_some() {
            self.backend.clone()
        } else {
            None
        };
        let mut state = state.to_string();
        if lateness > 0 {
            state.push_str(
                ", and of each fired window with the rows it emitted, for the allowed lateness",
            );
        }
        if let Some(b) = &backend {
            state.push_str(&format!(" ({})", b.describe()));
        }
        let node = self.add(StreamNode {
            name: name.into(),
            detail,
            state,
            parallelism,
            inputs,
            kind: NodeKind::Operator(Arc::new(move |_| {
                let mut op = Fragment::new(
                    session.clone(),
                    node_plan.clone(),
                    windows.clone(),
                    factory_arrow.clone(),
                );
                op.late_rows = late_rows.clone().map(LateRecorder::new);
                op.lateness = lateness;
                Ok(Box::new(op.with_backend(backend.as_ref())?) as _)
            })),
            schema: arrow,
            changelog,
        });
        Ok(Stream {
            node,
            schema,
            parallelism,
            windows: None,
            slicing: None,
            changelog,
            updated_by: (changelog == ChangelogMode::Retract)
                .then(|| format!("{name}, because 'table.exec.emit.allow-lateness' is set")),
            upsert_key: None,
        })
    }
}

fn not_time_attribute(def: &TableDef, column: &str) -> DataFusionError {
    DataFusionError::External(Box::new(
        SqlError::new(
            sqlstate::DATATYPE_MISMATCH,
            format!(
                "column \"{column}\" of \"{}\" is not a time attribute, so it cannot define windows",
                def.name
            ),
        )
        .with_hint(format!(
            "declare WATERMARK FOR {column} AS {column} - INTERVAL '5' SECOND in the table, or window by a PROCTIME() column"
        )),
    ))
}

/// The window columns of an aggregate's output, if it keeps window_start and window_end.
fn output_windows(output: &[OutputColumn]) -> Option<WindowColumns> {
    let find = |role: OutputColumn| output.iter().position(|o| *o == role);
    Some(WindowColumns {
        start: find(OutputColumn::WindowStart)?,
        end: find(OutputColumn::WindowEnd)?,
        time: find(OutputColumn::WindowTime),
        sliced: false,
    })
}

/// Whether every window function of `w` is partitioned by the input's window bounds.
fn partitioned_by_window(w: &datafusion::logical_expr::Window, input: &Stream) -> bool {
    input.windows.is_some_and(|cols| {
        w.window_expr.iter().all(|e| {
            let Expr::WindowFunction(f) = strip_alias(e) else {
                return false;
            };
            let parts: Vec<Option<usize>> = f
                .params
                .partition_by
                .iter()
                .map(|p| passthrough(p, &input.schema))
                .collect();
            parts.contains(&Some(cols.start)) && parts.contains(&Some(cols.end))
        })
    })
}

fn list(exprs: &[Expr]) -> String {
    exprs
        .iter()
        .map(|e| e.to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

/// "group by ...; aggregates" for EXPLAIN.
fn describe_aggregate(agg: &datafusion::logical_expr::Aggregate) -> String {
    let list = |exprs: &[Expr]| {
        exprs
            .iter()
            .map(|e| e.to_string())
            .collect::<Vec<_>>()
            .join(", ")
    };
    format!(
        "group by {}; {}",
        list(&agg.group_expr),
        list(&agg.aggr_expr)
    )
}

fn strip_alias(e: &Expr) -> &Expr {
    match e {
        Expr::Alias(a) => strip_alias(&a.expr),
        e => e,
    }
}

/// The input column `e` passes through unchanged, if it is one.
fn passthrough(e: &Expr, schema: &DFSchema) -> Option<usize> {
    match strip_alias(e) {
        Expr::Column(c) => schema.index_of_column(c).ok(),
        _ => None,
    }
}

/// Whether the aggregate's input reaches a TUMBLE/HOP/CUMULATE table function through
/// nodes that leave window_start/window_end untouched and never look at them: then rows
/// can carry slice bounds instead of being copied into every window.
fn sliceable(input: &LogicalPlan, group_expr: &[Expr]) -> bool {
    let names = [WINDOW_START, WINDOW_END];
    let groups_both = names.iter().all(|n| {
        group_expr
            .iter()
            .any(|e| matches!(strip_alias(e), Expr::Column(c) if c.name == *n))
    });
    if !groups_both {
        return false;
    }
    let mentions_window = |e: &Expr| {
        e.column_refs()
            .iter()
            .any(|c| [WINDOW_START, WINDOW_END, WINDOW_TIME].contains(&c.name.as_str()))
    };
    let mut node = input;
    loop {
        match node {
            LogicalPlan::Projection(p) => {
                if p.expr
                    .iter()
                    .any(|e| mentions_window(e) && !matches!(strip_alias(e), Expr::Column(_)))
                {
                    return false;
                }
                node = &p.input;
            }
            LogicalPlan::Filter(f) => {
                if mentions_window(&f.predicate) {
                    return false;
                }
                node = &f.input;
            }
            LogicalPlan::SubqueryAlias(a) => node = &a.input,
            LogicalPlan::TableScan(scan) => {
                let Ok(provider) = source_as_provider(&scan.source) else {
                    return false;
                };
                let any: &dyn std::any::Any = provider.as_ref();
                return any.downcast_ref::<WindowTvfTable>().is_some()
                    && scan.filters.iter().all(|f| !mentions_window(f));
            }
            _ => return false,
        }
    }
}
