//! `x IN ('a', 'b', ...)` over strings, against a few literals, compared directly.
//!
//! DataFusion evaluates an IN list of literals by hashing every row's value and probing a
//! table through a type-erased comparator: for a handful of short literals that was 10 %
//! of Nexmark q21's profile (`lower(channel) IN ('apple', 'google', 'facebook', 'baidu')`,
//! once in its filter and once in its CASE). Here the literals are grouped by length, and
//! a row's bytes are compared with the literals of its length only: most rows are told
//! apart by their length alone.
//!
//! [`speed_up`] puts it in place of each such `InListExpr` of a physical expression; the
//! result is the same for every row, NULL included (a NULL value gives NULL; the list has
//! no NULL, so a value not found gives false, or true under NOT IN).

use std::fmt;
use std::sync::Arc;

use datafusion::arrow::array::{Array, AsArray, BooleanArray, GenericStringArray, OffsetSizeTrait};
use datafusion::arrow::buffer::BooleanBuffer;
use datafusion::arrow::datatypes::{DataType, Schema};
use datafusion::arrow::record_batch::RecordBatch;
use datafusion::common::{Result, ScalarValue};
use datafusion::logical_expr::ColumnarValue;
use datafusion::physical_expr::expressions::{InListExpr, Literal};
use datafusion::physical_expr::PhysicalExpr;

/// Literals past which DataFusion's hash table is left in place.
const MAX_LITERALS: usize = 16;

/// `physical` with each IN list of a few string literals compared directly.
pub fn speed_up(physical: Arc<dyn PhysicalExpr>) -> Result<Arc<dyn PhysicalExpr>> {
    crate::plan::replace_with_faster(physical, StringInList::of)
}

/// String literals by length, each with its place among them (the first place of a
/// repeated one). Shared with [`crate::plan::string_lookup`].
#[derive(Debug, Clone)]
pub(crate) struct Literals {
    /// `by_len[n]`: the distinct literals of `n` bytes, with their places.
    by_len: Vec<Vec<(Box<[u8]>, usize)>>,
}

impl Literals {
    pub(crate) fn new<'a>(literals: impl Iterator<Item = &'a str>) -> Self {
        let mut by_len: Vec<Vec<(Box<[u8]>, usize)>> = Vec::new();
        for (place, l) in literals.enumerate() {
            let l = l.as_bytes();
            if by_len.len() <= l.len() {
                by_len.resize(l.len() + 1, Vec::new());
            }
            if !by_len[l.len()].iter().any(|(x, _)| x.as_ref() == l) {
                by_len[l.len()].push((l.into(), place));
            }
        }
        Self { by_len }
    }

    /// The place of the literal equal to `value`.
    #[inline(always)]
    pub(crate) fn find(&self, value: &[u8]) -> Option<usize> {
        self.by_len.get(value.len()).and_then(|same_len| {
            same_len
                .iter()
                .find(|(l, _)| same_bytes(l, value))
                .map(|(_, place)| *place)
        })
    }

    #[inline(always)]
    fn contains(&self, value: &[u8]) -> bool {
        self.find(value).is_some()
    }
}

/// `a == b` for slices of the same length, short ones compared in words: a slice
/// comparison is a call to `memcmp`, which cost as much as the rest of the lookup.
#[inline(always)]
fn same_bytes(a: &[u8], b: &[u8]) -> bool {
    debug_assert_eq!(a.len(), b.len());
    let n = a.len();
    // Two words that overlap when n is under twice their size cover every byte.
    #[inline(always)]
    fn word8(s: &[u8], at: usize) -> u64 {
        u64::from_le_bytes(s[at..at + 8].try_into().expect("8 bytes"))
    }
    #[inline(always)]
    fn word4(s: &[u8], at: usize) -> u32 {
        u32::from_le_bytes(s[at..at + 4].try_into().expect("4 bytes"))
    }
    match n {
        0..=3 => (0..n).all(|i| a[i] == b[i]),
        4..=7 => word4(a, 0) == word4(b, 0) && word4(a, n - 4) == word4(b, n - 4),
        8..=16 => word8(a, 0) == word8(b, 0) && word8(a, n - 8) == word8(b, n - 8),
        _ => a == b,
    }
}

#[derive(Debug)]
pub struct StringInList {
    /// The InList this stands for, for display, children and equality.
    original: Arc<dyn PhysicalExpr>,
    value: Arc<dyn PhysicalExpr>,
    literals: Literals,
    negated: bool,
}

