//! From DataFusion's LogicalPlan to a streaming operator graph.

pub mod explain;
pub mod planner;
pub mod window_table;
pub mod window_tvf;
