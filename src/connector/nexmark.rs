//! The Nexmark benchmark's event generator (as in the nexmark/nexmark Flink repository),
//! one table per stream: `'nexmark.table'` = person, auction or bid.
//!
//! Events are numbered 0, 1, 2, ... over all three streams; of every 50, one is a person,
//! three are auctions and 46 are bids. An event's contents and its event time derive from
//! its number alone (a hash of it seeds the values; the time is a fixed base plus the
//! number times the inter-event delay of `'nexmark.first-event-rate'`), so a table's rows
//! are the same however many splits read it: split k of n reads events k, k+n, k+2n, ...
//! ([`Share`], which also carries a position over to another number of splits).
//! `'nexmark.max-out-of-orderness'` shuffles event numbers within groups (Nexmark's
//! out-of-order group size) so event time goes back by at most that much.
//!
//! `'nexmark.events-per-second'` paces the generator from the moment it starts; with
//! `'nexmark.base-time'` too, from that time on the wall clock: event n comes out when the
//! clock reaches base time + n / events-per-second (events already due come at once). With
//! `'nexmark.first-event-rate'` equal to the pace, an event then comes out at its own event
//! time, as a live stream's would (what end-to-end latency is measured against).

use std::fmt::Write as _;
use std::sync::{Arc, OnceLock};

use async_trait::async_trait;
use datafusion::arrow::array::{
    new_null_array, ArrayRef, Int64Array, StringBuilder, TimestampMillisecondArray,
};
use datafusion::arrow::compute::cast;
use datafusion::arrow::datatypes::{DataType, SchemaRef};
use datafusion::arrow::record_batch::RecordBatch;
use datafusion::common::Result;
use weir_catalog::TableDef;

use super::factory::{invalid, opt_duration, opt_u64, to_df, Throttle};
use super::io::SplitReader;
use super::share::Share;
use crate::sql::error::{SqlError, SqlResult};
use crate::stream::message::ChangeBatch;

const PERSON_PROPORTION: u64 = 1;
const AUCTION_PROPORTION: u64 = 3;
const TOTAL_PROPORTION: u64 = 50;
const FIRST_PERSON_ID: i64 = 1000;
const FIRST_AUCTION_ID: i64 = 1000;
const FIRST_CATEGORY_ID: i64 = 10;
const NUM_CATEGORIES: u64 = 5;
const PERSON_ID_LEAD: u64 = 10;
const AUCTION_ID_LEAD: u64 = 10;
/// Hot auctions, sellers and bidders are the first of each batch of this many.
const HOT_BATCH: u64 = 100;
const HOT_CHANNELS_RATIO: u64 = 2;
const CHANNELS_NUMBER: usize = 10_000;
const AVG_PERSON_BYTES: u64 = 200;
const AVG_AUCTION_BYTES: u64 = 500;
const AVG_BID_BYTES: u64 = 100;
/// 2015-07-15T00:00:00Z, the reference generator's base time.
const DEFAULT_BASE_TIME_MS: i64 = 1_436_918_400_000;

const US_STATES: &[&str] = &["AZ", "CA", "ID", "OR", "WA", "WY"];
const US_CITIES: &[&str] = &[
    "Phoenix",
    "Los Angeles",
    "San Francisco",
    "Boise",
    "Portland",
    "Bend",
    "Redmond",
    "Seattle",
    "Kent",
    "Cheyenne",
];
const FIRST_NAMES: &[&str] = &[
    "Peter", "Paul", "Luke", "John", "Saul", "Vicky", "Kate", "Julie", "Sarah", "Deiter", "Walter",
];
const LAST_NAMES: &[&str] = &[
    "Shultz", "Abrams", "Spencer", "White", "Bartels", "Walton", "Smith", "Jones", "Noris",
];
const HOT_CHANNELS: &[&str] = &["Google", "Facebook", "Baidu", "Apple"];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    Person,
    Auction,
    Bid,
}

impl Stream {
    fn fields(self) -> &'static [(&'static str, Natural)] {
        use Natural::*;
        match self {
            Stream::Person => &[
                ("id", Int),
                ("name", Str),
                ("email_address", Str),
                ("credit_card", Str),
                ("city", Str),
                ("state", Str),
                ("date_time", Ts),
                ("extra", Str),
            ],
            Stream::Auction => &[
                ("id", Int),
                ("item_name", Str),
                ("description", Str),
                ("initial_bid", Int),
                ("reserve", Int),
                ("date_time", Ts),
                ("expires", Ts),
                ("seller", Int),
                ("category", Int),
                ("extra", Str),
            ],
            Stream::Bid => &[
                ("auction", Int),
                ("bidder", Int),
                ("price", Int),
                ("channel", Str),
                ("url", Str),
                ("date_time", Ts),
                ("extra", Str),
            ],
        }
    }
}

/// The type a field is generated as: BIGINT, STRING or TIMESTAMP(3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Natural {
    Int,
    Str,
    Ts,
}

/// The generator's parameters (Nexmark's `GeneratorConfig`).
#[derive(Debug, Clone)]
pub struct NexmarkConfig {
    pub stream: Stream,
    /// Events over all three streams; `None` = unbounded.
    pub max_events: Option<u64>,
    /// Wall-clock pace over all streams and splits; `None` = as fast as possible.
    pub events_per_second: Option<u64>,
    /// Event-time spacing of events, microseconds (1e6 / first-event-rate).
    pub inter_event_delay_us: f64,
    pub out_of_order_group_size: u64,
    pub base_time_ms: i64,
    /// Paced with a base time given: event n comes out when the wall clock reaches
    /// base time + n / events-per-second, rather than that long after the read starts.
    pub paced_from_base_time: bool,
    pub hot_auction_ratio: u64,
    pub hot_seller_ratio: u64,
    pub hot_bidder_ratio: u64,
    pub num_active_people: u64,
    pub num_in_flight_auctions: u64,
}

