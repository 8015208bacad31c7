//! In-process `WorkQueue` for embedded mode, with the Redis backend's semantics: visibility
//! timeout redelivery, attempt counting, delayed retry, dead letters and a high-water mark.
use super::{
    DeadLetter, Delivery, QueueOptions, QueueResult, WorkQueue, counters, validate_consumer,
    validate_topic,
};
use async_trait::async_trait;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex as StdMutex, OnceLock};
use std::time::Duration;
use tokio::sync::{Mutex, Notify};
use tokio::time::Instant;

/// An in-process queue. Handles made by [`MemoryQueue::named`] with the same name share their
/// items (like several processes on one Redis); each handle applies its own options.
#[derive(Debug, Clone)]
pub struct MemoryQueue {
    shared: Arc<Shared>,
    opts: QueueOptions,
}

#[derive(Debug, Default)]
struct Shared {
    topics: Mutex<HashMap<String, Topic>>,
    /// Woken on every change: new or returned items wake consumers, finished items wake
    /// producers waiting at the high-water mark.
    changed: Notify,
}

#[derive(Debug, Default)]
struct Topic {
    next_id: u64,
    ready: VecDeque<Item>,
    in_flight: HashMap<String, InFlight>,
    /// Keyed by (due time, entry id) so the earliest due item comes first.
    delayed: BTreeMap<(Instant, u64), Item>,
    dlq: Vec<DeadLetter>,
}

#[derive(Debug, Clone)]
struct Item {
    /// This entry's id; a retried item gets a new one, like a re-added stream entry.
    id: String,
    seq: u64,
    original_id: String,
    payload: Vec<u8>,
    /// Deliveries before this entry was (re)queued.
    attempts: u32,
    last_error: Option<String>,
}

#[derive(Debug)]
struct InFlight {
    item: Item,
    attempt: u32,
    deadline: Instant,
}

impl Topic {
    fn new_entry(
        &mut self,
        original_id: Option<String>,
        payload: Vec<u8>,
        attempts: u32,
        error: Option<String>,
    ) -> Item {
        self.next_id += 1;
        let id = self.next_id.to_string();
        Item {
            original_id: original_id.unwrap_or_else(|| id.clone()),
            id,
            seq: self.next_id,
            payload,
            attempts,
            last_error: error,
        }
    }

    fn backlog(&self) -> u64 {
        (self.ready.len() + self.in_flight.len() + self.delayed.len()) as u64
    }

    fn promote_due(&mut self, now: Instant) {
        while let Some(entry) = self.delayed.first_entry() {
            if entry.key().0 > now {
                break;
            }
            // The entry got its fresh id when it was nacked.
            self.ready.push_back(entry.remove());
        }
    }

    /// The earliest moment something becomes receivable without a new publish.
    fn next_event(&self) -> Option<Instant> {
        let delayed = self.delayed.keys().next().map(|(due, _)| *due);
        let expiry = self.in_flight.values().map(|f| f.deadline).min();
        match (delayed, expiry) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }
}

/// What one look at a topic found.
enum Take {
    Got(Delivery),
    Nothing { next_event: Option<Instant> },
}

impl MemoryQueue {
    /// A private queue: only clones of this handle see its items.
    pub fn new(opts: QueueOptions) -> Self {
        Self {
            shared: Arc::new(Shared::default()),
            opts,
        }
    }

    /// The process-wide queue called `name` (created on first use, kept for the process's life
    /// so a producer that finishes before its consumer starts loses nothing).
    pub fn named(name: &str, opts: QueueOptions) -> Self {
        static REGISTRY: OnceLock<StdMutex<HashMap<String, Arc<Shared>>>> = OnceLock::new();
        let mut registry = REGISTRY
            .get_or_init(Default::default)
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let shared = registry.entry(name.to_string()).or_default().clone();
        Self { shared, opts }
    }

