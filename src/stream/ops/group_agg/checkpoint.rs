//! The group aggregate's checkpoints: a `groups` batch with one row per group (key,
//! emitted result, row count, changed flag, argument rows, partial states), for every
//! group (a whole snapshot) or only the groups changed since the previous snapshot,
//! with a `removed` batch for keys the state TTL dropped since then (an incremental one).
//! Restoring reads the layers in order and keeps each key's last row.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use datafusion::arrow::array::{
    new_empty_array, Array, ArrayRef, BinaryArray, BooleanArray, Int64Array, UInt32Array,
};
use datafusion::arrow::compute::take;
use datafusion::arrow::record_batch::RecordBatch;
use datafusion::common::{DataFusionError, Result};
use datafusion::logical_expr::GroupsAccumulator;
use datafusion::physical_plan::aggregates::group_values::new_group_values;
use datafusion::physical_plan::aggregates::order::GroupOrdering;

use super::{Aggregate, GroupAggregate, Values};
use crate::stream::snapshot::{self, downcast};

/// Columns of a `groups` batch before the partial states.
const FIXED: usize = 5;

impl GroupAggregate {
    /// Every group, and what was changed or removed is now recorded.
    pub(super) fn whole_snapshot(&mut self) -> Result<Vec<RecordBatch>> {
        let all: Vec<usize> = (0..self.groups.len()).collect();
        let groups = self.groups_batch(&all)?;
        self.forget_changes();
        Ok(vec![groups])
    }

    /// The groups changed and the keys removed since the previous snapshot.
    pub(super) fn changed_snapshot(&mut self) -> Result<Vec<RecordBatch>> {
        let mut dirty = self.dirty_list.clone();
        dirty.sort_unstable();
        let mut out = Vec::new();
        // Removals first: a key removed and then seen again is in both.
        if !self.removed.is_empty() {
            let removed = Arc::new(BinaryArray::from_iter_values(self.removed.iter()));
            out.push(snapshot::batch("removed", &[], vec![removed])?);
        }
        out.push(self.groups_batch(&dirty)?);
        self.forget_changes();
        Ok(out)
    }

    fn forget_changes(&mut self) {
        for &g in &self.dirty_list {
            self.dirty[g] = false;
        }
        self.dirty_list.clear();
        self.removed.clear();
    }

    /// One row per group of `groups` (ascending group indices).
    pub(super) fn groups_batch(&mut self, groups: &[usize]) -> Result<RecordBatch> {
        let n = self.groups.len();
        let mut columns: Vec<ArrayRef> = vec![
            snapshot::binary(groups.iter().map(|&g| self.keys.row(g).data())),
            Arc::new(BinaryArray::from_iter(
                groups.iter().map(|&g| self.emitted[g].as_deref()),
            )),
            Arc::new(Int64Array::from_iter_values(
                groups.iter().map(|&g| self.counts[g]),
            )),
            Arc::new(BooleanArray::from_iter(
                groups.iter().map(|&g| Some(self.changed[g])),
            )),
        ];
        match &mut self.values {
            // Some accumulators cannot emit the state of no groups at all.
            Values::Accumulators(_) if n == 0 || groups.is_empty() => {
                columns.push(Arc::new(BinaryArray::new_null(groups.len())));
                for aggregate in &self.calls.aggregates {
                    for field in aggregate.state_fields()? {
                        columns.push(new_empty_array(field.data_type()));
                    }
                }
            }
            Values::Accumulators(aggregates) => {
                columns.push(Arc::new(BinaryArray::new_null(groups.len())));
                let mut held = self.states.states(groups)?;
                for aggregate in aggregates.iter() {
                    match aggregate {
                        Aggregate::DistinctCount(distinct) => {
                            columns.extend(distinct.state_of(groups)?);
                        }
                        Aggregate::Groups(j) => columns.append(&mut held[*j]),
                    }
                }
            }
            Values::Multisets { rows, .. } => {
                columns.push(Arc::new(BinaryArray::from_iter_values(
                    groups.iter().map(|&g| encode_arguments(&rows[g])),
                )));
                columns.extend(self.states.states(groups)?.into_iter().flatten());
            }
        }
        snapshot::batch("groups", &[self.started as i64], columns)
    }