impl NexmarkConfig {
    pub fn from_options(def: &TableDef) -> SqlResult<Self> {
        let stream = match def.options.get("nexmark.table").map(String::as_str) {
            Some("person") => Stream::Person,
            Some("auction") => Stream::Auction,
            Some("bid") => Stream::Bid,
            _ => {
                return Err(invalid(
                    "connector 'nexmark' needs 'nexmark.table' = 'person', 'auction' or 'bid'",
                ))
            }
        };
        let positive = |key: &str, default: u64| -> SqlResult<u64> {
            match opt_u64(def, key)? {
                None => Ok(default),
                Some(0) => Err(invalid(format!("option '{key}' must be greater than 0"))),
                Some(n) => Ok(n),
            }
        };
        let first_event_rate = positive("nexmark.first-event-rate", 10_000)?;
        let inter_event_delay_us = 1_000_000.0 / first_event_rate as f64;
        let events_per_second = match opt_u64(def, "nexmark.events-per-second")? {
            Some(0) => {
                return Err(invalid(
                    "option 'nexmark.events-per-second' must be greater than 0; \
                     leave it out to generate as fast as possible",
                ))
            }
            n => n,
        };
        let group = opt_u64(def, "nexmark.out-of-order-group-size")?;
        let lateness = opt_duration(def, "nexmark.max-out-of-orderness")?;
        let mut out_of_order_group_size = match (group, lateness) {
            (Some(_), Some(_)) => {
                return Err(invalid(
                    "give one of 'nexmark.max-out-of-orderness' and \
                     'nexmark.out-of-order-group-size', not both",
                ))
            }
            (Some(n), None) => n.max(1),
            // Event times within a group of n events span (n - 1) delays, plus 1 ms of
            // rounding to milliseconds.
            (None, Some(d)) => {
                let us = (d.as_micros() as f64 - 1000.0).max(0.0);
                (us / inter_event_delay_us) as u64 + 1
            }
            (None, None) => 1,
        };
        // Event numbers are shuffled by multiplying with 953 modulo the group size: a
        // permutation only when the size is not a multiple of 953.
        if out_of_order_group_size.is_multiple_of(953) {
            out_of_order_group_size -= 1;
        }
        let base_time = opt_u64(def, "nexmark.base-time")?;
        Ok(Self {
            stream,
            max_events: opt_u64(def, "nexmark.event.num")?,
            events_per_second,
            inter_event_delay_us,
            out_of_order_group_size,
            base_time_ms: base_time.map_or(DEFAULT_BASE_TIME_MS, |t| t as i64),
            paced_from_base_time: base_time.is_some() && events_per_second.is_some(),
            hot_auction_ratio: positive("nexmark.hot-auction-ratio", 2)?,
            hot_seller_ratio: positive("nexmark.hot-seller-ratio", 4)?,
            hot_bidder_ratio: positive("nexmark.hot-bidder-ratio", 4)?,
            num_active_people: positive("nexmark.num-active-people", 1000)?,
            num_in_flight_auctions: positive("nexmark.num-in-flight-auctions", 100)?,
        })
    }

    /// The id of event number `n` (Nexmark's adjusted event number): `n` shuffled within
    /// its out-of-order group.
    fn event_id(&self, n: u64) -> u64 {
        let g = self.out_of_order_group_size;
        if g == 1 {
            return n;
        }
        (n / g) * g + (n.wrapping_mul(953)) % g
    }

    fn timestamp(&self, event_id: u64) -> i64 {
        self.base_time_ms + ((event_id as f64 * self.inter_event_delay_us) as i64) / 1000
    }
}

fn stream_of(event_id: u64) -> Stream {
    let rem = event_id % TOTAL_PROPORTION;
    if rem < PERSON_PROPORTION {
        Stream::Person
    } else if rem < PERSON_PROPORTION + AUCTION_PROPORTION {
        Stream::Auction
    } else {
        Stream::Bid
    }
}

fn last_base0_person_id(event_id: u64) -> u64 {
    let epoch = event_id / TOTAL_PROPORTION;
    let mut offset = event_id % TOTAL_PROPORTION;
    if offset >= PERSON_PROPORTION {
        // An auction or a bid: the last person of this epoch.
        offset = PERSON_PROPORTION - 1;
    }
    epoch * PERSON_PROPORTION + offset
}

fn last_base0_auction_id(event_id: u64) -> u64 {
    let mut epoch = event_id / TOTAL_PROPORTION;
    let mut offset = event_id % TOTAL_PROPORTION;
    if offset < PERSON_PROPORTION {
        // A person: the last auction of the previous epoch.
        if epoch == 0 {
            return 0;
        }
        epoch -= 1;
        offset = AUCTION_PROPORTION - 1;
    } else if offset >= PERSON_PROPORTION + AUCTION_PROPORTION {
        offset = AUCTION_PROPORTION - 1;
    } else {
        offset -= PERSON_PROPORTION;
    }
    epoch * AUCTION_PROPORTION + offset
}

/// SplitMix64 seeded with the event id: cheap, and the same values for the same event.
struct Rng(u64);

impl Rng {
    fn for_event(event_id: u64) -> Self {
        Rng(event_id ^ 0x6A09_E667_F3BC_C909)
    }

    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (`n` > 0).
    fn below(&mut self, n: u64) -> u64 {
        ((self.next() as u128 * n as u128) >> 64) as u64
    }

    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    fn pick<'a>(&mut self, items: &[&'a str]) -> &'a str {
        items[self.below(items.len() as u64) as usize]
    }
}

/// Nexmark's `10^(6u) * 100` for a uniform `u`, as `e^(6u ln 10)`: `exp` costs about half
/// of `powf` (5 % of a stateless query's profile).
fn next_price(rng: &mut Rng) -> i64 {
    ((rng.unit() * 6.0 * std::f64::consts::LN_10).exp() * 100.0).round() as i64
}

