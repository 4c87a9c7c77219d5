//! Restoring a checkpoint into a job of another parallelism (Flink's rescaling).
//!
//! Keyed state moves by key group: rows are hashed into the fixed [`KEY_GROUPS`], each
//! subtask owns a contiguous range of them, and a new subtask restores, from every old
//! subtask, the state rows whose keys fall in its range. A connector source moves to
//! the new parallelism when nothing it forwards to before its first keyed exchange keeps
//! state (a sink may be among them): every new split restores one position merged from
//! all the old ones (Kafka's partitions each from its furthest place; the generators'
//! numbers and a path's files skipping those read, `connector::share`). Other sources
//! (the table log, views, changelogs) keep the parallelism they were checkpointed at,
//! and so does every node they forward to; the first keyed exchange after them spreads
//! rows over the new parallelism.

use std::collections::HashMap;

use datafusion::arrow::array::{ArrayRef, UInt32Array};
use datafusion::arrow::compute::take_record_batch;
use datafusion::arrow::record_batch::RecordBatch;
use datafusion::common::{DataFusionError, Result};

use super::{Precommit, SourcePosition, StatePart, TaskSnapshot};
use crate::stream::exchange::{key_group_of, subtask_of_key_group, Tagged};
use crate::stream::graph::{Exchange, NodeKind, SinkKind, SourceKind, SourceSpec, StreamGraph};
use crate::stream::message::{Message, Millis, NO_WATERMARK};
use crate::stream::operator::Operator;
use crate::stream::snapshot;

/// Each node's parallelism, as a checkpoint records it.
pub fn parallelism(graph: &StreamGraph) -> Vec<usize> {
    graph.nodes.iter().map(|n| n.parallelism).collect()
}

/// Gives the sources, and every node they forward to, the parallelism `old` gives them,
/// unless such a group of nodes can move (see [`moves_to_new_parallelism`]).
pub fn keep_source_parallelism(graph: &mut StreamGraph, old: &[usize]) {
    if old.len() != graph.nodes.len() {
        return;
    }
    // Nodes reached from a source through forward edges, grouped by the edges that
    // join them (a union's inputs share its parallelism).
    let n = graph.nodes.len();
    let mut group: Vec<usize> = (0..n).collect();
    fn root(group: &mut [usize], mut id: usize) -> usize {
        while group[id] != id {
            group[id] = group[group[id]];
            id = group[id];
        }
        id
    }
    let mut fed = vec![false; n];
    for id in 0..n {
        let node = &graph.nodes[id];
        fed[id] = matches!(node.kind, NodeKind::Source(_));
        for e in &node.inputs {
            if matches!(e.exchange, Exchange::Forward) && fed[e.from] {
                fed[id] = true;
                let (a, b) = (root(&mut group, id), root(&mut group, e.from));
                group[a] = b;
            }
        }
    }
    let mut movable: HashMap<usize, bool> = HashMap::new();
    for id in (0..n).filter(|&id| fed[id]) {
        let r = root(&mut group, id);
        let ok = moves_to_new_parallelism(&graph.nodes[id]);
        movable.entry(r).and_modify(|m| *m &= ok).or_insert(ok);
    }
    for id in (0..n).filter(|&id| fed[id]) {
        if !movable[&root(&mut group, id)] {
            graph.nodes[id].parallelism = old[id];
        }
    }
}

/// Whether `node`, fed by sources through forward edges, can be restored at another
/// parallelism: a source whose splits are dealt anew, an operator without state, or a
/// sink (what a checkpoint holds for a sink is committed before it is restored, and a
/// sink after a keyed exchange moves too).
fn moves_to_new_parallelism(node: &crate::stream::graph::StreamNode) -> bool {
    match &node.kind {
        NodeKind::Source(spec) => match &spec.kind {
            SourceKind::Connector { def, .. } => crate::connector::factory::resplits(def),
            _ => false,
        },
        NodeKind::Operator(_) => node.is_stateless(),
        NodeKind::Sink(kind) => !matches!(kind, SinkKind::Collect(_)),
    }
}

