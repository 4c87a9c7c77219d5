//! Flink's functions between time and text or numbers. Patterns are Java's
//! ('yyyy-MM-dd HH:mm:ss'); time-zone-dependent answers use the session time zone.

use std::fmt::Write;
use std::sync::Arc;

use chrono::format::{Fixed, Item, Numeric};
use chrono::{DateTime, NaiveDate, NaiveDateTime, Offset, TimeZone};
use datafusion::arrow::array::timezone::Tz;
use datafusion::arrow::array::{
    Array, Date32Array, Float64Array, Int64Array, StringArray, StringBuilder,
    TimestampMicrosecondArray, TimestampMillisecondArray,
};
use datafusion::arrow::datatypes::{DataType, TimeUnit};
use datafusion::common::Result;
use datafusion::logical_expr::{ColumnarValue, ScalarFunctionArgs};
use datafusion::scalar::ScalarValue;

use super::java_format::{self, parse_default_timestamp, Format};
use super::{
    invalid_argument, literal_int, session_time_zone, Arg, FlinkFunction, Inputs, Memo, Param,
};

/// Flink's TIMESTAMP_LTZ(3), the type of PROCTIME() too.
fn timestamp_ltz() -> DataType {
    DataType::Timestamp(TimeUnit::Millisecond, Some("UTC".into()))
}

pub(super) fn all() -> Vec<FlinkFunction> {
    use Param::*;
    vec![
        FlinkFunction::new(
            "date_format",
            "DATE_FORMAT(TIMESTAMP or STRING, STRING)",
            &[TemporalOrStr, Str],
            2,
            |_, _| Ok(DataType::Utf8),
            date_format,
        ),
        FlinkFunction::new(
            "to_timestamp",
            "TO_TIMESTAMP(STRING [, STRING])",
            &[Str, Str],
            1,
            |_, _| Ok(DataType::Timestamp(TimeUnit::Millisecond, None)),
            to_timestamp,
        ),
        FlinkFunction::new(
            "to_timestamp_ltz",
            "TO_TIMESTAMP_LTZ(NUMERIC [, INT])",
            &[Number, Int],
            1,
            |_, scalars| {
                if let Some(p) = literal_int(scalars, 1) {
                    precision_scale(p)?;
                }
                Ok(timestamp_ltz())
            },
            to_timestamp_ltz,
        ),
        FlinkFunction::new(
            "unix_timestamp",
            "UNIX_TIMESTAMP([STRING [, STRING]])",
            &[Str, Str],
            0,
            |_, _| Ok(DataType::Int64),
            unix_timestamp,
        )
        .volatile(),
        FlinkFunction::new(
            "from_unixtime",
            "FROM_UNIXTIME(BIGINT [, STRING])",
            &[Number, Str],
            1,
            |_, _| Ok(DataType::Utf8),
            from_unixtime,
        ),
        FlinkFunction::new(
            "to_date",
            "TO_DATE(STRING [, STRING])",
            &[Str, Str],
            1,
            |_, _| Ok(DataType::Date32),
            to_date,
        ),
    ]
}

const DEFAULT_FORMAT: &str = "yyyy-MM-dd HH:mm:ss";

fn utc() -> Tz {
    "+00:00".parse().expect("a valid offset")
}

/// The format of row `row`: the call's pattern argument at `i`, or `default`.
struct Formats<'a> {
    patterns: Option<Arg<'a, StringArray>>,
    default: &'static str,
    memo: Memo<Format>,
}

impl<'a> Formats<'a> {
    fn new(inputs: &'a Inputs, i: usize, default: &'static str) -> Result<Self> {
        Ok(Self {
            patterns: inputs.optional::<StringArray>(i)?,
            default,
            memo: Memo::new(),
        })
    }

    /// None when the row's pattern is NULL.
    fn get(&mut self, row: usize) -> Result<Option<&Format>> {
        let pattern = match self.patterns {
            Some(p) if p.is_null(row) => return Ok(None),
            Some(p) => p.value(row),
            None => self.default,
        };
        self.memo
            .get(pattern, java_format::compile)
            .map(|format| Some(&*format))
    }
}

