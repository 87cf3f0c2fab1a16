//! Hanzi → pinyin syllables with tones: the `pinyin` crate's most common reading per
//! character, corrected by a table of common words whose characters read differently in them
//! (polyphones such as 银行 háng, 长大 zhǎng, 音乐 yuè, and neutral tones such as 朋友 you),
//! then the tone sandhi a speaker applies: 一 and 不 before other tones, and third tone before
//! third tone.

use pinyin::ToPinyin;

/// One syllable: toneless pinyin (`ü` kept) and a tone 1–4, or 5 for the neutral tone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Syllable {
    /// The Hanzi it reads.
    pub hanzi: char,
    /// Toneless pinyin, lowercase, e.g. `zhong`, `nü`.
    pub pinyin: String,
    /// 1–4, or 5 for the neutral tone.
    pub tone: u8,
}

/// Common words whose reading differs from their characters' most common readings, in
/// tone-number pinyin (5 = neutral). Looked up inside every segmented word, longest first.
pub(crate) const WORDS: &[(&str, &str)] = &[
    ("银行", "yin2 hang2"),
    ("行长", "hang2 zhang3"),
    ("行业", "hang2 ye4"),
    ("一行", "yi4 hang2"),
    ("长大", "zhang3 da4"),
    ("成长", "cheng2 zhang3"),
    ("生长", "sheng1 zhang3"),
    ("校长", "xiao4 zhang3"),
    ("部长", "bu4 zhang3"),
    ("队长", "dui4 zhang3"),
    ("家长", "jia1 zhang3"),
    ("增长", "zeng1 zhang3"),
    ("长度", "chang2 du4"),
    ("音乐", "yin1 yue4"),
    ("乐器", "yue4 qi4"),
    ("还是", "hai2 shi4"),
    ("还有", "hai2 you3"),
    ("还要", "hai2 yao4"),
    ("还没", "hai2 mei2"),
    ("还在", "hai2 zai4"),
    ("还会", "hai2 hui4"),
    ("还可以", "hai2 ke3 yi3"),
    ("觉得", "jue2 de5"),
    ("睡觉", "shui4 jiao4"),
    ("午觉", "wu3 jiao4"),
    ("重要", "zhong4 yao4"),
    ("重新", "chong2 xin1"),
    ("重复", "chong2 fu4"),
    ("重庆", "chong2 qing4"),
    ("得到", "de2 dao4"),
    ("记得", "ji4 de5"),
    ("晓得", "xiao3 de5"),
    ("值得", "zhi2 de5"),
    ("懂得", "dong3 de5"),
    ("地方", "di4 fang5"),
    ("为了", "wei4 le5"),
    ("因为", "yin1 wei4"),
    ("为什么", "wei4 shen2 me5"),
    ("什么", "shen2 me5"),
    ("怎么", "zen3 me5"),
    ("那么", "na4 me5"),
    ("这么", "zhe4 me5"),
    ("多少", "duo1 shao5"),
    ("了解", "liao3 jie3"),
    ("便宜", "pian2 yi5"),
    ("头发", "tou2 fa5"),
    ("答应", "da1 ying5"),
    ("应该", "ying1 gai1"),
    ("大夫", "dai4 fu5"),
    ("空调", "kong1 tiao2"),
    ("调查", "diao4 cha2"),
    ("数学", "shu4 xue2"),
    ("数据", "shu4 ju4"),
    ("教室", "jiao4 shi4"),
    ("教育", "jiao4 yu4"),
    ("处理", "chu3 li3"),
    ("东西", "dong1 xi5"),
    ("朋友", "peng2 you5"),
    ("谢谢", "xie4 xie5"),
    ("先生", "xian1 sheng5"),
    ("知道", "zhi1 dao5"),
    ("明白", "ming2 bai5"),
    ("时候", "shi2 hou5"),
    ("意思", "yi4 si5"),
    ("事情", "shi4 qing5"),
    ("衣服", "yi1 fu5"),
    ("漂亮", "piao4 liang5"),
    ("喜欢", "xi3 huan5"),
    ("告诉", "gao4 su5"),
    ("休息", "xiu1 xi5"),
    ("客气", "ke4 qi5"),
    ("打算", "da3 suan5"),
    ("差不多", "cha4 bu5 duo1"),
    ("出差", "chu1 chai1"),
    ("首都", "shou3 du1"),
    ("睡着", "shui4 zhao2"),
    ("爱好", "ai4 hao4"),
    ("好奇", "hao4 qi2"),
    ("的确", "di2 que4"),
    ("目的", "mu4 di4"),
    ("一会儿", "yi2 hui4 er5"),
    ("哪里", "na3 li5"),
    ("这里", "zhe4 li5"),
    ("那里", "na4 li5"),
    ("我们", "wo3 men5"),
    ("你们", "ni3 men5"),
    ("他们", "ta1 men5"),
    ("她们", "ta1 men5"),
    ("咱们", "zan2 men5"),
    ("孩子", "hai2 zi5"),
    ("桌子", "zhuo1 zi5"),
    ("儿子", "er2 zi5"),
    ("妈妈", "ma1 ma5"),
    ("爸爸", "ba4 ba5"),
    ("哥哥", "ge1 ge5"),
    ("姐姐", "jie3 jie5"),
    ("弟弟", "di4 di5"),
    ("妹妹", "mei4 mei5"),
    ("看看", "kan4 kan5"),
    ("一下", "yi2 xia4"),
    ("快乐", "kuai4 le4"),
    ("只有", "zhi3 you3"),
    ("一只", "yi4 zhi1"),
    ("两只", "liang3 zhi1"),
    ("几只", "ji3 zhi1"),
    ("发现", "fa1 xian4"),
    ("方便", "fang1 bian4"),
    ("参加", "can1 jia1"),
    ("天气", "tian1 qi4"),
    ("要求", "yao1 qiu2"),
    ("音量", "yin1 liang4"),
    ("和平", "he2 ping2"),
    ("暖和", "nuan3 huo5"),
    ("中奖", "zhong4 jiang3"),
];

