//! Pinyin syllable → the IPA-with-tone-arrows string Kokoro's Mandarin voices were trained on.
//!
//! Kokoro v1.0's Mandarin voices read misaki's legacy Chinese G2P: pinyin → IPA after
//! pinyin-to-ipa (Duanmu 2007 / Lin 2007 tables, first variant of each: `h` → `x`, `r` → `ɻ`,
//! `er` → `ɚ`), the non-syllabic mark U+032F dropped, the apical vowels of `zhi chi shi ri` and
//! `zi ci si` written `ɨ`, affricates as the single letters `ʦ ʨ ꭧ` (+ `ʰ`), and the tone as one
//! arrow right after the syllable's nucleus: 1 `→`, 2 `↗`, 3 `↓`, 4 `↘`, neutral nothing
//! (`zhōng` → `ꭧʊ→ŋ`, `hǎo` → `xau↓`). Every symbol written here is in Kokoro's `vocab.json`
//! (a test checks it).

/// The tone arrow Kokoro expects after a syllable's nucleus; the neutral tone (5) has none.
pub fn tone_mark(tone: u8) -> &'static str {
    match tone {
        1 => "→",
        2 => "↗",
        3 => "↓",
        4 => "↘",
        _ => "",
    }
}

/// Initials, longest first so `zh ch sh` win over `z c s`.
const INITIALS: [(&str, &str); 21] = [
    ("zh", "ꭧ"),
    ("ch", "ꭧʰ"),
    ("sh", "ʂ"),
    ("b", "p"),
    ("p", "pʰ"),
    ("m", "m"),
    ("f", "f"),
    ("d", "t"),
    ("t", "tʰ"),
    ("n", "n"),
    ("l", "l"),
    ("g", "k"),
    ("k", "kʰ"),
    ("h", "x"),
    ("j", "ʨ"),
    ("q", "ʨʰ"),
    ("x", "ɕ"),
    ("r", "ɻ"),
    ("z", "ʦ"),
    ("c", "ʦʰ"),
    ("s", "s"),
];

/// Finals in their full (strict) spelling → IPA with `T` where the tone arrow goes.
const FINALS: [(&str, &str); 37] = [
    ("a", "aT"),
    ("ai", "aiT"),
    ("an", "aTn"),
    ("ang", "aTŋ"),
    ("ao", "auT"),
    ("e", "ɤT"),
    ("ei", "eiT"),
    ("en", "əTn"),
    ("eng", "əTŋ"),
    ("i", "iT"),
    ("ia", "jaT"),
    ("ian", "jɛTn"),
    ("iang", "jaTŋ"),
    ("iao", "jauT"),
    ("ie", "jeT"),
    ("in", "iTn"),
    ("iou", "jouT"),
    ("ing", "iTŋ"),
    ("iong", "jʊTŋ"),
    ("io", "jɔT"),
    ("ong", "ʊTŋ"),
    ("ou", "ouT"),
    ("u", "uT"),
    ("uei", "weiT"),
    ("ua", "waT"),
    ("uai", "waiT"),
    ("uan", "waTn"),
    ("uen", "wəTn"),
    ("uang", "waTŋ"),
    ("ueng", "wəTŋ"),
    ("uo", "woT"),
    // `o` after b p m f is [wo] as well (`bo` = `buo`).
    ("o", "woT"),
    ("ü", "yT"),
    ("üe", "ɥeT"),
    ("üan", "ɥɛTn"),
    ("ün", "yTn"),
    ("ê", "ɛT"),
];

/// Syllables without an initial-final split: interjections and syllabic nasals.
const WHOLE: [(&str, &str); 7] = [
    ("er", "ɚT"),
    ("o", "ɔT"),
    ("m", "mT"),
    ("n", "nT"),
    ("ng", "ŋT"),
    ("hm", "hmT"),
    ("hng", "hŋT"),
];

/// `y`/`w` spellings (no initial) → the strict final.
const YW: [(&str, &str); 23] = [
    ("yi", "i"),
    ("ya", "ia"),
    ("yo", "io"),
    ("ye", "ie"),
    ("yao", "iao"),
    ("you", "iou"),
    ("yan", "ian"),
    ("yin", "in"),
    ("yang", "iang"),
    ("ying", "ing"),
    ("yong", "iong"),
    ("yu", "ü"),
    ("yue", "üe"),
    ("yuan", "üan"),
    ("yun", "ün"),
    ("wu", "u"),
    ("wa", "ua"),
    ("wo", "uo"),
    ("wai", "uai"),
    ("wei", "uei"),
    ("wan", "uan"),
    ("wen", "uen"),
    ("wang", "uang"),
];