/// What every new subtask of a sink restores: a view's progress (the lowest watermark,
/// ended once every old subtask had), its changes already committed.
fn merged_sink(previous: &[TaskSnapshot]) -> Option<Precommit> {
    let old: Vec<Precommit> = previous.iter().filter_map(|t| t.sink.clone()).collect();
    if !old.iter().any(|p| matches!(p, Precommit::Changes { .. })) {
        return None;
    }
    let (_, watermark, ended) = super::coordinator::merged_changes(&old);
    Some(Precommit::Changes {
        changes: vec![],
        watermark,
        ended,
    })
}

/// One position for every new subtask of a source restored at another parallelism,
/// merged from the old subtasks' positions, with the lowest of their watermarks.
fn merged_source_position(
    node: &crate::stream::graph::StreamNode,
    previous: &[TaskSnapshot],
) -> Result<Option<SourcePosition>> {
    let NodeKind::Source(SourceSpec {
        kind: SourceKind::Connector { def, .. },
        ..
    }) = &node.kind
    else {
        return Err(DataFusionError::Internal(
            "a source chain changed parallelism".into(),
        ));
    };
    let old: Vec<&SourcePosition> = previous.iter().filter_map(|t| t.source.as_ref()).collect();
    if old.is_empty() {
        return Ok(None);
    }
    // Positions are merged in split order: the generators' and files' tell which units
    // a split read by its place among them.
    if old.len() != previous.len() {
        return Err(DataFusionError::Internal(format!(
            "{} of {} subtasks of source {} recorded no position",
            previous.len() - old.len(),
            previous.len(),
            def.name
        )));
    }
    let positions: Vec<&[u8]> = old.iter().map(|p| p.position.as_slice()).collect();
    let position = crate::connector::factory::merge_positions(def, &positions)
        .ok_or_else(|| {
            DataFusionError::Internal(format!(
                "source {} cannot be split anew but changed parallelism",
                def.name
            ))
        })?
        .map_err(|e| DataFusionError::External(Box::new(e)))?;
    Ok(Some(SourcePosition {
        position,
        watermark: old
            .iter()
            .map(|p| p.watermark)
            .min()
            .unwrap_or(NO_WATERMARK),
    }))
}

/// The snapshots of a checkpoint taken with `old` parallelism per node, rearranged for the
/// tasks of `graph` (in the order `job::launch` starts them).
pub fn redistribute(
    graph: &StreamGraph,
    old: &[usize],
    tasks: Vec<TaskSnapshot>,
) -> Result<Vec<TaskSnapshot>> {
    if old.len() != graph.nodes.len() {
        return Err(DataFusionError::Plan(
            "the checkpoint was taken from a plan with another number of operators".into(),
        ));
    }
    let chains = graph.chains();
    let mut old_tasks = tasks.into_iter();
    let mut out = Vec::new();
    for chain in &chains {
        let head = &graph.nodes[chain[0]];
        let (from, to) = (old[chain[0]], head.parallelism);
        let previous: Vec<TaskSnapshot> = old_tasks.by_ref().take(from).collect();
        if previous.len() != from {
            return Err(DataFusionError::Plan(
                "the checkpoint has fewer tasks than its plan".into(),
            ));
        }
        if from == to {
            out.extend(previous);
            continue;
        }
        let source = match head.kind {
            NodeKind::Source(_) => merged_source_position(head, &previous)?,
            _ => None,
        };
        let sink = merged_sink(&previous);
        // Ended tasks left their operators' state out: so do the new ones (they end again
        // at once, with nothing to emit).
        let ended = previous.iter().all(|t| t.operators.is_empty());
        // One instance of each operator of the chain tells the key of its state rows.
        let operators = chain
            .iter()
            .filter_map(|&n| match &graph.nodes[n].kind {
                NodeKind::Operator(factory) => Some(factory(0)),
                _ => None,
            })
            .collect::<Result<Vec<_>>>()?;
        let watermarks = input_watermarks(graph, old, chain[0], &previous);
        for subtask in 0..to {
            let mut snapshot = TaskSnapshot {
                inputs: channel_watermarks(graph, chain[0], &watermarks),
                in_flight: owned_in_flight(graph, old, chain[0], &previous, subtask)?,
                source: source.clone(),
                sink: sink.clone(),
                ..Default::default()
            };
            for (k, op) in operators.iter().enumerate().filter(|_| !ended) {
                let state: Vec<&[StatePart]> = previous
                    .iter()
                    .map(|t| t.operators.get(k).map_or(&[][..], Vec::as_slice))
                    .collect();
                snapshot
                    .operators
                    .push(owned_state(op.as_ref(), &state, subtask, to)?);
            }
            out.push(snapshot);
        }
    }
    Ok(out)
}

