//! The model loop: one thread owns the model and serves every request through continuous
//! batching. Waiting requests are admitted while the batch has room; each step runs the
//! prefills of the admitted requests and one decode token of every running sequence in one
//! forward call. Text is decoded per sequence, stop sequences are cut out of it, and events
//! flow back to the HTTP handlers over channels; a handler that goes away (client
//! disconnected) frees its sequences at the next step.
use davinci_model::generate::{log_softmax, top_k};
use davinci_model::{KvCache, Qwen2, Sampler, SamplingParams, Step};
use davinci_tokenize::Tokenizer;
use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Instant;
use tokio::sync::mpsc;

/// What one request asks the engine for.
#[derive(Debug, Clone)]
pub struct GenRequest {
    pub prompt: Vec<u32>,
    pub max_tokens: usize,
    pub sampling: SamplingParams,
    /// Choices sampled from the prompt (it is prefilled once).
    pub n: usize,
    /// Text stop sequences; the text ends before the first one found.
    pub stop: Vec<String>,
    /// Ids that end a choice (EOS); they are not part of the text.
    pub stop_ids: Vec<u32>,
    /// Alternatives per generated token to report (`None`: no logprobs).
    pub logprobs: Option<usize>,
    /// Score the prompt tokens too (completions `echo` with `logprobs`).
    pub prompt_logprobs: bool,
}

/// A token with its log-probability and the most likely alternatives.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprob {
    pub id: u32,
    pub text: String,
    pub logprob: f32,
    pub top: Vec<(String, f32)>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Finish {
    Stop,
    Length,
}

#[derive(Debug)]
pub enum Event {
    /// Prompt scoring: one entry per prompt token, the first has none.
    Prompt(Vec<Option<TokenLogprob>>),
    /// New text of a choice (may be empty while a possible stop sequence is held back).
    Delta {
        choice: usize,
        text: String,
        logprobs: Vec<TokenLogprob>,
    },
    Done {
        choice: usize,
        finish: Finish,
        completion_tokens: usize,
    },
    Error(String),
}

/// Handle to the engine thread.
#[derive(Clone)]
pub struct Engine {
    tx: mpsc::UnboundedSender<(GenRequest, mpsc::UnboundedSender<Event>)>,
}

impl Engine {
    /// Starts the model thread. `max_batch` bounds the sequences decoded together.
    pub fn start(model: Qwen2, tok: Arc<Tokenizer>, max_batch: usize) -> Engine {
        let (tx, rx) = mpsc::unbounded_channel();
        std::thread::Builder::new()
            .name("inference-engine".into())
            .spawn(move || Loop::new(model, tok, max_batch.max(1)).run(rx))
            .expect("spawning the engine thread");
        Engine { tx }
    }

    /// Queues a request; its events arrive on the returned channel.
    pub fn submit(&self, req: GenRequest) -> mpsc::UnboundedReceiver<Event> {
        let (etx, erx) = mpsc::unbounded_channel();
        if let Err(e) = self.tx.send((req, etx)) {
            let (_, etx) = e.0;
            let _ = etx.send(Event::Error("the model thread has stopped".into()));
        }
        erx
    }
}

struct Seq {
    req: usize,
    choice: usize,
    cache: KvCache,
    sampler: Sampler,
    ids: Vec<u32>,
    /// Token fed at the next step.
    next: u32,
    emitted: usize,
    started: Instant,
    first_token: bool,
}

struct Active {
    req: GenRequest,
    events: mpsc::UnboundedSender<Event>,
    enqueued: Instant,
}

struct Loop {
    model: Qwen2,
    tok: Arc<Tokenizer>,
    max_batch: usize,
    waiting: VecDeque<Active>,
    requests: Vec<Option<Active>>,
    seqs: Vec<Seq>,
    token_text: Vec<Option<String>>,
}

impl Loop {
    fn new(model: Qwen2, tok: Arc<Tokenizer>, max_batch: usize) -> Self {
        let vocab = model.config.vocab_size;
        Self {
            model,
            tok,
            max_batch,
            waiting: VecDeque::new(),
            requests: Vec::new(),
            seqs: Vec::new(),
            token_text: vec![None; vocab],
        }
    }

