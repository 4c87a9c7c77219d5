//! From DataFusion's LogicalPlan to a streaming operator graph.

pub mod case_lookup;
pub mod explain;
pub mod planner;
pub mod shared_subexpressions;
pub mod state_ttl_hint;
pub mod string_in_list;
pub mod string_lookup;
pub mod window_table;
pub mod window_tvf;