impl StringInList {
    /// The direct form of `expr` when it is an IN list of at most [`MAX_LITERALS`] non-null
    /// string literals.
    fn of(expr: &Arc<dyn PhysicalExpr>) -> Option<Self> {
        let in_list = expr.downcast_ref::<InListExpr>()?;
        if in_list.list().is_empty() || in_list.list().len() > MAX_LITERALS {
            return None;
        }
        let strings = in_list
            .list()
            .iter()
            .map(|e| match e.downcast_ref::<Literal>()?.value() {
                ScalarValue::Utf8(Some(s))
                | ScalarValue::LargeUtf8(Some(s))
                | ScalarValue::Utf8View(Some(s)) => Some(s.as_str()),
                _ => None,
            })
            .collect::<Option<Vec<&str>>>()?;
        Some(Self {
            original: expr.clone(),
            value: in_list.expr().clone(),
            literals: Literals::new(strings.into_iter()),
            negated: in_list.negated(),
        })
    }

    /// The IN list this stands for.
    pub(crate) fn original(&self) -> &Arc<dyn PhysicalExpr> {
        &self.original
    }

    /// Whether each value is in the list (under NOT IN: is not), whatever its nulls.
    fn test_strings<O: OffsetSizeTrait>(&self, strings: &GenericStringArray<O>) -> BooleanBuffer {
        let (offsets, data) = (strings.value_offsets(), strings.value_data());
        BooleanBuffer::collect_bool(strings.len(), |i| {
            let bytes = &data[offsets[i].as_usize()..offsets[i + 1].as_usize()];
            self.literals.contains(bytes) != self.negated
        })
    }
}

crate::plan::same_as_original!(StringInList);

impl PhysicalExpr for StringInList {
    fn data_type(&self, _input_schema: &Schema) -> Result<DataType> {
        Ok(DataType::Boolean)
    }

    fn nullable(&self, input_schema: &Schema) -> Result<bool> {
        self.value.nullable(input_schema)
    }

    fn evaluate(&self, batch: &RecordBatch) -> Result<ColumnarValue> {
        let array = match self.value.evaluate(batch)? {
            ColumnarValue::Scalar(s) => {
                let found = match &s {
                    ScalarValue::Utf8(v) | ScalarValue::LargeUtf8(v) | ScalarValue::Utf8View(v) => {
                        v.as_ref()
                            .map(|v| self.literals.contains(v.as_bytes()) != self.negated)
                    }
                    // Not a string after all: DataFusion's own evaluation.
                    _ => return self.original.evaluate(batch),
                };
                return Ok(ColumnarValue::Scalar(ScalarValue::Boolean(found)));
            }
            ColumnarValue::Array(array) => array,
        };
        let len = array.len();
        let values = match array.data_type() {
            DataType::Utf8 => self.test_strings(array.as_string::<i32>()),
            DataType::LargeUtf8 => self.test_strings(array.as_string::<i64>()),
            DataType::Utf8View => {
                let a = array.as_string_view();
                BooleanBuffer::collect_bool(len, |i| {
                    self.literals.contains(a.value(i).as_bytes()) != self.negated
                })
            }
            _ => return self.original.evaluate(batch),
        };
        Ok(ColumnarValue::Array(Arc::new(BooleanArray::new(
            values,
            array.logical_nulls(),
        ))))
    }

    fn children(&self) -> Vec<&Arc<dyn PhysicalExpr>> {
        vec![&self.value]
    }

    fn with_new_children(
        self: Arc<Self>,
        children: Vec<Arc<dyn PhysicalExpr>>,
    ) -> Result<Arc<dyn PhysicalExpr>> {
        // The literals stay: only the value's expression is a child here.
        let mut original_children: Vec<_> = self.original.children().into_iter().cloned().collect();
        original_children[0] = children[0].clone();
        Ok(Arc::new(Self {
            original: self.original.clone().with_new_children(original_children)?,
            value: children[0].clone(),
            literals: self.literals.clone(),
            negated: self.negated,
        }))
    }

    fn fmt_sql(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.original.fmt_sql(f)
    }
}

#[cfg(test)]
mod tests {
    use datafusion::arrow::array::{ArrayRef, LargeStringArray, StringArray, StringViewArray};
    use datafusion::arrow::datatypes::Field;
    use datafusion::physical_expr::expressions::{col, in_list, lit};

    use super::*;

    const VALUES: [Option<&str>; 9] = [
        Some("apple"),
        Some("appl"),
        None,
        Some("baidu"),
        Some(""),
        Some("google"),
        Some("channel-42"),
        Some("Apple"),
        Some("a channel name longer than any literal"),
    ];

