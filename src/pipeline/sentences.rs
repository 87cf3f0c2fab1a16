//! Sentence splitting: streamed LLM text deltas in, speakable segments out.
//!
//! A TTS provider that synthesises whole texts (everything but the dual-stream ones) gets the
//! reply one segment at a time, so synthesis of the first sentence starts while the LLM is still
//! writing the rest. [`SentenceSplitter`] receives each delta as it arrives and emits a segment as
//! soon as its end is known. It also cleans each segment for speech: no emoji, no Markdown
//! markers, no empty or punctuation-only segments. [`emotion_of`] picks the face the device shows
//! for a reply, from the emoji the LLM was asked to start with.
//!
//! # The reference's rules (features.md §6)
//! - The **first segment of a turn** may end at any of `，` `~` `、` `,` `。` `？` `?` `！` `!` `；`
//!   `;` `：`. Cutting at a comma gets the first audio out sooner (time to first audio).
//! - **Later segments** end only at `。` `？` `?` `！` `!` `；` `;` `：`.
//!
//! # Deviations, and why
//! - **Every boundary is a cut, decided from the text alone.** The reference looks for the *last*
//!   occurrence of each mark in whatever has arrived so far, so its segments depend on how the
//!   deltas happened to be chunked. Here a segment ends at the first boundary, as soon as it is
//!   known to be one. With token-sized deltas that is what the reference does too, and feeding
//!   text one character at a time gives exactly the same segments as feeding it all at once
//!   (`chunking_does_not_change_segments` pins this down).
//! - **English.** The reference never cuts at ASCII `.`, so an English reply would only be
//!   spoken after the LLM finished. Here `.` ends a sentence when whitespace follows it (closing
//!   quotes or brackets may come between: `"Yes." Then`), but not inside a number (`3.14`), not
//!   after a short list of abbreviations (`Mr.`, `e.g.` …, see [`ABBREVIATIONS`]) or a single
//!   letter (`J. K. Rowling`), and not after the number of a numbered list item (`1. `). A `,`
//!   between digits (`3,000`) is not a first-segment cut. Deciding these needs the character after
//!   the mark, so such a segment goes out one delta later.
//! - **Newline** ends a segment (paragraphs, list items).
//! - **Full-width `～`** is a first-segment cut like `~`.
//! - **Long text without a boundary** is cut once it passes `max_chars` characters
//!   ([`DEFAULT_MAX_SEGMENT_CHARS`] by default, `tts.max_segment_chars` in the config): at the
//!   last space or comma in it, or right there (between two characters, as Chinese text has
//!   no spaces) when it has none. This bounds the work of one synthesis job: TTS engines
//!   synthesise a segment in one forward pass whose time and memory grow with its length.
//! - **A digit counts as [`DIGIT_WEIGHT`] characters** towards that bound: digits are read as
//!   words, so `999999999999999` is about nine seconds of speech (as long as ~150 letters of
//!   ordinary text), and a bound on characters alone would let a short text of digits cost as
//!   much as a page.
//! - **Trailing punctuation is kept** (TTS engines read a question's `?` as intonation); leading
//!   separators and closing quotes left over from the previous cut are dropped. The reference
//!   strips both ends.

/// Segments longer than this many characters without a boundary are cut (see the module docs).
pub const DEFAULT_MAX_SEGMENT_CHARS: usize = 100;

/// How many characters one digit counts as towards `max_chars`: espeak-ng reads a digit as
/// about eight letters' worth of words ("2024" → "two thousand and twenty-four";
/// `999999999999999` is 8.9 s of speech where 100 letters of English are 5.9 s).
pub const DIGIT_WEIGHT: usize = 8;

/// How many characters one Chinese character counts as: it is one spoken syllable, ~0.2–0.25 s
/// of speech, where an English letter is ~0.06 s; so 100 weigh about as long as 100 letters
/// (and a Kokoro job for Chinese stays near 5 s of speech, not 20).
pub const HAN_WEIGHT: usize = 4;

