//! Text normalisation for the Mandarin front end: numbers, decimals, percentages, dates, times,
//! ranges and common units written with digits and symbols become the Chinese words a speaker
//! says for them, so the rest of the front end only ever sees Hanzi, Latin words and
//! punctuation.
//!
//! The readings follow everyday Mandarin: cardinals with 万/亿 grouping (`10086` → 一万零八十六),
//! years and long digit strings (phone numbers, codes) digit by digit (`2024年` → 二零二四年),
//! `2` before a measure word as 两, `3.14` → 三点一四, `50%` → 百分之五十, `14:05` → 十四点零五分,
//! `2024-05-01` → 二零二四年五月一日, `3-5` → 三到五, `-5` → 负五, `25℃` → 二十五摄氏度.

const DIGITS: [char; 10] = ['零', '一', '二', '三', '四', '五', '六', '七', '八', '九'];

/// Measure words after which the number 2 is read 两 rather than 二.
const MEASURE_WORDS: &[&str] = &[
    "个", "位", "只", "件", "本", "张", "条", "次", "种", "点", "岁", "天", "年", "分钟", "小时",
    "斤", "公斤", "公里", "千米", "米", "块", "元", "杯", "瓶", "台", "辆", "双", "份", "家", "周",
    "倍", "层", "遍", "句", "首", "片",
];

/// Units written after a number → their Chinese reading, longest first.
const UNITS: &[(&str, &str)] = &[
    ("km/h", "公里每小时"),
    ("m/s", "米每秒"),
    ("km²", "平方公里"),
    ("m²", "平方米"),
    ("m³", "立方米"),
    ("°C", "摄氏度"),
    ("°F", "华氏度"),
    ("kWh", "千瓦时"),
    ("km", "公里"),
    ("kg", "公斤"),
    ("cm", "厘米"),
    ("mm", "毫米"),
    ("mg", "毫克"),
    ("ml", "毫升"),
    ("mL", "毫升"),
    ("kW", "千瓦"),
    ("Hz", "赫兹"),
    ("MB", "兆"),
    ("GB", "G"),
    ("℃", "摄氏度"),
    ("℉", "华氏度"),
    ("㎡", "平方米"),
    ("°", "度"),
    ("m", "米"),
    ("g", "克"),
    ("L", "升"),
    ("W", "瓦"),
    ("V", "伏"),
    ("h", "小时"),
    ("s", "秒"),
    ("元", "元"),
];

/// `text` with every number-like run replaced by its Chinese reading; other text unchanged.
pub fn normalize(text: &str) -> String {
    let chars: Vec<char> = text.chars().collect();
    let mut out = String::with_capacity(text.len() * 2);
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        if ascii_digit(c).is_some() {
            i = number_at(&chars, i, &mut out);
            continue;
        }
        let next_is_digit = chars.get(i + 1).is_some_and(|&n| ascii_digit(n).is_some());
        let prev_is_word = i > 0 && chars[i - 1].is_ascii_alphanumeric();
        if matches!(c, '-' | '−' | '－') && next_is_digit && !prev_is_word {
            out.push('负');
            i += 1;
            continue;
        }
        if c == '+' && next_is_digit && !prev_is_word {
            out.push('正');
            i += 1;
            continue;
        }
        out.push(c);
        i += 1;
    }
    out
}

/// Full-width digits count as digits.
fn ascii_digit(c: char) -> Option<u32> {
    match c {
        '0'..='9' => c.to_digit(10),
        '０'..='９' => Some(c as u32 - '０' as u32),
        _ => None,
    }
}

/// The run of digits starting at `i`: its value as a string of ASCII digits and its end.
fn digits(chars: &[char], i: usize) -> (String, usize) {
    let mut s = String::new();
    let mut j = i;
    while let Some(d) = chars.get(j).and_then(|&c| ascii_digit(c)) {
        s.push(char::from(b'0' + d as u8));
        j += 1;
    }
    (s, j)
}

