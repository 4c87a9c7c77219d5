//! Flink SQL's built-in functions that DataFusion lacks or defines differently, with
//! Flink's semantics and result types (Flink's `sql_functions.yml` is the reference).
//!
//! Each function declares its parameters as [`Param`]s. DataFusion casts arguments to
//! what a parameter takes; arguments of a kind a parameter never takes are left alone
//! and rejected when the call is typed, so the client hears which call to fix instead of
//! DataFusion's generic coercion message. Functions work on whole Arrow arrays; when
//! every argument is a scalar they compute one row and answer a scalar.

mod java_format;
mod regex_groups;
mod string;
mod time;
mod units;

pub use regex_groups::GroupFinder;

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::{Arc, LazyLock, Mutex};

use datafusion::arrow::array::timezone::Tz;
use datafusion::arrow::array::{
    Array, ArrayRef, ArrowPrimitiveType, GenericByteArray, PrimitiveArray,
};
use datafusion::arrow::datatypes::ByteArrayType;
use datafusion::arrow::datatypes::{DataType, Field, FieldRef, TimeUnit};
use datafusion::common::{DataFusionError, Result};
use datafusion::logical_expr::{
    ColumnarValue, ReturnFieldArgs, ScalarFunctionArgs, ScalarUDF, ScalarUDFImpl, Signature,
    Volatility,
};
use datafusion::scalar::ScalarValue;

use super::error::{sqlstate, SqlError};

pub fn all() -> Vec<ScalarUDF> {
    [string::all(), time::all(), units::all()]
        .into_iter()
        .flatten()
        .map(ScalarUDF::from)
        .collect()
}

/// What one parameter of a Flink function takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Param {
    /// STRING: any string type, passed as Utf8.
    Str,
    /// An integer, passed as Int64.
    Int,
    /// An integer (passed as Int64) or an approximate or exact number (passed as Float64).
    Number,
    /// STRING or BOOLEAN or a number: IS_DIGIT and friends answer for any of them.
    Any,
    /// TIMESTAMP, TIMESTAMP_LTZ or DATE, passed as they are.
    Temporal,
    /// TIMESTAMP, TIMESTAMP_LTZ, DATE or STRING; temporal values as Timestamp(µs).
    TemporalOrStr,
}

impl Param {
    fn coerce(self, ty: &DataType) -> Option<DataType> {
        use DataType::*;
        let string = matches!(ty, Utf8 | LargeUtf8 | Utf8View);
        let timestamp = matches!(ty, Timestamp(..) | Date32 | Date64);
        match self {
            Param::Str if string || ty.is_null() => Some(Utf8),
            Param::Int if ty.is_integer() || ty.is_null() => Some(Int64),
            Param::Number if ty.is_integer() || ty.is_null() => Some(Int64),
            Param::Number if ty.is_floating() || ty.is_decimal() => Some(Float64),
            Param::Any => Some(if string || ty.is_null() {
                Utf8
            } else {
                ty.clone()
            }),
            Param::Temporal => match ty {
                Timestamp(..) | Date32 => Some(ty.clone()),
                Date64 => Some(Date32),
                Null => Some(Timestamp(TimeUnit::Millisecond, None)),
                _ => None,
            },
            Param::TemporalOrStr if string || ty.is_null() => Some(Utf8),
            Param::TemporalOrStr if timestamp => Some(micros_type(ty)),
            _ => None,
        }
    }
}

/// Timestamp(µs) in the time zone of `ty` (none for DATE and TIMESTAMP).
fn micros_type(ty: &DataType) -> DataType {
    match ty {
        DataType::Timestamp(_, tz) => DataType::Timestamp(TimeUnit::Microsecond, tz.clone()),
        _ => DataType::Timestamp(TimeUnit::Microsecond, None),
    }
}

/// The type of a call: its argument types after coercion, and those arguments that are
/// literals (time units, precisions).
type Returns = fn(&[DataType], &[Option<&ScalarValue>]) -> Result<DataType>;
type Invoke = fn(&ScalarFunctionArgs) -> Result<ColumnarValue>;

