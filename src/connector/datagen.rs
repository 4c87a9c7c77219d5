//! Flink's `datagen` connector: random or sequence values per column, at
//! `'rows-per-second'`, optionally bounded by `'number-of-rows'` or by sequence ends.
//!
//! Rows are numbered 0, 1, 2, ... over the whole table; split k of n produces rows
//! k, k+n, k+2n, ... ([`Share`], which also carries a position over to another number
//! of splits). A sequence column's value in row g is `start + g`, and a random value
//! is drawn from a generator seeded by the row number, the column and the table's seed
//! (`'seed'`, random when not given): with a seed the table's rows are the same whatever
//! the number of splits, and a restored reader repeats exactly what it produced before.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use datafusion::arrow::array::{
    ArrayRef, BinaryBuilder, BooleanArray, Date32Array, Decimal128Array, Float64Array, Int64Array,
    IntervalMonthDayNanoArray, StringBuilder,
};
use datafusion::arrow::compute::cast;
use datafusion::arrow::datatypes::{DataType, IntervalMonthDayNano, SchemaRef, TimeUnit};
use datafusion::arrow::record_batch::{RecordBatch, RecordBatchOptions};
use datafusion::common::Result;
use rand::rngs::SmallRng;
use rand::{RngExt, SeedableRng};
use weir_catalog::{SqlType, TableDef};

use super::factory::{invalid, opt_u64, to_df, Throttle};
use super::io::SplitReader;
use super::share::Share;
use crate::sql::error::{SqlError, SqlResult};
use crate::stream::message::ChangeBatch;

const DEFAULT_ROWS_PER_SECOND: u64 = 10_000;
const DEFAULT_STRING_LENGTH: u64 = 100;
const FIELD_PROPERTIES: &[&str] = &[
    "kind",
    "min",
    "max",
    "length",
    "start",
    "end",
    "null-rate",
    "max-past",
];

#[derive(Debug, Clone)]
enum Spec {
    Sequence {
        start: i64,
        end: i64,
    },
    Int {
        min: i64,
        max: i64,
    },
    Float {
        min: f64,
        max: f64,
    },
    /// Unscaled bounds.
    Decimal {
        min: i128,
        max: i128,
    },
    Bool,
    Str {
        len: usize,
    },
    Bytes {
        len: usize,
    },
    /// DATE, TIME, TIMESTAMP: now minus up to `max_past_ms`.
    Time {
        max_past_ms: i64,
    },
    Interval,
}

#[derive(Debug, Clone)]
struct FieldGen {
    data_type: DataType,
    null_rate: f64,
    spec: Spec,
}

pub struct DatagenReader {
    schema: SchemaRef,
    fields: Vec<FieldGen>,
    seed: u64,
    /// Rows over all splits; `u64::MAX` = unbounded.
    total: u64,
    /// The row numbers this split produces; its current unit is the next row.
    share: Share<()>,
    batch_size: usize,
    throttle: Throttle,
}

fn int_range(t: &SqlType) -> Option<(i64, i64)> {
    Some(match t {
        SqlType::TinyInt => (i8::MIN as i64, i8::MAX as i64),
        SqlType::SmallInt => (i16::MIN as i64, i16::MAX as i64),
        SqlType::Int => (i32::MIN as i64, i32::MAX as i64),
        SqlType::BigInt => (i64::MIN, i64::MAX),
        _ => return None,
    })
}

impl DatagenReader {
    pub fn is_bounded(def: &TableDef) -> bool {
        def.options.contains_key("number-of-rows")
            || def
                .options
                .iter()
                .any(|(k, v)| k.starts_with("fields.") && k.ends_with(".kind") && v == "sequence")
    }