/// The state rows of one operator, from every old subtask, that subtask `subtask` of
/// `parallelism` owns. Progress (watermark, late rows) is merged: each old subtask's
/// newest (its state may be a whole snapshot and the changes after it, each with its
/// progress), then the lowest watermark, and the late-row count kept once, by subtask 0.
/// Stored chunks are cut when they are read.
fn owned_state(
    op: &dyn Operator,
    state: &[&[StatePart]],
    subtask: usize,
    parallelism: usize,
) -> Result<Vec<StatePart>> {
    let mut progress: Option<(Millis, u64)> = None;
    for old in state {
        let mut newest = None;
        for batch in old.iter().filter_map(StatePart::batch) {
            if snapshot::kind(batch)? == "progress" {
                let (_, head, _) = snapshot::parts(batch, 2)?;
                newest = Some(snapshot::read_progress(&head));
            }
        }
        if let Some((watermark, late)) = newest {
            progress = Some(match progress {
                None => (watermark, late),
                Some((w, l)) => (w.min(watermark), l + late),
            });
        }
    }
    let mut out = Vec::new();
    for part in state.iter().flat_map(|s| s.iter()) {
        match part {
            StatePart::Batch(batch) => {
                if snapshot::kind(batch)? == "progress" {
                    continue;
                }
                out.extend(
                    owned_part(op, batch.clone(), subtask, parallelism)?.map(StatePart::Batch),
                );
            }
            StatePart::Stored(chunk) => {
                if chunk.owned.is_some() {
                    return Err(DataFusionError::Internal(
                        "a chunk was cut for a rescale twice".into(),
                    ));
                }
                let mut chunk = chunk.clone();
                chunk.owned = Some((subtask, parallelism));
                out.push(StatePart::Stored(chunk));
            }
        }
    }
    if let Some((watermark, late)) = progress {
        let late = if subtask == 0 { late } else { 0 };
        out.insert(0, StatePart::Batch(snapshot::progress(watermark, late)?));
    }
    Ok(out)
}

/// The rows of a state batch (not progress) that subtask `subtask` of `parallelism` owns;
/// `None` when it owns none.
pub fn owned_part(
    op: &dyn Operator,
    batch: RecordBatch,
    subtask: usize,
    parallelism: usize,
) -> Result<Option<RecordBatch>> {
    let Some(keys) = op.state_keys(&batch)? else {
        return Ok(Some(batch));
    };
    let owned = owned_rows(&keys, subtask, parallelism)?;
    Ok(if owned.len() == batch.num_rows() {
        Some(batch)
    } else if owned.is_empty() {
        None
    } else {
        Some(take_record_batch(&batch, &owned)?)
    })
}

