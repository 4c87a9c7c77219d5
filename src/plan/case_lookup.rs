//! A searched CASE whose leading branches compare one expression with literals and give
//! literals, `CASE WHEN x = 'a' THEN '0' WHEN x = 'b' THEN '1' ... ELSE e END`, is evaluated
//! as one lookup: `CASE WHEN x IN ('a', 'b') THEN CASE x WHEN 'a' THEN '0' ... END ELSE e END`.
//!
//! DataFusion evaluates a searched CASE a branch at a time, and after each WHEN copies the
//! rows not matched yet (every column the CASE reads) for the next one: Nexmark q21's four
//! channel names copied its url strings almost three times a row, a quarter of its
//! profile. The lookup form reads `x` against a table of the literals and splits the rows
//! once. Both give the same value for every row: a NULL `x` matches neither `x = lit` nor
//! `x IN (...)`, the first of repeated literals wins in both, `x` is evaluated for every row
//! by the first WHEN either way, and the remaining branches see the same rows.
//!
//! [`CaseLookup`] is an optimizer rule of the engine's session, so queries, views and jobs
//! all get it, and EXPLAIN shows it. It runs before DataFusion's common subexpression
//! elimination, which would take a comparison repeated within a projection out as a column
//! and leave its CASE without the comparisons the rewrite looks for.

use datafusion::common::tree_node::{Transformed, TreeNode};
use datafusion::common::Result;
use datafusion::logical_expr::expr::{Case, InList};
use datafusion::logical_expr::expr_rewriter::NamePreserver;
use datafusion::logical_expr::{BinaryExpr, Expr, LogicalPlan, Operator};
use datafusion::optimizer::{ApplyOrder, OptimizerConfig, OptimizerRule};

/// The rewrite for every expression of a plan; rewritten expressions keep their names, so
/// the plan's schemas do not change.
#[derive(Debug, Default)]
pub struct CaseLookup;

impl OptimizerRule for CaseLookup {
    fn name(&self) -> &str {
        "case_lookup"
    }

    fn apply_order(&self) -> Option<ApplyOrder> {
        Some(ApplyOrder::BottomUp)
    }

    fn supports_rewrite(&self) -> bool {
        true
    }

    fn rewrite(
        &self,
        plan: LogicalPlan,
        _config: &dyn OptimizerConfig,
    ) -> Result<Transformed<LogicalPlan>> {
        let names = NamePreserver::new(&plan);
        plan.map_expressions(|expr| {
            let name = names.save(&expr);
            Ok(rewrite_cases(expr)?.update_data(|e| name.restore(e)))
        })
    }
}

/// `expr` with each CASE of that shape (at least two such branches) rewritten.
pub fn rewrite(expr: Expr) -> Result<Expr> {
    rewrite_cases(expr).map(|t| t.data)
}

fn rewrite_cases(expr: Expr) -> Result<Transformed<Expr>> {
    expr.transform_up(|e| match e {
        Expr::Case(case) => Ok(match lookup(&case) {
            Some(rewritten) => Transformed::yes(rewritten),
            None => Transformed::no(Expr::Case(case)),
        }),
        other => Ok(Transformed::no(other)),
    })
}

/// `(x, literal)` of a `x = literal` or `literal = x` condition with a non-NULL literal.
fn compared(when: &Expr) -> Option<(&Expr, &Expr)> {
    let Expr::BinaryExpr(BinaryExpr {
        left,
        op: Operator::Eq,
        right,
    }) = when
    else {
        return None;
    };
    let literal = |e: &Expr| matches!(e, Expr::Literal(v, _) if !v.is_null());
    match (literal(left), literal(right)) {
        (false, true) => Some((left, right)),
        (true, false) => Some((right, left)),
        _ => None,
    }
}

