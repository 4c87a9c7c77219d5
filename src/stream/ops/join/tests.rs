use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;

use datafusion::arrow::array::{ArrayRef, Int64Array, Int8Array};
use datafusion::arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use datafusion::arrow::record_batch::RecordBatch;
use datafusion::logical_expr::Operator as BinOp;
use datafusion::physical_expr::expressions::{binary, lit, Column};
use datafusion::physical_expr::PhysicalExpr;

use super::*;
use crate::stream::message::{Op, END_OF_TIME};
use crate::stream::operator::testing::snapshot_of;

/// Both inputs: (k, v); the output and the filter see k, v, k, v.
fn input_schema(side: &str) -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new(format!("{side}k"), DataType::Int64, true),
        Field::new(format!("{side}v"), DataType::Int64, true),
    ]))
}

fn pair_schema() -> Schema {
    let l = input_schema("l");
    let r = input_schema("r");
    Schema::new(
        l.fields()
            .iter()
            .chain(r.fields().iter())
            .map(|f| f.as_ref().clone().with_nullable(true))
            .collect::<Vec<_>>(),
    )
}

fn column(i: usize) -> Arc<dyn PhysicalExpr> {
    let names = ["lk", "lv", "rk", "rv"];
    Arc::new(Column::new(names[i], i))
}

/// `l.v < r.v`
fn less_filter() -> Arc<dyn PhysicalExpr> {
    binary(column(1), BinOp::Lt, column(3), &pair_schema()).unwrap()
}

/// `r.v >= l.v + lower AND r.v <= l.v + upper` (v is the time attribute).
fn interval_filter(lower: i64, upper: i64) -> Arc<dyn PhysicalExpr> {
    let schema = pair_schema();
    let low = binary(column(1), BinOp::Plus, lit(lower), &schema).unwrap();
    let high = binary(column(1), BinOp::Plus, lit(upper), &schema).unwrap();
    let ge = binary(column(3), BinOp::GtEq, low, &schema).unwrap();
    let le = binary(column(3), BinOp::LtEq, high, &schema).unwrap();
    binary(ge, BinOp::And, le, &schema).unwrap()
}

fn spec(kind: JoinKind, filter: Option<Arc<dyn PhysicalExpr>>) -> JoinSpec {
    let key = |i: usize| -> Arc<dyn PhysicalExpr> { Arc::new(Column::new("k", i)) };
    let sides = kind.output_sides();
    let output = Arc::new(Schema::new(
        pair_schema()
            .fields()
            .iter()
            .enumerate()
            .filter(|(i, _)| sides[i / 2])
            .map(|(_, f)| f.as_ref().clone())
            .collect::<Vec<_>>(),
    ));
    JoinSpec {
        kind,
        keys: [vec![key(0)], vec![key(0)]],
        null_equals_null: false,
        filter,
        inputs: [input_schema("l"), input_schema("r")],
        output,
        interval: None,
        ttl: [None, None],
        insert_only: [false, false],
    }
}

fn join(spec: JoinSpec) -> StreamJoin {
    join_in(spec, None)
}

/// A join under the sled state backend when `memory` (bytes per input) is given.
fn join_in(spec: JoinSpec, memory: Option<usize>) -> StreamJoin {
    let backend = memory.map(|memory| SledBackend {
        root: std::env::temp_dir().join("weir-join-tests"),
        memory,
    });
    StreamJoin::try_new(Arc::new(spec), system_clock())
        .unwrap()
        .with_backend(backend.as_ref())
        .unwrap()
}

/// Memory budgets the tests run with: no sled backend, everything on disk after each
/// batch, and a few rows in memory.
const MEMORIES: [Option<usize>; 3] = [None, Some(0), Some(400)];

fn batch(side: usize, rows: &[(Option<i64>, i64)], op: Op) -> ChangeBatch {
    let schema = input_schema(if side == 0 { "l" } else { "r" });
    let k: ArrayRef = Arc::new(Int64Array::from(
        rows.iter().map(|r| r.0).collect::<Vec<_>>(),
    ));
    let v: ArrayRef = Arc::new(Int64Array::from(
        rows.iter().map(|r| r.1).collect::<Vec<_>>(),
    ));
    ChangeBatch::with_op(RecordBatch::try_new(schema, vec![k, v]).unwrap(), op)
}

fn ins(side: usize, rows: &[(i64, i64)]) -> ChangeBatch {
    let rows: Vec<_> = rows.iter().map(|&(k, v)| (Some(k), v)).collect();
    batch(side, &rows, Op::Insert)
}

fn change(side: usize, op: Op, k: i64, v: i64) -> ChangeBatch {
    batch(side, &[(Some(k), v)], op)
}

fn lines(out: &[ChangeBatch]) -> Vec<String> {
    crate::stream::message::change_lines(out)
}

fn run(op: &mut StreamJoin, input: usize, batch: ChangeBatch) -> Vec<String> {
    let mut out = Vec::new();
    op.process(input, batch, &mut out).unwrap();
    lines(&out)
}

fn watermark(op: &mut StreamJoin, w: Millis) -> Vec<String> {
    let mut out = Vec::new();
    op.on_watermark(w, &mut out).unwrap();
    lines(&out)
}

