//! Function calls that a filter and the projections above it both evaluate are computed
//! once, before the filter. DataFusion's common subexpression elimination works within
//! one plan node, so `SELECT CASE ... ELSE f(x) END FROM t WHERE f(x) IS NOT NULL`
//! evaluated `f(x)` for every row in the filter and again for the rows it kept (Nexmark
//! q21: REGEXP_EXTRACT twice). Here a projection under the filter adds each shared call
//! as a column, and the filter and the projections read that column instead; of the
//! input's columns it passes on only those still read above it.

use std::collections::HashSet;
use std::sync::Arc;

use datafusion::common::tree_node::{Transformed, TreeNode, TreeNodeRecursion};
use datafusion::common::{Column, Result};
use datafusion::logical_expr::{Expr, Filter, LogicalPlan, Operator, Projection};

/// The name of the column holding shared call `i`.
fn column_name(i: usize) -> String {
    format!("__filter_shared_{i}")
}

/// `projection` (over more projections, over a filter) with the function calls of the
/// filter's predicate that a projection also evaluates computed once below the filter;
/// `None` when there are none. The result has `projection`'s schema.
pub fn share_with_filter(projection: &Projection) -> Result<Option<LogicalPlan>> {
    // The projections down to the filter, top first.
    let mut chain = vec![projection];
    let mut below = projection.input.as_ref();
    let filter = loop {
        match below {
            LogicalPlan::Projection(p) => {
                chain.push(p);
                below = p.input.as_ref();
            }
            LogicalPlan::Filter(f) => break f,
            _ => return Ok(None),
        }
    };
    // A filter on ROW_NUMBER() (over projections of the window) is planned as TopN.
    let mut under = filter.input.as_ref();
    while let LogicalPlan::Projection(p) = under {
        under = p.input.as_ref();
    }
    if matches!(under, LogicalPlan::Window(_)) {
        return Ok(None);
    }
    let shared = shared_calls(&filter.predicate, &chain)?;
    if shared.is_empty() {
        return Ok(None);
    }
    let columns: Vec<Expr> = (0..shared.len())
        .map(|i| Expr::Column(Column::new_unqualified(column_name(i))))
        .collect();
    // Shared calls are replaced in the predicate, and at each projection whose input
    // still has the columns they read as the filter had them.
    let replace = |expr: &Expr, below: &[&Projection]| -> Result<Expr> {
        expr.clone()
            .transform_down(|e| {
                Ok(match shared.iter().position(|s| *s == e) {
                    Some(i) if passes_columns(&e, below) => Transformed::yes(columns[i].clone()),
                    _ => Transformed::no(e),
                })
            })
            .map(|t| t.data)
    };
    let predicate = replace(&filter.predicate, &[])?;
    // Each projection's expressions, top first, with the shared calls replaced, keeping
    // only those read above: a column read only by shared calls (q21's url) is neither
    // passed on by the projections between nor copied by the filter.
    let mut exprs_of: Vec<Vec<Expr>> = Vec::with_capacity(chain.len());
    for (depth, p) in chain.iter().enumerate() {
        let exprs = p
            .expr
            .iter()
            .map(|e| replace(e, &chain[depth + 1..]))
            .collect::<Result<Vec<_>>>()?;
        let exprs = match exprs_of.last() {
            None => exprs,
            Some(above) => read_only(exprs, p, above),
        };
        exprs_of.push(exprs);
    }
    let mut read = predicate.column_refs();
    for e in exprs_of.last().expect("a projection") {
        read.extend(e.column_refs());
    }
    let mut computed: Vec<Expr> = filter
        .input
        .schema()
        .columns()
        .into_iter()
        .filter(|c| read.contains(c))
        .map(Expr::Column)
        .collect();
    computed.extend(
        shared
            .iter()
            .enumerate()
            .map(|(i, call)| call.clone().alias(column_name(i))),
    );
    let computed = LogicalPlan::Projection(Projection::try_new(computed, filter.input.clone())?);
    let mut plan = LogicalPlan::Filter(Filter::try_new(predicate, Arc::new(computed))?);
    for (depth, mut exprs) in exprs_of.into_iter().enumerate().rev() {
        plan = if depth == 0 {
            LogicalPlan::Projection(Projection::try_new_with_schema(
                exprs,
                Arc::new(plan),
                chain[0].schema.clone(),
            )?)
        } else {
            // Projections between pass the shared columns on.
            exprs.extend(columns.iter().cloned());
            LogicalPlan::Projection(Projection::try_new(exprs, Arc::new(plan))?)
        };
    }
    Ok(Some(plan))
}

