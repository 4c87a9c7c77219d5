//! Operators, one file each.

mod bigint_calls;
pub mod fragment;
pub mod group_agg;
pub mod grouped;
pub mod join;
pub mod kept_rows;
pub mod partial_spill;
pub mod session_agg;
pub mod stateless;
pub mod topn;
pub mod window_agg;
pub mod window_assign;
