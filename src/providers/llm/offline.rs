//! The offline responder: the built-in replier used when no LLM is configured.
//!
//! `serve` with no config runs the whole voice loop on this machine with no API key (design.md,
//! "Embedded default"). In place of a language model it uses [`OfflineResponder`]: a handful of
//! fixed intents (greeting, the time, the date, "who are you", goodbye) recognised by keywords,
//! and otherwise an echo of what it heard, so a device owner can tell recognition works. It
//! answers in the language of the input: Chinese when the text contains a CJK ideograph, English
//! otherwise. Replies are one or two short sentences, because they are spoken.
//!
//! It is pure (the caller passes the clock and the device's time-zone offset), so its tests pin
//! exact replies for fixed timestamps.

use crate::clock::{LocalTime, WEEKDAYS_EN};

/// Longest echoed text, in characters; longer input is cut and ends with `…`.
const MAX_ECHO_CHARS: usize = 100;

const WEEKDAYS_ZH: [&str; 7] = ["日", "一", "二", "三", "四", "五", "六"];
const MONTHS_EN: [&str; 12] = [
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
];

/// English phrases per intent, matched as whole words in the normalised input (see `normalise`).
const WHO_EN: &[&str] = &[
    "who are you",
    "what are you",
    "your name",
    "who am i talking to",
];
const TIME_EN: &[&str] = &["what time", "the time", "time is it", "current time"];
const DATE_EN: &[&str] = &[
    "the date",
    "what date",
    "todays date",
    "what day",
    "which day",
];
const BYE_EN: &[&str] = &[
    "bye",
    "goodbye",
    "good bye",
    "see you",
    "good night",
    "farewell",
];
const HELLO_EN: &[&str] = &[
    "hello",
    "hi",
    "hey",
    "howdy",
    "greetings",
    "good morning",
    "good afternoon",
    "good evening",
];

/// Chinese phrases per intent, matched as substrings.
const WHO_ZH: &[&str] = &["你是谁", "你叫什么", "你的名字", "你是什么"];
const TIME_ZH: &[&str] = &["几点", "什么时间", "现在时间", "报时"];
const DATE_ZH: &[&str] = &[
    "几号",
    "日期",
    "星期几",
    "礼拜几",
    "周几",
    "几月几",
    "哪一天",
];
const BYE_ZH: &[&str] = &["再见", "拜拜", "晚安", "回头见", "下次见"];
const HELLO_ZH: &[&str] = &[
    "你好",
    "您好",
    "嗨",
    "哈喽",
    "早上好",
    "下午好",
    "晚上好",
    "早安",
];

/// What the user asked for, in order of precedence ("hello, what time is it" asks the time).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Intent {
    WhoAreYou,
    Time,
    Date,
    Goodbye,
    Greeting,
    Echo,
}

/// The built-in replier used when no LLM is configured (see the module docs).
#[derive(Debug, Clone, Copy, Default)]
pub struct OfflineResponder {
    /// Answer in Chinese when the input gives no language to follow (empty).
    prefer_chinese: bool,
}

impl OfflineResponder {
    /// The responder; `prefer_chinese` picks the language when the input has none (every other
    /// reply is in the language of the input).
    pub fn new(prefer_chinese: bool) -> Self {
        Self { prefer_chinese }
    }

    /// The spoken reply to `user_text`, with the clock at `now_unix` (seconds since the Unix
    /// epoch, UTC) and the device `tz_offset_minutes` east of UTC.
    pub fn reply(&self, user_text: &str, now_unix: u64, tz_offset_minutes: i64) -> String {
        let text = user_text.trim();
        let chinese = crate::lang::has_cjk(text);
        if text.is_empty() {
            return if self.prefer_chinese {
                "对不起，我没听清。"
            } else {
                "Sorry, I didn't catch that."
            }
            .to_string();
        }
        let intent = if chinese {
            intent_zh(text)
        } else {
            intent_en(&normalise(text))
        };
        let local = LocalTime::at(now_unix, tz_offset_minutes);
        match (intent, chinese) {
            (Intent::WhoAreYou, false) => "I'm the offline responder of xiaozhi-tpc. \
                No language model is configured; one can be set up in the server config."
                .to_string(),
            (Intent::WhoAreYou, true) => {
                "我是xiaozhi-tpc的离线应答器。现在没有配置大语言模型，可以在服务器配置里设置。"
                    .to_string()
            }
            (Intent::Time, false) => local.time_en(),
            (Intent::Time, true) => local.time_zh(),
            (Intent::Date, false) => local.date_en(),
            (Intent::Date, true) => local.date_zh(),
            (Intent::Goodbye, false) => "Goodbye! Talk to you soon.".to_string(),
            (Intent::Goodbye, true) => "再见，下次再聊！".to_string(),
            (Intent::Greeting, false) => "Hello! I can tell you the time or the date.".to_string(),
            (Intent::Greeting, true) => "你好！我可以告诉你现在的时间和日期。".to_string(),
            (Intent::Echo, false) => format!("You said: {}", shorten(text)),
            (Intent::Echo, true) => format!("你说的是：{}", shorten(text)),
        }
    }
}

