//! The `print` sink (rows to the server's stdout or stderr, as Flink prints them) and the
//! `blackhole` sink (rows to nowhere).

use std::io::Write;

use arrow::array::{Array, Int8Array};
use arrow::datatypes::{DataType, TimeUnit};
use arrow::record_batch::RecordBatch;
use arrow::util::display::{ArrayFormatter, FormatOptions};
use async_trait::async_trait;
use datafusion::common::Result;
use weir_catalog::TableDef;

use super::factory::{opt_bool, to_df};
use super::io::SinkWriter;
use crate::sql::error::{sqlstate, SqlError, SqlResult};
use crate::stream::message::{ChangeBatch, Op};

pub struct PrintSink {
    prefix: String,
    stderr: bool,
}

impl PrintSink {
    /// Lines start with `'print-identifier'` and, when `subtask` is given, its number
    /// counted from 1 (`id:2> +I[...]`), as Flink does when the sink runs in parallel.
    pub fn open(def: &TableDef, subtask: Option<usize>) -> SqlResult<Self> {
        let identifier = def.options.get("print-identifier");
        let prefix = match (identifier, subtask) {
            (Some(id), Some(s)) => format!("{id}:{}> ", s + 1),
            (Some(id), None) => format!("{id}> "),
            (None, Some(s)) => format!("{}> ", s + 1),
            (None, None) => String::new(),
        };
        Ok(Self {
            prefix,
            stderr: opt_bool(def, "standard-error")?,
        })
    }

    /// The batch as Flink prints rows: `+I[1, abc, 2023-11-14 09:00:00.123]`, one a line.
    pub fn format(&self, batch: &RecordBatch) -> SqlResult<String> {
        self.format_changes(batch, None)
    }

    /// Rows with their changes: `-U[...]`, `+U[...]`, `-D[...]` as well.
    pub fn format_changes(
        &self,
        batch: &RecordBatch,
        ops: Option<&Int8Array>,
    ) -> SqlResult<String> {
        let columns: Vec<ArrayFormatter> = batch
            .columns()
            .iter()
            .map(|c| ArrayFormatter::try_new(c.as_ref(), &options(c.data_type())))
            .collect::<std::result::Result<_, _>>()?;
        let mut out = String::new();
        for row in 0..batch.num_rows() {
            out.push_str(&self.prefix);
            out.push_str(Op::name(ops.map_or(0, |o| o.value(row))));
            out.push('[');
            for (i, c) in columns.iter().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                use std::fmt::Write as _;
                let _ = write!(out, "{}", c.value(row));
            }
            out.push_str("]\n");
        }
        Ok(out)
    }
}

/// Timestamps with as many fraction digits as the type has, as Flink prints them.
fn options(data_type: &DataType) -> FormatOptions<'static> {
    let ts = match data_type {
        DataType::Timestamp(TimeUnit::Second, _) => "%Y-%m-%d %H:%M:%S",
        DataType::Timestamp(TimeUnit::Millisecond, _) => "%Y-%m-%d %H:%M:%S%.3f",
        DataType::Timestamp(TimeUnit::Microsecond, _) => "%Y-%m-%d %H:%M:%S%.6f",
        _ => "%Y-%m-%d %H:%M:%S%.9f",
    };
    FormatOptions::new()
        .with_null("NULL")
        .with_timestamp_format(Some(ts))
        .with_timestamp_tz_format(Some(ts))
}

#[async_trait]
impl SinkWriter for PrintSink {
    async fn write(&mut self, batch: RecordBatch) -> Result<()> {
        self.write_changes(ChangeBatch::new(batch)).await
    }

    async fn write_changes(&mut self, batch: ChangeBatch) -> Result<()> {
        let text = self
            .format_changes(&batch.rows, batch.ops.as_ref())
            .map_err(to_df)?;
        let written = if self.stderr {
            std::io::stderr().lock().write_all(text.as_bytes())
        } else {
            std::io::stdout().lock().write_all(text.as_bytes())
        };
        written.map_err(|e| {
            to_df(SqlError::new(
                sqlstate::IO_ERROR,
                format!("print sink cannot write: {e}"),
            ))
        })
    }

    async fn flush(&mut self) -> Result<()> {
        let flushed = if self.stderr {
            std::io::stderr().flush()
        } else {
            std::io::stdout().flush()
        };
        flushed.map_err(|e| {
            to_df(SqlError::new(
                sqlstate::IO_ERROR,
                format!("print sink cannot write: {e}"),
            ))
        })
    }
}

/// Takes rows and drops them.
pub struct BlackholeSink;

#[async_trait]
impl SinkWriter for BlackholeSink {
    async fn write(&mut self, _batch: RecordBatch) -> Result<()> {
        Ok(())
    }

    async fn flush(&mut self) -> Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::connector::factory::test_util::table;
    use arrow::array::{Int32Array, StringArray, TimestampMillisecondArray};
    use std::sync::Arc;
    use weir_catalog::SqlType;

    #[tokio::test]
    async fn prints_rows_like_flink() {
        let cols = [
            ("id", SqlType::Int),
            ("name", SqlType::Varchar(None)),
            ("ts", SqlType::Timestamp(3)),
        ];
        let def = table(
            &cols,
            &[("connector", "print"), ("print-identifier", "out")],
        );
        let batch = RecordBatch::try_new(
            def.physical_schema(),
            vec![
                Arc::new(Int32Array::from(vec![1, 2])),
                Arc::new(StringArray::from(vec![Some("abc"), None])),
                Arc::new(TimestampMillisecondArray::from(vec![
                    1_699_952_400_123,
                    1_699_952_400_000,
                ])),
            ],
        )
        .unwrap();
        let sink = PrintSink::open(&def, None).unwrap();
        assert_eq!(
            sink.format(&batch).unwrap(),
            "out> +I[1, abc, 2023-11-14 09:00:00.123]\nout> +I[2, NULL, 2023-11-14 09:00:00.000]\n"
        );
        let sink = PrintSink::open(&def, Some(1)).unwrap();
        assert!(sink.format(&batch).unwrap().starts_with("out:2> +I[1, "));
        // Updating queries print their changes.
        let ops = Int8Array::from(vec![Op::UpdateBefore as i8, Op::Delete as i8]);
        let sink = PrintSink::open(&def, None).unwrap();
        assert_eq!(
            sink.format_changes(&batch, Some(&ops)).unwrap(),
            "out> -U[1, abc, 2023-11-14 09:00:00.123]\nout> -D[2, NULL, 2023-11-14 09:00:00.000]\n"
        );
        let plain = table(&cols, &[("connector", "print")]);
        let sink = PrintSink::open(&plain, None).unwrap();
        assert!(sink.format(&batch).unwrap().starts_with("+I[1, abc"));
        let mut sink = PrintSink::open(&plain, Some(0)).unwrap();
        sink.write(batch.clone()).await.unwrap();
        sink.flush().await.unwrap();
        let mut hole = BlackholeSink;
        hole.write(batch).await.unwrap();
        hole.flush().await.unwrap();
    }
}