/// Formats times into a column, remembering the last text: rows in time order share
/// their second, and a format without fractions of a second gives one text per second.
struct Formatter<'a> {
    out: StringBuilder,
    zone: &'a Tz,
    /// The second (or microsecond) and format of `text`; holding the format keeps it
    /// from being freed and another taking its address.
    last: Option<(i64, Format)>,
    text: String,
}

impl<'a> Formatter<'a> {
    fn new(rows: usize, zone: &'a Tz) -> Self {
        Self {
            out: StringBuilder::with_capacity(rows, rows * 20),
            zone,
            last: None,
            text: String::new(),
        }
    }

    /// Appends `t` (microseconds) formatted by `format`.
    fn append(&mut self, t: i64, format: &Format) -> Result<()> {
        let key = if varies_within_second(format) {
            t
        } else {
            t.div_euclid(1_000_000)
        };
        let same = self
            .last
            .as_ref()
            .is_some_and(|(k, f)| *k == key && Arc::ptr_eq(f, format));
        if !same {
            let time = DateTime::from_timestamp_micros(t)
                .ok_or_else(|| invalid_argument("timestamp out of range"))?
                .with_timezone(self.zone);
            self.text.clear();
            write!(self.text, "{}", time.format_with_items(format.iter())).map_err(|_| {
                invalid_argument(
                    "date format has a field this value lacks (a time zone for a TIMESTAMP?)",
                )
            })?;
            self.last = Some((key, format.clone()));
        }
        self.out.append_value(&self.text);
        Ok(())
    }

    fn append_null(&mut self) {
        self.out.append_null();
    }

    fn finish(mut self) -> datafusion::arrow::array::StringArray {
        self.out.finish()
    }
}

/// Whether `format` shows fractions of a second.
fn varies_within_second(format: &Format) -> bool {
    format.iter().any(|item| {
        matches!(
            item,
            Item::Numeric(Numeric::Nanosecond, _)
                | Item::Fixed(
                    Fixed::Nanosecond
                        | Fixed::Nanosecond3
                        | Fixed::Nanosecond6
                        | Fixed::Nanosecond9
                        | Fixed::Internal(_)
                )
        )
    })
}

/// `DATE_FORMAT(ts, format)`: a TIMESTAMP as it reads, a TIMESTAMP_LTZ in the session time
/// zone, a STRING parsed as 'yyyy-MM-dd HH:mm:ss[.fraction]' first (NULL if it is not).
fn date_format(args: &ScalarFunctionArgs) -> Result<ColumnarValue> {
    let inputs = Inputs::new(args)?;
    let mut formats = Formats::new(&inputs, 1, DEFAULT_FORMAT)?;
    let value = inputs.input(0);
    let zone = match value.array.data_type() {
        DataType::Timestamp(_, Some(_)) => session_time_zone(args)?,
        _ => utc(),
    };
    let mut out = Formatter::new(inputs.rows, &zone);
    if let DataType::Utf8 = value.array.data_type() {
        let text = value.arg::<StringArray>()?;
        for row in 0..inputs.rows {
            let time = (!text.is_null(row))
                .then(|| parse_default_timestamp(text.value(row)))
                .flatten();
            match (time, formats.get(row)?) {
                (Some(t), Some(f)) => out.append(t.and_utc().timestamp_micros(), f)?,
                _ => out.append_null(),
            }
        }
    } else {
        let ts = value.arg::<TimestampMicrosecondArray>()?;
        for row in 0..inputs.rows {
            match formats.get(row)? {
                Some(f) if !ts.is_null(row) => out.append(ts.value(row), f)?,
                _ => out.append_null(),
            }
        }
    }
    inputs.output(Arc::new(out.finish()))
}

