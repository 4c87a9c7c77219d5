//! From DataFusion's LogicalPlan to a streaming operator graph.

use std::sync::Arc;

use datafusion::common::tree_node::{Transformed, TreeNode};
use datafusion::common::Result;
use datafusion::physical_expr::PhysicalExpr;

/// Display, equality and hashing of a faster form of a physical expression: those of the
/// expression it stands for (its `original` field), so EXPLAIN and plan comparisons see
/// no difference.
macro_rules! same_as_original {
    ($t:ty) => {
        impl std::fmt::Display for $t {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                self.original.fmt(f)
            }
        }

        impl PartialEq for $t {
            fn eq(&self, other: &Self) -> bool {
                self.original.as_ref() == other.original.as_ref()
            }
        }

        impl Eq for $t {}

        impl std::hash::Hash for $t {
            fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
                self.original.hash(state);
            }
        }
    };
}
pub(crate) use same_as_original;

/// `physical` with each expression `faster` gives a faster form of replaced by it, from
/// the leaves up.
pub(crate) fn replace_with_faster<F: PhysicalExpr + 'static>(
    physical: Arc<dyn PhysicalExpr>,
    faster: impl Fn(&Arc<dyn PhysicalExpr>) -> Option<F>,
) -> Result<Arc<dyn PhysicalExpr>> {
    physical
        .transform_up(|e| {
            Ok(match faster(&e) {
                Some(fast) => Transformed::yes(Arc::new(fast) as Arc<dyn PhysicalExpr>),
                None => Transformed::no(e),
            })
        })
        .map(|t| t.data)
}

pub mod case_lookup;
pub mod explain;
pub mod planner;
pub mod shared_subexpressions;
pub mod state_ttl_hint;
pub mod string_in_list;
pub mod string_lookup;
pub mod window_table;
pub mod window_tvf;
