//! Time units and the functions that count in them: TIMESTAMPADD, TIMESTAMPDIFF and
//! FLOOR / CEIL(ts TO unit) (which Weir's parser rewrites to TIMESTAMP_FLOOR /
//! TIMESTAMP_CEIL). Values are computed as microseconds since the epoch.

use std::sync::Arc;

use chrono::{DateTime, Datelike, Months, NaiveDate, NaiveDateTime, Offset, TimeZone};
use datafusion::arrow::array::{Array, Int32Array, Int64Array, TimestampMicrosecondArray};
use datafusion::arrow::compute::cast;
use datafusion::arrow::datatypes::{DataType, TimeUnit};
use datafusion::common::Result;
use datafusion::logical_expr::{ColumnarValue, ScalarFunctionArgs};
use datafusion::scalar::ScalarValue;

use super::{
    invalid_argument, literal_str, micros_type, session_time_zone, FlinkFunction, Inputs, Param,
};

pub(super) fn all() -> Vec<FlinkFunction> {
    use Param::*;
    vec![
        FlinkFunction::new(
            "timestampadd",
            "TIMESTAMPADD(unit, INT, TIMESTAMP)",
            &[Str, Int, Temporal],
            3,
            |types, scalars| {
                let unit = literal_unit("TIMESTAMPADD", scalars)?;
                Ok(match &types[2] {
                    DataType::Date32 if unit.is_sub_day() => {
                        DataType::Timestamp(TimeUnit::Millisecond, None)
                    }
                    other => other.clone(),
                })
            },
            timestampadd,
        ),
        FlinkFunction::new(
            "timestampdiff",
            "TIMESTAMPDIFF(unit, TIMESTAMP, TIMESTAMP)",
            &[Str, Temporal, Temporal],
            3,
            |_, scalars| {
                literal_unit("TIMESTAMPDIFF", scalars)?;
                Ok(DataType::Int32)
            },
            timestampdiff,
        ),
        FlinkFunction::new(
            "timestamp_floor",
            "FLOOR(TIMESTAMP TO unit)",
            &[Str, Temporal],
            2,
            |types, scalars| {
                literal_unit("FLOOR", scalars)?;
                Ok(types[1].clone())
            },
            |args| round(args, "FLOOR", floor),
        ),
        FlinkFunction::new(
            "timestamp_ceil",
            "CEIL(TIMESTAMP TO unit)",
            &[Str, Temporal],
            2,
            |types, scalars| {
                literal_unit("CEIL", scalars)?;
                Ok(types[1].clone())
            },
            |args| round(args, "CEIL", ceil),
        ),
    ]
}

const SECOND: i64 = 1_000_000;
const DAY: i64 = 86_400 * SECOND;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unit {
    Second,
    Minute,
    Hour,
    Day,
    Week,
    Month,
    Quarter,
    Year,
}

const UNITS: &str = "SECOND, MINUTE, HOUR, DAY, WEEK, MONTH, QUARTER or YEAR";

impl Unit {
    /// A unit by its SQL name (Calcite's SQL_TSI_ prefix allowed), in any case.
    pub fn parse(name: &str) -> Option<Self> {
        let upper = name.trim().to_ascii_uppercase();
        Some(match upper.strip_prefix("SQL_TSI_").unwrap_or(&upper) {
            "SECOND" => Unit::Second,
            "MINUTE" => Unit::Minute,
            "HOUR" => Unit::Hour,
            "DAY" => Unit::Day,
            "WEEK" => Unit::Week,
            "MONTH" => Unit::Month,
            "QUARTER" => Unit::Quarter,
            "YEAR" => Unit::Year,
            _ => return None,
        })
    }

    /// Microseconds in one unit, for units of fixed length.
    fn micros(self) -> Option<i64> {
        Some(match self {
            Unit::Second => SECOND,
            Unit::Minute => 60 * SECOND,
            Unit::Hour => 3600 * SECOND,
            Unit::Day => DAY,
            Unit::Week => 7 * DAY,
            Unit::Month | Unit::Quarter | Unit::Year => return None,
        })
    }

