//! Criterion micro benchmarks of the operators' hot paths that the Nexmark profiles
//! pointed at (issue 7): TopN and deduplication applying inserts and emitting their
//! changelog at barriers, an interval join storing, probing and expiring rows, the key
//! hashing every keyed exchange and rescale uses, a sliding window's slice aggregation
//! and firing, an unbounded GROUP BY's barrier and incremental snapshot among many keys,
//! applying an updating changelog to a view's rows, the encodings of whole rows that
//! TopN keeps (flat, against arrow's row format), a CASE of literal branches as
//! DataFusion evaluates it and as a lookup, an IN list of strings by DataFusion's hash
//! set and compared directly, and REGEXP_EXTRACT's group as the regex crate finds it
//! and as Weir's one-pass search from literal prefixes does.
//!
//! ```sh
//! cargo bench --bench operators
//! cargo bench --bench operators -- topn     # one group
//! ```

use std::sync::Arc;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use datafusion::arrow::array::{
    ArrayRef, Int64Array, Int8Array, StringArray, TimestampMillisecondArray,
};
use datafusion::arrow::compute::SortOptions;
use datafusion::arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use datafusion::arrow::record_batch::RecordBatch;
use datafusion::functions_aggregate::count::count_udaf;
use datafusion::functions_aggregate::min_max::max_udaf;
use datafusion::logical_expr::Operator as BinOp;
use datafusion::physical_expr::aggregate::AggregateExprBuilder;
use datafusion::physical_expr::expressions::{BinaryExpr, Column};
use datafusion::physical_expr::PhysicalExpr;
use weir::plan::window_tvf::WindowKind;
use weir::stream::exchange::key_group_of;
use weir::stream::flat_rows::{FlatRows, RowCodec};
use weir::stream::message::{ChangeBatch, Op};
use weir::stream::operator::Operator;
use weir::stream::ops::group_agg::GroupAggregate;
use weir::stream::ops::grouped::AggregateCalls;
use weir::stream::ops::join::{system_clock, Interval, JoinKind, JoinSpec, StreamJoin};
use weir::stream::ops::topn::{SortKey, TopN};
use weir::stream::ops::window_agg::{OutputColumn, WindowAggregate};
use weir::stream::view_rows::UpdatingRows;
use weir::stream::window::Slicing;

const ROWS: usize = 8192;

/// A deterministic stream of numbers (xorshift).
struct Numbers(u64);

impl Numbers {
    fn below(&mut self, n: u64) -> i64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 % n) as i64
    }
}

/// Bids: (auction, price, time, extra), `auctions` keys, time rising from `start`.
fn bids_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("auction", DataType::Int64, false),
        Field::new("price", DataType::Int64, false),
        Field::new("time", DataType::Int64, false),
        Field::new("extra", DataType::Utf8, false),
    ]))
}

fn bids(numbers: &mut Numbers, auctions: u64, start: i64) -> ChangeBatch {
    let extra = "x".repeat(80);
    let columns: Vec<ArrayRef> = vec![
        Arc::new(Int64Array::from_iter_values(
            (0..ROWS).map(|_| numbers.below(auctions)),
        )),
        Arc::new(Int64Array::from_iter_values(
            (0..ROWS).map(|_| numbers.below(1_000_000)),
        )),
        Arc::new(Int64Array::from_iter_values(
            (0..ROWS as i64).map(|i| start + i),
        )),
        Arc::new(StringArray::from_iter_values((0..ROWS).map(|_| &extra))),
    ];
    ChangeBatch {
        rows: RecordBatch::try_new(bids_schema(), columns).unwrap(),
        watermarks: None,
        ops: None,
    }
}

fn column(name: &str, i: usize) -> Arc<dyn PhysicalExpr> {
    Arc::new(Column::new(name, i))
}

/// Top `limit` rows per auction by `order` (descending), over inserts only.
fn topn(limit: usize, order: usize) -> TopN {
    let input = bids_schema();
    let mut fields = input.fields().to_vec();
    fields.push(Arc::new(Field::new("rn", DataType::UInt64, false)));
    TopN::try_new(
        vec![column("auction", 0)],
        vec![SortKey {
            expr: column(input.field(order).name(), order),
            options: SortOptions {
                descending: true,
                nulls_first: false,
            },
        }],
        limit,
        input,
        Arc::new(Schema::new(fields)),
        false,
        None,
    )
    .unwrap()
}

