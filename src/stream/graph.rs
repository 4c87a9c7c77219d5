//! A continuous query as the runtime runs it: nodes with a parallelism, connected by
//! exchanges. The planner builds it; EXPLAIN prints it.

use std::sync::Arc;

use datafusion::arrow::datatypes::SchemaRef;
use datafusion::common::Result;
use datafusion::physical_expr::PhysicalExpr;
use weir_catalog::TableDef;

use super::mv::MvState;
use super::operator::Operator;

/// Key groups rows are hashed into; fixed, so keyed state can move between subtasks when
/// a job is rescaled (Flink's max parallelism).
pub const KEY_GROUPS: usize = 128;

/// How rows travel from a node's subtasks to its consumer's subtasks.
#[derive(Clone)]
pub enum Exchange {
    /// Subtask i to subtask i (same parallelism): chained into one task.
    Forward,
    /// By the hash of these key expressions, through key groups.
    Hash(Vec<Arc<dyn PhysicalExpr>>),
    /// Every row to the single consumer subtask.
    Gather,
}

impl Exchange {
    pub fn describe(&self) -> String {
        match self {
            Exchange::Forward => "forward".into(),
            Exchange::Hash(keys) => format!(
                "hash({})",
                keys.iter()
                    .map(|k| k.to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            Exchange::Gather => "gather".into(),
        }
    }
}

#[derive(Clone)]
pub struct Edge {
    pub from: usize,
    pub exchange: Exchange,
}

/// The changelog a node produces (updating modes come with updating queries).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChangelogMode {
    InsertOnly,
    /// Rows are inserted and later retracted (-U) and re-emitted (+U).
    Retract,
}

impl std::fmt::Display for ChangelogMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ChangelogMode::InsertOnly => write!(f, "insert-only"),
            ChangelogMode::Retract => write!(f, "retract"),
        }
    }
}

pub type OperatorFactory = Arc<dyn Fn(usize) -> Result<Box<dyn Operator>> + Send + Sync>;

/// Where a source node's rows come from.
#[derive(Clone)]
pub enum SourceKind {
    /// A table in Weir's log. `until` bounds the read (a snapshot for a plain SELECT).
    Log {
        def: Arc<TableDef>,
        until: Option<u64>,
    },
    /// A table read through a connector. `read`: which physical columns the plan uses
    /// (`None`: all of them); a reader may leave the others NULL instead of producing them.
    Connector {
        def: Arc<TableDef>,
        read: Option<Arc<[bool]>>,
    },
    /// A materialized view's rows, as they are published.
    View { state: Arc<MvState>, bounded: bool },
    /// Constant rows (VALUES, or a snapshot taken at planning time).
    Batches(Vec<datafusion::arrow::record_batch::RecordBatch>),
}

/// Event time as a source generates it.
#[derive(Clone)]
pub enum TimeSource {
    /// No time attribute: no watermarks (windows fire at the end of the input only).
    None,
    /// `WATERMARK FOR col AS expr`: the watermark is the running maximum of `expr`.
    Watermark {
        expr: Arc<dyn PhysicalExpr>,
        idle_timeout: Option<std::time::Duration>,
    },
    /// Carried over from an upstream view's published watermark.
    Upstream,
    /// PROCTIME(): the watermark is the wall clock.
    Processing,
}

#[derive(Clone)]
pub struct SourceSpec {
    pub kind: SourceKind,
    /// Computed columns, evaluated on the physical columns and appended to them.
    pub computed: Vec<Arc<dyn PhysicalExpr>>,
    pub time: TimeSource,
}

/// Where a sink node's rows go.
#[derive(Clone)]
pub enum SinkKind {
    /// Rows back to the statement that asked (a SELECT over bounded inputs).
    Collect(tokio::sync::mpsc::Sender<Result<super::message::ChangeBatch>>),
    /// A materialized view.
    View(Arc<MvState>),
    /// A table in Weir's log.
    Log(Arc<TableDef>),
    /// A table written through a connector.
    Connector(Arc<TableDef>),
}

#[derive(Clone)]
pub enum NodeKind {
    Source(SourceSpec),
    Operator(OperatorFactory),
    Sink(SinkKind),
}

#[derive(Clone)]
pub struct StreamNode {
    /// What EXPLAIN calls it ("WindowAggregate").
    pub name: String,
    /// What it does, for EXPLAIN (keys, window, expressions).
    pub detail: String,
    /// The state it keeps, for EXPLAIN ("none" for stateless operators).
    pub state: String,
    pub parallelism: usize,
    pub inputs: Vec<Edge>,
    pub kind: NodeKind,
    pub schema: SchemaRef,
    pub changelog: ChangelogMode,
}

impl StreamNode {
    /// Whether the node keeps no state (EXPLAIN's `state=none`).
    pub fn is_stateless(&self) -> bool {
        self.state == "none"
    }
}

