//! Continuous batching of text generation, shared by `batch-worker run` and `serve`.
//!
//! Requests (a micro-batch of one file or shard, a queued chat message) wait in a queue. Each
//! [`Batcher::turn`] first moves waiting items into the rows that are free, up to the batch
//! size (their prompts read together in one prefill, then merged beside the running rows),
//! then decodes one step for every row. Rows leave as soon as they finish, so the batch stays
//! full while items wait, and a request is answered as soon as its own items are done, not
//! when the rows it shared a batch with are. Items are admitted one by one, in order, so a
//! request larger than the free rows starts at once with part of its items. An urgent request
//! (a queued chat message, someone waiting for its reply) is queued before every request that
//! is not, so it takes the next row that frees up, not the row after a whole bulk micro-batch.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use shared::wire::{InputItem, OutputLine};

use crate::embedded::Processor;
use crate::engine::EngineError;
use crate::generate::{Decoding, Generated, item_key};
use crate::tasks::Generate;

/// A drain or a signal stopped the model mid-batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Interrupted;

/// `item` alone: its output line, or an error line if the model fails on it.
pub fn process_one(m: &mut dyn Processor, item: &InputItem) -> Result<OutputLine, Interrupted> {
    Ok(match m.process(std::slice::from_ref(item)) {
        Ok(mut l) if l.len() == 1 => l.remove(0),
        Ok(_) => OutputLine::error(
            &item.custom_id,
            "inference_failed",
            "the model returned no output",
        ),
        Err(EngineError::Interrupted) => return Err(Interrupted),
        Err(e) => OutputLine::error(&item.custom_id, "inference_failed", e.to_string()),
    })
}

/// One request: its items, the lines they have so far, and who is waiting for them.
struct Request<R> {
    items: Vec<InputItem>,
    /// Each item's prompt; taken when the item is admitted (`None` from then on, or from the
    /// start for an item whose prompt is unusable: it has its error line already).
    prompts: Vec<Option<Vec<u32>>>,
    lines: Vec<Option<OutputLine>>,
    /// Items before this one have been admitted (or had their line at once).
    next: usize,
    /// Items without a line yet.
    left: usize,
    reply: R,
    queued: Instant,
    /// Admitted before every request that is not (see [`Batcher::push_urgent`]).
    urgent: bool,
}

/// A request whose items all have their lines.
pub struct Answer<R> {
    pub reply: R,
    /// One line per item, in the request's order.
    pub lines: Vec<OutputLine>,
    /// From [`Batcher::push`] to this answer.
    pub waited: Duration,
}

/// What one [`Batcher::turn`] did.
pub struct Turn<R> {
    /// The requests answered, oldest first.
    pub answers: Vec<Answer<R>>,
    /// Prompts read in this turn's prefill (0: none).
    pub prefilled: usize,
    /// Whether that prefill joined rows already decoding, or items of more than one request.
    pub merged: bool,
}

/// Requests and their rows in one decoding batch (see the module's documentation). `R` is
/// how a request is answered: a channel in `serve`, a sequence number in `run`.
pub struct Batcher<R> {
    requests: HashMap<u64, Request<R>>,
    /// Requests with items not yet admitted: urgent ones first, then the others, each oldest
    /// first.
    waiting: VecDeque<u64>,
    /// Which request and item each decoding row (by tag) is.
    rows: HashMap<usize, (u64, usize)>,
    decoding: Option<Decoding>,
    next_request: u64,
    next_row: usize,
}

impl<R> Default for Batcher<R> {
    fn default() -> Self {
        Self {
            requests: HashMap::new(),
            waiting: VecDeque::new(),
            rows: HashMap::new(),
            decoding: None,
            next_request: 0,
            next_row: 0,
        }
    }
}

impl<R> Batcher<R> {
    /// Queues `items`, answered through `reply` once every one has its line. An item whose
    /// prompt is unusable gets its error line here.
    pub fn push(&mut self, model: &Generate, items: Vec<InputItem>, reply: R) {
        self.queue(model, items, reply, false);
    }