    pub fn open(def: &TableDef, split: usize, splits: usize, batch_size: usize) -> SqlResult<Self> {
        // fields.<column>.<property>, by column.
        let mut props: BTreeMap<&str, BTreeMap<&str, &str>> = BTreeMap::new();
        for (key, value) in &def.options {
            let Some(rest) = key.strip_prefix("fields.") else {
                continue;
            };
            let Some((column, prop)) = rest.rsplit_once('.') else {
                return Err(invalid(format!(
                    "option '{key}' should be 'fields.<column>.<property>'"
                )));
            };
            if !def.columns.iter().any(|c| c.name == column) {
                let names: Vec<&str> = def.columns.iter().map(|c| c.name.as_str()).collect();
                return Err(invalid(format!(
                    "option '{key}' names column \"{column}\", which table \"{}\" does not \
                     have; its columns are: {}",
                    def.name,
                    names.join(", ")
                )));
            }
            if !FIELD_PROPERTIES.contains(&prop) {
                return Err(invalid(format!(
                    "unknown datagen property '{prop}' in option '{key}'; valid properties \
                     are: {}",
                    FIELD_PROPERTIES.join(", ")
                )));
            }
            props
                .entry(column)
                .or_default()
                .insert(prop, value.as_str());
        }
        let empty = BTreeMap::new();
        let mut total = opt_u64(def, "number-of-rows")?.unwrap_or(u64::MAX);
        let mut fields = Vec::new();
        for col in &def.columns {
            let p = props.get(col.name.as_str()).unwrap_or(&empty);
            let field = field_gen(&col.name, &col.data_type, col.nullable, p)?;
            if let Spec::Sequence { start, end } = field.spec {
                total = total.min((end as i128 - start as i128 + 1) as u64);
            }
            fields.push(field);
        }
        let rps = opt_u64(def, "rows-per-second")?.unwrap_or(DEFAULT_ROWS_PER_SECOND);
        if rps == 0 {
            return Err(invalid("option 'rows-per-second' must be greater than 0"));
        }
        let seed = match opt_u64(def, "seed")? {
            Some(s) => s,
            None => rand::random(),
        };
        Ok(Self {
            schema: def.physical_schema(),
            fields,
            seed,
            total,
            share: Share::new(split, splits),
            batch_size,
            throttle: Throttle::new(rps as f64 / splits as f64),
        })
    }

    fn remaining(&self) -> u64 {
        self.share.left_below(self.total)
    }

    fn rng(&self, row: u64, column: usize) -> SmallRng {
        let mut h = self.seed ^ row.wrapping_mul(0x9E37_79B9_7F4A_7C15);
        h ^= (column as u64 + 1).wrapping_mul(0xC2B2_AE3D_27D4_EB4F);
        SmallRng::seed_from_u64(h)
    }