/// The weight of `c` towards a segment's bound: [`DIGIT_WEIGHT`] for a digit, [`HAN_WEIGHT`]
/// for a Chinese character, else 1.
fn weight(c: char) -> usize {
    if c.is_ascii_digit() || ('０'..='９').contains(&c) {
        DIGIT_WEIGHT
    } else if crate::lang::is_cjk(c) {
        HAN_WEIGHT
    } else {
        1
    }
}

/// The weight of `text` towards a segment's bound (its characters, digits counted heavier).
pub fn segment_weight(text: &str) -> usize {
    text.chars().map(weight).sum()
}

/// Words that end with `.` without ending a sentence (compared lowercase, without the final `.`).
pub const ABBREVIATIONS: &[&str] = &[
    "mr", "mrs", "ms", "dr", "prof", "sr", "jr", "st", "vs", "etc", "e.g", "i.e", "a.m", "p.m",
    "u.s", "inc", "ltd", "approx",
];

/// Marks that end any segment, the first of a turn or a later one.
const SENTENCE_ENDS: &[char] = &['。', '？', '?', '！', '!', '；', ';', '：'];
/// Marks that end only the first segment of a turn (ASCII `,` is handled apart, for numbers).
const FIRST_SEGMENT_ENDS: &[char] = &['，', '~', '～', '、'];
/// Closing quotes and brackets that stay with the sentence before them.
const CLOSERS: &[char] = &['"', '\'', '”', '’', ')', '）', ']', '】', '」', '』', '》'];
/// Characters dropped from the start of a segment: what a cut can leave behind.
const LEADING_JUNK: &[char] = &[
    '，', ',', '。', '.', '？', '?', '！', '!', '；', ';', '：', ':', '、', '~', '～', '”', '’',
    ')', '）', ']', '】', '」', '』', '》',
];
/// Markdown markers removed wherever they appear.
const MARKDOWN_MARKERS: &[char] = &['*', '#', '`'];

/// The reference's emoji → emotion map (S `core/utils/textUtils.py`), in its order.
const EMOTIONS: [(&str, &str); 21] = [
    ("😂", "funny"),
    ("😭", "crying"),
    ("😠", "angry"),
    ("😔", "sad"),
    ("😍", "loving"),
    ("😲", "surprised"),
    ("😱", "shocked"),
    ("🤔", "thinking"),
    ("😌", "relaxed"),
    ("😴", "sleepy"),
    ("😜", "silly"),
    ("🙄", "confused"),
    ("😶", "neutral"),
    ("🙂", "happy"),
    ("😆", "laughing"),
    ("😳", "embarrassed"),
    ("😉", "winking"),
    ("😎", "cool"),
    ("🤤", "delicious"),
    ("😘", "kissy"),
    ("😏", "confident"),
];

/// Emotion shown when a reply has none of the mapped emoji.
const DEFAULT_EMOTION: (&str, &str) = ("🙂", "happy");

/// Splits one turn's streamed LLM text into cleaned segments for TTS.
///
/// Feed deltas with [`push`](Self::push); call [`finish`](Self::finish) when the LLM stream ends
/// (it flushes the rest and starts a new turn) or [`reset`](Self::reset) on abort.
#[derive(Debug, Clone)]
pub struct SentenceSplitter {
    /// Text received and not yet emitted: `buf[seg_start..]` is the current segment.
    buf: String,
    /// Byte offset in `buf` where the current segment starts.
    seg_start: usize,
    /// Byte offset in `buf` of the next character to examine.
    scan: usize,
    /// Weight of `buf[seg_start..scan]` (characters, digits counted as [`DIGIT_WEIGHT`]).
    seg_weight: usize,
    /// Whether a non-empty segment has been emitted this turn (ends the first-segment fast path).
    emitted_any: bool,
    max_chars: usize,
}

/// What the character at the scan position means for the current segment.
enum Decision {
    /// The segment ends at this byte offset.
    Cut(usize),
    /// Not a boundary.
    Continue,
    /// Undecidable until more text arrives.
    NeedMore,
}

