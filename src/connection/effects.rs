//! Carrying out what a session asks for, on its shard's [`Providers`]: a VAD, ASR or TTS job
//! for the inference cores, or a remote call on this shard (recognition, speech, the LLM stream
//! and its cancellation). A job a queue refuses comes back to the session as an event (an error
//! result, or [`Session::on_vad_refused`]), so its effects are handled like any other.
//!
//! Remote calls run as tasks on the shard and post their result to the session's mailbox. The
//! LLM stream writes into a small buffer and posts one coalesced notification at a time, so a
//! fast stream cannot flood the mailbox; dropping the [`Runner`] cancels the stream.

use std::cell::RefCell;
use std::rc::Rc;
use std::time::Instant;

use shards::Mailbox;

use crate::providers::asr::openai::transcribe;
use crate::providers::asr::wav::wav_bytes;
use crate::providers::asr::AsrJob;
use crate::providers::llm::openai::{stream_chat, LlmEvent};
use crate::providers::llm::ToolCall;
use crate::providers::select::{Asr, Llm, Tts};
use crate::providers::tts::openai::speech;
use crate::providers::tts::TtsJob;
use crate::providers::Providers;
use crate::session::dialogue::Request;
use crate::session::{Effects, Session, SessionEvent};

/// Runs one session's requests; owns its LLM stream (cancelled on drop).
pub struct Runner {
    shard: usize,
    providers: Rc<Providers>,
    mailbox: Rc<Mailbox<SessionEvent>>,
    llm: Rc<RefCell<LlmBuffer>>,
    llm_task: Option<glommio::task::JoinHandle<()>>,
}

impl Drop for Runner {
    fn drop(&mut self) {
        self.cancel_llm();
    }
}

/// Where a session's LLM stream task leaves text for the session (one pending notification at
/// a time).
#[derive(Default)]
struct LlmBuffer {
    turn: u32,
    text: String,
    done: Option<Result<Vec<ToolCall>, String>>,
    notified: bool,
}

impl LlmBuffer {
    fn notify(&mut self, mailbox: &Mailbox<SessionEvent>) {
        if !self.notified {
            self.notified = true;
            mailbox.push_control(SessionEvent::LlmReady { turn: self.turn });
        }
    }
}

impl Runner {
    /// A runner for the session whose inbox is `mailbox`, on shard `shard`.
    pub fn new(
        shard: usize,
        providers: Rc<Providers>,
        mailbox: Rc<Mailbox<SessionEvent>>,
    ) -> Runner {
        Runner {
            shard,
            providers,
            mailbox,
            llm: Rc::new(RefCell::new(LlmBuffer::default())),
            llm_task: None,
        }
    }

    /// Hands everything `fx` asks for to the providers; returns what is left for the device
    /// (its messages and latency samples, plus those of any refusal the session handled).
    pub fn settle(&mut self, session: &mut Session, mut fx: Effects, now: Instant) -> Effects {
        let mut done = Effects::default();
        loop {
            let vad = fx.vad.take();
            let requests = std::mem::take(&mut fx.requests);
            done.merge(fx);
            fx = Effects::default();
            if let Some(job) = vad {
                if let Err((_, job)) = self.providers.vad.submit(session.key, self.shard, job) {
                    fx.merge(session.on_vad_refused(job, now));
                }
            }
            for request in requests {
                if let Some(refused) = self.start(request, session.key, now) {
                    fx.merge(refused.deliver(session, now));
                }
            }
            if fx.vad.is_none() && fx.requests.is_empty() {
                done.merge(fx);
                return done;
            }
        }
    }

    /// Turns a mailbox event into the session's effects (LLM notifications read the stream
    /// buffer; the rest go to the session as they are).
    pub fn on_event(
        &mut self,
        session: &mut Session,
        event: SessionEvent,
        now: Instant,
    ) -> Effects {
        match event {
            SessionEvent::LlmReady { turn } => {
                let (text, done) = {
                    let mut b = self.llm.borrow_mut();
                    b.notified = false;
                    if b.turn == turn {
                        (std::mem::take(&mut b.text), b.done.take())
                    } else {
                        (String::new(), None)
                    }
                };
                session.on_llm(turn, &text, done, now)
            }
            other => session.on_event(other, now),
        }
    }

