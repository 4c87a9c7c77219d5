//! Regular and interval joins (window joins are planned with the windows they join).
//!
//! Both inputs are hashed on their equi-join keys to the same subtasks; a join without
//! keys gathers both to one. When the condition bounds one input's time attribute by the
//! other's, the join is an interval join whose state the watermark cleans; otherwise its
//! state is kept per key until the state TTL (the session's, or a STATE_TTL hint's).

use std::sync::Arc;

use datafusion::arrow::datatypes::SchemaRef;
use datafusion::common::{NullEquality, Result, ScalarValue};
use datafusion::datasource::{source_as_provider, ViewTable};
use datafusion::logical_expr::type_coercion::binary::comparison_coercion;
use datafusion::logical_expr::utils::split_conjunction;
use datafusion::logical_expr::{BinaryExpr, Expr, ExprSchemable, Join, JoinType, LogicalPlan};
use datafusion::logical_expr::{Operator as BinOp, TableScan};

use super::{refuse, strip_alias, Planner, Stream};
use crate::connector::connector_table::ConnectorTable;
use crate::connector::log_table::LogTable;
use crate::plan::state_ttl_hint::ttl_of_alias;
use crate::plan::window_table::{WindowTvfTable, WINDOW_TIME};
use crate::stream::graph::{ChangelogMode, Edge, NodeKind, StreamNode};
use crate::stream::message::Millis;
use crate::stream::ops::join::{system_clock, Interval, JoinKind, JoinSpec, StreamJoin};

