//! The `kafka` connector (and `upsert-kafka` as a sink), on librdkafka through `rdkafka`.
//!
//! Options follow Flink's Kafka connector. Every `properties.*` option goes to librdkafka
//! without its prefix. A source reads the partitions of its topics (or of the topics a
//! pattern matches) spread over the source subtasks; its offsets live in Weir's
//! checkpoints, so recovery rewinds exactly. A sink writes each row as a message, with
//! the delivery guarantee the table asks for (see [`sink`]).

pub mod metadata;
pub mod sink;
pub mod source;
pub mod transactions;

use rdkafka::ClientConfig;
use weir_catalog::TableDef;

use super::factory::invalid;
use super::format::Format;
use crate::sql::error::{sqlstate, SqlError, SqlResult};

/// The name under which an `upsert-kafka` table's changelog is read: its rows (the
/// tombstones as rows with only the key) with each message's offset and whether it is
/// a tombstone. The table itself reads as the latest row per key of it.
pub const CHANGELOG_SUFFIX: &str = "$changelog";
const OFFSET_COLUMN: &str = "$offset";
const TOMBSTONE_COLUMN: &str = "$tombstone";

/// The table an `upsert-kafka` table's changelog is read from: its columns (only the
/// key's NOT NULL) and the two hidden ones.
pub fn changelog_table(def: &TableDef) -> TableDef {
    let mut changelog = def.clone();
    changelog.name = format!("{}{CHANGELOG_SUFFIX}", def.name);
    for c in &mut changelog.columns {
        c.nullable |= !def.primary_key.contains(&c.name);
    }
    for (name, data_type, key) in [
        (OFFSET_COLUMN, weir_catalog::SqlType::BigInt, "offset"),
        (
            TOMBSTONE_COLUMN,
            weir_catalog::SqlType::Boolean,
            metadata::TOMBSTONE,
        ),
    ] {
        changelog.columns.push(weir_catalog::ColumnDef {
            name: name.into(),
            data_type,
            nullable: false,
            metadata: Some(key.into()),
        });
    }
    // Computed columns and the watermark apply to the rows the table gives.
    changelog.computed.clear();
    changelog.watermark = None;
    changelog
}

/// The query an `upsert-kafka` table reads as: the latest message of each key (a
/// deduplication keeping the last row, as Flink reads such a table), unless that is a
/// tombstone. Its changes are the changelog of the table: +I for a new key, -U/+U for a
/// new value, a retraction for a deletion.
pub fn upsert_query(def: &TableDef) -> String {
    let q = weir_catalog::quote_ident;
    let columns: Vec<String> = def.columns.iter().map(|c| q(&c.name)).collect();
    let key: Vec<String> = def.primary_key.iter().map(|k| q(k)).collect();
    format!(
        "SELECT {cols} FROM (SELECT * FROM (SELECT *, ROW_NUMBER() OVER (PARTITION BY {key} \
         ORDER BY {offset} DESC) AS \"$rn\" FROM {changelog}) WHERE \"$rn\" = 1) \
         WHERE NOT {tombstone}",
        cols = columns.join(", "),
        key = key.join(", "),
        offset = q(OFFSET_COLUMN),
        changelog = q(&format!("{}{CHANGELOG_SUFFIX}", def.name)),
        tombstone = q(TOMBSTONE_COLUMN),
    )
}

/// librdkafka's settings from the table's `properties.*` options, with `defaults` for
/// those the table leaves out.
fn client_config(def: &TableDef, defaults: &[(&str, &str)]) -> ClientConfig {
    let mut config = ClientConfig::new();
    for (k, v) in defaults {
        config.set(*k, *v);
    }
    for (key, value) in &def.options {
        if let Some(property) = key.strip_prefix("properties.") {
            config.set(property, value);
        }
    }
    config
}

/// Message headers naming where a message comes from (job, epoch or transaction,
/// subtask, sequence), by which a sink finds after a crash what it had written.
fn stamp_headers(fields: [(&str, String); 4]) -> rdkafka::message::OwnedHeaders {
    let mut headers = rdkafka::message::OwnedHeaders::new_with_capacity(fields.len());
    for (key, value) in &fields {
        headers = headers.insert(rdkafka::message::Header {
            key,
            value: Some(value.as_bytes()),
        });
    }
    headers
}

/// How long reading back a partition (after a crash) may take.
const READ_BACK_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