    /// DataFusion's IN list and the direct one over `array`, for `literals`.
    fn both(array: ArrayRef, literals: &[&str], negated: bool) -> (ColumnarValue, ColumnarValue) {
        let schema = Arc::new(Schema::new(vec![Field::new(
            "x",
            array.data_type().clone(),
            true,
        )]));
        let batch = RecordBatch::try_new(schema.clone(), vec![array.clone()]).unwrap();
        let list = literals
            .iter()
            .map(|l| lit(ScalarValue::try_from_string(l.to_string(), array.data_type()).unwrap()))
            .collect();
        let original = in_list(col("x", &schema).unwrap(), list, &negated, &schema).unwrap();
        let fast = speed_up(original.clone()).unwrap();
        assert!(fast.is::<StringInList>(), "{fast} is sped up");
        assert_eq!(
            fast.to_string(),
            original.to_string(),
            "EXPLAIN shows the same"
        );
        (
            original.evaluate(&batch).unwrap(),
            fast.evaluate(&batch).unwrap(),
        )
    }

    fn rows(v: ColumnarValue) -> Vec<Option<bool>> {
        v.into_array(VALUES.len())
            .unwrap()
            .as_boolean()
            .iter()
            .collect()
    }

    #[test]
    fn the_same_rows_as_datafusions_in_list() {
        let arrays: [ArrayRef; 3] = [
            Arc::new(StringArray::from(VALUES.to_vec())),
            Arc::new(LargeStringArray::from(VALUES.to_vec())),
            Arc::new(StringViewArray::from(VALUES.to_vec())),
        ];
        let lists: [&[&str]; 4] = [
            &["apple", "google", "facebook", "baidu"],
            &["apple", "apple", ""],
            &["a channel name longer than any literal"],
            &["pear"],
        ];
        for array in arrays {
            for list in lists {
                for negated in [false, true] {
                    let (original, fast) = both(array.clone(), list, negated);
                    let expected = rows(original);
                    assert_eq!(rows(fast), expected, "{list:?} negated {negated}");
                    assert_eq!(expected[2], None, "NULL IN (...) is NULL");
                }
            }
        }
        let (_, fast) = both(arrays_first(), &["apple", "baidu"], false);
        assert_eq!(
            rows(fast),
            [
                Some(true),
                Some(false),
                None,
                Some(true),
                Some(false),
                Some(false),
                Some(false),
                Some(false),
                Some(false)
            ]
        );
    }

    fn arrays_first() -> ArrayRef {
        Arc::new(StringArray::from(VALUES.to_vec()))
    }

    #[test]
    fn short_bytes_compare_as_slices_do() {
        let base: Vec<u8> = (0..40u8).collect();
        for n in 0..base.len() {
            let a = &base[..n];
            assert!(same_bytes(a, a), "{n} bytes");
            for at in 0..n {
                let mut b = a.to_vec();
                b[at] ^= 0x80;
                assert!(!same_bytes(a, &b), "{n} bytes, differing at {at}");
            }
        }
    }

    #[test]
    fn lists_with_null_or_many_literals_stay_datafusions() {
        let schema = Schema::new(vec![Field::new("x", DataType::Utf8, true)]);
        let x = col("x", &schema).unwrap();
        let with_null = in_list(
            x.clone(),
            vec![lit("a"), lit(ScalarValue::Utf8(None))],
            &false,
            &schema,
        )
        .unwrap();
        let many = in_list(
            x.clone(),
            (0..=MAX_LITERALS).map(|i| lit(format!("v{i}"))).collect(),
            &false,
            &schema,
        )
        .unwrap();
        for e in [with_null, many] {
            assert!(speed_up(e).unwrap().is::<InListExpr>());
        }
    }

    #[test]
    fn a_scalar_value_is_looked_up_once() {
        let schema = Arc::new(Schema::new(vec![Field::new("x", DataType::Utf8, true)]));
        let batch = RecordBatch::try_new(
            schema.clone(),
            vec![Arc::new(StringArray::from(vec!["z", "z"]))],
        )
        .unwrap();
        for (value, negated, expected) in [
            (Some("b"), false, Some(true)),
            (Some("c"), false, Some(false)),
            (Some("c"), true, Some(true)),
            (None, true, None),
        ] {
            let e = speed_up(
                in_list(
                    lit(ScalarValue::Utf8(value.map(str::to_string))),
                    vec![lit("a"), lit("b")],
                    &negated,
                    &schema,
                )
                .unwrap(),
            )
            .unwrap();
            match e.evaluate(&batch).unwrap() {
                ColumnarValue::Scalar(ScalarValue::Boolean(found)) => {
                    assert_eq!(found, expected, "{value:?} negated {negated}")
                }
                other => panic!("a scalar, not {other:?}"),
            }
        }
    }
}