/// `TO_TIMESTAMP(str [, format])`: TIMESTAMP(3), NULL when the text does not parse.
/// Like Flink, text that does not fit the format is tried as 'yyyy-MM-dd HH:mm:ss[.f]'.
fn to_timestamp(args: &ScalarFunctionArgs) -> Result<ColumnarValue> {
    let inputs = Inputs::new(args)?;
    let text = inputs.arg::<StringArray>(0)?;
    let has_format = inputs.len() > 1;
    let mut formats = Formats::new(&inputs, 1, DEFAULT_FORMAT)?;
    let out = (0..inputs.rows)
        .map(|row| {
            if text.is_null(row) {
                return Ok(None);
            }
            let text = text.value(row);
            let parsed = if has_format {
                let Some(format) = formats.get(row)? else {
                    return Ok(None);
                };
                java_format::parse(text, format, true)
                    .map(|(t, _)| t)
                    .or_else(|| parse_default_timestamp(text))
            } else {
                parse_default_timestamp(text)
            };
            Ok(parsed.map(|t| t.and_utc().timestamp_millis()))
        })
        .collect::<Result<TimestampMillisecondArray>>()?;
    inputs.output(Arc::new(out))
}

/// Flink's TIMESTAMP range: years 0000 to 9999, in epoch milliseconds.
const MIN_MILLIS: i64 = -62_167_219_200_000;
const MAX_MILLIS: i64 = 253_402_300_799_999;

/// Milliseconds per unit of the epoch number for a TO_TIMESTAMP_LTZ precision.
fn precision_scale(precision: i64) -> Result<i64> {
    match precision {
        0 => Ok(1000),
        3 => Ok(1),
        p => Err(invalid_argument(format!(
            "TO_TIMESTAMP_LTZ: precision {p} is not supported; use 0 (epoch seconds) or 3 (epoch milliseconds)"
        ))),
    }
}

/// `TO_TIMESTAMP_LTZ(epoch [, precision])`: epoch seconds (0) or milliseconds (3, the
/// default) as TIMESTAMP_LTZ(3); NULL outside years 0000 to 9999.
fn to_timestamp_ltz(args: &ScalarFunctionArgs) -> Result<ColumnarValue> {
    let inputs = Inputs::new(args)?;
    let precision = inputs.optional::<Int64Array>(1)?;
    let epoch = inputs.input(0);
    let (integers, numbers) = match epoch.array.data_type() {
        DataType::Int64 => (Some(epoch.arg::<Int64Array>()?), None),
        _ => (None, Some(epoch.arg::<Float64Array>()?)),
    };
    let millis = |row: usize, scale: i64| -> Option<i64> {
        let ms = match (integers, numbers) {
            (Some(integers), _) => integers.value(row).checked_mul(scale),
            (_, Some(numbers)) => {
                let ms = numbers.value(row) * scale as f64;
                ms.is_finite().then_some(ms as i64)
            }
            (None, None) => None,
        };
        ms.filter(|ms| (MIN_MILLIS..=MAX_MILLIS).contains(ms))
    };
    let out = (0..inputs.rows)
        .map(|row| {
            if epoch.is_null(row) || precision.is_some_and(|p| p.is_null(row)) {
                return Ok(None);
            }
            let scale = precision_scale(precision.map_or(3, |p| p.value(row)))?;
            Ok(millis(row, scale))
        })
        .collect::<Result<TimestampMillisecondArray>>()?
        .with_timezone("UTC");
    inputs.output(Arc::new(out))
}

/// `UNIX_TIMESTAMP()`: now, in epoch seconds. `UNIX_TIMESTAMP(str [, format])`: the text
/// read in the session time zone (or the offset it names), Long.MIN_VALUE when it does
/// not parse, as Flink answers. Text after the pattern is ignored (SimpleDateFormat).
fn unix_timestamp(args: &ScalarFunctionArgs) -> Result<ColumnarValue> {
    if args.args.is_empty() {
        return Ok(ColumnarValue::Scalar(ScalarValue::Int64(Some(
            chrono::Utc::now().timestamp(),
        ))));
    }
    let inputs = Inputs::new(args)?;
    let zone = session_time_zone(args)?;
    let text = inputs.arg::<StringArray>(0)?;
    let mut formats = Formats::new(&inputs, 1, DEFAULT_FORMAT)?;
    let out = (0..inputs.rows)
        .map(|row| {
            let format = formats.get(row)?;
            let (Some(format), false) = (format, text.is_null(row)) else {
                return Ok(None);
            };
            let seconds = match java_format::parse(text.value(row), format, false) {
                Some((local, Some(offset))) => local.and_utc().timestamp() - i64::from(offset),
                Some((local, None)) => local_to_utc(&zone, local).and_utc().timestamp(),
                None => i64::MIN,
            };
            Ok(Some(seconds))
        })
        .collect::<Result<Int64Array>>()?;
    inputs.output(Arc::new(out))
}

