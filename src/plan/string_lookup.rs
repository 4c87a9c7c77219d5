//! The lookup form [`crate::plan::case_lookup`] gives a CASE,
//! `CASE WHEN x IN ('a', 'b') THEN CASE x WHEN 'a' THEN '0' WHEN 'b' THEN '1' END ELSE e END`,
//! evaluated in one pass when `x`, the values and `e` are strings and `e` is a column: each
//! row's `x` is looked up among the literals and the row takes the value found, or `e`'s.
//! (With a literal ELSE the rewrite makes a simple CASE, which DataFusion evaluates with a
//! lookup table of its own.)
//!
//! DataFusion evaluates that CASE as an IN list, then splits the rows in two (copying the
//! columns the CASE reads), evaluates the inner CASE over the matched half and `e` over
//! the other, and merges the halves (Nexmark q21: 13 % of its profile).
//! Reading `e` for every row is safe only because a column costs nothing and cannot fail;
//! any other `e` keeps DataFusion's evaluation.
//!
//! [`speed_up`] puts it in place of each such CASE of a physical expression; EXPLAIN shows
//! the CASE it stands for.

use std::collections::HashSet;
use std::fmt;
use std::sync::Arc;

use datafusion::arrow::array::{Array, AsArray, StringArray, StringBuilder};
use datafusion::arrow::datatypes::{DataType, Schema};
use datafusion::arrow::record_batch::RecordBatch;
use datafusion::common::{Result, ScalarValue};
use datafusion::logical_expr::ColumnarValue;
use datafusion::physical_expr::expressions::{CaseExpr, Column, InListExpr, Literal};
use datafusion::physical_expr::PhysicalExpr;

use crate::plan::string_in_list::{Literals, StringInList};

/// `physical` with each CASE of the lookup form over strings evaluated in one pass.
pub fn speed_up(physical: Arc<dyn PhysicalExpr>) -> Result<Arc<dyn PhysicalExpr>> {
    crate::plan::replace_with_faster(physical, StringLookup::of)
}

/// A string literal's value (`Some(None)` for a NULL string); `None` for anything else.
fn string_literal(e: &Arc<dyn PhysicalExpr>) -> Option<Option<&str>> {
    match e.downcast_ref::<Literal>()?.value() {
        ScalarValue::Utf8(v) => Some(v.as_deref()),
        _ => None,
    }
}

#[derive(Debug)]
pub struct StringLookup {
    /// The CASE this stands for, for display, children and equality.
    original: Arc<dyn PhysicalExpr>,
    subject: Arc<dyn PhysicalExpr>,
    literals: Literals,
    /// The value of each literal, by its place.
    values: Vec<Option<String>>,
    /// The value of a row whose subject is none of the literals: a column.
    otherwise: Arc<dyn PhysicalExpr>,
}

impl StringLookup {
    fn of(expr: &Arc<dyn PhysicalExpr>) -> Option<Self> {
        let case = expr.downcast_ref::<CaseExpr>()?;
        let otherwise = case.else_expr().filter(|e| e.is::<Column>())?.clone();
        if case.expr().is_some() || case.when_then_expr().len() != 1 {
            return None;
        }
        let (matched, looked_up) = &case.when_then_expr()[0];
        // The IN list, whether or not it was made a StringInList first.
        let matched = match matched.downcast_ref::<StringInList>() {
            Some(fast) => fast.original(),
            None => matched,
        };
        let in_list = matched.downcast_ref::<InListExpr>()?;
        let inner = looked_up.downcast_ref::<CaseExpr>()?;
        let subject = inner.expr()?;
        if in_list.negated()
            || in_list.expr().as_ref() != subject.as_ref()
            || inner.else_expr().is_some()
        {
            return None;
        }
        let mut whens = Vec::with_capacity(inner.when_then_expr().len());
        let mut values = Vec::with_capacity(whens.capacity());
        for (when, then) in inner.when_then_expr() {
            whens.push(string_literal(when)??);
            values.push(string_literal(then)?.map(str::to_string));
        }
        let listed = in_list
            .list()
            .iter()
            .map(|l| string_literal(l)?)
            .collect::<Option<HashSet<&str>>>()?;
        // Rows the IN list matches are exactly those the inner CASE has a branch for.
        if listed != whens.iter().copied().collect() {
            return None;
        }
        Some(Self {
            original: expr.clone(),
            subject: subject.clone(),
            literals: Literals::new(whens.into_iter()),
            values,
            otherwise,
        })
    }

