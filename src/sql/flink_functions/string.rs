//! Flink's string functions that DataFusion lacks. DataFusion already has CHAR_LENGTH,
//! CHARACTER_LENGTH, INSTR, IFNULL and CONCAT_WS with Flink's meaning.

use std::sync::Arc;

use datafusion::arrow::array::{
    Array, BinaryArray, BooleanArray, Int32Array, Int64Array, StringArray, StringBuilder,
};
use datafusion::arrow::datatypes::DataType;
use datafusion::common::Result;
use datafusion::logical_expr::{ColumnarValue, ScalarFunctionArgs};
use regex::Regex;

use super::regex_groups::GroupFinder;
use super::{invalid_argument, Compiled, FlinkFunction, Inputs, Memo, Param};

pub(super) fn all() -> Vec<FlinkFunction> {
    use Param::*;
    vec![
        FlinkFunction::new(
            "regexp_extract",
            "REGEXP_EXTRACT(STRING, STRING [, INT])",
            &[Str, Str, Int],
            2,
            |_, _| Ok(DataType::Utf8),
            regexp_extract,
        ),
        FlinkFunction::new(
            "regexp",
            "REGEXP(STRING, STRING)",
            &[Str, Str],
            2,
            |_, _| Ok(DataType::Boolean),
            regexp,
        ),
        FlinkFunction::new(
            "split_index",
            "SPLIT_INDEX(STRING, STRING, INT)",
            &[Str, Str, Int],
            3,
            |_, _| Ok(DataType::Utf8),
            split_index,
        ),
        FlinkFunction::new(
            "locate",
            "LOCATE(STRING, STRING [, INT])",
            &[Str, Str, Int],
            2,
            |_, _| Ok(DataType::Int32),
            locate,
        ),
        FlinkFunction::new(
            "to_base64",
            "TO_BASE64(STRING)",
            &[Any],
            1,
            |types, _| match &types[0] {
                DataType::Utf8 | DataType::Binary | DataType::Null => Ok(DataType::Utf8),
                other => Err(invalid_argument(format!(
                    "TO_BASE64 takes a STRING or BYTES, not {other}"
                ))),
            },
            to_base64,
        ),
        FlinkFunction::new(
            "from_base64",
            "FROM_BASE64(STRING)",
            &[Str],
            1,
            |_, _| Ok(DataType::Utf8),
            from_base64,
        ),
        FlinkFunction::new(
            "hash_code",
            "HASH_CODE(STRING)",
            &[Str],
            1,
            |_, _| Ok(DataType::Int32),
            hash_code,
        ),
        FlinkFunction::new(
            "is_digit",
            "IS_DIGIT(STRING)",
            &[Any],
            1,
            |_, _| Ok(DataType::Boolean),
            |args| classify(args, is_digit, DataType::is_integer),
        ),
        FlinkFunction::new(
            "is_alpha",
            "IS_ALPHA(STRING)",
            &[Any],
            1,
            |_, _| Ok(DataType::Boolean),
            |args| classify(args, is_alpha, |_| false),
        ),
        FlinkFunction::new(
            "is_decimal",
            "IS_DECIMAL(STRING)",
            &[Any],
            1,
            |_, _| Ok(DataType::Boolean),
            |args| classify(args, is_decimal, |t| t.is_numeric()),
        ),
    ]
}

static REGEXES: Compiled<Regex> = Compiled::new();

/// Java and Rust regexes agree on everything pipelines use except look-around and
/// back-references, which Rust's engine does not have; say so instead of answering NULL.
fn compile_regex(function: &'static str) -> impl Fn(&str) -> Result<Regex> {
    move |pattern| {
        REGEXES.get(pattern, |p| {
            Regex::new(p).map_err(|e| {
                invalid_argument(format!(
                    "{function}: invalid regular expression '{p}' ({}); look-around and back-references are not supported",
                    last_line(&e.to_string())
                ))
            })
        })
    }
}

fn last_line(s: &str) -> &str {
    s.lines().last().unwrap_or(s).trim_start_matches("error: ")
}