    fn take(&self, topics: &mut HashMap<String, Topic>, topic_name: &str, consumer: &str) -> Take {
        let now = Instant::now();
        let Some(topic) = topics.get_mut(topic_name) else {
            return Take::Nothing { next_event: None };
        };
        topic.promote_due(now);
        if let Some(item) = topic.ready.pop_front() {
            let attempt = item.attempts + 1;
            return Take::Got(self.hand_out(topic, topic_name, consumer, item, attempt, now));
        }
        let mut dead = 0;
        loop {
            let expired = topic
                .in_flight
                .iter()
                .filter(|(_, f)| f.deadline <= now)
                .min_by_key(|(_, f)| (f.deadline, f.item.seq))
                .map(|(id, _)| id.clone());
            let Some(id) = expired else { break };
            let flight = topic.in_flight.remove(&id).expect("id just found");
            let attempt = flight.attempt + 1;
            if attempt > self.opts.max_attempts {
                let mut error = format!(
                    "not acknowledged within the visibility timeout ({} ms) on attempt {}",
                    self.opts.visibility_timeout.as_millis(),
                    flight.attempt
                );
                if let Some(prev) = &flight.item.last_error {
                    error.push_str("; previous error: ");
                    error.push_str(prev);
                }
                tracing::warn!(
                    topic = topic_name,
                    id,
                    attempts = flight.attempt,
                    "queue item dead-lettered: {error}"
                );
                topic.dlq.push(DeadLetter {
                    topic: topic_name.to_string(),
                    original_id: flight.item.original_id,
                    payload: flight.item.payload,
                    attempts: flight.attempt,
                    error,
                });
                dead += 1;
                continue;
            }
            counters::dead_lettered(topic_name, dead);
            if dead > 0 {
                self.shared.changed.notify_waiters();
            }
            counters::redelivered(topic_name);
            tracing::debug!(
                topic = topic_name,
                id,
                attempt,
                "redelivering an item whose visibility timeout expired"
            );
            return Take::Got(self.hand_out(
                topic,
                topic_name,
                consumer,
                flight.item,
                attempt,
                now,
            ));
        }
        counters::dead_lettered(topic_name, dead);
        if dead > 0 {
            self.shared.changed.notify_waiters();
        }
        Take::Nothing {
            next_event: topic.next_event(),
        }
    }

    /// Ends a failed delivery: back to the topic (after `retry_after`), or into the dead-letter
    /// stream when it used its last attempt or `dead` says it cannot succeed.
    async fn fail(
        &self,
        delivery: &Delivery,
        error: &str,
        retry_after: Option<Duration>,
        dead: bool,
    ) -> QueueResult<()> {
        let mut topics = self.shared.topics.lock().await;
        let Some(topic) = topics.get_mut(&delivery.topic) else {
            return Ok(());
        };
        // A delivery that was meanwhile handed to another consumer (or finished) is stale: the
        // current holder decides what happens to the item.
        match topic.in_flight.get(&delivery.id) {
            Some(f) if f.attempt == delivery.attempt => {}
            _ => {
                tracing::debug!(
                    topic = delivery.topic,
                    id = delivery.id,
                    "ignoring nack of a stale delivery"
                );
                return Ok(());
            }
        }
        let flight = topic.in_flight.remove(&delivery.id).expect("checked above");
        if dead || flight.attempt >= self.opts.max_attempts {
            // A permanent failure was logged by whoever declared it.
            if dead {
                tracing::debug!(
                    topic = delivery.topic,
                    id = delivery.id,
                    "queue item dead-lettered: {error}"
                );
            } else {
                tracing::warn!(
                    topic = delivery.topic,
                    id = delivery.id,
                    attempts = flight.attempt,
                    "queue item dead-lettered: {error}"
                );
            }
            topic.dlq.push(DeadLetter {
                topic: delivery.topic.clone(),
                original_id: flight.item.original_id,
                payload: flight.item.payload,
                attempts: flight.attempt,
                error: error.to_string(),
            });
            drop(topics);
            counters::dead_lettered(&delivery.topic, 1);
            self.shared.changed.notify_waiters();
            return Ok(());
        }
        let item = flight.item;
        let entry = topic.new_entry(
            Some(item.original_id),
            item.payload,
            flight.attempt,
            Some(error.to_string()),
        );
        match retry_after.filter(|d| !d.is_zero()) {
            None => topic.ready.push_back(entry),
            Some(delay) => {
                topic
                    .delayed
                    .insert((Instant::now() + delay, entry.seq), entry);
            }
        }
        drop(topics);
        self.shared.changed.notify_waiters();
        Ok(())
    }

