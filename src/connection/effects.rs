//! Carrying out what a session asks for, on its shard's [`Providers`]: a VAD job gathered for the
//! shard's next tick (`crate::shard::vad_tick`), an ASR or TTS job for the inference cores, or a remote call on this shard (recognition, speech, the LLM stream
//! and its cancellation). A job a queue refuses comes back to the session as an event (an error
//! result, or [`Session::on_vad_refused`]), so its effects are handled like any other.
//!
//! Remote calls run as tasks on the shard and post their result to the session's mailbox. The
//! LLM stream writes into a small buffer and posts one coalesced notification at a time, so a
//! fast stream cannot flood the mailbox; dropping the [`Runner`] cancels the stream.
//!
//! Cancellation ([`Request::CancelJobs`], sent when a turn ends with jobs outstanding): local
//! jobs are cancelled on their worker pools (the workers skip them and answer "cancelled");
//! remote recognition and synthesis calls of those turns are dropped here, and the runner
//! answers them "cancelled" itself, so every request the session made gets one answer and its
//! quota stays exact. The runner holds at most [`JOBS_PER_KIND`] remote calls of each kind
//! (should the session ask for more, the oldest is dropped). Dropping the runner (the
//! connection closed) drops every remote call and cancels the session's queued local jobs.
//! A VAD job still gathered when its session closes, or when the session sends the next one
//! (its turn ended and forgot the old one), is withdrawn before the tick and counted
//! (`xiaozhi_vad_jobs_withdrawn_total`); one already sent runs and its stale result is dropped.

use std::cell::RefCell;
use std::rc::Rc;
use std::time::Instant;

use shards::Mailbox;

use crate::providers::asr::openai::transcribe;
use crate::providers::asr::wav::wav_bytes;
use crate::providers::asr::AsrJob;
use crate::providers::llm::openai::{stream_chat, LlmEvent};
use crate::providers::llm::ToolCall;
use crate::providers::reply::CANCELLED;
use crate::providers::select::{Asr, Llm, Tts};
use crate::providers::tts::openai::speech;
use crate::providers::tts::TtsJob;
use crate::providers::Providers;
use crate::session::dialogue::{Request, JOBS_PER_KIND};
use crate::session::{Effects, Session, SessionEvent};

/// Runs one session's requests; owns its LLM stream and remote calls (cancelled on drop).
pub struct Runner {
    shard: usize,
    key: u64,
    providers: Rc<Providers>,
    mailbox: Rc<Mailbox<SessionEvent>>,
    llm: Rc<RefCell<LlmBuffer>>,
    llm_task: Option<glommio::task::JoinHandle<()>>,
    /// Remote recognition and synthesis calls not yet answered, oldest first.
    remote: Vec<RemoteCall>,
    /// Remote calls dropped because their turn ended (added to the session's counters).
    remote_cancelled: u64,
}

/// A remote call in progress: which job it is and its task.
struct RemoteCall {
    job: RemoteJob,
    task: glommio::task::JoinHandle<()>,
}

/// Which answer a remote call owes the session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RemoteJob {
    Asr { turn: u32 },
    Tts { turn: u32, seq: u32 },
}

impl RemoteJob {
    fn turn(self) -> u32 {
        match self {
            RemoteJob::Asr { turn } | RemoteJob::Tts { turn, .. } => turn,
        }
    }

    fn same_kind(self, other: RemoteJob) -> bool {
        matches!(
            (self, other),
            (RemoteJob::Asr { .. }, RemoteJob::Asr { .. })
                | (RemoteJob::Tts { .. }, RemoteJob::Tts { .. })
        )
    }

    /// The "cancelled" answer of this job.
    fn cancelled(self) -> SessionEvent {
        match self {
            RemoteJob::Asr { turn } => SessionEvent::Asr {
                turn,
                result: Err(CANCELLED.into()),
            },
            RemoteJob::Tts { turn, seq } => SessionEvent::Tts {
                turn,
                seq,
                result: Err(CANCELLED.into()),
            },
        }
    }
}