/// Random lowercase letters, sliced for `extra` strings instead of drawing each letter.
fn letters() -> &'static str {
    static LETTERS: OnceLock<String> = OnceLock::new();
    LETTERS.get_or_init(|| {
        let mut rng = Rng(0x5EED);
        (0..(1 << 16))
            .map(|_| (b'a' + rng.below(26) as u8) as char)
            .collect()
    })
}

/// Appends Nexmark's `nextString(max)`: 3..max letters with the odd space, trimmed.
fn push_string(out: &mut String, rng: &mut Rng, max_len: u64) {
    let len = 3 + rng.below(max_len - 3);
    let start = out.len();
    for _ in 0..len {
        let r = rng.below(13 * 26);
        out.push(if r < 26 {
            ' '
        } else {
            (b'a' + (r % 26) as u8) as char
        });
    }
    let trimmed = out[start..].trim().to_string();
    out.truncate(start);
    out.push_str(&trimmed);
}

/// A `nextExtra` padding string: letters such that the event averages `avg` bytes.
fn extra(rng: &mut Rng, current: u64, avg: u64) -> &'static str {
    if current > avg {
        return "";
    }
    let desired = avg - current;
    let delta = (desired as f64 * 0.2).round() as u64;
    let len = desired - delta + if delta == 0 { 0 } else { rng.below(2 * delta) };
    let all = letters();
    let start = rng.below((all.len() - len as usize) as u64) as usize;
    &all[start..start + len as usize]
}

/// (channel, url) for the 10,000 ordinary channels, then the hot ones, all in one string:
/// a bid reads a random channel's two strings, and kept as separate allocations (with
/// their headers) they were three cache misses a bid, most of the copy into the batch.
struct Channels {
    text: String,
    /// Per channel: where its name starts, where its url starts, where the url ends.
    bounds: Vec<[u32; 3]>,
}

impl Channels {
    fn push(&mut self, name: &str, url: &str) {
        let start = self.text.len() as u32;
        self.text.push_str(name);
        let url_start = self.text.len() as u32;
        self.text.push_str(url);
        self.bounds.push([start, url_start, self.text.len() as u32]);
    }

    /// Channel `i`'s (name, url).
    #[inline]
    fn get(&self, i: usize) -> (&str, &str) {
        let [start, url_start, end] = self.bounds[i];
        (
            &self.text[start as usize..url_start as usize],
            &self.text[url_start as usize..end as usize],
        )
    }
}

fn channels() -> &'static Channels {
    static CHANNELS: OnceLock<Channels> = OnceLock::new();
    CHANNELS.get_or_init(|| {
        let mut rng = Rng(0xC4A7_7E15);
        let base_url = |rng: &mut Rng| {
            let mut url = String::from("https://www.nexmark.com/");
            for _ in 0..3 {
                let len = 3 + rng.below(2);
                for _ in 0..len {
                    let r = rng.below(13 * 26);
                    url.push(if r < 26 {
                        '_'
                    } else {
                        (b'a' + (r % 26) as u8) as char
                    });
                }
                url.push('/');
            }
            url.push_str("item.htm?query=1");
            url
        };
        let mut all = Channels {
            text: String::new(),
            bounds: Vec::with_capacity(CHANNELS_NUMBER + HOT_CHANNELS.len()),
        };
        for i in 0..CHANNELS_NUMBER {
            let mut url = base_url(&mut rng);
            if rng.below(10) > 0 {
                let _ = write!(
                    url,
                    "&channel_id={}",
                    (i as i32).reverse_bits().unsigned_abs()
                );
            }
            all.push(&format!("channel-{i}"), &url);
        }
        for hot in HOT_CHANNELS {
            let url = base_url(&mut rng);
            all.push(hot, &url);
        }
        all
    })
}

/// Where generated values go: a buffer per declared column, none for the rest.
enum Buf {
    Off,
    Int(Vec<i64>),
    Str(StringBuilder),
}

struct Out {
    bufs: Vec<Buf>,
}

impl Out {
    #[inline]
    fn int(&mut self, field: usize, v: i64) {
        if let Buf::Int(b) = &mut self.bufs[field] {
            b.push(v);
        }
    }

    #[inline]
    fn str(&mut self, field: usize, v: &str) {
        if let Buf::Str(b) = &mut self.bufs[field] {
            b.append_value(v);
        }
    }

    #[inline]
    fn on(&self, field: usize) -> bool {
        !matches!(self.bufs[field], Buf::Off)
    }
}

/// One declared column: which generated field it is and the type it is declared as.
struct Column {
    field: usize,
    natural: Natural,
    declared: DataType,
    /// Generated; otherwise the query does not read it and it is left NULL.
    produced: bool,
}

pub struct NexmarkReader {
    config: NexmarkConfig,
    schema: SchemaRef,
    columns: Vec<Column>,
    /// Field index -> is it declared (so its buffer is filled).
    wanted: Vec<bool>,
    /// The event numbers this split reads; its current unit is the next event.
    share: Share<()>,
    batch_size: usize,
    throttle: Option<Throttle>,
    scratch: String,
    /// Field index -> the string bytes its previous batch held: the next batch reserves
    /// that much, so its buffer does not grow (and copy itself) on the way.
    str_bytes: Vec<usize>,
}

impl NexmarkReader {
    pub fn open(def: &TableDef, split: usize, splits: usize, batch_size: usize) -> SqlResult<Self> {
        Self::open_reading(def, split, splits, batch_size, None)
    }

