//! What the catalog records about tables and views.

use std::collections::BTreeMap;
use std::sync::Arc;

use arrow::datatypes::{Field, Schema, SchemaRef};
use serde::{Deserialize, Serialize};

use crate::types::SqlType;

/// Stable identity of a table: its log keys use it, so a dropped and re-created table
/// never sees the old table's rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct TableId(pub u64);

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ColumnDef {
    pub name: String,
    pub data_type: SqlType,
    pub nullable: bool,
    /// `METADATA [FROM 'key']`: read from the record's metadata (a Kafka message's
    /// timestamp, partition, offset, key or headers), not from its value.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata: Option<String>,
}

/// `name AS expr`: a column computed from the others when the table is read.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ComputedColumn {
    pub name: String,
    /// The expression as SQL text, planned again each time the table is read.
    pub expr: String,
    /// The type the expression had when the table was created.
    pub data_type: SqlType,
}

/// `WATERMARK FOR column AS expr`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WatermarkDef {
    pub column: String,
    pub expr: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TableDef {
    pub id: TableId,
    pub name: String,
    pub columns: Vec<ColumnDef>,
    pub computed: Vec<ComputedColumn>,
    pub primary_key: Vec<String>,
    pub watermark: Option<WatermarkDef>,
    /// The WITH options, `connector` included; empty for Weir's own log tables.
    pub options: BTreeMap<String, String>,
}

impl TableDef {
    /// The connector named in WITH, or `None` for a table backed by Weir's own log.
    pub fn connector(&self) -> Option<&str> {
        self.options.get("connector").map(String::as_str)
    }

    /// The stored columns only, in declaration order: the shape of log entries.
    pub fn physical_schema(&self) -> SchemaRef {
        Arc::new(Schema::new(
            self.columns
                .iter()
                .map(|c| Field::new(&c.name, c.data_type.to_arrow(), c.nullable))
                .collect::<Vec<_>>(),
        ))
    }

    /// Stored columns followed by computed ones: what a query sees.
    pub fn schema(&self) -> SchemaRef {
        let mut fields: Vec<Field> = self
            .physical_schema()
            .fields()
            .iter()
            .map(|f| f.as_ref().clone())
            .collect();
        fields.extend(
            self.computed
                .iter()
                .map(|c| Field::new(&c.name, c.data_type.to_arrow(), true)),
        );
        Arc::new(Schema::new(fields))
    }

    /// The statement that re-creates this table, in Flink's syntax.
    pub fn create_statement(&self) -> String {
        let mut lines: Vec<String> = self
            .columns
            .iter()
            .map(|c| {
                let not_null = if c.nullable { "" } else { " NOT NULL" };
                let metadata = match &c.metadata {
                    Some(key) if *key == c.name => " METADATA".to_string(),
                    Some(key) => format!(" METADATA FROM '{key}'"),
                    None => String::new(),
                };
                format!(
                    "  {} {}{not_null}{metadata}",
                    quote_ident(&c.name),
                    c.data_type
                )
            })
            .collect();
        lines.extend(
            self.computed
                .iter()
                .map(|c| format!("  {} AS {}", quote_ident(&c.name), c.expr)),
        );
        if let Some(wm) = &self.watermark {
            lines.push(format!(
                "  WATERMARK FOR {} AS {}",
                quote_ident(&wm.column),
                wm.expr
            ));
        }
        if !self.primary_key.is_empty() {
            let cols: Vec<String> = self.primary_key.iter().map(|c| quote_ident(c)).collect();
            lines.push(format!("  PRIMARY KEY ({}) NOT ENFORCED", cols.join(", ")));
        }
        let mut sql = format!(
            "CREATE TABLE {} (\n{}\n)",
            quote_ident(&self.name),
            lines.join(",\n")
        );
        if !self.options.is_empty() {
            let opts: Vec<String> = self
                .options
                .iter()
                .map(|(k, v)| {
                    format!(
                        "  '{}' = '{}'",
                        k.replace('\'', "''"),
                        v.replace('\'', "''")
                    )
                })
                .collect();
            sql.push_str(&format!(" WITH (\n{}\n)", opts.join(",\n")));
        }
        sql
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ViewDef {
    pub name: String,
    /// The defining query as SQL text.
    pub query: String,
    /// Tables and views the query reads, so they cannot be dropped from under it.
    pub depends_on: Vec<String>,
    /// A materialized view: maintained incrementally by a continuous query.
    #[serde(default)]
    pub materialized: bool,
    /// The session settings its query was planned with, so a restart plans it alike.
    #[serde(default)]
    pub settings: std::collections::BTreeMap<String, String>,
}

/// A continuous `INSERT INTO sink SELECT ...` job.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobDef {
    pub id: String,
    /// The INSERT statement as SQL text.
    pub statement: String,
    /// The sink table and the relations the query reads: none can be dropped while the
    /// job exists.
    pub depends_on: Vec<String>,
    /// The session settings its query was planned with, so a restart plans it alike.
    #[serde(default)]
    pub settings: std::collections::BTreeMap<String, String>,
}

/// Quotes an identifier only when it would not survive unquoted (Postgres rules).
pub fn quote_ident(name: &str) -> String {
    let plain = name
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_lowercase() || c == '_')
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
    if plain {
        name.to_string()
    } else {
        format!("\"{}\"", name.replace('"', "\"\""))
    }
}