    /// Each row's value: the one of its subject's literal, else `otherwise`'s.
    fn look_up(&self, subject: &StringArray, otherwise: &StringArray) -> StringArray {
        let rows = subject.len();
        let mut out = StringBuilder::with_capacity(rows, subject.value_data().len());
        for i in 0..rows {
            let found = if subject.is_null(i) {
                None
            } else {
                self.literals.find(subject.value(i).as_bytes())
            };
            match found {
                Some(place) => out.append_option(self.values[place].as_deref()),
                None if otherwise.is_null(i) => out.append_null(),
                None => out.append_value(otherwise.value(i)),
            }
        }
        out.finish()
    }
}

crate::plan::same_as_original!(StringLookup);

impl PhysicalExpr for StringLookup {
    fn data_type(&self, input_schema: &Schema) -> Result<DataType> {
        self.original.data_type(input_schema)
    }

    fn nullable(&self, input_schema: &Schema) -> Result<bool> {
        self.original.nullable(input_schema)
    }

    fn evaluate(&self, batch: &RecordBatch) -> Result<ColumnarValue> {
        let rows = batch.num_rows();
        let subject = self.subject.evaluate(batch)?.into_array(rows)?;
        let otherwise = self.otherwise.evaluate(batch)?.into_array(rows)?;
        // Other types (a view or large strings) keep DataFusion's evaluation.
        match (
            subject.as_string_opt::<i32>(),
            otherwise.as_string_opt::<i32>(),
        ) {
            (Some(subject), Some(otherwise)) => Ok(ColumnarValue::Array(Arc::new(
                self.look_up(subject, otherwise),
            ))),
            _ => self.original.evaluate(batch),
        }
    }

    fn children(&self) -> Vec<&Arc<dyn PhysicalExpr>> {
        self.original.children()
    }

    fn with_new_children(
        self: Arc<Self>,
        children: Vec<Arc<dyn PhysicalExpr>>,
    ) -> Result<Arc<dyn PhysicalExpr>> {
        let original = self.original.clone().with_new_children(children)?;
        Ok(match Self::of(&original) {
            Some(fast) => Arc::new(fast),
            None => original,
        })
    }

    fn fmt_sql(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.original.fmt_sql(f)
    }
}

#[cfg(test)]
mod tests {
    use datafusion::arrow::array::ArrayRef;
    use datafusion::arrow::datatypes::Field;
    use datafusion::logical_expr::Operator;
    use datafusion::physical_expr::expressions::{binary, case, col, in_list, lit};

    use super::*;

    /// Rows (subject, other): matches, a repeated literal, NULLs on either side, misses.
    fn batch() -> RecordBatch {
        let subject = [
            Some("apple"),
            Some("baidu"),
            None,
            Some("pear"),
            Some(""),
            Some("google"),
            Some("Apple"),
            Some("facebook"),
        ];
        let other = [
            Some("o0"),
            Some("o1"),
            Some("o2"),
            None,
            Some("o4"),
            Some("o5"),
            Some("o6"),
            None,
        ];
        let s: ArrayRef = Arc::new(StringArray::from(subject.to_vec()));
        let o: ArrayRef = Arc::new(StringArray::from(other.to_vec()));
        let schema = Schema::new(vec![
            Field::new("s", s.data_type().clone(), true),
            Field::new("o", o.data_type().clone(), true),
        ]);
        RecordBatch::try_new(Arc::new(schema), vec![s, o]).unwrap()
    }

