//! Rewrites of Postgres functions DataFusion cannot evaluate as scalar functions, done
//! on the statement before planning: `current_setting('x')` reads the session, and
//! `to_regtype('x')` looks a type up in pg_catalog.

use std::collections::HashMap;
use std::ops::ControlFlow;

use datafusion::sql::sqlparser::ast::{
    self, Expr, FunctionArg, FunctionArgExpr, FunctionArguments, Value, VisitMut, VisitorMut,
};
use datafusion::sql::sqlparser::dialect::PostgreSqlDialect;
use datafusion::sql::sqlparser::parser::Parser;

use super::error::{SqlError, SqlResult};
use super::session;

pub fn rewrite(stmt: &mut ast::Statement, metadata: &HashMap<String, String>) -> SqlResult<()> {
    super::flink_syntax::rewrite(stmt);
    let _ = stmt.visit(&mut NestedCatalogLookups);
    match stmt.visit(&mut SessionFunctions(metadata)) {
        ControlFlow::Continue(()) => Ok(()),
        ControlFlow::Break(e) => Err(e),
    }
}

/// Introspection queries (SQLAlchemy's get_columns) look values up in pg_catalog with
/// correlated scalar subqueries nested in CASE expressions, a shape DataFusion cannot
/// run. datafusion-pg-catalog answers NULL for such lookups at the top of a projection;
/// this does the same where they are nested. They look up what Weir never has (column
/// defaults, identity sequences, collations), so NULL is also the true answer.
struct NestedCatalogLookups;

impl VisitorMut for NestedCatalogLookups {
    type Break = ();

    fn pre_visit_query(&mut self, query: &mut ast::Query) -> ControlFlow<()> {
        if let ast::SetExpr::Select(select) = query.body.as_mut() {
            for item in &mut select.projection {
                if let ast::SelectItem::UnnamedExpr(e)
                | ast::SelectItem::ExprWithAlias { expr: e, .. } = item
                {
                    if !matches!(e, Expr::Subquery(_)) {
                        let _ = e.visit(&mut NullCorrelatedCatalogSubqueries);
                    }
                }
            }
        }
        ControlFlow::Continue(())
    }
}

struct NullCorrelatedCatalogSubqueries;

impl VisitorMut for NullCorrelatedCatalogSubqueries {
    type Break = ();

    fn post_visit_expr(&mut self, expr: &mut Expr) -> ControlFlow<()> {
        if let Expr::Subquery(query) = expr {
            if reads_only_pg_catalog(query) && is_correlated(query) {
                *expr = Expr::value(Value::Null);
            }
        }
        ControlFlow::Continue(())
    }
}

fn from_relations(select: &ast::Select) -> impl Iterator<Item = &ast::TableFactor> {
    select
        .from
        .iter()
        .flat_map(|t| std::iter::once(&t.relation).chain(t.joins.iter().map(|j| &j.relation)))
}

fn reads_only_pg_catalog(query: &ast::Query) -> bool {
    let ast::SetExpr::Select(select) = query.body.as_ref() else {
        return false;
    };
    !select.from.is_empty() && from_relations(select).all(is_pg_catalog_table)
}

/// True when the query names a column of a table it does not read itself.
fn is_correlated(query: &ast::Query) -> bool {
    let ast::SetExpr::Select(select) = query.body.as_ref() else {
        return false;
    };
    let mut own: Vec<String> = vec![];
    for relation in from_relations(select) {
        if let ast::TableFactor::Table { name, alias, .. } = relation {
            if let Some(last) = name.0.last().and_then(|p| p.as_ident()) {
                own.push(last.value.to_lowercase());
            }
            if let Some(alias) = alias {
                own.push(alias.name.value.to_lowercase());
            }
        }
    }
    struct Outer<'a>(&'a [String]);
    impl ast::Visitor for Outer<'_> {
        type Break = ();
        fn pre_visit_expr(&mut self, expr: &Expr) -> ControlFlow<()> {
            if let Expr::CompoundIdentifier(parts) = expr {
                // table.column or schema.table.column
                let table = parts
                    .len()
                    .checked_sub(2)
                    .map(|i| parts[i].value.to_lowercase());
                if table.is_some_and(|t| !self.0.contains(&t)) {
                    return ControlFlow::Break(());
                }
            }
            ControlFlow::Continue(())
        }
    }
    ast::Visit::visit(query, &mut Outer(&own)).is_break()
}

