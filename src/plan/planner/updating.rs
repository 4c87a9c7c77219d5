//! Planning of operators whose output rows change: unbounded GROUP BY, TopN and
//! deduplication, UNION ALL.

use super::*;

impl Planner<'_> {
    /// `WHERE rn <= N` over `ROW_NUMBER() OVER (PARTITION BY ... ORDER BY ...) AS rn`
    /// in a continuous query: a TopN operator (N = 1 is deduplication). Projections and
    /// aliases between the filter and the window are applied above the TopN.
    pub(super) fn top_n(&mut self, f: &datafusion::logical_expr::Filter) -> Result<Option<Stream>> {
        if self.mode != Mode::Continuous {
            return Ok(None);
        }
        let mut between = Vec::new();
        let mut node = f.input.as_ref();
        let w = loop {
            match node {
                LogicalPlan::Projection(p) => {
                    between.push(node);
                    node = &p.input;
                }
                LogicalPlan::SubqueryAlias(a) => {
                    between.push(node);
                    node = &a.input;
                }
                LogicalPlan::Window(w) => break w,
                _ => return Ok(None),
            }
        };
        let [window_expr] = w.window_expr.as_slice() else {
            return Ok(None);
        };
        let Expr::WindowFunction(function) = strip_alias(window_expr) else {
            return Ok(None);
        };
        if function.fun.name() != "row_number" {
            return Ok(None);
        }
        // Follow the row number's column up to the filter.
        let mut rank = Some(w.input.schema().fields().len());
        for n in between.iter().rev() {
            rank = match n {
                LogicalPlan::Projection(p) => rank.and_then(|r| {
                    p.expr
                        .iter()
                        .position(|e| passthrough(e, p.input.schema()) == Some(r))
                }),
                _ => rank,
            };
        }
        let Some(rank) = rank else {
            return Ok(None);
        };
        let mut limit = None;
        let mut rest = Vec::new();
        for conjunct in datafusion::logical_expr::utils::split_conjunction(&f.predicate) {
            match rank_bound(conjunct, f.input.schema(), rank) {
                Some(n) if limit.is_none() => limit = Some(n),
                _ => rest.push(conjunct.clone()),
            }
        }
        let Some(limit) = limit else {
            return Ok(None);
        };
        let input = self.plan_node(&w.input)?;
        if partitioned_by_window(w, &input) {
            let mut stream = self.plan_window(node, w, input)?;
            stream = self.reapply(stream, &between)?;
            return Ok(Some(self.filter(&stream, &f.predicate)?));
        }
        let partition_by = function
            .params
            .partition_by
            .iter()
            .map(|e| self.physical(e, &input.schema))
            .collect::<Result<Vec<_>>>()?;
        let order_by = function
            .params
            .order_by
            .iter()
            .map(|s| {
                Ok(SortKey {
                    expr: self.physical(&s.expr, &input.schema)?,
                    options: datafusion::arrow::compute::SortOptions {
                        descending: !s.asc,
                        nulls_first: s.nulls_first,
                    },
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let factory_order: Arc<Vec<(Arc<dyn PhysicalExpr>, _)>> =
            Arc::new(order_by.into_iter().map(|k| (k.expr, k.options)).collect());
        let retracting = input.changelog != ChangelogMode::InsertOnly;
        let input_arrow: SchemaRef = Arc::new(input.schema.as_arrow().clone());
        let arrow: SchemaRef = Arc::new(w.schema.as_arrow().clone());
        let ttl = self.ttl_of(&w.input);
        let name = if limit == 1 { "Deduplicate" } else { "TopN" };
        let detail = format!(
            "first {limit} {}, order by {}",
            if function.params.partition_by.is_empty() {
                "overall".to_string()
            } else {
                format!("per {}", list(&function.params.partition_by))
            },
            function
                .params
                .order_by
                .iter()
                .map(|s| s.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        );
        let (exchange, parallelism) = self.keyed(partition_by.clone());
        // Partitions need a key: no PARTITION BY is one constant partition.
        let partition_by = if partition_by.is_empty() {
            vec![
                Arc::new(datafusion::physical_expr::expressions::Literal::new(
                    true.into(),
                )) as _,
            ]
        } else {
            partition_by
        };
        let new = move || {
            TopN::try_new(
                partition_by.clone(),
                factory_order
                    .iter()
                    .map(|(expr, options)| SortKey {
                        expr: expr.clone(),
                        options: *options,
                    })
                    .collect(),
                limit,
                input_arrow.clone(),
                arrow.clone(),
                retracting,
                ttl,
            )
        };
        let backend = match self.backend.clone() {
            Some(b) if new()?.can_spill() => Some(b),
            _ => None,
        };
        let mut state = if retracting {
            "every row of each partition".to_string()
        } else {
            "the top rows of each partition".to_string()
        };
        if let Some(b) = &backend {
            state.push_str(&format!(", {}", b.describe()));
        }
        let mut out = self.operator(
            &input,
            exchange,
            parallelism,
            (name, format!("{detail}{}", ttl_detail(ttl)), &state),
            w.schema.clone(),
            Arc::new(move |_| Ok(Box::new(new()?.with_backend(backend.as_ref())?) as _)),
        );
        self.set_updating(&mut out, format!("{name} ({detail})"));
        // A row is identified by its partition and rank, or by its partition alone when
        // each partition keeps one row.
        let partition: Option<Vec<usize>> = function
            .params
            .partition_by
            .iter()
            .map(|e| passthrough(e, &input.schema))
            .collect();
        if let Some(mut key) = partition {
            if limit > 1 {
                key.push(input.schema.fields().len());
            }
            if !key.is_empty() {
                self.set_upsert_key(&mut out, key);
            }
        }
        if !function.params.partition_by.is_empty() && ttl.is_none() {
            self.unbounded_state(&format!("{name} ({detail})"));
        }
        let mut stream = self.reapply(out, &between)?;
        if let Some(predicate) = datafusion::logical_expr::utils::conjunction(rest) {
            stream = self.filter(&stream, &predicate)?;
        }
        Ok(Some(stream))
    }

    /// Applies the projections and aliases `between` (top first) over `stream`.
    pub(super) fn reapply(
        &mut self,
        mut stream: Stream,
        between: &[&LogicalPlan],
    ) -> Result<Stream> {
        for node in between.iter().rev() {
            match node {
                LogicalPlan::Projection(p) => {
                    stream = self.project(&stream, &p.expr, p.schema.clone())?;
                }
                LogicalPlan::SubqueryAlias(a) => stream.schema = a.schema.clone(),
                _ => {}
            }
        }
        Ok(stream)
    }

    /// UNION ALL: every input's rows. Inputs of the union's parallelism forward their
    /// subtasks' rows; others are spread by hashing whole rows, so a row and its
    /// retraction take the same path.
    pub(super) fn union(
        &mut self,
        u: &datafusion::logical_expr::Union,
        inputs: Vec<Stream>,
    ) -> Result<Stream> {
        let parallelism = inputs.iter().map(|i| i.parallelism).max().unwrap_or(1);
        let edges = inputs
            .iter()
            .map(|i| Edge {
                from: i.node,
                exchange: if i.parallelism == parallelism {
                    Exchange::Forward
                } else {
                    Exchange::Hash(
                        (0..i.schema.fields().len())
                            .map(|c| {
                                Arc::new(datafusion::physical_expr::expressions::Column::new(
                                    i.schema.field(c).name(),
                                    c,
                                )) as Arc<dyn PhysicalExpr>
                            })
                            .collect(),
                    )
                },
            })
            .collect();
        let arrow: SchemaRef = Arc::new(u.schema.as_arrow().clone());
        let factory_arrow = arrow.clone();
        let node = self.add(StreamNode {
            name: "Union".into(),
            detail: format!("{} inputs", inputs.len()),
            state: "none".into(),
            parallelism,
            inputs: edges,
            kind: NodeKind::Operator(Arc::new(move |_| {
                Ok(Box::new(Union {
                    schema: factory_arrow.clone(),
                }) as _)
            })),
            schema: arrow,
            changelog: ChangelogMode::InsertOnly,
        });
        let mut out = Stream {
            node,
            schema: u.schema.clone(),
            parallelism,
            windows: None,
            slicing: None,
            changelog: ChangelogMode::InsertOnly,
            updated_by: None,
            upsert_key: None,
        };
        if let Some(updating) = inputs
            .iter()
            .find(|i| i.changelog != ChangelogMode::InsertOnly)
        {
            let by = updating
                .updated_by
                .clone()
                .unwrap_or_else(|| "an input".into());
            self.set_updating(&mut out, by);
        }
        Ok(out)
    }

    /// An unbounded GROUP BY: one row per key, corrected as rows arrive.
    pub(super) fn group_aggregate(
        &mut self,
        agg: &datafusion::logical_expr::Aggregate,
        input: Stream,
    ) -> Result<Stream> {
        if agg
            .group_expr
            .iter()
            .any(|e| matches!(e, Expr::GroupingSet(_)))
        {
            return Err(refuse(
                "GROUPING SETS, CUBE and ROLLUP run per window in continuous queries: group by \
                 window_start, window_end of a window table function as well",
            ));
        }
        let keys = agg
            .group_expr
            .iter()
            .map(|e| self.physical(e, &input.schema))
            .collect::<Result<Vec<_>>>()?;
        let key_fields = (0..keys.len())
            .map(|i| agg.schema.field(i).as_ref().clone())
            .collect();
        let keyed = !keys.is_empty();
        let calls = Arc::new(self.aggregate_calls(agg, &input, keys.clone(), key_fields)?);
        let retracting = input.changelog != ChangelogMode::InsertOnly;
        let (exchange, parallelism) = self.keyed(keys);
        let schema = agg.schema.clone();
        let arrow: SchemaRef = Arc::new(schema.as_arrow().clone());
        let input_arrow: SchemaRef = Arc::new(input.schema.as_arrow().clone());
        let ttl = self.ttl_of(&agg.input);
        let described = describe_aggregate(agg);
        let detail = format!("{described}{}", ttl_detail(ttl));
        let new = move || {
            GroupAggregate::try_new(
                calls.clone(),
                input_arrow.clone(),
                arrow.clone(),
                keyed,
                retracting,
                ttl,
            )
        };
        let backend = match self.backend.clone() {
            Some(b) if new()?.can_spill()? => Some(b),
            _ => None,
        };
        let mut state = if retracting {
            "per key: its result and the multiset of its aggregates' argument rows".to_string()
        } else {
            "per key: its result and partial aggregates".to_string()
        };
        if let Some(b) = &backend {
            state.push_str(&format!(", {}", b.describe()));
        }
        let mut out = self.operator(
            &input,
            exchange,
            parallelism,
            ("GroupAggregate", detail, &state),
            schema,
            Arc::new(move |_| Ok(Box::new(new()?.with_backend(backend.as_ref())?) as _)),
        );
        // DISTINCT over inserts only ever adds rows; everything else corrects its rows.
        if !agg.aggr_expr.is_empty() || retracting || ttl.is_some() {
            self.set_updating(&mut out, format!("GroupAggregate ({described})"));
            if keyed {
                self.set_upsert_key(&mut out, (0..agg.group_expr.len()).collect());
            }
        }
        if (keyed || retracting) && ttl.is_none() {
            self.unbounded_state(&format!("GroupAggregate ({described})"));
        }
        Ok(out)
    }
}

/// N of a conjunct `rank <= N` (also `rank < N + 1`, `rank = 1`, `N >= rank`) on the
/// column at index `rank` of `schema`.
fn rank_bound(conjunct: &Expr, schema: &DFSchema, rank: usize) -> Option<usize> {
    use datafusion::logical_expr::{BinaryExpr, Operator as BinOp};
    let Expr::BinaryExpr(BinaryExpr { left, op, right }) = conjunct else {
        return None;
    };
    let (column, op, value) = match (left.as_ref(), right.as_ref()) {
        (Expr::Column(c), Expr::Literal(v, _)) => (c, *op, v),
        (Expr::Literal(v, _), Expr::Column(c)) => (c, op.swap()?, v),
        _ => return None,
    };
    if schema.index_of_column(column).ok()? != rank {
        return None;
    }
    let n = match value
        .cast_to(&datafusion::arrow::datatypes::DataType::Int64)
        .ok()?
    {
        datafusion::common::ScalarValue::Int64(Some(n)) => n,
        _ => return None,
    };
    let limit = match op {
        BinOp::LtEq => n,
        BinOp::Lt => n - 1,
        BinOp::Eq if n == 1 => 1,
        _ => return None,
    };
    usize::try_from(limit).ok().filter(|&l| l > 0)
}

/// ", state TTL 1h" for EXPLAIN, when there is one.
fn ttl_detail(ttl: Option<std::time::Duration>) -> String {
    ttl.map_or(String::new(), |t| {
        format!(", state TTL {}", join::duration(t.as_millis() as i64))
    })
}