impl Default for SentenceSplitter {
    fn default() -> Self {
        Self::new()
    }
}

impl SentenceSplitter {
    /// A splitter that cuts boundary-less text at [`DEFAULT_MAX_SEGMENT_CHARS`].
    pub fn new() -> Self {
        Self::with_max_chars(DEFAULT_MAX_SEGMENT_CHARS)
    }

    /// A splitter that cuts boundary-less text at `max_chars` characters (at least 1; a digit
    /// counts as [`DIGIT_WEIGHT`]).
    pub fn with_max_chars(max_chars: usize) -> Self {
        Self {
            buf: String::new(),
            seg_start: 0,
            scan: 0,
            seg_weight: 0,
            emitted_any: false,
            max_chars: max_chars.max(1),
        }
    }

    /// Adds an LLM text delta; appends every segment that is now complete to `out`.
    pub fn push(&mut self, delta: &str, out: &mut Vec<String>) {
        self.buf.push_str(delta);
        self.scan_segments(false, out);
        self.compact();
    }

    /// Ends the turn: emits what is left and makes the next segment a first segment again.
    pub fn finish(&mut self, out: &mut Vec<String>) {
        self.scan_segments(true, out);
        let rest = self.buf.len();
        self.emit(self.seg_start, rest, out);
        self.reset();
    }

    /// Drops pending text (abort); the next segment is a first segment again.
    pub fn reset(&mut self) {
        self.buf.clear();
        self.seg_start = 0;
        self.scan = 0;
        self.seg_weight = 0;
        self.emitted_any = false;
    }

    /// Whether the next segment emitted will be the turn's first (comma fast path applies).
    pub fn in_first_segment(&self) -> bool {
        !self.emitted_any
    }

    fn scan_segments(&mut self, at_end: bool, out: &mut Vec<String>) {
        while let Some(c) = self.buf[self.scan..].chars().next() {
            match self.decide(c, at_end) {
                Decision::NeedMore => return,
                Decision::Cut(end) => {
                    self.emit(self.seg_start, end, out);
                    self.seg_start = end;
                    self.scan = end;
                    self.seg_weight = 0;
                }
                Decision::Continue => {
                    self.scan += c.len_utf8();
                    self.seg_weight += weight(c);
                    // Each cut removes at least one character, so this ends.
                    while self.seg_weight > self.max_chars {
                        self.cut_long_segment(out);
                    }
                }
            }
        }
    }

    /// Classifies the character `c` at `self.scan`.
    fn decide(&self, c: char, at_end: bool) -> Decision {
        let pos = self.scan;
        let after = pos + c.len_utf8();
        if c == '\n' || SENTENCE_ENDS.contains(&c) {
            return Decision::Cut(after);
        }
        let first = !self.emitted_any;
        if first && FIRST_SEGMENT_ENDS.contains(&c) {
            return Decision::Cut(after);
        }
        if first && c == ',' {
            let prev_is_digit = self.buf[self.seg_start..pos]
                .chars()
                .next_back()
                .is_some_and(|p| p.is_ascii_digit());
            if !prev_is_digit {
                return Decision::Cut(after);
            }
            return match self.buf[after..].chars().next() {
                None if at_end => Decision::Cut(after),
                None => Decision::NeedMore,
                Some(n) if n.is_ascii_digit() => Decision::Continue,
                Some(_) => Decision::Cut(after),
            };
        }
        if c == '.' {
            return self.decide_period(pos, after, at_end);
        }
        Decision::Continue
    }

    /// A `.` ends a sentence when whitespace follows (after optional closers) and the word
    /// before it is not an abbreviation, an initial or a list item's number.
    fn decide_period(&self, pos: usize, after: usize, at_end: bool) -> Decision {
        let mut end = after;
        let next = loop {
            match self.buf[end..].chars().next() {
                Some(n) if CLOSERS.contains(&n) => end += n.len_utf8(),
                other => break other,
            }
        };
        match next {
            None if at_end => Decision::Cut(end),
            None => Decision::NeedMore,
            Some(n) if n.is_whitespace() => {
                if self.period_ends_sentence(pos) {
                    Decision::Cut(end)
                } else {
                    Decision::Continue
                }
            }
            Some(_) => Decision::Continue,
        }
    }