fn intent_en(words: &str) -> Intent {
    let has = |phrases: &[&str]| phrases.iter().any(|p| words.contains(&format!(" {p} ")));
    if has(WHO_EN) {
        Intent::WhoAreYou
    } else if has(TIME_EN) {
        Intent::Time
    } else if has(DATE_EN) {
        Intent::Date
    } else if has(BYE_EN) {
        Intent::Goodbye
    } else if has(HELLO_EN) {
        Intent::Greeting
    } else {
        Intent::Echo
    }
}

fn intent_zh(text: &str) -> Intent {
    // Whisper may write traditional characters (asr.whisper.chinese_script = "as_heard" or
    // "traditional"); the phrases above are simplified.
    let text = crate::lang::simplified(text);
    let text = text.as_str();
    let has = |phrases: &[&str]| phrases.iter().any(|p| text.contains(p));
    if has(WHO_ZH) {
        Intent::WhoAreYou
    } else if has(TIME_ZH) {
        Intent::Time
    } else if has(DATE_ZH) {
        Intent::Date
    } else if has(BYE_ZH) {
        Intent::Goodbye
    } else if has(HELLO_ZH) {
        Intent::Greeting
    } else {
        Intent::Echo
    }
}

/// Lowercase words separated by single spaces, with a space at both ends so that phrases match
/// whole words; apostrophes are dropped ("what's" → "whats").
fn normalise(text: &str) -> String {
    let mut out = String::from(" ");
    for ch in text.chars() {
        if ch.is_alphanumeric() {
            out.extend(ch.to_lowercase());
        } else if ch == '\'' || ch == '’' {
            continue;
        } else if !out.ends_with(' ') {
            out.push(' ');
        }
    }
    if !out.ends_with(' ') {
        out.push(' ');
    }
    out
}

fn shorten(text: &str) -> String {
    match text.char_indices().nth(MAX_ECHO_CHARS) {
        Some((cut, _)) => format!("{}…", &text[..cut]),
        None => text.to_string(),
    }
}

impl LocalTime {
    fn time_en(&self) -> String {
        let (hour12, half) = match self.hour {
            0 => (12, "AM"),
            h @ 1..=11 => (h, "AM"),
            12 => (12, "PM"),
            h => (h - 12, "PM"),
        };
        format!("It's {hour12}:{:02} {half}.", self.minute)
    }

    fn time_zh(&self) -> String {
        let (period, hour) = match self.hour {
            h @ 0..=5 => ("凌晨", h),
            h @ 6..=11 => ("上午", h),
            12 => ("中午", 12),
            h @ 13..=17 => ("下午", h - 12),
            h => ("晚上", h - 12),
        };
        if self.minute == 0 {
            format!("现在是{period}{hour}点整。")
        } else {
            format!("现在是{period}{hour}点{:02}分。", self.minute)
        }
    }

    fn date_en(&self) -> String {
        format!(
            "Today is {}, {} {}, {}.",
            WEEKDAYS_EN[self.weekday],
            MONTHS_EN[self.month as usize - 1],
            self.day,
            self.year
        )
    }

