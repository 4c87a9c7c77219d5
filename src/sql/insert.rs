//! INSERT into a table of Weir's log: which columns a statement may name, and whether
//! the values it gives fit the column types, checked before anything is written.

use datafusion::arrow::array::{Array, RecordBatch, UInt64Array};
use datafusion::arrow::datatypes::DataType;
use datafusion::logical_expr::{DmlStatement, Expr, ExprSchemable, LogicalPlan};
use datafusion::sql::sqlparser::ast::{self, Ident, ObjectName, ObjectNamePart, TableObject};
use weir_catalog::Catalog;

use super::error::{sqlstate, SqlError, SqlResult};
use super::names::{ident_name, object_name};

/// Checks the target and names the stored columns explicitly when the table has
/// computed columns, which INSERT does not fill.
pub fn prepare(catalog: &Catalog, insert: &mut ast::Insert) -> SqlResult<()> {
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
        return Err(SqlError::not_supported(format!(
            "INSERT INTO \"{name}\" would write through connector '{connector}', which needs \
             continuous jobs that this Weir version does not run yet; only tables without a \
             connector take INSERT"
        )));
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
    Ok(())
}

/// Refuses values whose type cannot be assigned to their column (Postgres' 42804),
/// e.g. a boolean into an INT column. Text may go anywhere: it is parsed, and a value
/// that does not parse fails with 22P02 when the statement runs.
pub fn check_types(dml: &DmlStatement) -> SqlResult<()> {
    let target = dml.target.schema();
    match dml.input.as_ref() {
        LogicalPlan::Projection(projection) => {
            let input_schema = projection.input.schema();
            for (expr, field) in projection.expr.iter().zip(target.fields()) {
                let source = unwrap_cast(expr).get_type(input_schema)?;
                check_assignable(&source, field.data_type(), field.name())?;
            }
        }
        LogicalPlan::Values(values) => {
            let schema = values.schema.clone();
            for row in &values.values {
                for (expr, field) in row.iter().zip(target.fields()) {
                    let source = unwrap_cast(expr).get_type(&schema)?;
                    check_assignable(&source, field.data_type(), field.name())?;
                }
            }
        }
        _ => {}
    }
    Ok(())
}

fn unwrap_cast(expr: &Expr) -> &Expr {
    match expr {
        Expr::Alias(alias) => unwrap_cast(&alias.expr),
        Expr::Cast(cast) => unwrap_cast(&cast.expr),
        Expr::TryCast(cast) => unwrap_cast(&cast.expr),
        other => other,
    }
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
