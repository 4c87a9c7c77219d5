//! Flink SQL type names, as sqlparser reads them, to Weir's column types.

use datafusion::sql::sqlparser::ast::{CharacterLength, DataType, ExactNumberInfo, TimezoneInfo};
use weir_catalog::SqlType;

use super::error::{sqlstate, SqlError, SqlResult};

const VALID_TYPES: &str = "BOOLEAN, TINYINT, SMALLINT, INT, BIGINT, FLOAT, REAL, DOUBLE, \
    DECIMAL(p, s), CHAR(n), VARCHAR(n), STRING, TEXT, BYTES, BYTEA, DATE, TIME(p), \
    TIMESTAMP(p), TIMESTAMP_LTZ(p), TIMESTAMPTZ, INTERVAL";

pub fn sql_type(data_type: &DataType) -> SqlResult<SqlType> {
    use weir_catalog::SqlType as T;
    let precision = |p: &Option<u64>, default: u8| -> SqlResult<u8> {
        match p {
            None => Ok(default),
            Some(p) if *p <= 9 => Ok(*p as u8),
            Some(p) => Err(bad(format!(
                "precision {p} is out of range 0..9 in {data_type}"
            ))),
        }
    };
    Ok(match data_type {
        DataType::Boolean | DataType::Bool => T::Boolean,
        DataType::TinyInt(_) => T::TinyInt,
        DataType::SmallInt(_) | DataType::Int2(_) => T::SmallInt,
        DataType::Int(_) | DataType::Integer(_) | DataType::Int4(_) => T::Int,
        DataType::BigInt(_) | DataType::Int8(_) => T::BigInt,
        DataType::Real | DataType::Float4 => T::Float,
        DataType::Float(info) => match info {
            ExactNumberInfo::Precision(p) if *p > 24 => T::Double,
            _ => T::Float,
        },
        DataType::Double(_) | DataType::DoublePrecision | DataType::Float8 => T::Double,
        DataType::Decimal(info) | DataType::Numeric(info) | DataType::Dec(info) => {
            let (precision, scale) = match info {
                ExactNumberInfo::None => weir_catalog::DEFAULT_DECIMAL_PARTS,
                ExactNumberInfo::Precision(p) => (*p, 0),
                ExactNumberInfo::PrecisionAndScale(p, s) => (*p, *s),
            };
            if !(1..=38).contains(&precision) || scale < 0 || scale as u64 > precision {
                return Err(bad(format!(
                    "{data_type} is out of range: precision must be 1..38 and scale 0..precision"
                )));
            }
            T::Decimal {
                precision: precision as u8,
                scale: scale as i8,
            }
        }
        DataType::Char(len) | DataType::Character(len) => T::Char(length(len)?.unwrap_or(1)),
        DataType::Varchar(len) | DataType::CharacterVarying(len) | DataType::CharVarying(len) => {
            T::Varchar(length(len)?)
        }
        DataType::String(_) | DataType::Text => T::Varchar(None),
        DataType::Bytes(_) | DataType::Bytea | DataType::Varbinary(_) | DataType::Binary(_) => {
            T::Bytes
        }
        DataType::Date => T::Date,
        DataType::Time(p, TimezoneInfo::None | TimezoneInfo::WithoutTimeZone) => {
            T::Time(precision(p, weir_catalog::DEFAULT_TIME_PRECISION)?)
        }
        DataType::Timestamp(p, TimezoneInfo::None | TimezoneInfo::WithoutTimeZone) => {
            T::Timestamp(precision(p, weir_catalog::DEFAULT_TIMESTAMP_PRECISION)?)
        }
        DataType::Timestamp(p, TimezoneInfo::WithTimeZone | TimezoneInfo::Tz) => {
            T::TimestampLtz(precision(p, weir_catalog::DEFAULT_TIMESTAMP_PRECISION)?)
        }
        DataType::Interval { .. } => T::Interval,
        DataType::Custom(name, args) => custom_type(&name.to_string(), args)?,
        other => {
            return Err(bad(format!(
                "type {other} is not supported; valid types are: {VALID_TYPES}"
            )))
        }
    })
}

/// Names sqlparser does not know as types (Flink's TIMESTAMP_LTZ, STRING variants).
fn custom_type(name: &str, args: &[String]) -> SqlResult<SqlType> {
    let precision = || -> SqlResult<u8> {
        match args {
            [] => Ok(weir_catalog::DEFAULT_TIMESTAMP_PRECISION),
            [p] => p
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= 9)
                .ok_or_else(|| bad(format!("precision {p} is out of range 0..9 in {name}"))),
            _ => Err(bad(format!("{name} takes one precision argument"))),
        }
    };
    match name.to_ascii_uppercase().as_str() {
        "TIMESTAMP_LTZ" | "TIMESTAMPTZ" => Ok(SqlType::TimestampLtz(precision()?)),
        "VARBINARY" => Ok(SqlType::Bytes),
        _ => Err(bad(format!(
            "type {name} is not supported; valid types are: {VALID_TYPES}"
        ))),
    }
}

fn length(len: &Option<CharacterLength>) -> SqlResult<Option<u32>> {
    match len {
        None => Ok(None),
        Some(CharacterLength::IntegerLength { length, .. }) => u32::try_from(*length)
            .ok()
            .filter(|l| *l > 0)
            .map(Some)
            .ok_or_else(|| bad(format!("length {length} is out of range"))),
        Some(CharacterLength::Max) => Ok(None),
    }
}

fn bad(message: String) -> SqlError {
    SqlError::new(sqlstate::UNDEFINED_OBJECT, message)
}