/// One Flink function: its parameters, how it is typed and how it runs.
#[derive(Debug)]
struct FlinkFunction {
    name: &'static str,
    /// How the client should write a call, for error messages: "SPLIT_INDEX(STRING, STRING, INT)".
    usage: &'static str,
    params: &'static [Param],
    /// How many of `params` a call must pass; the rest are optional.
    required: usize,
    signature: Signature,
    returns: Returns,
    invoke: Invoke,
}

impl FlinkFunction {
    fn new(
        name: &'static str,
        usage: &'static str,
        params: &'static [Param],
        required: usize,
        returns: Returns,
        invoke: Invoke,
    ) -> Self {
        Self {
            name,
            usage,
            params,
            required,
            signature: Signature::user_defined(Volatility::Immutable),
            returns,
            invoke,
        }
    }

    fn volatile(mut self) -> Self {
        self.signature = Signature::user_defined(Volatility::Volatile);
        self
    }

    /// The types to pass, or a message saying how to call the function.
    fn coerced(&self, types: &[DataType]) -> Result<Vec<DataType>, SqlError> {
        if types.len() < self.required || types.len() > self.params.len() {
            return Err(SqlError::new(
                sqlstate::UNDEFINED_FUNCTION,
                format!(
                    "{} takes {}, not {} argument{}",
                    self.usage,
                    arity(self.required, self.params.len()),
                    types.len(),
                    if types.len() == 1 { "" } else { "s" }
                ),
            ));
        }
        types
            .iter()
            .zip(self.params)
            .map(|(ty, param)| param.coerce(ty))
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| {
                let given: Vec<String> = types.iter().map(ToString::to_string).collect();
                SqlError::new(
                    sqlstate::DATATYPE_MISMATCH,
                    format!(
                        "cannot call {} with arguments ({}); cast the arguments to the types shown",
                        self.usage,
                        given.join(", ")
                    ),
                )
            })
    }
}

fn arity(required: usize, max: usize) -> String {
    match (required, max) {
        (r, m) if r == m => format!("{r} argument{}", if r == 1 { "" } else { "s" }),
        (r, m) => format!("{r} to {m} arguments"),
    }
}

// Functions compare by name: there is one of each.
impl PartialEq for FlinkFunction {
    fn eq(&self, other: &Self) -> bool {
        self.name == other.name
    }
}

impl Eq for FlinkFunction {}

impl Hash for FlinkFunction {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.name.hash(state);
    }
}

impl ScalarUDFImpl for FlinkFunction {
    fn name(&self) -> &str {
        self.name
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    /// Lenient on purpose: DataFusion would wrap an error from here in a message about
    /// its coercion machinery; `return_field_from_args` reports the mismatch instead.
    fn coerce_types(&self, types: &[DataType]) -> Result<Vec<DataType>> {
        Ok(self.coerced(types).unwrap_or_else(|_| types.to_vec()))
    }

    fn return_type(&self, _types: &[DataType]) -> Result<DataType> {
        Err(DataFusionError::Internal(format!(
            "{} is typed by return_field_from_args",
            self.name
        )))
    }

    fn return_field_from_args(&self, args: ReturnFieldArgs) -> Result<FieldRef> {
        let types: Vec<DataType> = args
            .arg_fields
            .iter()
            .map(|f| f.data_type().clone())
            .collect();
        let coerced = self.coerced(&types).map_err(external)?;
        let ty = (self.returns)(&coerced, args.scalar_arguments)?;
        Ok(Arc::new(Field::new(self.name, ty, true)))
    }

    fn invoke_with_args(&self, args: ScalarFunctionArgs) -> Result<ColumnarValue> {
        (self.invoke)(&args)
    }
}

/// A Weir error inside DataFusion's: it reaches the client with its own SQLSTATE.
fn external(e: SqlError) -> DataFusionError {
    DataFusionError::External(Box::new(e))
}

fn invalid_argument(message: impl Into<String>) -> DataFusionError {
    external(SqlError::new(sqlstate::INVALID_PARAMETER_VALUE, message))
}

/// The arguments of a call: one row when every argument is a scalar (the answer is then
/// a scalar too), else the batch's rows, where an argument given as one value (a literal
/// pattern, format or index) stays one value rather than being copied to every row.
struct Inputs {
    inputs: Vec<Input>,
    rows: usize,
    scalar: bool,
}

/// One argument: a column, or a one-row array whose value every row reads.
struct Input {
    array: ArrayRef,
    /// 1 for a column, 0 for one value: row `r` is at `r * step`.
    step: usize,
}

impl Input {
    fn is_null(&self, row: usize) -> bool {
        self.array.is_null(row * self.step)
    }

