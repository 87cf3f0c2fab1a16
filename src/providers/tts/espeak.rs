//! libespeak-ng over FFI: IPA phonemes for Piper, and direct synthesis for the languages the
//! Piper voice cannot speak (e.g. Mandarin, voice `cmn`).
//!
//! libespeak-ng keeps all its state in globals (selected voice, translator, output buffers)
//! and is not thread-safe. It is initialised once per process and every call goes through one
//! process-wide mutex. Only inference worker threads call into this module, never a shard: a
//! synthesis can hold the lock for tens of milliseconds, and that wait belongs on a core that
//! is allowed to block.
//!
//! Linking needs `libespeak-ng.so` (Debian: `libespeak-ng-dev`); running needs the shared
//! library and its data (`libespeak-ng1`, `espeak-ng-data`).

use std::ffi::{c_char, c_int, c_short, c_uint, c_void, CStr, CString};
use std::sync::{Mutex, MutexGuard, OnceLock, PoisonError};

use super::text::strip_language_flags;
use super::TtsError;

/// The longest audio one [`synthesize`] call returns (two minutes at 22050 Hz); synthesis is
/// aborted there, so a runaway input cannot grow the buffer without bound.
pub const MAX_SAMPLES: usize = 120 * 22_050;

// speak_lib.h constants (espeak-ng 1.51).
const AUDIO_OUTPUT_SYNCHRONOUS: c_int = 2;
const ESPEAK_INITIALIZE_DONT_EXIT: c_int = 0x8000;
const ESPEAK_CHARS_UTF8: c_int = 1;
const ESPEAK_PHONEMES_IPA: c_int = 0x02;
const POS_CHARACTER: c_int = 1;
const EE_OK: c_int = 0;
const EE_NOT_FOUND: c_int = 2;

/// `espeak_EVENT` from speak_lib.h; only `user_data` is read.
#[allow(dead_code)] // the layout must match C; the other fields are never read
#[repr(C)]
struct EspeakEvent {
    kind: c_int,
    unique_identifier: c_uint,
    text_position: c_int,
    length: c_int,
    audio_position: c_int,
    sample: c_int,
    user_data: *mut c_void,
    /// A union of `int`, `const char *` and `char[8]`: eight bytes, pointer-aligned.
    id: *const c_void,
}

type SynthCallback = extern "C" fn(*mut c_short, c_int, *mut EspeakEvent) -> c_int;

#[link(name = "espeak-ng")]
extern "C" {
    fn espeak_Initialize(
        output: c_int,
        buflength: c_int,
        path: *const c_char,
        options: c_int,
    ) -> c_int;
    fn espeak_SetSynthCallback(callback: SynthCallback);
    fn espeak_SetVoiceByName(name: *const c_char) -> c_int;
    fn espeak_TextToPhonemes(
        textptr: *mut *const c_void,
        textmode: c_int,
        phonememode: c_int,
    ) -> *const c_char;
    fn espeak_Synth(
        text: *const c_void,
        size: usize,
        position: c_uint,
        position_type: c_int,
        end_position: c_uint,
        flags: c_uint,
        unique_identifier: *mut c_uint,
        user_data: *mut c_void,
    ) -> c_int;
}

/// The library's process-wide state, reachable only through the mutex.
struct Espeak {
    sample_rate: u32,
    /// The voice last selected successfully, so repeated calls skip re-loading it.
    voice: String,
}

// A mutex, not shard-local state: libespeak-ng is one process-global C library, and only the
// TTS inference threads call it (never a shard executor), one synthesis at a time.
static ESPEAK: OnceLock<Result<Mutex<Espeak>, String>> = OnceLock::new();

/// Initialises libespeak-ng (once per process) and returns its output sample rate (22050 Hz).
pub fn init() -> Result<u32, TtsError> {
    Ok(lock()?.sample_rate)
}

/// The sample rate of [`synthesize`]'s output.
pub fn sample_rate() -> Result<u32, TtsError> {
    init()
}

