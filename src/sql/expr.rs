//! Expressions kept as SQL text in the catalog (computed columns, watermarks), planned
//! again against a table's schema when the table is read.

use datafusion::catalog::Session;
use datafusion::common::{DFSchema, Result};
use datafusion::error::DataFusionError;
use datafusion::execution::SessionState;
use datafusion::logical_expr::Expr;

pub fn parse_sql_expr(sql: &str, schema: &DFSchema, session: &dyn Session) -> Result<Expr> {
    let state = session
        .as_any()
        .downcast_ref::<SessionState>()
        .ok_or_else(|| DataFusionError::Internal("expected DataFusion's SessionState".into()))?;
    state.create_logical_expr(sql, schema)
}
