//! Built-in intents that need no LLM: exit phrases (end the session politely), wake words
//! (greet), and simple device commands the offline responder carries out with device tools
//! ("volume up", "set the volume to 50", "音量调到50"). Pure functions over the transcript.

/// Device tool that sets the speaker volume (firmware common tool).
pub const SET_VOLUME_TOOL: &str = "self.audio_speaker.set_volume";
/// Device tool that reports the device status, including `audio_speaker.volume`.
pub const STATUS_TOOL: &str = "self.get_device_status";
/// Legacy IoT thing that plays sound (old firmware's `Speaker`, method `SetVolume{volume}`,
/// property `volume`).
pub const IOT_SPEAKER: &str = "Speaker";
/// Its method that sets the volume.
pub const IOT_SET_VOLUME: &str = "SetVolume";
/// Volume change of "louder" / "quieter".
const VOLUME_STEP: i32 = 10;

/// The tools the offline responder uses for volume commands, by a name [`super::ToolSet::resolve`]
/// accepts: the device's MCP tools when it has them, else its legacy IoT `Speaker`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VolumeTools {
    /// Sets the volume (arguments `{"volume": n}`).
    pub set: Option<String>,
    /// Reports the current volume (see [`volume_in_status`]).
    pub status: Option<String>,
}

/// Phrases compared after [`normalise_phrase`].
#[derive(Debug, Clone, Default)]
pub struct Intents {
    exit: Vec<String>,
    wake: Vec<String>,
}

impl Intents {
    /// Intents for these exit phrases and wake words (as configured).
    pub fn new(exit_phrases: &[String], wake_words: &[String]) -> Intents {
        let norm = |v: &[String]| {
            v.iter()
                .map(|p| normalise_phrase(p))
                .filter(|p| !p.is_empty())
                .collect()
        };
        Intents {
            exit: norm(exit_phrases),
            wake: norm(wake_words),
        }
    }

    /// The whole utterance is an exit phrase.
    pub fn is_exit(&self, text: &str) -> bool {
        let t = normalise_phrase(text);
        !t.is_empty() && self.exit.contains(&t)
    }

    /// The text is a wake word.
    pub fn is_wake_word(&self, text: &str) -> bool {
        let t = normalise_phrase(text);
        !t.is_empty() && self.wake.contains(&t)
    }
}

/// Lower case, punctuation removed, words separated by one space (CJK kept as is).
pub fn normalise_phrase(text: &str) -> String {
    let mut out = String::new();
    for c in text.chars() {
        if c.is_alphanumeric() {
            out.extend(c.to_lowercase());
        } else if (c.is_whitespace() || c == '-') && !out.is_empty() && !out.ends_with(' ') {
            out.push(' ');
        }
    }
    out.trim_end().to_string()
}

/// Whether the text is Chinese (contains a CJK ideograph).
pub fn is_chinese(text: &str) -> bool {
    crate::lang::has_cjk(text)
}

/// The spoken farewell before an exit.
pub fn farewell(zh: bool) -> &'static str {
    if zh {
        "好的，再见！"
    } else {
        "Goodbye! Talk to you soon."
    }
}

/// A device command the offline responder understands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceCommand {
    /// Set the speaker volume to this value (0–100).
    SetVolume(u8),
    /// Change the speaker volume by this much (needs the current volume first).
    ChangeVolume(i32),
}

/// The device command in `text`, if it is one.
pub fn device_command(text: &str) -> Option<DeviceCommand> {
    if is_chinese(text) {
        return device_command_zh(text);
    }
    let t = format!(" {} ", normalise_phrase(text));
    let has = |words: &[&str]| words.iter().any(|w| t.contains(&format!(" {w} ")));
    let about_volume = has(&["volume", "sound"]);
    if has(&["mute", "silence"]) && !has(&["unmute"]) {
        return Some(DeviceCommand::SetVolume(0));
    }
    if about_volume {
        if let Some(n) = number_in(&t) {
            return Some(DeviceCommand::SetVolume(n.min(100) as u8));
        }
    }
    let up =
        has(&["louder"]) || (about_volume && has(&["up", "increase", "raise", "higher", "more"]));
    let down = has(&["quieter", "softer"])
        || (about_volume && has(&["down", "decrease", "lower", "reduce", "less"]));
    match (up, down) {
        (true, false) => Some(DeviceCommand::ChangeVolume(VOLUME_STEP)),
        (false, true) => Some(DeviceCommand::ChangeVolume(-VOLUME_STEP)),
        _ => None,
    }
}

fn device_command_zh(text: &str) -> Option<DeviceCommand> {
    let has = |words: &[&str]| words.iter().any(|w| text.contains(w));
    if has(&["静音"]) {
        return Some(DeviceCommand::SetVolume(0));
    }
    let about_volume = has(&["音量", "声音"]);
    if about_volume {
        let digits: String = text
            .chars()
            .skip_while(|c| !c.is_ascii_digit())
            .take_while(char::is_ascii_digit)
            .collect();
        if let Ok(n) = digits.parse::<u32>() {
            return Some(DeviceCommand::SetVolume(n.min(100) as u8));
        }
    }
    if has(&["大声", "大一点", "大点", "调大", "调高", "高一点", "增大"])
        && (about_volume || has(&["大声"]))
    {
        return Some(DeviceCommand::ChangeVolume(VOLUME_STEP));
    }
    if has(&["小声", "小一点", "小点", "调小", "调低", "低一点", "减小"])
        && (about_volume || has(&["小声"]))
    {
        return Some(DeviceCommand::ChangeVolume(-VOLUME_STEP));
    }
    None
}

