//! Result column names as Postgres gives them. DataFusion names an unaliased expression
//! after its whole text (`sum(orders.amount)`, `Int64(1)`); Postgres uses the column or
//! function name, or `?column?`. Clients show these names, so Weir follows Postgres.

use datafusion::arrow::datatypes::{Field, Schema, SchemaRef};
use datafusion::sql::sqlparser::ast::{Expr, Query, SelectItem, SetExpr, Statement};
use std::sync::Arc;

use super::names::ident_name;

/// The Postgres name of each result column of a query, where it differs from the one
/// DataFusion gives: `None` keeps DataFusion's (aliases, plain columns). Empty when the
/// statement is not a plain query or its columns cannot be told apart (`*`).
pub fn postgres_names(statement: &Statement) -> Vec<Option<String>> {
    let Statement::Query(query) = statement else {
        return vec![];
    };
    let Some(items) = leftmost_projection(query) else {
        return vec![];
    };
    if items.iter().any(|i| {
        matches!(
            i,
            SelectItem::Wildcard(_) | SelectItem::QualifiedWildcard(..)
        )
    }) {
        return vec![];
    }
    items
        .iter()
        .map(|item| match item {
            SelectItem::UnnamedExpr(expr) => {
                Some(figure_name(expr).unwrap_or_else(|| "?column?".into()))
            }
            _ => None,
        })
        .collect()
}

/// Column names come from the first SELECT of a set operation, as in Postgres.
fn leftmost_projection(query: &Query) -> Option<&Vec<SelectItem>> {
    let mut body = query.body.as_ref();
    loop {
        match body {
            SetExpr::Select(select) => return Some(&select.projection),
            SetExpr::SetOperation { left, .. } => body = left.as_ref(),
            SetExpr::Query(q) => body = q.body.as_ref(),
            _ => return None,
        }
    }
}

/// Postgres' FigureColname: the column, function or keyword an expression is named by.
fn figure_name(expr: &Expr) -> Option<String> {
    match expr {
        Expr::Identifier(ident) => Some(ident_name(ident)),
        Expr::CompoundIdentifier(parts) => parts.last().map(ident_name),
        Expr::Function(f) => f.name.0.last().and_then(|p| p.as_ident()).map(ident_name),
        Expr::Cast {
            expr, data_type, ..
        } => figure_name(expr).or_else(|| Some(data_type.to_string().to_lowercase())),
        Expr::Nested(inner) => figure_name(inner),
        Expr::Case { .. } => Some("case".into()),
        Expr::Exists { .. } => Some("exists".into()),
        Expr::Array(_) => Some("array".into()),
        Expr::Subquery(q) => leftmost_projection(q)
            .and_then(|items| items.first())
            .and_then(|item| match item {
                SelectItem::UnnamedExpr(e) => figure_name(e),
                SelectItem::ExprWithAlias { alias, .. } => Some(ident_name(alias)),
                _ => None,
            }),
        _ => None,
    }
}

/// `schema` with the fields renamed as `names` says (names may repeat, as in Postgres).
pub fn rename(schema: &SchemaRef, names: &[Option<String>]) -> SchemaRef {
    if names.len() != schema.fields().len() || names.iter().all(Option::is_none) {
        return schema.clone();
    }
    let fields: Vec<Field> = schema
        .fields()
        .iter()
        .zip(names)
        .map(|(field, name)| match name {
            Some(name) => field.as_ref().clone().with_name(name),
            None => field.as_ref().clone(),
        })
        .collect();
    Arc::new(Schema::new_with_metadata(fields, schema.metadata().clone()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use datafusion::sql::sqlparser::dialect::PostgreSqlDialect;
    use datafusion::sql::sqlparser::parser::Parser;

    fn names(sql: &str) -> Vec<Option<String>> {
        postgres_names(&Parser::parse_sql(&PostgreSqlDialect {}, sql).unwrap()[0])
    }

    #[test]
    fn follows_postgres_naming() {
        let n = |s: &str| Some(s.to_string());
        assert_eq!(
            names("SELECT 1, a, t.b, count(*), upper(x), c AS d, a::TEXT, 'x'::TEXT, CASE WHEN a THEN 1 END, (a + 1) FROM t"),
            vec![n("?column?"), n("a"), n("b"), n("count"), n("upper"), None, n("a"), n("text"), n("case"), n("?column?")]
        );
        assert_eq!(names("SELECT a FROM t UNION ALL SELECT 1"), vec![n("a")]);
        assert!(names("SELECT *, 1 FROM t").is_empty());
        assert!(names("SHOW x").is_empty());
    }
}