impl Drop for Runner {
    fn drop(&mut self) {
        self.cancel_llm();
        // The session's VAD job, if still gathered for the next tick, is not sent.
        let key = self.key;
        self.providers.vad.remove(|j| j.session == key);
        for call in self.remote.drain(..) {
            call.task.cancel();
        }
        if let Asr::Local(pool) = &self.providers.asr {
            pool.cancel_all(self.key, self.shard);
        }
        if let Tts::Local { pool, .. } = &self.providers.tts {
            pool.cancel_all(self.key, self.shard);
        }
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
    /// A runner for session `key`, whose inbox is `mailbox`, on shard `shard`.
    pub fn new(
        shard: usize,
        key: u64,
        providers: Rc<Providers>,
        mailbox: Rc<Mailbox<SessionEvent>>,
    ) -> Runner {
        Runner {
            shard,
            key,
            providers,
            mailbox,
            llm: Rc::new(RefCell::new(LlmBuffer::default())),
            llm_task: None,
            remote: Vec::new(),
            remote_cancelled: 0,
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
                // A job of this session still gathered is stale (a session sends its next
                // job only after the previous result, or after a new turn forgot it).
                let key = session.key;
                if let Err(job) = self.providers.vad.try_push(job, |j| j.session == key) {
                    fx.merge(session.on_vad_refused(job, now));
                }
            }
            for request in requests {
                if let Some(refused) = self.start(request, session.key, now) {
                    fx.merge(refused.deliver(session, now));
                }
            }
            session.counters.remote_calls_cancelled += std::mem::take(&mut self.remote_cancelled);
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
            other => {
                let answered = match &other {
                    SessionEvent::Asr { turn, .. } => Some(RemoteJob::Asr { turn: *turn }),
                    SessionEvent::Tts { turn, seq, .. } => Some(RemoteJob::Tts {
                        turn: *turn,
                        seq: *seq,
                    }),
                    _ => None,
                };
                if let Some(job) = answered {
                    self.remote.retain(|c| c.job != job);
                }
                session.on_event(other, now)
            }
        }
    }

    /// Runs `call` as a remote call of `job`, dropping the oldest of its kind first when the
    /// runner already holds [`JOBS_PER_KIND`] of them.
    fn spawn_remote(
        &mut self,
        job: RemoteJob,
        call: impl std::future::Future<Output = ()> + 'static,
    ) {
        let held = self.remote.iter().filter(|c| c.job.same_kind(job)).count();
        if held >= JOBS_PER_KIND {
            if let Some(i) = self.remote.iter().position(|c| c.job.same_kind(job)) {
                let oldest = self.remote.remove(i);
                self.drop_remote(oldest);
            }
        }
        let task = glommio::spawn_local(call).detach();
        self.remote.push(RemoteCall { job, task });
    }

    /// Drops a remote call and answers it "cancelled" (so the session's quota slot frees).
    fn drop_remote(&mut self, call: RemoteCall) {
        call.task.cancel();
        self.remote_cancelled += 1;
        self.mailbox.push_control(call.job.cancelled());
    }

    /// Cancels this session's jobs of turns up to `up_to`: on the local pools, and the remote
    /// calls held here.
    fn cancel_jobs(&mut self, up_to: u32) {
        if let Asr::Local(pool) = &self.providers.asr {
            pool.cancel(self.key, self.shard, u64::from(up_to));
        }
        if let Tts::Local { pool, .. } = &self.providers.tts {
            pool.cancel(self.key, self.shard, u64::from(up_to));
        }
        let (stale, live): (Vec<_>, Vec<_>) = std::mem::take(&mut self.remote)
            .into_iter()
            .partition(|c| c.job.turn() <= up_to);
        self.remote = live;
        for call in stale {
            self.drop_remote(call);
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
                    pool.submit_in(key, u64::from(turn), self.shard, job)
                        .err()
                        .map(|_| Refused::Asr { turn })
                }
                Asr::Remote(settings) => {
                    let (client, settings) = (self.providers.http.clone(), settings.clone());
                    let mailbox = self.mailbox.clone();
                    self.spawn_remote(RemoteJob::Asr { turn }, async move {
                        let wav = wav_bytes(&pcm, 16_000);
                        let result = transcribe(&client, &settings, wav)
                            .await
                            .map_err(|e| e.to_string());
                        mailbox.push_control(SessionEvent::Asr { turn, result });
                    });
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
            Request::CancelJobs { up_to_turn } => {
                self.cancel_jobs(up_to_turn);
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
                    pool.submit_in(key, u64::from(turn), self.shard, job)
                        .err()
                        .map(|_| Refused::Tts { turn, seq })
                }
                Tts::Remote(settings) => {
                    let (client, settings) = (self.providers.http.clone(), settings.clone());
                    let mailbox = self.mailbox.clone();
                    self.spawn_remote(RemoteJob::Tts { turn, seq }, async move {
                        let result = speech(&client, &settings, &text)
                            .await
                            .map_err(|e| e.to_string());
                        mailbox.push_control(SessionEvent::Tts { turn, seq, result });
                    });
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