    /// A reader producing only the columns `read` marks (all when `None`); the others,
    /// which the query does not use, are NULL (a column declared NOT NULL is produced).
    pub fn open_reading(
        def: &TableDef,
        split: usize,
        splits: usize,
        batch_size: usize,
        read: Option<&[bool]>,
    ) -> SqlResult<Self> {
        let config = NexmarkConfig::from_options(def)?;
        let fields = config.stream.fields();
        let schema = def.physical_schema();
        let mut columns = Vec::new();
        let mut wanted = vec![false; fields.len()];
        for (i, f) in schema.fields().iter().enumerate() {
            let Some(idx) = fields
                .iter()
                .position(|(n, _)| n.eq_ignore_ascii_case(f.name()))
            else {
                let names: Vec<&str> = fields.iter().map(|(n, _)| *n).collect();
                return Err(invalid(format!(
                    "column \"{}\" is not a field of the nexmark {} stream; its fields are: {}",
                    f.name(),
                    def.options["nexmark.table"],
                    names.join(", ")
                )));
            };
            let natural = fields[idx].1;
            let ok = match natural {
                Natural::Int => f.data_type().is_integer() || f.data_type().is_numeric(),
                Natural::Str => matches!(f.data_type(), DataType::Utf8),
                Natural::Ts => matches!(f.data_type(), DataType::Timestamp(..)),
            };
            if !ok {
                let want = match natural {
                    Natural::Int => "BIGINT (or another numeric type)",
                    Natural::Str => "STRING or VARCHAR",
                    Natural::Ts => "TIMESTAMP(3) (or another TIMESTAMP)",
                };
                return Err(SqlError::new(
                    crate::sql::error::sqlstate::DATATYPE_MISMATCH,
                    format!(
                        "nexmark field \"{}\" is {want}; declare the column with that type",
                        f.name()
                    ),
                ));
            }
            let produced =
                !f.is_nullable() || read.is_none_or(|r| r.get(i).copied().unwrap_or(true));
            wanted[idx] |= produced;
            columns.push(Column {
                field: idx,
                natural,
                declared: f.data_type().clone(),
                produced,
            });
        }
        // Each split paces its share: event k of the split is event split + k * splits.
        let throttle = config.events_per_second.map(|eps| {
            let rate = eps as f64 / splits as f64;
            match config.paced_from_base_time {
                true => Throttle::from_wall_clock(rate, config.base_time_ms),
                false => Throttle::new(rate),
            }
        });
        Ok(Self {
            config,
            schema,
            columns,
            wanted,
            share: Share::new(split, splits),
            batch_size,
            throttle,
            scratch: String::new(),
            str_bytes: vec![0; fields.len()],
        })
    }

    fn new_out(&self) -> Out {
        let fields = self.config.stream.fields();
        Out {
            bufs: fields
                .iter()
                .zip(&self.wanted)
                .zip(&self.str_bytes)
                .map(|(((_, natural), wanted), bytes)| match (wanted, natural) {
                    (false, _) => Buf::Off,
                    (true, Natural::Str) => Buf::Str(StringBuilder::with_capacity(
                        self.batch_size,
                        (self.batch_size * 16).max(bytes + bytes / 8),
                    )),
                    (true, _) => Buf::Int(Vec::with_capacity(self.batch_size)),
                })
                .collect(),
        }
    }

    /// Events this split has left, if bounded.
    fn remaining(&self) -> Option<u64> {
        self.config.max_events.map(|max| self.share.left_below(max))
    }

    /// Generates this split's next event numbers, up to `events` of them or until `cap`
    /// rows of the table's stream were added. Returns the rows added.
    fn generate(&mut self, out: &mut Out, events: u64, cap: usize) -> usize {
        let mut rows = 0;
        let stream = self.config.stream;
        let end = self.config.max_events.unwrap_or(u64::MAX);
        for _ in 0..events {
            let n = self.share.unit();
            if rows == cap || n >= end {
                break;
            }
            self.share.pass();
            let id = self.config.event_id(n);
            if stream_of(id) != stream {
                continue;
            }
            rows += 1;
            match stream {
                Stream::Bid => self.bid(out, id),
                Stream::Auction => self.auction(out, id),
                Stream::Person => self.person(out, id),
            }
        }
        rows
    }

    fn next_base0_person_id(&self, event_id: u64, rng: &mut Rng) -> u64 {
        let num_people = last_base0_person_id(event_id) + 1;
        let active = num_people.min(self.config.num_active_people);
        num_people - active + rng.below(active + PERSON_ID_LEAD)
    }

    fn next_base0_auction_id(&self, event_id: u64, rng: &mut Rng) -> u64 {
        let max = last_base0_auction_id(event_id);
        let min = max.saturating_sub(self.config.num_in_flight_auctions);
        min + rng.below(max - min + 1 + AUCTION_ID_LEAD)
    }

    #[inline]
    fn bid(&self, out: &mut Out, id: u64) {
        let mut rng = Rng::for_event(id);
        let auction = if rng.below(self.config.hot_auction_ratio) > 0 {
            (last_base0_auction_id(id) / HOT_BATCH) * HOT_BATCH
        } else {
            self.next_base0_auction_id(id, &mut rng)
        };
        let bidder = if rng.below(self.config.hot_bidder_ratio) > 0 {
            (last_base0_person_id(id) / HOT_BATCH) * HOT_BATCH + 1
        } else {
            self.next_base0_person_id(id, &mut rng)
        };
        let price = next_price(&mut rng);
        let channel = if rng.below(HOT_CHANNELS_RATIO) > 0 {
            CHANNELS_NUMBER + rng.below(HOT_CHANNELS.len() as u64) as usize
        } else {
            rng.below(CHANNELS_NUMBER as u64) as usize
        };
        out.int(0, auction as i64 + FIRST_AUCTION_ID);
        out.int(1, bidder as i64 + FIRST_PERSON_ID);
        out.int(2, price);
        if out.on(3) || out.on(4) {
            let (name, url) = channels().get(channel);
            out.str(3, name);
            out.str(4, url);
        }
        out.int(5, self.config.timestamp(id));
        // The event's last draws: skipped when the column is not read.
        if out.on(6) {
            out.str(6, extra(&mut rng, 32, AVG_BID_BYTES));
        }
    }