/// Readings of characters that stand alone as a word (a segment of one character) and there
/// usually read otherwise than their most common reading in compounds.
const ALONE: &[(char, &str)] = &[
    ('还', "hai2"),
    ('得', "de5"),
    ('地', "de5"),
    ('着', "zhe5"),
    ('了', "le5"),
    ('的', "de5"),
    ('吗', "ma5"),
    ('呢', "ne5"),
    ('吧', "ba5"),
    ('啊', "a5"),
    ('么', "me5"),
    ('为', "wei4"),
    ('和', "he2"),
    ('都', "dou1"),
    ('长', "chang2"),
    ('个', "ge4"),
    ('只', "zhi3"),
    ('没', "mei2"),
    ('给', "gei3"),
    ('要', "yao4"),
    ('会', "hui4"),
    ('说', "shuo1"),
];

/// Numerals after which 一 keeps its first tone (counting, 十一, 第一).
const NUMERALS: &str = "零一二三四五六七八九十两第";

/// Parses `zhong1` / `de5` / `de` (neutral) into a toneless syllable and tone.
fn parse_numbered(hanzi: char, numbered: &str) -> Syllable {
    let (pinyin, tone) = match numbered.chars().last().and_then(|c| c.to_digit(10)) {
        Some(t @ 1..=5) => (&numbered[..numbered.len() - 1], t as u8),
        Some(_) => (&numbered[..numbered.len() - 1], 5),
        None => (numbered, 5),
    };
    Syllable {
        hanzi,
        pinyin: pinyin.to_owned(),
        tone,
    }
}

/// Whether `c` is a CJK ideograph the front end reads.
pub fn is_hanzi(c: char) -> bool {
    matches!(c, '\u{4E00}'..='\u{9FFF}' | '\u{3400}'..='\u{4DBF}' | '\u{F900}'..='\u{FAFF}')
}

/// The syllables of one segmented word; a character without a known reading is `None`.
pub fn word(word: &str) -> Vec<Option<Syllable>> {
    let chars: Vec<char> = word.chars().collect();
    if let [c] = chars[..] {
        if let Some((_, numbered)) = ALONE.iter().find(|(a, _)| *a == c) {
            return vec![Some(parse_numbered(c, numbered))];
        }
    }
    let mut out = Vec::with_capacity(chars.len());
    let mut i = 0;
    'chars: while i < chars.len() {
        // The longest table word starting here wins.
        for len in (2..=4.min(chars.len() - i)).rev() {
            let piece: String = chars[i..i + len].iter().collect();
            if let Some((_, reading)) = WORDS.iter().find(|(w, _)| *w == piece) {
                let numbered: Vec<&str> = reading.split(' ').collect();
                if numbered.len() == len {
                    for (k, n) in numbered.iter().enumerate() {
                        out.push(Some(parse_numbered(chars[i + k], n)));
                    }
                    i += len;
                    continue 'chars;
                }
            }
        }
        let c = chars[i];
        out.push(
            c.to_pinyin()
                .map(|p| parse_numbered(c, p.with_tone_num_end())),
        );
        i += 1;
    }
    out
}