/// Nodes in topological order: a node's inputs come before it; the last node is the sink.
#[derive(Clone, Default)]
pub struct StreamGraph {
    pub nodes: Vec<StreamNode>,
    /// Warnings for the user about the plan (state that grows without bound), sent as
    /// NOTICEs when the query is created and printed by EXPLAIN.
    pub notices: Vec<String>,
    /// Per node: the columns identifying a row of its updates (upsert key), for EXPLAIN.
    pub upsert_keys: std::collections::BTreeMap<usize, String>,
    /// 'execution.checkpointing.unaligned': barriers overtake the messages of channels
    /// whose barrier has not come, which go into the checkpoint instead of being waited for.
    pub unaligned_checkpoints: bool,
    /// The late-data table its window operators keep the rows they drop in, appended to
    /// as epochs commit.
    pub late_rows: Option<Arc<crate::stream::late::LateRows>>,
}

impl StreamGraph {
    pub fn add(&mut self, node: StreamNode) -> usize {
        self.nodes.push(node);
        self.nodes.len() - 1
    }

    /// The nodes that read `id`'s output, each with the position of the input: one,
    /// unless the planner shares a subplan two parts of the query compute alike.
    pub fn consumers_of(&self, id: usize) -> Vec<(usize, usize)> {
        let mut consumers = Vec::new();
        for (n, node) in self.nodes.iter().enumerate() {
            for (input, edge) in node.inputs.iter().enumerate() {
                if edge.from == id {
                    consumers.push((n, input));
                }
            }
        }
        consumers
    }

    /// Chains of nodes run in one task: a node joins its input's chain when the edge
    /// between them is a forward edge and the node is that input's only consumer (a
    /// shared node ends its chain and sends its rows to each consumer's task). Tasks start
    /// chain by chain, subtask by subtask.
    pub fn chains(&self) -> Vec<Vec<usize>> {
        let mut consumers = vec![0usize; self.nodes.len()];
        for node in &self.nodes {
            for edge in &node.inputs {
                consumers[edge.from] += 1;
            }
        }
        let mut chain_of = vec![usize::MAX; self.nodes.len()];
        let mut chains: Vec<Vec<usize>> = Vec::new();
        for (id, node) in self.nodes.iter().enumerate() {
            let joins = match node.inputs.as_slice() {
                [edge]
                    if matches!(edge.exchange, Exchange::Forward) && consumers[edge.from] == 1 =>
                {
                    Some(chain_of[edge.from])
                }
                _ => None,
            };
            match joins {
                Some(c) => {
                    chains[c].push(id);
                    chain_of[id] = c;
                }
                None => {
                    chain_of[id] = chains.len();
                    chains.push(vec![id]);
                }
            }
        }
        chains
    }

    /// The input edge of each channel of a subtask of node `head`, with `parallelism`
    /// giving each node's: one channel per upstream subtask of a keyed or gathering edge,
    /// one for a forward edge.
    pub fn channel_inputs(&self, head: usize, parallelism: impl Fn(usize) -> usize) -> Vec<usize> {
        let mut channels = Vec::new();
        for (input, edge) in self.nodes[head].inputs.iter().enumerate() {
            let count = if matches!(edge.exchange, Exchange::Forward) {
                1
            } else {
                parallelism(edge.from)
            };
            channels.extend(std::iter::repeat_n(input, count));
        }
        channels
    }
}

#[cfg(test)]
mod tests {
    use datafusion::arrow::datatypes::Schema;
    use datafusion::common::DataFusionError;

    use super::*;

    fn node(inputs: &[(usize, Exchange)]) -> StreamNode {
        StreamNode {
            name: "Op".into(),
            detail: String::new(),
            state: "none".into(),
            parallelism: 1,
            inputs: inputs
                .iter()
                .map(|(from, exchange)| Edge {
                    from: *from,
                    exchange: exchange.clone(),
                })
                .collect(),
            kind: NodeKind::Operator(Arc::new(|_| {
                Err(DataFusionError::Internal("not run".into()))
            })),
            schema: Arc::new(Schema::empty()),
            changelog: ChangelogMode::InsertOnly,
        }
    }

    #[test]
    fn a_shared_node_ends_its_chain_and_each_consumer_starts_one() {
        let forward = || Exchange::Forward;
        let mut graph = StreamGraph::default();
        graph.add(node(&[]));
        graph.add(node(&[(0, forward())]));
        // Node 1 is read by nodes 2 and 3, both over forward edges.
        graph.add(node(&[(1, forward())]));
        graph.add(node(&[(1, forward())]));
        graph.add(node(&[(2, Exchange::Gather), (3, Exchange::Gather)]));
        graph.add(node(&[(4, forward())]));
        assert_eq!(graph.consumers_of(1), vec![(2, 0), (3, 0)]);
        assert_eq!(graph.consumers_of(4), vec![(5, 0)]);
        assert!(graph.consumers_of(5).is_empty());
        assert_eq!(
            graph.chains(),
            vec![vec![0, 1], vec![2], vec![3], vec![4, 5]]
        );
        // One channel per input edge of node 4 (each upstream has one subtask).
        assert_eq!(graph.channel_inputs(4, |_| 1), vec![0, 1]);
    }
}