#[test]
fn inner_join_of_inserts_emits_inserts() {
    let mut j = join(spec(JoinKind::Inner, None));
    assert!(run(&mut j, 0, ins(0, &[(1, 10), (2, 20)])).is_empty());
    let mut out = Vec::new();
    j.process(1, ins(1, &[(1, 100), (3, 300), (1, 101)]), &mut out)
        .unwrap();
    assert!(out.iter().all(|b| b.ops.is_none()), "inserts only");
    assert_eq!(lines(&out), ["+I 1,10,1,100", "+I 1,10,1,101"]);
    assert_eq!(
        run(&mut j, 0, ins(0, &[(1, 11), (3, 30)])),
        ["+I 1,11,1,100", "+I 1,11,1,101", "+I 3,30,3,300"]
    );
}

#[test]
fn inner_join_passes_updates_and_deletes_through() {
    let mut j = join(spec(JoinKind::Inner, None));
    run(&mut j, 0, ins(0, &[(1, 10)]));
    assert_eq!(run(&mut j, 1, ins(1, &[(1, 100)])), ["+I 1,10,1,100"]);
    assert_eq!(
        run(&mut j, 1, change(1, Op::UpdateBefore, 1, 100)),
        ["-U 1,10,1,100"]
    );
    assert_eq!(
        run(&mut j, 1, change(1, Op::UpdateAfter, 1, 200)),
        ["+U 1,10,1,200"]
    );
    assert_eq!(
        run(&mut j, 0, change(0, Op::Delete, 1, 10)),
        ["-D 1,10,1,200"]
    );
    // Nothing is left to match.
    assert!(run(&mut j, 1, ins(1, &[(1, 300)])).is_empty());
}

#[test]
fn left_join_replaces_the_null_padded_row_when_a_match_comes_and_goes() {
    let mut j = join(spec(JoinKind::Left, None));
    assert_eq!(run(&mut j, 0, ins(0, &[(1, 10)])), ["+I 1,10,_,_"]);
    assert_eq!(
        run(&mut j, 1, ins(1, &[(1, 100)])),
        ["-D 1,10,_,_", "+I 1,10,1,100"]
    );
    assert_eq!(run(&mut j, 1, ins(1, &[(1, 101)])), ["+I 1,10,1,101"]);
    assert_eq!(
        run(&mut j, 1, change(1, Op::Delete, 1, 100)),
        ["-D 1,10,1,100"]
    );
    assert_eq!(
        run(&mut j, 1, change(1, Op::Delete, 1, 101)),
        ["-D 1,10,1,101", "+I 1,10,_,_"]
    );
    assert_eq!(
        run(&mut j, 0, change(0, Op::Delete, 1, 10)),
        ["-D 1,10,_,_"]
    );
    // The right row alone joins nothing in a LEFT join.
    assert!(run(&mut j, 1, ins(1, &[(2, 5)])).is_empty());
    assert_eq!(
        run(&mut j, 0, change(0, Op::UpdateAfter, 2, 7)),
        ["+I 2,7,2,5"]
    );
}

#[test]
fn right_join_mirrors_the_left_join() {
    let mut j = join(spec(JoinKind::Right, None));
    assert_eq!(run(&mut j, 1, ins(1, &[(1, 100)])), ["+I _,_,1,100"]);
    assert_eq!(
        run(&mut j, 0, ins(0, &[(1, 10), (1, 10)])),
        ["-D _,_,1,100", "+I 1,10,1,100", "+I 1,10,1,100"]
    );
    assert_eq!(
        run(&mut j, 0, change(0, Op::UpdateBefore, 1, 10)),
        ["-U 1,10,1,100"]
    );
    assert_eq!(
        run(&mut j, 0, change(0, Op::Delete, 1, 10)),
        ["-D 1,10,1,100", "+I _,_,1,100"]
    );
}

#[test]
fn full_join_counts_duplicates_on_both_sides() {
    let mut j = join(spec(JoinKind::Full, None));
    assert_eq!(
        run(&mut j, 0, ins(0, &[(1, 10), (1, 10)])),
        ["+I 1,10,_,_", "+I 1,10,_,_"]
    );
    // The right row is new: both left copies lose their padding.
    assert_eq!(
        run(&mut j, 1, ins(1, &[(1, 100)])),
        [
            "-D 1,10,_,_",
            "-D 1,10,_,_",
            "+I 1,10,1,100",
            "+I 1,10,1,100"
        ]
    );
    assert_eq!(
        run(&mut j, 0, change(0, Op::Delete, 1, 10)),
        ["-D 1,10,1,100"]
    );
    assert_eq!(
        run(&mut j, 0, change(0, Op::Delete, 1, 10)),
        ["-D 1,10,1,100", "+I _,_,1,100"]
    );
    assert_eq!(
        run(&mut j, 1, change(1, Op::Delete, 1, 100)),
        ["-D _,_,1,100"]
    );
    assert_eq!(j.state_size(), 0);
}

