//! Record formats shared by connectors: decoding records ('csv', 'json', 'raw',
//! 'debezium-json') into Arrow rows, and encoding rows back into records.
//!
//! A record is one line of a file or one Kafka message. Records are decoded a chunk at a
//! time with Arrow's readers; when a chunk holds a bad record, the chunk is decoded again
//! record by record so the bad one can be named (and failed or skipped).

use std::ops::Range;
use std::sync::Arc;

use arrow::array::{ArrayRef, BinaryArray, StringArray};
use arrow::compute::concat_batches;
use arrow::datatypes::{DataType, SchemaRef};
use arrow::error::ArrowError;
use arrow::record_batch::RecordBatch;
use weir_catalog::TableDef;

use super::debezium::Debezium;
use super::factory::invalid;
use crate::sql::error::{SqlError, SqlResult};
use crate::stream::message::ChangeBatch;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Csv,
    Json,
    Raw,
    DebeziumJson,
}

impl Format {
    /// The format option `key` names ('format', 'value.format' or 'key.format').
    pub fn named(def: &TableDef, key: &str) -> SqlResult<Option<Self>> {
        Ok(match def.options.get(key).map(String::as_str) {
            None => None,
            Some("csv") => Some(Format::Csv),
            Some("json") => Some(Format::Json),
            Some("raw") => Some(Format::Raw),
            Some("debezium-json") => Some(Format::DebeziumJson),
            Some(other) => {
                return Err(SqlError::not_supported(format!(
                    "unknown format '{other}' in option '{key}'; Weir reads 'csv', 'json', \
                     'raw' and 'debezium-json'"
                )))
            }
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            Format::Csv => "csv",
            Format::Json => "json",
            Format::Raw => "raw",
            Format::DebeziumJson => "debezium-json",
        }
    }

    /// The option that makes a source skip this format's bad records.
    pub fn ignore_errors_option(self) -> &'static str {
        match self {
            Format::Csv => "csv.ignore-parse-errors",
            Format::Json => "json.ignore-parse-errors",
            // A raw record is never malformed.
            Format::Raw => "raw.ignore-parse-errors",
            Format::DebeziumJson => super::debezium::IGNORE_PARSE_ERRORS,
        }
    }
}

pub fn delimiter(def: &TableDef) -> SqlResult<u8> {
    match def.options.get("csv.field-delimiter").map(String::as_str) {
        None => Ok(b','),
        Some("\\t") => Ok(b'\t'),
        Some(d) if d.len() == 1 => Ok(d.as_bytes()[0]),
        Some(d) => Err(invalid(format!(
            "bad value '{d}' for option 'csv.field-delimiter'; expected a single character"
        ))),
    }
}

/// Flink's SQL timestamp text ('2023-11-14 09:00:00.123') or ISO-8601 ('...T09:...').
pub fn timestamp_formats(def: &TableDef) -> (&'static str, &'static str) {
    match def
        .options
        .get("json.timestamp-format.standard")
        .map(String::as_str)
    {
        Some("ISO-8601") => ("%Y-%m-%dT%H:%M:%S%.f", "%Y-%m-%dT%H:%M:%S%.fZ"),
        _ => ("%Y-%m-%d %H:%M:%S%.f", "%Y-%m-%d %H:%M:%S%.fZ"),
    }
}

/// Decodes records of one format into rows of `schema`.
#[derive(Debug, Clone)]
pub struct RecordDecoder {
    format: Format,
    schema: SchemaRef,
    /// What records decode into: `schema`, or Debezium's envelope.
    decoded: SchemaRef,
    debezium: Option<Debezium>,
    delimiter: u8,
}

impl RecordDecoder {
    /// A decoder of `format` records into `schema` (the table's physical columns, or the
    /// part of them a Kafka key or value holds).
    pub fn new(def: &TableDef, format: Format, schema: SchemaRef) -> SqlResult<Self> {
        let debezium = match format {
            Format::DebeziumJson => Some(Debezium::new(def)?),
            _ => None,
        };
        if format == Format::Raw
            && (schema.fields().len() != 1
                || !matches!(
                    schema.field(0).data_type(),
                    DataType::Utf8 | DataType::Binary
                ))
        {
            return Err(invalid(format!(
                "table \"{}\": the 'raw' format reads each record into one STRING or BYTES \
                 column",
                def.name
            )));
        }
        Ok(Self {
            format,
            decoded: debezium
                .as_ref()
                .map_or_else(|| schema.clone(), |d| d.envelope_schema().clone()),
            schema,
            debezium,
            delimiter: delimiter(def)?,
        })
    }