/// Of `projection`'s expressions `exprs`, those whose column `above` reads (at least one,
/// so the projection keeps its rows).
fn read_only(exprs: Vec<Expr>, projection: &Projection, above: &[Expr]) -> Vec<Expr> {
    let read: HashSet<&Column> = above.iter().flat_map(|e| e.column_refs()).collect();
    let mut kept: Vec<Expr> = exprs
        .iter()
        .zip(projection.schema.columns())
        .filter(|(_, column)| read.contains(column))
        .map(|(e, _)| e.clone())
        .collect();
    if kept.is_empty() {
        kept.extend(exprs.into_iter().take(1));
    }
    kept
}

/// The outermost deterministic function calls of `predicate` that an expression of
/// `chain` also holds, among those the filter evaluates for every row: computing one
/// for every row before the filter must not evaluate what the filter would have skipped
/// (the right side of AND and OR, CASE branches, the arguments of lazy functions such
/// as coalesce), which could fail where the query does not.
fn shared_calls(predicate: &Expr, chain: &[&Projection]) -> Result<Vec<Expr>> {
    let mut shared = Vec::new();
    collect(predicate, chain, &mut shared)?;
    Ok(shared)
}

fn collect(e: &Expr, chain: &[&Projection], shared: &mut Vec<Expr>) -> Result<()> {
    if let Expr::ScalarFunction(call) = e {
        if !e.is_volatile() && used_in(e, chain)? {
            if !shared.contains(e) {
                shared.push(e.clone());
            }
            return Ok(());
        }
        if call.func.short_circuits() {
            return Ok(());
        }
    }
    match e {
        Expr::BinaryExpr(b) if matches!(b.op, Operator::And | Operator::Or) => {
            collect(&b.left, chain, shared)
        }
        Expr::Case(case) => match (&case.expr, case.when_then_expr.first()) {
            (Some(base), _) => collect(base, chain, shared),
            (None, Some((when, _))) => collect(when, chain, shared),
            (None, None) => Ok(()),
        },
        _ => e
            .apply_children(|child| {
                collect(child, chain, shared)?;
                Ok(TreeNodeRecursion::Continue)
            })
            .map(|_| ()),
    }
}

/// Whether an expression of `chain` (top first) holds `call` reading the columns the
/// filter has.
fn used_in(call: &Expr, chain: &[&Projection]) -> Result<bool> {
    let mut used = false;
    let exprs = chain
        .iter()
        .enumerate()
        .filter(|(depth, _)| passes_columns(call, &chain[depth + 1..]))
        .flat_map(|(_, p)| p.expr.iter());
    for expr in exprs {
        expr.apply(|x| {
            used |= x == call;
            Ok(if used {
                TreeNodeRecursion::Stop
            } else {
                TreeNodeRecursion::Continue
            })
        })?;
        if used {
            break;
        }
    }
    Ok(used)
}

/// Whether each of `projections` passes on the columns `call` reads unchanged (so that
/// above them the columns are those below).
fn passes_columns(call: &Expr, projections: &[&Projection]) -> bool {
    call.column_refs().iter().all(|&c| {
        projections.iter().all(|p| {
            p.expr
                .iter()
                .any(|e| matches!(e, Expr::Column(x) if x == c))
        })
    })
}

#[cfg(test)]
mod tests {
    use datafusion::arrow::datatypes::{DataType, Field, Schema};
    use datafusion::functions::expr_fn::{lower, upper};
    use datafusion::logical_expr::{col, lit, table_scan};