    fn hand_out(
        &self,
        topic: &mut Topic,
        topic_name: &str,
        consumer: &str,
        item: Item,
        attempt: u32,
        now: Instant,
    ) -> Delivery {
        let delivery = Delivery {
            topic: topic_name.to_string(),
            id: item.id.clone(),
            payload: item.payload.clone(),
            attempt,
            consumer: consumer.to_string(),
        };
        let deadline = now + self.opts.visibility_timeout;
        topic.in_flight.insert(
            item.id.clone(),
            InFlight {
                item,
                attempt,
                deadline,
            },
        );
        delivery
    }
}

#[async_trait]
impl WorkQueue for MemoryQueue {
    async fn publish(&self, topic: &str, payload: &[u8]) -> QueueResult<String> {
        validate_topic(topic)?;
        loop {
            let notified = self.shared.changed.notified();
            tokio::pin!(notified);
            // Registered before looking, so an ack between the look and the wait is not missed.
            notified.as_mut().enable();
            {
                let mut topics = self.shared.topics.lock().await;
                let t = topics.entry(topic.to_string()).or_default();
                if t.backlog() < self.opts.high_water_mark {
                    let item = t.new_entry(None, payload.to_vec(), 0, None);
                    let id = item.id.clone();
                    t.ready.push_back(item);
                    drop(topics);
                    counters::published(topic);
                    self.shared.changed.notify_waiters();
                    return Ok(id);
                }
            }
            notified.await;
        }
    }

    async fn receive(
        &self,
        topic: &str,
        consumer: &str,
        wait: Duration,
    ) -> QueueResult<Option<Delivery>> {
        validate_topic(topic)?;
        validate_consumer(consumer)?;
        let deadline = Instant::now() + wait;
        loop {
            let notified = self.shared.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let next_event = {
                let mut topics = self.shared.topics.lock().await;
                match self.take(&mut topics, topic, consumer) {
                    Take::Got(d) => return Ok(Some(d)),
                    Take::Nothing { next_event } => next_event,
                }
            };
            if Instant::now() >= deadline {
                return Ok(None);
            }
            let until = next_event.map_or(deadline, |e| e.min(deadline));
            tokio::select! {
                _ = notified => {}
                _ = tokio::time::sleep_until(until) => {}
            }
        }
    }

    async fn extend(&self, delivery: &Delivery) -> QueueResult<bool> {
        let mut topics = self.shared.topics.lock().await;
        // A redelivered copy has a higher attempt: the old holder must not keep it.
        match topics
            .get_mut(&delivery.topic)
            .and_then(|t| t.in_flight.get_mut(&delivery.id))
        {
            Some(f) if f.attempt == delivery.attempt => {
                f.deadline = Instant::now() + self.opts.visibility_timeout;
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    fn visibility_timeout(&self) -> Duration {
        self.opts.visibility_timeout
    }

    fn retry_delay(&self, attempt: u32) -> Duration {
        self.opts.retry_delay(attempt)
    }

    async fn ack(&self, delivery: &Delivery) -> QueueResult<()> {
        let mut topics = self.shared.topics.lock().await;
        let removed = topics
            .get_mut(&delivery.topic)
            .and_then(|t| t.in_flight.remove(&delivery.id))
            .is_some();
        drop(topics);
        if removed {
            counters::acked(&delivery.topic);
            self.shared.changed.notify_waiters();
        }
        Ok(())
    }

    async fn nack(
        &self,
        delivery: &Delivery,
        error: &str,
        retry_after: Option<Duration>,
    ) -> QueueResult<()> {
        self.fail(delivery, error, retry_after, false).await
    }

    async fn dead_letter(&self, delivery: &Delivery, error: &str) -> QueueResult<()> {
        self.fail(delivery, error, None, true).await
    }

    async fn dead_letters(&self, topic: &str) -> QueueResult<Vec<DeadLetter>> {
        validate_topic(topic)?;
        let topics = self.shared.topics.lock().await;
        Ok(topics.get(topic).map(|t| t.dlq.clone()).unwrap_or_default())
    }

    async fn backlog(&self, topic: &str) -> QueueResult<u64> {
        validate_topic(topic)?;
        let topics = self.shared.topics.lock().await;
        Ok(topics.get(topic).map_or(0, Topic::backlog))
    }
}