impl Planner<'_> {
    /// A streaming join of `left` and `right` (the planned inputs of `join`).
    pub(super) fn plan_join(
        &mut self,
        plan: &LogicalPlan,
        join: &Join,
        left: Stream,
        right: Stream,
    ) -> Result<Stream> {
        let kind = match join.join_type {
            JoinType::Inner => JoinKind::Inner,
            JoinType::Left => JoinKind::Left,
            JoinType::Right => JoinKind::Right,
            JoinType::Full => JoinKind::Full,
            JoinType::LeftSemi => JoinKind::LeftSemi,
            JoinType::LeftAnti if !join.null_aware => JoinKind::LeftAnti,
            JoinType::RightSemi => JoinKind::RightSemi,
            JoinType::RightAnti => JoinKind::RightAnti,
            _ => {
                return Err(refuse(format!(
                    "{} cannot run as a streaming join: NOT IN (subquery) and EXISTS inside \
                     OR are not supported; write NOT EXISTS, or an outer join with IS NULL",
                    plan.display()
                )))
            }
        };
        let mut keys = [Vec::new(), Vec::new()];
        let mut on = Vec::new();
        for (l, r) in &join.on {
            let (lt, rt) = (l.get_type(&left.schema)?, r.get_type(&right.schema)?);
            // Equal keys must encode and hash alike on both sides.
            let (l, r) = if lt == rt {
                (l.clone(), r.clone())
            } else {
                let common = comparison_coercion(&lt, &rt)
                    .ok_or_else(|| refuse(format!("cannot join {l} ({lt}) with {r} ({rt})")))?;
                (
                    l.clone().cast_to(&common, &left.schema)?,
                    r.clone().cast_to(&common, &right.schema)?,
                )
            };
            keys[0].push(self.physical(&l, &left.schema)?);
            keys[1].push(self.physical(&r, &right.schema)?);
            on.push(format!("{l} = {r}"));
        }
        let pairs = left.schema.as_ref().clone().join(&right.schema)?;
        let filter = match &join.filter {
            Some(f) => Some(self.physical(f, &pairs)?),
            None => None,
        };
        let insert_only = left.changelog == ChangelogMode::InsertOnly
            && right.changelog == ChangelogMode::InsertOnly;
        let interval = if insert_only && kind.filtering().is_none() {
            interval_bounds(join, &left, &right)
        } else {
            None
        };
        let ttl = [&join.left, &join.right]
            .map(|input| hinted_ttl(input).or(self.state_ttl.map(|t| t.as_millis() as Millis)));

        let mut detail = format!("{} join", kind.name());
        if on.is_empty() {
            detail.push_str(" without equi-join keys");
        } else {
            detail.push_str(&format!(" on {}", on.join(" AND ")));
        }
        let (name, rest) = match &interval {
            Some(iv) => {
                detail.push_str(&format!(", {}", iv.bounds));
                ("IntervalJoin", iv.rest.as_ref())
            }
            None => ("Join", join.filter.as_ref()),
        };
        // Errors and notices name the join by its keys; EXPLAIN shows the rest too.
        let operator = format!("{name} ({detail})");
        if let Some(f) = rest {
            detail.push_str(&format!(", filter {}", readable_intervals(&f.to_string())));
        }
        if interval.is_none() {
            match ttl {
                [Some(l), Some(r)] if l == r => {
                    detail.push_str(&format!(", state TTL {}", duration(l)))
                }
                [l, r] if l.is_some() || r.is_some() => detail.push_str(&format!(
                    ", state TTL left {}, right {}",
                    l.map_or("none".into(), duration),
                    r.map_or("none".into(), duration)
                )),
                _ => {}
            }
        }
        let mut state = if interval.is_some() {
            "rows of both inputs until the watermark passes their time bounds".to_string()
        } else if ttl.iter().all(|t| t.is_some()) {
            "rows of both inputs per join key, until the state TTL".to_string()
        } else {
            self.unbounded_state(&operator);
            "rows of both inputs per join key".to_string()
        };

        let (left_exchange, parallelism) = self.keyed(keys[0].clone());
        let (right_exchange, _) = self.keyed(keys[1].clone());
        let output: SchemaRef = Arc::new(join.schema.as_arrow().clone());
        let spec = Arc::new(JoinSpec {
            kind,
            keys,
            null_equals_null: join.null_equality == NullEquality::NullEqualsNull,
            filter,
            inputs: [
                Arc::new(left.schema.as_arrow().clone()),
                Arc::new(right.schema.as_arrow().clone()),
            ],
            output: output.clone(),
            interval: interval.as_ref().map(|iv| iv.interval),
            ttl: if interval.is_some() {
                [None, None]
            } else {
                ttl
            },
            insert_only: [
                left.changelog == ChangelogMode::InsertOnly,
                right.changelog == ChangelogMode::InsertOnly,
            ],
        });
        let backend = self.backend.clone().filter(|_| spec.can_spill());
        if let Some(b) = &backend {
            state.push_str(&format!(", {}", b.describe()));
        }
        // Inserts stay inserts when no row is ever taken back: an inner or semi join of
        // insert-only inputs, or an interval join (which pads rows only once they expire).
        let changelog = if insert_only
            && (interval.is_some()
                || matches!(
                    kind,
                    JoinKind::Inner | JoinKind::LeftSemi | JoinKind::RightSemi
                )) {
            ChangelogMode::InsertOnly
        } else {
            ChangelogMode::Retract
        };
        let node = self.add(StreamNode {
            name: name.into(),
            detail,
            state,
            parallelism,
            inputs: vec![
                Edge {
                    from: left.node,
                    exchange: left_exchange,
                },
                Edge {
                    from: right.node,
                    exchange: right_exchange,
                },
            ],
            kind: NodeKind::Operator(Arc::new(move |_| {
                Ok(Box::new(
                    StreamJoin::try_new(spec.clone(), system_clock())?
                        .with_backend(backend.as_ref())?,
                ) as _)
            })),
            schema: output,
            changelog: ChangelogMode::InsertOnly,
        });
        let mut out = Stream {
            node,
            schema: join.schema.clone(),
            parallelism,
            windows: None,
            slicing: None,
            changelog: ChangelogMode::InsertOnly,
            updated_by: None,
            upsert_key: None,
        };
        if changelog == ChangelogMode::Retract {
            // An inner or semi join only passes on its inputs' corrections: name their
            // origin. Outer and anti joins correct rows of their own.
            let passes_on = matches!(
                kind,
                JoinKind::Inner | JoinKind::LeftSemi | JoinKind::RightSemi
            ) && interval.is_none();
            let by = match passes_on {
                true => left.updated_by.clone().or(right.updated_by.clone()),
                false => None,
            };
            self.set_updating(&mut out, by.unwrap_or(operator));
            // A row of an inner join is the pair of its input rows; semi and anti joins
            // emit rows of one input as they are. Outer joins claim no key.
            let key = match kind {
                JoinKind::Inner => match (&left.upsert_key, &right.upsert_key) {
                    (Some(l), Some(r)) => {
                        let width = left.schema.fields().len();
                        Some(
                            l.iter()
                                .copied()
                                .chain(r.iter().map(|i| i + width))
                                .collect(),
                        )
                    }
                    _ => None,
                },
                JoinKind::LeftSemi | JoinKind::LeftAnti => left.upsert_key.clone(),
                JoinKind::RightSemi | JoinKind::RightAnti => right.upsert_key.clone(),
                _ => None,
            };
            if let Some(key) = key {
                self.set_upsert_key(&mut out, key);
            }
        }
        Ok(out)
    }
}

