//! The 'debezium-json' format: change events as Debezium writes them, one JSON object
//! each — `{"before": {...}|null, "after": {...}|null, "op": "c"|"r"|"u"|"d", ...}`,
//! inside `{"schema": ..., "payload": {...}}` with 'debezium-json.schema-include'.
//!
//! As in Flink, a create or snapshot read (`c`, `r`) is +I of `after`, an update (`u`)
//! is -U of `before` then +U of `after`, a delete (`d`) is -D of `before`. The envelope is
//! decoded by Arrow's JSON reader as a struct per image, so values parse exactly as the
//! 'json' format parses them; other envelope fields (`source`, `ts_ms`, ...) are ignored.

use std::sync::Arc;

use arrow::array::{Array, ArrayRef, AsArray, Int8Array, StructArray};
use arrow::compute::interleave;
use arrow::datatypes::{DataType, Field, Fields, Schema, SchemaRef};
use arrow::record_batch::{RecordBatch, RecordBatchOptions};
use weir_catalog::{op, TableDef};

use super::factory::opt_bool;
use crate::sql::error::SqlResult;
use crate::stream::message::ChangeBatch;

pub const SCHEMA_INCLUDE: &str = "debezium-json.schema-include";
pub const IGNORE_PARSE_ERRORS: &str = "debezium-json.ignore-parse-errors";

#[derive(Debug, Clone)]
pub struct Debezium {
    /// The table's physical columns: what each image holds.
    schema: SchemaRef,
    /// What Arrow's JSON reader decodes each record into.
    envelope: SchemaRef,
    schema_include: bool,
}

impl Debezium {
    pub fn new(def: &TableDef) -> SqlResult<Self> {
        let schema = def.physical_schema();
        // Images may be null (no `before` on a create), so their columns are nullable
        // here; NOT NULL is checked on the images a change uses.
        let image = DataType::Struct(Fields::from(
            schema
                .fields()
                .iter()
                .map(|f| f.as_ref().clone().with_nullable(true))
                .collect::<Vec<_>>(),
        ));
        let change = vec![
            Field::new("before", image.clone(), true),
            Field::new("after", image, true),
            Field::new("op", DataType::Utf8, true),
        ];
        let schema_include = opt_bool(def, SCHEMA_INCLUDE)?;
        let envelope = if schema_include {
            Schema::new(vec![Field::new(
                "payload",
                DataType::Struct(Fields::from(change)),
                true,
            )])
        } else {
            Schema::new(change)
        };
        Ok(Self {
            schema,
            envelope: Arc::new(envelope),
            schema_include,
        })
    }

    pub fn envelope_schema(&self) -> &SchemaRef {
        &self.envelope
    }

