//! Kafka METADATA columns, by Flink's keys: `topic`, `partition`, `offset`,
//! `timestamp`, `timestamp-type` and `headers`, plus `key` (the message key's bytes).
//! Flink's `headers` is a MAP<STRING, BYTES>, a type Weir does not have: here it is a
//! STRING holding a JSON object of header names and (UTF-8) values. Metadata columns are
//! read, never written.

use std::sync::Arc;

use arrow::array::TimestampMillisecondArray;
use arrow::array::{ArrayRef, BinaryArray, Int32Array, Int64Array, StringArray};
use arrow::datatypes::DataType;
use weir_catalog::TableDef;

use crate::connector::factory::invalid;
use crate::sql::error::{SqlError, SqlResult};

/// What a metadata column holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Field {
    Topic,
    Partition,
    Offset,
    Timestamp,
    TimestampType,
    Key,
    Headers,
    /// Whether the message is a tombstone (no value): the hidden column of an
    /// `upsert-kafka` table's changelog.
    Tombstone,
}

/// The metadata key of [`Field::Tombstone`], known to `upsert-kafka` tables only.
pub const TOMBSTONE: &str = "weir.tombstone";

const KEYS: &[(&str, Field)] = &[
    ("topic", Field::Topic),
    ("partition", Field::Partition),
    ("offset", Field::Offset),
    ("timestamp", Field::Timestamp),
    ("timestamp-type", Field::TimestampType),
    ("key", Field::Key),
    ("headers", Field::Headers),
];

/// The metadata of one message.
#[derive(Debug, Clone)]
pub struct Metadata {
    pub topic: Arc<str>,
    pub partition: i32,
    pub offset: i64,
    pub timestamp: Option<i64>,
    pub timestamp_type: &'static str,
    pub key: Option<Vec<u8>>,
    pub headers: Vec<(String, Option<Vec<u8>>)>,
    /// No value: a deletion in an upsert topic.
    pub tombstone: bool,
}

/// The table's metadata columns: (column index, what it holds). Refuses keys Kafka has
/// not and tables of other connectors.
pub fn columns(def: &TableDef) -> SqlResult<Vec<(usize, Field)>> {
    let mut out = vec![];
    for (i, c) in def.columns.iter().enumerate() {
        let Some(key) = &c.metadata else { continue };
        if key == TOMBSTONE && def.connector() == Some("upsert-kafka") {
            out.push((i, Field::Tombstone));
            continue;
        }
        if !matches!(def.connector(), Some("kafka" | "upsert-kafka")) {
            return Err(SqlError::not_supported(format!(
                "column \"{}\" of table \"{}\" is METADATA; only 'kafka' tables have metadata",
                c.name, def.name
            )));
        }
        let field = KEYS
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, f)| *f)
            .ok_or_else(|| {
                invalid(format!(
                    "unknown Kafka metadata key '{key}' for column \"{}\"; valid keys are: {}",
                    c.name,
                    KEYS.iter().map(|(k, _)| *k).collect::<Vec<_>>().join(", ")
                ))
            })?;
        let natural = natural_type(field);
        let target = c.data_type.to_arrow();
        if !arrow::compute::can_cast_types(&natural, &target) {
            return Err(invalid(format!(
                "metadata '{key}' is {natural} and cannot be read into column \"{}\" of type {}",
                c.name, c.data_type
            )));
        }
        out.push((i, field));
    }
    Ok(out)
}

fn natural_type(field: Field) -> DataType {
    match field {
        Field::Topic | Field::TimestampType | Field::Headers => DataType::Utf8,
        Field::Partition => DataType::Int32,
        Field::Offset => DataType::Int64,
        Field::Timestamp => {
            DataType::Timestamp(arrow::datatypes::TimeUnit::Millisecond, Some("UTC".into()))
        }
        Field::Key => DataType::Binary,
        Field::Tombstone => DataType::Boolean,
    }
}

/// The column of `field` for `messages`, as `target`.
pub fn column(field: Field, messages: &[&Metadata], target: &DataType) -> SqlResult<ArrayRef> {
    let natural: ArrayRef = match field {
        Field::Topic => Arc::new(StringArray::from_iter_values(
            messages.iter().map(|m| &*m.topic),
        )),
        Field::Partition => Arc::new(Int32Array::from_iter_values(
            messages.iter().map(|m| m.partition),
        )),
        Field::Offset => Arc::new(Int64Array::from_iter_values(
            messages.iter().map(|m| m.offset),
        )),
        Field::Timestamp => Arc::new(
            messages
                .iter()
                .map(|m| m.timestamp)
                .collect::<TimestampMillisecondArray>()
                .with_timezone("UTC"),
        ),
        Field::TimestampType => Arc::new(StringArray::from_iter_values(
            messages.iter().map(|m| m.timestamp_type),
        )),
        Field::Key => Arc::new(
            messages
                .iter()
                .map(|m| m.key.as_deref())
                .collect::<BinaryArray>(),
        ),
        Field::Tombstone => Arc::new(arrow::array::BooleanArray::from_iter(
            messages.iter().map(|m| Some(m.tombstone)),
        )),
        Field::Headers => Arc::new(StringArray::from_iter_values(messages.iter().map(|m| {
            let object: serde_json::Map<String, serde_json::Value> = m
                .headers
                .iter()
                .map(|(k, v)| {
                    let value = v.as_ref().map_or(serde_json::Value::Null, |v| {
                        serde_json::Value::String(String::from_utf8_lossy(v).into_owned())
                    });
                    (k.clone(), value)
                })
                .collect();
            serde_json::Value::Object(object).to_string()
        }))),
    };
    Ok(arrow::compute::cast(&natural, target)?)
}