/// "15s", "1h", "250ms".
pub(super) fn duration(ms: Millis) -> String {
    match ms {
        0 => "0s".into(),
        v if v % 86_400_000 == 0 => format!("{}d", v / 86_400_000),
        v if v % 3_600_000 == 0 => format!("{}h", v / 3_600_000),
        v if v % 60_000 == 0 => format!("{}min", v / 60_000),
        v if v % 1000 == 0 => format!("{}s", v / 1000),
        v => format!("{v}ms"),
    }
}

/// `text` with DataFusion's debug form of interval literals written as SQL intervals.
fn readable_intervals(text: &str) -> String {
    const OPEN: &str = "IntervalMonthDayNano(\"IntervalMonthDayNano { ";
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(start) = rest.find(OPEN) {
        out.push_str(&rest[..start]);
        let body = &rest[start + OPEN.len()..];
        let Some(end) = body.find(" }\")") else {
            out.push_str(&rest[start..]);
            return out;
        };
        let mut parts = [0i64; 3];
        for (i, field) in body[..end].split(", ").enumerate().take(3) {
            parts[i] = field
                .rsplit(": ")
                .next()
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
        }
        let ms = parts[1] * 86_400_000 + parts[2] / 1_000_000;
        let sql = match ms {
            _ if parts[0] != 0 => format!("INTERVAL '{}' MONTH", parts[0]),
            v if v % 86_400_000 == 0 => format!("INTERVAL '{}' DAY", v / 86_400_000),
            v if v % 3_600_000 == 0 => format!("INTERVAL '{}' HOUR", v / 3_600_000),
            v if v % 60_000 == 0 => format!("INTERVAL '{}' MINUTE", v / 60_000),
            v => format!("INTERVAL '{}' SECOND", v as f64 / 1000.0),
        };
        out.push_str(&sql);
        rest = &body[end + " }\")".len()..];
    }
    out.push_str(rest);
    out
}

/// The TTL a STATE_TTL hint gave the input `plan`.
pub(super) fn hinted_ttl(plan: &LogicalPlan) -> Option<Millis> {
    match plan {
        LogicalPlan::SubqueryAlias(a) => {
            ttl_of_alias(a.alias.table()).or_else(|| hinted_ttl(&a.input))
        }
        LogicalPlan::Projection(p) => hinted_ttl(&p.input),
        LogicalPlan::Filter(f) => hinted_ttl(&f.input),
        _ => None,
    }
}

/// An interval join's bounds, how EXPLAIN shows them, and the rest of its condition.
struct IntervalCondition {
    interval: Interval,
    bounds: String,
    rest: Option<Expr>,
}