fn at(chars: &[char], i: usize, s: &str) -> bool {
    (i..).zip(s.chars()).all(|(j, c)| chars.get(j) == Some(&c))
}

/// Reads the number-like run starting at digit `chars[i]` into `out`; returns where it ends.
fn number_at(chars: &[char], i: usize, out: &mut String) -> usize {
    let (first, end) = digits(chars, i);
    if let Some(end) = date_at(chars, &first, end, out) {
        return end;
    }
    if let Some(end) = time_at(chars, &first, end, out) {
        return end;
    }
    // Thousands separators: 1,000,000 (only groups of exactly three digits).
    let mut int = first;
    let mut end = end;
    while chars.get(end) == Some(&',') {
        let (group, next) = digits(chars, end + 1);
        if group.len() != 3 {
            break;
        }
        int.push_str(&group);
        end = next;
    }
    let mut frac = None;
    if matches!(chars.get(end), Some('.' | '．')) {
        let (f, next) = digits(chars, end + 1);
        if !f.is_empty() {
            frac = Some(f);
            end = next;
        }
    }
    let percent = matches!(chars.get(end), Some('%' | '％'));
    if percent {
        out.push_str("百分之");
        end += 1;
    }
    // A year: four digits before 年 are read digit by digit.
    let year = frac.is_none() && !percent && int.len() == 4 && chars.get(end) == Some(&'年');
    if year || (frac.is_none() && looks_like_code(&int)) {
        push_digits(&int, out);
    } else {
        let mut reading = cardinal(&int);
        let unit = unit_at(chars, end).map(|(reading, _)| reading);
        let measured = measure_word_at(chars, end)
            || unit.is_some_and(|u| MEASURE_WORDS.iter().any(|m| u.starts_with(m)));
        if frac.is_none() && !percent && int == "2" && measured {
            reading = "两".into();
        }
        out.push_str(&reading);
    }
    if let Some(f) = frac {
        out.push('点');
        push_digits(&f, out);
    }
    if percent {
        return end;
    }
    // Ranges: 3-5, 3~5 → 三到五.
    if matches!(chars.get(end), Some('-' | '~' | '～' | '–'))
        && chars
            .get(end + 1)
            .is_some_and(|&c| ascii_digit(c).is_some())
    {
        out.push('到');
        return end + 1;
    }
    match unit_at(chars, end) {
        Some((reading, after)) => {
            out.push_str(reading);
            after
        }
        None => end,
    }
}

/// The reading of a unit written right after a number at `end`, and where the unit ends.
fn unit_at(chars: &[char], end: usize) -> Option<(&'static str, usize)> {
    for &(unit, reading) in UNITS {
        if !at(chars, end, unit) {
            continue;
        }
        let after = end + unit.chars().count();
        // `5m` is a unit, `5min` or `5 mph` is not this unit: the unit must end the word.
        let ends_word = chars.get(after).is_none_or(|c| !c.is_ascii_alphabetic());
        if ends_word {
            return Some((reading, after));
        }
    }
    None
}

/// Whether a measure word that takes 两 follows at `i`.
fn measure_word_at(chars: &[char], i: usize) -> bool {
    MEASURE_WORDS.iter().any(|m| at(chars, i, m))
}

/// Long digit strings and strings with a leading zero (phone numbers, codes) are read digit by
/// digit.
fn looks_like_code(int: &str) -> bool {
    int.len() >= 9 || (int.len() > 1 && int.starts_with('0'))
}