/// The rows of an unaligned checkpoint's in-flight messages that `subtask` owns, each on
/// the first channel of the input it came on (their watermarks are the restored channel
/// watermarks, the lowest the old subtasks had).
fn owned_in_flight(
    graph: &StreamGraph,
    old: &[usize],
    head: usize,
    previous: &[TaskSnapshot],
    subtask: usize,
) -> Result<Vec<Tagged>> {
    let node = &graph.nodes[head];
    let old_channels = graph.channel_inputs(head, |n| old[n]);
    let new_channels = graph.channel_inputs(head, |n| graph.nodes[n].parallelism);
    let mut out = Vec::new();
    for (tag, message) in previous.iter().flat_map(|t| &t.in_flight) {
        let Message::Data(batch) = message else {
            continue;
        };
        let Some(&input) = old_channels.get(*tag as usize) else {
            continue;
        };
        let mut part = match &node.inputs[input].exchange {
            Exchange::Hash(keys) => {
                let columns = keys
                    .iter()
                    .map(|k| k.evaluate(&batch.rows)?.into_array(batch.num_rows()))
                    .collect::<Result<Vec<_>>>()?;
                let owned = owned_rows(&columns, subtask, node.parallelism)?;
                if owned.is_empty() {
                    continue;
                }
                batch.take(&owned)?
            }
            // One subtask reads them all.
            _ if subtask == 0 => batch.clone(),
            _ => continue,
        };
        part.watermarks = None;
        let channel = new_channels.iter().position(|&i| i == input).unwrap_or(0);
        out.push((channel as u32, Message::Data(part)));
    }
    Ok(out)
}

/// The rows whose keys are in the key groups of `subtask` out of `parallelism`.
fn owned_rows(keys: &[ArrayRef], subtask: usize, parallelism: usize) -> Result<UInt32Array> {
    let mut hashes = Vec::new();
    let owned = key_group_of(keys, &mut hashes)?
        .enumerate()
        .filter(|(_, g)| subtask_of_key_group(*g, parallelism) == subtask)
        .map(|(row, _)| row as u32)
        .collect();
    Ok(owned)
}

/// The lowest watermark the old subtasks had recorded per input edge of `head`.
fn input_watermarks(
    graph: &StreamGraph,
    old: &[usize],
    head: usize,
    previous: &[TaskSnapshot],
) -> HashMap<usize, Millis> {
    let channels = graph.channel_inputs(head, |n| old[n]);
    let mut lowest: HashMap<usize, Millis> = HashMap::new();
    for task in previous {
        if task.inputs.len() != channels.len() {
            continue;
        }
        for (input, watermark) in channels.iter().zip(&task.inputs) {
            lowest
                .entry(*input)
                .and_modify(|w| *w = (*w).min(*watermark))
                .or_insert(*watermark);
        }
    }
    lowest
}