    /// Months in one unit, for the others.
    fn months(self) -> i64 {
        match self {
            Unit::Quarter => 3,
            Unit::Year => 12,
            _ => 1,
        }
    }

    fn is_sub_day(self) -> bool {
        matches!(self, Unit::Second | Unit::Minute | Unit::Hour)
    }
}

fn unknown_unit(function: &str, name: &str) -> datafusion::error::DataFusionError {
    invalid_argument(format!(
        "{function}: unknown time unit '{name}'; use {UNITS}"
    ))
}

/// The unit of a call, which must be written as a keyword (a literal after rewriting).
fn literal_unit(function: &str, scalars: &[Option<&ScalarValue>]) -> Result<Unit> {
    match literal_str(scalars, 0) {
        Some(name) => Unit::parse(name).ok_or_else(|| unknown_unit(function, name)),
        None => Err(invalid_argument(format!(
            "{function}: the time unit must be a keyword: {UNITS}"
        ))),
    }
}

fn unit_argument(function: &str, args: &ScalarFunctionArgs) -> Result<Unit> {
    match &args.args[0] {
        ColumnarValue::Scalar(
            ScalarValue::Utf8(Some(name))
            | ScalarValue::LargeUtf8(Some(name))
            | ScalarValue::Utf8View(Some(name)),
        ) => Unit::parse(name).ok_or_else(|| unknown_unit(function, name)),
        _ => Err(invalid_argument(format!(
            "{function}: the time unit must be a keyword: {UNITS}"
        ))),
    }
}

fn to_naive(t: i64) -> Option<NaiveDateTime> {
    DateTime::from_timestamp_micros(t).map(|d| d.naive_utc())
}

fn from_naive(t: NaiveDateTime) -> i64 {
    t.and_utc().timestamp_micros()
}

/// `t + n units`; months are added on the calendar, a day past the end of the month
/// becoming its last day (Jan 31 + 1 month = Feb 28 or 29).
pub fn add(unit: Unit, n: i64, t: i64) -> Option<i64> {
    if let Some(u) = unit.micros() {
        return t.checked_add(n.checked_mul(u)?);
    }
    let months = u32::try_from(n.checked_mul(unit.months())?.unsigned_abs()).ok()?;
    let time = to_naive(t)?;
    let moved = if n >= 0 {
        time.checked_add_months(Months::new(months))?
    } else {
        time.checked_sub_months(Months::new(months))?
    };
    Some(from_naive(moved))
}

/// Whole units from `from` to `to`, negative when `to` is earlier (truncated toward zero,
/// as Flink does).
pub fn diff(unit: Unit, from: i64, to: i64) -> Option<i64> {
    match unit.micros() {
        Some(u) => Some(to.checked_sub(from)? / u),
        None => Some(whole_months(from, to)? / unit.months()),
    }
}

fn whole_months(from: i64, to: i64) -> Option<i64> {
    if to < from {
        return whole_months(to, from).map(|m| -m);
    }
    let (a, b) = (to_naive(from)?, to_naive(to)?);
    let mut months =
        i64::from(b.year() - a.year()) * 12 + i64::from(b.month()) - i64::from(a.month());
    if add(Unit::Month, months, from)? > to {
        months -= 1;
    }
    Some(months)
}

/// The start of the unit `t` is in. Weeks start on Sunday, as in Flink.
pub fn floor(unit: Unit, t: i64) -> Option<i64> {
    let day = t.div_euclid(DAY);
    let date = |d: NaiveDate| Some(from_naive(d.and_hms_opt(0, 0, 0)?));
    match unit {
        Unit::Week => {
            // 1970-01-01 was a Thursday.
            let since_sunday = (day + 4).rem_euclid(7);
            (day - since_sunday).checked_mul(DAY)
        }
        Unit::Month | Unit::Quarter | Unit::Year => {
            let d = to_naive(t)?.date();
            let month = match unit {
                Unit::Month => d.month(),
                Unit::Quarter => (d.month() - 1) / 3 * 3 + 1,
                _ => 1,
            };
            date(NaiveDate::from_ymd_opt(d.year(), month, 1)?)
        }
        _ => {
            let u = unit.micros()?;
            t.div_euclid(u).checked_mul(u)
        }
    }
}