    pub fn format(&self) -> Format {
        self.format
    }

    /// Decodes the records at `ranges` of `buf` (each ending in a newline, except for
    /// 'raw'). A bad record goes to `bad` with its index and what is wrong; `bad` fails
    /// the decode or lets it skip the record. Returns the rows and, for each row, the
    /// index of its record (not for 'debezium-json', whose records make 0–2 rows).
    pub fn decode(
        &self,
        buf: &[u8],
        ranges: &[Range<usize>],
        mut bad: impl FnMut(usize, String) -> SqlResult<()>,
    ) -> SqlResult<(ChangeBatch, Vec<usize>)> {
        if self.format == Format::Raw {
            return Ok((self.raw(buf, ranges)?, (0..ranges.len()).collect()));
        }
        let whole = ranges.first().map_or(0, |r| r.start)..ranges.last().map_or(0, |r| r.end);
        let (batch, records) = match self.decode_chunk(&buf[whole], ranges.len()) {
            Ok(batch) => (batch, (0..ranges.len()).collect::<Vec<_>>()),
            // Something in the chunk is bad: find it record by record.
            Err(_) => {
                let mut good = Vec::new();
                let mut records = Vec::new();
                for (i, range) in ranges.iter().enumerate() {
                    match self.decode_chunk(&buf[range.clone()], 1) {
                        Ok(b) => {
                            good.push(b);
                            records.push(i);
                        }
                        Err(e) => bad(i, self.explain(e))?,
                    }
                }
                (concat_batches(&self.decoded, &good)?, records)
            }
        };
        let Some(debezium) = &self.debezium else {
            return Ok((ChangeBatch::new(batch), records));
        };
        // Well-formed JSON may still be no change event.
        let changes = debezium.changes(&batch, |row, problem| bad(records[row], problem))?;
        Ok((changes, vec![]))
    }

    fn raw(&self, buf: &[u8], ranges: &[Range<usize>]) -> SqlResult<ChangeBatch> {
        let column: ArrayRef = match self.schema.field(0).data_type() {
            DataType::Utf8 => Arc::new(
                ranges
                    .iter()
                    .map(|r| Some(String::from_utf8_lossy(&buf[r.clone()]).into_owned()))
                    .collect::<StringArray>(),
            ),
            _ => Arc::new(
                ranges
                    .iter()
                    .map(|r| Some(&buf[r.clone()]))
                    .collect::<BinaryArray>(),
            ),
        };
        Ok(ChangeBatch::new(RecordBatch::try_new(
            self.schema.clone(),
            vec![column],
        )?))
    }

    fn decode_chunk(&self, bytes: &[u8], records: usize) -> Result<RecordBatch, ArrowError> {
        let capacity = records + 1;
        let mut batches = Vec::new();
        macro_rules! run {
            ($decoder:expr) => {{
                let mut d = $decoder;
                let mut rest = bytes;
                while !rest.is_empty() {
                    let n = d.decode(rest)?;
                    if n == 0 {
                        batches.extend(d.flush()?);
                    }
                    rest = &rest[n..];
                }
                d.decode(&[])?;
                batches.extend(d.flush()?);
            }};
        }
        match self.format {
            Format::Csv => run!(arrow::csv::ReaderBuilder::new(self.schema.clone())
                .with_header(false)
                .with_delimiter(self.delimiter)
                .with_batch_size(capacity)
                .build_decoder()),
            Format::Json | Format::DebeziumJson => {
                run!(arrow::json::ReaderBuilder::new(self.decoded.clone())
                    .with_batch_size(capacity)
                    .build_decoder()?)
            }
            Format::Raw => unreachable!("raw records are not parsed"),
        }
        let rows: usize = batches.iter().map(|b| b.num_rows()).sum();
        if rows != records {
            // A JSON record holding two objects, or none.
            return Err(ArrowError::JsonError(format!(
                "expected {records} record(s), found {rows}"
            )));
        }
        if batches.len() == 1 {
            return Ok(batches.pop().expect("one"));
        }
        concat_batches(&self.decoded, &batches)
    }