fn topn_benches(c: &mut Criterion) {
    let mut group = c.benchmark_group("topn");
    group.throughput(Throughput::Elements(ROWS as u64 * 8));
    // Top 10 bids per auction (Nexmark q19's shape): most rows cannot enter.
    let mut numbers = Numbers(7);
    let batches: Vec<ChangeBatch> = (0..8)
        .map(|i| bids(&mut numbers, 10_000, i * ROWS as i64))
        .collect();
    let mut op = topn(10, 1);
    group.bench_function("top10_per_key_8_batches_and_barrier", |b| {
        b.iter(|| {
            let mut out = Vec::new();
            for batch in &batches {
                op.process(0, batch.clone(), &mut out).unwrap();
            }
            op.on_barrier(&mut out).unwrap();
            out
        })
    });
    // Keep the latest row per key (Nexmark q18's shape): every row replaces one.
    let mut start = 0;
    let mut op = topn(1, 2);
    group.bench_function("dedup_keep_last_8_batches_and_barrier", |b| {
        b.iter_batched(
            || {
                let batches: Vec<ChangeBatch> = (0..8)
                    .map(|_| {
                        start += ROWS as i64;
                        bids(&mut numbers, 100_000, start)
                    })
                    .collect();
                batches
            },
            |batches| {
                let mut out = Vec::new();
                for batch in batches {
                    op.process(0, batch, &mut out).unwrap();
                }
                op.on_barrier(&mut out).unwrap();
                out
            },
            BatchSize::SmallInput,
        )
    });
    group.finish();
}

/// `SELECT auction, count(price), max(price) FROM bids GROUP BY auction`, over inserts.
fn group_aggregate() -> GroupAggregate {
    let input = bids_schema();
    let build = |udaf, name: &str| {
        Arc::new(
            AggregateExprBuilder::new(udaf, vec![column("price", 1)])
                .schema(input.clone())
                .alias(name)
                .build()
                .unwrap(),
        )
    };
    let calls = Arc::new(AggregateCalls {
        keys: vec![column("auction", 0)],
        key_schema: Arc::new(Schema::new(vec![Field::new(
            "auction",
            DataType::Int64,
            false,
        )])),
        aggregates: vec![build(count_udaf(), "num"), build(max_udaf(), "top")],
        filters: vec![None, None],
    });
    let output = Arc::new(Schema::new(vec![
        Field::new("auction", DataType::Int64, false),
        Field::new("num", DataType::Int64, false),
        Field::new("top", DataType::Int64, true),
    ]));
    GroupAggregate::try_new(calls, input, output, true, false, None).unwrap()
}

fn group_aggregate_benches(c: &mut Criterion) {
    let mut group = c.benchmark_group("group_aggregate");
    group.throughput(Throughput::Elements(ROWS as u64));
    // An epoch changing 8 k keys among 256 k or 4 M: the barrier's results and the
    // snapshot of the changed keys should cost the 8 k, not every key.
    for keys in [1 << 18, 1 << 22] {
        let mut numbers = Numbers(11);
        let mut op = group_aggregate();
        let mut out = Vec::new();
        for i in 0..keys / ROWS as i64 {
            let batch = bids(&mut numbers, 1, 0).rows;
            let mut columns = batch.columns().to_vec();
            columns[0] = Arc::new(Int64Array::from_iter_values(
                (0..ROWS as i64).map(|k| i * ROWS as i64 + k),
            ));
            let batch = RecordBatch::try_new(batch.schema(), columns).unwrap();
            op.process(0, ChangeBatch::new(batch), &mut out).unwrap();
        }
        op.on_barrier(&mut out).unwrap();
        op.snapshot().unwrap();
        drop(out);
        let name = format!("one_batch_of_{}k_keys_barrier_and_snapshot", keys >> 10);
        group.bench_function(name, |b| {
            b.iter_batched(
                || bids(&mut numbers, keys as u64, 0),
                |batch| {
                    let mut out = Vec::new();
                    op.process(0, batch, &mut out).unwrap();
                    op.on_barrier(&mut out).unwrap();
                    (out, op.snapshot_changes().unwrap())
                },
                BatchSize::SmallInput,
            )
        });
    }
    group.finish();
}

