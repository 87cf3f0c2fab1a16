//! The Mandarin front end for Kokoro: reply text → the phoneme string Kokoro's Mandarin voices
//! read. Pure code, no I/O: the caller passes a function that phonemises English words (the
//! TTS worker uses espeak-ng), everything else is compiled in.
//!
//! Steps, after misaki's Chinese G2P (which Kokoro v1.0 was trained with):
//! 1. [`normalize`]: numbers, dates, times, percentages and units → Chinese words;
//! 2. Chinese punctuation → Kokoro's (`，` → `, `, `。` → `. `, `《》` → `“ ”` …);
//! 3. the text splits into Hanzi runs, Latin-letter runs and punctuation;
//! 4. a Hanzi run is segmented into words with jieba (a compact word list compiled in, HMM for
//!    the rest; see [`COMMON_WORDS`] for why not jieba's full dictionary), each word read
//!    as pinyin with polyphones fixed per word and tone sandhi applied ([`syllables`]), and
//!    each syllable written in IPA with a tone arrow ([`ipa`]); words are separated by spaces;
//! 5. a Latin run (English words inside a Chinese sentence) goes to the caller's function.
//!
//! Characters that cannot be read (no pinyin, symbols outside Kokoro's punctuation) are never
//! dropped silently: they are counted in [`FrontEndStats::unreadable`].

pub mod ipa;
pub mod normalize;
pub mod syllables;

use std::sync::OnceLock;

use jieba_rs::Jieba;

pub use normalize::normalize;
pub use syllables::{is_hanzi, Syllable};

/// Kokoro v1.0's vocabulary (`vocab.json` keys), for checking what the front end writes
/// (a Kokoro test checks it against the installed file).
#[cfg(test)]
pub(crate) const KOKORO_SYMBOLS: &str = ";:,.!?—…\"()“” \u{303}ʣʥʦʨᵝꭧAIOQSTWYᵊabcdefhijklmnopqrstuvwxyzɑɐɒæβɔɕçɖðʤəɚɛɜɟɡɥɨɪʝɯɰŋɳɲɴøɸθœɹɾɻʁɽʂʃʈʧʊʋʌɣɤχʎʒʔˈˌːʰʲ↓→↗↘ᵻ";

/// Kokoro's punctuation symbols (all in its `vocab.json`), kept in the phoneme string.
const PUNCTUATION: &str = ";:,.!?—…\"()“”";

/// What one [`phonemize`] call read.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct FrontEndStats {
    /// Hanzi syllables written.
    pub syllables: usize,
    /// Latin-letter runs handed to the English phonemiser.
    pub english_runs: usize,
    /// Characters that could not be read and produced no phonemes.
    pub unreadable: usize,
}

/// The phoneme string of a text and what it took.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ZhPhonemes {
    /// Kokoro phonemes: words separated by spaces, punctuation kept.
    pub phonemes: String,
    /// Counts.
    pub stats: FrontEndStats,
}

