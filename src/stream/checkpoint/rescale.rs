//! Restoring a checkpoint into a job of another parallelism (Flink's rescaling).
//!
//! Keyed state moves by key group: rows are hashed into the fixed [`KEY_GROUPS`], each
//! subtask owns a contiguous range of them, and a new subtask restores, from every old
//! subtask, the state rows whose keys fall in its range. Sources keep the parallelism
//! they were checkpointed at (a split's position cannot be divided), and so does every
//! node they forward to; the first keyed exchange after them spreads rows over the new
//! parallelism.

use std::collections::HashMap;

use datafusion::arrow::array::{ArrayRef, UInt32Array};
use datafusion::arrow::compute::take_record_batch;
use datafusion::arrow::record_batch::RecordBatch;
use datafusion::common::{DataFusionError, Result};

use super::TaskSnapshot;
use crate::stream::exchange::{key_group_of, subtask_of_key_group, Tagged};
use crate::stream::graph::{Exchange, NodeKind, StreamGraph};
use crate::stream::message::{Message, Millis};
use crate::stream::operator::Operator;
use crate::stream::snapshot;

/// Each node's parallelism, as a checkpoint records it.
pub fn parallelism(graph: &StreamGraph) -> Vec<usize> {
    graph.nodes.iter().map(|n| n.parallelism).collect()
}

/// Gives the sources, and every node they forward to, the parallelism `old` gives them.
pub fn keep_source_parallelism(graph: &mut StreamGraph, old: &[usize]) {
    if old.len() != graph.nodes.len() {
        return;
    }
    let mut kept = vec![false; graph.nodes.len()];
    for id in 0..graph.nodes.len() {
        let node = &graph.nodes[id];
        kept[id] = matches!(node.kind, NodeKind::Source(_))
            || node
                .inputs
                .iter()
                .any(|e| matches!(e.exchange, Exchange::Forward) && kept[e.from]);
    }
    for (id, node) in graph.nodes.iter_mut().enumerate() {
        if kept[id] {
            node.parallelism = old[id];
        }
    }
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
        if matches!(head.kind, NodeKind::Source(_)) {
            return Err(DataFusionError::Internal(
                "a source chain changed parallelism".into(),
            ));
        }
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
                ..Default::default()
            };
            for (k, op) in operators.iter().enumerate() {
                let state: Vec<&[RecordBatch]> = previous
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
fn owned_state(
    op: &dyn Operator,
    state: &[&[RecordBatch]],
    subtask: usize,
    parallelism: usize,
) -> Result<Vec<RecordBatch>> {
    let mut progress: Option<(Millis, u64)> = None;
    for old in state {
        let mut newest = None;
        for batch in old.iter() {
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
    for batch in state.iter().flat_map(|s| s.iter()) {
        if snapshot::kind(batch)? == "progress" {
            continue;
        }
        let Some(keys) = op.state_keys(batch)? else {
            out.push(batch.clone());
            continue;
        };
        let owned = owned_rows(&keys, subtask, parallelism)?;
        if owned.len() == batch.num_rows() {
            out.push(batch.clone());
        } else if !owned.is_empty() {
            out.push(take_record_batch(batch, &owned)?);
        }
    }
    if let Some((watermark, late)) = progress {
        let late = if subtask == 0 { late } else { 0 };
        out.insert(0, snapshot::progress(watermark, late)?);
    }
    Ok(out)
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

    #[test]
    fn every_key_moves_to_exactly_one_subtask_and_progress_is_merged() {
        // Old subtask 0's state is a whole snapshot and the changes after it, each with
        // its progress: only the newest counts.
        let old: Vec<Vec<RecordBatch>> = vec![
            vec![
                snapshot::progress(20, 1).unwrap(),
                rows(0..250),
                snapshot::progress(50, 2).unwrap(),
                rows(250..500),
            ],
            vec![
                snapshot::progress(40, 3).unwrap(),
                rows(500..1000),
                snapshot::batch("marker", &[7], vec![]).unwrap(),
            ],
        ];
        let state: Vec<&[RecordBatch]> = old.iter().map(Vec::as_slice).collect();
        let mut all = Vec::new();
        for subtask in 0..3 {
            let owned = owned_state(&Keyed, &state, subtask, 3).unwrap();
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
