//! Window arithmetic: which windows a time or a slice belongs to. TUMBLE, HOP and
//! CUMULATE windows are unions of non-overlapping slices (Flink's slicing), so each row is
//! aggregated once, into its slice, and windows merge their slices when they fire.

use crate::plan::window_tvf::WindowKind;

use super::message::Millis;

/// A window or slice: [start, end).
pub type Span = (Millis, Millis);

#[derive(Debug, Clone)]
pub enum Slicing {
    Tumble {
        size: Millis,
        offset: Millis,
    },
    Hop {
        slide: Millis,
        size: Millis,
        offset: Millis,
        slice: Millis,
    },
    Cumulate {
        step: Millis,
        size: Millis,
        offset: Millis,
    },
    /// Windows given by the rows themselves (window_start/window_end columns of an
    /// upstream window result): each window is one slice.
    Given,
}

fn gcd(a: Millis, b: Millis) -> Millis {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

fn align(t: Millis, unit: Millis, offset: Millis) -> Millis {
    t - (t - offset).rem_euclid(unit)
}

impl Slicing {
    pub fn new(kind: &WindowKind) -> Self {
        match *kind {
            WindowKind::Tumble { size, offset } => Slicing::Tumble { size, offset },
            WindowKind::Hop {
                slide,
                size,
                offset,
            } => Slicing::Hop {
                slide,
                size,
                offset,
                slice: gcd(size, slide),
            },
            WindowKind::Cumulate { step, size, offset } => Slicing::Cumulate { step, size, offset },
            WindowKind::Session { .. } => Slicing::Given,
        }
    }

    /// The slice holding time `t`.
    pub fn slice_of(&self, t: Millis) -> Span {
        let (unit, offset) = match *self {
            Slicing::Tumble { size, offset } => (size, offset),
            Slicing::Hop { slice, offset, .. } => (slice, offset),
            Slicing::Cumulate { step, offset, .. } => (step, offset),
            Slicing::Given => return (t, t),
        };
        let start = align(t, unit, offset);
        (start, start + unit)
    }

    /// Every window containing `slice`, by ascending end.
    pub fn windows_of_slice(&self, (start, end): Span) -> Vec<Span> {
        match *self {
            Slicing::Tumble { .. } | Slicing::Given => vec![(start, end)],
            Slicing::Hop {
                slide,
                size,
                offset,
                ..
            } => {
                let mut ws = align(start, slide, offset);
                let mut out = Vec::new();
                while ws + size >= end {
                    out.push((ws, ws + size));
                    ws -= slide;
                }
                out.reverse();
                out
            }
            Slicing::Cumulate { step, size, offset } => {
                let base = align(start, size, offset);
                (1..=size / step)
                    .map(|k| (base, base + k * step))
                    .filter(|(_, we)| *we >= end)
                    .collect()
            }
        }
    }

    /// Every window containing time `t` (for rows assigned to windows one by one).
    pub fn windows_of_time(&self, t: Millis) -> Vec<Span> {
        match *self {
            Slicing::Tumble { .. } => vec![self.slice_of(t)],
            Slicing::Hop {
                slide,
                size,
                offset,
                ..
            } => {
                let mut ws = align(t, slide, offset);
                let mut out = Vec::new();
                while ws + size > t {
                    out.push((ws, ws + size));
                    ws -= slide;
                }
                out.reverse();
                out
            }
            Slicing::Cumulate { step, size, offset } => {
                let base = align(t, size, offset);
                (1..=size / step)
                    .map(|k| (base, base + k * step))
                    .filter(|(_, we)| *we > t)
                    .collect()
            }
            Slicing::Given => vec![(t, t)],
        }
    }

    /// The slices a window is made of.
    pub fn slices_of_window(&self, (start, end): Span) -> Vec<Span> {
        let unit = match *self {
            Slicing::Tumble { .. } | Slicing::Given => return vec![(start, end)],
            Slicing::Hop { slice, .. } => slice,
            Slicing::Cumulate { step, .. } => step,
        };
        let mut out = Vec::new();
        let mut s = start;
        while s < end {
            out.push((s, s + unit));
            s += unit;
        }
        out
    }

    /// The end of the last window containing `slice`: once the watermark passes it, the
    /// slice can be dropped, and a row for it is late.
    ///
    /// Called for every row: computed directly rather than as the last of
    /// [`Slicing::windows_of_slice`], which allocates.
    pub fn last_end(&self, (start, end): Span) -> Millis {
        match *self {
            Slicing::Tumble { .. } | Slicing::Given => end,
            // The window starting at the slide boundary at or before the slice.
            Slicing::Hop {
                slide,
                size,
                offset,
                ..
            } => (align(start, slide, offset) + size).max(end),
            // The full-size window of the cumulation the slice is in.
            Slicing::Cumulate { step, size, offset } => {
                (align(start, size, offset) + size / step * step).max(end)
            }
        }
    }
}

/// A window [s, e) has fired once the watermark reached e - 1.
pub fn fired(end: Millis, watermark: Millis) -> bool {
    end - 1 <= watermark
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_windows_are_unions_of_slices() {
        let hop = Slicing::new(&WindowKind::Hop {
            slide: 2,
            size: 10,
            offset: 0,
        });
        assert_eq!(hop.slice_of(13), (12, 14));
        assert_eq!(hop.windows_of_slice((12, 14)).len(), 5);
        assert_eq!(hop.windows_of_slice((12, 14))[0], (4, 14));
        assert_eq!(hop.windows_of_time(13), hop.windows_of_slice((12, 14)));
        assert_eq!(hop.slices_of_window((4, 14)).len(), 5);
        assert_eq!(hop.last_end((12, 14)), 22);
        let odd = Slicing::new(&WindowKind::Hop {
            slide: 4,
            size: 10,
            offset: 0,
        });
        assert_eq!(odd.slice_of(13), (12, 14));
        assert_eq!(odd.windows_of_time(13), vec![(4, 14), (8, 18), (12, 22)]);
        assert_eq!(
            odd.windows_of_slice((12, 14)),
            vec![(4, 14), (8, 18), (12, 22)]
        );
    }

    #[test]
    fn cumulate_and_tumble_with_offsets_and_negative_times() {
        let c = Slicing::new(&WindowKind::Cumulate {
            step: 2,
            size: 6,
            offset: 0,
        });
        assert_eq!(c.windows_of_time(7), vec![(6, 8), (6, 10), (6, 12)]);
        assert_eq!(c.windows_of_slice((8, 10)), vec![(6, 10), (6, 12)]);
        let t = Slicing::new(&WindowKind::Tumble {
            size: 10,
            offset: 3,
        });
        assert_eq!(t.slice_of(2), (-7, 3));
        assert_eq!(t.slice_of(-8), (-17, -7));
        assert!(fired(10, 9) && !fired(10, 8));
    }

    #[test]
    fn last_end_is_the_end_of_the_last_window_of_the_slice() {
        let kinds = [
            WindowKind::Tumble {
                size: 10,
                offset: 3,
            },
            WindowKind::Hop {
                slide: 2,
                size: 10,
                offset: 0,
            },
            WindowKind::Hop {
                slide: 4,
                size: 10,
                offset: 1,
            },
            WindowKind::Hop {
                slide: 10,
                size: 4,
                offset: 0,
            },
            WindowKind::Cumulate {
                step: 2,
                size: 6,
                offset: 0,
            },
            WindowKind::Cumulate {
                step: 3,
                size: 12,
                offset: 5,
            },
        ];
        for kind in kinds {
            let slicing = Slicing::new(&kind);
            for t in -40..40 {
                let slice = slicing.slice_of(t);
                let expected = slicing
                    .windows_of_slice(slice)
                    .last()
                    .map(|w| w.1)
                    .unwrap_or(slice.1);
                assert_eq!(slicing.last_end(slice), expected, "{kind:?} at {t}");
            }
        }
        assert_eq!(Slicing::Given.last_end((5, 9)), 9);
    }
}