/// `YYYY-MM-DD`, `YYYY/MM/DD` or `YYYY.MM.DD` → 年月日; `first` is the run at the start.
fn date_at(chars: &[char], first: &str, end: usize, out: &mut String) -> Option<usize> {
    if first.len() != 4 {
        return None;
    }
    let sep = *chars.get(end)?;
    if !matches!(sep, '-' | '/' | '.') {
        return None;
    }
    let (month, m_end) = digits(chars, end + 1);
    if month.is_empty() || month.len() > 2 || chars.get(m_end) != Some(&sep) {
        return None;
    }
    let (day, d_end) = digits(chars, m_end + 1);
    if day.is_empty() || day.len() > 2 {
        return None;
    }
    let (m, d) = (month.parse::<u32>().ok()?, day.parse::<u32>().ok()?);
    if !(1..=12).contains(&m) || !(1..=31).contains(&d) {
        return None;
    }
    push_digits(first, out);
    out.push('年');
    out.push_str(&cardinal(&m.to_string()));
    out.push('月');
    out.push_str(&cardinal(&d.to_string()));
    out.push('日');
    Some(d_end)
}

/// `H:MM` or `H:MM:SS` → 点/分/秒; `first` is the run at the start.
fn time_at(chars: &[char], first: &str, end: usize, out: &mut String) -> Option<usize> {
    if first.len() > 2 || !matches!(chars.get(end), Some(':' | '：')) {
        return None;
    }
    let (min, m_end) = digits(chars, end + 1);
    if min.len() != 2 {
        return None;
    }
    let h = first.parse::<u32>().ok()?;
    let m = min.parse::<u32>().ok()?;
    if h > 24 || m > 59 {
        return None;
    }
    let mut stop = m_end;
    let mut sec = None;
    if matches!(chars.get(m_end), Some(':' | '：')) {
        let (s, s_end) = digits(chars, m_end + 1);
        if s.len() == 2 {
            sec = s.parse::<u32>().ok().filter(|&s| s <= 59);
            if sec.is_some() {
                stop = s_end;
            }
        }
    }
    if h == 2 {
        out.push('两');
    } else {
        out.push_str(&cardinal(&h.to_string()));
    }
    out.push('点');
    if m > 0 || sec.is_some() {
        if m < 10 {
            out.push('零');
        }
        out.push_str(&cardinal(&m.to_string()));
        out.push('分');
    }
    if let Some(s) = sec {
        out.push_str(&cardinal(&s.to_string()));
        out.push('秒');
    }
    Some(stop)
}

/// Each digit of `s` as its Chinese digit.
fn push_digits(s: &str, out: &mut String) {
    for b in s.bytes() {
        out.push(DIGITS[usize::from(b - b'0')]);
    }
}

/// The cardinal reading of a string of ASCII digits (`10086` → 一万零八十六, `15` → 十五).
/// Numbers beyond 10^16 are read digit by digit.
pub fn cardinal(s: &str) -> String {
    let s = s.trim_start_matches('0');
    if s.is_empty() {
        return "零".into();
    }
    if s.len() > 16 {
        let mut out = String::new();
        push_digits(s, &mut out);
        return out;
    }
    // Groups of four digits from the right: units, 万, 亿, 万亿.
    let bytes = s.as_bytes();
    let groups: Vec<&[u8]> = {
        let mut g = Vec::new();
        let mut end = bytes.len();
        while end > 0 {
            let start = end.saturating_sub(4);
            g.push(&bytes[start..end]);
            end = start;
        }
        g.reverse();
        g
    };
    const BIG: [&str; 4] = ["", "万", "亿", "万亿"];
    let mut out = String::new();
    let mut zero_pending = false;
    for (gi, group) in groups.iter().enumerate() {
        let big = BIG[groups.len() - 1 - gi];
        let value: u32 = group.iter().fold(0, |v, &b| v * 10 + u32::from(b - b'0'));
        if value == 0 {
            zero_pending = !out.is_empty();
            continue;
        }
        if zero_pending || (!out.is_empty() && value < 1000) {
            out.push('零');
        }
        zero_pending = false;
        out.push_str(&group_reading(value, out.is_empty()));
        out.push_str(big);
    }
    out
}

