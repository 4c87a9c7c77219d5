//! Projections and filters: DataFusion physical expressions over whole batches.

use std::sync::Arc;

use datafusion::arrow::array::{Array, ArrayRef, BooleanArray};
use datafusion::arrow::compute::prep_null_mask_filter;
use datafusion::arrow::datatypes::SchemaRef;
use datafusion::arrow::record_batch::{RecordBatch, RecordBatchOptions};
use datafusion::common::{DataFusionError, Result};
use datafusion::physical_expr::PhysicalExpr;

use crate::stream::message::ChangeBatch;
use crate::stream::operator::Operator;

pub struct Project {
    pub exprs: Vec<Arc<dyn PhysicalExpr>>,
    pub schema: SchemaRef,
}

impl Operator for Project {
    fn process(
        &mut self,
        _input: usize,
        batch: ChangeBatch,
        out: &mut Vec<ChangeBatch>,
    ) -> Result<()> {
        let rows = batch.num_rows();
        let columns = self
            .exprs
            .iter()
            .map(|e| e.evaluate(&batch.rows)?.into_array(rows))
            .collect::<Result<Vec<ArrayRef>>>()?;
        let options = RecordBatchOptions::new().with_row_count(Some(rows));
        out.push(ChangeBatch {
            rows: RecordBatch::try_new_with_options(self.schema.clone(), columns, &options)?,
            watermarks: batch.watermarks,
            ops: batch.ops,
        });
        Ok(())
    }
}

pub struct Filter {
    pub predicate: Arc<dyn PhysicalExpr>,
}

impl Operator for Filter {
    fn process(
        &mut self,
        _input: usize,
        batch: ChangeBatch,
        out: &mut Vec<ChangeBatch>,
    ) -> Result<()> {
        let mask = self
            .predicate
            .evaluate(&batch.rows)?
            .into_array(batch.num_rows())?;
        let mask = mask
            .as_any()
            .downcast_ref::<BooleanArray>()
            .ok_or_else(|| DataFusionError::Plan("a filter must be a boolean expression".into()))?;
        let mask = if mask.null_count() > 0 {
            prep_null_mask_filter(mask)
        } else {
            mask.clone()
        };
        if mask.true_count() == batch.num_rows() {
            out.push(batch);
        } else if mask.true_count() > 0 {
            out.push(batch.filter(&mask)?);
        }
        Ok(())
    }
}

/// UNION ALL: rows of every input, as they come (inputs have the union's schema).
pub struct Union {
    pub schema: SchemaRef,
}

impl Operator for Union {
    fn process(
        &mut self,
        _input: usize,
        batch: ChangeBatch,
        out: &mut Vec<ChangeBatch>,
    ) -> Result<()> {
        // Inputs may name their columns differently; the union's names win.
        let rows = RecordBatch::try_new_with_options(
            self.schema.clone(),
            batch.rows.columns().to_vec(),
            &RecordBatchOptions::new().with_row_count(Some(batch.num_rows())),
        )?;
        out.push(ChangeBatch { rows, ..batch });
        Ok(())
    }
}