#[test]
fn null_keys_never_match_but_outer_rows_keep_them() {
    let mut j = join(spec(JoinKind::Full, None));
    assert_eq!(
        run(&mut j, 0, batch(0, &[(None, 1)], Op::Insert)),
        ["+I _,1,_,_"]
    );
    assert_eq!(
        run(&mut j, 1, batch(1, &[(None, 2)], Op::Insert)),
        ["+I _,_,_,2"]
    );
    assert_eq!(
        run(&mut j, 0, batch(0, &[(None, 1)], Op::Delete)),
        ["-D _,1,_,_"]
    );
    let mut s = spec(JoinKind::Inner, None);
    s.null_equals_null = true;
    let mut j = join(s);
    run(&mut j, 0, batch(0, &[(None, 1)], Op::Insert));
    assert_eq!(
        run(&mut j, 1, batch(1, &[(None, 2)], Op::Insert)),
        ["+I _,1,_,2"]
    );
}

#[test]
fn the_filter_decides_matches_of_outer_joins() {
    let mut j = join(spec(JoinKind::Left, Some(less_filter())));
    assert_eq!(run(&mut j, 0, ins(0, &[(1, 50)])), ["+I 1,50,_,_"]);
    // 40 is not above 50: no match, the padded row stays.
    assert!(run(&mut j, 1, ins(1, &[(1, 40)])).is_empty());
    assert_eq!(
        run(&mut j, 1, ins(1, &[(1, 60), (1, 45)])),
        ["-D 1,50,_,_", "+I 1,50,1,60"]
    );
    assert_eq!(
        run(&mut j, 0, ins(0, &[(1, 41), (1, 70)])),
        ["+I 1,41,1,60", "+I 1,41,1,45", "+I 1,70,_,_"]
    );
}

#[test]
fn semi_and_anti_joins_follow_whether_a_row_has_matches() {
    let mut semi = join(spec(JoinKind::LeftSemi, None));
    let mut anti = join(spec(JoinKind::LeftAnti, None));
    let both = |a: &mut StreamJoin, b: &mut StreamJoin, input: usize, batch: ChangeBatch| {
        (run(a, input, batch.clone()), run(b, input, batch))
    };
    let (s, a) = both(&mut semi, &mut anti, 0, ins(0, &[(1, 10)]));
    assert!(s.is_empty());
    assert_eq!(a, ["+I 1,10"]);
    let (s, a) = both(&mut semi, &mut anti, 1, ins(1, &[(1, 100), (1, 101)]));
    assert_eq!(s, ["+I 1,10"]);
    assert_eq!(a, ["-D 1,10"]);
    let (s, a) = both(&mut semi, &mut anti, 1, change(1, Op::Delete, 1, 100));
    assert!(s.is_empty() && a.is_empty());
    let (s, a) = both(&mut semi, &mut anti, 1, change(1, Op::Delete, 1, 101));
    assert_eq!(s, ["-D 1,10"]);
    assert_eq!(a, ["+I 1,10"]);
}

/// A tiny deterministic generator, so failures repeat.
struct Lcg(u64);

impl Lcg {
    fn next(&mut self, n: u64) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 33) % n
    }
}

/// The join of two multisets of (k, v) rows, as output lines without ops.
fn reference(kind: JoinKind, left: &[(i64, i64)], right: &[(i64, i64)], less: bool) -> Vec<String> {
    let hit = |l: &(i64, i64), r: &(i64, i64)| l.0 == r.0 && (!less || l.1 < r.1);
    let row = |l: Option<&(i64, i64)>, r: Option<&(i64, i64)>| {
        let f = |x: Option<&(i64, i64)>| match x {
            Some((k, v)) => format!("{k},{v}"),
            None => "_,_".into(),
        };
        format!("+I {},{}", f(l), f(r))
    };
    let mut out = Vec::new();
    match kind.filtering() {
        Some((kept, anti)) => {
            let (keep, probe) = if kept == 0 {
                (left, right)
            } else {
                (right, left)
            };
            for x in keep {
                let any = probe
                    .iter()
                    .any(|y| if kept == 0 { hit(x, y) } else { hit(y, x) });
                if any != anti {
                    out.push(format!("+I {},{}", x.0, x.1));
                }
            }
        }
        None => {
            for l in left {
                let mut any = false;
                for r in right.iter().filter(|r| hit(l, r)) {
                    any = true;
                    out.push(row(Some(l), Some(r)));
                }
                if !any && kind.outer(0) {
                    out.push(row(Some(l), None));
                }
            }
            for r in right {
                if kind.outer(1) && !left.iter().any(|l| hit(l, r)) {
                    out.push(row(None, Some(r)));
                }
            }
        }
    }
    out.sort();
    out
}

/// Applies output lines to a multiset of rows: +I/+U add, -U/-D remove one.
fn apply(table: &mut Vec<String>, changes: &[String]) {
    for line in changes {
        let (op, row) = line.split_at(2);
        let row = format!("+I{row}");
        if op == "+I" || op == "+U" {
            table.push(row);
        } else {
            let at = table
                .iter()
                .position(|r| *r == row)
                .unwrap_or_else(|| panic!("{line} retracts a row the view does not have"));
            table.remove(at);
        }
    }
    table.sort();
}