    fn period_ends_sentence(&self, pos: usize) -> bool {
        let before = &self.buf[self.seg_start..pos];
        let word_start = before
            .char_indices()
            .rev()
            .find(|(_, ch)| ch.is_whitespace())
            .map_or(0, |(i, ch)| i + ch.len_utf8());
        let word = before[word_start..].trim_start_matches(|ch: char| !ch.is_alphanumeric());
        let word = word.trim_end_matches('.');
        if word.chars().count() == 1 && word.chars().all(|ch| ch.is_ascii_alphabetic()) {
            return false; // an initial: "J. K. Rowling"
        }
        let lower = word.to_ascii_lowercase();
        if ABBREVIATIONS.contains(&lower.as_str()) {
            return false;
        }
        let is_list_number = !word.is_empty()
            && word.chars().all(|ch| ch.is_ascii_digit())
            && before[..word_start].trim().is_empty();
        !is_list_number
    }

    /// The segment grew past `max_chars` without a boundary: emit its longest head within
    /// `max_chars` up to the head's last space or comma, or the whole head when it has none
    /// (at least one character).
    fn cut_long_segment(&mut self, out: &mut Vec<String>) {
        let seg = &self.buf[self.seg_start..self.scan];
        let mut limit = seg.len();
        let mut total = 0;
        for (i, ch) in seg.char_indices() {
            total += weight(ch);
            if total > self.max_chars {
                limit = if i == 0 { ch.len_utf8() } else { i };
                break;
            }
        }
        let head = &seg[..limit];
        let mut next: Option<char> = seg[limit..].chars().next();
        let mut break_after = None;
        for (i, ch) in head.char_indices().rev() {
            let is_break = ch.is_whitespace()
                || ch == '，'
                || ch == '、'
                || (ch == ',' && !next.is_some_and(|n| n.is_ascii_digit()));
            if is_break && i > 0 {
                break_after = Some(i + ch.len_utf8());
                break;
            }
            next = Some(ch);
        }
        let end = self.seg_start + break_after.unwrap_or(limit);
        self.emit(self.seg_start, end, out);
        self.seg_start = end;
        self.seg_weight = segment_weight(&self.buf[end..self.scan]);
    }

    fn emit(&mut self, start: usize, end: usize, out: &mut Vec<String>) {
        if let Some(segment) = clean_segment(&self.buf[start..end]) {
            out.push(segment);
            self.emitted_any = true;
        }
    }

    /// Drops emitted text from the front of the buffer.
    fn compact(&mut self) {
        if self.seg_start > 0 {
            self.buf.drain(..self.seg_start);
            self.scan -= self.seg_start;
            self.seg_start = 0;
        }
    }
}

/// Cleans one raw segment for speech; `None` when nothing speakable is left.
fn clean_segment(raw: &str) -> Option<String> {
    let mut text = String::with_capacity(raw.len());
    let mut pending_space = false;
    for ch in raw.chars() {
        if is_emoji(ch) || MARKDOWN_MARKERS.contains(&ch) {
            continue;
        }
        if ch.is_whitespace() {
            pending_space = !text.is_empty();
            continue;
        }
        if pending_space {
            text.push(' ');
            pending_space = false;
        }
        text.push(ch);
    }
    let mut rest = text.as_str();
    for bullet in ["- ", "• ", "> "] {
        rest = rest.strip_prefix(bullet).unwrap_or(rest);
    }
    let rest = rest.trim_start_matches(|ch: char| ch.is_whitespace() || LEADING_JUNK.contains(&ch));
    if rest.chars().any(char::is_alphanumeric) {
        Some(rest.to_string())
    } else {
        None
    }
}