/// The end of the unit `t` is in; `t` itself when it starts a unit.
pub fn ceil(unit: Unit, t: i64) -> Option<i64> {
    let start = floor(unit, t)?;
    if start == t {
        Some(t)
    } else {
        add(unit, 1, start)
    }
}

fn timestampadd(args: &ScalarFunctionArgs) -> Result<ColumnarValue> {
    let unit = unit_argument("TIMESTAMPADD", args)?;
    let inputs = Inputs::new(args)?;
    let n = inputs.arg::<Int64Array>(1)?;
    let ty = micros_type(inputs.input(2).array.data_type());
    let ts = inputs.cast(2, &ty)?;
    let ts = ts.arg::<TimestampMicrosecondArray>()?;
    let out = (0..inputs.rows)
        .map(|row| {
            if n.is_null(row) || ts.is_null(row) {
                return Ok(None);
            }
            add(unit, n.value(row), ts.value(row))
                .map(Some)
                .ok_or_else(|| out_of_range("TIMESTAMPADD"))
        })
        .collect::<Result<TimestampMicrosecondArray>>()?;
    let out = timestamps_as(out, &ty, args.return_type())?;
    inputs.output(out)
}

fn out_of_range(function: &str) -> datafusion::error::DataFusionError {
    invalid_argument(format!("{function}: result is out of range"))
}

/// Microsecond timestamps (in `micros`' time zone) cast to `ty`.
fn timestamps_as(
    values: TimestampMicrosecondArray,
    micros: &DataType,
    ty: &DataType,
) -> Result<Arc<dyn Array>> {
    let tz = match micros {
        DataType::Timestamp(_, tz) => tz.clone(),
        _ => None,
    };
    Ok(cast(&values.with_timezone_opt(tz), ty)?)
}

fn timestampdiff(args: &ScalarFunctionArgs) -> Result<ColumnarValue> {
    let unit = unit_argument("TIMESTAMPDIFF", args)?;
    let inputs = Inputs::new(args)?;
    let micros = |i: usize| inputs.cast(i, &micros_type(inputs.input(i).array.data_type()));
    let (from, to) = (micros(1)?, micros(2)?);
    let (from, to) = (
        from.arg::<TimestampMicrosecondArray>()?,
        to.arg::<TimestampMicrosecondArray>()?,
    );
    let out = (0..inputs.rows)
        .map(|row| {
            if from.is_null(row) || to.is_null(row) {
                return Ok(None);
            }
            diff(unit, from.value(row), to.value(row))
                .and_then(|d| i32::try_from(d).ok())
                .map(Some)
                .ok_or_else(|| {
                    invalid_argument(format!(
                        "TIMESTAMPDIFF: the number of {unit:?}s does not fit in an INT; use a larger unit"
                    ))
                })
        })
        .collect::<Result<Int32Array>>()?;
    inputs.output(Arc::new(out))
}

