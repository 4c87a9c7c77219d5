//! The table a window table function call resolves to: its input's columns plus
//! window_start, window_end and window_time. Only the streaming planner reads it.

use std::sync::Arc;

use async_trait::async_trait;
use datafusion::arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use datafusion::catalog::{Session, TableProvider};
use datafusion::common::{DataFusionError, Result};
use datafusion::datasource::TableType;
use datafusion::logical_expr::Expr;
use datafusion::physical_plan::ExecutionPlan;

use super::window_tvf::WindowSpec;
use crate::sql::error::SqlError;

#[derive(Debug)]
pub struct WindowTvfTable {
    pub spec: WindowSpec,
    pub input: Arc<dyn TableProvider>,
    schema: SchemaRef,
}

pub const WINDOW_START: &str = "window_start";
pub const WINDOW_END: &str = "window_end";
pub const WINDOW_TIME: &str = "window_time";

impl WindowTvfTable {
    pub fn try_new(spec: WindowSpec, input: Arc<dyn TableProvider>) -> Result<Self> {
        let input_schema = input.schema();
        let time = input_schema
            .field_with_name(&spec.time_column)
            .map_err(|_| {
                external(SqlError::new(
                    "42703",
                    format!(
                        "column \"{}\" of DESCRIPTOR does not exist in \"{}\"",
                        spec.time_column, spec.table
                    ),
                ))
            })?;
        let tz = match time.data_type() {
            DataType::Timestamp(_, tz) => tz.clone(),
            other => {
                return Err(external(SqlError::new(
                    "42804",
                    format!(
                        "the DESCRIPTOR column of {} must be a time attribute (TIMESTAMP(3) with a \
                         WATERMARK, or PROCTIME()); \"{}\" is {other}",
                        spec.function_name(),
                        spec.time_column
                    ),
                )))
            }
        };
        let mut fields: Vec<Field> = input_schema
            .fields()
            .iter()
            .map(|f| f.as_ref().clone())
            .collect();
        for name in [WINDOW_START, WINDOW_END, WINDOW_TIME] {
            if input_schema.field_with_name(name).is_ok() {
                return Err(external(SqlError::new(
                    "42701",
                    format!(
                        "\"{}\" already has a column named {name}; rename it before windowing it again",
                        spec.table
                    ),
                )));
            }
        }
        let ts = DataType::Timestamp(TimeUnit::Millisecond, None);
        fields.push(Field::new(WINDOW_START, ts.clone(), false));
        fields.push(Field::new(WINDOW_END, ts, false));
        fields.push(Field::new(
            WINDOW_TIME,
            DataType::Timestamp(TimeUnit::Millisecond, tz),
            false,
        ));
        Ok(Self {
            spec,
            input,
            schema: Arc::new(Schema::new(fields)),
        })
    }
}

fn external(e: SqlError) -> DataFusionError {
    DataFusionError::External(Box::new(e))
}

#[async_trait]
impl TableProvider for WindowTvfTable {
    fn schema(&self) -> SchemaRef {
        self.schema.clone()
    }

    fn table_type(&self) -> TableType {
        TableType::View
    }

    async fn scan(
        &self,
        _state: &dyn Session,
        _projection: Option<&Vec<usize>>,
        _filters: &[Expr],
        _limit: Option<usize>,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        Err(DataFusionError::Internal(
            "window table functions run in the streaming engine".into(),
        ))
    }
}