    use super::*;

    fn over_filter(predicate: Expr, select: Vec<Expr>) -> Projection {
        let schema = Schema::new(vec![
            Field::new("a", DataType::Utf8, true),
            Field::new("b", DataType::Utf8, true),
        ]);
        let plan = table_scan(Some("t"), &schema, None)
            .unwrap()
            .filter(predicate)
            .unwrap()
            .project(select)
            .unwrap()
            .build()
            .unwrap();
        match plan {
            LogicalPlan::Projection(p) => p,
            other => panic!("a projection, not {other}"),
        }
    }

    /// `projection` rewritten, one node per line; the rewrite keeps its schema.
    fn rewritten(projection: &Projection) -> Vec<String> {
        let plan = share_with_filter(projection)
            .unwrap()
            .expect("a shared call");
        assert_eq!(
            plan.schema(),
            &projection.schema,
            "the projection's schema stays"
        );
        let text = plan.display_indent().to_string();
        text.lines().map(|l| l.trim().to_string()).collect()
    }

    #[test]
    fn a_call_of_the_filter_and_the_projection_is_computed_once_below_the_filter() {
        let p = over_filter(
            upper(col("a"))
                .eq(lit("X"))
                .or(lower(col("b")).eq(lit("y"))),
            vec![upper(col("a")).alias("up"), lower(col("b"))],
        );
        assert_eq!(
            rewritten(&p),
            [
                "Projection: __filter_shared_0 AS up, lower(t.b)",
                "Filter: __filter_shared_0 = Utf8(\"X\") OR lower(t.b) = Utf8(\"y\")",
                "Projection: t.b, upper(t.a) AS __filter_shared_0",
                "TableScan: t",
            ]
        );
    }

    #[test]
    fn a_column_only_shared_calls_read_is_not_passed_to_the_filter() {
        // As DataFusion plans q21: a projection between computes what the top one reads
        // twice and passes on t.a, which only the shared call reads.
        let p = over_filter(upper(col("a")).is_not_null(), vec![col("t.a"), col("t.b")]);
        let between = Projection::try_new(
            vec![lower(col("t.b")).alias("c1"), col("t.a"), col("t.b")],
            Arc::new(LogicalPlan::Projection(p)),
        )
        .unwrap();
        let top = Projection::try_new(
            vec![col("c1"), col("c1").alias("again"), upper(col("t.a"))],
            Arc::new(LogicalPlan::Projection(between)),
        )
        .unwrap();
        assert_eq!(
            rewritten(&top),
            [
                "Projection: c1, c1 AS again, __filter_shared_0",
                "Projection: lower(t.b) AS c1, __filter_shared_0",
                "Projection: t.b, __filter_shared_0",
                "Filter: __filter_shared_0 IS NOT NULL",
                "Projection: t.b, upper(t.a) AS __filter_shared_0",
                "TableScan: t",
            ]
        );
    }

    #[test]
    fn a_call_over_a_column_a_projection_between_redefines_stays() {
        // The projection between names upper(t.b) t.a: above it, lower(t.a) reads that.
        let p = over_filter(lower(col("t.a")).eq(lit("x")), vec![col("t.b")]);
        let between = Projection::try_new(
            vec![upper(col("t.b")).alias_qualified(Some("t"), "a")],
            Arc::new(LogicalPlan::Projection(p)),
        )
        .unwrap();
        let top = Projection::try_new(
            vec![lower(col("t.a"))],
            Arc::new(LogicalPlan::Projection(between)),
        )
        .unwrap();
        assert!(share_with_filter(&top).unwrap().is_none());
    }

    #[test]
    fn calls_the_filter_may_skip_or_the_projection_lacks_stay() {
        // lower(b) is on the right of AND; upper(b) is not projected.
        let p = over_filter(
            upper(col("b"))
                .eq(lit("X"))
                .and(lower(col("b")).eq(lit("y"))),
            vec![lower(col("b")), col("a")],
        );
        assert!(share_with_filter(&p).unwrap().is_none());
    }
}