/// The reading of 1..=9999; `leading` drops the 一 of 一十 (`15` → 十五, but `115` → 一百一十五).
fn group_reading(value: u32, leading: bool) -> String {
    const PLACES: [&str; 4] = ["千", "百", "十", ""];
    let digits = [value / 1000, value / 100 % 10, value / 10 % 10, value % 10];
    let mut out = String::new();
    let mut zero = false;
    for (k, &d) in digits.iter().enumerate() {
        if d == 0 {
            zero = !out.is_empty();
            continue;
        }
        if zero {
            out.push('零');
            zero = false;
        }
        if !(d == 1 && k == 2 && out.is_empty() && leading) {
            out.push(DIGITS[d as usize]);
        }
        out.push_str(PLACES[k]);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cardinals_group_by_wan_and_insert_ling() {
        assert_eq!(cardinal("0"), "零");
        assert_eq!(cardinal("7"), "七");
        assert_eq!(cardinal("10"), "十");
        assert_eq!(cardinal("15"), "十五");
        assert_eq!(cardinal("115"), "一百一十五");
        assert_eq!(cardinal("105"), "一百零五");
        assert_eq!(cardinal("1000"), "一千");
        assert_eq!(cardinal("2024"), "二千零二十四");
        assert_eq!(cardinal("10086"), "一万零八十六");
        assert_eq!(cardinal("100000"), "十万");
        assert_eq!(cardinal("120000000"), "一亿二千万");
        assert_eq!(cardinal("100000001"), "一亿零一");
        assert_eq!(cardinal("35000"), "三万五千");
    }

    #[test]
    fn numbers_in_sentences_are_read_out() {
        assert_eq!(normalize("我有3个苹果"), "我有三个苹果");
        assert_eq!(normalize("买2个"), "买两个");
        assert_eq!(normalize("一共12个"), "一共十二个");
        assert_eq!(normalize("圆周率是3.14"), "圆周率是三点一四");
        assert_eq!(normalize("增长了50%"), "增长了百分之五十");
        assert_eq!(normalize("降低3.5％"), "降低百分之三点五");
        assert_eq!(normalize("共1,000,000人"), "共一百万人");
        assert_eq!(normalize("零下-5度"), "零下负五度");
        assert_eq!(normalize("电话13800138000"), "电话一三八零零一三八零零零");
    }

    #[test]
    fn dates_and_times_are_read_as_dates_and_times() {
        assert_eq!(normalize("2024年5月1日"), "二零二四年五月一日");
        assert_eq!(normalize("2024-05-01"), "二零二四年五月一日");
        assert_eq!(normalize("2026/12/3"), "二零二六年十二月三日");
        assert_eq!(normalize("14:05出发"), "十四点零五分出发");
        assert_eq!(normalize("8:30"), "八点三十分");
        assert_eq!(normalize("2:00"), "两点");
        assert_eq!(normalize("10:20:30"), "十点二十分三十秒");
    }

    #[test]
    fn units_and_ranges_are_read_in_chinese() {
        assert_eq!(normalize("今天25℃"), "今天二十五摄氏度");
        assert_eq!(normalize("气温3-5°C"), "气温三到五摄氏度");
        assert_eq!(normalize("跑了5km"), "跑了五公里");
        assert_eq!(normalize("时速120km/h"), "时速一百二十公里每小时");
        assert_eq!(normalize("重2kg"), "重两公斤");
        assert_eq!(normalize("高180cm"), "高一百八十厘米");
        // A Latin word after a number is not a unit.
        assert_eq!(normalize("5 mph"), "五 mph");
        assert_eq!(normalize("3min"), "三min");
    }

    #[test]
    fn text_without_numbers_is_unchanged() {
        assert_eq!(normalize("你好，世界！Hello."), "你好，世界！Hello.");
        assert_eq!(normalize("COVID-19"), "COVID-十九");
    }
}