#[test]
fn random_changelogs_give_the_join_of_the_current_rows() {
    let kinds = [
        JoinKind::Inner,
        JoinKind::Left,
        JoinKind::Right,
        JoinKind::Full,
        JoinKind::LeftSemi,
        JoinKind::LeftAnti,
        JoinKind::RightSemi,
        JoinKind::RightAnti,
    ];
    for (seed, memory) in (0..12u64).flat_map(|seed| MEMORIES.map(|m| (seed, m))) {
        for kind in kinds {
            let less = seed % 2 == 1;
            let mut j = join_in(spec(kind, less.then(less_filter)), memory);
            if let Some(spill) = j.spill.as_mut() {
                // Keys whose hashes are the same share a list of runs.
                spill.hasher.few = (seed % 3 == 0).then_some(2);
            }
            let mut rng = Lcg(seed * 7919 + 17);
            let mut rows: [Vec<(i64, i64)>; 2] = [Vec::new(), Vec::new()];
            let mut view = Vec::new();
            for step in 0..120 {
                let side = rng.next(2) as usize;
                // A batch of a few changes, retractions of existing rows among them.
                let mut ops = Vec::new();
                let mut values = Vec::new();
                for _ in 0..1 + rng.next(4) {
                    let retract = !rows[side].is_empty() && rng.next(3) == 0;
                    if retract {
                        let at = rng.next(rows[side].len() as u64) as usize;
                        let row = rows[side].remove(at);
                        ops.push(if rng.next(2) == 0 {
                            Op::Delete
                        } else {
                            Op::UpdateBefore
                        });
                        values.push(row);
                    } else {
                        let row = (rng.next(4) as i64, rng.next(5) as i64);
                        rows[side].push(row);
                        ops.push(if rng.next(4) == 0 {
                            Op::UpdateAfter
                        } else {
                            Op::Insert
                        });
                        values.push(row);
                    }
                }
                let schema = input_schema(if side == 0 { "l" } else { "r" });
                let b = ChangeBatch {
                    rows: RecordBatch::try_new(
                        schema,
                        vec![
                            Arc::new(Int64Array::from_iter_values(values.iter().map(|r| r.0))),
                            Arc::new(Int64Array::from_iter_values(values.iter().map(|r| r.1))),
                        ],
                    )
                    .unwrap(),
                    watermarks: None,
                    ops: Some(Int8Array::from_iter_values(ops.iter().map(|o| *o as i8))),
                };
                apply(&mut view, &run(&mut j, side, b));
                assert_eq!(
                    view,
                    reference(kind, &rows[0], &rows[1], less),
                    "{kind:?} seed {seed} step {step} memory {memory:?}"
                );
                if memory == Some(0) {
                    assert_eq!(j.sides[0].len() + j.sides[1].len(), 0, "all on disk");
                }
            }
        }
    }
}

fn interval_spec(kind: JoinKind, lower: i64, upper: i64) -> JoinSpec {
    let mut s = spec(kind, Some(interval_filter(lower, upper)));
    s.interval = Some(Interval {
        left_time: 1,
        right_time: 1,
        lower,
        upper,
    });
    // Interval joins take inserts only: rows are kept without finding them again.
    s.insert_only = [true, true];
    s
}

#[test]
fn interval_join_drops_rows_once_nothing_on_time_can_match() {
    // A left row at lt matches right rows with rt in [lt, lt + 10].
    let mut j = join(interval_spec(JoinKind::Inner, 0, 10));
    run(&mut j, 0, ins(0, &[(1, 100)]));
    assert_eq!(run(&mut j, 1, ins(1, &[(1, 110)])), ["+I 1,100,1,110"]);
    // At watermark 110 a right row at 110 may still arrive (late by one): kept.
    assert!(watermark(&mut j, 110).is_empty());
    assert_eq!(j.sides[0].len(), 1);
    assert_eq!(run(&mut j, 1, ins(1, &[(1, 110)])), ["+I 1,100,1,110"]);
    assert!(run(&mut j, 1, ins(1, &[(1, 115)])).is_empty());
    // Past lt + upper the left row goes; a right row stays until the watermark passes
    // its own time (a left row at that time could still match it).
    watermark(&mut j, 111);
    assert_eq!(j.sides[0].len(), 0);
    assert_eq!(j.sides[1].len(), 1);
    assert_eq!(run(&mut j, 0, ins(0, &[(1, 112)])), ["+I 1,112,1,115"]);
    assert_eq!(j.sides[0].len(), 1, "an on-time left row is kept");
    watermark(&mut j, 116);
    assert_eq!(j.sides[1].len(), 0);
    assert_eq!(run(&mut j, 1, ins(1, &[(1, 120)])), ["+I 1,112,1,120"]);
    // A late left row (104 + 10 < 116) cannot match anything on time: not kept.
    let before = j.state_size();
    assert!(run(&mut j, 0, ins(0, &[(1, 104)])).is_empty());
    assert_eq!(j.state_size(), before);
    assert_eq!(j.sides[0].len(), 1);
    watermark(&mut j, END_OF_TIME);
    assert_eq!(j.state_size(), 0);
}

