//! INSERT into a table of Weir's log: which columns a statement may name, and whether
//! the values it gives fit the column types, checked before anything is written. Into a
//! table with a primary key, an INSERT upserts: a row whose key exists replaces it.

use std::sync::Arc;

use datafusion::arrow::array::{Array, RecordBatch, UInt64Array};
use datafusion::arrow::datatypes::DataType;
use datafusion::error::DataFusionError;
use datafusion::execution::SessionState;
use datafusion::logical_expr::{DmlStatement, Expr, LogicalPlan};
use datafusion::sql::parser::Statement as DFStatement;
use datafusion::sql::sqlparser::ast::{self, Ident, ObjectName, ObjectNamePart, TableObject};
use weir_catalog::{Catalog, TableDef};

use super::error::{sqlstate, SqlError, SqlResult};
use super::names::{ident_name, object_name};

/// Checks the target and names the stored columns explicitly when the table has
/// computed columns, which INSERT does not fill.
pub fn prepare(catalog: &Catalog, insert: &mut ast::Insert) -> SqlResult<Arc<TableDef>> {
    let TableObject::TableName(target) = &insert.table else {
        return Err(SqlError::not_supported(
            "INSERT INTO TABLE FUNCTION is not supported",
        ));
    };
    let name = object_name(target)?;
    let Some(def) = catalog.table(&name) else {
        if catalog.view(&name).is_some() {
            return Err(SqlError::new(
                sqlstate::WRONG_OBJECT_TYPE,
                format!("cannot insert into view \"{name}\""),
            )
            .with_hint("insert into the tables the view reads"));
        }
        return Err(SqlError::undefined_table(&name));
    };
    if let Some(connector) = def.connector() {
        if !crate::connector::factory::SINKS.contains(&connector) {
            return Err(SqlError::not_supported(format!(
                "INSERT INTO \"{name}\" would write through connector '{connector}', which Weir \
                 cannot write yet; sinks are {}",
                crate::connector::factory::SINKS.join(", ")
            )));
        }
        if connector == "filesystem" {
            crate::connector::filesystem::check_sink_format(&def)?;
        }
    }
    if insert.overwrite {
        return Err(SqlError::not_supported(
            "INSERT OVERWRITE is not supported: the log is append-only",
        ));
    }
    for column in &insert.columns {
        let column = column
            .0
            .last()
            .and_then(|p| p.as_ident())
            .map(ident_name)
            .unwrap_or_default();
        if def.computed.iter().any(|c| c.name == column) {
            return Err(SqlError::new(
                "428C9",
                format!("cannot insert into computed column \"{column}\""),
            )
            .with_hint("leave computed columns out of the column list"));
        }
    }
    if insert.columns.is_empty() && !def.computed.is_empty() {
        insert.columns = def
            .columns
            .iter()
            .map(|c| {
                ObjectName(vec![ObjectNamePart::Identifier(Ident::with_quote(
                    '"', &c.name,
                ))])
            })
            .collect();
    }
    Ok(def)
}

/// Refuses values whose type cannot be assigned to their column (Postgres' 42804),
/// e.g. a boolean into an INT column. Text may go anywhere: it is parsed, and a value
/// that does not parse fails with 22P02 when the statement runs.
///
/// The source is planned on its own because DataFusion folds the casts to the target
/// types into the literals when it plans the INSERT, hiding what was written. A source
/// that cannot be planned alone (untyped parameters) is left to the INSERT's planning.
pub async fn check_source_types(
    state: &SessionState,
    insert: &ast::Insert,
    def: &TableDef,
) -> SqlResult<()> {
    let Some(source) = &insert.source else {
        return Ok(());
    };
    let statement = DFStatement::Statement(Box::new(ast::Statement::Query(source.clone())));
    let Ok(plan) = state.statement_to_plan(statement).await else {
        return Ok(());
    };
    let targets: Vec<String> = if insert.columns.is_empty() {
        def.columns.iter().map(|c| c.name.clone()).collect()
    } else {
        insert.columns.iter().map(column_name).collect()
    };
    let schema = def.schema();
    for (field, target) in plan.schema().fields().iter().zip(&targets) {
        if let Ok(target_field) = schema.field_with_name(target) {
            check_assignable(field.data_type(), target_field.data_type(), target)?;
        }
    }
    Ok(())
}