/// Everyday words of assistant replies, given to jieba together with every word of the
/// polyphone table ([`syllables::WORDS`]); runs of characters outside them are split by
/// jieba's built-in HMM. Why not jieba-rs's full 350k-word dictionary (`default-dict`): that
/// feature compresses the dictionary with zstd, whose C build switches on `cc`'s `parallel`
/// feature for the whole workspace and so rebuilds every C/C++ dependency (libopus,
/// CTranslate2); the word boundaries that matter here are the ones that carry a polyphone or a
/// third-tone sandhi, and those are listed.
pub const COMMON_WORDS: &[&str] = &[
    "你好",
    "您好",
    "我们",
    "你们",
    "他们",
    "今天",
    "明天",
    "昨天",
    "后天",
    "现在",
    "时间",
    "时候",
    "北京",
    "上海",
    "广州",
    "深圳",
    "中国",
    "世界",
    "欢迎",
    "天气",
    "气温",
    "温度",
    "最高",
    "最低",
    "下午",
    "上午",
    "中午",
    "晚上",
    "早上",
    "小时",
    "分钟",
    "问题",
    "可以",
    "可能",
    "没有",
    "因为",
    "所以",
    "但是",
    "如果",
    "已经",
    "一起",
    "一样",
    "一点",
    "一些",
    "知道",
    "喜欢",
    "谢谢",
    "再见",
    "小智",
    "音乐",
    "电话",
    "打电话",
    "手机",
    "电脑",
    "打开",
    "关闭",
    "灯光",
    "出门",
    "记得",
    "小雨",
    "大雨",
    "下雨",
    "以后",
    "以前",
    "孩子",
    "学习",
    "工作",
    "朋友",
    "老师",
    "学生",
    "老虎",
    "展览馆",
    "图书馆",
    "超市",
    "取钱",
    "女儿",
    "好的",
    "不是",
    "不要",
    "不好",
    "不会",
    "不能",
    "第一",
    "十一",
    "统一",
    "一百",
    "一千",
    "一万",
    "一月",
    "一天",
    "一年",
    "一次",
    "看看",
    "希望",
    "帮助",
    "帮忙",
    "需要",
    "设置",
    "提醒",
    "闹钟",
    "播放",
    "暂停",
    "声音",
    "音量",
    "客厅",
    "卧室",
    "厨房",
    "空调",
    "电视",
    "身体",
    "健康",
    "开心",
    "高兴",
    "当然",
    "真的",
    "非常",
    "特别",
    "有点",
    "有些",
    "这个",
    "那个",
    "哪个",
    "这些",
    "那些",
    "怎样",
    "为何",
    "还好",
    "很好",
    "老板",
    "手表",
    "洗澡",
    "水果",
    "早点",
    "小姐",
    "哪里",
    "所有",
    "了解",
    "理解",
    "可是",
    "只是",
    "总是",
    "就是",
    "也是",
    "都是",
    "还是",
    "还有",
    "或者",
    "而且",
    "然后",
    "最后",
    "开始",
    "结束",
    "准备",
    "出发",
    "到达",
    "回家",
    "上班",
    "下班",
    "吃饭",
    "睡觉",
    "起床",
    "休息",
    "周末",
    "星期",
    "今年",
    "明年",
    "去年",
    "新闻",
    "故事",
    "笑话",
    "答案",
    "意思",
    "东西",
    "地方",
    "事情",
    "欢迎你",
    "电影",
    "游戏",
    "运动",
    "跑步",
    "散步",
    "购物",
    "天空",
    "太阳",
    "月亮",
    "春天",
    "夏天",
    "秋天",
    "冬天",
    "晴天",
    "阴天",
    "多云",
    "雨伞",
    "带伞",
    "摄氏度",
    "百分之",
    "公里",
    "公斤",
    "厘米",
    "毫米",
    "小朋友",
    "图书",
    "语言",
    "中文",
    "英文",
    "汉语",
    "英语",
    "普通话",
    "以上",
    "以下",
];

static JIEBA: OnceLock<Jieba> = OnceLock::new();

/// The process-wide jieba segmenter with its word list, built on first use (see [`warm_up`]).
fn segmenter() -> &'static Jieba {
    JIEBA.get_or_init(|| {
        let mut jieba = Jieba::empty();
        let words = COMMON_WORDS
            .iter()
            .copied()
            .chain(syllables::WORDS.iter().map(|(w, _)| *w));
        for word in words {
            // A frequency well above an unlisted character's, so listed words win the DAG.
            jieba.add_word(word, Some(1_000), None);
        }
        jieba
    })
}

/// Builds the segmenter now so the first reply does not pay for it.
pub fn warm_up() {
    segmenter();
}

/// Jieba's word segmentation of a run of Hanzi (HMM on, for words not in the dictionary).
pub fn segment(hanzi: &str) -> Vec<&str> {
    segmenter()
        .cut(hanzi, true)
        .into_iter()
        .map(|t| t.word)
        .collect()
}

/// Whether `text` contains a Hanzi (the Mandarin front end should read it).
pub fn has_hanzi(text: &str) -> bool {
    text.chars().any(is_hanzi)
}