#[test]
fn outer_interval_join_emits_unmatched_rows_when_they_expire() {
    // Right rows at rt match left rows with rt - lt in [-5, 5].
    let mut j = join(interval_spec(JoinKind::Full, -5, 5));
    assert!(run(&mut j, 0, ins(0, &[(1, 100), (2, 100)])).is_empty());
    let mut out = Vec::new();
    j.process(1, ins(1, &[(1, 103), (3, 104)]), &mut out)
        .unwrap();
    assert_eq!(lines(&out), ["+I 1,100,1,103"]);
    assert!(out.iter().all(|b| b.ops.is_none()), "inserts only");
    assert!(watermark(&mut j, 105).is_empty());
    // Left rows at 100 expire after 105, right rows at 103/104 after 108/109.
    assert_eq!(watermark(&mut j, 106), ["+I 2,100,_,_"]);
    // A late left row still probes the right rows kept, but is not kept itself.
    assert_eq!(run(&mut j, 0, ins(0, &[(1, 100)])), ["+I 1,100,1,103"]);
    assert_eq!(j.sides[0].len(), 0);
    assert_eq!(watermark(&mut j, 110), ["+I _,_,3,104"]);
    // A late, unmatched row of an outer side comes out at once.
    assert_eq!(run(&mut j, 0, ins(0, &[(4, 90)])), ["+I 4,90,_,_"]);
    assert_eq!(j.state_size(), 0);
}

#[test]
fn state_ttl_forgets_rows_not_written_for_the_ttl() {
    for memory in MEMORIES {
        let now = Arc::new(AtomicI64::new(1_000));
        let clock_now = now.clone();
        let clock: Clock = Arc::new(move || clock_now.load(Ordering::SeqCst));
        let mut s = spec(JoinKind::Left, None);
        s.ttl = [Some(100), Some(50)];
        let backend = memory.map(|memory| SledBackend {
            root: std::env::temp_dir().join("weir-join-tests"),
            memory,
        });
        let mut j = StreamJoin::try_new(Arc::new(s), clock)
            .unwrap()
            .with_backend(backend.as_ref())
            .unwrap();
        assert_eq!(run(&mut j, 0, ins(0, &[(1, 10)])), ["+I 1,10,_,_"]);
        now.store(1_040, Ordering::SeqCst);
        assert_eq!(
            run(&mut j, 1, ins(1, &[(1, 100)])),
            ["-D 1,10,_,_", "+I 1,10,1,100"]
        );
        // The right row's TTL (50) passed at 1090; nothing is emitted for it, and it no
        // longer matches. The left row was written at 1040 (its match count changed).
        now.store(1_095, Ordering::SeqCst);
        assert!(run(&mut j, 0, ins(0, &[(1, 11)])).len() == 1);
        if memory.is_none() {
            assert_eq!(j.sides[1].len(), 0, "expired rows are swept");
        }
        now.store(1_139, Ordering::SeqCst);
        assert_eq!(run(&mut j, 1, ins(1, &[(1, 101)])).len(), 3);
        // Everything expires without output once no row was written for the TTL, in
        // memory and on disk.
        now.store(1_300, Ordering::SeqCst);
        let mut out = Vec::new();
        j.on_barrier(&mut out).unwrap();
        assert!(out.is_empty());
        assert_eq!(j.state_size(), 0, "memory {memory:?}");
        assert_eq!(run(&mut j, 1, ins(1, &[(1, 102)])), Vec::<String>::new());
    }
}

#[test]
fn the_sled_backend_keeps_rows_beyond_memory_on_disk_and_brings_them_back() {
    let mut j = join_in(spec(JoinKind::Inner, None), Some(0));
    run(&mut j, 0, ins(0, &[(1, 10), (2, 20), (1, 11)]));
    assert_eq!(j.sides[0].len(), 0);
    let spilled = j.state_size();
    assert!(spilled > 0);
    // Key 1 comes back to be probed, and goes again.
    assert_eq!(
        run(&mut j, 1, ins(1, &[(1, 100)])),
        ["+I 1,10,1,100", "+I 1,11,1,100"]
    );
    assert_eq!(j.sides[0].len() + j.sides[1].len(), 0);
    // Retracting a spilled row finds it.
    assert_eq!(
        run(&mut j, 0, change(0, Op::Delete, 1, 10)),
        ["-D 1,10,1,100"]
    );
    // An insert-only input adds rows to a spilled key without bringing it back; a probe
    // finds the rows of both visits.
    let mut s = spec(JoinKind::Inner, None);
    s.insert_only = [true, true];
    let mut j = join_in(s, Some(0));
    run(&mut j, 0, ins(0, &[(1, 10), (2, 20)]));
    run(&mut j, 0, ins(0, &[(1, 11)]));
    assert_eq!(j.spill.as_ref().unwrap().records(), [3, 0]);
    assert_eq!(
        run(&mut j, 1, ins(1, &[(1, 100)])),
        ["+I 1,10,1,100", "+I 1,11,1,100"]
    );
    // A snapshot hands over what is on disk apart (a checkpoint stores it in chunks as
    // it comes); a restore stages the entries on disk and leaves them there, a run per
    // key, with nothing left staged.
    let mut j = join_in(spec(JoinKind::Inner, None), Some(0));
    run(&mut j, 0, ins(0, &[(1, 10), (2, 20), (1, 11)]));
    let rows = |b: &[RecordBatch]| -> usize {
        b.iter()
            .filter(|b| crate::stream::snapshot::kind(b).unwrap() == "join-left")
            .map(|b| b.num_rows())
            .sum()
    };
    let in_memory = j.snapshot().unwrap();
    assert_eq!(rows(&in_memory), 0);
    let read = j.snapshot_beyond_memory(true).unwrap().unwrap();
    // It is read as it was when taken, whatever the join does meanwhile: key 1's
    // entries come back to be probed, new ones go to disk.
    run(&mut j, 1, ins(1, &[(1, 100)]));
    run(&mut j, 0, ins(0, &[(2, 21), (3, 30)]));
    let mut beyond = Vec::new();
    read(&mut |b| {
        beyond.push(b);
        Ok(())
    })
    .unwrap();
    assert_eq!(rows(&beyond), 3);
    let mut restored = join_in(spec(JoinKind::Inner, None), Some(0));
    restore_snapshots(&mut restored, vec![in_memory, beyond]);
    assert_eq!(restored.sides[0].len(), 0);
    let spill = restored.spill.as_ref().unwrap();
    assert_eq!(spill.records(), [2, 0]);
    assert!(spill.staged.iter().all(Option::is_none));
    assert_eq!(
        run(&mut restored, 1, ins(1, &[(1, 100)])),
        ["+I 1,10,1,100", "+I 1,11,1,100"]
    );
    // With room for everything, nothing goes to disk.
    let mut roomy = join_in(spec(JoinKind::Inner, None), Some(1 << 20));
    run(&mut roomy, 0, ins(0, &[(1, 10), (2, 20), (1, 11)]));
    assert_eq!(roomy.sides[0].len(), 3);
    assert_eq!(roomy.spill.as_ref().unwrap().bytes(), 0);
}