    fn auction(&mut self, out: &mut Out, id: u64) {
        let mut rng = Rng::for_event(id);
        let ts = self.config.timestamp(id);
        let auction = last_base0_auction_id(id) as i64 + FIRST_AUCTION_ID;
        let seller = if rng.below(self.config.hot_seller_ratio) > 0 {
            (last_base0_person_id(id) / HOT_BATCH) * HOT_BATCH
        } else {
            self.next_base0_person_id(id, &mut rng)
        };
        let category = FIRST_CATEGORY_ID + rng.below(NUM_CATEGORIES) as i64;
        let initial_bid = next_price(&mut rng);
        // Auctions last on average as long as it takes to generate the in-flight number
        // of further auctions.
        let ahead = self.config.num_in_flight_auctions * TOTAL_PROPORTION / AUCTION_PROPORTION;
        let horizon = self.config.timestamp(id + ahead) - ts;
        let expires = ts + 1 + rng.below((horizon * 2).max(1) as u64) as i64;
        let s = &mut self.scratch;
        s.clear();
        push_string(s, &mut rng, 20);
        let name_len = s.len();
        push_string(s, &mut rng, 100);
        let reserve = initial_bid + next_price(&mut rng);
        let current = 8 + s.len() as u64 + 8 * 5;
        let extra = extra(&mut rng, current, AVG_AUCTION_BYTES);
        out.int(0, auction);
        out.str(1, &s[..name_len]);
        out.str(2, &s[name_len..]);
        out.int(3, initial_bid);
        out.int(4, reserve);
        out.int(5, ts);
        out.int(6, expires);
        out.int(7, seller as i64 + FIRST_PERSON_ID);
        out.int(8, category);
        out.str(9, extra);
    }

    fn person(&mut self, out: &mut Out, id: u64) {
        let mut rng = Rng::for_event(id);
        let s = &mut self.scratch;
        s.clear();
        s.push_str(rng.pick(FIRST_NAMES));
        s.push(' ');
        s.push_str(rng.pick(LAST_NAMES));
        let name_end = s.len();
        push_string(s, &mut rng, 7);
        s.push('@');
        push_string(s, &mut rng, 5);
        s.push_str(".com");
        let email_end = s.len();
        for i in 0..4 {
            if i > 0 {
                s.push(' ');
            }
            let _ = write!(s, "{:04}", rng.below(10_000));
        }
        let card_end = s.len();
        let city = rng.pick(US_CITIES);
        let state = rng.pick(US_STATES);
        let current = 8 + card_end as u64 + city.len() as u64 + state.len() as u64;
        let extra = extra(&mut rng, current, AVG_PERSON_BYTES);
        out.int(0, last_base0_person_id(id) as i64 + FIRST_PERSON_ID);
        out.str(1, &s[..name_end]);
        out.str(2, &s[name_end..email_end]);
        out.str(3, &s[email_end..card_end]);
        out.str(4, city);
        out.str(5, state);
        out.int(6, self.config.timestamp(id));
        out.str(7, extra);
    }

    fn finish(&mut self, out: Out, rows: usize) -> SqlResult<RecordBatch> {
        for (field, buf) in out.bufs.iter().enumerate() {
            if let Buf::Str(b) = buf {
                self.str_bytes[field] = b.values_slice().len();
            }
        }
        let mut bufs: Vec<Option<Buf>> = out.bufs.into_iter().map(Some).collect();
        let mut arrays: Vec<ArrayRef> = Vec::with_capacity(self.columns.len());
        for col in &self.columns {
            if !col.produced {
                arrays.push(new_null_array(&col.declared, rows));
                continue;
            }
            // A column declared twice (different case) reuses the first one's values.
            let array: ArrayRef = match bufs[col.field].take() {
                Some(Buf::Int(v)) => match col.natural {
                    Natural::Ts => Arc::new(TimestampMillisecondArray::from(v)),
                    _ => Arc::new(Int64Array::from(v)),
                },
                Some(Buf::Str(mut b)) => Arc::new(b.finish()),
                _ => {
                    let first = self
                        .columns
                        .iter()
                        .position(|c| c.field == col.field && c.produced)
                        .expect("declared");
                    arrays[first].clone()
                }
            };
            let array = if array.data_type() == &col.declared {
                array
            } else {
                cast(&array, &col.declared)?
            };
            arrays.push(array);
        }
        let options =
            datafusion::arrow::record_batch::RecordBatchOptions::new().with_row_count(Some(rows));
        Ok(RecordBatch::try_new_with_options(
            self.schema.clone(),
            arrays,
            &options,
        )?)
    }
}

#[async_trait]
impl SplitReader for NexmarkReader {
    async fn next_batch(&mut self) -> Result<Option<ChangeBatch>> {
        // Scan enough events for about a batch of this stream's rows.
        let share = match self.config.stream {
            Stream::Person => PERSON_PROPORTION,
            Stream::Auction => AUCTION_PROPORTION,
            Stream::Bid => TOTAL_PROPORTION - PERSON_PROPORTION - AUCTION_PROPORTION,
        };
        let mut out = self.new_out();
        let mut rows = 0;
        loop {
            let mut events = ((self.batch_size - rows) as u64 * TOTAL_PROPORTION).div_ceil(share)
                + TOTAL_PROPORTION;
            if let Some(left) = self.remaining() {
                if left == 0 {
                    break;
                }
                events = events.min(left);
            }
            if let Some(t) = &mut self.throttle {
                events = events.min(t.step());
                t.wait(events).await;
            }
            rows += self.generate(&mut out, events, self.batch_size - rows);
            // Paced: hand over what is due rather than wait for a full batch.
            if rows == self.batch_size || (rows > 0 && self.throttle.is_some()) {
                break;
            }
        }
        if rows == 0 {
            return Ok(None);
        }
        self.finish(out, rows)
            .map(|b| Some(ChangeBatch::new(b)))
            .map_err(to_df)
    }