    /// The argument as an `A` (a StringArray, an Int64Array, ...), read by row.
    fn arg<A: Array + 'static>(&self) -> Result<Arg<'_, A>> {
        let array = self.array.as_any().downcast_ref::<A>().ok_or_else(|| {
            DataFusionError::Internal(format!(
                "a Flink function's argument is {}, not {}",
                self.array.data_type(),
                std::any::type_name::<A>()
            ))
        })?;
        Ok(Arg {
            array,
            step: self.step,
        })
    }
}

/// An argument's values by row.
struct Arg<'a, A> {
    array: &'a A,
    step: usize,
}

// Not derived: that would ask `A: Copy`, and only the reference is copied.
impl<A> Clone for Arg<'_, A> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<A> Copy for Arg<'_, A> {}

impl<A: Array> Arg<'_, A> {
    fn is_null(&self, row: usize) -> bool {
        self.array.is_null(row * self.step)
    }
}

impl<'a, T: ByteArrayType> Arg<'a, GenericByteArray<T>> {
    fn value(&self, row: usize) -> &'a T::Native {
        self.array.value(row * self.step)
    }
}

impl<T: ArrowPrimitiveType> Arg<'_, PrimitiveArray<T>> {
    fn value(&self, row: usize) -> T::Native {
        self.array.value(row * self.step)
    }
}