/// Time bounds between a time attribute of each input: conjuncts of the join filter
/// `x op y` (op one of < <= > >=, or BETWEEN) where x and y are a time column of each
/// input plus or minus a constant day-time interval.
fn interval_bounds(join: &Join, left: &Stream, right: &Stream) -> Option<IntervalCondition> {
    let filter = join.filter.as_ref()?;
    let conjuncts = split_conjunction(filter);
    // Per (left column, right column): bounds on right time - left time, and the
    // conjuncts that gave them.
    // A bound is (value, strict).
    type Bound = Option<(Millis, bool)>;
    type Bounds = ((usize, usize), Bound, Bound, Vec<usize>);
    let mut found: Vec<Bounds> = Vec::new();
    let mut add = |x: &Expr, op: BinOp, y: &Expr, conjunct: usize| -> Option<()> {
        let (x, y) = (term(x, left, right)?, term(y, left, right)?);
        // Written as lt + lo OP rt + ro.
        let (l, r, op) = match (x.0, y.0) {
            (0, 1) => (x, y, op),
            (1, 0) => (y, x, op.swap()?),
            _ => return None,
        };
        let bound = l.2.checked_sub(r.2)?;
        let cols = (l.1, r.1);
        let at = match found.iter().position(|f| f.0 == cols) {
            Some(at) => at,
            None => {
                found.push((cols, None, None, Vec::new()));
                found.len() - 1
            }
        };
        let entry = &mut found[at];
        let strict = matches!(op, BinOp::Lt | BinOp::Gt);
        // The tighter bound wins; at equal values, a strict one.
        let tighter = |old: Bound, new: (Millis, bool), lower: bool| match old {
            Some(o) if o.0 == new.0 => Some((o.0, o.1 || new.1)),
            Some(o) if (o.0 > new.0) == lower => Some(o),
            _ => Some(new),
        };
        match op {
            // lt + lo < rt + ro: rt - lt > lo - ro.
            BinOp::Lt | BinOp::LtEq => entry.1 = tighter(entry.1, (bound, strict), true),
            BinOp::Gt | BinOp::GtEq => entry.2 = tighter(entry.2, (bound, strict), false),
            _ => return None,
        }
        entry.3.push(conjunct);
        Some(())
    };
    for (i, conjunct) in conjuncts.iter().enumerate() {
        match conjunct {
            Expr::BinaryExpr(BinaryExpr {
                left: x,
                op,
                right: y,
            }) if matches!(op, BinOp::Lt | BinOp::LtEq | BinOp::Gt | BinOp::GtEq) => {
                add(x, *op, y, i);
            }
            Expr::Between(b) if !b.negated => {
                add(&b.expr, BinOp::GtEq, &b.low, i);
                add(&b.expr, BinOp::LtEq, &b.high, i);
            }
            _ => {}
        }
    }
    let ((lc, rc), lower, upper, used) =
        found.into_iter().find(|((lc, rc), lower, upper, _)| {
            lower.is_some()
                && upper.is_some()
                && time_attribute(&join.left, *lc)
                && time_attribute(&join.right, *rc)
        })?;
    let ((lower, lower_strict), (upper, upper_strict)) = (lower?, upper?);
    let name = |schema: &datafusion::common::DFSchema, i: usize| {
        let (q, f) = schema.qualified_field(i);
        match q {
            Some(q) => format!("{q}.{}", f.name()),
            None => f.name().clone(),
        }
    };
    let offset = |ms: Millis| match ms {
        0 => String::new(),
        v if v > 0 => format!(" + {}", duration(v)),
        v => format!(" - {}", duration(-v)),
    };
    let (lq, rq) = (name(&left.schema, lc), name(&right.schema, rc));
    let rest = conjuncts
        .iter()
        .enumerate()
        .filter(|(i, _)| !used.contains(i))
        .map(|(_, c)| (*c).clone())
        .reduce(Expr::and);
    Some(IntervalCondition {
        // Strict bounds are kept inclusive: they only decide when rows are dropped,
        // and wider is safe (the condition itself is evaluated exactly).
        interval: Interval {
            left_time: lc,
            right_time: rc,
            lower,
            upper,
        },
        bounds: format!(
            "{lq}{} {} {rq} {} {lq}{}",
            offset(lower),
            if lower_strict { "<" } else { "<=" },
            if upper_strict { "<" } else { "<=" },
            offset(upper)
        ),
        rest,
    })
}