fn lookup(case: &Case) -> Option<Expr> {
    if case.expr.is_some() {
        return None;
    }
    let mut subject: Option<&Expr> = None;
    let mut table: Vec<(Box<Expr>, Box<Expr>)> = Vec::new();
    for (when, then) in &case.when_then_expr {
        let Some((x, literal)) = compared(when) else {
            break;
        };
        if !matches!(**then, Expr::Literal(..)) || subject.is_some_and(|s| s != x) {
            break;
        }
        subject = Some(x);
        table.push((Box::new(literal.clone()), then.clone()));
    }
    let subject = subject.filter(|x| table.len() >= 2 && !x.is_volatile())?;
    let rest = &case.when_then_expr[table.len()..];
    let else_literal = case
        .else_expr
        .as_deref()
        .is_none_or(|e| matches!(e, Expr::Literal(..)));
    if rest.is_empty() && else_literal {
        // The whole CASE is the lookup.
        return Some(Expr::Case(Case {
            expr: Some(Box::new(subject.clone())),
            when_then_expr: table,
            else_expr: case.else_expr.clone(),
        }));
    }
    let matched = Expr::InList(InList {
        expr: Box::new(subject.clone()),
        list: table
            .iter()
            .map(|(literal, _)| (**literal).clone())
            .collect(),
        negated: false,
    });
    let looked_up = Expr::Case(Case {
        expr: Some(Box::new(subject.clone())),
        when_then_expr: table,
        else_expr: None,
    });
    let mut when_then_expr = vec![(Box::new(matched), Box::new(looked_up))];
    when_then_expr.extend(rest.iter().cloned());
    Some(Expr::Case(Case {
        expr: None,
        when_then_expr,
        else_expr: case.else_expr.clone(),
    }))
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use datafusion::arrow::array::{ArrayRef, Int64Array, StringArray};
    use datafusion::arrow::datatypes::{DataType, Field, Schema};
    use datafusion::arrow::record_batch::RecordBatch;
    use datafusion::common::DFSchema;
    use datafusion::execution::context::SessionContext;
    use datafusion::functions::string::expr_fn::lower;
    use datafusion::logical_expr::{cast, col, lit, when};

    use super::*;

    fn batch() -> RecordBatch {
        let channel: ArrayRef = Arc::new(StringArray::from(vec![
            Some("Apple"),
            Some("google"),
            None,
            Some("other"),
            Some("BAIDU"),
            Some("x"),
        ]));
        let n: ArrayRef = Arc::new(Int64Array::from(vec![
            Some(1),
            Some(2),
            Some(3),
            None,
            Some(5),
            Some(6),
        ]));
        let schema = Schema::new(vec![
            Field::new("channel", DataType::Utf8, true),
            Field::new("n", DataType::Int64, true),
        ]);
        RecordBatch::try_new(Arc::new(schema), vec![channel, n]).unwrap()
    }

    /// The expression's values over `batch()`, as text.
    fn values(expr: Expr) -> Vec<String> {
        let batch = batch();
        let schema = DFSchema::try_from(batch.schema().as_ref().clone()).unwrap();
        let state = SessionContext::new().state();
        let physical = state.create_physical_expr(expr, &schema).unwrap();
        let array = physical
            .evaluate(&batch)
            .unwrap()
            .into_array(batch.num_rows())
            .unwrap();
        (0..array.len())
            .map(|i| datafusion::arrow::util::display::array_value_to_string(&array, i).unwrap())
            .collect()
    }

    /// Rewrites `expr`, checks it was rewritten, and that both give the same values.
    fn same_values(expr: Expr) -> (Expr, Vec<String>) {
        let rewritten = rewrite(expr.clone()).unwrap();
        assert_ne!(rewritten, expr, "not rewritten");
        let (before, after) = (values(expr), values(rewritten.clone()));
        assert_eq!(before, after);
        (rewritten, after)
    }

    fn channel() -> Expr {
        lower(col("channel"))
    }

    #[test]
    fn leading_literal_branches_become_one_lookup_before_the_rest() {
        let expr = when(channel().eq(lit("apple")), lit("0"))
            .when(lit("google").eq(channel()), lit("1"))
            .when(channel().eq(lit("apple")), lit("repeated"))
            .when(col("n").gt(lit(4i64)), lit("big"))
            .otherwise(cast(col("n"), DataType::Utf8))
            .unwrap();
        let (rewritten, values) = same_values(expr);
        assert_eq!(values, ["0", "1", "3", "", "big", "big"]);
        let Expr::Case(outer) = rewritten else {
            panic!("{rewritten}")
        };
        assert!(matches!(*outer.when_then_expr[0].0, Expr::InList(_)));
        assert_eq!(outer.when_then_expr.len(), 2, "{outer:?}");
    }

    #[test]
    fn a_case_of_literal_branches_only_is_the_lookup_itself() {
        for otherwise in [Some(lit("none")), None] {
            let mut branches = when(channel().eq(lit("apple")), lit("0"))
                .when(channel().eq(lit("baidu")), lit("3"));
            let expr = match otherwise.clone() {
                Some(e) => branches.otherwise(e),
                None => branches.end(),
            }
            .unwrap();
            let (rewritten, values) = same_values(expr);
            let other = if otherwise.is_some() { "none" } else { "" };
            assert_eq!(values, ["0", other, other, other, "3", other]);
            assert!(matches!(rewritten, Expr::Case(Case { expr: Some(_), .. })));
        }
    }

    #[test]
    fn other_shapes_are_left_alone() {
        let unchanged = [
            // One branch: nothing to look up.
            when(channel().eq(lit("apple")), lit("0"))
                .otherwise(col("channel"))
                .unwrap(),
            // Different subjects.
            when(channel().eq(lit("apple")), lit("0"))
                .when(col("channel").eq(lit("google")), lit("1"))
                .end()
                .unwrap(),
            // A THEN that is not a literal leads.
            when(channel().eq(lit("apple")), col("channel"))
                .when(channel().eq(lit("google")), lit("1"))
                .end()
                .unwrap(),
            // A NULL literal compares with nothing.
            when(
                channel().eq(Expr::Literal(
                    datafusion::common::ScalarValue::Utf8(None),
                    None,
                )),
                lit("0"),
            )
            .when(channel().eq(lit("google")), lit("1"))
            .end()
            .unwrap(),
        ];
        for expr in unchanged {
            assert_eq!(rewrite(expr.clone()).unwrap(), expr);
        }
    }
}