    fn run(mut self, mut rx: mpsc::UnboundedReceiver<(GenRequest, mpsc::UnboundedSender<Event>)>) {
        loop {
            if self.seqs.is_empty() && self.waiting.is_empty() {
                match rx.blocking_recv() {
                    Some((req, events)) => self.enqueue(req, events),
                    None => return,
                }
            }
            while let Ok((req, events)) = rx.try_recv() {
                self.enqueue(req, events);
            }
            metrics::gauge!("davinci_inference_queue_depth").set(self.waiting.len() as f64);
            let step = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.step()));
            let failure = match step {
                Ok(Ok(())) => None,
                Ok(Err(e)) => Some(format!("{e:#}")),
                Err(p) => Some(
                    p.downcast_ref::<String>()
                        .cloned()
                        .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                        .unwrap_or_else(|| "panic".into()),
                ),
            };
            if let Some(msg) = failure {
                // The batch is lost, the server is not: fail its requests and go on.
                tracing::error!(error = %msg, "inference step failed");
                for a in self.requests.iter_mut().filter_map(Option::take) {
                    let _ = a
                        .events
                        .send(Event::Error(format!("inference failed: {msg}")));
                }
                self.seqs.clear();
            }
            metrics::gauge!("davinci_inference_running_sequences").set(self.seqs.len() as f64);
        }
    }

    fn enqueue(&mut self, req: GenRequest, events: mpsc::UnboundedSender<Event>) {
        self.waiting.push_back(Active {
            req,
            events,
            enqueued: Instant::now(),
        });
    }

    fn text_of(&mut self, id: u32) -> String {
        let slot = &mut self.token_text[id as usize];
        if slot.is_none() {
            *slot = Some(self.tok.decode(&[id]).unwrap_or_default());
        }
        slot.clone().unwrap_or_default()
    }

    fn token_logprob(&mut self, row: &[f32], id: u32, k: usize) -> TokenLogprob {
        let lp = log_softmax(row);
        let top = top_k(&lp, k)
            .into_iter()
            .map(|(t, l)| (self.text_of(t), l))
            .collect();
        TokenLogprob {
            id,
            text: self.text_of(id),
            logprob: lp[id as usize],
            top,
        }
    }

    fn step(&mut self) -> anyhow::Result<()> {
        // Waiting requests are admitted while their n choices fit beside the running ones (one
        // is always admitted when nothing runs, whatever its n).
        let mut admitted = Vec::new();
        let mut planned = self.seqs.len();
        while let Some(front) = self.waiting.front() {
            if planned > 0 && planned + front.req.n > self.max_batch {
                break;
            }
            let a = self.waiting.pop_front().expect("front exists");
            if a.events.is_closed() {
                continue;
            }
            planned += a.req.n;
            metrics::histogram!("davinci_inference_queue_wait_seconds")
                .record(a.enqueued.elapsed().as_secs_f64());
            // Slots are reused, never compacted: sequences hold their request's index.
            let slot = match self.requests.iter().position(Option::is_none) {
                Some(i) => {
                    self.requests[i] = Some(a);
                    i
                }
                None => {
                    self.requests.push(Some(a));
                    self.requests.len() - 1
                }
            };
            admitted.push(slot);
        }
        // Drop sequences whose client went away.
        let requests = &self.requests;
        self.seqs.retain(|s| {
            requests[s.req]
                .as_ref()
                .is_some_and(|a| !a.events.is_closed())
        });
        let mut prompt_caches: Vec<KvCache> =
            admitted.iter().map(|_| KvCache::new(&self.model)).collect();
        let prompts: Vec<(Vec<u32>, bool)> = admitted
            .iter()
            .map(|&r| {
                let q = &self.requests[r].as_ref().expect("admitted").req;
                (q.prompt.clone(), q.prompt_logprobs)
            })
            .collect();
        let decode_tokens: Vec<[u32; 1]> = self.seqs.iter().map(|s| [s.next]).collect();
        let started = Instant::now();
        let logits = {
            let mut steps = Vec::with_capacity(admitted.len() + self.seqs.len());
            for (c, (p, all)) in prompt_caches.iter_mut().zip(&prompts) {
                steps.push(Step {
                    tokens: p,
                    cache: c,
                    all_logits: *all,
                });
            }
            for (s, t) in self.seqs.iter_mut().zip(&decode_tokens) {
                steps.push(Step {
                    tokens: t,
                    cache: &mut s.cache,
                    all_logits: false,
                });
            }
            if steps.is_empty() {
                return Ok(());
            }
            self.model.forward_cached(&mut steps)?
        };
        let elapsed = started.elapsed().as_secs_f64();
        let n_prompt: usize = prompts.iter().map(|p| p.0.len()).sum();
        metrics::counter!("davinci_inference_prompt_tokens_total").increment(n_prompt as u64);
        metrics::counter!("davinci_inference_generation_tokens_total")
            .increment((self.seqs.len() + admitted.len()) as u64);
        metrics::histogram!("davinci_inference_batch_size")
            .record((self.seqs.len() + admitted.len()) as f64);
        if admitted.is_empty() && elapsed > 0.0 {
            metrics::gauge!("davinci_inference_generation_tokens_per_second")
                .set(self.seqs.len() as f64 / elapsed);
        }
        let mut logits = logits.into_iter();
        let running = self.seqs.len();
        // New requests: prompt scoring, then n choices from the prompt's cache.
        for ((r, cache), (prompt, all)) in admitted.iter().zip(prompt_caches).zip(&prompts) {
            let l = logits.next().expect("one output per step");
            let rows: Vec<Vec<f32>> = l.to_vec2()?;
            let req = self.requests[*r].as_ref().expect("admitted").req.clone();
            if *all {
                let k = req.logprobs.unwrap_or(0);
                let mut scored = vec![None];
                for (i, &t) in prompt.iter().enumerate().skip(1) {
                    scored.push(Some(self.token_logprob(&rows[i - 1], t, k)));
                }
                self.send(*r, Event::Prompt(scored));
            }
            let last = rows.last().expect("a prompt has tokens").clone();
            if req.max_tokens == 0 {
                for c in 0..req.n {
                    self.send(
                        *r,
                        Event::Done {
                            choice: c,
                            finish: Finish::Length,
                            completion_tokens: 0,
                        },
                    );
                }
                self.requests[*r] = None;
                continue;
            }
            for c in 0..req.n {
                let seq = Seq {
                    req: *r,
                    choice: c,
                    cache: cache.clone(),
                    sampler: Sampler::new(req.sampling.clone(), c as u64),
                    ids: Vec::new(),
                    next: 0,
                    emitted: 0,
                    started: self.requests[*r].as_ref().expect("admitted").enqueued,
                    first_token: true,
                };
                self.seqs.push(seq);
                let at = self.seqs.len() - 1;
                self.advance(at, &last);
            }
        }
        // Running sequences (the first `running`; admitted choices were appended after them):
        // the token each was fed produced these logits.
        for (idx, l) in logits.enumerate().take(running) {
            let row: Vec<f32> = l.squeeze(0)?.to_vec1()?;
            self.advance(idx, &row);
        }
        self.seqs.retain(|s| s.next != u32::MAX);
        let reqs: Vec<usize> = (0..self.requests.len()).collect();
        for r in reqs {
            self.retire_if_done(r);
        }
        Ok(())
    }

    fn retire_if_done(&mut self, r: usize) {
        if self.requests[r].is_some() && !self.seqs.iter().any(|s| s.req == r) {
            self.requests[r] = None;
        }
    }

    fn send(&self, r: usize, e: Event) {
        if let Some(a) = &self.requests[r] {
            let _ = a.events.send(e);
        }
    }

    /// Samples the next token of sequence `at` from `row`, emits its text, and marks the
    /// sequence finished (`next = u32::MAX`) on a stop.
    fn advance(&mut self, at: usize, row: &[f32]) {
        let (r, choice) = (self.seqs[at].req, self.seqs[at].choice);
        let req = match &self.requests[r] {
            Some(a) => a.req.clone(),
            None => {
                self.seqs[at].next = u32::MAX;
                return;
            }
        };
        let t = self.seqs[at].sampler.sample(row);
        if self.seqs[at].first_token {
            self.seqs[at].first_token = false;
            metrics::histogram!("davinci_inference_time_to_first_token_seconds")
                .record(self.seqs[at].started.elapsed().as_secs_f64());
        }
        let lp = req.logprobs.map(|k| self.token_logprob(row, t, k));
        let eos = req.stop_ids.contains(&t);
        if !eos {
            self.seqs[at].ids.push(t);
        }
        let generated = self.seqs[at].ids.len() + usize::from(eos);
        let full = self.tok.decode(&self.seqs[at].ids).unwrap_or_default();
        let emitted = self.seqs[at].emitted;
        // The earliest stop sequence wins; the text ends before it.
        let search_from =
            emitted.saturating_sub(req.stop.iter().map(|s| s.len()).max().unwrap_or(0));
        let search_from = floor_char_boundary(&full, search_from);
        let hit = req
            .stop
            .iter()
            .filter(|s| !s.is_empty())
            .filter_map(|s| {
                full[search_from..]
                    .find(s.as_str())
                    .map(|p| p + search_from)
            })
            .min();
        let length = generated >= req.max_tokens;
        let (end, finish) = if let Some(p) = hit {
            (p, Some(Finish::Stop))
        } else if eos {
            (full.len(), Some(Finish::Stop))
        } else if length {
            (full.len(), Some(Finish::Length))
        } else {
            // Hold back an incomplete character and any tail that may begin a stop sequence.
            let mut base = full.len();
            if full.ends_with('\u{FFFD}') {
                base -= '\u{FFFD}'.len_utf8();
            }
            let hold = req
                .stop
                .iter()
                .map(|s| {
                    (1..s.len())
                        .rev()
                        .find(|&k| s.is_char_boundary(k) && full[..base].ends_with(&s[..k]))
                        .unwrap_or(0)
                })
                .max()
                .unwrap_or(0);
            let safe = base - hold;
            (safe.max(emitted), None)
        };
        let end = floor_char_boundary(&full, end.max(emitted));
        let text = full[emitted..end].to_string();
        self.seqs[at].emitted = end;
        self.send(
            r,
            Event::Delta {
                choice,
                text,
                logprobs: lp.into_iter().collect(),
            },
        );
        if let Some(finish) = finish {
            self.send(
                r,
                Event::Done {
                    choice,
                    finish,
                    completion_tokens: generated,
                },
            );
            self.seqs[at].next = u32::MAX;
        } else {
            self.seqs[at].next = t;
        }
    }
}

fn floor_char_boundary(s: &str, mut i: usize) -> usize {
    i = i.min(s.len());
    while !s.is_char_boundary(i) {
        i -= 1;
    }
    i
}
