//! Column types as Flink SQL names them, and the Arrow types Weir stores them as.

use std::fmt;

use arrow::datatypes::{DataType, IntervalUnit, TimeUnit};
use serde::{Deserialize, Serialize};

/// A column type of a Weir table, kept in the catalog in this form so `SHOW CREATE TABLE`
/// gives back what the user wrote.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum SqlType {
    Boolean,
    TinyInt,
    SmallInt,
    Int,
    BigInt,
    Float,
    Double,
    Decimal {
        precision: u8,
        scale: i8,
    },
    Char(u32),
    /// `None` is Flink's `STRING` (VARCHAR of maximal length).
    Varchar(Option<u32>),
    Bytes,
    Date,
    Time(u8),
    Timestamp(u8),
    TimestampLtz(u8),
    Interval,
}

/// Flink's default precisions.
pub const DEFAULT_TIME_PRECISION: u8 = 0;
pub const DEFAULT_TIMESTAMP_PRECISION: u8 = 6;
/// DECIMAL without arguments is DECIMAL(10, 0), as in Flink.
pub const DEFAULT_DECIMAL_PARTS: (u64, i64) = (10, 0);

fn time_unit(precision: u8) -> TimeUnit {
    match precision {
        0..=3 => TimeUnit::Millisecond,
        4..=6 => TimeUnit::Microsecond,
        _ => TimeUnit::Nanosecond,
    }
}

impl SqlType {
    pub fn to_arrow(&self) -> DataType {
        match self {
            SqlType::Boolean => DataType::Boolean,
            SqlType::TinyInt => DataType::Int8,
            SqlType::SmallInt => DataType::Int16,
            SqlType::Int => DataType::Int32,
            SqlType::BigInt => DataType::Int64,
            SqlType::Float => DataType::Float32,
            SqlType::Double => DataType::Float64,
            SqlType::Decimal { precision, scale } => DataType::Decimal128(*precision, *scale),
            SqlType::Char(_) | SqlType::Varchar(_) => DataType::Utf8,
            SqlType::Bytes => DataType::Binary,
            SqlType::Date => DataType::Date32,
            SqlType::Time(p) => match time_unit(*p) {
                TimeUnit::Nanosecond => DataType::Time64(TimeUnit::Nanosecond),
                _ => DataType::Time64(TimeUnit::Microsecond),
            },
            SqlType::Timestamp(p) => DataType::Timestamp(time_unit(*p), None),
            SqlType::TimestampLtz(p) => DataType::Timestamp(time_unit(*p), Some("UTC".into())),
            SqlType::Interval => DataType::Interval(IntervalUnit::MonthDayNano),
        }
    }

    /// The Weir type a computed column of this Arrow type is shown as.
    pub fn from_arrow(data_type: &DataType) -> Option<SqlType> {
        let precision = |unit: &TimeUnit| match unit {
            TimeUnit::Second => 0,
            TimeUnit::Millisecond => 3,
            TimeUnit::Microsecond => 6,
            TimeUnit::Nanosecond => 9,
        };
        Some(match data_type {
            DataType::Boolean => SqlType::Boolean,
            DataType::Int8 => SqlType::TinyInt,
            DataType::Int16 => SqlType::SmallInt,
            DataType::Int32 => SqlType::Int,
            DataType::Int64 => SqlType::BigInt,
            DataType::Float32 => SqlType::Float,
            DataType::Float64 => SqlType::Double,
            DataType::Decimal128(p, s) => SqlType::Decimal {
                precision: *p,
                scale: *s,
            },
            DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View => SqlType::Varchar(None),
            DataType::Binary | DataType::LargeBinary | DataType::BinaryView => SqlType::Bytes,
            DataType::Date32 | DataType::Date64 => SqlType::Date,
            DataType::Time32(u) | DataType::Time64(u) => SqlType::Time(precision(u)),
            DataType::Timestamp(u, None) => SqlType::Timestamp(precision(u)),
            DataType::Timestamp(u, Some(_)) => SqlType::TimestampLtz(precision(u)),
            DataType::Interval(_) => SqlType::Interval,
            _ => return None,
        })
    }
}

impl fmt::Display for SqlType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SqlType::Boolean => write!(f, "BOOLEAN"),
            SqlType::TinyInt => write!(f, "TINYINT"),
            SqlType::SmallInt => write!(f, "SMALLINT"),
            SqlType::Int => write!(f, "INT"),
            SqlType::BigInt => write!(f, "BIGINT"),
            SqlType::Float => write!(f, "FLOAT"),
            SqlType::Double => write!(f, "DOUBLE"),
            SqlType::Decimal { precision, scale } => write!(f, "DECIMAL({precision}, {scale})"),
            SqlType::Char(n) => write!(f, "CHAR({n})"),
            SqlType::Varchar(Some(n)) => write!(f, "VARCHAR({n})"),
            SqlType::Varchar(None) => write!(f, "STRING"),
            SqlType::Bytes => write!(f, "BYTES"),
            SqlType::Date => write!(f, "DATE"),
            SqlType::Time(p) => write!(f, "TIME({p})"),
            SqlType::Timestamp(p) => write!(f, "TIMESTAMP({p})"),
            SqlType::TimestampLtz(p) => write!(f, "TIMESTAMP_LTZ({p})"),
            SqlType::Interval => write!(f, "INTERVAL"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_pick_the_unit_from_the_precision() {
        assert_eq!(
            SqlType::Timestamp(3).to_arrow(),
            DataType::Timestamp(TimeUnit::Millisecond, None)
        );
        assert_eq!(
            SqlType::TimestampLtz(6).to_arrow(),
            DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into()))
        );
        assert_eq!(
            SqlType::from_arrow(&SqlType::Timestamp(9).to_arrow()),
            Some(SqlType::Timestamp(9))
        );
    }

    #[test]
    fn display_uses_flink_names() {
        assert_eq!(SqlType::Varchar(None).to_string(), "STRING");
        assert_eq!(
            SqlType::Decimal {
                precision: 12,
                scale: 2
            }
            .to_string(),
            "DECIMAL(12, 2)"
        );
    }
}