/// Reads partition `partition` of `topic` from offset `from` on, giving each message to
/// `each` until it returns true or the partition's end is reached: how exactly-once sinks
/// find after a crash what they had written. `read_committed` hides messages of aborted
/// and open transactions (on a real broker).
fn read_back(
    def: &TableDef,
    topic: &str,
    partition: i32,
    from: i64,
    read_committed: bool,
    mut each: impl FnMut(&rdkafka::message::BorrowedMessage<'_>) -> bool,
) -> SqlResult<()> {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    let isolation = if read_committed {
        "read_committed"
    } else {
        "read_uncommitted"
    };
    let consumer: BaseConsumer = client_config(
        def,
        &[
            ("group.id", "weir-read-back"),
            ("enable.auto.commit", "false"),
            ("enable.partition.eof", "true"),
            ("isolation.level", isolation),
        ],
    )
    .create()
    .map_err(|e| kafka_error(def, "create a consumer", e))?;
    let mut tpl = rdkafka::TopicPartitionList::new();
    tpl.add_partition_offset(topic, partition, rdkafka::Offset::Offset(from))
        .and_then(|()| consumer.assign(&tpl))
        .map_err(|e| kafka_error(def, "read back the topic", e))?;
    let deadline = std::time::Instant::now() + READ_BACK_TIMEOUT;
    while std::time::Instant::now() < deadline {
        match consumer.poll(std::time::Duration::from_millis(100)) {
            None => {}
            Some(Err(rdkafka::error::KafkaError::PartitionEOF(_))) => return Ok(()),
            Some(Err(e)) => return Err(kafka_error(def, "read back the topic", e)),
            Some(Ok(m)) if each(&m) => return Ok(()),
            Some(Ok(_)) => {}
        }
    }
    Err(SqlError::new(
        sqlstate::IO_ERROR,
        format!(
            "kafka table \"{}\": reading back partition {partition} of '{topic}' timed out",
            def.name
        ),
    ))
}

/// A librdkafka error as the client sees it.
fn kafka_error(def: &TableDef, what: &str, e: rdkafka::error::KafkaError) -> SqlError {
    SqlError::new(
        sqlstate::IO_ERROR,
        format!("kafka table \"{}\": cannot {what}: {e}", def.name),
    )
}

/// The topics a table names: 'topic' is one or a `;`-separated list.
fn topics(def: &TableDef) -> Vec<String> {
    def.options
        .get("topic")
        .map(|t| {
            t.split(';')
                .map(str::trim)
                .filter(|t| !t.is_empty())
                .map(String::from)
                .collect()
        })
        .unwrap_or_default()
}

/// How a table's columns map to a message: the value's format and columns, and the
/// key's when 'key.format' is set.
#[derive(Debug, Clone)]
struct Layout {
    value_format: Format,
    /// Table columns (indices) the value holds, in order.
    value_columns: Vec<usize>,
    key_format: Option<Format>,
    /// Table columns the key holds ('key.fields').
    key_columns: Vec<usize>,
    /// METADATA columns: read from the message, never written.
    metadata: Vec<(usize, metadata::Field)>,
}

impl Layout {
    fn of(def: &TableDef) -> SqlResult<Self> {
        let value_format = match (
            Format::named(def, "format")?,
            Format::named(def, "value.format")?,
        ) {
            (Some(f), None) | (None, Some(f)) => f,
            (Some(_), Some(_)) => {
                return Err(invalid(format!(
                    "kafka table \"{}\" sets both 'format' and 'value.format'; keep one",
                    def.name
                )))
            }
            (None, None) => {
                return Err(invalid(format!(
                    "kafka table \"{}\" needs option 'format' (or 'value.format')",
                    def.name
                )))
            }
        };
        let key_format = Format::named(def, "key.format")?;
        let upsert = def.connector() == Some("upsert-kafka");
        if upsert && (def.primary_key.is_empty() || def.options.contains_key("key.fields")) {
            return Err(invalid(format!(
                "upsert-kafka table \"{}\" takes its key from the PRIMARY KEY; declare one \
                 (PRIMARY KEY (...) NOT ENFORCED) and leave out 'key.fields'",
                def.name
            )));
        }
        let key_fields = match def.options.get("key.fields") {
            _ if upsert => Some(def.primary_key.join(";")),
            fields => fields.cloned(),
        };
        let key_columns = match key_fields {
            None => vec![],
            Some(fields) => fields
                .split(';')
                .map(str::trim)
                .map(|f| {
                    def.columns.iter().position(|c| c.name == f).ok_or_else(|| {
                        invalid(format!(
                            "'key.fields' names column \"{f}\", which table \"{}\" does not \
                             have",
                            def.name
                        ))
                    })
                })
                .collect::<SqlResult<Vec<_>>>()?,
        };
        if key_format.is_some() == key_columns.is_empty() {
            return Err(invalid(format!(
                "kafka table \"{}\": 'key.format' and 'key.fields' go together; set both or \
                 neither",
                def.name
            )));
        }
        if key_format == Some(Format::DebeziumJson) {
            return Err(SqlError::not_supported(
                "'key.format' cannot be 'debezium-json'; use 'json', 'csv' or 'raw'",
            ));
        }
        let except_key = match def.options.get("value.fields-include").map(String::as_str) {
            Some("EXCEPT_KEY") => true,
            None | Some("ALL") => false,
            Some(other) => {
                return Err(invalid(format!(
                    "bad value '{other}' for 'value.fields-include'; expected ALL or EXCEPT_KEY"
                )))
            }
        };
        let metadata = metadata::columns(def)?;
        if let Some((i, _)) = metadata.iter().find(|(i, _)| key_columns.contains(i)) {
            return Err(invalid(format!(
                "'key.fields' names METADATA column \"{}\"; key fields are read from the key",
                def.columns[*i].name
            )));
        }
        if value_format == Format::DebeziumJson && !metadata.is_empty() {
            return Err(SqlError::not_supported(
                "METADATA columns on a 'debezium-json' kafka table are not supported",
            ));
        }
        let value_columns = (0..def.columns.len())
            .filter(|i| !(except_key && key_columns.contains(i)))
            .filter(|i| !metadata.iter().any(|(m, _)| m == i))
            .collect::<Vec<_>>();
        if value_columns.is_empty() {
            return Err(invalid(format!(
                "kafka table \"{}\": with 'value.fields-include' = 'EXCEPT_KEY' the value \
                 holds no column",
                def.name
            )));
        }
        if value_format == Format::DebeziumJson && key_format.is_some() {
            return Err(SqlError::not_supported(
                "a 'debezium-json' table reads whole rows from the value; drop 'key.format'",
            ));
        }
        Ok(Self {
            value_format,
            value_columns,
            key_format,
            key_columns,
            metadata,
        })
    }

    /// The table's physical schema restricted to `columns`.
    fn schema_of(def: &TableDef, columns: &[usize]) -> arrow::datatypes::SchemaRef {
        let physical = def.physical_schema();
        std::sync::Arc::new(physical.project(columns).expect("columns of the table"))
    }
}

#[cfg(test)]
mod tests;
