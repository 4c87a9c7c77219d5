//! Rows for SHOW TABLES, SHOW CREATE TABLE, DESCRIBE and SHOW <variable>.

use std::collections::HashMap;
use std::sync::Arc;

use datafusion::arrow::array::{ArrayRef, BooleanArray, RecordBatch, StringArray};
use datafusion::arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use weir_catalog::{Catalog, SqlType, TableDef};

use super::error::{SqlError, SqlResult};
use super::session;

fn text_schema(names: &[&str]) -> SchemaRef {
    Arc::new(Schema::new(
        names
            .iter()
            .map(|n| Field::new(*n, DataType::Utf8, true))
            .collect::<Vec<_>>(),
    ))
}

fn text_batch(schema: SchemaRef, columns: Vec<Vec<Option<String>>>) -> RecordBatch {
    let arrays: Vec<ArrayRef> = columns
        .into_iter()
        .map(|c| Arc::new(StringArray::from(c)) as ArrayRef)
        .collect();
    RecordBatch::try_new(schema, arrays).expect("columns match their schema")
}

pub fn show_tables_schema() -> SchemaRef {
    text_schema(&["name", "kind", "connector"])
}

/// Tables and views by name; `connector` is `log` for tables kept in Weir's own log.
pub fn show_tables(catalog: &Catalog) -> RecordBatch {
    let mut rows: Vec<(String, &str, String)> = catalog
        .tables()
        .iter()
        .map(|t| {
            let connector = t.connector().unwrap_or("log").to_string();
            (t.name.clone(), "table", connector)
        })
        .collect();
    rows.extend(
        catalog
            .views()
            .iter()
            .map(|v| (v.name.clone(), "view", String::new())),
    );
    rows.sort();
    let (names, kinds, connectors): (Vec<_>, Vec<_>, Vec<_>) = rows
        .into_iter()
        .map(|(n, k, c)| (Some(n), Some(k.to_string()), (!c.is_empty()).then_some(c)))
        .fold((vec![], vec![], vec![]), |mut acc, (n, k, c)| {
            acc.0.push(n);
            acc.1.push(k);
            acc.2.push(c);
            acc
        });
    text_batch(show_tables_schema(), vec![names, kinds, connectors])
}

pub fn show_create_schema() -> SchemaRef {
    text_schema(&["create_statement"])
}

pub fn show_create(catalog: &Catalog, name: &str) -> SqlResult<RecordBatch> {
    let sql = if let Some(table) = catalog.table(name) {
        table.create_statement()
    } else if let Some(view) = catalog.view(name) {
        format!(
            "CREATE {}VIEW {} AS {}",
            if view.materialized {
                "MATERIALIZED "
            } else {
                ""
            },
            weir_catalog::quote_ident(&view.name),
            crate::plan::window_tvf::readable(&view.query)
        )
    } else {
        return Err(SqlError::undefined_table(name));
    };
    Ok(text_batch(show_create_schema(), vec![vec![Some(sql)]]))
}

pub fn describe_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("name", DataType::Utf8, false),
        Field::new("type", DataType::Utf8, false),
        Field::new("null", DataType::Boolean, false),
        Field::new("key", DataType::Utf8, true),
        Field::new("extras", DataType::Utf8, true),
        Field::new("watermark", DataType::Utf8, true),
    ]))
}

/// One row per column, as Flink's DESCRIBE shows them.
pub fn describe_table(def: &TableDef) -> RecordBatch {
    let key = if def.primary_key.is_empty() {
        None
    } else {
        Some(format!("PRI({})", def.primary_key.join(", ")))
    };
    let watermark_of = |name: &str| {
        def.watermark
            .as_ref()
            .filter(|w| w.column == name)
            .map(|w| w.expr.clone())
    };
    let mut rows: Vec<DescribeRow> = def
        .columns
        .iter()
        .map(|c| DescribeRow {
            name: c.name.clone(),
            data_type: c.data_type.to_string(),
            nullable: c.nullable,
            key: def
                .primary_key
                .contains(&c.name)
                .then(|| key.clone())
                .flatten(),
            extras: c.metadata.as_ref().map(|m| format!("METADATA FROM '{m}'")),
            watermark: watermark_of(&c.name),
        })
        .collect();
    rows.extend(def.computed.iter().map(|c| DescribeRow {
        name: c.name.clone(),
        data_type: c.data_type.to_string(),
        nullable: true,
        key: None,
        extras: Some(format!("AS {}", c.expr)),
        watermark: watermark_of(&c.name),
    }));
    describe_rows(rows)
}

/// Columns of a view, from its planned schema.
pub fn describe_view(schema: &Schema) -> RecordBatch {
    describe_rows(
        schema
            .fields()
            .iter()
            .map(|f| DescribeRow {
                name: f.name().clone(),
                data_type: SqlType::from_arrow(f.data_type())
                    .map(|t| t.to_string())
                    .unwrap_or_else(|| f.data_type().to_string()),
                nullable: f.is_nullable(),
                key: None,
                extras: None,
                watermark: None,
            })
            .collect(),
    )
}

struct DescribeRow {
    name: String,
    data_type: String,
    nullable: bool,
    key: Option<String>,
    extras: Option<String>,
    watermark: Option<String>,
}

fn describe_rows(rows: Vec<DescribeRow>) -> RecordBatch {
    let strings = |f: &dyn Fn(&DescribeRow) -> Option<String>| -> ArrayRef {
        Arc::new(StringArray::from(rows.iter().map(f).collect::<Vec<_>>()))
    };
    let columns = vec![
        strings(&|r| Some(r.name.clone())),
        strings(&|r| Some(r.data_type.clone())),
        Arc::new(BooleanArray::from(
            rows.iter().map(|r| r.nullable).collect::<Vec<_>>(),
        )) as ArrayRef,
        strings(&|r| r.key.clone()),
        strings(&|r| r.extras.clone()),
        strings(&|r| r.watermark.clone()),
    ];
    RecordBatch::try_new(describe_schema(), columns).expect("columns match their schema")
}

/// `SHOW name`: one column named after the variable; `SHOW ALL`: name, setting, description.
pub fn show_variable_schema(name: &str) -> SqlResult<SchemaRef> {
    if name == "all" {
        return Ok(text_schema(&["name", "setting", "description"]));
    }
    let (column, _) = session::show(&HashMap::new(), name)?;
    Ok(text_schema(&[column.to_ascii_lowercase().as_str()]))
}

pub fn show_variable(metadata: &HashMap<String, String>, name: &str) -> SqlResult<RecordBatch> {
    let schema = show_variable_schema(name)?;
    if name == "all" {
        let rows = session::show_all(metadata);
        let (mut names, mut values, mut descriptions) = (vec![], vec![], vec![]);
        for (n, v, d) in rows {
            names.push(Some(n));
            values.push(Some(v));
            descriptions.push(Some(d));
        }
        return Ok(text_batch(schema, vec![names, values, descriptions]));
    }
    let (_, value) = session::show(metadata, name)?;
    Ok(text_batch(schema, vec![vec![Some(value)]]))
}