    fn column(&self, c: usize, rows: &[u64], now_ms: i64) -> SqlResult<ArrayRef> {
        let f = &self.fields[c];
        // Per row: its generator, and whether it is null.
        let mut rngs: Vec<(SmallRng, bool)> = rows
            .iter()
            .map(|&g| {
                let mut rng = self.rng(g, c);
                let null = f.null_rate > 0.0 && rng.random::<f64>() < f.null_rate;
                (rng, null)
            })
            .collect();
        let array: ArrayRef = match &f.spec {
            Spec::Sequence { start, .. } => {
                let values = rows
                    .iter()
                    .zip(&rngs)
                    .map(|(&g, (_, null))| (!null).then_some(start.wrapping_add(g as i64)));
                match &f.data_type {
                    DataType::Utf8 => {
                        let mut b = StringBuilder::new();
                        for v in values {
                            b.append_option(v.map(|v| v.to_string()));
                        }
                        Arc::new(b.finish())
                    }
                    DataType::Decimal128(p, s) => {
                        let scale = 10i128.pow(*s as u32);
                        Arc::new(
                            Decimal128Array::from(
                                values
                                    .map(|v| v.map(|v| v as i128 * scale))
                                    .collect::<Vec<_>>(),
                            )
                            .with_precision_and_scale(*p, *s)?,
                        )
                    }
                    DataType::Float32 | DataType::Float64 => Arc::new(Float64Array::from(
                        values.map(|v| v.map(|v| v as f64)).collect::<Vec<_>>(),
                    )),
                    _ => Arc::new(Int64Array::from(values.collect::<Vec<_>>())),
                }
            }
            Spec::Int { min, max } => Arc::new(Int64Array::from(
                rngs.iter_mut()
                    .map(|(r, null)| (!*null).then(|| r.random_range(*min..=*max)))
                    .collect::<Vec<_>>(),
            )),
            Spec::Float { min, max } => Arc::new(Float64Array::from(
                rngs.iter_mut()
                    .map(|(r, null)| (!*null).then(|| min + (max - min) * r.random::<f64>()))
                    .collect::<Vec<_>>(),
            )),
            Spec::Decimal { min, max } => {
                let DataType::Decimal128(p, s) = f.data_type else {
                    unreachable!("decimal spec for a decimal column")
                };
                Arc::new(
                    Decimal128Array::from(
                        rngs.iter_mut()
                            .map(|(r, null)| (!*null).then(|| r.random_range(*min..=*max)))
                            .collect::<Vec<_>>(),
                    )
                    .with_precision_and_scale(p, s)?,
                )
            }
            Spec::Bool => Arc::new(BooleanArray::from(
                rngs.iter_mut()
                    .map(|(r, null)| (!*null).then(|| r.random::<bool>()))
                    .collect::<Vec<_>>(),
            )),
            Spec::Str { len } => {
                const HEX: &[u8; 16] = b"0123456789abcdef";
                let mut b = StringBuilder::with_capacity(rows.len(), rows.len() * len);
                let mut s = String::with_capacity(*len);
                for (r, null) in &mut rngs {
                    if *null {
                        b.append_null();
                        continue;
                    }
                    s.clear();
                    s.extend((0..*len).map(|_| HEX[r.random_range(0..16usize)] as char));
                    b.append_value(&s);
                }
                Arc::new(b.finish())
            }
            Spec::Bytes { len } => {
                let mut b = BinaryBuilder::new();
                let mut v = vec![0u8; *len];
                for (r, null) in &mut rngs {
                    if *null {
                        b.append_null();
                    } else {
                        r.fill(&mut v[..]);
                        b.append_value(&v);
                    }
                }
                Arc::new(b.finish())
            }
            Spec::Time { max_past_ms } => {
                let past = |r: &mut SmallRng| {
                    if *max_past_ms > 0 {
                        r.random_range(0..=*max_past_ms)
                    } else {
                        0
                    }
                };
                match &f.data_type {
                    DataType::Date32 => Arc::new(Date32Array::from(
                        rngs.iter_mut()
                            .map(|(r, null)| {
                                (!*null).then(|| ((now_ms - past(r)).div_euclid(86_400_000)) as i32)
                            })
                            .collect::<Vec<_>>(),
                    )),
                    DataType::Time64(unit) => {
                        let per_day = match unit {
                            TimeUnit::Nanosecond => 86_400_000_000_000i64,
                            _ => 86_400_000_000,
                        };
                        Arc::new(Int64Array::from(
                            rngs.iter_mut()
                                .map(|(r, null)| (!*null).then(|| r.random_range(0..per_day)))
                                .collect::<Vec<_>>(),
                        ))
                    }
                    DataType::Timestamp(unit, _) => {
                        let (mul, sub) = match unit {
                            TimeUnit::Second => (1, 0),
                            TimeUnit::Millisecond => (1, 0),
                            TimeUnit::Microsecond => (1_000, 1_000),
                            TimeUnit::Nanosecond => (1_000_000, 1_000_000),
                        };
                        Arc::new(Int64Array::from(
                            rngs.iter_mut()
                                .map(|(r, null)| {
                                    (!*null).then(|| {
                                        let ms = now_ms - past(r);
                                        // Sub-millisecond digits too, when the type has them.
                                        let frac = if sub > 0 { r.random_range(0..sub) } else { 0 };
                                        let v = ms * mul + frac;
                                        if matches!(unit, TimeUnit::Second) {
                                            v / 1000
                                        } else {
                                            v
                                        }
                                    })
                                })
                                .collect::<Vec<_>>(),
                        ))
                    }
                    other => {
                        return Err(SqlError::internal(format!(
                            "datagen time values for type {other}"
                        )))
                    }
                }
            }
            Spec::Interval => Arc::new(IntervalMonthDayNanoArray::from(
                rngs.iter_mut()
                    .map(|(r, null)| {
                        (!*null).then(|| {
                            IntervalMonthDayNano::new(0, 0, r.random_range(0..86_400_000_000_000))
                        })
                    })
                    .collect::<Vec<_>>(),
            )),
        };
        if array.data_type() == &f.data_type {
            Ok(array)
        } else {
            Ok(cast(&array, &f.data_type)?)
        }
    }

