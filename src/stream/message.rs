//! What flows between operators.

use datafusion::arrow::array::{Array, Int64Array, Int8Array};
use datafusion::arrow::array::{BooleanArray, UInt32Array};
use datafusion::arrow::compute::{filter_record_batch, take_record_batch};
use datafusion::arrow::record_batch::RecordBatch;
use datafusion::common::Result;

/// Event time and watermarks: milliseconds since the Unix epoch, as Flink keeps them.
pub type Millis = i64;

/// The wall clock, in milliseconds since 1970 (processing time).
pub fn wall_clock_ms() -> Millis {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as Millis)
}

/// A watermark no row can be older than: the end of a bounded input.
pub const END_OF_TIME: Millis = Millis::MAX;
/// The watermark before any has been seen.
pub const NO_WATERMARK: Millis = Millis::MIN;

/// Identifies a checkpoint epoch; barriers carry it.
pub type Epoch = u64;

/// Rows and the change each makes (inserts unless `ops` says otherwise).
///
/// `watermarks` is the watermark each row meets. Sources generate a watermark after
/// every row (Flink's `pipeline.auto-watermark-interval = 0`), so which window a late row
/// misses must not depend on how rows were grouped into batches; carrying the per-row
/// value costs one integer a row instead of one message a row. `None` means every row
/// meets the receiving operator's current watermark.
#[derive(Debug, Clone)]
pub struct ChangeBatch {
    pub rows: RecordBatch,
    pub watermarks: Option<Int64Array>,
    /// Each row's change ([`Op`] codes); `None`: every row is an insert.
    pub ops: Option<Int8Array>,
}

/// A row's change, as Flink names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(i8)]
pub enum Op {
    Insert = 0,
    UpdateBefore = 1,
    UpdateAfter = 2,
    Delete = 3,
}

impl Op {
    /// How Flink prints a change: +I, -U, +U, -D.
    pub fn name(code: i8) -> &'static str {
        match code {
            c if c == Op::UpdateBefore as i8 => "-U",
            c if c == Op::UpdateAfter as i8 => "+U",
            c if c == Op::Delete as i8 => "-D",
            _ => "+I",
        }
    }

    /// Whether the row is taken away (-U, -D) rather than added (+I, +U).
    pub fn retracts(code: i8) -> bool {
        code == Op::UpdateBefore as i8 || code == Op::Delete as i8
    }
}

impl ChangeBatch {
    pub fn new(rows: RecordBatch) -> Self {
        Self {
            rows,
            watermarks: None,
            ops: None,
        }
    }

    /// Rows that all carry the change `op`.
    pub fn with_op(rows: RecordBatch, op: Op) -> Self {
        let ops = (op != Op::Insert).then(|| Int8Array::from(vec![op as i8; rows.num_rows()]));
        Self {
            rows,
            watermarks: None,
            ops,
        }
    }

    /// Whether row `i` retracts.
    pub fn retracts(&self, i: usize) -> bool {
        self.ops.as_ref().is_some_and(|o| Op::retracts(o.value(i)))
    }

    /// Whether any row retracts (a batch of inserts and updates-after only adds rows).
    pub fn retracts_any(&self) -> bool {
        self.ops
            .as_ref()
            .is_some_and(|o| o.values().iter().any(|&op| Op::retracts(op)))
    }

    pub fn num_rows(&self) -> usize {
        self.rows.num_rows()
    }

    /// The rows `mask` keeps, with their watermarks.
    pub fn filter(&self, mask: &BooleanArray) -> Result<Self> {
        let watermarks = match &self.watermarks {
            Some(w) => Some(
                datafusion::arrow::compute::filter(w, mask)?
                    .as_any()
                    .downcast_ref::<Int64Array>()
                    .expect("filter keeps the array type")
                    .clone(),
            ),
            None => None,
        };
        let ops = match &self.ops {
            Some(o) => Some(
                datafusion::arrow::compute::filter(o, mask)?
                    .as_any()
                    .downcast_ref::<Int8Array>()
                    .expect("filter keeps the array type")
                    .clone(),
            ),
            None => None,
        };
        Ok(Self {
            rows: filter_record_batch(&self.rows, mask)?,
            watermarks,
            ops,
        })
    }

    /// The rows at `indices`, with their watermarks.
    pub fn take(&self, indices: &UInt32Array) -> Result<Self> {
        let watermarks = match &self.watermarks {
            Some(w) => Some(
                datafusion::arrow::compute::take(w, indices, None)?
                    .as_any()
                    .downcast_ref::<Int64Array>()
                    .expect("take keeps the array type")
                    .clone(),
            ),
            None => None,
        };
        let ops = match &self.ops {
            Some(o) => Some(
                datafusion::arrow::compute::take(o, indices, None)?
                    .as_any()
                    .downcast_ref::<Int8Array>()
                    .expect("take keeps the array type")
                    .clone(),
            ),
            None => None,
        };
        Ok(Self {
            rows: take_record_batch(&self.rows, indices)?,
            watermarks,
            ops,
        })
    }

    /// The watermark row `i` meets, given the operator's current one.
    pub fn watermark_of(&self, i: usize, current: Millis) -> Millis {
        match &self.watermarks {
            Some(w) if !w.is_null(i) => w.value(i),
            _ => current,
        }
    }
}

// Data is nearly every message; boxing it would allocate once per batch for nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone)]
pub enum Message {
    Data(ChangeBatch),
    /// Event-time progress: no later row on this channel is older.
    Watermark(Millis),
    /// A checkpoint epoch boundary.
    Barrier(Epoch),
    /// The sending source split stopped producing: do not let it hold watermarks back.
    Idle,
    /// It resumed.
    Active,
    /// The input is finished; acts as a watermark at the end of time.
    End,
}

/// Rows of `out` as "op v,v,..." lines in emission order (NULL as `_`), for tests.
#[cfg(test)]
pub fn change_lines(out: &[ChangeBatch]) -> Vec<String> {
    use datafusion::arrow::util::display::array_value_to_string;
    let mut lines = Vec::new();
    for b in out {
        for i in 0..b.num_rows() {
            let op = b.ops.as_ref().map_or(0, |o| o.value(i));
            let values: Vec<String> = b
                .rows
                .columns()
                .iter()
                .map(|c| {
                    if c.is_null(i) {
                        "_".to_string()
                    } else {
                        array_value_to_string(c, i).expect("printable")
                    }
                })
                .collect();
            lines.push(format!("{} {}", Op::name(op), values.join(",")));
        }
    }
    lines
}

/// The rows a changelog of [`change_lines`] leaves, sorted: however its changes were
/// folded, the same rows remain.
#[cfg(test)]
pub fn rows_left(lines: &[String]) -> Vec<String> {
    let mut rows: Vec<String> = Vec::new();
    for line in lines {
        let (op, row) = line.split_once(' ').expect("op and row");
        if op.starts_with('+') {
            rows.push(row.to_string());
        } else {
            let at = rows.iter().position(|r| r == row);
            rows.swap_remove(at.unwrap_or_else(|| panic!("{line} takes back a row not there")));
        }
    }
    rows.sort();
    rows
}