/// The UTC time of a wall-clock time in `zone`; in a daylight-saving gap, the offset
/// from before the gap applies.
fn local_to_utc(zone: &Tz, local: NaiveDateTime) -> NaiveDateTime {
    match zone.from_local_datetime(&local).earliest() {
        Some(t) => t.naive_utc(),
        None => local - zone.offset_from_utc_datetime(&local).fix(),
    }
}

/// `FROM_UNIXTIME(seconds [, format])`: the time in the session time zone, as text.
fn from_unixtime(args: &ScalarFunctionArgs) -> Result<ColumnarValue> {
    let inputs = Inputs::new(args)?;
    let zone = session_time_zone(args)?;
    let seconds = inputs.cast(0, &DataType::Int64)?;
    let seconds = seconds.arg::<Int64Array>()?;
    let mut formats = Formats::new(&inputs, 1, DEFAULT_FORMAT)?;
    let mut out = Formatter::new(inputs.rows, &zone);
    for row in 0..inputs.rows {
        let format = formats.get(row)?;
        match (format, seconds.is_null(row)) {
            (Some(f), false) => {
                let micros = seconds
                    .value(row)
                    .checked_mul(1_000_000)
                    .ok_or_else(|| invalid_argument("FROM_UNIXTIME: seconds out of range"))?;
                out.append(micros, f)?;
            }
            _ => out.append_null(),
        }
    }
    inputs.output(Arc::new(out.finish()))
}

/// `TO_DATE(str [, format])`: a DATE, NULL when the text does not parse. Without a
/// format the text is 'yyyy-MM-dd' (a time after it is ignored).
fn to_date(args: &ScalarFunctionArgs) -> Result<ColumnarValue> {
    let inputs = Inputs::new(args)?;
    let text = inputs.arg::<StringArray>(0)?;
    let has_format = inputs.len() > 1;
    let mut formats = Formats::new(&inputs, 1, DEFAULT_FORMAT)?;
    let epoch = NaiveDate::from_ymd_opt(1970, 1, 1).expect("valid");
    let out = (0..inputs.rows)
        .map(|row| {
            if text.is_null(row) {
                return Ok(None);
            }
            let parsed = if has_format {
                let Some(format) = formats.get(row)? else {
                    return Ok(None);
                };
                java_format::parse(text.value(row), format, false).map(|(t, _)| t)
            } else {
                parse_default_timestamp(text.value(row))
            };
            Ok(parsed.and_then(|t| i32::try_from((t.date() - epoch).num_days()).ok()))
        })
        .collect::<Result<Date32Array>>()?;
    inputs.output(Arc::new(out))
}

#[cfg(test)]
mod tests {
    use super::super::test_util::{query, query_in};

    #[tokio::test]
    async fn formats_timestamps_with_java_patterns() {
        assert_eq!(
            query("SELECT date_format(TIMESTAMP '2023-11-14 09:05:03.123', 'yyyy-MM-dd''T''HH:mm:ss.SSS EEE MMM a')").await,
            ["2023-11-14T09:05:03.123 Tue Nov AM"]
        );
        assert_eq!(
            query("SELECT date_format('2023-11-14 21:05:03', 'yyyyMMdd h:mm')").await,
            ["20231114 9:05"]
        );
    }

    #[tokio::test]
    async fn local_time_zone_applies_to_ltz_values() {
        assert_eq!(
            query_in("SELECT from_unixtime(44)", Some("Asia/Tokyo")).await,
            ["1970-01-01 09:00:44"]
        );
        assert_eq!(
            query_in(
                "SELECT unix_timestamp('1970-01-01 08:00:01.001', 'yyyy-MM-dd HH:mm:ss.SSS')",
                Some("Europe/Berlin")
            )
            .await,
            ["25201"]
        );
        assert_eq!(
            query_in(
                "SELECT date_format(to_timestamp_ltz(0, 0), 'yyyy-MM-dd HH:mm')",
                Some("+08:00")
            )
            .await,
            ["1970-01-01 08:00"]
        );
    }
}
