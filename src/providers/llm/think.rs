//! Removes `<think>…</think>` reasoning blocks from streamed model text, across chunk
//! boundaries (a tag may arrive split over several deltas).

const OPEN: &str = "<think>";
const CLOSE: &str = "</think>";

/// Streaming filter: feed deltas with [`ThinkFilter::push`], then call [`ThinkFilter::finish`].
///
/// Text inside a block is dropped, so is an unclosed block at the end (as the reference server
/// does); a stray `</think>` is removed by itself. Whitespace right after a block is dropped
/// too, since models put a blank line there.
#[derive(Debug, Default)]
pub struct ThinkFilter {
    in_think: bool,
    /// Tail of the input that may be the start of a tag, held until the next delta decides.
    pending: String,
    /// Drop leading whitespace (just after a block closed).
    trim_start: bool,
}

impl ThinkFilter {
    /// Filters one delta; returns the visible text (possibly empty).
    pub fn push(&mut self, delta: &str) -> String {
        let mut buf = std::mem::take(&mut self.pending);
        buf.push_str(delta);
        let mut out = String::new();
        let mut rest = buf.as_str();
        loop {
            if self.in_think {
                if let Some(end) = rest.find(CLOSE) {
                    rest = &rest[end + CLOSE.len()..];
                    self.in_think = false;
                    self.trim_start = true;
                    continue;
                }
                self.pending = partial_tag_suffix(rest, CLOSE).to_string();
                break;
            }
            let open = rest.find(OPEN);
            let close = rest.find(CLOSE);
            match (open, close) {
                (Some(o), Some(c)) if c < o => {
                    // A stray close tag before the next block.
                    self.emit(&mut out, &rest[..c]);
                    rest = &rest[c + CLOSE.len()..];
                }
                (Some(o), _) => {
                    self.emit(&mut out, &rest[..o]);
                    rest = &rest[o + OPEN.len()..];
                    self.in_think = true;
                }
                (None, Some(c)) => {
                    self.emit(&mut out, &rest[..c]);
                    rest = &rest[c + CLOSE.len()..];
                }
                (None, None) => {
                    let hold = partial_tag_suffix(rest, OPEN)
                        .len()
                        .max(partial_tag_suffix(rest, CLOSE).len());
                    let (visible, held) = rest.split_at(rest.len() - hold);
                    self.emit(&mut out, visible);
                    self.pending = held.to_string();
                    break;
                }
            }
        }
        out
    }

    /// Ends the stream; returns held-back text that turned out not to be a tag.
    pub fn finish(&mut self) -> String {
        let pending = std::mem::take(&mut self.pending);
        let mut out = String::new();
        if !self.in_think {
            self.emit(&mut out, &pending);
        }
        out
    }

    fn emit(&mut self, out: &mut String, text: &str) {
        let text = if self.trim_start {
            let t = text.trim_start();
            if !t.is_empty() {
                self.trim_start = false;
            }
            t
        } else {
            text
        };
        out.push_str(text);
    }
}

/// The longest proper suffix of `text` that is a prefix of `tag` (`"ab<th"` → `"<th"`).
fn partial_tag_suffix<'a>(text: &'a str, tag: &str) -> &'a str {
    let max = text.len().min(tag.len() - 1);
    for len in (1..=max).rev() {
        let start = text.len() - len;
        if text.is_char_boundary(start) && tag.starts_with(&text[start..]) {
            return &text[start..];
        }
    }
    ""
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(chunks: &[&str]) -> String {
        let mut f = ThinkFilter::default();
        let mut out: String = chunks.iter().map(|c| f.push(c)).collect();
        out.push_str(&f.finish());
        out
    }

    #[test]
    fn strips_block_in_one_chunk() {
        assert_eq!(run(&["<think>hmm</think>\n\nHello!"]), "Hello!");
    }

    #[test]
    fn strips_block_with_tags_split_at_every_position() {
        let text = "你好<think>let me think</think> world<think>x</think>!";
        for cut in 0..=text.len() {
            if !text.is_char_boundary(cut) {
                continue;
            }
            for cut2 in cut..=text.len() {
                if !text.is_char_boundary(cut2) {
                    continue;
                }
                let got = run(&[&text[..cut], &text[cut..cut2], &text[cut2..]]);
                assert_eq!(got, "你好world!", "cuts {cut} {cut2}");
            }
        }
    }

    #[test]
    fn keeps_lookalikes_and_lone_angle_brackets() {
        assert_eq!(run(&["a <thin", "g> b <", "3"]), "a <thing> b <3");
        assert_eq!(run(&["x <th"]), "x <th");
    }

    #[test]
    fn drops_unclosed_block_and_stray_close_tag() {
        assert_eq!(run(&["Hi <think>never", " closed"]), "Hi ");
        assert_eq!(run(&["reasoning</think>\nAnswer"]), "reasoning\nAnswer");
    }

    #[test]
    fn passes_plain_text_through_unchanged() {
        let mut f = ThinkFilter::default();
        assert_eq!(f.push("plain "), "plain ");
        assert_eq!(f.push("text"), "text");
        assert_eq!(f.finish(), "");
    }
}