/// IPA phonemes of `text` read with espeak-ng voice `voice` (e.g. "en-us"), as one string;
/// espeak-ng's own clause pieces are joined with spaces and language-switch markers removed.
pub fn phonemize(voice: &str, text: &str) -> Result<String, TtsError> {
    let text = c_string(text)?;
    let mut espeak = lock()?;
    espeak.select(voice)?;
    let mut out = String::new();
    let mut cursor = text.as_ptr().cast::<c_void>();
    while !cursor.is_null() {
        // SAFETY: the library is initialised and we hold its lock; `cursor` points into `text`
        // (NUL-terminated, alive until the end of this function) and espeak-ng advances it
        // within that string or sets it to NULL at the end.
        let piece =
            unsafe { espeak_TextToPhonemes(&mut cursor, ESPEAK_CHARS_UTF8, ESPEAK_PHONEMES_IPA) };
        if piece.is_null() {
            break;
        }
        // SAFETY: a non-NULL result is a NUL-terminated string in espeak-ng's static buffer,
        // valid until the next call; it is copied before that.
        let piece = unsafe { CStr::from_ptr(piece) }.to_string_lossy();
        let piece = piece.trim();
        if !piece.is_empty() {
            if !out.is_empty() {
                out.push(' ');
            }
            out.push_str(piece);
        }
    }
    Ok(strip_language_flags(&out))
}

/// Speech for `text` read with voice `voice` (e.g. "cmn", "en-us"): mono 16-bit PCM at
/// [`sample_rate`], at most [`MAX_SAMPLES`] samples.
pub fn synthesize(voice: &str, text: &str) -> Result<Vec<i16>, TtsError> {
    let text = c_string(text)?;
    let mut espeak = lock()?;
    espeak.select(voice)?;
    let mut sink = Sink {
        pcm: Vec::new(),
        truncated: false,
    };
    let bytes = text.as_bytes_with_nul();
    // SAFETY: initialised and locked; `bytes` is NUL-terminated UTF-8 alive for the call. In
    // AUDIO_OUTPUT_SYNCHRONOUS mode the callback runs on this thread before `espeak_Synth`
    // returns, so `sink` outlives every use of the pointer passed as user data.
    let status = unsafe {
        espeak_Synth(
            bytes.as_ptr().cast(),
            bytes.len(),
            0,
            POS_CHARACTER,
            0,
            ESPEAK_CHARS_UTF8 as c_uint,
            std::ptr::null_mut(),
            (&mut sink as *mut Sink).cast(),
        )
    };
    if status != EE_OK && !sink.truncated {
        return Err(TtsError::Espeak(format!("espeak_Synth returned {status}")));
    }
    if sink.truncated {
        tracing::warn!(
            samples = sink.pcm.len(),
            "espeak-ng output cut at the length limit"
        );
    }
    Ok(sink.pcm)
}

/// The espeak-ng voice that actually reads `voice`'s language. Debian's espeak-ng 1.51 `cmn`
/// voice turns Hanzi into tone-numbered pinyin and then reads that Latin text as *English*
/// ("你好" comes out as "nee three hay-oh three"); `cmn-latn-pinyin` reads the same pinyin as
/// Mandarin with tones, so the Mandarin names are mapped to it. Other names pass unchanged.
pub fn resolve_voice(voice: &str) -> &str {
    match voice {
        "cmn" | "zh" | "zh-cmn" | "cmn-latn" => "cmn-latn-pinyin",
        other => other,
    }
}

impl Espeak {
    fn select(&mut self, voice: &str) -> Result<(), TtsError> {
        let voice = resolve_voice(voice);
        if self.voice == voice {
            return Ok(());
        }
        let name = c_string(voice)?;
        // SAFETY: initialised and locked; `name` is NUL-terminated.
        let status = unsafe { espeak_SetVoiceByName(name.as_ptr()) };
        match status {
            EE_OK => {
                voice.clone_into(&mut self.voice);
                Ok(())
            }
            EE_NOT_FOUND => Err(TtsError::UnknownVoice(voice.to_owned())),
            other => Err(TtsError::Espeak(format!(
                "espeak_SetVoiceByName({voice:?}) returned {other}"
            ))),
        }
    }
}

/// Where the synthesis callback appends audio.
struct Sink {
    pcm: Vec<i16>,
    truncated: bool,
}

