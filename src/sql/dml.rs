//! UPDATE and DELETE. A table of Weir's log with a primary key is a changelog: they
//! append -U/+U and -D entries for the current rows they select, which queries and
//! jobs reading the table see as updates. Tables without a key, connector tables and
//! views cannot be changed this way.

use std::sync::Arc;

use datafusion::common::tree_node::TreeNode;
use datafusion::datasource::source_as_provider;
use datafusion::execution::SessionState;
use datafusion::logical_expr::{DmlStatement, Expr, LogicalPlan, WriteOp};
use datafusion::physical_expr::PhysicalExpr;
use datafusion::sql::sqlparser::ast::{self, FromTable, TableFactor, TableWithJoins};
use weir_catalog::Catalog;

use super::error::{sqlstate, SqlError, SqlResult};
use super::names::object_name;
use super::CommandTag;
use crate::connector::log_table::{needs_primary_key, LogTable, RowChange};

/// Whether `plan` is an UPDATE or DELETE.
pub fn is_update_or_delete(plan: &LogicalPlan) -> bool {
    matches!(
        plan,
        LogicalPlan::Dml(DmlStatement {
            op: WriteOp::Update | WriteOp::Delete,
            ..
        })
    )
}

/// Refuses UPDATE or DELETE of anything but a keyed table of Weir's log, and the
/// clauses Weir does not run, before the statement is planned.
pub fn check(catalog: &Catalog, stmt: &ast::Statement) -> SqlResult<()> {
    let (verb, target) = match stmt {
        ast::Statement::Update(update) => {
            if update.from.is_some() || !update.table.joins.is_empty() {
                return Err(SqlError::not_supported(
                    "UPDATE ... FROM is not supported; compute the new values from the row itself",
                ));
            }
            if update.returning.is_some() {
                return Err(SqlError::not_supported(
                    "UPDATE ... RETURNING is not supported",
                ));
            }
            ("UPDATE", &update.table)
        }
        ast::Statement::Delete(delete) => {
            if delete.using.is_some() {
                return Err(SqlError::not_supported("DELETE ... USING is not supported"));
            }
            if delete.returning.is_some() {
                return Err(SqlError::not_supported(
                    "DELETE ... RETURNING is not supported",
                ));
            }
            let (FromTable::WithFromKeyword(tables) | FromTable::WithoutKeyword(tables)) =
                &delete.from;
            match tables.as_slice() {
                [table] if table.joins.is_empty() && delete.tables.is_empty() => ("DELETE", table),
                _ => {
                    return Err(SqlError::not_supported(
                        "DELETE from several tables is not supported",
                    ))
                }
            }
        }
        _ => return Ok(()),
    };
    let name = target_name(target)?;
    let Some(def) = catalog.table(&name) else {
        if catalog.view(&name).is_some() {
            return Err(SqlError::new(
                sqlstate::WRONG_OBJECT_TYPE,
                format!("cannot {verb} view \"{name}\""),
            )
            .with_hint("change the tables the view reads"));
        }
        return Err(SqlError::undefined_table(&name));
    };
    if let Some(connector) = def.connector() {
        return Err(SqlError::not_supported(format!(
            "table \"{name}\" is read through connector '{connector}', so {verb} cannot change \
             its rows"
        ))
        .with_hint(
            "change the data at its source, or keep the rows in a table without a connector \
             declared with PRIMARY KEY (...) NOT ENFORCED",
        ));
    }
    if def.primary_key.is_empty() {
        return Err(needs_primary_key(&name));
    }
    Ok(())
}

fn target_name(target: &TableWithJoins) -> SqlResult<String> {
    match &target.relation {
        TableFactor::Table { name, .. } => object_name(name),
        other => Err(SqlError::not_supported(format!(
            "cannot change the rows of {other}; name a table"
        ))),
    }
}

/// Runs a planned UPDATE or DELETE (placeholders already filled).
pub async fn execute(state: &SessionState, dml: &DmlStatement) -> SqlResult<CommandTag> {
    let verb = match dml.op {
        WriteOp::Update => "UPDATE",
        _ => "DELETE",
    };
    let provider = source_as_provider(&dml.target)?;
    let any: &dyn std::any::Any = provider.as_ref();
    let Some(table) = any.downcast_ref::<LogTable>() else {
        return Err(SqlError::not_supported(format!(
            "{verb} can only change tables of Weir's log declared with a primary key, not \"{}\"",
            dml.table_name
        )));
    };
    let (assignments, filtered) = match (&dml.op, dml.input.as_ref()) {
        (WriteOp::Update, LogicalPlan::Projection(p)) => (Some(&p.expr), p.input.as_ref()),
        (WriteOp::Delete, input) => (None, input),
        _ => return Err(unsupported_shape(verb)),
    };
    let (predicate, scan) = match filtered {
        LogicalPlan::Filter(f) => (Some(&f.predicate), f.input.as_ref()),
        other => (None, other),
    };
    let reads_only_the_table = match scan {
        LogicalPlan::TableScan(_) => true,
        LogicalPlan::SubqueryAlias(a) => matches!(a.input.as_ref(), LogicalPlan::TableScan(_)),
        _ => false,
    };
    if !reads_only_the_table {
        return Err(unsupported_shape(verb));
    }
    let exprs: Vec<&Expr> = predicate
        .into_iter()
        .chain(assignments.into_iter().flatten())
        .collect();
    for expr in &exprs {
        let subquery = expr.exists(|e| {
            Ok(matches!(
                e,
                Expr::ScalarSubquery(_) | Expr::Exists(_) | Expr::InSubquery(_)
            ))
        })?;
        if subquery {
            return Err(SqlError::not_supported(format!(
                "subqueries in {verb} are not supported; use values and the row's own columns"
            )));
        }
    }
    // Every column of the scan is a column of the rows the expressions see.
    let schema = scan.schema();
    let physical = |e: &Expr| -> SqlResult<Arc<dyn PhysicalExpr>> {
        Ok(state.create_physical_expr(e.clone(), schema)?)
    };
    let def = table.def();
    let stored = def.columns.len();
    let new_values = match assignments {
        None => None,
        Some(exprs) => {
            if let Some(column) = exprs[stored..].iter().find_map(assigned_column) {
                return Err(SqlError::new(
                    "428C9",
                    format!("cannot UPDATE computed column \"{column}\""),
                )
                .with_hint("set the stored columns it is computed from"));
            }
            Some(
                exprs[..stored]
                    .iter()
                    .map(physical)
                    .collect::<SqlResult<Vec<_>>>()?,
            )
        }
    };
    let change = RowChange {
        predicate: predicate.map(physical).transpose()?,
        new_values,
    };
    let rows = table.change_rows(state, change).await?;
    Ok(CommandTag::new(verb).with_rows(rows as usize))
}

/// The column an UPDATE projection expression sets, unless it keeps the column as it is.
fn assigned_column(expr: &Expr) -> Option<String> {
    match expr {
        Expr::Alias(a) => match a.expr.as_ref() {
            Expr::Column(c) if c.name == a.name => None,
            _ => Some(a.name.clone()),
        },
        _ => None,
    }
}

fn unsupported_shape(verb: &str) -> SqlError {
    SqlError::not_supported(format!(
        "{verb} supports a single table, SET assignments and a WHERE clause; FROM, joins and \
         LIMIT are not supported"
    ))
}