/// FLOOR or CEIL to a unit. A TIMESTAMP_LTZ is rounded in the session time zone (its
/// days start at local midnight), as Flink does.
fn round(
    args: &ScalarFunctionArgs,
    name: &str,
    to: fn(Unit, i64) -> Option<i64>,
) -> Result<ColumnarValue> {
    let unit = unit_argument(name, args)?;
    let inputs = Inputs::new(args)?;
    let ty = micros_type(inputs.input(1).array.data_type());
    let local = matches!(&ty, DataType::Timestamp(_, Some(_)));
    let zone = session_time_zone(args)?;
    let ts = inputs.cast(1, &ty)?;
    let ts = ts.arg::<TimestampMicrosecondArray>()?;
    let out = (0..inputs.rows)
        .map(|row| {
            if ts.is_null(row) {
                return Ok(None);
            }
            let t = ts.value(row);
            let offset = if local {
                let utc = to_naive(t).ok_or_else(|| out_of_range(name))?;
                i64::from(zone.offset_from_utc_datetime(&utc).fix().local_minus_utc()) * SECOND
            } else {
                0
            };
            to(unit, t + offset)
                .map(|r| Some(r - offset))
                .ok_or_else(|| out_of_range(name))
        })
        .collect::<Result<TimestampMicrosecondArray>>()?;
    let out = timestamps_as(out, &ty, args.return_type())?;
    inputs.output(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: &str) -> i64 {
        from_naive(NaiveDateTime::parse_from_str(s, "%Y-%m-%d %H:%M:%S%.f").unwrap())
    }

    #[test]
    fn parses_units() {
        assert_eq!(Unit::parse("second"), Some(Unit::Second));
        assert_eq!(Unit::parse("SQL_TSI_QUARTER"), Some(Unit::Quarter));
        assert_eq!(Unit::parse("fortnight"), None);
    }

    #[test]
    fn adds_fixed_and_calendar_units() {
        let jan31 = t("2024-01-31 10:00:00");
        assert_eq!(add(Unit::Second, 90, jan31), Some(t("2024-01-31 10:01:30")));
        assert_eq!(add(Unit::Day, -31, jan31), Some(t("2023-12-31 10:00:00")));
        assert_eq!(add(Unit::Week, 1, jan31), Some(t("2024-02-07 10:00:00")));
        assert_eq!(add(Unit::Month, 1, jan31), Some(t("2024-02-29 10:00:00")));
        assert_eq!(
            add(Unit::Quarter, -1, jan31),
            Some(t("2023-10-31 10:00:00"))
        );
        assert_eq!(
            add(Unit::Year, 1, t("2024-02-29 00:00:00")),
            Some(t("2025-02-28 00:00:00"))
        );
        assert_eq!(add(Unit::Second, i64::MAX, jan31), None);
    }

    #[test]
    fn diffs_count_whole_units_toward_zero() {
        let a = t("2024-01-31 10:00:00");
        assert_eq!(diff(Unit::Hour, a, t("2024-01-31 12:59:59")), Some(2));
        assert_eq!(diff(Unit::Hour, t("2024-01-31 12:59:59"), a), Some(-2));
        assert_eq!(diff(Unit::Day, a, t("2024-02-01 09:59:59")), Some(0));
        assert_eq!(diff(Unit::Month, a, t("2024-02-29 10:00:00")), Some(1));
        assert_eq!(diff(Unit::Month, a, t("2024-02-29 09:59:59")), Some(0));
        assert_eq!(diff(Unit::Month, t("2024-02-29 09:59:59"), a), Some(0));
        assert_eq!(diff(Unit::Month, t("2024-03-31 10:00:00"), a), Some(-2));
        assert_eq!(diff(Unit::Quarter, a, t("2024-07-30 00:00:00")), Some(1));
        assert_eq!(diff(Unit::Year, a, t("2026-01-31 09:00:00")), Some(1));
        assert_eq!(diff(Unit::Year, t("2026-01-31 09:00:00"), a), Some(-1));
    }

    #[test]
    fn floors_and_ceils() {
        let x = t("2023-11-15 10:20:30.5");
        assert_eq!(floor(Unit::Second, x), Some(t("2023-11-15 10:20:30")));
        assert_eq!(floor(Unit::Hour, x), Some(t("2023-11-15 10:00:00")));
        // 2023-11-15 is a Wednesday; Flink's weeks start on Sunday.
        assert_eq!(floor(Unit::Week, x), Some(t("2023-11-12 00:00:00")));
        assert_eq!(floor(Unit::Quarter, x), Some(t("2023-10-01 00:00:00")));
        assert_eq!(ceil(Unit::Minute, x), Some(t("2023-11-15 10:21:00")));
        assert_eq!(ceil(Unit::Month, x), Some(t("2023-12-01 00:00:00")));
        assert_eq!(ceil(Unit::Year, x), Some(t("2024-01-01 00:00:00")));
        let boundary = t("2023-11-01 00:00:00");
        assert_eq!(ceil(Unit::Month, boundary), Some(boundary));
        assert_eq!(ceil(Unit::Day, boundary), Some(boundary));
        // Before 1970, floors still go down.
        assert_eq!(
            floor(Unit::Day, t("1969-12-31 23:00:00")),
            Some(t("1969-12-31 00:00:00"))
        );
        assert_eq!(
            floor(Unit::Week, t("1970-01-01 00:00:00")),
            Some(t("1969-12-28 00:00:00"))
        );
    }
}
