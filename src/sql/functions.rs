//! Scalar functions Weir adds to DataFusion's: Flink's PROCTIME() and the Postgres
//! identity functions clients call at start-up.

use std::sync::Arc;

use datafusion::arrow::datatypes::{DataType, TimeUnit};
use datafusion::logical_expr::{create_udf, ColumnarValue, ScalarUDF, Volatility};
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

pub fn all() -> Vec<ScalarUDF> {
    vec![proctime(), version()]
}