    fn position(&self) -> Vec<u8> {
        self.share.position(())
    }

    fn restore(&mut self, position: &[u8]) -> Result<()> {
        self.share.restore(position).map_err(to_df)?;
        if let Some(t) = &mut self.throttle {
            t.resume(self.share.passed());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::connector::factory::test_util::{read_rescaled, table};
    use datafusion::arrow::array::{Array, AsArray};
    use datafusion::arrow::datatypes::{Int64Type, TimestampMillisecondType};
    use weir_catalog::SqlType;

    fn bid_columns() -> Vec<(&'static str, SqlType)> {
        vec![
            ("auction", SqlType::BigInt),
            ("bidder", SqlType::BigInt),
            ("price", SqlType::BigInt),
            ("channel", SqlType::Varchar(None)),
            ("url", SqlType::Varchar(None)),
            ("date_time", SqlType::Timestamp(3)),
            ("extra", SqlType::Varchar(None)),
        ]
    }

    fn person_columns() -> Vec<(&'static str, SqlType)> {
        [
            "id",
            "name",
            "email_address",
            "credit_card",
            "city",
            "state",
            "date_time",
            "extra",
        ]
        .iter()
        .map(|n| {
            (
                *n,
                match *n {
                    "id" => SqlType::BigInt,
                    "date_time" => SqlType::Timestamp(3),
                    _ => SqlType::Varchar(None),
                },
            )
        })
        .collect()
    }

    fn auction_columns() -> Vec<(&'static str, SqlType)> {
        [
            ("id", SqlType::BigInt),
            ("item_name", SqlType::Varchar(None)),
            ("description", SqlType::Varchar(None)),
            ("initial_bid", SqlType::BigInt),
            ("reserve", SqlType::BigInt),
            ("date_time", SqlType::Timestamp(3)),
            ("expires", SqlType::Timestamp(3)),
            ("seller", SqlType::BigInt),
            ("category", SqlType::BigInt),
            ("extra", SqlType::Varchar(None)),
        ]
        .to_vec()
    }

    async fn read_all(
        cols: &[(&str, SqlType)],
        opts: &[(&str, &str)],
        splits: usize,
    ) -> Vec<RecordBatch> {
        let def = table(cols, opts);
        let mut out = vec![];
        for k in 0..splits {
            let mut r = NexmarkReader::open(&def, k, splits, 1000).unwrap();
            while let Some(b) = r.next_batch().await.unwrap().map(|c| c.rows) {
                assert!(b.num_rows() > 0);
                out.push(b);
            }
        }
        out
    }

    fn rows(batches: &[RecordBatch]) -> usize {
        batches.iter().map(|b| b.num_rows()).sum()
    }

    #[tokio::test]
    async fn proportions_and_event_count() {
        let n = "10000";
        let bids = read_all(
            &bid_columns(),
            &[("nexmark.table", "bid"), ("nexmark.event.num", n)],
            1,
        )
        .await;
        let people = read_all(
            &person_columns(),
            &[("nexmark.table", "person"), ("nexmark.event.num", n)],
            1,
        )
        .await;
        let auctions = read_all(
            &auction_columns(),
            &[("nexmark.table", "auction"), ("nexmark.event.num", n)],
            1,
        )
        .await;
        assert_eq!(rows(&bids), 9200);
        assert_eq!(rows(&people), 200);
        assert_eq!(rows(&auctions), 600);
        // Over three splits: the same count.
        let bids3 = read_all(
            &bid_columns(),
            &[("nexmark.table", "bid"), ("nexmark.event.num", "10001")],
            3,
        )
        .await;
        assert_eq!(rows(&bids3), 9200);
    }

    fn sorted_bids(batches: &[RecordBatch]) -> Vec<(i64, i64, i64, i64, String)> {
        let mut v = vec![];
        for b in batches {
            for i in 0..b.num_rows() {
                v.push((
                    b.column(5)
                        .as_primitive::<TimestampMillisecondType>()
                        .value(i),
                    b.column(0).as_primitive::<Int64Type>().value(i),
                    b.column(1).as_primitive::<Int64Type>().value(i),
                    b.column(2).as_primitive::<Int64Type>().value(i),
                    b.column(4).as_string::<i32>().value(i).to_string(),
                ));
            }
        }
        v.sort();
        v
    }

    #[tokio::test]
    async fn deterministic_and_independent_of_splits() {
        let opts = [("nexmark.table", "bid"), ("nexmark.event.num", "5000")];
        let one = sorted_bids(&read_all(&bid_columns(), &opts, 1).await);
        let again = sorted_bids(&read_all(&bid_columns(), &opts, 1).await);
        let four = sorted_bids(&read_all(&bid_columns(), &opts, 4).await);
        assert_eq!(one, again);
        assert_eq!(one, four);
        // Exact first rows: event 4 is the first bid, 100 us apart at 10,000 events/s.
        let first = &read_all(&bid_columns(), &opts, 1).await[0];
        let ts = first.column(5).as_primitive::<TimestampMillisecondType>();
        assert_eq!(ts.value(0), DEFAULT_BASE_TIME_MS);
        assert_eq!(ts.value(10), DEFAULT_BASE_TIME_MS + 1);
    }

    #[tokio::test]
    async fn rescaled_readers_produce_every_event_once() {
        // Out of order too: event numbers shuffled within groups.
        let def = table(
            &bid_columns(),
            &[
                ("connector", "nexmark"),
                ("nexmark.table", "bid"),
                ("nexmark.event.num", "20000"),
                ("nexmark.max-out-of-orderness", "2 s"),
            ],
        );
        let straight = read_rescaled(&def, &[(1, 0)], 500).await;
        assert!(straight.len() > 18000, "{} bids", straight.len());
        for layouts in [&[(2, 3), (3, 0)][..], &[(4, 1), (3, 0), (1, 0), (2, 0)]] {
            assert_eq!(
                read_rescaled(&def, layouts, 500).await,
                straight,
                "{layouts:?}"
            );
        }
    }

    #[tokio::test]
    async fn field_shapes() {
        let opts = [("nexmark.table", "bid"), ("nexmark.event.num", "50000")];
        let batches = read_all(&bid_columns(), &opts, 1).await;
        let mut hot_channels = 0;
        let mut total = 0;
        for b in &batches {
            let auction = b.column(0).as_primitive::<Int64Type>();
            let bidder = b.column(1).as_primitive::<Int64Type>();
            let price = b.column(2).as_primitive::<Int64Type>();
            let channel = b.column(3).as_string::<i32>();
            let url = b.column(4).as_string::<i32>();
            let extra = b.column(6).as_string::<i32>();
            for i in 0..b.num_rows() {
                total += 1;
                assert!(auction.value(i) >= FIRST_AUCTION_ID);
                assert!(bidder.value(i) >= FIRST_PERSON_ID);
                assert!(
                    (100..=100_000_000).contains(&price.value(i)),
                    "{}",
                    price.value(i)
                );
                assert!(url.value(i).starts_with("https://www.nexmark.com/"));
                assert!((54..82).contains(&extra.value(i).len()));
                if HOT_CHANNELS.contains(&channel.value(i)) {
                    hot_channels += 1;
                } else {
                    assert!(channel.value(i).starts_with("channel-"));
                }
                assert_eq!(b.column(0).null_count(), 0);
            }
        }
        // Half the bids come through a hot channel.
        let share = hot_channels as f64 / total as f64;
        assert!((0.45..0.55).contains(&share), "{share}");

        let people = read_all(
            &person_columns(),
            &[("nexmark.table", "person"), ("nexmark.event.num", "5000")],
            1,
        )
        .await;
        let p = &people[0];
        let ids = p.column(0).as_primitive::<Int64Type>();
        assert_eq!(ids.value(0), 1000);
        assert_eq!(ids.value(1), 1001);
        for i in 0..p.num_rows() {
            let name = p.column(1).as_string::<i32>().value(i);
            assert!(name.contains(' '), "{name}");
            let email = p.column(2).as_string::<i32>().value(i);
            assert!(email.ends_with(".com") && email.contains('@'), "{email}");
            let card = p.column(3).as_string::<i32>().value(i);
            assert_eq!(card.len(), 19, "{card}");
            assert!(US_STATES.contains(&p.column(5).as_string::<i32>().value(i)));
        }

        let auctions = read_all(
            &auction_columns(),
            &[("nexmark.table", "auction"), ("nexmark.event.num", "5000")],
            1,
        )
        .await;
        let a = &auctions[0];
        for i in 0..a.num_rows() {
            let initial = a.column(3).as_primitive::<Int64Type>().value(i);
            let reserve = a.column(4).as_primitive::<Int64Type>().value(i);
            assert!(reserve > initial);
            let dt = a
                .column(5)
                .as_primitive::<TimestampMillisecondType>()
                .value(i);
            let exp = a
                .column(6)
                .as_primitive::<TimestampMillisecondType>()
                .value(i);
            assert!(exp > dt);
            let cat = a.column(8).as_primitive::<Int64Type>().value(i);
            assert!((10..15).contains(&cat));
        }
        let ids = a.column(0).as_primitive::<Int64Type>();
        assert_eq!(
            (ids.value(0), ids.value(1), ids.value(3)),
            (1000, 1001, 1003)
        );
    }

    #[tokio::test]
    async fn out_of_orderness_is_bounded() {
        let opts = [
            ("nexmark.table", "bid"),
            // Whole groups of 1991 events (200 ms at 100 us apart).
            ("nexmark.event.num", "99550"),
            ("nexmark.max-out-of-orderness", "200 ms"),
        ];
        let batches = read_all(&bid_columns(), &opts, 1).await;
        let mut max_seen = i64::MIN;
        let mut max_lateness = 0;
        for b in &batches {
            let ts = b.column(5).as_primitive::<TimestampMillisecondType>();
            for i in 0..b.num_rows() {
                max_seen = max_seen.max(ts.value(i));
                max_lateness = max_lateness.max(max_seen - ts.value(i));
            }
        }
        assert!(max_lateness <= 200, "{max_lateness}");
        assert!(
            max_lateness >= 150,
            "events should be out of order: {max_lateness}"
        );
        // Still 46 bids in 50 events.
        assert_eq!(rows(&batches), 99550 / 50 * 46);
    }

    #[tokio::test]
    async fn subset_of_columns_other_types_and_restore() {
        let cols = [
            ("price", SqlType::Int),
            ("date_time", SqlType::Timestamp(6)),
        ];
        let def = table(
            &cols,
            &[("nexmark.table", "bid"), ("nexmark.event.num", "1000")],
        );
        let mut r = NexmarkReader::open(&def, 0, 1, 100).unwrap();
        let a = r.next_batch().await.unwrap().map(|c| c.rows).unwrap();
        assert_eq!(a.num_rows(), 100);
        assert_eq!(a.schema(), def.physical_schema());
        let pos = r.position();
        let b = r.next_batch().await.unwrap().map(|c| c.rows).unwrap();
        r.restore(&pos).unwrap();
        assert_eq!(r.next_batch().await.unwrap().map(|c| c.rows).unwrap(), b);

        let bad = table(&[("colour", SqlType::BigInt)], &[("nexmark.table", "bid")]);
        let e = NexmarkReader::open(&bad, 0, 1, 10).err().unwrap();
        assert!(
            e.message.contains("auction, bidder, price"),
            "{}",
            e.message
        );
        let bad = table(
            &[("price", SqlType::Varchar(None))],
            &[("nexmark.table", "bid")],
        );
        assert!(NexmarkReader::open(&bad, 0, 1, 10).is_err());
    }

    #[tokio::test]
    async fn columns_the_query_does_not_read_are_null_and_the_rest_unchanged() {
        let mut def = table(
            &bid_columns(),
            &[("nexmark.table", "bid"), ("nexmark.event.num", "2000")],
        );
        def.columns[6].nullable = false;
        let whole = {
            let mut r = NexmarkReader::open(&def, 0, 1, 500).unwrap();
            r.next_batch().await.unwrap().unwrap().rows
        };
        // The query reads auction and date_time; extra, NOT NULL, is produced anyway.
        let read = [true, false, false, false, false, true, false];
        let mut r = NexmarkReader::open_reading(&def, 0, 1, 500, Some(&read)).unwrap();
        let part = r.next_batch().await.unwrap().unwrap().rows;
        assert_eq!(part.schema(), whole.schema());
        assert_eq!(part.num_rows(), whole.num_rows());
        for (k, name) in [(0, "auction"), (5, "date_time"), (6, "extra")] {
            assert_eq!(part.column(k), whole.column(k), "{name}");
        }
        for k in [1, 2, 3, 4] {
            assert_eq!(part.column(k).null_count(), part.num_rows(), "column {k}");
            assert_eq!(whole.column(k).null_count(), 0, "column {k}");
        }
        // A nullable extra left out (its random draws skipped) changes no other column.
        def.columns[6].nullable = true;
        let read = [true, true, true, true, true, true, false];
        let mut r = NexmarkReader::open_reading(&def, 0, 1, 500, Some(&read)).unwrap();
        let part = r.next_batch().await.unwrap().unwrap().rows;
        assert_eq!(part.column(6).null_count(), part.num_rows());
        for k in 0..6 {
            assert_eq!(part.column(k), whole.column(k), "column {k}");
        }
    }

    #[tokio::test]
    async fn paced_by_events_per_second() {
        let def = table(
            &bid_columns(),
            &[
                ("nexmark.table", "bid"),
                ("nexmark.events-per-second", "1000"),
            ],
        );
        let mut r = NexmarkReader::open(&def, 0, 1, 1000).unwrap();
        let start = std::time::Instant::now();
        let mut n = 0;
        while n < 200 {
            n += r
                .next_batch()
                .await
                .unwrap()
                .map(|c| c.rows)
                .unwrap()
                .num_rows();
        }
        let took = start.elapsed();
        assert!(took >= std::time::Duration::from_millis(150), "{took:?}");
        assert!(took < std::time::Duration::from_secs(2), "{took:?}");
    }
}

#[cfg(test)]
mod wall_clock {
    use super::*;
    use crate::connector::factory::test_util::table;
    use crate::stream::message::wall_clock_ms;
    use datafusion::arrow::array::AsArray;
    use datafusion::arrow::datatypes::TimestampMillisecondType;
    use weir_catalog::SqlType;

    /// Paced from a base time, each bid comes out within a few milliseconds after its
    /// event time; events already due come at once. (Paced from the read's start
    /// instead, the bids would trail the clock by the second the base lies back.)
    #[tokio::test]
    async fn paced_from_base_time_events_come_at_their_event_time() {
        let base = wall_clock_ms() - 1000;
        let def = table(
            &[("date_time", SqlType::Timestamp(3))],
            &[
                ("nexmark.table", "bid"),
                ("nexmark.events-per-second", "2000"),
                ("nexmark.first-event-rate", "2000"),
                ("nexmark.base-time", &base.to_string()),
            ],
        );
        let mut r = NexmarkReader::open(&def, 0, 1, 1000).unwrap();
        let (mut rows, mut newest) = (0, 0);
        while rows < 3000 {
            let batch = r.next_batch().await.unwrap().unwrap().rows;
            let arrived = wall_clock_ms();
            let times = batch.column(0).as_primitive::<TimestampMillisecondType>();
            for t in times.values() {
                // Never ahead of the clock by more than a step (1 ms) and rounding.
                assert!(*t <= arrived + 2, "event time {t} came out at {arrived}");
                newest = newest.max(*t);
            }
            rows += batch.num_rows();
        }
        // 3000 bids are ~3260 events: ~1.63 s of event time from the base, the first
        // second of them due at once.
        let now = wall_clock_ms();
        assert!(newest >= base + 1500, "{newest} vs base {base}");
        assert!(
            now - newest < 500,
            "the newest event is {} ms old",
            now - newest
        );
        assert!(now - base >= 1500, "came out too fast: {} ms", now - base);
    }
}

#[cfg(test)]
mod speed {
    use super::*;
    use crate::connector::factory::test_util::table;
    use weir_catalog::SqlType;

    /// Bid generation rate of one split: `cargo test --lib nexmark_speed -- --ignored
    /// --nocapture` (meaningful only in an optimized build).
    #[tokio::test]
    #[ignore]
    async fn nexmark_speed() {
        let cols = [
            ("auction", SqlType::BigInt),
            ("bidder", SqlType::BigInt),
            ("price", SqlType::BigInt),
            ("channel", SqlType::Varchar(None)),
            ("url", SqlType::Varchar(None)),
            ("date_time", SqlType::Timestamp(3)),
            ("extra", SqlType::Varchar(None)),
        ];
        let def = table(
            &cols,
            &[("nexmark.table", "bid"), ("nexmark.event.num", "2000000")],
        );
        let mut r = NexmarkReader::open(&def, 0, 1, 8192).unwrap();
        let start = std::time::Instant::now();
        let mut rows = 0;
        while let Some(b) = r.next_batch().await.unwrap().map(|c| c.rows) {
            rows += b.num_rows();
        }
        let secs = start.elapsed().as_secs_f64();
        println!(
            "{rows} bids in {secs:.3} s: {:.0} bids/s",
            rows as f64 / secs
        );
    }
}