/// Runs steps (input, rows, then a watermark) through `j`; interval joins take inserts
/// only, so they skip the steps that take rows back.
fn drive(j: &mut StreamJoin, steps: &[(usize, ChangeBatch, Option<Millis>)]) -> Vec<String> {
    let mut out = Vec::new();
    for (side, b, w) in steps {
        let retracts = matches!(b.ops.as_ref(), Some(o) if o.value(0) != 0);
        if !(j.spec.interval.is_some() && retracts) {
            out.extend(run(j, *side, b.clone()));
        }
        if let Some(w) = w {
            out.extend(watermark(j, *w));
        }
    }
    out
}

/// A join of `kind`, interval (5 on each side) or regular with a filter, under the sled
/// backend with `memory` bytes per input when given.
fn restorable_join(kind: JoinKind, interval: bool, memory: Option<usize>) -> StreamJoin {
    if interval {
        join_in(interval_spec(kind, -5, 5), memory)
    } else {
        join_in(spec(kind, Some(less_filter())), memory)
    }
}

/// Restores snapshots as a job does: one `restore` call each, then `restored`.
fn restore_snapshots(j: &mut StreamJoin, snapshots: Vec<Vec<RecordBatch>>) {
    for state in snapshots {
        j.restore(state).unwrap();
    }
    j.restored().unwrap();
}

/// Memory budgets of the run that snapshots and of the run that restores: snapshots
/// carry over between the backends.
const RESTORE_MEMORIES: [(Option<usize>, Option<usize>); 4] = [
    (None, None),
    (Some(0), Some(0)),
    (Some(0), None),
    (None, Some(100)),
];

#[test]
fn a_restored_join_continues_as_if_never_stopped() {
    let steps: Vec<(usize, ChangeBatch, Option<Millis>)> = vec![
        (0, ins(0, &[(1, 100), (2, 100), (1, 101)]), None),
        (1, ins(1, &[(1, 103), (3, 140)]), Some(100)),
        (0, ins(0, &[(3, 138), (1, 102)]), None),
        (1, ins(1, &[(2, 104), (1, 150)]), Some(107)),
        // Restored here.
        (0, ins(0, &[(1, 149), (3, 141)]), Some(120)),
        (1, ins(1, &[(1, 152), (3, 139)]), Some(146)),
        (0, ins(0, &[(1, 151)]), Some(END_OF_TIME)),
    ];
    for (kind, (memory, restored_memory)) in [JoinKind::Full, JoinKind::Inner]
        .into_iter()
        .flat_map(|k| RESTORE_MEMORIES.map(|m| (k, m)))
    {
        for interval in [false, true] {
            let mut straight = restorable_join(kind, interval, None);
            let mut expected = drive(&mut straight, &steps);
            let mut before = restorable_join(kind, interval, memory);
            let mut got = drive(&mut before, &steps[..4]);
            let state = snapshot_of(&mut before, true);
            let mut after = restorable_join(kind, interval, restored_memory);
            restore_snapshots(&mut after, vec![state]);
            assert_eq!(after.state_size() > 0, before.state_size() > 0);
            got.extend(drive(&mut after, &steps[4..]));
            if interval {
                // Insert-only inputs add rows to a key on disk without bringing it back,
                // so one row's matches may come in another order (inserts only).
                expected.sort();
                got.sort();
            }
            assert_eq!(
                got, expected,
                "{kind:?}, interval {interval}, memory {memory:?} then {restored_memory:?}"
            );
            assert!(!expected.is_empty());
        }
    }
    // Retractions after a restore find the restored rows.
    let mut j = join(spec(JoinKind::Left, None));
    run(&mut j, 0, ins(0, &[(1, 10), (1, 10)]));
    run(&mut j, 1, ins(1, &[(1, 100)]));
    let mut restored = join(spec(JoinKind::Left, None));
    restore_snapshots(&mut restored, vec![snapshot_of(&mut j, true)]);
    assert_eq!(
        run(&mut restored, 1, change(1, Op::Delete, 1, 100)),
        [
            "-D 1,10,1,100",
            "-D 1,10,1,100",
            "+I 1,10,_,_",
            "+I 1,10,_,_"
        ]
    );
}