/// An interval join of bids with bids of the same auction up to 100 ms later.
fn interval_join() -> StreamJoin {
    let input = bids_schema();
    let mut fields: Vec<Field> = Vec::new();
    for side in ["l", "r"] {
        for f in input.fields() {
            fields.push(Field::new(
                format!("{side}_{}", f.name()),
                f.data_type().clone(),
                true,
            ));
        }
    }
    let filter: Arc<dyn PhysicalExpr> = Arc::new(BinaryExpr::new(
        column("r_time", 6),
        BinOp::GtEq,
        column("l_time", 2),
    ));
    let spec = JoinSpec {
        kind: JoinKind::Inner,
        keys: [vec![column("auction", 0)], vec![column("auction", 0)]],
        null_equals_null: false,
        filter: Some(filter),
        inputs: [input.clone(), input],
        output: Arc::new(Schema::new(fields)),
        interval: Some(Interval {
            left_time: 2,
            right_time: 2,
            lower: 0,
            upper: 100,
        }),
        ttl: [None, None],
        insert_only: [true, true],
    };
    StreamJoin::try_new(Arc::new(spec), system_clock()).unwrap()
}

/// Both inputs of [`interval_join`] take a batch of bids over `keys` auctions, then the
/// watermark moves to `lag` batches behind the newest rows.
fn bench_interval_join(
    group: &mut criterion::BenchmarkGroup<criterion::measurement::WallTime>,
    name: &str,
    keys: u64,
    lag: i64,
) {
    let mut numbers = Numbers(11);
    let mut join = interval_join();
    let start = std::cell::Cell::new(0i64);
    group.bench_function(name, |b| {
        b.iter_batched(
            || {
                start.set(start.get() + ROWS as i64);
                (
                    bids(&mut numbers, keys, start.get()),
                    bids(&mut numbers, keys, start.get()),
                )
            },
            |(left, right)| {
                let mut out = Vec::new();
                join.process(0, left, &mut out).unwrap();
                join.process(1, right, &mut out).unwrap();
                join.on_watermark(start.get() - lag * ROWS as i64, &mut out)
                    .unwrap();
                out
            },
            BatchSize::SmallInput,
        )
    });
}

fn join_benches(c: &mut Criterion) {
    let mut group = c.benchmark_group("join");
    group.throughput(Throughput::Elements(ROWS as u64 * 2));
    // Rows older than this batch can no longer match: state stays small.
    bench_interval_join(&mut group, "interval_store_probe_expire", 5_000, 0);
    // As Nexmark q7's bids by price: most keys hold one row, and the watermark trails by
    // 32 batches, so each side keeps about 262 k rows over as many keys (beyond the
    // caches: inserts and expiry are a hash lookup into cold memory each).
    bench_interval_join(
        &mut group,
        "interval_262k_live_rows_over_1m_keys",
        1_000_000,
        32,
    );
    group.finish();
}

fn exchange_benches(c: &mut Criterion) {
    let mut group = c.benchmark_group("exchange");
    group.throughput(Throughput::Elements(ROWS as u64));
    let batch = bids(&mut Numbers(3), 1_000_000, 0);
    let keys = vec![batch.rows.column(0).clone(), batch.rows.column(3).clone()];
    let mut hashes = Vec::new();
    group.bench_function("key_groups_of_bigint_and_string_keys", |b| {
        b.iter(|| key_group_of(&keys, &mut hashes).unwrap().sum::<usize>())
    });
    group.finish();
}

/// Rows of event time per 2 s slice in the window benchmark.
const ROWS_PER_SLICE: i64 = 8 * ROWS as i64;

