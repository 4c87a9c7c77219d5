//! A regex's capture groups in many strings (REGEXP_EXTRACT). The regex crate finds a
//! match's bounds with a lazy DFA forward and then backward, and only then resolves its
//! groups with a one-pass DFA over the match: three passes, 160 ns a URL in Nexmark q21,
//! most of that query's time. When every match must begin with one of a few literals
//! (the regex's literal prefixes) and the regex is one-pass, its groups are found in one
//! pass instead: the literals' prefilter finds where a match could start, and the one-pass
//! DFA, anchored there, either matches (with its groups) or not, in which case the next
//! place is tried. The first place that matches is where the leftmost match starts, and
//! the one-pass DFA gives the same leftmost-first match the regex crate would (90 ns).
//!
//! A string with many places that do not match (a literal that is everywhere, a regex
//! that fails late) could make that quadratic, so after [`MAX_TRIES`] places the regex
//! crate searches the rest, from the last place tried on.

use std::sync::Arc;

use datafusion::common::Result;
use regex::{CaptureLocations, Regex};
use regex_automata::dfa::onepass;
use regex_automata::util::captures::Captures;
use regex_automata::util::prefilter::Prefilter;
use regex_automata::{Anchored, Input, MatchKind, Span};
use regex_syntax::hir::literal::{ExtractKind, Extractor};

use super::Compiled;

/// Places a string's match is looked for at before the regex crate takes over.
const MAX_TRIES: usize = 8;

/// What finds a pattern's matches from its literal prefixes; `None` for a pattern
/// without such prefixes or that is not one-pass.
static DIRECT: Compiled<Option<Arc<Direct>>> = Compiled::new();

struct Direct {
    prefixes: Prefilter,
    onepass: onepass::DFA,
}

impl Direct {
    fn build(pattern: &str) -> Option<Self> {
        let hir = regex_syntax::parse(pattern).ok()?;
        let prefixes = Extractor::new().kind(ExtractKind::Prefix).extract(&hir);
        let literals = prefixes.literals()?;
        // An empty prefix: a match could start anywhere.
        if literals.is_empty() || literals.iter().any(|l| l.as_bytes().is_empty()) {
            return None;
        }
        Some(Self {
            prefixes: Prefilter::new(MatchKind::LeftmostFirst, literals)?,
            onepass: onepass::DFA::new(pattern).ok()?,
        })
    }
}

/// Finds groups of one regex, reusing its scratch space from string to string.
pub struct GroupFinder {
    regex: Regex,
    locations: CaptureLocations,
    direct: Option<(Arc<Direct>, onepass::Cache, Captures)>,
}

impl GroupFinder {
    /// `regex` compiled from `pattern`.
    pub fn new(pattern: &str, regex: Regex) -> Result<Self> {
        let direct = DIRECT
            .get(pattern, |p| Ok(Direct::build(p).map(Arc::new)))?
            .map(|d| {
                let (cache, captures) = (d.onepass.create_cache(), d.onepass.create_captures());
                (d, cache, captures)
            });
        Ok(Self {
            locations: regex.capture_locations(),
            regex,
            direct,
        })
    }

    /// Group `group` (0: the whole match) of the first match in `text`; `None` when
    /// nothing matches, or the group does not exist or took no part.
    pub fn group<'t>(&mut self, text: &'t str, group: usize) -> Option<&'t str> {
        let mut from = 0;
        if let Some((direct, cache, captures)) = &mut self.direct {
            for _ in 0..MAX_TRIES {
                let place = direct.prefixes.find(
                    text.as_bytes(),
                    Span {
                        start: from,
                        end: text.len(),
                    },
                )?;
                let input = Input::new(text)
                    .range(place.start..)
                    .anchored(Anchored::Yes);
                direct.onepass.captures(cache, input, captures);
                if captures.is_match() {
                    return captures.get_group(group).map(|span| &text[span.range()]);
                }
                from = place.start + 1;
            }
        }
        // No match starts before `from`; the regex still sees the text before it. The
        // whole match needs no groups resolved.
        if group == 0 {
            return self.regex.find_at(text, from).map(|m| m.as_str());
        }
        self.regex
            .captures_read_at(&mut self.locations, text, from)
            .and_then(|_| self.locations.get(group))
            .map(|(start, end)| &text[start..end])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What the regex crate finds.
    fn expected<'t>(pattern: &str, text: &'t str, group: usize) -> Option<&'t str> {
        let regex = Regex::new(pattern).unwrap();
        let mut locations = regex.capture_locations();
        regex
            .captures_read(&mut locations, text)
            .and_then(|_| locations.get(group))
            .map(|(s, e)| &text[s..e])
    }

    #[test]
    fn groups_are_those_the_regex_crate_finds() {
        let many_misses = format!("{}x=7&", "x=a&".repeat(3 * MAX_TRIES));
        let texts = [
            "https://www.nexmark.com/abc/de/item.htm?query=1&channel_id=1234",
            "channel_id=99&x=1",
            "https://www.nexmark.com/abc/de/item.htm?query=1",
            "?channel_id=5&channel_id=6",
            "a&channel_id=&b",
            "x=a&x=b&x=12&x=3",
            many_misses.as_str(),
            "KEY=Value; key=other",
            "αβγ&channel_id=δ€&",
            "",
            "abcd abcbcd",
        ];
        let patterns = [
            // (pattern, uses the direct search)
            ("(&|^)channel_id=([^&]*)", true),
            ("x=([0-9]+)", true),
            ("(?i)key=(\\w+)", true),
            ("^channel_id=(\\d+)", true),
            // Not one-pass, or no literal prefixes: the regex crate alone.
            ("(a|ab)(c|bcd)(d*)", false),
            ("[a-z]+=(\\d+)?", false),
            (".*=(\\w*)", false),
        ];
        for (pattern, direct) in patterns {
            let mut finder = GroupFinder::new(pattern, Regex::new(pattern).unwrap()).unwrap();
            assert_eq!(finder.direct.is_some(), direct, "{pattern}");
            for text in texts {
                for group in 0..4 {
                    assert_eq!(
                        finder.group(text, group),
                        expected(pattern, text, group),
                        "{pattern} in {text:?}, group {group}"
                    );
                }
            }
        }
    }
}