    fn batch(&self, rows: &[u64]) -> SqlResult<RecordBatch> {
        let now_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as i64)
            .unwrap_or(0);
        let columns = (0..self.fields.len())
            .map(|c| self.column(c, rows, now_ms))
            .collect::<SqlResult<Vec<_>>>()?;
        let options = RecordBatchOptions::new().with_row_count(Some(rows.len()));
        Ok(RecordBatch::try_new_with_options(
            self.schema.clone(),
            columns,
            &options,
        )?)
    }
}

fn field_gen(
    column: &str,
    t: &SqlType,
    nullable: bool,
    p: &BTreeMap<&str, &str>,
) -> SqlResult<FieldGen> {
    let key = |prop: &str| format!("fields.{column}.{prop}");
    let num = |prop: &str| -> SqlResult<Option<f64>> {
        p.get(prop)
            .map(|v| {
                v.trim().parse::<f64>().map_err(|_| {
                    invalid(format!(
                        "bad value '{v}' for option '{}'; expected a number",
                        key(prop)
                    ))
                })
            })
            .transpose()
    };
    let int = |prop: &str| -> SqlResult<Option<i64>> {
        p.get(prop)
            .map(|v| {
                v.trim().parse::<i64>().map_err(|_| {
                    invalid(format!(
                        "bad value '{v}' for option '{}'; expected an integer",
                        key(prop)
                    ))
                })
            })
            .transpose()
    };
    let null_rate = num("null-rate")?.unwrap_or(0.0);
    if !(0.0..=1.0).contains(&null_rate) {
        return Err(invalid(format!(
            "option '{}' must be between 0 and 1",
            key("null-rate")
        )));
    }
    if null_rate > 0.0 && !nullable {
        return Err(invalid(format!(
            "option '{}' gives NULLs to column \"{column}\", which is NOT NULL",
            key("null-rate")
        )));
    }
    let kind = p.get("kind").copied().unwrap_or("random");
    let used: &[&str] = match kind {
        "sequence" => &["kind", "start", "end", "null-rate"],
        "random" => match t {
            SqlType::Char(_) | SqlType::Varchar(_) | SqlType::Bytes => {
                &["kind", "length", "null-rate"]
            }
            SqlType::Date | SqlType::Time(_) | SqlType::Timestamp(_) | SqlType::TimestampLtz(_) => {
                &["kind", "max-past", "null-rate"]
            }
            SqlType::Boolean | SqlType::Interval => &["kind", "null-rate"],
            _ => &["kind", "min", "max", "null-rate"],
        },
        other => {
            return Err(invalid(format!(
                "bad value '{other}' for option '{}'; expected 'random' or 'sequence'",
                key("kind")
            )))
        }
    };
    if let Some(prop) = p.keys().find(|k| !used.contains(k)) {
        return Err(invalid(format!(
            "option '{}' does not apply to a {kind} {t} column; it takes: {}",
            key(prop),
            used.iter()
                .map(|u| format!("'{}'", key(u)))
                .collect::<Vec<_>>()
                .join(", ")
        )));
    }
    let spec = if kind == "sequence" {
        if !matches!(
            t,
            SqlType::TinyInt
                | SqlType::SmallInt
                | SqlType::Int
                | SqlType::BigInt
                | SqlType::Float
                | SqlType::Double
                | SqlType::Decimal { .. }
                | SqlType::Char(_)
                | SqlType::Varchar(_)
        ) {
            return Err(invalid(format!(
                "column \"{column}\" of type {t} cannot be a sequence; sequences are numbers \
                 or strings"
            )));
        }
        let (Some(start), Some(end)) = (int("start")?, int("end")?) else {
            return Err(invalid(format!(
                "a sequence column needs options '{}' and '{}'",
                key("start"),
                key("end")
            )));
        };
        if start > end {
            return Err(invalid(format!(
                "option '{}' ({start}) is greater than '{}' ({end})",
                key("start"),
                key("end")
            )));
        }
        if let Some((lo, hi)) = int_range(t) {
            if start < lo || end > hi {
                return Err(invalid(format!(
                    "sequence {start}..{end} of column \"{column}\" does not fit in {t}"
                )));
            }
        }
        Spec::Sequence { start, end }
    } else {
        match t {
            SqlType::TinyInt | SqlType::SmallInt | SqlType::Int | SqlType::BigInt => {
                let (lo, hi) = int_range(t).expect("integer type");
                let min = int("min")?.unwrap_or(lo);
                let max = int("max")?.unwrap_or(hi);
                if min > max || min < lo || max > hi {
                    return Err(invalid(format!(
                        "options '{}' and '{}' must give {min} <= {max}, within {t}",
                        key("min"),
                        key("max")
                    )));
                }
                Spec::Int { min, max }
            }
            SqlType::Float | SqlType::Double => {
                let hi = if *t == SqlType::Float {
                    f32::MAX as f64
                } else {
                    f64::MAX
                };
                let min = num("min")?.unwrap_or(0.0);
                let max = num("max")?.unwrap_or(hi);
                if min > max {
                    return Err(invalid(format!(
                        "option '{}' is greater than '{}'",
                        key("min"),
                        key("max")
                    )));
                }
                Spec::Float { min, max }
            }
            SqlType::Decimal { precision, scale } => {
                let limit = 10f64.powi(*precision as i32 - *scale as i32);
                let min = num("min")?.unwrap_or(-limit);
                let max = num("max")?.unwrap_or(limit);
                let factor = 10f64.powi(*scale as i32);
                let bound = 10i128.pow(*precision as u32) - 1;
                let min = ((min * factor).round() as i128).clamp(-bound, bound);
                let max = ((max * factor).round() as i128).clamp(-bound, bound);
                if min > max {
                    return Err(invalid(format!(
                        "option '{}' is greater than '{}'",
                        key("min"),
                        key("max")
                    )));
                }
                Spec::Decimal { min, max }
            }
            SqlType::Boolean => Spec::Bool,
            SqlType::Char(_) | SqlType::Varchar(_) | SqlType::Bytes => {
                let declared = match t {
                    SqlType::Char(n) | SqlType::Varchar(Some(n)) => Some(*n as u64),
                    _ => None,
                };
                let len = match int("length")? {
                    Some(l) if l < 0 => {
                        return Err(invalid(format!(
                            "option '{}' must not be negative",
                            key("length")
                        )))
                    }
                    Some(l) => l as u64,
                    None => {
                        declared.map_or(DEFAULT_STRING_LENGTH, |n| n.min(DEFAULT_STRING_LENGTH))
                    }
                };
                if declared.is_some_and(|n| len > n) {
                    return Err(invalid(format!(
                        "option '{}' = {len} is longer than column \"{column}\" of type {t}",
                        key("length")
                    )));
                }
                if *t == SqlType::Bytes {
                    Spec::Bytes { len: len as usize }
                } else {
                    Spec::Str { len: len as usize }
                }
            }
            SqlType::Date | SqlType::Time(_) | SqlType::Timestamp(_) | SqlType::TimestampLtz(_) => {
                let max_past = match p.get("max-past") {
                    None => 0,
                    Some(v) => super::options::parse_duration(v)
                        .ok_or_else(|| {
                            invalid(format!(
                                "bad value '{v}' for option '{}'; expected a duration such as '5 s'",
                                key("max-past")
                            ))
                        })?
                        .as_millis() as i64,
                };
                Spec::Time {
                    max_past_ms: max_past,
                }
            }
            SqlType::Interval => Spec::Interval,
        }
    };
    Ok(FieldGen {
        data_type: t.to_arrow(),
        null_rate,
        spec,
    })
}