/// Bids numbered from `first_row`, `ROWS_PER_SLICE` of them every 2 s of event time, with
/// the bounds of the 2 s slice each falls in, as the window assigner gives them.
fn sliced_bids(numbers: &mut Numbers, auctions: u64, first_row: i64) -> ChangeBatch {
    let bids = bids(numbers, auctions, 0);
    let ts = DataType::Timestamp(TimeUnit::Millisecond, None);
    let mut fields = bids_schema().fields().to_vec();
    fields.push(Arc::new(Field::new("slice_start", ts.clone(), false)));
    fields.push(Arc::new(Field::new("slice_end", ts, false)));
    let slice = |i: i64| {
        let t = (first_row + i) * 2_000 / ROWS_PER_SLICE;
        t - t.rem_euclid(2_000)
    };
    let mut columns = bids.rows.columns().to_vec();
    columns.push(Arc::new(TimestampMillisecondArray::from_iter_values(
        (0..ROWS as i64).map(slice),
    )));
    columns.push(Arc::new(TimestampMillisecondArray::from_iter_values(
        (0..ROWS as i64).map(|i| slice(i) + 2_000),
    )));
    ChangeBatch::new(RecordBatch::try_new(Arc::new(Schema::new(fields)), columns).unwrap())
}

/// count(*) and max(price) per auction over 10 s windows sliding by 2 s (Nexmark q5's
/// shape): rows go into their 2 s slice; a window fires by merging its five slices.
fn hop_window_aggregate(input: SchemaRef) -> WindowAggregate {
    let auction = column("auction", 0);
    let build = |udaf, args: Vec<Arc<dyn PhysicalExpr>>, name: &str| {
        Arc::new(
            AggregateExprBuilder::new(udaf, args)
                .schema(input.clone())
                .alias(name)
                .build()
                .unwrap(),
        )
    };
    let calls = Arc::new(AggregateCalls {
        keys: vec![auction],
        key_schema: Arc::new(Schema::new(vec![Field::new(
            "auction",
            DataType::Int64,
            false,
        )])),
        aggregates: vec![
            build(count_udaf(), vec![column("price", 1)], "num"),
            build(max_udaf(), vec![column("price", 1)], "max_price"),
        ],
        filters: vec![None, None],
    });
    let ts = DataType::Timestamp(TimeUnit::Millisecond, None);
    let output = Arc::new(Schema::new(vec![
        Field::new("window_end", ts, false),
        Field::new("auction", DataType::Int64, false),
        Field::new("num", DataType::Int64, false),
        Field::new("max_price", DataType::Int64, true),
    ]));
    WindowAggregate::new(
        calls,
        Slicing::new(&WindowKind::Hop {
            slide: 2_000,
            size: 10_000,
            offset: 0,
        }),
        (4, 5),
        vec![
            OutputColumn::WindowEnd,
            OutputColumn::Key(0),
            OutputColumn::Aggregate(0),
            OutputColumn::Aggregate(1),
        ],
        output,
    )
}

fn window_benches(c: &mut Criterion) {
    let mut group = c.benchmark_group("window");
    group.throughput(Throughput::Elements(ROWS as u64 * 8));
    let mut numbers = Numbers(5);
    // 8 batches span 2 s of event time (one slice); the watermark then fires the window
    // ending there, which merges five slices of about 10 k auctions each.
    let mut next_row = 0;
    let schema = sliced_bids(&mut numbers, 1, 0).rows.schema();
    let mut op = hop_window_aggregate(schema);
    group.bench_function("hop_count_max_8_batches_and_fire", |b| {
        b.iter_batched(
            || {
                let batches: Vec<ChangeBatch> = (0..8)
                    .map(|_| {
                        let batch = sliced_bids(&mut numbers, 10_000, next_row);
                        next_row += ROWS as i64;
                        batch
                    })
                    .collect();
                (batches, next_row * 2_000 / ROWS_PER_SLICE)
            },
            |(batches, watermark)| {
                let mut out = Vec::new();
                for batch in batches {
                    op.process(0, batch, &mut out).unwrap();
                }
                op.on_watermark(watermark, &mut out).unwrap();
                out
            },
            BatchSize::SmallInput,
        )
    });
    group.finish();
}