/// The watermark of every channel of `head`'s subtasks at the graph's parallelism.
fn channel_watermarks(
    graph: &StreamGraph,
    head: usize,
    watermarks: &HashMap<usize, Millis>,
) -> Vec<Millis> {
    if watermarks.is_empty() {
        return vec![];
    }
    graph
        .channel_inputs(head, |n| graph.nodes[n].parallelism)
        .into_iter()
        .map(|input| {
            watermarks
                .get(&input)
                .copied()
                .unwrap_or(crate::stream::message::NO_WATERMARK)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use datafusion::arrow::array::{Array, Int64Array};

    use super::*;
    use crate::stream::checkpoint::chunks::ChunkWriter;
    use crate::stream::message::ChangeBatch;

    /// State keyed by its first column.
    struct Keyed;

    impl Operator for Keyed {
        fn process(&mut self, _: usize, _: ChangeBatch, _: &mut Vec<ChangeBatch>) -> Result<()> {
            Ok(())
        }

        fn state_keys(&self, batch: &RecordBatch) -> Result<Option<Vec<ArrayRef>>> {
            let (kind, _, columns) = snapshot::parts(batch, 0)?;
            Ok((kind == "rows").then(|| vec![columns[0].clone()]))
        }
    }

    fn rows(keys: std::ops::Range<i64>) -> RecordBatch {
        snapshot::batch(
            "rows",
            &[],
            vec![Arc::new(Int64Array::from_iter_values(keys))],
        )
        .unwrap()
    }

    fn keys_of(state: &[RecordBatch]) -> Vec<i64> {
        state
            .iter()
            .filter(|b| snapshot::kind(b).unwrap() == "rows")
            .flat_map(|b| {
                let column = b.column(0).as_any().downcast_ref::<Int64Array>().unwrap();
                column.values().to_vec()
            })
            .collect()
    }

    use crate::stream::graph::{ChangelogMode, Edge, StreamNode, TimeSource};

    fn node(kind: NodeKind, state: &str, parallelism: usize, inputs: Vec<Edge>) -> StreamNode {
        StreamNode {
            name: "n".into(),
            detail: String::new(),
            state: state.into(),
            parallelism,
            inputs,
            kind,
            schema: Arc::new(datafusion::arrow::datatypes::Schema::empty()),
            changelog: ChangelogMode::InsertOnly,
        }
    }

    /// A filesystem table of Debezium change events, for [`source`].
    const CHANGELOG: &str = "filesystem debezium-json";

    /// A source of the connector (and format, after a space) named.
    fn source(connector: &str, parallelism: usize) -> StreamNode {
        let (connector, format) = connector.split_once(' ').unwrap_or((connector, "json"));
        let def = weir_catalog::TableDef {
            id: weir_catalog::TableId(1),
            name: format!("{connector}_table"),
            columns: vec![],
            computed: vec![],
            primary_key: vec![],
            watermark: None,
            options: [("connector", connector), ("format", format)]
                .into_iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        };
        let spec = SourceSpec {
            kind: SourceKind::Connector {
                def: Arc::new(def),
                read: None,
            },
            computed: vec![],
            time: TimeSource::None,
        };
        node(NodeKind::Source(spec), "read position", parallelism, vec![])
    }

    fn operator(state: &str, parallelism: usize, inputs: Vec<Edge>) -> StreamNode {
        let factory: crate::stream::graph::OperatorFactory =
            Arc::new(|_| Ok(Box::new(Keyed) as Box<dyn Operator>));
        node(NodeKind::Operator(factory), state, parallelism, inputs)
    }

    fn forward(from: usize) -> Edge {
        Edge {
            from,
            exchange: Exchange::Forward,
        }
    }

    fn hashed(from: usize) -> Edge {
        Edge {
            from,
            exchange: Exchange::Hash(vec![]),
        }
    }

    #[test]
    fn connector_sources_move_to_the_new_parallelism_when_nothing_they_forward_to_keeps_state() {
        let parallelism = |graph: &StreamGraph| -> Vec<usize> {
            graph.nodes.iter().map(|n| n.parallelism).collect()
        };
        // Kafka, a generator or files → stateless → (hash) → keyed state: all at the new
        // parallelism.
        let mut graph = StreamGraph::default();
        for connector in ["kafka", "datagen", "nexmark", "filesystem"] {
            graph.nodes = vec![
                source(connector, 4),
                operator("none", 4, vec![forward(0)]),
                operator("per key", 4, vec![hashed(1)]),
            ];
            keep_source_parallelism(&mut graph, &[2, 2, 2]);
            assert_eq!(parallelism(&graph), [4, 4, 4], "{connector}");
        }
        // A changelog, read by one split in order, keeps its parallelism, and so does
        // what it forwards to; so does a source forwarding to state.
        for (first, state) in [(CHANGELOG, "none"), ("kafka", "rows"), ("datagen", "rows")] {
            graph.nodes = vec![
                source(first, 4),
                operator(state, 4, vec![forward(0)]),
                operator("per key", 4, vec![hashed(1)]),
            ];
            keep_source_parallelism(&mut graph, &[2, 2, 2]);
            assert_eq!(parallelism(&graph), [2, 2, 4], "{first} {state}");
        }
        // Straight into a sink (an ETL job): moved; a view's sink moves with its
        // progress merged.
        let sink = |parallelism| {
            let mut sink = source("datagen", parallelism);
            let NodeKind::Source(SourceSpec {
                kind: SourceKind::Connector { def, .. },
                ..
            }) = sink.kind
            else {
                unreachable!()
            };
            sink.kind = NodeKind::Sink(SinkKind::Connector(def));
            sink.state = "none".into();
            sink.inputs = vec![forward(1)];
            sink
        };
        graph.nodes = vec![
            source("datagen", 4),
            operator("none", 4, vec![forward(0)]),
            sink(4),
        ];
        keep_source_parallelism(&mut graph, &[2, 2, 2]);
        assert_eq!(parallelism(&graph), [4, 4, 4]);
        let changes = |watermark, ended| TaskSnapshot {
            operators: vec![vec![]],
            source: Some(SourcePosition {
                position: 0u64.to_le_bytes().to_vec(),
                watermark: 0,
            }),
            sink: Some(Precommit::Changes {
                changes: vec![],
                watermark,
                ended,
            }),
            ..Default::default()
        };
        // Tasks that had ended left their operators' state out: the new ones too, so
        // that they end again without their operators emitting.
        let ended = |t: TaskSnapshot| TaskSnapshot {
            operators: vec![],
            ..t
        };
        let old = vec![ended(changes(9, true)), ended(changes(7, true))];
        let new = redistribute(&graph, &[2, 2, 2], old).unwrap();
        assert!(
            new.iter().all(|t| t.operators.is_empty()),
            "ended: no state"
        );
        let old = vec![changes(9, true), changes(7, false)];
        let new = redistribute(&graph, &[2, 2, 2], old).unwrap();
        assert!(
            new.iter().all(|t| t.operators.len() == 1),
            "running: its operator"
        );
        for task in new {
            assert!(matches!(
                task.sink,
                Some(Precommit::Changes {
                    watermark: 7,
                    ended: false,
                    ..
                })
            ));
        }
        // A union of a Kafka source and a changelog: one group, kept; of Kafka and
        // datagen: moved.
        for (other, moved) in [(CHANGELOG, false), ("datagen", true)] {
            graph.nodes = vec![
                source("kafka", 4),
                source(other, 4),
                operator("none", 4, vec![forward(0), forward(1)]),
                operator("per key", 4, vec![hashed(2)]),
            ];
            keep_source_parallelism(&mut graph, &[2, 2, 2, 2]);
            let first = if moved { 4 } else { 2 };
            assert_eq!(parallelism(&graph), [first, first, first, 4], "{other}");
        }
    }

    #[test]
    fn a_rescaled_kafka_source_gives_every_new_subtask_every_partitions_furthest_place() {
        let graph = StreamGraph {
            nodes: vec![
                source("kafka", 3),
                operator("none", 3, vec![forward(0)]),
                operator("per key", 2, vec![hashed(1)]),
            ],
            ..Default::default()
        };
        let position = |places: &str, watermark: Millis| TaskSnapshot {
            operators: vec![vec![StatePart::Batch(
                snapshot::progress(watermark, 0).unwrap(),
            )]],
            source: Some(SourcePosition {
                position: places.as_bytes().to_vec(),
                watermark,
            }),
            ..Default::default()
        };
        // Subtask 0 reads partitions 0 and 2 and still carries partition 1's place from a
        // restore before (an older one than subtask 1's).
        let old = vec![
            position(
                r#"[["t",0,{"next":10,"from_time":null}],["t",1,{"next":3,"from_time":null}],["t",2,{"next":null,"from_time":null}]]"#,
                500,
            ),
            position(
                r#"[["t",1,{"next":7,"from_time":null}],["t",3,{"next":4,"from_time":null}]]"#,
                400,
            ),
            TaskSnapshot {
                operators: vec![vec![]],
                ..Default::default()
            },
            TaskSnapshot {
                operators: vec![vec![]],
                ..Default::default()
            },
        ];
        let new = redistribute(&graph, &[2, 2, 2], old).unwrap();
        assert_eq!(new.len(), 3 + 2);
        for task in &new[..3] {
            let source = task.source.as_ref().unwrap();
            assert_eq!(source.watermark, 400);
            let places: serde_json::Value = serde_json::from_slice(&source.position).unwrap();
            let next: Vec<(i64, serde_json::Value)> = places
                .as_array()
                .unwrap()
                .iter()
                .map(|p| (p[1].as_i64().unwrap(), p[2]["next"].clone()))
                .collect();
            assert_eq!(
                next,
                [
                    (0, 10.into()),
                    (1, 7.into()),
                    (2, serde_json::Value::Null),
                    (3, 4.into())
                ]
            );
        }
        assert!(new[3..].iter().all(|t| t.source.is_none()));
    }

    #[test]
    fn every_key_moves_to_exactly_one_subtask_and_progress_is_merged() {
        // Old subtask 0's state is a whole snapshot and the changes after it, each with
        // its progress: only the newest counts. Old subtask 1 wrote some rows to the
        // store as a chunk (state beyond memory).
        let store = crate::stream::checkpoint::store::Checkpoints::new(
            Arc::new(weir_catalog::MemoryStore::default()),
            "job/x",
        );
        let mut writer = ChunkWriter::new(Some(store), 4, 1, 0);
        writer.push(rows(700..1000)).unwrap();
        let chunk = writer.finish().unwrap();
        assert!(matches!(chunk[..], [StatePart::Stored(_)]));
        let batches = |b: Vec<RecordBatch>| b.into_iter().map(StatePart::Batch);
        let old: Vec<Vec<StatePart>> = vec![
            batches(vec![
                snapshot::progress(20, 1).unwrap(),
                rows(0..250),
                snapshot::progress(50, 2).unwrap(),
                rows(250..500),
            ])
            .collect(),
            batches(vec![snapshot::progress(40, 3).unwrap(), rows(500..700)])
                .chain(chunk)
                .chain(batches(vec![
                    snapshot::batch("marker", &[7], vec![]).unwrap()
                ]))
                .collect(),
        ];
        let state: Vec<&[StatePart]> = old.iter().map(Vec::as_slice).collect();
        let mut all = Vec::new();
        for subtask in 0..3 {
            let owned: Vec<RecordBatch> = owned_state(&Keyed, &state, subtask, 3)
                .unwrap()
                .into_iter()
                .flat_map(|p| match p {
                    StatePart::Batch(b) => vec![b],
                    StatePart::Stored(c) => c.load(&Keyed).unwrap(),
                })
                .collect();
            let (kind, head, _) = snapshot::parts(&owned[0], 2).unwrap();
            assert_eq!(kind, "progress");
            let late = if subtask == 0 { 5 } else { 0 };
            assert_eq!(snapshot::read_progress(&head), (40, late));
            // Unkeyed state goes to every subtask.
            assert!(owned.iter().any(|b| snapshot::kind(b).unwrap() == "marker"));
            let keys = keys_of(&owned);
            assert!(keys.len() > 200, "an uneven split: {}", keys.len());
            // The subtask an exchange would send each key to.
            let mut hashes = Vec::new();
            let column: ArrayRef = Arc::new(Int64Array::from(keys.clone()));
            for group in key_group_of(&[column], &mut hashes).unwrap() {
                assert_eq!(subtask_of_key_group(group, 3), subtask);
            }
            all.extend(keys);
        }
        all.sort();
        assert_eq!(all, (0..1000).collect::<Vec<_>>());
    }
}
