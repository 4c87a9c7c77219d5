//! Flink function syntax DataFusion does not plan, rewritten to calls of Weir's
//! functions (`flink_functions`) before planning:
//! - `TIMESTAMPADD(SECOND, n, ts)` and `TIMESTAMPDIFF(DAY, a, b)` name their unit as a
//!   keyword, which parses as a column name; it becomes the string 'SECOND'.
//! - `FLOOR(ts TO unit)` and `CEIL(ts TO unit)` become `timestamp_floor('unit', ts)` and
//!   `timestamp_ceil('unit', ts)`. DataFusion's date_trunc would do for FLOOR but starts
//!   weeks on Monday, where Flink starts them on Sunday; one pair of functions keeps FLOOR
//!   and CEIL consistent.

use std::ops::ControlFlow;

use datafusion::sql::sqlparser::ast::{
    self, CeilFloorKind, DateTimeField, Expr, FunctionArg, FunctionArgExpr, FunctionArgumentList,
    FunctionArguments, Ident, ObjectName, Value,
};

pub fn rewrite(stmt: &mut ast::Statement) {
    let _ = ast::visit_expressions_mut(stmt, |expr| {
        rewrite_expr(expr);
        ControlFlow::<()>::Continue(())
    });
}

fn rewrite_expr(expr: &mut Expr) {
    match expr {
        Expr::Function(f) if is_unit_function(&f.name) => {
            if let FunctionArguments::List(list) = &mut f.args {
                if let Some(FunctionArg::Unnamed(FunctionArgExpr::Expr(unit))) =
                    list.args.first_mut()
                {
                    if let Expr::Identifier(ident) = unit {
                        *unit = string(&ident.value.to_ascii_uppercase());
                    }
                }
            }
        }
        // Plain FLOOR(x) parses with the field NoDateTime.
        Expr::Floor {
            expr: value,
            field: CeilFloorKind::DateTimeField(field),
        } if *field != DateTimeField::NoDateTime => *expr = call("timestamp_floor", field, value),
        Expr::Ceil {
            expr: value,
            field: CeilFloorKind::DateTimeField(field),
        } if *field != DateTimeField::NoDateTime => *expr = call("timestamp_ceil", field, value),
        _ => {}
    }
}

fn is_unit_function(name: &ObjectName) -> bool {
    match name.0.as_slice() {
        [part] => part.as_ident().is_some_and(|i| {
            i.value.eq_ignore_ascii_case("timestampadd")
                || i.value.eq_ignore_ascii_case("timestampdiff")
        }),
        _ => false,
    }
}

fn string(s: &str) -> Expr {
    Expr::value(Value::SingleQuotedString(s.to_string()))
}

fn call(name: &str, unit: &DateTimeField, value: &mut Expr) -> Expr {
    let value = std::mem::replace(value, Expr::value(Value::Null));
    let args = [string(&unit.to_string()), value]
        .into_iter()
        .map(|e| FunctionArg::Unnamed(FunctionArgExpr::Expr(e)))
        .collect();
    Expr::Function(ast::Function {
        name: ObjectName::from(vec![Ident::new(name)]),
        uses_odbc_syntax: false,
        parameters: FunctionArguments::None,
        args: FunctionArguments::List(FunctionArgumentList {
            duplicate_treatment: None,
            args,
            clauses: vec![],
        }),
        filter: None,
        null_treatment: None,
        over: None,
        within_group: vec![],
    })
}

#[cfg(test)]
mod tests {
    use datafusion::sql::sqlparser::dialect::PostgreSqlDialect;
    use datafusion::sql::sqlparser::parser::Parser;

    fn rewritten(sql: &str) -> String {
        let mut stmt = Parser::parse_sql(&PostgreSqlDialect {}, sql)
            .unwrap()
            .remove(0);
        super::rewrite(&mut stmt);
        stmt.to_string()
    }

    #[test]
    fn unit_keywords_become_strings() {
        assert_eq!(
            rewritten("SELECT TIMESTAMPADD(second, 1, ts), timestampdiff(DAY, a, b) FROM t"),
            "SELECT TIMESTAMPADD('SECOND', 1, ts), timestampdiff('DAY', a, b) FROM t"
        );
        // Anything else named like a unit is left alone.
        assert_eq!(
            rewritten("SELECT f(second), x.timestampadd(second, 1, ts) FROM t"),
            "SELECT f(second), x.timestampadd(second, 1, ts) FROM t"
        );
    }

    #[test]
    fn floor_and_ceil_to_a_unit_become_calls() {
        assert_eq!(
            rewritten("SELECT FLOOR(ts TO MINUTE), CEIL(FLOOR(ts TO DAY) TO WEEK), FLOOR(x) FROM t"),
            "SELECT timestamp_floor('MINUTE', ts), timestamp_ceil('WEEK', timestamp_floor('DAY', ts)), FLOOR(x) FROM t"
        );
    }
}