/// `REGEXP_EXTRACT(str, regex [, group])`: the group (default 0, the whole match) of the
/// first match, NULL when nothing matches or the group does not exist or took no part.
fn regexp_extract(args: &ScalarFunctionArgs) -> Result<ColumnarValue> {
    let inputs = Inputs::new(args)?;
    let text = inputs.arg::<StringArray>(0)?;
    let pattern = inputs.arg::<StringArray>(1)?;
    let group = inputs.optional::<Int64Array>(2)?;
    let mut regexes = Memo::new();
    let mut out = StringBuilder::with_capacity(inputs.rows, 0);
    for row in 0..inputs.rows {
        let group = match group {
            None => Some(0),
            Some(g) if g.is_null(row) => None,
            Some(g) => Some(g.value(row)),
        };
        if text.is_null(row) || pattern.is_null(row) || group.is_none() {
            out.append_null();
            continue;
        }
        let finder = regexes.get(pattern.value(row), |p| {
            GroupFinder::new(p, compile_regex("REGEXP_EXTRACT")(p)?)
        })?;
        let found = usize::try_from(group.unwrap_or(-1))
            .ok()
            .and_then(|g| finder.group(text.value(row), g));
        out.append_option(found);
    }
    inputs.output(Arc::new(out.finish()))
}

/// `REGEXP(str, regex)`: whether any substring matches; an empty regex matches nothing.
fn regexp(args: &ScalarFunctionArgs) -> Result<ColumnarValue> {
    let inputs = Inputs::new(args)?;
    let text = inputs.arg::<StringArray>(0)?;
    let pattern = inputs.arg::<StringArray>(1)?;
    let mut regexes = Memo::new();
    let out = (0..inputs.rows)
        .map(|row| {
            if text.is_null(row) || pattern.is_null(row) {
                return Ok(None);
            }
            if pattern.value(row).is_empty() {
                return Ok(Some(false));
            }
            let regex = regexes.get(pattern.value(row), compile_regex("REGEXP"))?;
            Ok(Some(regex.is_match(text.value(row))))
        })
        .collect::<Result<BooleanArray>>()?;
    inputs.output(Arc::new(out))
}

/// `SPLIT_INDEX(str, separator, index)`: the index-th (from 0) piece, empty pieces
/// included; NULL when there is no such piece. An empty separator splits at whitespace.
fn split_index(args: &ScalarFunctionArgs) -> Result<ColumnarValue> {
    let inputs = Inputs::new(args)?;
    let text = inputs.arg::<StringArray>(0)?;
    let separator = inputs.arg::<StringArray>(1)?;
    let index = inputs.arg::<Int64Array>(2)?;
    let mut out = StringBuilder::with_capacity(inputs.rows, 0);
    for row in 0..inputs.rows {
        if text.is_null(row) || separator.is_null(row) || index.is_null(row) {
            out.append_null();
            continue;
        }
        let (text, separator) = (text.value(row), separator.value(row));
        let piece = usize::try_from(index.value(row))
            .ok()
            .filter(|_| !text.is_empty())
            .and_then(|i| match separator.as_bytes() {
                [] => text.split(char::is_whitespace).nth(i),
                &[byte] if byte.is_ascii() => nth_piece(text, byte, i),
                _ => text.split(separator).nth(i),
            });
        out.append_option(piece);
    }
    inputs.output(Arc::new(out.finish()))
}

/// The index-th piece of `text` split at the ASCII byte `separator`, by a plain byte scan
/// (`str::split` with a char runs a memchr and a one-byte memcmp call per piece, which were
/// most of Nexmark q22's time on its short urls).
fn nth_piece(text: &str, separator: u8, index: usize) -> Option<&str> {
    let mut start = 0;
    let mut pieces = 0;
    for (at, &b) in text.as_bytes().iter().enumerate() {
        if b == separator {
            if pieces == index {
                return Some(&text[start..at]);
            }
            pieces += 1;
            start = at + 1;
        }
    }
    (pieces == index).then(|| &text[start..])
}

/// `LOCATE(needle, haystack [, from])`: the 1-based character position of the first
/// occurrence of needle at or after character `from` (default 1), 0 when there is none.
fn locate(args: &ScalarFunctionArgs) -> Result<ColumnarValue> {
    let inputs = Inputs::new(args)?;
    let needle = inputs.arg::<StringArray>(0)?;
    let haystack = inputs.arg::<StringArray>(1)?;
    let from = inputs.optional::<Int64Array>(2)?;
    let out: Int32Array = (0..inputs.rows)
        .map(|row| {
            if needle.is_null(row) || haystack.is_null(row) || from.is_some_and(|f| f.is_null(row))
            {
                return None;
            }
            let start = from.map_or(1, |f| f.value(row));
            Some(position(needle.value(row), haystack.value(row), start))
        })
        .collect();
    inputs.output(Arc::new(out))
}