/// The IPA of one toneless pinyin syllable (lowercase, `ü` written as `ü` or `v`) with tone
/// 1–5, or `None` when it is not a Mandarin syllable.
pub fn syllable(pinyin: &str, tone: u8) -> Option<String> {
    let owned;
    let pinyin = if pinyin.contains('v') {
        owned = pinyin.replace('v', "ü");
        owned.as_str()
    } else {
        pinyin
    };
    let mark = tone_mark(tone);
    if let Some((_, ipa)) = WHOLE.iter().find(|(p, _)| *p == pinyin) {
        return Some(ipa.replace('T', mark));
    }
    let (initial, rest) = match INITIALS.iter().find(|(p, _)| pinyin.starts_with(p)) {
        Some(&(p, ipa)) => (Some((p, ipa)), &pinyin[p.len()..]),
        None => (None, pinyin),
    };
    let fin = match initial {
        None => match YW.iter().find(|(p, _)| *p == rest) {
            Some((_, f)) => *f,
            None if rest == "yu" || rest == "yü" => "ü",
            None if rest == "weng" => "ueng",
            None => rest,
        },
        Some(("j" | "q" | "x", _)) => match rest {
            "u" => "ü",
            "ue" => "üe",
            "uan" => "üan",
            "un" => "ün",
            other => other,
        },
        Some(_) => rest,
    };
    let fin = match fin {
        "iu" => "iou",
        "ui" => "uei",
        "un" => "uen",
        "yü" => "ü",
        other => other,
    };
    let mut out = String::new();
    if let Some((_, ipa)) = initial {
        out.push_str(ipa);
    }
    let apical = matches!(
        initial.map(|(p, _)| p),
        Some("zh" | "ch" | "sh" | "r" | "z" | "c" | "s")
    ) && fin == "i";
    if apical {
        out.push('ɨ');
        out.push_str(mark);
        return Some(out);
    }
    let (_, ipa) = FINALS.iter().find(|(f, _)| *f == fin)?;
    out.push_str(&ipa.replace('T', mark));
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tone_arrow_follows_the_nucleus_before_the_coda() {
        assert_eq!(syllable("zhong", 1).as_deref(), Some("ꭧʊ→ŋ"));
        assert_eq!(syllable("guo", 2).as_deref(), Some("kwo↗"));
        assert_eq!(syllable("hao", 3).as_deref(), Some("xau↓"));
        assert_eq!(syllable("shi", 4).as_deref(), Some("ʂɨ↘"));
        assert_eq!(syllable("de", 5).as_deref(), Some("tɤ"));
        assert_eq!(syllable("ban", 1).as_deref(), Some("pa→n"));
    }

    #[test]
    fn y_and_w_spellings_and_abbreviated_finals_are_expanded() {
        assert_eq!(syllable("you", 3).as_deref(), Some("jou↓"));
        assert_eq!(syllable("liu", 2).as_deref(), Some("ljou↗"));
        assert_eq!(syllable("gui", 4).as_deref(), Some("kwei↘"));
        assert_eq!(syllable("lun", 2).as_deref(), Some("lwə↗n"));
        assert_eq!(syllable("wei", 4).as_deref(), Some("wei↘"));
        assert_eq!(syllable("yu", 3).as_deref(), Some("y↓"));
        assert_eq!(syllable("xue", 2).as_deref(), Some("ɕɥe↗"));
        assert_eq!(syllable("quan", 2).as_deref(), Some("ʨʰɥɛ↗n"));
        assert_eq!(syllable("nü", 3).as_deref(), Some("ny↓"));
        assert_eq!(syllable("lv", 4).as_deref(), Some("ly↘"));
        assert_eq!(syllable("bo", 1).as_deref(), Some("pwo→"));
    }

    #[test]
    fn apical_vowels_and_er_have_their_own_symbols() {
        assert_eq!(syllable("zi", 4).as_deref(), Some("ʦɨ↘"));
        assert_eq!(syllable("chi", 1).as_deref(), Some("ꭧʰɨ→"));
        assert_eq!(syllable("ri", 4).as_deref(), Some("ɻɨ↘"));
        assert_eq!(syllable("er", 4).as_deref(), Some("ɚ↘"));
        assert_eq!(syllable("ji", 1).as_deref(), Some("ʨi→"));
    }

    #[test]
    fn non_syllables_are_refused() {
        assert_eq!(syllable("xyz", 1), None);
        assert_eq!(syllable("", 1), None);
    }
}
