//! End-to-end latency at a sink: a blackhole table's `'latency.column'` names a timestamp
//! column, and each row added at the sink (+I, +U) counts the wall clock at its arrival
//! minus that column, in milliseconds. With an event time that follows the wall clock
//! (the nexmark generator paced from a base time), that is the time from an event's
//! ingestion to its result reaching the sink, including what windows wait for.
//! SHOW JOBS reports the 50th and 99th percentiles.

use std::sync::Mutex;

use arrow::array::AsArray;
use arrow::compute::cast;
use arrow::datatypes::{DataType, TimeUnit, TimestampMillisecondType};
use datafusion::common::Result;
use hdrhistogram::Histogram;
use weir_catalog::{SqlType, TableDef};

use super::message::{ChangeBatch, Op};
use crate::sql::error::{sqlstate, SqlError, SqlResult};

/// The table option naming the column latency is measured from.
pub const OPTION: &str = "latency.column";

/// Where in a sink table's rows latency is measured from.
#[derive(Debug, Clone, Copy)]
pub struct LatencyColumn {
    index: usize,
}

impl LatencyColumn {
    /// The column `def`'s `'latency.column'` names, when it has one; an error says what
    /// to change when the column is missing or not a timestamp.
    pub fn of(def: &TableDef) -> SqlResult<Option<Self>> {
        let Some(name) = def.options.get(OPTION) else {
            return Ok(None);
        };
        let Some(index) = def.columns.iter().position(|c| c.name == *name) else {
            let names: Vec<&str> = def.columns.iter().map(|c| c.name.as_str()).collect();
            return Err(SqlError::new(
                sqlstate::UNDEFINED_COLUMN,
                format!(
                    "'{OPTION}' names column \"{name}\", which table \"{}\" does not have; \
                     its columns are: {}",
                    def.name,
                    names.join(", ")
                ),
            ));
        };
        let column = &def.columns[index];
        if !matches!(
            column.data_type,
            SqlType::Timestamp(_) | SqlType::TimestampLtz(_)
        ) {
            return Err(SqlError::new(
                sqlstate::DATATYPE_MISMATCH,
                format!(
                    "'{OPTION}' must name a TIMESTAMP or TIMESTAMP_LTZ column; \"{name}\" is {}",
                    column.data_type
                ),
            ));
        }
        Ok(Some(Self { index }))
    }

    /// Counts the latency of each row `batch` adds, as of `now_ms`.
    pub fn record(
        &self,
        batch: &ChangeBatch,
        now_ms: i64,
        into: &Mutex<Histogram<u64>>,
    ) -> Result<()> {
        let times = cast(
            batch.rows.column(self.index),
            &DataType::Timestamp(TimeUnit::Millisecond, None),
        )?;
        let times = times.as_primitive::<TimestampMillisecondType>();
        let mut histogram = into.lock().unwrap_or_else(|p| p.into_inner());
        for (i, time) in times.iter().enumerate() {
            let added = batch
                .ops
                .as_ref()
                .is_none_or(|ops| !Op::retracts(ops.value(i)));
            if let (Some(time), true) = (time, added) {
                // An event time a little ahead of the clock (a paced generator hands
                // out a millisecond's events at once) counts as no latency.
                let ms = now_ms.saturating_sub(time).max(0) as u64;
                // It grows to any millisecond count a u64 holds.
                if histogram.record(ms).is_err() {
                    histogram.saturating_record(ms);
                }
            }
        }
        Ok(())
    }
}

/// The histogram a job's sinks count latencies into: milliseconds, three significant
/// digits, growing to whatever it is given.
pub fn histogram() -> Histogram<u64> {
    Histogram::new(3).expect("three significant digits is a valid precision")
}

/// The latency below which `quantile` of the counted rows fall, if any were counted.
pub fn quantile(histogram: &Mutex<Histogram<u64>>, quantile: f64) -> Option<u64> {
    let histogram = histogram.lock().unwrap_or_else(|p| p.into_inner());
    (!histogram.is_empty()).then(|| histogram.value_at_quantile(quantile))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::connector::factory::test_util::table;
    use arrow::array::{Int8Array, TimestampMillisecondArray};
    use arrow::datatypes::{Field, Schema};
    use arrow::record_batch::RecordBatch;
    use std::sync::Arc;

    fn blackhole(latency_column: &str) -> TableDef {
        table(
            &[("id", SqlType::BigInt), ("ts", SqlType::Timestamp(3))],
            &[("connector", "blackhole"), (OPTION, latency_column)],
        )
    }

    #[test]
    fn counts_added_rows_from_their_time_column() {
        let column = LatencyColumn::of(&blackhole("ts")).unwrap().unwrap();
        let schema = Arc::new(Schema::new(vec![
            Field::new("id", DataType::Int64, false),
            Field::new("ts", DataType::Timestamp(TimeUnit::Millisecond, None), true),
        ]));
        let rows = RecordBatch::try_new(
            schema,
            vec![
                Arc::new(arrow::array::Int64Array::from(vec![1, 2, 3, 4, 5])),
                Arc::new(TimestampMillisecondArray::from(vec![
                    Some(990),
                    Some(900),
                    Some(1_005),
                    None,
                    Some(0),
                ])),
            ],
        )
        .unwrap();
        // The last row is a retraction: it does not count.
        let ops = Int8Array::from(vec![0, 2, 0, 0, Op::Delete as i8]);
        let batch = ChangeBatch {
            rows,
            watermarks: None,
            ops: Some(ops),
        };
        let counted = Mutex::new(histogram());
        column.record(&batch, 1_000, &counted).unwrap();
        let h = counted.lock().unwrap();
        assert_eq!(h.len(), 3);
        assert_eq!((h.min(), h.max()), (0, 100));
        drop(h);
        assert_eq!(quantile(&counted, 0.5), Some(10));
        assert_eq!(quantile(&Mutex::new(histogram()), 0.5), None);
    }

    #[test]
    fn a_missing_or_untimely_column_is_refused_with_what_to_change() {
        let e = LatencyColumn::of(&blackhole("nope")).unwrap_err();
        assert_eq!(e.code, sqlstate::UNDEFINED_COLUMN);
        assert!(e.to_string().contains("its columns are: id, ts"), "{e}");
        let e = LatencyColumn::of(&blackhole("id")).unwrap_err();
        assert_eq!(e.code, sqlstate::DATATYPE_MISMATCH);
        assert!(e.to_string().contains("\"id\" is BIGINT"), "{e}");
    }
}