    fn date_zh(&self) -> String {
        format!(
            "今天是{}年{}月{}日，星期{}。",
            self.year, self.month, self.day, WEEKDAYS_ZH[self.weekday]
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 2024-03-05 15:07:00 UTC, a Tuesday.
    const TUESDAY_1507_UTC: u64 = 1_709_651_220;
    /// UTC+8 (China Standard Time), in minutes.
    const CST: i64 = 8 * 60;

    fn reply(text: &str) -> String {
        OfflineResponder::new(false).reply(text, TUESDAY_1507_UTC, 0)
    }

    #[test]
    fn english_greetings_get_a_greeting() {
        for text in ["hello", "Hi!", "hey there", "Good morning."] {
            assert_eq!(
                reply(text),
                "Hello! I can tell you the time or the date.",
                "{text}"
            );
        }
    }

    #[test]
    fn chinese_greeting_gets_a_chinese_greeting() {
        assert_eq!(reply("你好"), "你好！我可以告诉你现在的时间和日期。");
        assert_eq!(reply("您好呀。"), "你好！我可以告诉你现在的时间和日期。");
    }

    #[test]
    fn greeting_words_inside_other_words_do_not_count() {
        assert_eq!(reply("this is high"), "You said: this is high");
    }

    #[test]
    fn english_time_in_twelve_hour_clock() {
        assert_eq!(reply("What time is it?"), "It's 3:07 PM.");
        assert_eq!(reply("hello, tell me the time"), "It's 3:07 PM.");
        let responder = OfflineResponder::new(false);
        assert_eq!(responder.reply("what time is it", 0, 0), "It's 12:00 AM.");
        assert_eq!(
            responder.reply("what time is it", 43_200 + 59, 0),
            "It's 12:00 PM."
        );
    }

    #[test]
    fn time_uses_the_device_time_zone() {
        let responder = OfflineResponder::new(false);
        assert_eq!(
            responder.reply("what time is it", TUESDAY_1507_UTC, CST),
            "It's 11:07 PM."
        );
        assert_eq!(
            responder.reply("what time is it", TUESDAY_1507_UTC, -330),
            "It's 9:37 AM."
        );
    }

    #[test]
    fn chinese_time_names_the_part_of_the_day() {
        let responder = OfflineResponder::new(false);
        assert_eq!(
            responder.reply("现在几点", TUESDAY_1507_UTC, 0),
            "现在是下午3点07分。"
        );
        assert_eq!(
            responder.reply("现在几点了？", TUESDAY_1507_UTC, CST),
            "现在是晚上11点07分。"
        );
        assert_eq!(responder.reply("几点了", 0, CST), "现在是上午8点整。");
        assert_eq!(responder.reply("几点了", 1_800, 0), "现在是凌晨0点30分。");
        assert_eq!(responder.reply("几点了", 43_200, 0), "现在是中午12点整。");
    }

    #[test]
    fn english_date_with_weekday() {
        assert_eq!(
            reply("What's the date?"),
            "Today is Tuesday, March 5, 2024."
        );
        assert_eq!(
            reply("what day is it today"),
            "Today is Tuesday, March 5, 2024."
        );
    }

    #[test]
    fn chinese_date_with_weekday() {
        assert_eq!(reply("今天几号"), "今天是2024年3月5日，星期二。");
        assert_eq!(reply("今天星期几？"), "今天是2024年3月5日，星期二。");
    }

    #[test]
    fn date_rolls_over_at_local_midnight() {
        let responder = OfflineResponder::new(false);
        // 2024-03-05 16:00:30 UTC is 2024-03-06 00:00 in UTC+8.
        assert_eq!(
            responder.reply("今天几号", 1_709_654_430, CST),
            "今天是2024年3月6日，星期三。"
        );
        // 2024-12-31 23:59:59 UTC is already 2025 in UTC+8; the epoch was a Thursday.
        assert_eq!(
            responder.reply("what's the date", 1_735_689_599, CST),
            "Today is Wednesday, January 1, 2025."
        );
        assert_eq!(
            responder.reply("what's the date", 0, 0),
            "Today is Thursday, January 1, 1970."
        );
        // A leap day.
        assert_eq!(
            responder.reply("what's the date", 1_709_208_000, 0),
            "Today is Thursday, February 29, 2024."
        );
    }

    #[test]
    fn who_are_you_names_the_offline_responder() {
        assert_eq!(
            reply("Who are you?"),
            "I'm the offline responder of xiaozhi-tpc. No language model is configured; \
             one can be set up in the server config."
        );
        assert_eq!(
            reply("你是谁"),
            "我是xiaozhi-tpc的离线应答器。现在没有配置大语言模型，可以在服务器配置里设置。"
        );
    }

    #[test]
    fn traditional_characters_ask_the_same_questions() {
        assert_eq!(reply("現在幾點了"), reply("现在几点了"));
        assert_eq!(reply("你是誰"), reply("你是谁"));
        assert_ne!(reply("現在幾點了"), reply("随便说说"));
    }

    #[test]
    fn goodbye_phrases_get_a_goodbye() {
        for text in ["bye", "Goodbye!", "ok see you later", "good night"] {
            assert_eq!(reply(text), "Goodbye! Talk to you soon.", "{text}");
        }
        for text in ["再见", "拜拜啦", "晚安"] {
            assert_eq!(reply(text), "再见，下次再聊！", "{text}");
        }
    }

    #[test]
    fn anything_else_is_echoed_in_the_input_language() {
        assert_eq!(reply("  Play some music.  "), "You said: Play some music.");
        assert_eq!(reply("今天天气怎么样？"), "你说的是：今天天气怎么样？");
        assert_eq!(reply("播放 music"), "你说的是：播放 music");
    }

    #[test]
    fn long_input_is_echoed_shortened() {
        let long = "a".repeat(150);
        assert_eq!(reply(&long), format!("You said: {}…", "a".repeat(100)));
    }

    #[test]
    fn empty_input_asks_again() {
        assert_eq!(reply("   "), "Sorry, I didn't catch that.");
        let zh = OfflineResponder::new(true);
        assert_eq!(zh.reply("", TUESDAY_1507_UTC, 0), "对不起，我没听清。");
        // A Chinese default does not change the language of an answer to English input.
        assert_eq!(zh.reply("hello", TUESDAY_1507_UTC, 0), reply("hello"));
    }
}