impl Inputs {
    fn new(args: &ScalarFunctionArgs) -> Result<Self> {
        let scalar = args
            .args
            .iter()
            .all(|a| matches!(a, ColumnarValue::Scalar(_)));
        let rows = if scalar { 1 } else { args.number_rows };
        let inputs = args
            .args
            .iter()
            .map(|a| {
                Ok(match a {
                    ColumnarValue::Array(array) => Input {
                        array: array.clone(),
                        step: 1,
                    },
                    ColumnarValue::Scalar(value) => Input {
                        array: value.to_array_of_size(1)?,
                        step: 0,
                    },
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            inputs,
            rows,
            scalar,
        })
    }

    /// How many arguments the call has.
    fn len(&self) -> usize {
        self.inputs.len()
    }

    fn input(&self, i: usize) -> &Input {
        &self.inputs[i]
    }

    /// Argument `i` as an `A`, read by row.
    fn arg<A: Array + 'static>(&self, i: usize) -> Result<Arg<'_, A>> {
        self.inputs[i].arg()
    }

    /// Argument `i` as an `A`, if the call has it.
    fn optional<A: Array + 'static>(&self, i: usize) -> Result<Option<Arg<'_, A>>> {
        self.inputs.get(i).map(Input::arg).transpose()
    }

    /// Argument `i` cast to `ty` (one value stays one value).
    fn cast(&self, i: usize, ty: &DataType) -> Result<Input> {
        let input = &self.inputs[i];
        Ok(Input {
            array: datafusion::arrow::compute::cast(&input.array, ty)?,
            step: input.step,
        })
    }

    fn output(&self, array: ArrayRef) -> Result<ColumnarValue> {
        debug_assert_eq!(array.len(), self.rows);
        Ok(if self.scalar {
            ColumnarValue::Scalar(ScalarValue::try_from_array(&array, 0)?)
        } else {
            ColumnarValue::Array(array)
        })
    }
}

/// Values built from a pattern (regexes, date formats) once per distinct pattern and
/// shared by every query. Patterns are almost always literals, so this stays small; it
/// is emptied should a query generate patterns from data.
struct Compiled<T> {
    map: LazyLock<Mutex<HashMap<String, T>>>,
}

impl<T: Clone> Compiled<T> {
    const MAX: usize = 1024;

    const fn new() -> Self {
        Self {
            map: LazyLock::new(|| Mutex::new(HashMap::new())),
        }
    }

    fn get(&self, pattern: &str, build: impl FnOnce(&str) -> Result<T>) -> Result<T> {
        let mut map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(v) = map.get(pattern) {
            return Ok(v.clone());
        }
        let v = build(pattern)?;
        if map.len() >= Self::MAX {
            map.clear();
        }
        map.insert(pattern.to_string(), v.clone());
        Ok(v)
    }
}

/// The last pattern a batch used and what it compiled to, so that a column processed
/// with one literal pattern looks it up once per batch, not once per row. Lives for one
/// call, while the arguments' buffers do: a literal's rows are the same bytes at the
/// same address, found equal without comparing them.
struct Memo<T> {
    last: Option<(String, *const u8, T)>,
}

impl<T> Memo<T> {
    fn new() -> Self {
        Self { last: None }
    }

    fn get(&mut self, pattern: &str, compile: impl FnOnce(&str) -> Result<T>) -> Result<&mut T> {
        let same = self.last.as_ref().is_some_and(|(p, at, _)| {
            (*at == pattern.as_ptr() && p.len() == pattern.len()) || p == pattern
        });
        if !same {
            let compiled = compile(pattern)?;
            self.last = Some((pattern.to_string(), pattern.as_ptr(), compiled));
        }
        Ok(&mut self.last.as_mut().expect("just set").2)
    }
}

/// The session's time zone (`datafusion.execution.time_zone`, which Flink's
/// `table.local-time-zone` sets); UTC when unset.
fn session_time_zone(args: &ScalarFunctionArgs) -> Result<Tz> {
    let name = args
        .config_options
        .execution
        .time_zone
        .as_deref()
        .unwrap_or("UTC");
    name.parse::<Tz>().map_err(|_| {
        invalid_argument(format!(
            "unknown session time zone '{name}'; use a region name such as 'Europe/Berlin' or an offset such as '+08:00'"
        ))
    })
}

/// A literal string argument (a time unit, a format), if the call has one there.
fn literal_str<'a>(scalars: &[Option<&'a ScalarValue>], i: usize) -> Option<&'a str> {
    match scalars.get(i).copied().flatten()? {
        ScalarValue::Utf8(s) | ScalarValue::LargeUtf8(s) | ScalarValue::Utf8View(s) => s.as_deref(),
        _ => None,
    }
}

/// A literal integer argument (a precision), if the call has one there.
fn literal_int(scalars: &[Option<&ScalarValue>], i: usize) -> Option<i64> {
    let v = scalars.get(i).copied().flatten()?;
    match v.cast_to(&DataType::Int64).ok()? {
        ScalarValue::Int64(n) => n,
        _ => None,
    }
}

#[cfg(test)]
mod test_util {
    use datafusion::arrow::array::RecordBatch;
    use datafusion::prelude::{SessionConfig, SessionContext};

    /// Runs `sql` with every Flink function registered, answering the first column of
    /// each row as text (NULL for null).
    pub async fn query(sql: &str) -> Vec<String> {
        query_in(sql, None).await
    }

    pub async fn query_in(sql: &str, time_zone: Option<&str>) -> Vec<String> {
        let mut config = SessionConfig::new();
        config.options_mut().execution.time_zone = time_zone.map(String::from);
        let ctx = SessionContext::new_with_config(config);
        for udf in super::all() {
            ctx.register_udf(udf);
        }
        let batches: Vec<RecordBatch> = ctx.sql(sql).await.unwrap().collect().await.unwrap();
        let mut out = vec![];
        for batch in batches {
            let column = batch.column(0);
            for row in 0..batch.num_rows() {
                out.push(if column.is_null(row) {
                    "NULL".to_string()
                } else {
                    datafusion::arrow::util::display::array_value_to_string(column, row).unwrap()
                });
            }
        }
        out
    }
}