#[async_trait]
impl SplitReader for DatagenReader {
    async fn next_batch(&mut self) -> Result<Option<ChangeBatch>> {
        let left = self.remaining();
        if left == 0 {
            return Ok(None);
        }
        let n = (self.batch_size as u64).min(self.throttle.step()).min(left);
        self.throttle.wait(n).await;
        let rows = self.share.take_units(n, self.total);
        if rows.is_empty() {
            return Ok(None);
        }
        let batch = self.batch(&rows).map_err(to_df)?;
        Ok(Some(ChangeBatch::new(batch)))
    }

    fn position(&self) -> Vec<u8> {
        self.share.position(())
    }

    fn restore(&mut self, position: &[u8]) -> Result<()> {
        self.share.restore(position).map_err(to_df)?;
        self.throttle.resume(self.share.passed());
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::connector::factory::test_util::{read_rescaled, table};
    use datafusion::arrow::array::{Array, AsArray};
    use datafusion::arrow::datatypes::{Int32Type, Int64Type, TimestampMillisecondType};

    async fn read_all(def: &TableDef, splits: usize, batch: usize) -> Vec<RecordBatch> {
        let mut out = vec![];
        for k in 0..splits {
            let mut r = DatagenReader::open(def, k, splits, batch).unwrap();
            while let Some(b) = r.next_batch().await.unwrap().map(|c| c.rows) {
                assert_eq!(b.schema(), def.physical_schema());
                out.push(b);
            }
        }
        out
    }

    fn all_types() -> Vec<(&'static str, SqlType)> {
        vec![
            ("b", SqlType::Boolean),
            ("ti", SqlType::TinyInt),
            ("si", SqlType::SmallInt),
            ("i", SqlType::Int),
            ("bi", SqlType::BigInt),
            ("f", SqlType::Float),
            ("d", SqlType::Double),
            (
                "dec",
                SqlType::Decimal {
                    precision: 8,
                    scale: 2,
                },
            ),
            ("c", SqlType::Char(5)),
            ("s", SqlType::Varchar(None)),
            ("by", SqlType::Bytes),
            ("dt", SqlType::Date),
            ("tm", SqlType::Time(3)),
            ("ts", SqlType::Timestamp(3)),
            ("ts6", SqlType::Timestamp(6)),
            ("ltz", SqlType::TimestampLtz(3)),
            ("iv", SqlType::Interval),
        ]
    }

    #[tokio::test]
    async fn every_type_and_number_of_rows() {
        let def = table(
            &all_types(),
            &[
                ("connector", "datagen"),
                ("number-of-rows", "1000"),
                ("rows-per-second", "1000000"),
                ("fields.i.min", "-5"),
                ("fields.i.max", "5"),
                ("fields.d.min", "1.5"),
                ("fields.d.max", "2.5"),
                ("fields.s.length", "7"),
                ("fields.ts.max-past", "1 min"),
                ("fields.bi.null-rate", "0.5"),
            ],
        );
        let batches = read_all(&def, 3, 128).await;
        let rows: usize = batches.iter().map(|b| b.num_rows()).sum();
        assert_eq!(rows, 1000);
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_millis() as i64;
        let mut nulls = 0;
        for b in &batches {
            let i = b.column(3).as_primitive::<Int32Type>();
            assert!(i.values().iter().all(|v| (-5..=5).contains(v)));
            let d = b
                .column(6)
                .as_primitive::<datafusion::arrow::datatypes::Float64Type>();
            assert!(d.values().iter().all(|v| (1.5..=2.5).contains(v)));
            assert!(b
                .column(8)
                .as_string::<i32>()
                .iter()
                .all(|v| v.unwrap().len() == 5));
            assert!(b
                .column(9)
                .as_string::<i32>()
                .iter()
                .all(|v| v.unwrap().len() == 7));
            let ts = b.column(13).as_primitive::<TimestampMillisecondType>();
            assert!(ts
                .values()
                .iter()
                .all(|v| (now - 61_000..=now + 1000).contains(v)));
            nulls += b.column(4).null_count();
            assert_eq!(b.column(3).null_count(), 0);
        }
        assert!((350..650).contains(&nulls), "{nulls}");
        assert!(DatagenReader::is_bounded(&def));
    }

    #[tokio::test]
    async fn rescaled_readers_produce_every_row_once() {
        // A sequence and a seeded random column: the same rows however the splits went.
        let def = table(
            &[("id", SqlType::BigInt), ("v", SqlType::Int)],
            &[
                ("connector", "datagen"),
                ("rows-per-second", "100000000"),
                ("seed", "3"),
                ("fields.id.kind", "sequence"),
                ("fields.id.start", "1"),
                ("fields.id.end", "2000"),
            ],
        );
        let straight = read_rescaled(&def, &[(1, 0)], 64).await;
        assert_eq!(straight.len(), 2000);
        // Splits read unevenly before each move (one none, one far ahead).
        for layouts in [
            &[(2, 3), (3, 0)][..],
            &[(2, 5), (3, 0), (2, 0), (4, 0)],
            &[(3, 2), (2, 1), (1, 2), (5, 0)],
        ] {
            assert_eq!(
                read_rescaled(&def, layouts, 64).await,
                straight,
                "{layouts:?}"
            );
        }
    }

    #[tokio::test]
    async fn sequences_bound_the_table_and_split_without_gaps() {
        let def = table(
            &[("id", SqlType::BigInt), ("name", SqlType::Varchar(None))],
            &[
                ("connector", "datagen"),
                ("rows-per-second", "1000000"),
                ("fields.id.kind", "sequence"),
                ("fields.id.start", "10"),
                ("fields.id.end", "109"),
                ("fields.name.kind", "sequence"),
                ("fields.name.start", "1"),
                ("fields.name.end", "1000"),
            ],
        );
        assert!(DatagenReader::is_bounded(&def));
        let batches = read_all(&def, 4, 7).await;
        let mut ids: Vec<i64> = batches
            .iter()
            .flat_map(|b| b.column(0).as_primitive::<Int64Type>().values().to_vec())
            .collect();
        ids.sort();
        assert_eq!(ids, (10..110).collect::<Vec<_>>());
        let first = &batches[0];
        assert_eq!(first.column(1).as_string::<i32>().value(1), "5");
        // number-of-rows below the sequence length wins.
        let mut opts: Vec<(&str, &str)> = def
            .options
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        opts.push(("number-of-rows", "30"));
        let cols = [("id", SqlType::BigInt), ("name", SqlType::Varchar(None))];
        let rows: usize = read_all(&table(&cols, &opts), 2, 100)
            .await
            .iter()
            .map(|b| b.num_rows())
            .sum();
        assert_eq!(rows, 30);
    }

    #[tokio::test]
    async fn seeded_tables_repeat_and_restore() {
        let cols = [("x", SqlType::BigInt), ("s", SqlType::Varchar(None))];
        let opts = [
            ("connector", "datagen"),
            ("number-of-rows", "100"),
            ("rows-per-second", "1000000"),
            ("seed", "42"),
        ];
        let def = table(&cols, &opts);
        let key = |bs: Vec<RecordBatch>| {
            let mut v: Vec<i64> = bs
                .iter()
                .flat_map(|b| b.column(0).as_primitive::<Int64Type>().values().to_vec())
                .collect();
            v.sort();
            v
        };
        let one = key(read_all(&def, 1, 10).await);
        assert_eq!(one, key(read_all(&def, 3, 10).await));
        let mut r = DatagenReader::open(&def, 0, 1, 10).unwrap();
        r.next_batch().await.unwrap();
        let pos = r.position();
        let b = r.next_batch().await.unwrap().map(|c| c.rows).unwrap();
        r.restore(&pos).unwrap();
        assert_eq!(r.next_batch().await.unwrap().map(|c| c.rows).unwrap(), b);
    }

    #[tokio::test]
    async fn unbounded_and_paced() {
        let def = table(
            &[("x", SqlType::Int)],
            &[("connector", "datagen"), ("rows-per-second", "100")],
        );
        assert!(!DatagenReader::is_bounded(&def));
        let mut r = DatagenReader::open(&def, 0, 1, 1000).unwrap();
        let start = std::time::Instant::now();
        let mut n = 0;
        while n < 30 {
            n += r
                .next_batch()
                .await
                .unwrap()
                .map(|c| c.rows)
                .unwrap()
                .num_rows();
        }
        assert!(start.elapsed() >= std::time::Duration::from_millis(200));
    }

    #[test]
    fn bad_options_say_what_to_change() {
        let cols = [("x", SqlType::Int), ("t", SqlType::Timestamp(3))];
        let open = |opts: &[(&str, &str)]| {
            DatagenReader::open(&table(&cols, opts), 0, 1, 10)
                .err()
                .unwrap()
                .message
        };
        assert!(open(&[("fields.y.kind", "random")]).contains("columns are: x, t"));
        assert!(open(&[("fields.x.kind", "sequence")]).contains("'fields.x.start'"));
        assert!(open(&[("fields.x.colour", "red")]).contains("unknown datagen property"));
        assert!(open(&[("fields.x.length", "3")]).contains("does not apply"));
        assert!(open(&[
            ("fields.t.kind", "sequence"),
            ("fields.t.start", "1"),
            ("fields.t.end", "2")
        ])
        .contains("cannot be a sequence"));
        assert!(open(&[("fields.x.min", "9"), ("fields.x.max", "1")]).contains("9 <= 1"));
        assert!(open(&[("fields.x.max", "99999999999")]).contains("within INT"));
    }
}