/// Receives audio from `espeak_Synth`; returns 1 (abort) once [`MAX_SAMPLES`] is reached.
extern "C" fn collect(wav: *mut c_short, samples: c_int, events: *mut EspeakEvent) -> c_int {
    if wav.is_null() || samples <= 0 || events.is_null() {
        return 0;
    }
    // SAFETY: espeak-ng passes an event list with at least the terminating entry, whose
    // `user_data` is the pointer given to `espeak_Synth`: a live `Sink` (see `synthesize`).
    let sink = unsafe { (*events).user_data }.cast::<Sink>();
    if sink.is_null() {
        return 0;
    }
    // SAFETY: as above; nothing else touches the sink while `espeak_Synth` runs.
    let sink = unsafe { &mut *sink };
    // SAFETY: `wav` holds `samples` samples for the duration of this call.
    let wav = unsafe { std::slice::from_raw_parts(wav, samples as usize) };
    let room = MAX_SAMPLES.saturating_sub(sink.pcm.len());
    sink.pcm.extend_from_slice(&wav[..wav.len().min(room)]);
    if wav.len() > room {
        sink.truncated = true;
        return 1;
    }
    0
}

fn lock() -> Result<MutexGuard<'static, Espeak>, TtsError> {
    match ESPEAK.get_or_init(initialise) {
        Ok(m) => Ok(m.lock().unwrap_or_else(PoisonError::into_inner)),
        Err(e) => Err(TtsError::EspeakInit(e.clone())),
    }
}

fn initialise() -> Result<Mutex<Espeak>, String> {
    // SAFETY: runs once per process (inside `OnceLock::get_or_init`) before any other call.
    // DONT_EXIT makes a missing data directory an error return instead of `exit()`.
    let rate = unsafe {
        espeak_Initialize(
            AUDIO_OUTPUT_SYNCHRONOUS,
            0,
            std::ptr::null(),
            ESPEAK_INITIALIZE_DONT_EXIT,
        )
    };
    if rate <= 0 {
        return Err(format!(
            "espeak_Initialize returned {rate} (is espeak-ng-data installed?)"
        ));
    }
    // SAFETY: initialised; `collect` matches `t_espeak_callback`.
    unsafe { espeak_SetSynthCallback(collect) };
    tracing::info!(sample_rate = rate, "espeak-ng initialised");
    Ok(Mutex::new(Espeak {
        sample_rate: rate as u32,
        voice: String::new(),
    }))
}

fn c_string(s: &str) -> Result<CString, TtsError> {
    CString::new(s).map_err(|_| TtsError::Espeak("text contains a NUL byte".into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn english_phonemes_are_ipa() {
        let ipa = phonemize("en-us", "Hello world").expect("phonemize");
        assert!(ipa.contains('ˈ'), "stress marks expected: {ipa}");
        assert!(ipa.starts_with("h"), "{ipa}");
        assert!(ipa.contains("wˈɜːld"), "{ipa}");
    }

    #[test]
    fn mandarin_is_read_with_tones_not_as_english_digits() {
        let ipa = phonemize("cmn", "你好").expect("phonemize");
        assert!(!ipa.contains('θ'), "\"three\" read in English: {ipa}");
        assert!(ipa.starts_with("nˈi") && ipa.contains('χ'), "{ipa}");
    }

    #[test]
    fn unknown_voice_is_an_error_and_the_engine_stays_usable() {
        let err = synthesize("no-such-voice", "hello").unwrap_err();
        assert!(matches!(err, TtsError::UnknownVoice(_)), "{err}");
        assert!(!synthesize("en-us", "hello").expect("synth").is_empty());
    }

    #[test]
    fn nul_in_text_is_an_error_not_a_panic() {
        assert!(phonemize("en-us", "a\0b").is_err());
    }

    #[test]
    fn calls_from_many_threads_are_serialised() {
        let threads: Vec<_> = (0..4)
            .map(|i| {
                std::thread::spawn(move || {
                    let voice = if i % 2 == 0 { "en-us" } else { "cmn" };
                    (0..5)
                        .map(|_| synthesize(voice, "one two").map(|p| p.len()))
                        .collect::<Result<Vec<_>, _>>()
                })
            })
            .collect();
        // espeak-ng is not sample-exact from call to call (and a voice's output shifts a few
        // percent after another voice was used), so lengths are compared with a tolerance.
        for t in threads {
            let lens = t.join().expect("thread").expect("synthesis");
            let (lo, hi) = (
                lens.iter().min().unwrap_or(&0),
                lens.iter().max().unwrap_or(&0),
            );
            assert!(*lo > 0 && *hi * 10 < *lo * 11, "{lens:?}");
        }
    }
}