    /// The changes decoded envelopes make. A record that is no valid change event goes
    /// to `bad` with its row and what is wrong; `bad` fails the read or lets it skip.
    pub fn changes(
        &self,
        envelopes: &RecordBatch,
        mut bad: impl FnMut(usize, String) -> SqlResult<()>,
    ) -> SqlResult<ChangeBatch> {
        let n = envelopes.num_rows();
        let change: StructArray = if self.schema_include {
            let payload = envelopes.column(0).as_struct().clone();
            if payload.null_count() > 0 {
                for i in (0..n).filter(|&i| payload.is_null(i)) {
                    bad(
                        i,
                        "no \"payload\" in a record while 'debezium-json.schema-include' is \
                         'true'"
                            .into(),
                    )?;
                }
            }
            payload
        } else {
            StructArray::from(envelopes.clone())
        };
        let before = change.column(0).as_struct();
        let after = change.column(1).as_struct();
        let ops = change.column(2).as_string::<i32>();
        // (image, row) of every output row: image 0 is `before`, 1 is `after`.
        let mut picks: Vec<(usize, usize)> = Vec::with_capacity(n);
        let mut codes: Vec<i8> = Vec::with_capacity(n);
        for i in 0..n {
            if change.is_null(i) {
                continue;
            }
            let images: &[(usize, i8)] = match ops.is_valid(i).then(|| ops.value(i)) {
                Some("c" | "r") => &[(1, op::INSERT)],
                Some("u") => &[(0, op::UPDATE_BEFORE), (1, op::UPDATE_AFTER)],
                Some("d") => &[(0, op::DELETE)],
                Some(other) => {
                    bad(
                        i,
                        format!("unknown \"op\" '{other}'; expected 'c', 'r', 'u' or 'd'"),
                    )?;
                    continue;
                }
                None => {
                    let hint = if self.schema_include {
                        ""
                    } else {
                        " (records inside {\"schema\": ..., \"payload\": ...} need \
                         'debezium-json.schema-include' = 'true')"
                    };
                    bad(i, format!("no \"op\" field{hint}"))?;
                    continue;
                }
            };
            if let Some(problem) = images
                .iter()
                .find_map(|&(image, _)| self.invalid_image(before, after, image, i))
            {
                bad(i, problem)?;
                continue;
            }
            for &(image, code) in images {
                picks.push((image, i));
                codes.push(code);
            }
        }
        let columns = (0..self.schema.fields().len())
            .map(|j| {
                let sources: [&dyn Array; 2] =
                    [before.column(j).as_ref(), after.column(j).as_ref()];
                interleave(&sources, &picks)
            })
            .collect::<Result<Vec<ArrayRef>, _>>()?;
        let rows = RecordBatch::try_new_with_options(
            self.schema.clone(),
            columns,
            &RecordBatchOptions::new().with_row_count(Some(picks.len())),
        )?;
        let mut batch = ChangeBatch::new(rows);
        if codes.iter().any(|&c| c != op::INSERT) {
            batch.ops = Some(Int8Array::from(codes));
        }
        Ok(batch)
    }

