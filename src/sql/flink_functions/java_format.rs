//! Java date patterns (`DateTimeFormatter`, `SimpleDateFormat`: 'yyyy-MM-dd HH:mm:ss')
//! translated to chrono's, once per distinct pattern.

use std::sync::Arc;

use chrono::format::{Item, Parsed, StrftimeItems};
use chrono::{NaiveDate, NaiveDateTime, NaiveTime};
use datafusion::common::Result;

use super::{invalid_argument, Compiled};

/// A translated pattern, ready to format and parse with.
pub type Format = Arc<[Item<'static>]>;

static FORMATS: Compiled<Format> = Compiled::new();

/// The chrono items for a Java pattern, or an error saying what the pattern may contain.
pub fn compile(pattern: &str) -> Result<Format> {
    FORMATS.get(pattern, |pattern| {
        let strftime = to_strftime(pattern).map_err(invalid_argument)?;
        Ok(StrftimeItems::new(&strftime)
            .parse_to_owned()
            .map_err(|e| invalid_argument(format!("date format '{pattern}': {e}")))?
            .into())
    })
}

/// Translates a Java pattern to a chrono strftime string. Letters are fields, text in
/// single quotes is literal, `''` is a quote, anything else is itself.
pub fn to_strftime(pattern: &str) -> Result<String, String> {
    let chars: Vec<char> = pattern.chars().collect();
    let mut out = String::with_capacity(pattern.len() * 2);
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        if c == '\'' {
            i += 1;
            if chars.get(i) == Some(&'\'') {
                out.push('\'');
                i += 1;
                continue;
            }
            loop {
                match chars.get(i) {
                    None => {
                        return Err(format!(
                            "date format '{pattern}' has an unterminated quote; close quoted text with ' (and write a quote as '')"
                        ))
                    }
                    Some('\'') if chars.get(i + 1) == Some(&'\'') => {
                        out.push('\'');
                        i += 2;
                    }
                    Some('\'') => {
                        i += 1;
                        break;
                    }
                    Some(&c) => {
                        literal(&mut out, c);
                        i += 1;
                    }
                }
            }
        } else if c.is_ascii_alphabetic() {
            let run = chars[i..].iter().take_while(|&&d| d == c).count();
            out.push_str(field(c, run).ok_or_else(|| unsupported(pattern, c, run))?);
            i += run;
        } else {
            literal(&mut out, c);
            i += 1;
        }
    }
    Ok(out)
}

fn literal(out: &mut String, c: char) {
    if c == '%' {
        out.push_str("%%");
    } else {
        out.push(c);
    }
}

/// The chrono specifier for `count` repetitions of the Java pattern letter `letter`.
fn field(letter: char, count: usize) -> Option<&'static str> {
    Some(match (letter, count) {
        ('y' | 'u', 2) => "%y",
        ('y' | 'u', _) => "%Y",
        ('M' | 'L', 1) => "%-m",
        ('M' | 'L', 2) => "%m",
        ('M' | 'L', 3) => "%b",
        ('M' | 'L', _) => "%B",
        ('d', 1) => "%-d",
        ('d', 2) => "%d",
        ('D', 1) => "%-j",
        ('D', 3) => "%j",
        ('H', 1) => "%-H",
        ('H', 2) => "%H",
        ('h', 1) => "%-I",
        ('h', 2) => "%I",
        ('m', 1) => "%-M",
        ('m', 2) => "%M",
        ('s', 1) => "%-S",
        ('s', 2) => "%S",
        // Fraction of a second, truncated to as many digits as letters.
        ('S', 3) => "%3f",
        ('S', 6) => "%6f",
        ('S', 9) => "%9f",
        ('E', 1..=3) => "%a",
        ('E', _) => "%A",
        ('a', 1) => "%p",
        ('Z', 1..=3) | ('X' | 'x', 1 | 2) => "%z",
        ('X' | 'x', 3) => "%:z",
        ('z', 1..=3) => "%Z",
        _ => return None,
    })
}

fn unsupported(pattern: &str, letter: char, count: usize) -> String {
    let field: String = std::iter::repeat_n(letter, count).collect();
    format!(
        "date format '{pattern}': '{field}' is not supported; use yyyy yy M MM MMM MMMM d dd D DDD H HH h hh m mm s ss SSS SSSSSS SSSSSSSSS E EEEE a Z X XXX z, and quote literal letters ('T')"
    )
}

/// A date-time from text with `format`, Java's way: fields the pattern lacks default to
/// 1970-01-01 00:00:00. With `whole`, the text must end where the pattern does
/// (DateTimeFormatter); without, text after it is ignored (SimpleDateFormat). Also
/// answers the offset when the pattern has one ('Z', 'X').
pub fn parse(text: &str, format: &Format, whole: bool) -> Option<(NaiveDateTime, Option<i32>)> {
    let mut parsed = Parsed::new();
    if whole {
        chrono::format::parse(&mut parsed, text, format.iter()).ok()?;
    } else {
        chrono::format::parse_and_remainder(&mut parsed, text, format.iter()).ok()?;
    }
    let date = match (parsed.year(), parsed.ordinal()) {
        (year, Some(ordinal)) => NaiveDate::from_yo_opt(year.unwrap_or(1970), ordinal)?,
        (year, None) => NaiveDate::from_ymd_opt(
            year.or_else(|| Some(2000 + parsed.year_mod_100()?))
                .unwrap_or(1970),
            parsed.month().unwrap_or(1),
            parsed.day().unwrap_or(1),
        )?,
    };
    let hour = parsed.hour_div_12().unwrap_or(0) * 12 + parsed.hour_mod_12().unwrap_or(0);
    let time = NaiveTime::from_hms_nano_opt(
        hour,
        parsed.minute().unwrap_or(0),
        parsed.second().unwrap_or(0),
        parsed.nanosecond().unwrap_or(0),
    )?;
    Some((date.and_time(time), parsed.offset()))
}

