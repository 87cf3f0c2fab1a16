//! Which language a text is in, as far as the server needs to know: the one CJK test that the
//! offline responder, the intents, the TTS engine choice and the ASR checks share (before, four
//! copies disagreed on the ranges).

/// Whether `c` is a CJK ideograph (unified, extension A and B, compatibility ideographs).
pub fn is_cjk(c: char) -> bool {
    matches!(
        u32::from(c),
        0x4E00..=0x9FFF | 0x3400..=0x4DBF | 0xF900..=0xFAFF | 0x20000..=0x2A6DF
    )
}

/// Whether the text contains a CJK ideograph (then it is treated as Chinese).
pub fn has_cjk(text: &str) -> bool {
    text.chars().any(is_cjk)
}

/// `text` in simplified characters (OpenCC's traditional-to-simplified tables, loaded once per
/// process and read-only after), so phrases match whichever script a recogniser wrote.
pub fn simplified(text: &str) -> String {
    use ferrous_opencc::{config::BuiltinConfig, OpenCC};
    static T2S: std::sync::OnceLock<Option<OpenCC>> = std::sync::OnceLock::new();
    match T2S.get_or_init(|| OpenCC::from_config(BuiltinConfig::T2s).ok()) {
        Some(t2s) => t2s.convert(text),
        None => text.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ideographs_of_every_block_count_and_latin_or_kana_do_not() {
        assert!(has_cjk("what is 天气"));
        assert!(has_cjk("\u{3400}"));
        assert!(has_cjk("\u{F900}"));
        assert!(has_cjk("\u{20000}"));
        assert!(!has_cjk("hello, world"));
        assert!(!has_cjk("ひらがな"));
        assert!(!has_cjk(""));
    }

    #[test]
    fn traditional_characters_read_as_simplified() {
        assert_eq!(simplified("現在幾點了"), "现在几点了");
        assert_eq!(simplified("现在几点了"), "现在几点了");
        assert_eq!(simplified("hello"), "hello");
    }
}