/// `x` as (input, column, offset): a column of one input plus or minus an interval.
fn term(x: &Expr, left: &Stream, right: &Stream) -> Option<(usize, usize, Millis)> {
    match strip_alias(x) {
        Expr::Column(c) => {
            if let Ok(i) = left.schema.index_of_column(c) {
                Some((0, i, 0))
            } else {
                right.schema.index_of_column(c).ok().map(|i| (1, i, 0))
            }
        }
        Expr::Cast(c) if c.field.data_type().is_temporal() => term(&c.expr, left, right),
        Expr::TryCast(c) if c.field.data_type().is_temporal() => term(&c.expr, left, right),
        Expr::BinaryExpr(BinaryExpr {
            left: a,
            op,
            right: b,
        }) => match op {
            BinOp::Plus => match (term(a, left, right), interval_millis(b)) {
                (Some((s, c, o)), Some(ms)) => Some((s, c, o.checked_add(ms)?)),
                _ => {
                    let (s, c, o) = term(b, left, right)?;
                    Some((s, c, o.checked_add(interval_millis(a)?)?))
                }
            },
            BinOp::Minus => {
                let (s, c, o) = term(a, left, right)?;
                Some((s, c, o.checked_sub(interval_millis(b)?)?))
            }
            _ => None,
        },
        _ => None,
    }
}

/// Milliseconds of a constant day-time interval or duration.
fn interval_millis(e: &Expr) -> Option<Millis> {
    let Expr::Literal(value, _) = strip_alias(e) else {
        return None;
    };
    match value {
        ScalarValue::IntervalMonthDayNano(Some(v)) if v.months == 0 => {
            Some(v.days as Millis * 86_400_000 + v.nanoseconds / 1_000_000)
        }
        ScalarValue::IntervalDayTime(Some(v)) => {
            Some(v.days as Millis * 86_400_000 + v.milliseconds as Millis)
        }
        ScalarValue::DurationSecond(Some(v)) => v.checked_mul(1000),
        ScalarValue::DurationMillisecond(Some(v)) => Some(*v),
        ScalarValue::DurationMicrosecond(Some(v)) => Some(v / 1000),
        ScalarValue::DurationNanosecond(Some(v)) => Some(v / 1_000_000),
        _ => None,
    }
}

/// Whether column `column` of `plan` is a source's watermarked time attribute, passed on
/// unchanged (so the watermarks the join receives bound it), or the `window_time` of a
/// window table function, also through a window aggregate grouped by it (as Flink: the
/// rows of a window come out when the watermark passes its end, and later windows end
/// later).
fn time_attribute(plan: &LogicalPlan, column: usize) -> bool {
    match plan {
        LogicalPlan::Aggregate(a) => a
            .group_expr
            .get(column)
            .and_then(|e| super::passthrough(e, a.input.schema()))
            .is_some_and(|i| {
                a.input.schema().field(i).name() == WINDOW_TIME && time_attribute(&a.input, i)
            }),
        LogicalPlan::SubqueryAlias(a) => time_attribute(&a.input, column),
        LogicalPlan::Filter(f) => time_attribute(&f.input, column),
        LogicalPlan::Projection(p) => p
            .expr
            .get(column)
            .and_then(|e| super::passthrough(e, p.input.schema()))
            .is_some_and(|i| time_attribute(&p.input, i)),
        LogicalPlan::TableScan(scan) => scanned_time_attribute(scan, column),
        _ => false,
    }
}

fn scanned_time_attribute(scan: &TableScan, column: usize) -> bool {
    let Some(field) = scan.projected_schema.fields().get(column) else {
        return false;
    };
    let Ok(provider) = source_as_provider(&scan.source) else {
        return false;
    };
    let any: &dyn std::any::Any = provider.as_ref();
    let def = if let Some(log) = any.downcast_ref::<LogTable>() {
        log.def().clone()
    } else if let Some(table) = any.downcast_ref::<ConnectorTable>() {
        table.def().clone()
    } else if any.downcast_ref::<WindowTvfTable>().is_some() {
        return field.name() == WINDOW_TIME;
    } else if let Some(view) = any.downcast_ref::<ViewTable>() {
        let plan = view.logical_plan();
        return plan
            .schema()
            .index_of_column_by_name(None, field.name())
            .is_some_and(|i| time_attribute(plan, i));
    } else {
        return false;
    };
    def.watermark
        .as_ref()
        .is_some_and(|w| w.column == *field.name())
}