/// Flink's default timestamp text: `yyyy-M-d`, optionally followed by ` H:m[:s[.fraction]]`
/// with up to nine fractional digits; surrounding spaces are ignored.
pub fn parse_default_timestamp(text: &str) -> Option<NaiveDateTime> {
    let text = text.trim();
    let (date, time) = match text.split_once(' ') {
        Some((d, t)) => (d, Some(t.trim_start())),
        None => (text, None),
    };
    let mut ymd = date.splitn(3, '-');
    let year = number(ymd.next()?, 4)?;
    let month = number(ymd.next()?, 2)?;
    let day = number(ymd.next()?, 2)?;
    let date = NaiveDate::from_ymd_opt(year as i32, month, day)?;
    let Some(time) = time else {
        return Some(date.and_time(NaiveTime::MIN));
    };
    let (hms, fraction) = match time.split_once('.') {
        Some((hms, f)) if (1..=9).contains(&f.len()) => {
            let digits = number(f, 9)?;
            (hms, Some(digits * 10u32.pow(9 - f.len() as u32)))
        }
        Some(_) => return None,
        None => (time, None),
    };
    let mut parts = hms.splitn(3, ':');
    let hour = number(parts.next()?, 2)?;
    let minute = number(parts.next()?, 2)?;
    let second = match parts.next() {
        Some(s) => number(s, 2)?,
        None if fraction.is_some() => return None,
        None => 0,
    };
    let fraction = fraction.unwrap_or(0);
    Some(date.and_time(NaiveTime::from_hms_nano_opt(
        hour, minute, second, fraction,
    )?))
}

/// A run of 1 to `max` ASCII digits.
fn number(s: &str, max: usize) -> Option<u32> {
    if s.is_empty() || s.len() > max || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn translates_java_patterns() {
        for (java, chrono) in [
            ("yyyy-MM-dd HH:mm:ss", "%Y-%m-%d %H:%M:%S"),
            ("yyyyMMdd", "%Y%m%d"),
            ("HH:mm", "%H:%M"),
            ("yyyy-MM-dd'T'HH:mm:ss.SSS", "%Y-%m-%dT%H:%M:%S.%3f"),
            ("EEE, d MMM yy", "%a, %-d %b %y"),
            ("EEEE MMMM", "%A %B"),
            ("h:mm a", "%-I:%M %p"),
            (
                "yyyy-MM-dd HH:mm:ss.SSSSSS XXX",
                "%Y-%m-%d %H:%M:%S.%6f %:z",
            ),
            ("'at' HH 'o''clock'", "at %H o'clock"),
            ("''yy''", "'%y'"),
            ("100%", "100%%"),
            ("D", "%-j"),
        ] {
            assert_eq!(to_strftime(java).as_deref(), Ok(chrono), "{java}");
        }
    }

    #[test]
    fn rejects_what_chrono_cannot_do() {
        let e = to_strftime("yyyy-MM-dd kk").unwrap_err();
        assert!(e.contains("'kk' is not supported"), "{e}");
        assert!(to_strftime("ss.SS").is_err());
        let e = to_strftime("yyyy 'T").unwrap_err();
        assert!(e.contains("unterminated quote"), "{e}");
    }

    fn at(text: &str) -> NaiveDateTime {
        NaiveDateTime::parse_from_str(text, "%Y-%m-%d %H:%M:%S%.f").unwrap()
    }

    #[test]
    fn parses_with_java_defaults_for_missing_fields() {
        let f = compile("yyyyMMdd").unwrap();
        assert_eq!(
            parse("20231114", &f, true),
            Some((at("2023-11-14 00:00:00"), None))
        );
        let f = compile("HH:mm").unwrap();
        assert_eq!(
            parse("09:30", &f, true),
            Some((at("1970-01-01 09:30:00"), None))
        );
        let f = compile("yyyy-MM-dd hh:mm a").unwrap();
        assert_eq!(
            parse("2023-11-14 02:05 PM", &f, true).map(|p| p.0),
            Some(at("2023-11-14 14:05:00"))
        );
        let f = compile("yyyy-MM-dd HH:mm:ss").unwrap();
        assert_eq!(parse("2023-11-14 09:00:00.5", &f, true), None);
        assert_eq!(
            parse("2023-11-14 09:00:00.5", &f, false).map(|p| p.0),
            Some(at("2023-11-14 09:00:00"))
        );
        let f = compile("yyyy-MM-dd HH:mm:ss X").unwrap();
        assert_eq!(
            parse("1970-01-01 08:00:01 +0800", &f, true),
            Some((at("1970-01-01 08:00:01"), Some(8 * 3600)))
        );
    }

    #[test]
    fn parses_flinks_default_timestamp_text() {
        for (text, expected) in [
            ("2023-11-14 09:00:00", "2023-11-14 09:00:00"),
            ("2023-11-14 09:00:00.123", "2023-11-14 09:00:00.123"),
            (
                " 2023-1-4 9:05:07.123456789 ",
                "2023-01-04 09:05:07.123456789",
            ),
            ("2023-11-14", "2023-11-14 00:00:00"),
            ("2023-11-14 09:00", "2023-11-14 09:00:00"),
        ] {
            assert_eq!(parse_default_timestamp(text), Some(at(expected)), "{text}");
        }
        for text in [
            "",
            "2023-11-14T09:00:00",
            "2023-13-01",
            "2023-11-14 25:00:00",
            "2023-11-14 09:00:00.",
            "yesterday",
        ] {
            assert_eq!(parse_default_timestamp(text), None, "{text}");
        }
    }
}