fn position(needle: &str, haystack: &str, from: i64) -> i32 {
    if needle.is_empty() {
        return 1;
    }
    let skip = usize::try_from(from.saturating_sub(1)).unwrap_or(0);
    let Some((start, _)) = haystack.char_indices().nth(skip) else {
        return 0;
    };
    match haystack[start..].find(needle) {
        Some(at) => (skip + haystack[start..start + at].chars().count() + 1) as i32,
        None => 0,
    }
}

fn to_base64(args: &ScalarFunctionArgs) -> Result<ColumnarValue> {
    let inputs = Inputs::new(args)?;
    let input = inputs.input(0);
    let (binary, text) = match input.array.data_type() {
        DataType::Binary => (Some(input.arg::<BinaryArray>()?), None),
        _ => (None, Some(input.arg::<StringArray>()?)),
    };
    let mut out = StringBuilder::with_capacity(inputs.rows, 0);
    let mut encoded = String::new();
    for row in 0..inputs.rows {
        let bytes = match (binary, text) {
            _ if input.is_null(row) => None,
            (Some(binary), _) => Some(binary.value(row)),
            (_, Some(text)) => Some(text.value(row).as_bytes()),
            (None, None) => None,
        };
        match bytes {
            Some(bytes) => {
                encoded.clear();
                base64_encode(bytes, &mut encoded);
                out.append_value(&encoded);
            }
            None => out.append_null(),
        }
    }
    inputs.output(Arc::new(out.finish()))
}

/// `FROM_BASE64(str)`: the decoded bytes read as UTF-8 (invalid sequences become U+FFFD,
/// as Java's `new String(bytes)` does).
fn from_base64(args: &ScalarFunctionArgs) -> Result<ColumnarValue> {
    let inputs = Inputs::new(args)?;
    let text = inputs.arg::<StringArray>(0)?;
    let mut out = StringBuilder::with_capacity(inputs.rows, 0);
    let mut bytes = vec![];
    for row in 0..inputs.rows {
        if text.is_null(row) {
            out.append_null();
            continue;
        }
        bytes.clear();
        base64_decode(text.value(row), &mut bytes).ok_or_else(|| {
            invalid_argument(format!(
                "FROM_BASE64: '{}' is not base64 (A-Z a-z 0-9 + / with optional = padding)",
                text.value(row)
            ))
        })?;
        out.append_value(String::from_utf8_lossy(&bytes));
    }
    inputs.output(Arc::new(out.finish()))
}

const BASE64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

