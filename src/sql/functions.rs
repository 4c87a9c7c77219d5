//! Scalar functions Weir adds to DataFusion's: Flink's PROCTIME() and the Postgres
//! functions clients call at start-up and for introspection.

use std::sync::Arc;

use datafusion::arrow::array::{ArrayRef, StringBuilder};
use datafusion::arrow::datatypes::{DataType, TimeUnit};
use datafusion::common::{exec_err, Result};
use datafusion::logical_expr::{
    create_udf, ColumnarValue, ScalarFunctionArgs, ScalarUDF, ScalarUDFImpl, Signature, Volatility,
};
use datafusion::scalar::ScalarValue;

use super::session::SERVER_VERSION;

/// The type of PROCTIME(): Flink's TIMESTAMP_LTZ(3).
pub fn proctime_type() -> DataType {
    DataType::Timestamp(TimeUnit::Millisecond, Some("UTC".into()))
}

/// `PROCTIME()`: the wall-clock time at which a row is processed (volatile: evaluated
/// for every batch, never folded into a constant at planning time).
pub fn proctime() -> ScalarUDF {
    create_udf(
        "proctime",
        vec![],
        proctime_type(),
        Volatility::Volatile,
        Arc::new(|_args: &[ColumnarValue]| {
            let now = chrono::Utc::now().timestamp_millis();
            Ok(ColumnarValue::Scalar(ScalarValue::TimestampMillisecond(
                Some(now),
                Some("UTC".into()),
            )))
        }),
    )
}

/// What `version()` returns: drivers (SQLAlchemy, pgjdbc) parse "PostgreSQL X.Y" from it.
pub fn version_string() -> String {
    format!(
        "PostgreSQL {SERVER_VERSION} (Weir {}, a streaming SQL engine) on {}",
        env!("CARGO_PKG_VERSION"),
        std::env::consts::ARCH
    )
}

pub fn version() -> ScalarUDF {
    let text = version_string();
    create_udf(
        "version",
        vec![],
        DataType::Utf8,
        Volatility::Immutable,
        Arc::new(move |_args: &[ColumnarValue]| {
            Ok(ColumnarValue::Scalar(ScalarValue::Utf8(Some(text.clone()))))
        }),
    )
}

/// A Postgres catalog function whose answer is fixed in Weir: one schema, everything
/// visible, no sequences.
#[derive(Debug, PartialEq, Eq, Hash)]
struct Constant {
    name: &'static str,
    signature: Signature,
    value: ScalarValue,
}

impl Constant {
    fn udf(name: &'static str, arity: usize, value: ScalarValue) -> ScalarUDF {
        ScalarUDF::from(Self {
            name,
            signature: Signature::any(arity, Volatility::Immutable),
            value,
        })
    }
}