/// A view's rows and an updating changelog for them: each change replaces one row
/// (-U of its old value, +U of the new), as a GROUP BY's results change.
fn changelog_benches(c: &mut Criterion) {
    let mut group = c.benchmark_group("changelog");
    let schema = Arc::new(Schema::new(vec![
        Field::new("auction", DataType::Int64, false),
        Field::new("num", DataType::Int64, false),
    ]));
    let keys = 100_000i64;
    let current = RecordBatch::try_new(
        schema.clone(),
        vec![
            Arc::new(Int64Array::from_iter_values(0..keys)),
            Arc::new(Int64Array::from_iter_values((0..keys).map(|_| 1))),
        ],
    )
    .unwrap();
    // 8192 keys change: -U (k, from), +U (k, to).
    let changed: Vec<i64> = (0..ROWS as i64).map(|i| i * 7 % keys).collect();
    let updates = |from: i64, to: i64| ChangeBatch {
        rows: RecordBatch::try_new(
            schema.clone(),
            vec![
                Arc::new(Int64Array::from_iter_values(
                    changed.iter().flat_map(|&k| [k, k]),
                )),
                Arc::new(Int64Array::from_iter_values(
                    changed.iter().flat_map(|_| [from, to]),
                )),
            ],
        )
        .unwrap(),
        watermarks: None,
        ops: Some(Int8Array::from_iter_values(
            changed
                .iter()
                .flat_map(|_| [Op::UpdateBefore as i8, Op::UpdateAfter as i8]),
        )),
    };
    let (forth, back) = (updates(1, 2), updates(2, 1));
    // Query results and window fragments: the rows rebuilt with the changes.
    group.throughput(Throughput::Elements(keys as u64 + 2 * ROWS as u64));
    group.bench_function("rebuild_100k_rows_with_8k_updates", |b| {
        b.iter(|| {
            weir::stream::changelog::apply(&schema, vec![current.clone()], vec![forth.clone()])
                .unwrap()
        })
    });
    // An updating view's rows: the changes applied in place, back and forth.
    group.throughput(Throughput::Elements(4 * ROWS as u64));
    let mut view = UpdatingRows::new(&schema).unwrap();
    view.apply(&[ChangeBatch::new(current.clone())]).unwrap();
    group.bench_function("view_applies_8k_updates_to_100k_rows_in_place", |b| {
        b.iter(|| {
            view.apply(std::slice::from_ref(&forth)).unwrap();
            view.apply(std::slice::from_ref(&back)).unwrap();
            view.rows()
        })
    });
    group.finish();
}

/// Whole bid rows encoded, and decoded again, flat and in arrow's row format.
fn row_encoding_benches(c: &mut Criterion) {
    let mut group = c.benchmark_group("rows");
    group.throughput(Throughput::Elements(ROWS as u64));
    let batch = bids(&mut Numbers(3), 10_000, 0).rows;
    let fields = batch.schema().fields().to_vec();
    let codecs = [
        ("flat", RowCodec::Flat(FlatRows::new(&fields).unwrap())),
        (
            "arrow",
            RowCodec::Arrow(weir::stream::row_converter(&fields).unwrap()),
        ),
    ];
    for (name, codec) in &codecs {
        group.bench_function(format!("{name}_encode_bids"), |b| {
            b.iter(|| codec.encode(batch.columns()).unwrap())
        });
        let rows = codec.encode(batch.columns()).unwrap();
        group.bench_function(format!("{name}_decode_bids"), |b| {
            b.iter(|| codec.decode((0..ROWS).map(|i| rows.row(i))).unwrap())
        });
    }
    group.finish();
}