/// Chinese punctuation → Kokoro's ASCII-like punctuation, spaced the way misaki spaces it.
fn map_punctuation(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '、' | '，' => out.push_str(", "),
            '。' | '．' => out.push_str(". "),
            '！' => out.push_str("! "),
            '：' => out.push_str(": "),
            '；' => out.push_str("; "),
            '？' => out.push_str("? "),
            '«' | '《' | '「' | '【' | '『' => out.push_str(" “"),
            '»' | '》' | '」' | '】' | '』' => out.push_str("” "),
            '（' => out.push_str(" ("),
            '）' => out.push_str(") "),
            '～' | '~' => out.push_str(", "),
            other => out.push(other),
        }
    }
    out
}

/// One piece of the output before spacing.
enum Piece {
    Word(String),
    Punct(char),
}

/// Reads `text` (a sentence or so of reply text, emoji already removed) into Kokoro phonemes.
/// `english` phonemises a run of Latin-letter words (e.g. "iPhone", "Hello world") into
/// Kokoro's symbols; its error aborts the call.
pub fn phonemize<E>(
    text: &str,
    mut english: impl FnMut(&str) -> Result<String, E>,
) -> Result<ZhPhonemes, E> {
    let text = map_punctuation(&normalize(text));
    let mut stats = FrontEndStats::default();
    let mut pieces = Vec::new();
    let chars: Vec<char> = text.chars().collect();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        if is_hanzi(c) {
            let start = i;
            while i < chars.len() && is_hanzi(chars[i]) {
                i += 1;
            }
            let run: String = chars[start..i].iter().collect();
            read_hanzi(&run, &mut pieces, &mut stats);
        } else if c.is_ascii_alphabetic() {
            // Words with inner apostrophes/hyphens and the spaces between them stay together,
            // so espeak-ng reads "Hello world" as one phrase.
            let start = i;
            let mut end = i;
            while i < chars.len()
                && (chars[i].is_ascii_alphabetic() || matches!(chars[i], '\'' | '-' | ' '))
            {
                if chars[i].is_ascii_alphabetic() {
                    end = i + 1;
                }
                i += 1;
            }
            i = end;
            let run: String = chars[start..end].iter().collect();
            let phonemes = english(&run)?;
            stats.english_runs += 1;
            if phonemes.trim().is_empty() {
                stats.unreadable += run.chars().filter(|c| !c.is_whitespace()).count();
            } else {
                pieces.push(Piece::Word(phonemes.trim().to_owned()));
            }
        } else if PUNCTUATION.contains(c) {
            pieces.push(Piece::Punct(c));
            i += 1;
        } else {
            if !c.is_whitespace() && !matches!(c, '\'' | '-') {
                stats.unreadable += 1;
            }
            i += 1;
        }
    }
    Ok(ZhPhonemes {
        phonemes: join(&pieces),
        stats,
    })
}

/// Segments, reads and writes one run of Hanzi as word pieces.
fn read_hanzi(run: &str, pieces: &mut Vec<Piece>, stats: &mut FrontEndStats) {
    let mut words: Vec<Vec<Option<Syllable>>> =
        segment(run).into_iter().map(syllables::word).collect();
    syllables::sandhi(&mut words);
    for word in words {
        let mut out = String::new();
        for syl in word {
            match syl.and_then(|s| ipa::syllable(&s.pinyin, s.tone)) {
                Some(p) => {
                    out.push_str(&p);
                    stats.syllables += 1;
                }
                None => stats.unreadable += 1,
            }
        }
        if !out.is_empty() {
            pieces.push(Piece::Word(out));
        }
    }
}

