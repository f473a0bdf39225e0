//! Which records past a committed offset are already finished, written in the commit's metadata
//! (a string Kafka keeps beside each committed offset).
//!
//! A partition's committed offset can only say "everything below is finished". With deliveries
//! running side by side, one slow record holds that offset while the records behind it finish;
//! committing only the offset would, after a crash or a rebalance, deliver all of those again. So
//! a commit also names the records at or past its offset that are *not* finished, up to the
//! newest known: whoever reads the partition next delivers those and skips the rest.
//!
//! Format: `hl1:<span>` then `,<gap>` per unfinished record, numbers in base 36. `span` is the
//! count of offsets described (from the committed offset); each `gap` is an unfinished offset
//! minus the previous one (the first minus the committed offset). Anything unreadable, written
//! by another client, or past the span counts as unfinished: the reader delivers it, so a bad or
//! missing description costs duplicates, never a lost delivery.

use std::collections::BTreeSet;

const PREFIX: &str = "hl1:";

/// Metadata is kept under this many bytes: brokers refuse a commit whose metadata exceeds
/// `offset.metadata.max.bytes` (4096 by default), and a refused commit would hold every permit.
pub const MAX_METADATA_BYTES: usize = 2048;

/// What a commit says of the records from its offset on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Described {
    /// One past the last offset described: from here on, nothing is known.
    pub end: i64,
    /// The unfinished records in `[committed, end)`, ascending.
    pub unfinished: Vec<i64>,
}

/// Encodes the records of `[committed, end)` of which `unfinished` (ascending, all in the range)
/// are not finished. When the text would exceed [`MAX_METADATA_BYTES`], the description stops
/// at the first unfinished record left out (so it stays true); the returned [`Described`] is what
/// the text says.
pub fn encode(committed: i64, end: i64, unfinished: &[i64]) -> (String, Described) {
    let mut text = String::with_capacity(16 + unfinished.len() * 3);
    text.push_str(PREFIX);
    let mut described_end = end;
    let mut kept = Vec::with_capacity(unfinished.len());
    // The span is written last (its width is not known until the list is cut), so build the
    // list first and put the span in front.
    let mut list = String::with_capacity(unfinished.len() * 3);
    let mut previous = committed;
    for &u in unfinished {
        let mut item = String::with_capacity(4);
        item.push(',');
        push_base36(&mut item, u - previous);
        // Room for the prefix and the longest span (13 base-36 digits hold any i64).
        if PREFIX.len() + 13 + list.len() + item.len() > MAX_METADATA_BYTES {
            described_end = u;
            break;
        }
        list.push_str(&item);
        kept.push(u);
        previous = u;
    }
    push_base36(&mut text, described_end - committed);
    text.push_str(&list);
    (
        text,
        Described {
            end: described_end,
            unfinished: kept,
        },
    )
}

/// Reads the metadata of a commit at `committed`; `None` when it is absent, written by another
/// client, or malformed (then every record from `committed` on counts as unfinished).
pub fn decode(committed: i64, metadata: &str) -> Option<Described> {
    let body = metadata.strip_prefix(PREFIX)?;
    let mut parts = body.split(',');
    let span = parse_base36(parts.next()?)?;
    let end = committed.checked_add(span)?;
    let mut unfinished = Vec::new();
    let mut previous = committed;
    for (i, part) in parts.enumerate() {
        let gap = parse_base36(part)?;
        // Strictly ascending, except that the first may be the committed offset itself.
        if gap == 0 && i > 0 {
            return None;
        }
        let u = previous.checked_add(gap)?;
        if u >= end {
            return None;
        }
        unfinished.push(u);
        previous = u;
    }
    Some(Described { end, unfinished })
}

/// The unfinished records of a decoded description, as a set.
pub fn unfinished_set(described: &Described) -> BTreeSet<i64> {
    described.unfinished.iter().copied().collect()
}

fn push_base36(out: &mut String, mut n: i64) {
    const DIGITS: &[u8; 36] = b"0123456789abcdefghijklmnopqrstuvwxyz";
    if n <= 0 {
        out.push('0');
        return;
    }
    let mut buf = [0u8; 16];
    let mut i = buf.len();
    while n > 0 {
        i -= 1;
        buf[i] = DIGITS[(n % 36) as usize];
        n /= 36;
    }
    out.extend(buf[i..].iter().map(|&b| b as char));
}

fn parse_base36(s: &str) -> Option<i64> {
    if s.is_empty() || s.len() > 13 {
        return None;
    }
    let n = i64::from_str_radix(s, 36).ok()?;
    (n >= 0).then_some(n)
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn a_description_reads_back_as_written() {
        let (text, d) = encode(1000, 1020, &[1000, 1003, 1010]);
        assert_eq!(text, "hl1:k,0,3,7");
        assert_eq!(
            decode(1000, &text),
            Some(Described {
                end: 1020,
                unfinished: vec![1000, 1003, 1010]
            })
        );
        assert_eq!(d, decode(1000, &text).unwrap());
    }

    #[test]
    fn nothing_unfinished_is_a_span_alone() {
        let (text, _) = encode(5, 9, &[]);
        assert_eq!(text, "hl1:4");
        assert_eq!(
            decode(5, &text),
            Some(Described {
                end: 9,
                unfinished: vec![]
            })
        );
    }

    #[test]
    fn foreign_or_malformed_metadata_describes_nothing() {
        for bad in [
            "",
            "some other client's note",
            "hl1:",
            "hl1:z,",
            "hl1:5,6",                 // past the span
            "hl1:9,1,0",               // not ascending
            "hl1:-3",                  // negative
            "hl1:9,1,zzzzzzzzzzzzzzz", // too long
            "hl2:4",
        ] {
            assert_eq!(decode(100, bad), None, "{bad:?}");
        }
    }

    #[test]
    fn a_long_list_is_cut_at_an_unfinished_record_so_it_stays_true() {
        let unfinished: Vec<i64> = (0..5_000).map(|i| 10 + i * 7).collect();
        let (text, d) = encode(10, 40_000, &unfinished);
        assert!(text.len() <= MAX_METADATA_BYTES, "{}", text.len());
        assert!(d.unfinished.len() < unfinished.len());
        // The description ends at the first record it left out: nothing past it is claimed.
        assert_eq!(d.end, unfinished[d.unfinished.len()]);
        assert_eq!(decode(10, &text), Some(d));
    }

    proptest! {
        /// Whatever is encoded, a record the decoded description calls finished was finished.
        #[test]
        fn a_decoded_description_never_calls_an_unfinished_record_finished(
            committed in 0i64..1_000_000,
            gaps in proptest::collection::vec(1i64..5_000, 0..2_000),
            tail in 0i64..10_000,
        ) {
            let mut unfinished = Vec::new();
            let mut at = committed;
            for (i, g) in gaps.iter().enumerate() {
                at += if i == 0 { g - 1 } else { *g };
                unfinished.push(at);
            }
            let end = at + 1 + tail;
            let (text, _) = encode(committed, end, &unfinished);
            prop_assert!(text.len() <= MAX_METADATA_BYTES);
            let d = decode(committed, &text).expect("own metadata decodes");
            let listed: BTreeSet<i64> = d.unfinished.iter().copied().collect();
            for u in &unfinished {
                prop_assert!(*u >= d.end || listed.contains(u), "{} called finished", u);
            }
            prop_assert!(d.end <= end);
        }
    }
}