/// Applies 一/不 sandhi and third-tone sandhi in place over the words of one Hanzi run
/// (tones compared are the dictionary tones, before any change).
pub fn sandhi(words: &mut [Vec<Option<Syllable>>]) {
    // Flatten positions so 一/不 see the next syllable even across a word boundary.
    let positions: Vec<(usize, usize)> = words
        .iter()
        .enumerate()
        .flat_map(|(w, syls)| (0..syls.len()).map(move |s| (w, s)))
        .collect();
    let tone_at = |words: &[Vec<Option<Syllable>>], k: usize| -> Option<(char, u8)> {
        let &(w, s) = positions.get(k)?;
        words[w][s].as_ref().map(|syl| (syl.hanzi, syl.tone))
    };
    let original: Vec<Option<(char, u8)>> =
        (0..positions.len()).map(|k| tone_at(words, k)).collect();
    let mut new_tones: Vec<Option<u8>> = vec![None; positions.len()];
    for k in 0..positions.len() {
        let Some((hanzi, tone)) = original[k] else {
            continue;
        };
        let prev = k.checked_sub(1).and_then(|p| original[p]);
        let next = original.get(k + 1).copied().flatten();
        let (w, s) = positions[k];
        let next_in_word = s + 1 < words[w].len();
        match (hanzi, tone) {
            ('一', 1) => {
                let counted = prev.is_some_and(|(c, _)| NUMERALS.contains(c));
                let Some((next_c, next_tone)) = next else {
                    continue;
                };
                if counted || NUMERALS.contains(next_c) || "月日号".contains(next_c) {
                    continue;
                }
                // Closing a longer word (统一, 之一, 唯一) 一 keeps tone 1.
                if s > 0 && !next_in_word {
                    continue;
                }
                new_tones[k] = Some(if next_tone == 4 { 2 } else { 4 });
            }
            ('不', 4) if next.is_some_and(|(_, t)| t == 4) => {
                new_tones[k] = Some(2);
            }
            (_, 3) => {
                let Some((_, 3)) = next else {
                    continue;
                };
                // Inside a word always; across words when this is a one-syllable word.
                if next_in_word || words[w].len() == 1 {
                    new_tones[k] = Some(2);
                }
            }
            _ => {}
        }
    }
    for (k, tone) in new_tones.into_iter().enumerate() {
        if let Some(tone) = tone {
            let (w, s) = positions[k];
            if let Some(syl) = words[w][s].as_mut() {
                syl.tone = tone;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn numbered(words: &[Vec<Option<Syllable>>]) -> String {
        words
            .iter()
            .map(|w| {
                w.iter()
                    .map(|s| match s {
                        Some(s) => format!("{}{}", s.pinyin, s.tone),
                        None => "?".into(),
                    })
                    .collect::<Vec<_>>()
                    .join(" ")
            })
            .collect::<Vec<_>>()
            .join(" | ")
    }

    fn read(segmented: &[&str]) -> String {
        let mut words: Vec<_> = segmented.iter().map(|w| word(w)).collect();
        sandhi(&mut words);
        numbered(&words)
    }

    #[test]
    fn polyphones_in_common_words_take_the_word_reading() {
        assert_eq!(read(&["银行"]), "yin2 hang2");
        assert_eq!(read(&["长大"]), "zhang3 da4");
        assert_eq!(read(&["音乐"]), "yin1 yue4");
        assert_eq!(read(&["还是"]), "hai2 shi4");
        assert_eq!(read(&["觉得"]), "jue2 de5");
        assert_eq!(read(&["重要"]), "zhong4 yao4");
        assert_eq!(read(&["中国银行"]), "zhong1 guo2 yin2 hang2");
        assert_eq!(read(&["行"]), "xing2");
        assert_eq!(read(&["还"]), "hai2");
    }

    #[test]
    fn yi_and_bu_change_tone_before_other_tones() {
        assert_eq!(read(&["一个"]), "yi2 ge4");
        assert_eq!(read(&["一起"]), "yi4 qi3");
        assert_eq!(read(&["一天"]), "yi4 tian1");
        assert_eq!(read(&["不是"]), "bu2 shi4");
        assert_eq!(read(&["不好"]), "bu4 hao3");
        assert_eq!(read(&["第一"]), "di4 yi1");
        assert_eq!(read(&["十一"]), "shi2 yi1");
        assert_eq!(read(&["一月"]), "yi1 yue4");
        assert_eq!(read(&["统一"]), "tong3 yi1");
        assert_eq!(read(&["一百"]), "yi4 bai3");
    }

    #[test]
    fn third_tone_before_third_tone_becomes_second() {
        assert_eq!(read(&["你好"]), "ni2 hao3");
        assert_eq!(read(&["展览馆"]), "zhan2 lan2 guan3");
        assert_eq!(read(&["我", "想"]), "wo2 | xiang3");
        assert_eq!(read(&["我", "很", "好"]), "wo2 | hen2 | hao3");
        assert_eq!(read(&["老虎"]), "lao2 hu3");
    }

    #[test]
    fn unknown_characters_have_no_syllable() {
        assert_eq!(word("ab"), vec![None, None]);
    }
}