fn is_pg_catalog_table(relation: &ast::TableFactor) -> bool {
    let ast::TableFactor::Table { name, .. } = relation else {
        return false;
    };
    let parts: Vec<String> = name
        .0
        .iter()
        .filter_map(|p| p.as_ident())
        .map(|i| i.value.to_lowercase())
        .collect();
    match parts.as_slice() {
        [schema, _] => schema == "pg_catalog",
        [table] => table.starts_with("pg_"),
        _ => false,
    }
}

struct SessionFunctions<'a>(&'a HashMap<String, String>);

impl VisitorMut for SessionFunctions<'_> {
    type Break = SqlError;

    fn post_visit_expr(&mut self, expr: &mut Expr) -> ControlFlow<SqlError> {
        let Some((name, arg)) = single_arg_call(expr) else {
            return ControlFlow::Continue(());
        };
        let replacement = match name.as_str() {
            "current_setting" => {
                let Expr::Value(v) = &arg else {
                    return ControlFlow::Continue(());
                };
                let Value::SingleQuotedString(setting) = &v.value else {
                    return ControlFlow::Continue(());
                };
                match session::show(self.0, setting) {
                    Ok((_, value)) => Expr::value(Value::SingleQuotedString(value)),
                    Err(e) => return ControlFlow::Break(e),
                }
            }
            "to_regtype" => {
                let sql = format!("(SELECT oid FROM pg_catalog.pg_type WHERE typname = {arg})");
                match Parser::new(&PostgreSqlDialect {})
                    .try_with_sql(&sql)
                    .and_then(|mut p| p.parse_expr())
                {
                    Ok(e) => e,
                    Err(e) => return ControlFlow::Break(SqlError::from_parser(&e, &sql)),
                }
            }
            _ => return ControlFlow::Continue(()),
        };
        *expr = replacement;
        ControlFlow::Continue(())
    }
}

/// `name(arg)` with the name lower-cased and any `pg_catalog.` qualifier dropped.
fn single_arg_call(expr: &Expr) -> Option<(String, Expr)> {
    let Expr::Function(f) = expr else {
        return None;
    };
    let name = f.name.0.last()?.as_ident()?.value.to_lowercase();
    let FunctionArguments::List(list) = &f.args else {
        return None;
    };
    match list.args.as_slice() {
        [FunctionArg::Unnamed(FunctionArgExpr::Expr(arg))] => Some((name, arg.clone())),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rewritten(sql: &str) -> String {
        let mut stmt = Parser::parse_sql(&PostgreSqlDialect {}, sql)
            .unwrap()
            .remove(0);
        rewrite(&mut stmt, &HashMap::new()).unwrap();
        stmt.to_string()
    }

    #[test]
    fn nested_correlated_catalog_lookups_become_null() {
        assert_eq!(
            rewritten(
                "SELECT CASE WHEN a.x THEN (SELECT d.v FROM pg_catalog.pg_attrdef d WHERE d.id = a.id) ELSE NULL END FROM t a"
            ),
            "SELECT CASE WHEN a.x THEN NULL ELSE NULL END FROM t a"
        );
        // Uncorrelated lookups and users' own subqueries keep their meaning.
        for sql in [
            "SELECT CASE WHEN a.x THEN (SELECT max(oid) FROM pg_catalog.pg_type t WHERE t.typname = 'int8') END FROM t a",
            "SELECT CASE WHEN a.x THEN (SELECT max(v) FROM t2 WHERE t2.id = a.id) END FROM t a",
        ] {
            assert_eq!(rewritten(sql), sql);
        }
    }

    #[test]
    fn session_functions_are_replaced() {
        assert_eq!(
            rewritten("SELECT current_setting('server_version_num'), to_regtype('int8')"),
            "SELECT '160006', (SELECT oid FROM pg_catalog.pg_type WHERE typname = 'int8')"
        );
    }
}