impl ScalarUDFImpl for Constant {
    fn name(&self) -> &str {
        self.name
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn return_type(&self, _args: &[DataType]) -> Result<DataType> {
        Ok(self.value.data_type())
    }

    fn invoke_with_args(&self, _args: ScalarFunctionArgs) -> Result<ColumnarValue> {
        Ok(ColumnarValue::Scalar(self.value.clone()))
    }
}

pub fn all() -> Vec<ScalarUDF> {
    vec![
        proctime(),
        version(),
        // Weir has no sequences.
        Constant::udf("pg_get_serial_sequence", 2, ScalarValue::Utf8(None)),
        // One schema, on every search path: everything is visible.
        Constant::udf(
            "pg_collation_is_visible",
            1,
            ScalarValue::Boolean(Some(true)),
        ),
        Constant::udf(
            "pg_function_is_visible",
            1,
            ScalarValue::Boolean(Some(true)),
        ),
        Constant::udf("pg_type_is_visible", 1, ScalarValue::Boolean(Some(true))),
        ScalarUDF::from(JsonBuildObject::new()),
    ]
    .into_iter()
    .chain(super::flink_functions::all())
    .collect()
}

/// Postgres' `json_build_object(key, value, ...)`, as JSON text.
#[derive(Debug, PartialEq, Eq, Hash)]
struct JsonBuildObject {
    signature: Signature,
}

impl JsonBuildObject {
    fn new() -> Self {
        Self {
            signature: Signature::variadic_any(Volatility::Immutable),
        }
    }
}

impl ScalarUDFImpl for JsonBuildObject {
    fn name(&self) -> &str {
        "json_build_object"
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn return_type(&self, _args: &[DataType]) -> Result<DataType> {
        Ok(DataType::Utf8)
    }

    fn invoke_with_args(&self, args: ScalarFunctionArgs) -> Result<ColumnarValue> {
        if !args.args.len().is_multiple_of(2) {
            return exec_err!(
                "json_build_object needs an even number of arguments (key, value, ...)"
            );
        }
        let arrays = ColumnarValue::values_to_arrays(&args.args)?;
        let mut out = StringBuilder::new();
        for row in 0..args.number_rows {
            let mut object = serde_json::Map::new();
            for pair in arrays.chunks(2) {
                let key = ScalarValue::try_from_array(&pair[0], row)?;
                if key.is_null() {
                    return exec_err!("json_build_object: keys must not be null");
                }
                let key = match key {
                    ScalarValue::Utf8(Some(s))
                    | ScalarValue::LargeUtf8(Some(s))
                    | ScalarValue::Utf8View(Some(s)) => s,
                    other => other.to_string(),
                };
                object.insert(key, json_value(ScalarValue::try_from_array(&pair[1], row)?));
            }
            out.append_value(serde_json::Value::Object(object).to_string());
        }
        let array: ArrayRef = Arc::new(out.finish());
        Ok(
            if args
                .args
                .iter()
                .all(|a| matches!(a, ColumnarValue::Scalar(_)))
            {
                ColumnarValue::Scalar(ScalarValue::try_from_array(&array, 0)?)
            } else {
                ColumnarValue::Array(array)
            },
        )
    }
}

fn json_value(value: ScalarValue) -> serde_json::Value {
    use serde_json::Value as J;
    if value.is_null() {
        return J::Null;
    }
    match value {
        ScalarValue::Boolean(Some(b)) => J::Bool(b),
        ScalarValue::Int8(Some(v)) => J::from(v),
        ScalarValue::Int16(Some(v)) => J::from(v),
        ScalarValue::Int32(Some(v)) => J::from(v),
        ScalarValue::Int64(Some(v)) => J::from(v),
        ScalarValue::UInt8(Some(v)) => J::from(v),
        ScalarValue::UInt16(Some(v)) => J::from(v),
        ScalarValue::UInt32(Some(v)) => J::from(v),
        ScalarValue::UInt64(Some(v)) => J::from(v),
        ScalarValue::Float32(Some(v)) => J::from(v),
        ScalarValue::Float64(Some(v)) => J::from(v),
        ScalarValue::Utf8(Some(s))
        | ScalarValue::LargeUtf8(Some(s))
        | ScalarValue::Utf8View(Some(s)) => J::String(s),
        other => J::String(other.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use datafusion::prelude::SessionContext;

    #[tokio::test]
    async fn json_build_object_builds_objects_per_row() {
        let ctx = SessionContext::new();
        ctx.register_udf(ScalarUDF::from(JsonBuildObject::new()));
        let batches = ctx
            .sql("SELECT json_build_object('n', x, 'even', x % 2 = 0, 's', NULL) AS j FROM (VALUES (1), (2)) t(x)")
            .await
            .unwrap()
            .collect()
            .await
            .unwrap();
        let column = batches[0].column(0);
        let texts = datafusion::arrow::array::as_string_array(column);
        assert_eq!(texts.value(0), r#"{"even":false,"n":1,"s":null}"#);
        assert_eq!(texts.value(1), r#"{"even":true,"n":2,"s":null}"#);
    }
}
