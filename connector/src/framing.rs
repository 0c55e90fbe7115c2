//! Newline framing: splits received bytes into lines, carrying an incomplete line between reads.
//!
//! Pure code (no I/O), so it is unit- and property-tested on its own.

use std::ops::ControlFlow;

/// A line (or the incomplete line pending) exceeds the maximum length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct LineTooLong;

/// Feeds `data`, received after the incomplete line in `partial`, to the framer.
///
/// Calls `on_line` with each complete, non-empty line, without its `'\n'` and without one trailing
/// `'\r'`, in order. A line longer than `max_line` (after stripping) is an error; so is an
/// incomplete line that can no longer become short enough. Lines before the offending one are
/// delivered first.
///
/// `partial` is empty when nothing is pending, and is then left without an allocation; on return
/// it holds the incomplete tail of `data`. If `on_line` breaks, the rest of `data` is discarded
/// and `partial` is left empty.
pub(crate) fn feed(
    partial: &mut Vec<u8>,
    data: &[u8],
    max_line: usize,
    mut on_line: impl FnMut(&[u8]) -> ControlFlow<()>,
) -> Result<(), LineTooLong> {
    let mut rest = data;
    if !partial.is_empty() {
        let Some(i) = find_newline(rest) else {
            if let Some(&last) = rest.last() {
                if pending_too_long(partial.len() + rest.len(), last, max_line) {
                    return Err(LineTooLong);
                }
                partial.extend_from_slice(rest);
            }
            return Ok(());
        };
        let (head, tail) = rest.split_at(i);
        rest = tail.get(1..).unwrap_or_default();
        partial.extend_from_slice(head);
        // Taking the line out leaves `partial` empty and unallocated.
        let line = std::mem::take(partial);
        if deliver(&line, max_line, &mut on_line)?.is_break() {
            return Ok(());
        }
    }
    while let Some(i) = find_newline(rest) {
        let (line, tail) = rest.split_at(i);
        rest = tail.get(1..).unwrap_or_default();
        if deliver(line, max_line, &mut on_line)?.is_break() {
            return Ok(());
        }
    }
    if let Some(&last) = rest.last() {
        if pending_too_long(rest.len(), last, max_line) {
            return Err(LineTooLong);
        }
        partial.extend_from_slice(rest);
    }
    Ok(())
}

fn deliver(
    line: &[u8],
    max_line: usize,
    on_line: &mut impl FnMut(&[u8]) -> ControlFlow<()>,
) -> Result<ControlFlow<()>, LineTooLong> {
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    if line.len() > max_line {
        return Err(LineTooLong);
    }
    if line.is_empty() {
        return Ok(ControlFlow::Continue(()));
    }
    Ok(on_line(line))
}

/// Whether an incomplete line of `len` bytes ending in `last` can no longer be a valid line (its
/// last byte may be a `'\r'` that will be stripped).
fn pending_too_long(len: usize, last: u8, max_line: usize) -> bool {
    len > max_line && !(len == max_line + 1 && last == b'\r')
}