    /// `CASE WHEN s IN (listed) THEN CASE s WHEN .. THEN .. END ELSE otherwise END`.
    fn lookup_case(
        schema: &Schema,
        listed: &[&str],
        branches: &[(&str, Option<&str>)],
        otherwise: Arc<dyn PhysicalExpr>,
    ) -> Arc<dyn PhysicalExpr> {
        let s = col("s", schema).unwrap();
        let matched = in_list(
            s.clone(),
            listed.iter().map(|l| lit(*l)).collect(),
            &false,
            schema,
        )
        .unwrap();
        let inner = case(
            Some(s),
            branches
                .iter()
                .map(|(w, t)| (lit(*w), lit(ScalarValue::Utf8(t.map(str::to_string)))))
                .collect(),
            None,
        )
        .unwrap();
        case(None, vec![(matched, inner)], Some(otherwise)).unwrap()
    }

    fn rows(v: ColumnarValue, n: usize) -> Vec<Option<String>> {
        let a = v.into_array(n).unwrap();
        let a = datafusion::arrow::compute::cast(&a, &DataType::Utf8).unwrap();
        a.as_string::<i32>()
            .iter()
            .map(|v| v.map(str::to_string))
            .collect()
    }

    #[test]
    fn the_same_rows_as_datafusions_case() {
        let branches = [
            ("apple", Some("0")),
            ("google", Some("1")),
            ("apple", Some("repeated")),
            ("baidu", None),
            ("", Some("empty")),
        ];
        let listed = ["apple", "google", "baidu", ""];
        let batch = batch();
        let schema = batch.schema();
        let original = lookup_case(&schema, &listed, &branches, col("o", &schema).unwrap());
        let fast = speed_up(original.clone()).unwrap();
        assert!(fast.is::<StringLookup>(), "{fast} is sped up");
        assert_eq!(fast.to_string(), original.to_string());
        let n = batch.num_rows();
        let expected = rows(original.evaluate(&batch).unwrap(), n);
        let got = rows(fast.evaluate(&batch).unwrap(), n);
        assert_eq!(got, expected);
        // The values themselves.
        let want = [
            Some("0"),
            None,
            Some("o2"),
            None,
            Some("empty"),
            Some("1"),
            Some("o6"),
            None,
        ];
        assert_eq!(got, want.map(|v| v.map(str::to_string)));
    }

    #[test]
    fn other_shapes_keep_datafusions_case() {
        let batch = batch();
        let schema = batch.schema();
        let branches = [("apple", Some("0")), ("google", Some("1"))];
        // An ELSE that computes (could fail on rows it would not see) or is a literal, and
        // an IN list other than the branches' literals.
        let computed = binary(
            col("o", &schema).unwrap(),
            Operator::StringConcat,
            lit("!"),
            &schema,
        )
        .unwrap();
        for e in [
            lookup_case(&schema, &["apple", "google"], &branches, computed),
            lookup_case(&schema, &["apple", "google"], &branches, lit("-")),
            lookup_case(&schema, &["apple"], &branches, col("o", &schema).unwrap()),
        ] {
            assert!(speed_up(e).unwrap().is::<CaseExpr>());
        }
    }

    #[test]
    fn a_fast_in_list_under_it_is_still_recognised() {
        let batch = batch();
        let schema = batch.schema();
        let original = lookup_case(
            &schema,
            &["apple", "google"],
            &[("apple", Some("0")), ("google", Some("1"))],
            col("o", &schema).unwrap(),
        );
        let in_list_first = crate::plan::string_in_list::speed_up(original.clone()).unwrap();
        let fast = speed_up(in_list_first).unwrap();
        assert!(fast.is::<StringLookup>());
        let n = batch.num_rows();
        assert_eq!(
            rows(fast.evaluate(&batch).unwrap(), n),
            rows(original.evaluate(&batch).unwrap(), n)
        );
    }
}