    /// Arrow's message without its own (chunk-relative) line numbers and with column names.
    fn explain(&self, e: ArrowError) -> String {
        let mut m = match e {
            ArrowError::ParseError(m)
            | ArrowError::CsvError(m)
            | ArrowError::JsonError(m)
            | ArrowError::CastError(m)
            | ArrowError::InvalidArgumentError(m) => m,
            other => other.to_string(),
        };
        for marker in [" at line ", " for line "] {
            if let Some(at) = m.find(marker) {
                let digits = m[at + marker.len()..]
                    .find(|c: char| !c.is_ascii_digit())
                    .unwrap_or(m.len() - at - marker.len());
                m.replace_range(at..at + marker.len() + digits, "");
            }
        }
        if let Some(at) = m.find("for column ") {
            let from = at + "for column ".len();
            let digits = m[from..]
                .find(|c: char| !c.is_ascii_digit())
                .unwrap_or(m.len() - from);
            if let Ok(i) = m[from..from + digits].parse::<usize>() {
                if let Some(f) = self.schema.fields().get(i) {
                    m.replace_range(from..from + digits, &format!("\"{}\"", f.name()));
                }
            }
        }
        m
    }
}

/// Encodes rows into records of one format ('csv', 'json' or 'raw').
#[derive(Debug, Clone)]
pub struct RecordEncoder {
    format: Format,
    delimiter: u8,
    timestamps: (&'static str, &'static str),
}

impl RecordEncoder {
    pub fn new(def: &TableDef, format: Format) -> SqlResult<Self> {
        if format == Format::DebeziumJson {
            return Err(SqlError::not_supported(format!(
                "table \"{}\" reads Debezium change events ('debezium-json'); the {} \
                 connector cannot write them",
                def.name,
                def.connector().unwrap_or("log")
            ))
            .with_hint("write to a table with format 'json' or 'csv'"));
        }
        Ok(Self {
            format,
            delimiter: delimiter(def)?,
            timestamps: timestamp_formats(def),
        })
    }

    /// Appends the batch's rows to `out`, each ending in a newline (none for 'raw').
    pub fn write(&self, batch: &RecordBatch, out: &mut Vec<u8>) -> SqlResult<()> {
        let (ts, ts_tz) = self.timestamps;
        match self.format {
            Format::Csv => {
                let mut w = arrow::csv::WriterBuilder::new()
                    .with_header(false)
                    .with_delimiter(self.delimiter)
                    .with_timestamp_format(ts.to_string())
                    .with_timestamp_tz_format(ts_tz.to_string())
                    .build(out);
                w.write(batch)?;
            }
            Format::Json => {
                let mut w = arrow::json::WriterBuilder::new()
                    .with_timestamp_format(ts.to_string())
                    .with_timestamp_tz_format(ts_tz.to_string())
                    .build::<_, arrow::json::writer::LineDelimited>(out);
                w.write(batch)?;
                w.finish()?;
            }
            Format::Raw => {
                let column = batch.column(0);
                let cast = arrow::compute::cast(column, &DataType::Binary)?;
                let values = cast
                    .as_any()
                    .downcast_ref::<BinaryArray>()
                    .expect("cast to binary");
                for v in values.iter() {
                    out.extend_from_slice(v.unwrap_or_default());
                }
            }
            Format::DebeziumJson => unreachable!("refused in new"),
        }
        Ok(())
    }

    /// Each row of `batch` as its own record.
    pub fn records(&self, batch: &RecordBatch) -> SqlResult<Vec<Vec<u8>>> {
        let mut out = Vec::with_capacity(batch.num_rows());
        if self.format == Format::Raw {
            let cast = arrow::compute::cast(batch.column(0), &DataType::Binary)?;
            let values = cast
                .as_any()
                .downcast_ref::<BinaryArray>()
                .expect("cast to binary");
            out.extend(values.iter().map(|v| v.unwrap_or_default().to_vec()));
            return Ok(out);
        }
        let mut buf = Vec::new();
        self.write(batch, &mut buf)?;
        // Every record ends in a newline; CSV quotes a newline inside a value.
        let mut start = 0;
        let mut quoted = false;
        for (i, &b) in buf.iter().enumerate() {
            if self.format == Format::Csv && b == b'"' {
                quoted = !quoted;
            } else if b == b'\n' && !quoted {
                out.push(buf[start..i].to_vec());
                start = i + 1;
            }
        }
        Ok(out)
    }
}