/// Whether `ch` is an emoji or a part of one (joiner, variation selector, keycap, tag).
fn is_emoji(ch: char) -> bool {
    matches!(
        u32::from(ch),
        0x1F000..=0x1FAFF    // emoticons, pictographs, transport, supplemental, flags, skin tones
            | 0x2600..=0x27BF  // miscellaneous symbols, dingbats (the reference's ranges)
            | 0x2B50 | 0x2B55 | 0x231A | 0x231B | 0x23E9..=0x23FA
            | 0x200D | 0xFE0F | 0x20E3 | 0xE0020..=0xE007F
    )
}

/// The emoji and emotion name for a reply: the first of the 21 mapped emoji found in `text`,
/// else 🙂 / happy (the reference's rule; the session passes the first non-blank LLM chunk).
pub fn emotion_of(text: &str) -> (&'static str, &'static str) {
    text.char_indices()
        .find_map(|(i, ch)| {
            let s = &text[i..i + ch.len_utf8()];
            EMOTIONS.iter().find(|(emoji, _)| *emoji == s).copied()
        })
        .unwrap_or(DEFAULT_EMOTION)
}

/// `text` without emoji (for subtitles and TTS), trimmed of the whitespace that leaves at the ends.
pub fn strip_emoji(text: &str) -> String {
    let kept: String = text.chars().filter(|&ch| !is_emoji(ch)).collect();
    kept.trim().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split_all(text: &str) -> Vec<String> {
        let mut splitter = SentenceSplitter::new();
        let mut out = Vec::new();
        splitter.push(text, &mut out);
        splitter.finish(&mut out);
        out
    }

    fn split_deltas(deltas: &[&str]) -> Vec<String> {
        let mut splitter = SentenceSplitter::new();
        let mut out = Vec::new();
        for delta in deltas {
            splitter.push(delta, &mut out);
        }
        splitter.finish(&mut out);
        out
    }

    fn split_char_by_char(text: &str, max_chars: usize) -> Vec<String> {
        let mut splitter = SentenceSplitter::with_max_chars(max_chars);
        let mut out = Vec::new();
        let mut buf = [0u8; 4];
        for ch in text.chars() {
            splitter.push(ch.encode_utf8(&mut buf), &mut out);
        }
        splitter.finish(&mut out);
        out
    }

    #[test]
    fn chinese_first_segment_ends_at_comma() {
        assert_eq!(
            split_all("好的，今天天气不错，适合出去走走。"),
            ["好的，", "今天天气不错，适合出去走走。"]
        );
    }

    #[test]
    fn later_segments_end_only_at_sentence_marks() {
        assert_eq!(
            split_all("嗯，我想想、这个问题，答案是：四十二！对吧？还有；别的"),
            [
                "嗯，",
                "我想想、这个问题，答案是：",
                "四十二！",
                "对吧？",
                "还有；",
                "别的"
            ]
        );
    }

    #[test]
    fn each_sentence_end_is_its_own_segment() {
        assert_eq!(
            split_all("你好。我是小智。很高兴认识你！"),
            ["你好。", "我是小智。", "很高兴认识你！"]
        );
    }

    #[test]
    fn first_segment_can_end_at_tilde_and_ideographic_comma() {
        assert_eq!(
            split_all("好呀~我们走吧，出发。"),
            ["好呀~", "我们走吧，出发。"]
        );
        assert_eq!(split_all("苹果、香蕉，都好。"), ["苹果、", "香蕉，都好。"]);
    }

    #[test]
    fn ascii_question_and_exclamation_marks_cut_in_chinese_text() {
        assert_eq!(split_all("真的吗?太好了!好"), ["真的吗?", "太好了!", "好"]);
    }

    #[test]
    fn english_first_segment_ends_at_comma() {
        assert_eq!(
            split_all("Sure, the weather is nice today, so go out."),
            ["Sure,", "the weather is nice today, so go out."]
        );
    }

    #[test]
    fn english_period_followed_by_space_ends_a_sentence() {
        assert_eq!(
            split_all("It is sunny. Take a hat. Enjoy"),
            ["It is sunny.", "Take a hat.", "Enjoy"]
        );
    }

    #[test]
    fn period_inside_a_number_or_word_is_not_a_cut() {
        assert_eq!(
            split_all("Pi is 3.14 and the site is example.com today. Bye"),
            ["Pi is 3.14 and the site is example.com today.", "Bye"]
        );
    }

    #[test]
    fn abbreviations_and_initials_are_not_cuts() {
        assert_eq!(
            split_all("I met Mr. Smith and Dr. Who, e.g. at 9 a.m. today. J. K. Rowling too. Ok"),
            [
                "I met Mr. Smith and Dr. Who,",
                "e.g. at 9 a.m. today.",
                "J. K. Rowling too.",
                "Ok"
            ]
        );
    }

    #[test]
    fn thousands_separator_is_not_a_first_segment_cut() {
        assert_eq!(
            split_all("It costs 3,000 dollars, which is a lot. Really"),
            ["It costs 3,000 dollars,", "which is a lot.", "Really"]
        );
    }

    #[test]
    fn closing_quote_stays_with_its_sentence() {
        assert_eq!(
            split_all("He said \"yes.\" Then he left. 他说：“好。”然后走了。"),
            [
                "He said \"yes.\"",
                "Then he left.",
                "他说：",
                "“好。",
                "然后走了。"
            ]
        );
    }

    #[test]
    fn ellipsis_followed_by_space_ends_a_sentence() {
        assert_eq!(split_all("Well... I think so."), ["Well...", "I think so."]);
    }

    #[test]
    fn newline_ends_a_segment() {
        assert_eq!(
            split_all("Here is the plan\nfirst we eat\n\nthen we sleep"),
            ["Here is the plan", "first we eat", "then we sleep"]
        );
    }

    #[test]
    fn markdown_markers_and_bullets_are_stripped() {
        assert_eq!(
            split_all("## Tips\n- **Drink** water\n- Use `sunscreen`\n1. Rest well. Done"),
            [
                "Tips",
                "Drink water",
                "Use sunscreen",
                "1. Rest well.",
                "Done"
            ]
        );
    }

    #[test]
    fn emoji_are_stripped_and_emoji_only_segments_dropped() {
        assert_eq!(
            split_all("😊 你好，我是小智🙂。😂\n🎉🎉。"),
            ["你好，", "我是小智。"]
        );
        assert_eq!(split_all("👍 Great job! 🎉"), ["Great job!"]);
    }

    #[test]
    fn punctuation_only_segments_are_never_emitted() {
        assert_eq!(split_all("。。！？\n  ，；"), Vec::<String>::new());
        assert_eq!(split_all("好！！！真好？！"), ["好！", "真好？"]);
    }

    #[test]
    fn empty_segment_does_not_end_the_first_segment_fast_path() {
        assert_eq!(split_all("~你好，世界，再见。"), ["你好，", "世界，再见。"]);
    }

    #[test]
    fn whitespace_runs_collapse_to_one_space() {
        assert_eq!(
            split_all("  Hello   there\t friend.  "),
            ["Hello there friend."]
        );
    }

    #[test]
    fn long_text_without_boundary_is_cut_at_last_space() {
        let mut splitter = SentenceSplitter::with_max_chars(20);
        let mut out = Vec::new();
        splitter.push("one two three four five six seven eight", &mut out);
        splitter.finish(&mut out);
        assert_eq!(out, ["one two three four", "five six seven eight"]);
    }

    #[test]
    fn long_chinese_text_cut_at_last_comma_after_the_first_segment() {
        // A Chinese character weighs HAN_WEIGHT (4): 32 is eight characters.
        let mut splitter = SentenceSplitter::with_max_chars(32);
        let mut out = Vec::new();
        splitter.push("好。一二三，四五六七八九十", &mut out);
        splitter.finish(&mut out);
        assert_eq!(out, ["好。", "一二三，", "四五六七八九十"]);
    }

    #[test]
    fn chinese_segments_are_bounded_by_their_spoken_length() {
        // 60 characters without punctuation: about 13 s of speech in one job before.
        let text: String = "今天天气很好我们一起去公园散步吧"
            .chars()
            .cycle()
            .take(60)
            .collect();
        let mut splitter = SentenceSplitter::new();
        let mut out = Vec::new();
        splitter.push(&text, &mut out);
        splitter.finish(&mut out);
        assert_eq!(out.concat(), text);
        assert!(
            out.iter()
                .all(|s| s.chars().count() <= DEFAULT_MAX_SEGMENT_CHARS / HAN_WEIGHT),
            "{out:?}"
        );
    }

    #[test]
    fn long_text_without_any_break_is_hard_cut() {
        let mut splitter = SentenceSplitter::with_max_chars(5 * HAN_WEIGHT);
        let mut out = Vec::new();
        splitter.push("一二三四五六七八九十壹", &mut out);
        splitter.finish(&mut out);
        assert_eq!(out, ["一二三四五", "六七八九十", "壹"]);
    }

    #[test]
    fn period_at_end_of_delta_waits_for_the_next_delta() {
        let mut splitter = SentenceSplitter::new();
        let mut out = Vec::new();
        splitter.push("Hi there. How are you.", &mut out);
        assert_eq!(out, ["Hi there."]);
        splitter.push(" Fine", &mut out);
        assert_eq!(out, ["Hi there.", "How are you."]);
        splitter.finish(&mut out);
        assert_eq!(out, ["Hi there.", "How are you.", "Fine"]);
    }

    #[test]
    fn chinese_period_is_emitted_without_waiting() {
        let mut splitter = SentenceSplitter::new();
        let mut out = Vec::new();
        splitter.push("你好。", &mut out);
        assert_eq!(out, ["你好。"]);
    }

    #[test]
    fn finish_flushes_the_rest_and_starts_a_new_turn() {
        let mut splitter = SentenceSplitter::new();
        let mut out = Vec::new();
        splitter.push("好的，我们走吧，马上", &mut out);
        assert_eq!(out, ["好的，"]);
        assert!(!splitter.in_first_segment());
        splitter.finish(&mut out);
        assert_eq!(out, ["好的，", "我们走吧，马上"]);
        assert!(splitter.in_first_segment());
        out.clear();
        splitter.push("行，走。", &mut out);
        assert_eq!(out, ["行，", "走。"]);
    }

    #[test]
    fn reset_drops_pending_text() {
        let mut splitter = SentenceSplitter::new();
        let mut out = Vec::new();
        splitter.push("好的，我们", &mut out);
        splitter.reset();
        splitter.push("不，", &mut out);
        splitter.finish(&mut out);
        assert_eq!(out, ["好的，", "不，"]);
    }

    #[test]
    fn deltas_split_inside_multibyte_text_and_marks() {
        assert_eq!(
            split_deltas(&[
                "Sure",
                ",",
                " it costs 3",
                ",",
                "000. ",
                "Mr",
                ". Smith",
                " paid."
            ]),
            ["Sure,", "it costs 3,000.", "Mr. Smith paid."]
        );
    }

    #[test]
    fn chunking_does_not_change_segments() {
        let texts = [
            "😊 好的，今天天气不错。气温二十五度，适合出去走走！要带伞吗？不用；放心吧：没问题~",
            "Sure, it's 3,000 dollars. Mr. Smith said \"ok.\" Then e.g. 3.14 works... Right? Yes!\n- item one\n- item two",
            "## Title\n1. First step. 2. Second step.\n**Bold** text `code` here. 最后，再见。",
            "one two three four five six seven eight nine ten eleven twelve thirteen fourteen",
            "一二三四五六七八九十一二三四五六七八九十一二三四五六七八九十，一二三四五六七八九十",
        ];
        for text in texts {
            for max_chars in [7, 25, DEFAULT_MAX_SEGMENT_CHARS] {
                let mut whole = SentenceSplitter::with_max_chars(max_chars);
                let mut expected = Vec::new();
                whole.push(text, &mut expected);
                whole.finish(&mut expected);
                assert_eq!(split_char_by_char(text, max_chars), expected, "{text:?}");
                // Every two-delta split at a char boundary gives the same result too.
                for (i, _) in text.char_indices() {
                    let mut splitter = SentenceSplitter::with_max_chars(max_chars);
                    let mut out = Vec::new();
                    splitter.push(&text[..i], &mut out);
                    splitter.push(&text[i..], &mut out);
                    splitter.finish(&mut out);
                    assert_eq!(out, expected, "{text:?} split at {i}");
                }
            }
        }
    }

    #[test]
    fn no_segment_is_empty_or_longer_than_max_chars() {
        let text = "a ".repeat(50) + &"字".repeat(77) + "。。 " + &"word ".repeat(30);
        let out = split_char_by_char(&text, 16);
        assert!(!out.is_empty());
        for segment in &out {
            assert!(!segment.is_empty());
            assert!(segment.chars().count() <= 16, "{segment:?}");
        }
    }

    #[test]
    fn digits_count_heavier_so_a_run_of_numbers_is_cut_into_bounded_segments() {
        // The offline responder's echo of the text: 95 characters, 90 of them digits.
        let text = "999999999999999 ".repeat(6);
        let out = split_char_by_char(text.trim_end(), 100);
        assert!(out.len() >= 8, "{out:?}");
        for segment in &out {
            assert!(segment_weight(segment) <= 100, "{segment:?}");
        }
        assert_eq!(out.concat().replace(' ', ""), text.replace(' ', ""));
        assert_eq!(
            out[0], "999999999999",
            "12 digits (96) fit, 13 (104) do not"
        );
    }

    #[test]
    fn ordinary_numbers_stay_whole_in_a_sentence() {
        assert_eq!(
            split_all("It was 2024 and it cost 3,000 dollars."),
            ["It was 2024 and it cost 3,000 dollars."]
        );
    }

    #[test]
    fn no_segment_weighs_more_than_max_chars_even_with_digits() {
        let text = "12 ".repeat(20) + &"7".repeat(40) + " a" + &"字３".repeat(30);
        for max_chars in [1, 5, 8, 9, 30] {
            let out = split_char_by_char(&text, max_chars);
            for segment in &out {
                let single = segment.chars().count() == 1;
                assert!(
                    segment_weight(segment) <= max_chars || single,
                    "{max_chars}: {segment:?}"
                );
            }
        }
    }

    #[test]
    fn emotion_is_the_first_mapped_emoji() {
        assert_eq!(emotion_of("😂 haha 😭"), ("😂", "funny"));
        assert_eq!(emotion_of("嗯🤔让我想想"), ("🤔", "thinking"));
        assert_eq!(emotion_of("🎉 😏 sure"), ("😏", "confident"));
        assert_eq!(emotion_of("😎"), ("😎", "cool"));
    }

    #[test]
    fn emotion_defaults_to_happy() {
        assert_eq!(emotion_of("Hello there 🎉"), ("🙂", "happy"));
        assert_eq!(emotion_of(""), ("🙂", "happy"));
    }

    #[test]
    fn emotion_map_has_the_reference_21_entries() {
        assert_eq!(EMOTIONS.len(), 21);
        for (emoji, name) in EMOTIONS {
            assert_eq!(emotion_of(emoji), (emoji, name));
        }
    }

    #[test]
    fn strip_emoji_removes_every_emoji() {
        assert_eq!(strip_emoji("😊 你好🙂！❤️ 👍🏽 ok ☀"), "你好！  ok");
        assert_eq!(strip_emoji("plain text"), "plain text");
        assert_eq!(strip_emoji("👨‍👩‍👧"), "");
    }
}