fn base64_encode(bytes: &[u8], out: &mut String) {
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, &b)| n | (b as u32) << (16 - 8 * i));
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(BASE64[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
}

/// Java's basic decoder: the standard alphabet, padding optional, nothing else allowed.
fn base64_decode(text: &str, out: &mut Vec<u8>) -> Option<()> {
    let data = text.trim_end_matches('=');
    if text.len() - data.len() > 2 || data.len() % 4 == 1 {
        return None;
    }
    let (mut acc, mut bits) = (0u32, 0);
    for b in data.bytes() {
        let v = BASE64.iter().position(|&c| c == b)? as u32;
        acc = acc << 6 | v;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    Some(())
}

/// `HASH_CODE(str)`: |Java's String.hashCode()|; Integer.MIN_VALUE for NULL.
fn hash_code(args: &ScalarFunctionArgs) -> Result<ColumnarValue> {
    let inputs = Inputs::new(args)?;
    let text = inputs.arg::<StringArray>(0)?;
    let out: Int32Array = (0..inputs.rows)
        .map(|row| {
            Some(if text.is_null(row) {
                i32::MIN
            } else {
                java_hash_code(text.value(row)).wrapping_abs()
            })
        })
        .collect();
    inputs.output(Arc::new(out))
}

fn java_hash_code(s: &str) -> i32 {
    s.encode_utf16()
        .fold(0i32, |h, c| h.wrapping_mul(31).wrapping_add(c as i32))
}

/// IS_DIGIT, IS_ALPHA and IS_DECIMAL: a string is tested with `test`, a value of another
/// type answers `of_type(its type)`; NULL answers false.
fn classify(
    args: &ScalarFunctionArgs,
    test: fn(&str) -> bool,
    of_type: fn(&DataType) -> bool,
) -> Result<ColumnarValue> {
    let inputs = Inputs::new(args)?;
    let input = inputs.input(0);
    let out: BooleanArray = match input.array.data_type() {
        DataType::Utf8 => {
            let text = input.arg::<StringArray>()?;
            (0..inputs.rows)
                .map(|row| Some(!text.is_null(row) && test(text.value(row))))
                .collect()
        }
        ty => {
            let answer = of_type(ty);
            (0..inputs.rows)
                .map(|row| Some(answer && !input.is_null(row)))
                .collect()
        }
    };
    inputs.output(Arc::new(out))
}

fn is_digit(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit())
}

fn is_alpha(s: &str) -> bool {
    !s.is_empty() && s.chars().all(char::is_alphabetic)
}

/// What Java's Integer.parseInt, Long.parseLong or Double.parseDouble accept (decimal
/// notation; not hexadecimal floating point).
fn is_decimal(s: &str) -> bool {
    let s = s.trim_matches(|c: char| c <= ' ');
    let unsigned = s.strip_prefix(['+', '-']).unwrap_or(s);
    if unsigned == "NaN" || unsigned == "Infinity" {
        return true;
    }
    let number = unsigned
        .strip_suffix(['f', 'F', 'd', 'D'])
        .unwrap_or(unsigned);
    let (mantissa, exponent) = match number.find(['e', 'E']) {
        Some(i) => (&number[..i], Some(&number[i + 1..])),
        None => (number, None),
    };
    let (whole, fraction) = mantissa.split_once('.').unwrap_or((mantissa, ""));
    let digits = |p: &str| p.bytes().all(|b| b.is_ascii_digit());
    let exponent_ok = exponent.is_none_or(|e| {
        let e = e.strip_prefix(['+', '-']).unwrap_or(e);
        !e.is_empty() && digits(e)
    });
    !(whole.is_empty() && fraction.is_empty()) && digits(whole) && digits(fraction) && exponent_ok
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pieces_are_those_of_str_split() {
        for text in [
            "",
            "/",
            "a",
            "a/b",
            "/a//b/",
            "https://www.x.com/ab/c_d/item.htm?q=1",
            "é/ü/",
        ] {
            for index in 0..8 {
                assert_eq!(
                    nth_piece(text, b'/', index),
                    text.split('/').nth(index),
                    "{text} {index}"
                );
            }
        }
    }

    #[test]
    fn base64_round_trips_like_java() {
        for (text, encoded) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("hello world", "aGVsbG8gd29ybGQ="),
        ] {
            let mut out = String::new();
            base64_encode(text.as_bytes(), &mut out);
            assert_eq!(out, encoded);
            let mut bytes = vec![];
            base64_decode(encoded, &mut bytes).unwrap();
            assert_eq!(bytes, text.as_bytes());
        }
        let mut bytes = vec![];
        assert_eq!(base64_decode("Zm9", &mut bytes), Some(()));
        assert_eq!(bytes, b"fo");
        for bad in ["Z", "Zm9v!", "Zm===", "Zm 9v"] {
            assert_eq!(base64_decode(bad, &mut vec![]), None, "{bad}");
        }
    }

    #[test]
    fn hash_code_is_javas() {
        assert_eq!(java_hash_code(""), 0);
        assert_eq!(java_hash_code("flink"), 97520992);
        // Characters outside the BMP hash as their two UTF-16 units.
        assert_eq!(java_hash_code("😀"), 55357 * 31 + 56832);
    }

    #[test]
    fn decimals_are_what_java_parses() {
        for yes in [
            "1", "-1", "+1.5", "1.", ".5", "1e10", "1.5E-3", "2f", " 3 ", "NaN",
        ] {
            assert!(is_decimal(yes), "{yes}");
        }
        for no in ["", ".", "e5", "1e", "1.2.3", "abc", "0x10", "1_000", "inf"] {
            assert!(!is_decimal(no), "{no}");
        }
    }

    #[test]
    fn positions_count_characters() {
        assert_eq!(position("b", "abcb", 1), 2);
        assert_eq!(position("b", "abcb", 3), 4);
        assert_eq!(position("b", "abcb", 5), 0);
        assert_eq!(position("ü", "aüb", -3), 2);
        assert_eq!(position("", "abc", 2), 1);
        assert_eq!(position("x", "abc", 1), 0);
    }
}