    /// As [`Batcher::push`], but queued after the urgent requests already waiting and before
    /// every other one: its items take the next rows that free up. Rows already decoding are
    /// never cut short for it.
    pub fn push_urgent(&mut self, model: &Generate, items: Vec<InputItem>, reply: R) {
        self.queue(model, items, reply, true);
    }

    /// [`Batcher::push_urgent`] when `urgent`, else [`Batcher::push`].
    pub fn queue(&mut self, model: &Generate, items: Vec<InputItem>, reply: R, urgent: bool) {
        let id = self.next_request;
        self.next_request += 1;
        let mut lines = vec![None; items.len()];
        let mut prompts = Vec::with_capacity(items.len());
        let mut left = items.len();
        for (i, item) in items.iter().enumerate() {
            match model.item_prompt(item) {
                Ok(p) => prompts.push(Some(p)),
                Err(line) => {
                    prompts.push(None);
                    lines[i] = Some(line);
                    left -= 1;
                }
            }
        }
        self.requests.insert(
            id,
            Request {
                items,
                prompts,
                lines,
                next: 0,
                left,
                reply,
                queued: Instant::now(),
                urgent,
            },
        );
        let at = if urgent {
            self.waiting
                .iter()
                .position(|w| self.requests.get(w).is_some_and(|r| !r.urgent))
                .unwrap_or(self.waiting.len())
        } else {
            self.waiting.len()
        };
        self.waiting.insert(at, id);
    }

    /// Rows being decoded.
    pub fn running(&self) -> usize {
        self.decoding.as_ref().map_or(0, Decoding::len)
    }

    /// Items queued and not yet admitted.
    pub fn waiting_items(&self) -> usize {
        self.waiting
            .iter()
            .filter_map(|id| self.requests.get(id))
            .map(|r| r.items.len() - r.next)
            .sum()
    }

    /// No request is queued or being decoded.
    pub fn is_idle(&self) -> bool {
        self.requests.is_empty()
    }

    /// Forgets the requests whose answer nobody waits for any more (a shard that stopped
    /// early, with its next micro-batch handed over): their items not yet admitted never
    /// start, and their rows leave the batch now, so the rows go to other requests at the
    /// next turn. Returns how many rows left.
    pub fn abandon(&mut self, abandoned: impl Fn(&R) -> bool) -> usize {
        let gone: Vec<u64> = self
            .requests
            .iter()
            .filter(|(_, r)| abandoned(&r.reply))
            .map(|(&id, _)| id)
            .collect();
        if gone.is_empty() {
            return 0;
        }
        for id in &gone {
            self.requests.remove(id);
        }
        self.waiting.retain(|id| !gone.contains(id));
        let tags: Vec<usize> = self
            .rows
            .iter()
            .filter(|(_, (id, _))| gone.contains(id))
            .map(|(&tag, _)| tag)
            .collect();
        for tag in &tags {
            self.rows.remove(tag);
        }
        match self.decoding.as_mut().map(|d| d.drop_rows(&tags)) {
            Some(Ok(left)) => left,
            Some(Err(error)) => {
                // The rows stay and finish; `finish` finds no request for them.
                tracing::warn!(%error, "abandoned rows could not leave the batch; they finish unread");
                0
            }
            None => 0,
        }
    }