    /// What is wrong with image `image` of record `i`, if anything.
    fn invalid_image(
        &self,
        before: &StructArray,
        after: &StructArray,
        image: usize,
        i: usize,
    ) -> Option<String> {
        let (values, name) = if image == 0 {
            (before, "before")
        } else {
            (after, "after")
        };
        if values.is_null(i) {
            let why = if image == 0 {
                " (a Debezium Postgres connector needs REPLICA IDENTITY FULL on the table)"
            } else {
                ""
            };
            return Some(format!("\"{name}\" is null{why}"));
        }
        self.schema
            .fields()
            .iter()
            .enumerate()
            .find(|(j, f)| !f.is_nullable() && values.column(*j).is_null(i))
            .map(|(_, f)| {
                format!(
                    "null value in NOT NULL column \"{}\" of \"{name}\"",
                    f.name()
                )
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::connector::factory::test_util::table;
    use crate::sql::error::SqlError;
    use arrow::array::{Int32Array, StringArray};
    use weir_catalog::SqlType;

    fn decode(d: &Debezium, text: &str) -> RecordBatch {
        let mut decoder = arrow::json::ReaderBuilder::new(d.envelope_schema().clone())
            .build_decoder()
            .unwrap();
        decoder.decode(text.as_bytes()).unwrap();
        decoder.flush().unwrap().unwrap()
    }

    /// (op, id, name) of each row.
    fn rows(c: &ChangeBatch) -> Vec<(i8, i32, Option<String>)> {
        let id = c
            .rows
            .column(0)
            .as_any()
            .downcast_ref::<Int32Array>()
            .unwrap();
        let name = c
            .rows
            .column(1)
            .as_any()
            .downcast_ref::<StringArray>()
            .unwrap();
        (0..c.num_rows())
            .map(|i| {
                (
                    c.ops.as_ref().map_or(0, |o| o.value(i)),
                    id.value(i),
                    name.is_valid(i).then(|| name.value(i).to_string()),
                )
            })
            .collect()
    }

    fn cols() -> Vec<(&'static str, SqlType)> {
        vec![("id", SqlType::Int), ("name", SqlType::Varchar(None))]
    }

    #[test]
    fn each_op_becomes_flinks_changes() {
        let d = Debezium::new(&table(&cols(), &[])).unwrap();
        let text = r#"{"before": null, "after": {"id": 1, "name": "a"}, "op": "c", "ts_ms": 5}
{"after": {"id": 2, "name": "b"}, "op": "r", "source": {"db": "x"}}
{"before": {"id": 1, "name": "a"}, "after": {"id": 1, "name": "A"}, "op": "u"}
{"before": {"id": 2, "name": "b"}, "after": null, "op": "d"}
"#;
        let c = d.changes(&decode(&d, text), |_, m| panic!("{m}")).unwrap();
        assert_eq!(
            rows(&c),
            vec![
                (op::INSERT, 1, Some("a".into())),
                (op::INSERT, 2, Some("b".into())),
                (op::UPDATE_BEFORE, 1, Some("a".into())),
                (op::UPDATE_AFTER, 1, Some("A".into())),
                (op::DELETE, 2, Some("b".into())),
            ]
        );
        // Creates alone need no ops.
        let c = d
            .changes(&decode(&d, r#"{"after": {"id": 3}, "op": "c"}"#), |_, m| {
                panic!("{m}")
            })
            .unwrap();
        assert!(c.ops.is_none());
        assert_eq!(rows(&c), vec![(op::INSERT, 3, None)]);
    }

    #[test]
    fn the_payload_envelope_is_read_with_schema_include() {
        let def = table(&cols(), &[(SCHEMA_INCLUDE, "true")]);
        let d = Debezium::new(&def).unwrap();
        let text = r#"{"schema": {"type": "struct"}, "payload": {"before": {"id": 7, "name": "x"}, "after": null, "op": "d"}}"#;
        let c = d.changes(&decode(&d, text), |_, m| panic!("{m}")).unwrap();
        assert_eq!(rows(&c), vec![(op::DELETE, 7, Some("x".into()))]);
    }

    #[test]
    fn bad_events_are_reported_with_their_row() {
        let mut def = table(&cols(), &[]);
        def.columns[0].nullable = false;
        let d = Debezium::new(&def).unwrap();
        let text = r#"{"after": {"id": 1}, "op": "c"}
{"after": {"id": 2}, "op": "x"}
{"after": {"id": 3}}
{"before": null, "after": {"id": 4}, "op": "u"}
{"after": {"name": "no id"}, "op": "c"}
{"schema": {}, "payload": {"after": {"id": 6}, "op": "c"}}
{"before": {"id": 7}, "op": "d"}
"#;
        let mut reported = vec![];
        let c = d
            .changes(&decode(&d, text), |row, m| {
                reported.push((row, m));
                Ok(())
            })
            .unwrap();
        assert_eq!(rows(&c), vec![(op::INSERT, 1, None), (op::DELETE, 7, None)]);
        let rows: Vec<usize> = reported.iter().map(|r| r.0).collect();
        assert_eq!(rows, vec![1, 2, 3, 4, 5]);
        assert!(
            reported[0].1.contains("unknown \"op\" 'x'"),
            "{}",
            reported[0].1
        );
        assert!(reported[1].1.contains("no \"op\""), "{}", reported[1].1);
        assert!(
            reported[2].1.contains("\"before\" is null"),
            "{}",
            reported[2].1
        );
        assert!(
            reported[3].1.contains("NOT NULL column \"id\""),
            "{}",
            reported[3].1
        );
        assert!(
            reported[4].1.contains("schema-include"),
            "{}",
            reported[4].1
        );
        // Failing on the first bad event stops the read.
        let e = d
            .changes(&decode(&d, text), |row, m| {
                Err(SqlError::new("22P02", format!("row {row}: {m}")))
            })
            .unwrap_err();
        assert!(e.message.starts_with("row 1:"), "{}", e.message);
    }
}
