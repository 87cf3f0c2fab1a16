//! Text preparation before synthesis: strip what must not be read aloud (emoji, Markdown
//! symbols), decide whether anything speakable is left, and cut the text into sentences and
//! clauses with their closing punctuation.
//!
//! Piper is run once per sentence, and its phoneme string carries each clause's punctuation
//! (the model was trained on espeak-ng output laid out that way), so the splitting rules here
//! decide both latency (one forward pass per sentence) and prosody (pauses at clause ends).

/// Removes emoji and the Markdown symbols `*`, `#` and backticks; every other character,
/// including newlines, is kept.
pub fn clean(text: &str) -> String {
    text.chars()
        .filter(|&c| !is_emoji(c) && !matches!(c, '*' | '#' | '`'))
        .collect()
}

/// True when `text` contains nothing to pronounce: no letter and no digit.
pub fn is_silent(text: &str) -> bool {
    !text.chars().any(char::is_alphanumeric)
}

/// One clause: its words, and the punctuation that closes it as Piper's phoneme map spells it
/// (`,` `;` `:` inside a sentence; `.` `!` `?` at its end).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Clause<'a> {
    /// The clause text without its closing punctuation, trimmed.
    pub text: &'a str,
    /// The closing punctuation, normalised to ASCII.
    pub end: char,
}

/// Splits `text` into sentences, each a list of clauses. A sentence ends at `.` `!` `?` `…`
/// followed by a space or the end (so "3.5" and "e.g.x" stay whole), at `。` `！` `？` always, and
/// at a newline; a clause ends at `,` `;` `:` followed by a space (so "1,000" and "10:30" stay
/// whole) or at `，` `；` `：` `、`. A sentence with no closing mark ends with `.`. Pieces with
/// nothing to pronounce are dropped.
pub fn sentences(text: &str) -> Vec<Vec<Clause<'_>>> {
    let mut out = Vec::new();
    let mut current: Vec<Clause<'_>> = Vec::new();
    let mut start = 0;
    let mut chars = text.char_indices().peekable();
    while let Some((at, c)) = chars.next() {
        let followed_by_space = chars.peek().is_none_or(|&(_, n)| n.is_whitespace());
        let (end, closes_sentence) = match c {
            '.' | '!' | '?' | '…' if followed_by_space => (sentence_mark(c), true),
            '。' | '！' | '？' => (sentence_mark(c), true),
            '\n' => ('.', true),
            ',' | ';' | ':' if followed_by_space => (c, false),
            '，' | '、' => (',', false),
            '；' => (';', false),
            '：' => (':', false),
            _ => continue,
        };
        push_clause(&mut current, &text[start..at], end);
        start = at + c.len_utf8();
        if closes_sentence {
            close_sentence(&mut out, &mut current, end);
        }
    }
    push_clause(&mut current, &text[start..], '.');
    close_sentence(&mut out, &mut current, '.');
    out
}

fn sentence_mark(c: char) -> char {
    match c {
        '!' | '！' => '!',
        '?' | '？' => '?',
        _ => '.',
    }
}

fn push_clause<'a>(clauses: &mut Vec<Clause<'a>>, text: &'a str, end: char) {
    let text = text.trim();
    if !is_silent(text) {
        clauses.push(Clause { text, end });
    }
}

/// Ends the sentence in `current` with `end` (unless it already ends with its own mark).
fn close_sentence<'a>(out: &mut Vec<Vec<Clause<'a>>>, current: &mut Vec<Clause<'a>>, end: char) {
    if let Some(last) = current.last_mut() {
        if !matches!(last.end, '.' | '!' | '?') {
            last.end = if matches!(end, '!' | '?') { end } else { '.' };
        }
        out.push(std::mem::take(current));
    }
}