/// Words separated by one space; closing punctuation attaches to the word before it and
/// opening punctuation to the word after it.
fn join(pieces: &[Piece]) -> String {
    let mut out = String::new();
    let mut glue_next = false;
    for piece in pieces {
        match piece {
            Piece::Word(w) => {
                if !out.is_empty() && !glue_next {
                    out.push(' ');
                }
                out.push_str(w);
                glue_next = false;
            }
            Piece::Punct(c @ ('(' | '“')) => {
                if !out.is_empty() {
                    out.push(' ');
                }
                out.push(*c);
                glue_next = true;
            }
            Piece::Punct(c) => {
                out.push(*c);
                glue_next = false;
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn no_english(run: &str) -> Result<String, String> {
        Err(format!("unexpected English {run:?}"))
    }

    fn zh(text: &str) -> ZhPhonemes {
        phonemize(text, no_english).expect("phonemize")
    }

    #[test]
    fn segmentation_splits_a_sentence_into_dictionary_words() {
        assert_eq!(
            segment("我们今天去银行取钱"),
            ["我们", "今天", "去", "银行", "取钱"]
        );
        assert_eq!(segment("明天下午出门"), ["明天", "下午", "出门"]);
    }

    #[test]
    fn a_greeting_reads_as_misaki_writes_it() {
        let out = zh("你好，世界！");
        assert_eq!(out.phonemes, "ni↗xau↓, ʂɨ↘ʨje↘!");
        assert_eq!(out.stats.syllables, 4);
        assert_eq!(out.stats.unreadable, 0);
    }

    #[test]
    fn polyphones_are_read_by_word_in_a_sentence() {
        // 银行 háng (not xíng), 长大 zhǎng (not cháng), 音乐 yuè (not lè).
        assert!(zh("我去银行").phonemes.ends_with(" i↗nxa↗ŋ"));
        assert!(zh("孩子长大了").phonemes.contains("ꭧa↓ŋta↘"));
        assert!(zh("我喜欢音乐").phonemes.contains("i→nɥe↘"));
        assert!(zh("你还是来吧").phonemes.contains("xai↗ʂɨ↘"));
    }

    #[test]
    fn numbers_dates_and_units_are_spoken_in_chinese() {
        assert_eq!(zh("3个").phonemes, zh("三个").phonemes);
        assert_eq!(
            zh("2024年5月1日").phonemes,
            zh("二零二四年五月一日").phonemes
        );
        assert_eq!(zh("气温25℃").phonemes, zh("气温二十五摄氏度").phonemes);
        assert_eq!(zh("增长50%").phonemes, zh("增长百分之五十").phonemes);
        assert_eq!(zh("14:30").phonemes, zh("十四点三十分").phonemes);
    }

    #[test]
    fn english_words_inside_chinese_go_to_the_english_phonemiser() {
        let mut seen = Vec::new();
        let out = phonemize("我用iPhone打电话，say hello world。", |run| {
            seen.push(run.to_owned());
            Ok::<_, ()>(format!("<{}>", run.len()))
        })
        .expect("phonemize");
        assert_eq!(seen, ["iPhone", "say hello world"]);
        assert_eq!(out.stats.english_runs, 2);
        assert!(out.phonemes.contains(" <6> "), "{}", out.phonemes);
        assert!(out.phonemes.ends_with(", <15>."), "{}", out.phonemes);
    }

    #[test]
    fn unreadable_characters_are_counted_not_dropped_silently() {
        let out = zh("你好☃§");
        assert_eq!(out.phonemes, "ni↗xau↓");
        assert_eq!(out.stats.unreadable, 2);
        let out = phonemize("你好abc", |_| Ok::<_, ()>(String::new())).expect("ok");
        assert_eq!(out.stats.unreadable, 3);
    }

    #[test]
    fn every_symbol_written_is_in_kokoros_vocabulary() {
        let text = "今天是2026年12月3日，北京气温-5℃到3℃。我们一起去银行、超市和图书馆吧？\
                    知道了！孩子们长大以后，还是觉得音乐很重要。儿子说：“一会儿见”（再见）……\
                    日出江花红胜火，春来江水绿如蓝。他的女儿去了广州，学习略知一二。";
        let out = zh(text);
        assert_eq!(out.stats.unreadable, 0, "{}", out.phonemes);
        let bad: Vec<char> = out
            .phonemes
            .chars()
            .filter(|c| !KOKORO_SYMBOLS.contains(*c))
            .collect();
        assert!(bad.is_empty(), "not in vocab: {bad:?} in {}", out.phonemes);
    }

    #[test]
    fn same_text_gives_the_same_phonemes() {
        let text = "我们明天下午3点在银行门口见。";
        assert_eq!(zh(text), zh(text));
    }
}