fn find_newline(data: &[u8]) -> Option<usize> {
    data.iter().position(|&b| b == b'\n')
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    /// Feeds `chunks` in order; returns the lines and the final result.
    fn run(chunks: &[&[u8]], max_line: usize) -> (Vec<Vec<u8>>, Result<(), LineTooLong>, Vec<u8>) {
        let mut partial = Vec::new();
        let mut lines = Vec::new();
        for chunk in chunks {
            let r = feed(&mut partial, chunk, max_line, |l| {
                lines.push(l.to_vec());
                ControlFlow::Continue(())
            });
            if r.is_err() {
                return (lines, r, partial);
            }
        }
        (lines, Ok(()), partial)
    }

    fn owned(lines: &[&str]) -> Vec<Vec<u8>> {
        lines.iter().map(|l| l.as_bytes().to_vec()).collect()
    }

    #[test]
    fn several_lines_in_one_read() {
        let (lines, r, partial) = run(&[b"a\nbb\r\nccc\n"], 16);
        assert_eq!(lines, owned(&["a", "bb", "ccc"]));
        assert_eq!(r, Ok(()));
        assert!(partial.is_empty());
        assert_eq!(partial.capacity(), 0);
    }

    #[test]
    fn one_byte_reads() {
        let data = b"{\"id\":1}\r\n{\"id\":2}\n";
        let chunks: Vec<&[u8]> = data.chunks(1).collect();
        let (lines, r, partial) = run(&chunks, 16);
        assert_eq!(lines, owned(&["{\"id\":1}", "{\"id\":2}"]));
        assert_eq!(r, Ok(()));
        assert_eq!(
            partial.capacity(),
            0,
            "no buffer kept once the line is complete"
        );
    }

    #[test]
    fn empty_lines_are_skipped() {
        let (lines, r, _) = run(&[b"\n\r\n\nx\n", b"\r", b"\n"], 16);
        assert_eq!(lines, owned(&["x"]));
        assert_eq!(r, Ok(()));
    }

    #[test]
    fn limits() {
        // Exactly the limit is fine, with or without '\r'.
        assert_eq!(run(&[b"abcd\n"], 4).1, Ok(()));
        assert_eq!(run(&[b"abcd\r\n"], 4).1, Ok(()));
        assert_eq!(run(&[b"ab", b"cd\r", b"\n"], 4).1, Ok(()));
        // One more is not.
        assert_eq!(run(&[b"abcde\n"], 4).1, Err(LineTooLong));
        assert_eq!(run(&[b"ab", b"cde\n"], 4).1, Err(LineTooLong));
        // Detected before the newline arrives.
        assert_eq!(run(&[b"abcde"], 4).1, Err(LineTooLong));
        assert_eq!(run(&[b"abc", b"de"], 4).1, Err(LineTooLong));
        assert_eq!(run(&[b"abcd\r"], 4).1, Ok(()));
        assert_eq!(run(&[b"abcd\rx"], 4).1, Err(LineTooLong));
        // Lines before the long one are delivered.
        let (lines, r, _) = run(&[b"ok\nabcdefgh\nlater\n"], 4);
        assert_eq!(lines, owned(&["ok"]));
        assert_eq!(r, Err(LineTooLong));
    }

    #[test]
    fn break_discards_the_rest() {
        let mut partial = b"pre".to_vec();
        let mut seen = Vec::new();
        let r = feed(&mut partial, b"fix\nstop\nnever\ntail", 64, |l| {
            seen.push(l.to_vec());
            if l == b"stop" {
                ControlFlow::Break(())
            } else {
                ControlFlow::Continue(())
            }
        });
        assert_eq!(r, Ok(()));
        assert_eq!(seen, owned(&["prefix", "stop"]));
        assert!(partial.is_empty());
    }

    proptest! {
        /// Splitting the input anywhere gives the same lines as one read.
        #[test]
        fn splits_do_not_matter(
            lines in proptest::collection::vec("[a-z\r]{0,20}", 0..8),
            cuts in proptest::collection::vec(0usize..200, 0..10),
        ) {
            let mut data = Vec::new();
            for l in &lines {
                data.extend_from_slice(l.as_bytes());
                data.push(b'\n');
            }
            let whole = run(&[&data], 32);
            let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c.min(data.len())).collect();
            cuts.sort_unstable();
            let mut chunks: Vec<&[u8]> = Vec::new();
            let mut at = 0;
            for c in cuts {
                chunks.push(&data[at..c]);
                at = c;
            }
            chunks.push(&data[at..]);
            let split = run(&chunks, 32);
            prop_assert_eq!(&whole.0, &split.0);
            prop_assert_eq!(whole.1, split.1);
            let expected: Vec<Vec<u8>> = lines
                .iter()
                .map(|l| l.strip_suffix('\r').unwrap_or(l).as_bytes().to_vec())
                .filter(|l| !l.is_empty())
                .collect();
            prop_assert_eq!(whole.0, expected);
        }
    }
}