    /// Admits waiting items into the rows left free by the running ones (at most `batch`
    /// rows in all), then decodes one step; returns the requests answered. A prefill or step
    /// that fails has its rows' items decoded again one by one (an item that fails alone
    /// gets an error line); a signal meanwhile leaves them for [`Batcher::interrupt`].
    pub fn turn(&mut self, model: &mut Generate, batch: usize) -> Turn<R> {
        let running = self.running();
        let (mut prompts, mut tags, mut keys) = (Vec::new(), Vec::new(), Vec::new());
        // The first request with a row in this prefill, and whether another one has rows too.
        let (mut first, mut several) = (None, false);
        while running + prompts.len() < batch.max(1) {
            let Some(&id) = self.waiting.front() else {
                break;
            };
            let Some(r) = self.requests.get_mut(&id) else {
                self.waiting.pop_front();
                continue;
            };
            if r.next == r.items.len() {
                self.waiting.pop_front();
                continue;
            }
            let i = r.next;
            r.next += 1;
            if let Some(p) = r.prompts[i].take() {
                several |= *first.get_or_insert(id) != id;
                let tag = self.next_row;
                self.next_row += 1;
                self.rows.insert(tag, (id, i));
                prompts.push(p);
                tags.push(tag);
                keys.push(item_key(&r.items[i].custom_id));
            }
        }
        let merged = !prompts.is_empty() && (running > 0 || several);
        if !prompts.is_empty() {
            match model.start(&prompts, &tags, &keys) {
                Ok((more, done)) => {
                    self.finish(model, done);
                    match self.decoding.as_mut() {
                        None => self.decoding = Some(more),
                        Some(d) => {
                            let both: Vec<usize> =
                                d.tags().into_iter().chain(more.tags()).collect();
                            if let Err(e) = d.merge(more) {
                                self.decoding = None;
                                self.fail(model, &both, &e);
                            }
                        }
                    }
                }
                Err(e) => self.fail(model, &tags, &e),
            }
        }
        if let Some(d) = self.decoding.as_mut()
            && !d.is_empty()
        {
            match model.step(d) {
                Ok(done) => self.finish(model, done),
                Err(e) => {
                    let tags = d.tags();
                    self.decoding = None;
                    self.fail(model, &tags, &e);
                }
            }
        }
        Turn {
            answers: self.answers(),
            prefilled: prompts.len(),
            merged,
        }
    }

    /// Records the lines of rows that finished.
    fn finish(&mut self, model: &Generate, done: Vec<(usize, Generated)>) {
        for (tag, g) in done {
            if let Some((id, i)) = self.rows.remove(&tag)
                && let Some(r) = self.requests.get_mut(&id)
            {
                r.lines[i] = Some(model.line(&r.items[i], &g));
                r.left -= 1;
            }
        }
    }

    /// The batch of rows `tags` failed: each of their items is decoded again alone.
    fn fail(&mut self, model: &mut Generate, tags: &[usize], error: &EngineError) {
        tracing::warn!(%error, rows = tags.len(), "generation batch failed; retrying item by item");
        for tag in tags {
            let Some(&(id, i)) = self.rows.get(tag) else {
                continue;
            };
            let Some(r) = self.requests.get_mut(&id) else {
                continue;
            };
            // A signal: the row stays unanswered, for `interrupt`.
            let Ok(line) = process_one(model, &r.items[i]) else {
                continue;
            };
            self.rows.remove(tag);
            r.lines[i] = Some(line);
            r.left -= 1;
        }
    }

    /// Removes and returns the requests whose items all have their lines, oldest first.
    fn answers(&mut self) -> Vec<Answer<R>> {
        let mut complete: Vec<u64> = self
            .requests
            .iter()
            .filter(|(_, r)| r.left == 0)
            .map(|(&id, _)| id)
            .collect();
        complete.sort_unstable();
        complete
            .into_iter()
            .filter_map(|id| self.requests.remove(&id))
            .map(|r| Answer {
                waited: r.queued.elapsed(),
                lines: r.lines.into_iter().flatten().collect(),
                reply: r.reply,
            })
            .collect()
    }

    /// Drops every row and returns every request unanswered, oldest first (a drain or a
    /// signal: they are redone after it).
    pub fn interrupt(&mut self) -> Vec<R> {
        self.decoding = None;
        self.rows.clear();
        self.waiting.clear();
        let mut all: Vec<(u64, Request<R>)> = self.requests.drain().collect();
        all.sort_unstable_by_key(|(id, _)| *id);
        all.into_iter().map(|(_, r)| r.reply).collect()
    }
}