    /// Puts back the groups of whole and incremental snapshots, in order: each key as its
    /// last row left it (a key removed since is gone). Adds to the groups there are, so a
    /// rescaled subtask takes several old subtasks' groups.
    pub(super) fn restore_layers(&mut self, state: Vec<RecordBatch>) -> Result<()> {
        let mut kinds = Vec::with_capacity(state.len());
        for batch in &state {
            let kind = snapshot::kind(batch)?;
            if kind == "groups" {
                let (_, head, _) = snapshot::parts(batch, 1)?;
                self.started |= head[0] != 0;
            }
            kinds.push(kind == "groups");
        }
        // A whole snapshot alone: every key once already.
        if kinds == [true] {
            let (_, _, columns) = snapshot::parts(&state[0], 1)?;
            self.reserve_groups(state[0].num_rows(), key_bytes(&columns[0]));
            return self.restore_groups(&columns);
        }
        // Newest first: a key's first sighting is its last row (or its removal). Keys are
        // told apart by interning them, decoded, in a scratch GroupValues: hashing typed
        // keys as the operator does cost less than hashing their encoded bytes.
        let mut seen = new_group_values(self.calls.key_schema.clone(), &GroupOrdering::None)?;
        let mut indices = Vec::new();
        let mut winners: Vec<Vec<u32>> = vec![Vec::new(); state.len()];
        for (b, batch) in state.iter().enumerate().rev() {
            // The key follows the header (one column for `groups`, none for `removed`).
            let keys = self.decode_keys(batch.column(kinds[b] as usize))?;
            let before = seen.len();
            seen.intern(&keys, &mut indices)?;
            let mut sighted = vec![false; seen.len() - before];
            for row in (0..batch.num_rows()).rev() {
                let new = indices[row].checked_sub(before);
                if new.is_some_and(|n| !std::mem::replace(&mut sighted[n], true)) && kinds[b] {
                    winners[b].push(row as u32);
                }
            }
        }
        // Its table is as large as the groups about to be reserved: gone first.
        drop(seen);
        let mut bytes = 0;
        for (batch, groups) in state.iter().zip(&kinds) {
            if *groups {
                bytes += key_bytes(&snapshot::parts(batch, 1)?.2[0]);
            }
        }
        self.reserve_groups(winners.iter().map(Vec::len).sum(), bytes);
        for ((batch, mut rows), groups) in state.iter().zip(winners).zip(kinds) {
            if !groups || rows.is_empty() {
                continue;
            }
            // Groups come back in the order they were stored.
            rows.reverse();
            let (_, _, columns) = snapshot::parts(batch, 1)?;
            let rows = UInt32Array::from(rows);
            let columns = columns
                .iter()
                .map(|c| Ok(take(c.as_ref(), &rows, None)?))
                .collect::<Result<Vec<_>>>()?;
            self.restore_groups(&columns)?;
        }
        Ok(())
    }

    /// Adds the groups of a `groups` batch's columns (each key once).
    pub(super) fn restore_groups(&mut self, columns: &[ArrayRef]) -> Result<()> {
        let key_columns = self.decode_keys(&columns[0])?;
        self.intern(&key_columns)?;
        let groups = self.indices.clone();
        let total = self.groups.len();
        let emitted = downcast::<BinaryArray>(&columns[1])?;
        let counts = downcast::<Int64Array>(&columns[2])?;
        let changed = downcast::<BooleanArray>(&columns[3])?;
        let arguments = downcast::<BinaryArray>(&columns[4])?;
        for (i, &g) in groups.iter().enumerate() {
            self.set_emitted(
                g,
                (!emitted.is_null(i)).then(|| Box::from(emitted.value(i))),
            );
            self.counts[g] = counts.value(i);
            if changed.value(i) {
                self.mark(g, Instant::now());
            }
        }
        let mut at = FIXED;
        // Each held aggregate's stored state columns, in the order `states` holds them.
        let mut held: Vec<&[ArrayRef]> = Vec::new();
        match &mut self.values {
            Values::Accumulators(aggregates) => {
                for (i, aggregate) in aggregates.iter_mut().enumerate() {
                    let width = self.calls.aggregates[i].state_fields()?.len();
                    let state = &columns[at..at + width];
                    match aggregate {
                        Aggregate::Groups(_) => held.push(state),
                        Aggregate::DistinctCount(distinct) => {
                            distinct.merge_batch(state, &groups, total)?
                        }
                    }
                    at += width;
                }
                self.states.restore(&groups, &held)?;
            }
            Values::Multisets {
                converter,
                rows,
                rows_bytes,
                ..
            } => {
                for &width in self.states.widths() {
                    held.push(&columns[at..at + width]);
                    at += width;
                }
                self.states.restore(&groups, &held)?;
                let parser = converter.parser();
                for (i, &g) in groups.iter().enumerate() {
                    for (row, count) in decode_arguments(arguments.value(i))? {
                        let row = parser.parse(row).owned();
                        let bytes = super::row_bytes(&row);
                        if rows[g].insert(row, count).is_none() {
                            *rows_bytes += bytes;
                        }
                    }
                }
            }
        }
        Ok(())
    }
}

/// A group's argument rows and their counts, as (length, row bytes, count) triples.
fn encode_arguments(rows: &HashMap<datafusion::arrow::row::OwnedRow, i64>) -> Vec<u8> {
    let mut out = Vec::new();
    for (row, count) in rows {
        let bytes = row.as_ref();
        out.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
        out.extend_from_slice(bytes);
        out.extend_from_slice(&count.to_le_bytes());
    }
    out
}

fn decode_arguments(mut bytes: &[u8]) -> Result<Vec<(&[u8], i64)>> {
    let corrupt = || DataFusionError::Internal("stored argument rows are corrupt".into());
    let mut out = Vec::new();
    while !bytes.is_empty() {
        let len = u32::from_le_bytes(bytes.get(..4).ok_or_else(corrupt)?.try_into().unwrap());
        let len = len as usize;
        let row = bytes.get(4..4 + len).ok_or_else(corrupt)?;
        let count = bytes.get(4 + len..12 + len).ok_or_else(corrupt)?;
        out.push((row, i64::from_le_bytes(count.try_into().unwrap())));
        bytes = &bytes[12 + len..];
    }
    Ok(out)
}

/// The bytes of a `groups` batch's encoded keys.
fn key_bytes(keys: &ArrayRef) -> usize {
    keys.as_any()
        .downcast_ref::<BinaryArray>()
        .map_or(0, |k| k.value_data().len())
}