/// q21's CASE over 8192 rows (half of them one of four channel names, the rest another
/// name and a url for ELSE), as DataFusion plans it and as Weir's CASE lookup does; and
/// the channel IN the four names, by DataFusion's hash set and by Weir's comparison.
fn case_benches(c: &mut Criterion) {
    use datafusion::common::DFSchema;
    use datafusion::functions::string::expr_fn::{lower, upper};
    use datafusion::logical_expr::{col, lit, when};
    use datafusion::prelude::SessionContext;
    let mut group = c.benchmark_group("case");
    group.throughput(Throughput::Elements(ROWS as u64));
    let mut numbers = Numbers(5);
    let names = ["Apple", "Google", "Facebook", "Baidu"];
    let channels: Vec<String> = (0..ROWS)
        .map(|_| match numbers.below(8) as usize {
            n if n < 4 => names[n].to_string(),
            _ => format!("channel-{}", numbers.below(10_000)),
        })
        .collect();
    let urls: Vec<String> = (0..ROWS)
        .map(|i| format!("https://www.nexmark.com/item.htm?query=1&channel_id={i}"))
        .collect();
    let batch = RecordBatch::try_new(
        Arc::new(Schema::new(vec![
            Field::new("channel", DataType::Utf8, false),
            Field::new("url", DataType::Utf8, false),
        ])),
        vec![
            Arc::new(StringArray::from_iter_values(&channels)),
            Arc::new(StringArray::from_iter_values(&urls)),
        ],
    )
    .unwrap();
    let schema = DFSchema::try_from(batch.schema().as_ref().clone()).unwrap();
    let expr = when(lower(col("channel")).eq(lit("apple")), lit("0"))
        .when(lower(col("channel")).eq(lit("google")), lit("1"))
        .when(lower(col("channel")).eq(lit("facebook")), lit("2"))
        .when(lower(col("channel")).eq(lit("baidu")), lit("3"))
        .otherwise(upper(col("url")))
        .unwrap();
    let state = SessionContext::new().state();
    let plans = [
        ("branch_by_branch", expr.clone()),
        ("lookup", weir::plan::case_lookup::rewrite(expr).unwrap()),
    ];
    for (name, expr) in plans {
        let physical = state.create_physical_expr(expr, &schema).unwrap();
        group.bench_function(format!("q21_channel_ids_{name}"), |b| {
            b.iter(|| physical.evaluate(&batch).unwrap())
        });
    }
    // q21's filter: the channel among the four names, by DataFusion's hash set and by
    // Weir's direct comparison.
    let in_list = col("channel").in_list(names.iter().map(|n| lit(*n)).collect(), false);
    let physical = state.create_physical_expr(in_list, &schema).unwrap();
    let direct = weir::plan::string_in_list::speed_up(physical.clone()).unwrap();
    for (name, physical) in [("hash_set", physical), ("direct", direct)] {
        group.bench_function(format!("q21_channel_in_list_{name}"), |b| {
            b.iter(|| physical.evaluate(&batch).unwrap())
        });
    }
    group.finish();
}

/// q21's REGEXP_EXTRACT(url, '(&|^)channel_id=([^&]*)', 2) over 8192 Nexmark urls (half
/// of them without a channel_id, as the hot channels' urls), by the regex crate's
/// captures and by Weir's [`weir::sql::GroupFinder`].
fn regex_benches(c: &mut Criterion) {
    let mut group = c.benchmark_group("regexp_extract");
    group.throughput(Throughput::Elements(ROWS as u64));
    let mut numbers = Numbers(7);
    let urls: Vec<String> = (0..ROWS)
        .map(|_| {
            let mut url = String::from("https://www.nexmark.com/");
            for _ in 0..3 {
                for _ in 0..4 {
                    url.push((b'a' + numbers.below(26) as u8) as char);
                }
                url.push('/');
            }
            url.push_str("item.htm?query=1");
            if numbers.below(2) == 0 {
                url.push_str(&format!("&channel_id={}", numbers.below(1 << 31)));
            }
            url
        })
        .collect();
    let pattern = "(&|^)channel_id=([^&]*)";
    let regex = regex::Regex::new(pattern).unwrap();
    group.bench_function("q21_channel_id_regex_crate", |b| {
        let mut locations = regex.capture_locations();
        b.iter(|| {
            urls.iter()
                .filter_map(|url| {
                    regex
                        .captures_read(&mut locations, url)
                        .and_then(|_| locations.get(2))
                })
                .count()
        })
    });
    group.bench_function("q21_channel_id_one_pass_from_prefixes", |b| {
        let mut finder = weir::sql::GroupFinder::new(pattern, regex.clone()).unwrap();
        b.iter(|| urls.iter().filter_map(|url| finder.group(url, 2)).count())
    });
    group.finish();
}

criterion_group!(
    benches,
    regex_benches,
    case_benches,
    row_encoding_benches,
    topn_benches,
    group_aggregate_benches,
    join_benches,
    exchange_benches,
    window_benches,
    changelog_benches
);
criterion_main!(benches);