    fn cancel_llm(&mut self) {
        if let Some(task) = self.llm_task.take() {
            task.cancel();
        }
    }

    /// Starts one request; a refused job is returned to be delivered to the session.
    fn start(&mut self, request: Request, key: u64, now: Instant) -> Option<Refused> {
        match request {
            Request::Asr { turn, pcm } => match &self.providers.asr {
                Asr::Local(pool) => {
                    let job = AsrJob {
                        session: key,
                        turn,
                        pcm,
                        submitted: now,
                    };
                    pool.submit(key, self.shard, job)
                        .err()
                        .map(|_| Refused::Asr { turn })
                }
                Asr::Remote(settings) => {
                    let (client, settings) = (self.providers.http.clone(), settings.clone());
                    let mailbox = self.mailbox.clone();
                    glommio::spawn_local(async move {
                        let wav = wav_bytes(&pcm, 16_000);
                        let result = transcribe(&client, &settings, wav)
                            .await
                            .map_err(|e| e.to_string());
                        mailbox.push_control(SessionEvent::Asr { turn, result });
                    })
                    .detach();
                    None
                }
            },
            Request::Llm {
                turn,
                messages,
                tools,
            } => {
                let Llm::Remote(settings) = &self.providers.llm else {
                    // The offline responder answers inside the session; it never asks.
                    return None;
                };
                *self.llm.borrow_mut() = LlmBuffer {
                    turn,
                    ..LlmBuffer::default()
                };
                let (client, settings) = (self.providers.http.clone(), settings.clone());
                let (mailbox, buffer) = (self.mailbox.clone(), self.llm.clone());
                let task = glommio::spawn_local(async move {
                    let result =
                        stream_chat(&client, &settings, &messages, tools.as_deref(), |event| {
                            if let LlmEvent::Text(t) = event {
                                let mut b = buffer.borrow_mut();
                                b.text.push_str(&t);
                                b.notify(&mailbox);
                            }
                        })
                        .await;
                    let mut b = buffer.borrow_mut();
                    b.done = Some(result.map(|s| s.tool_calls).map_err(|e| e.to_string()));
                    b.notify(&mailbox);
                });
                self.llm_task = Some(task.detach());
                None
            }
            Request::CancelLlm => {
                self.cancel_llm();
                None
            }
            Request::Tts { turn, seq, text } => match &self.providers.tts {
                Tts::Local { pool, voices } => {
                    let job = TtsJob {
                        session: key,
                        turn,
                        seq,
                        engine: voices.engine_for(&text),
                        text,
                        submitted: now,
                    };
                    pool.submit(key, self.shard, job)
                        .err()
                        .map(|_| Refused::Tts { turn, seq })
                }
                Tts::Remote(settings) => {
                    let (client, settings) = (self.providers.http.clone(), settings.clone());
                    let mailbox = self.mailbox.clone();
                    glommio::spawn_local(async move {
                        let result = speech(&client, &settings, &text)
                            .await
                            .map_err(|e| e.to_string());
                        mailbox.push_control(SessionEvent::Tts { turn, seq, result });
                    })
                    .detach();
                    None
                }
            },
        }
    }
}

/// A job a full inference queue refused.
enum Refused {
    Asr { turn: u32 },
    Tts { turn: u32, seq: u32 },
}

impl Refused {
    fn deliver(self, session: &mut Session, now: Instant) -> Effects {
        match self {
            Refused::Asr { turn } => {
                session.on_asr_result(turn, Err("speech recognition queue is full".into()), now)
            }
            Refused::Tts { turn, seq } => {
                session.on_tts_result(turn, seq, Err("speech synthesis queue is full".into()), now)
            }
        }
    }
}