/// The first number in normalised English words: digits ("50", "50 percent") or number
/// words up to one hundred ("fifty", "thirty five").
fn number_in(t: &str) -> Option<u32> {
    const UNITS: [&str; 20] = [
        "zero",
        "one",
        "two",
        "three",
        "four",
        "five",
        "six",
        "seven",
        "eight",
        "nine",
        "ten",
        "eleven",
        "twelve",
        "thirteen",
        "fourteen",
        "fifteen",
        "sixteen",
        "seventeen",
        "eighteen",
        "nineteen",
    ];
    const TENS: [&str; 8] = [
        "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety",
    ];
    let words: Vec<&str> = t.split_whitespace().collect();
    for (i, w) in words.iter().enumerate() {
        if let Ok(n) = w.trim_end_matches('%').parse::<u32>() {
            return Some(n);
        }
        if *w == "hundred" {
            return Some(100);
        }
        if let Some(u) = UNITS.iter().position(|x| x == w) {
            return Some(u as u32);
        }
        if let Some(t) = TENS.iter().position(|x| x == w) {
            let tens = 20 + 10 * t as u32;
            let unit = words
                .get(i + 1)
                .and_then(|n| UNITS[1..10].iter().position(|x| x == n))
                .map_or(0, |u| u as u32 + 1);
            return Some(tens + unit);
        }
    }
    None
}

/// The current volume in a `self.get_device_status` result (`{"audio_speaker":{"volume":70},…}`)
/// or in a legacy IoT `Speaker` state (`{"volume":70}`).
pub fn volume_in_status(text: &str) -> Option<u8> {
    let v: serde_json::Value = serde_json::from_str(text).ok()?;
    let n = v
        .pointer("/audio_speaker/volume")
        .or_else(|| v.get("volume"))?
        .as_f64()
        .filter(|n| n.is_finite())?;
    Some(n.clamp(0.0, 100.0).round() as u8)
}

/// The spoken confirmation of a volume change.
pub fn volume_set(volume: u8, zh: bool) -> String {
    if zh {
        format!("好的，音量已调到{volume}。")
    } else {
        format!("OK, the volume is now {volume}.")
    }
}

/// The spoken apology when the device could not carry out a command.
pub fn command_failed(zh: bool) -> &'static str {
    if zh {
        "抱歉，设备没有完成这个操作。"
    } else {
        "Sorry, the device could not do that."
    }
}

/// The spoken answer when the device has no volume tool.
pub fn no_volume_tool(zh: bool) -> &'static str {
    if zh {
        "抱歉，这个设备没有我能调节的音量。"
    } else {
        "Sorry, this device has no volume control I can reach."
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn volume_commands_in_english() {
        use DeviceCommand::*;
        for (text, cmd) in [
            ("Set the volume to 50.", Some(SetVolume(50))),
            ("set volume to fifty", Some(SetVolume(50))),
            ("Volume thirty five please", Some(SetVolume(35))),
            ("volume 120", Some(SetVolume(100))),
            ("Turn the volume up.", Some(ChangeVolume(10))),
            ("louder", Some(ChangeVolume(10))),
            ("Volume down!", Some(ChangeVolume(-10))),
            ("a bit quieter please", Some(ChangeVolume(-10))),
            ("mute", Some(SetVolume(0))),
            ("what is the weather like", None),
            ("turn up the heat", None),
            ("give me 5 reasons", None),
        ] {
            assert_eq!(device_command(text), cmd, "{text}");
        }
    }

    #[test]
    fn volume_commands_in_chinese() {
        use DeviceCommand::*;
        assert_eq!(device_command("把音量调到30"), Some(SetVolume(30)));
        assert_eq!(device_command("声音大一点"), Some(ChangeVolume(10)));
        assert_eq!(device_command("小声点"), Some(ChangeVolume(-10)));
        assert_eq!(device_command("静音"), Some(SetVolume(0)));
        assert_eq!(device_command("今天天气怎么样"), None);
    }

    #[test]
    fn exit_and_wake_phrases_match_whole_utterances_only() {
        let i = Intents::new(
            &["Goodbye".into(), "退出".into()],
            &["你好小智".into(), "Hi, Xiaozhi".into()],
        );
        assert!(i.is_exit("goodbye!"));
        assert!(i.is_exit("  退出。"));
        assert!(!i.is_exit("goodbye to all that"));
        assert!(i.is_wake_word("hi xiaozhi"));
        assert!(i.is_wake_word("你好，小智"));
        assert!(!i.is_wake_word("hi"));
        assert!(!i.is_exit(""));
    }

    #[test]
    fn status_volume_is_read() {
        assert_eq!(
            volume_in_status(r#"{"audio_speaker":{"volume":70}}"#),
            Some(70)
        );
        assert_eq!(
            volume_in_status(r#"{"volume":40.0,"muted":false}"#),
            Some(40)
        );
        assert_eq!(volume_in_status(r#"{"volume":"loud"}"#), None);
        assert_eq!(volume_in_status("{}"), None);
        assert_eq!(volume_in_status("not json"), None);
    }
}