#[test]
fn incremental_snapshots_restore_in_layers_and_hold_only_changes() {
    // Rows come, match (outer joins count matches), retract and expire between
    // snapshots: a whole snapshot then changes, restored in order, give what the
    // original gives afterwards, also when restored by a later run.
    let steps: Vec<Vec<(usize, ChangeBatch, Option<Millis>)>> = vec![
        vec![
            (0, ins(0, &[(1, 100), (2, 101)]), None),
            (1, ins(1, &[(1, 102)]), Some(101)),
        ],
        vec![
            (1, ins(1, &[(2, 103), (3, 104)]), None),
            (0, change(0, Op::Delete, 2, 101), Some(103)),
        ],
        vec![(0, ins(0, &[(3, 105), (1, 106)]), Some(104))],
        vec![
            // Key 2's right row would match the left row deleted before.
            (1, ins(1, &[(1, 108), (3, 109), (2, 111)]), Some(106)),
            (0, ins(0, &[(2, 110)]), Some(END_OF_TIME)),
        ],
    ];
    for (kind, (memory, restored_memory)) in [JoinKind::Full, JoinKind::Inner]
        .into_iter()
        .flat_map(|k| RESTORE_MEMORIES.map(|m| (k, m)))
    {
        for interval in [false, true] {
            let mut straight = restorable_join(kind, interval, None);
            let mut expected = Vec::new();
            for step in &steps {
                expected.extend(drive(&mut straight, step));
            }
            let mut before = restorable_join(kind, interval, memory);
            before.started_from(0, 0);
            let mut got = drive(&mut before, &steps[0]);
            let mut layers = vec![snapshot_of(&mut before, true)];
            // Nothing changed since the whole snapshot: nothing but progress again.
            let unchanged = snapshot_of(&mut before, false);
            let rows: usize = unchanged.iter().map(|b| b.num_rows()).sum();
            assert_eq!(rows, 1, "{kind:?} {interval}: only the progress row");
            layers.push(unchanged);
            for step in &steps[1..3] {
                got.extend(drive(&mut before, step));
                let changes = snapshot_of(&mut before, false);
                let rows: usize = changes.iter().map(|b| b.num_rows()).sum();
                // Progress, plus what this step touched: never the whole state again.
                assert!(rows <= 1 + 4, "{rows} rows for one step's changes");
                layers.push(changes);
            }
            let mut after = restorable_join(kind, interval, restored_memory);
            after.started_from(7, 0);
            restore_snapshots(&mut after, layers);
            // Under the backend a restore leaves every entry on disk, in new runs.
            if memory == restored_memory && memory.is_none() {
                assert_eq!(
                    after.state_size(),
                    before.state_size(),
                    "{kind:?} {interval} {memory:?}"
                );
            }
            got.extend(drive(&mut after, &steps[3]));
            assert_eq!(
                got, expected,
                "{kind:?}, interval {interval}, memory {memory:?} then {restored_memory:?}"
            );
        }
    }
}

#[test]
fn snapshots_share_long_runs_of_new_rows_with_the_state() {
    let rows =
        |from: i64, n: i64| -> Vec<(i64, i64)> { (from..from + n).map(|v| (v % 7, v)).collect() };
    let mut before = join(spec(JoinKind::Inner, None));
    before.started_from(0, 0);
    run(&mut before, 0, ins(0, &rows(0, 10)));
    let mut layers = vec![snapshot_of(&mut before, true)];
    run(&mut before, 0, ins(0, &rows(10, 3000)));
    // Taking row 1500 back splits the new rows into two runs of over 1024.
    run(&mut before, 0, change(0, Op::Delete, 1500 % 7, 1500));
    run(&mut before, 0, ins(0, &rows(5000, 3)));
    let changes = snapshot_of(&mut before, false);
    let side = &before.sides[0];
    // Entry 10's chunk: the second batch's rows, the first (small) batch merged into it.
    let chunk = side.chunk_rows(side.entry(10).loc.0);
    let values = |b: &RecordBatch| {
        b.column(0)
            .as_any()
            .downcast_ref::<Int64Array>()
            .unwrap()
            .values()
            .as_ptr_range()
    };
    let stored = values(chunk);
    let left: Vec<&RecordBatch> = changes
        .iter()
        .filter(|b| crate::stream::snapshot::kind(b).unwrap() == "join-left")
        .collect();
    let sizes: Vec<usize> = left.iter().map(|b| b.num_rows()).collect();
    let shared: Vec<bool> = left
        .iter()
        .map(|b| stored.contains(&values(b).start))
        .collect();
    // In entry order: the rows before the deletion, the first later row (it took the
    // deleted row's entry), the rows after the deletion, the other two later rows. The
    // later rows are copied: too few to share their chunk for.
    assert_eq!(sizes, [1490, 1, 1509, 2]);
    assert_eq!(shared, [true, false, true, false]);
    layers.push(changes);
    let mut after = join(spec(JoinKind::Inner, None));
    after.started_from(3, 0);
    restore_snapshots(&mut after, layers);
    let probe = ins(1, &[(0, 1), (3, 2)]);
    let mut expected = run(&mut before, 1, probe.clone());
    let mut got = run(&mut after, 1, probe);
    expected.sort();
    got.sort();
    // Key 0: 0, 7, .., 3003; key 3: 3, 10, .., 3008 and 5001.
    assert_eq!(expected.len(), 430 + 431);
    assert_eq!(got, expected);
}