fn column_name(name: &ObjectName) -> String {
    name.0
        .last()
        .and_then(|p| p.as_ident())
        .map(ident_name)
        .unwrap_or_default()
}

#[derive(PartialEq, Eq, Debug)]
enum Family {
    Null,
    Text,
    Number,
    Boolean,
    Temporal,
    Interval,
    Binary,
    Other,
}

fn family(t: &DataType) -> Family {
    use DataType::*;
    match t {
        Null => Family::Null,
        Utf8 | LargeUtf8 | Utf8View => Family::Text,
        Int8 | Int16 | Int32 | Int64 | UInt8 | UInt16 | UInt32 | UInt64 | Float16 | Float32
        | Float64 | Decimal32(..) | Decimal64(..) | Decimal128(..) | Decimal256(..) => {
            Family::Number
        }
        Boolean => Family::Boolean,
        Date32 | Date64 | Time32(_) | Time64(_) | Timestamp(..) => Family::Temporal,
        Interval(_) | Duration(_) => Family::Interval,
        Binary | LargeBinary | BinaryView | FixedSizeBinary(_) => Family::Binary,
        Dictionary(_, v) => family(v),
        _ => Family::Other,
    }
}

fn check_assignable(source: &DataType, target: &DataType, column: &str) -> SqlResult<()> {
    let (s, t) = (family(source), family(target));
    let ok = s == t || s == Family::Null || s == Family::Text || t == Family::Text;
    if ok {
        return Ok(());
    }
    Err(SqlError::new(
        sqlstate::DATATYPE_MISMATCH,
        format!("column \"{column}\" is of type {target} but expression is of type {source}"),
    )
    .with_hint("rewrite or cast the expression"))
}

/// DataFusion reports a NULL in a NOT NULL column by position or by the name of the
/// source column; say which column of the table it was.
pub fn explain_failure(catalog: &Catalog, dml: &DmlStatement, error: DataFusionError) -> SqlError {
    let message = error.to_string();
    let table = dml.table_name.table();
    let quoted = |after: &str| {
        message
            .split(after)
            .nth(1)
            .and_then(|rest| rest.split('\'').next())
            .map(str::to_string)
    };
    let column = if message.contains("has null but schema specifies non-nullable") {
        let index = quoted("Invalid batch column at '").and_then(|i| i.parse::<usize>().ok());
        index.and_then(|i| {
            catalog
                .table(table)
                .and_then(|def| def.columns.get(i).map(|c| c.name.clone()))
        })
    } else if message.contains("is declared as non-nullable but contains null values") {
        quoted("Column '").map(|source| target_of(dml, &source).unwrap_or(source))
    } else {
        None
    };
    match column {
        Some(column) => SqlError::new(
            sqlstate::NOT_NULL_VIOLATION,
            format!("null value in column \"{column}\" of relation \"{table}\" violates not-null constraint"),
        ),
        None => SqlError::from(error),
    }
}

/// The table column an INSERT fills from the source column `source`.
fn target_of(dml: &DmlStatement, source: &str) -> Option<String> {
    let LogicalPlan::Projection(projection) = dml.input.as_ref() else {
        return None;
    };
    projection.expr.iter().find_map(|e| match e {
        Expr::Alias(alias) => match alias.expr.as_ref() {
            Expr::Column(c) if c.name == source => Some(alias.name.clone()),
            Expr::Cast(cast) if matches!(cast.expr.as_ref(), Expr::Column(c) if c.name == source) => {
                Some(alias.name.clone())
            }
            _ => None,
        },
        _ => None,
    })
}

/// Rows written, from the `count` column DataFusion's insert returns.
pub fn count_of(batches: &[RecordBatch]) -> usize {
    batches
        .iter()
        .filter_map(|b| b.column_by_name("count"))
        .filter_map(|c| {
            c.as_any()
                .downcast_ref::<UInt64Array>()
                .map(|a| (0..a.len()).map(|i| a.value(i)).sum::<u64>())
        })
        .sum::<u64>() as usize
}