/// Removes espeak-ng's language-switch markers such as `(en)` or `(zh)` from a phoneme string:
/// they name a language, they are not sounds.
pub fn strip_language_flags(phonemes: &str) -> String {
    let mut out = String::with_capacity(phonemes.len());
    let mut rest = phonemes;
    while let Some(open) = rest.find('(') {
        let after = &rest[open + 1..];
        match after.find(')') {
            Some(close)
                if close > 0
                    && after[..close]
                        .chars()
                        .all(|c| c.is_ascii_lowercase() || c == '-') =>
            {
                out.push_str(&rest[..open]);
                rest = &after[close + 1..];
            }
            _ => {
                out.push_str(&rest[..=open]);
                rest = after;
            }
        }
    }
    out.push_str(rest);
    out
}

/// Emoji and pictographs, with the joiners and modifiers that build emoji sequences.
fn is_emoji(c: char) -> bool {
    matches!(c as u32,
        0x1F000..=0x1FAFF   // pictographs, emoticons, transport, flags, skin tones, …
        | 0x2600..=0x27BF   // miscellaneous symbols and dingbats (☀ ✨ ✅ ❤)
        | 0x2B00..=0x2BFF   // arrows and stars (⭐ ⬆)
        | 0x2300..=0x23FF   // technical symbols used as emoji (⌚ ⏰ ⏩)
        | 0xFE00..=0xFE0F   // variation selectors
        | 0x200D            // zero-width joiner
        | 0x20E3            // combining keycap
        | 0xE0020..=0xE007F // tag characters (subdivision flags)
        | 0x3030 | 0x303D | 0x3297 | 0x3299)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flat(text: &str) -> Vec<Vec<(&str, char)>> {
        sentences(text)
            .into_iter()
            .map(|s| s.into_iter().map(|c| (c.text, c.end)).collect())
            .collect()
    }

    #[test]
    fn clean_drops_emoji_sequences_and_markdown_symbols() {
        assert_eq!(
            clean("**Done** ✅ — `ls` ## 👍🏽 👨‍👩‍👧 🇩🇪 ❤️ ok"),
            "Done  — ls      ok"
        );
        assert_eq!(clean("你好😀！"), "你好！");
    }

    #[test]
    fn emoji_and_punctuation_only_text_is_silent() {
        assert!(is_silent(&clean("😀🎉 ✨")));
        assert!(is_silent(" \n\t"));
        assert!(is_silent("...!?"));
        assert!(!is_silent("3"));
        assert!(!is_silent("好"));
    }

    #[test]
    fn sentences_keep_their_marks_and_clauses_end_in_commas() {
        assert_eq!(
            flat("Hello! The kitchen lights are on, and the door is locked. Anything else?"),
            vec![
                vec![("Hello", '!')],
                vec![
                    ("The kitchen lights are on", ','),
                    ("and the door is locked", '.')
                ],
                vec![("Anything else", '?')],
            ]
        );
    }

    #[test]
    fn numbers_with_points_commas_and_colons_are_not_split() {
        assert_eq!(
            flat("It costs 3.5 dollars, or 1,000 cents at 10:30"),
            vec![vec![
                ("It costs 3.5 dollars", ','),
                ("or 1,000 cents at 10:30", '.')
            ]]
        );
    }

    #[test]
    fn chinese_punctuation_splits_without_spaces() {
        assert_eq!(
            flat("你好，我是小智。今天天气怎么样？"),
            vec![
                vec![("你好", ','), ("我是小智", '.')],
                vec![("今天天气怎么样", '?')]
            ]
        );
    }

    #[test]
    fn newlines_end_sentences_and_empty_pieces_vanish() {
        assert_eq!(
            flat("- first item\n\n- second item, \n ..."),
            vec![vec![("- first item", '.')], vec![("- second item", '.')]]
        );
        assert!(sentences("").is_empty());
    }

    #[test]
    fn language_flags_are_removed_but_other_parentheses_stay() {
        assert_eq!(strip_language_flags("(en)hɛlˈoʊ(zh)ni"), "hɛlˈoʊni");
        assert_eq!(strip_language_flags("a(b c)d()e(f"), "a(b c)d()e(f");
    }
}