#[test]
fn interval_joins_under_the_sled_backend_expire_rows_on_disk() {
    // Left rows at lt match right rows with rt - lt in [-5, 5]. With no memory every row
    // goes to disk after its batch; the expiry brings back the runs the watermark made
    // due and emits their unmatched rows null-padded, in the order they arrived.
    let mut j = join_in(interval_spec(JoinKind::Full, -5, 5), Some(0));
    assert!(run(&mut j, 0, ins(0, &[(2, 100), (1, 100), (3, 103)])).is_empty());
    assert_eq!(
        run(&mut j, 1, ins(1, &[(1, 104), (4, 101)])),
        ["+I 1,100,1,104"]
    );
    assert_eq!(j.sides[0].len() + j.sides[1].len(), 0, "all on disk");
    assert_eq!(j.spill.as_ref().unwrap().records(), [3, 2]);
    assert!(
        j.sides.iter().all(|s| s.deadlines.is_empty()),
        "moved rows unlisted"
    );
    assert!(watermark(&mut j, 105).is_empty());
    // Left rows at 100 are due after 105, right row 101 after 106, left 103 after 108.
    assert_eq!(watermark(&mut j, 107), ["+I 2,100,_,_", "+I _,_,4,101"]);
    assert_eq!(j.spill.as_ref().unwrap().records(), [1, 1]);
    // A row probing a key on disk still finds its rows before they are due.
    assert_eq!(run(&mut j, 1, ins(1, &[(3, 108)])), ["+I 3,103,3,108"]);
    assert_eq!(watermark(&mut j, END_OF_TIME), Vec::<String>::new());
    assert_eq!(j.state_size(), 0);
    assert_eq!(j.spill.as_ref().unwrap().records(), [0, 0]);

    // An inner join's runs come back once all their rows are due; until then the rows
    // past their deadline are still on disk but match nothing, as if gone.
    let mut j = join_in(interval_spec(JoinKind::Inner, -5, 5), Some(0));
    let mut in_memory = join(interval_spec(JoinKind::Inner, -5, 5));
    for j in [&mut j, &mut in_memory] {
        assert!(run(j, 0, ins(0, &[(1, 100), (1, 108)])).is_empty());
        assert!(watermark(j, 107).is_empty());
    }
    assert_eq!(j.spill.as_ref().unwrap().records(), [1, 0]);
    assert_eq!(in_memory.sides[0].len(), 1);
    for j in [&mut j, &mut in_memory] {
        assert_eq!(run(j, 1, ins(1, &[(1, 103)])), ["+I 1,108,1,103"]);
    }
    // The probe brought the left run back (it went out again as a new run).
    assert_eq!(j.spill.as_ref().unwrap().listed_due(), [1, 1]);
    for j in [&mut j, &mut in_memory] {
        assert!(watermark(j, 114).is_empty());
        assert_eq!(j.state_size(), 0);
    }
    assert_eq!(j.spill.as_ref().unwrap().listed_due(), [0, 0]);

    // Many keys, out-of-order times and watermark jumps over several groups of keys:
    // the same rows as in memory, watermark by watermark (the order within one may
    // differ: runs come back a group at a time).
    let mut rng = Lcg(7);
    let mut steps = Vec::new();
    let mut t = 1_000;
    for step in 0..40 {
        let side = step % 2;
        let rows: Vec<(i64, i64)> = (0..500)
            .map(|_| (rng.next(6_000) as i64, t + rng.next(40) as i64))
            .collect();
        t += 20;
        let jump = if step % 13 == 12 { 200 } else { 0 };
        steps.push((side, ins(side, &rows), Some(t - 10 - jump)));
    }
    steps.push((0, ins(0, &[(1, t)]), Some(END_OF_TIME)));
    for kind in [JoinKind::Full, JoinKind::Inner, JoinKind::Left] {
        let mut in_memory = join(interval_spec(kind, -5, 5));
        for memory in [Some(0), Some(20_000)] {
            let mut on_disk = join_in(interval_spec(kind, -5, 5), memory);
            let mut spilled = 0;
            for (side, batch, w) in &steps {
                let mut expected = run(&mut in_memory, *side, batch.clone());
                let mut got = run(&mut on_disk, *side, batch.clone());
                expected.extend(watermark(&mut in_memory, w.unwrap()));
                got.extend(watermark(&mut on_disk, w.unwrap()));
                expected.sort();
                got.sort();
                assert_eq!(got, expected, "{kind:?} {memory:?}");
                spilled = spilled.max(on_disk.spill.as_ref().unwrap().bytes());
            }
            assert!(spilled > 0, "{kind:?} {memory:?}: rows went to disk");
            assert_eq!(on_disk.state_size(), 0);
            assert_eq!(on_disk.spill.as_ref().unwrap().listed_due(), [0, 0]);
            in_memory = join(interval_spec(kind, -5, 5));
        }
    }
}
