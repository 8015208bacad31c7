//! `WorkQueue`: at-least-once work distribution with consumer groups, redelivery of items
//! whose consumer died, attempt counting, delayed retry and a dead-letter stream.
//!
//! Messages are claim checks (DESIGN.md §3): small JSON pointing at a shard in storage.
//!
//! Two backends share one semantics (and one conformance suite, `tests/queue_conformance.rs`):
//! - [`RedisQueue`] (`redis://`, `rediss://`): Redis Streams with consumer groups, for
//!   distributed mode;
//! - [`MemoryQueue`] (`memory://`, `memory://<name>`): in-process, for embedded mode.
//!
//! A topic is a work queue: the replicas of ONE service (one consumer group) share its items.
//! Acked, retried and dead-lettered entries are removed from the topic, so a topic is not meant
//! to be read by several groups at once.
//!
//! Delivery is at-least-once; handlers must be idempotent. An item keeps its identity across
//! retries in [`DeadLetter::original_id`], while [`Delivery::id`] names one delivery's entry.
use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use std::time::Duration;

mod memory;
mod redis;

pub use self::memory::MemoryQueue;
pub use self::redis::RedisQueue;

/// The queue message body: points at a shard object, never carries the payload itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClaimCheck {
    pub run_id: String,
    pub topic: String,
    pub uri: String,
    pub sha256: String,
    pub records: u64,
    /// W3C trace context of the producer, so consumer spans join its trace.
    #[serde(default)]
    pub traceparent: Option<String>,
    /// Work directory of the stage job the item belongs to (see [`crate::fanout`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub work: Option<String>,
    /// Name of the item's part marker in that directory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub part: Option<String>,
}

/// One delivery of an item to a consumer.
#[derive(Debug, Clone)]
pub struct Delivery {
    pub topic: String,
    /// Queue-assigned id (a stream entry id on Redis).
    pub id: String,
    pub payload: Vec<u8>,
    /// 1 on first delivery, counting redeliveries and retries.
    pub attempt: u32,
    /// The consumer it was delivered to, so only that holder can extend its lease.
    pub consumer: String,
}

/// An item that used up its attempts, with the error of the last one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetter {
    pub topic: String,
    pub original_id: String,
    pub payload: Vec<u8>,
    pub attempts: u32,
    pub error: String,
}

#[derive(Debug, Clone)]
pub struct QueueOptions {
    /// A delivered item not acked within this time is handed to another consumer.
    pub visibility_timeout: Duration,
    /// Deliveries before an item goes to `{topic}:dlq`.
    pub max_attempts: u32,
    /// `publish` waits while the topic holds this many unfinished items, so a producer never
    /// pushes a topic above it.
    pub high_water_mark: u64,
    /// Consumer group every replica of a service joins.
    pub group: String,
    /// Delay before the first retry of an item that failed transiently; each further retry
    /// waits twice as long as the one before, up to [`Self::max_retry_backoff`].
    pub retry_backoff: Duration,
    /// The longest backoff.
    pub max_retry_backoff: Duration,
}

impl Default for QueueOptions {
    fn default() -> Self {
        Self {
            visibility_timeout: Duration::from_secs(300),
            max_attempts: 5,
            high_water_mark: 10_000,
            group: "davinci".into(),
            retry_backoff: Duration::from_secs(1),
            max_retry_backoff: Duration::from_secs(60),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    #[error("queue backend: {0}")]
    Backend(String),
    #[error("invalid queue URL `{url}`: {reason}")]
    InvalidUrl { url: String, reason: String },
    /// A bad topic name, consumer name or option value; `what` names it.
    #[error("invalid queue {what}: {reason}")]
    Invalid { what: String, reason: String },
}

pub type QueueResult<T> = Result<T, QueueError>;

#[async_trait]
pub trait WorkQueue: Send + Sync + std::fmt::Debug {
    /// Adds an item; waits while the topic is above its high-water mark. Returns the item id.
    async fn publish(&self, topic: &str, payload: &[u8]) -> QueueResult<String>;
    /// Waits up to `wait` for an item for `consumer` (new items first, then expired ones).
    async fn receive(
        &self,
        topic: &str,
        consumer: &str,
        wait: Duration,
    ) -> QueueResult<Option<Delivery>>;
    /// The consumer is still working on this item: do not hand it to another consumer for
    /// another visibility timeout. Returns false when the item is no longer this delivery's
    /// (acked, nacked, or already taken over by another consumer after its lease expired).
    /// Never changes the delivery's attempt number.
    async fn extend(&self, delivery: &Delivery) -> QueueResult<bool>;
    /// The item is done; it is never delivered again.
    async fn ack(&self, delivery: &Delivery) -> QueueResult<()>;
    /// The attempt failed with `error`. The item comes back after `retry_after` (or at once),
    /// or goes to the dead-letter stream when it has used `max_attempts`.
    async fn nack(
        &self,
        delivery: &Delivery,
        error: &str,
        retry_after: Option<Duration>,
    ) -> QueueResult<()>;
    /// The item cannot succeed (a permanent failure, see [`crate::retry`]): it goes to the
    /// dead-letter stream at once with `error`, whatever attempts it has left. A stale
    /// delivery is ignored, as by [`Self::nack`].
    async fn dead_letter(&self, delivery: &Delivery, error: &str) -> QueueResult<()>;
    /// How long a delivered item stays with its consumer without an ack or [`Self::extend`].
    fn visibility_timeout(&self) -> Duration;
    /// How long to wait before retrying an item whose delivery `attempt` failed transiently
    /// ([`QueueOptions::retry_delay`]).
    fn retry_delay(&self, attempt: u32) -> Duration;
    /// Items in `{topic}:dlq`, oldest first.
    async fn dead_letters(&self, topic: &str) -> QueueResult<Vec<DeadLetter>>;
    /// Items published and not yet acked or dead-lettered (waiting, in flight or delayed).
    async fn backlog(&self, topic: &str) -> QueueResult<u64>;
    /// How many items `{topic}:dlq` holds.
    async fn dead_letter_count(&self, topic: &str) -> QueueResult<u64> {
        Ok(self.dead_letters(topic).await?.len() as u64)
    }
}

/// Keeps the gauges `davinci_queue_backlog_items` and `davinci_queue_dead_letters_items` of
/// `topic` current, sampling every `every` until `stop` (a queue outage skips a sample).
pub async fn sample_gauges(
    queue: Arc<dyn WorkQueue>,
    topic: String,
    every: Duration,
    stop: tokio_util::sync::CancellationToken,
) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        match (
            queue.backlog(&topic).await,
            queue.dead_letter_count(&topic).await,
        ) {
            (Ok(backlog), Ok(dead)) => {
                metrics::gauge!("davinci_queue_backlog_items", "topic" => topic.clone())
                    .set(backlog as f64);
                metrics::gauge!("davinci_queue_dead_letters_items", "topic" => topic.clone())
                    .set(dead as f64);
            }
            (Err(e), _) | (_, Err(e)) => {
                tracing::debug!(topic, error = %e, "sampling the queue gauges failed")
            }
        }
    }
}

impl ClaimCheck {
    /// The JSON queue payload.
    pub fn to_payload(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("a ClaimCheck always serializes")
    }

    /// Parses a queue payload; the error says which field is wrong.
    pub fn from_payload(payload: &[u8]) -> QueueResult<Self> {
        let de = &mut serde_json::Deserializer::from_slice(payload);
        serde_path_to_error::deserialize(de).map_err(|e| QueueError::Invalid {
            what: "claim check".into(),
            reason: format!("at `{}`: {}", e.path(), e.inner()),
        })
    }
}

impl QueueOptions {
    /// The backoff after a transient failure of delivery `attempt` (1-based): `retry_backoff`
    /// doubled for each attempt before it, at most `max_retry_backoff`.
    pub fn retry_delay(&self, attempt: u32) -> Duration {
        let doublings = attempt.saturating_sub(1).min(31);
        self.retry_backoff
            .saturating_mul(1 << doublings)
            .min(self.max_retry_backoff)
    }

    /// Refuses values with which the queue cannot work (zero attempts, a zero high-water mark
    /// that would block every publish, a zero visibility timeout, a group name that breaks keys).
    pub fn validate(&self) -> QueueResult<()> {
        let bad = |what: &str, reason: &str| {
            Err(QueueError::Invalid {
                what: format!("option `{what}`"),
                reason: reason.into(),
            })
        };
        if self.max_attempts == 0 {
            return bad("max_attempts", "must be at least 1");
        }
        if self.high_water_mark == 0 {
            return bad(
                "high_water_mark",
                "must be at least 1 (0 would block every publish)",
            );
        }
        if self.visibility_timeout < Duration::from_millis(1) {
            return bad("visibility_timeout", "must be at least 1 ms");
        }
        if self.visibility_timeout > Duration::from_secs(30 * 24 * 3600) {
            return bad("visibility_timeout", "must be at most 30 days");
        }
        if let Err(reason) = check_name(&self.group) {
            return bad("group", &reason);
        }
        if self.max_retry_backoff < self.retry_backoff {
            return bad(
                "max_retry_backoff",
                "must not be shorter than retry_backoff",
            );
        }
        if self.max_retry_backoff > Duration::from_secs(24 * 3600) {
            return bad("max_retry_backoff", "must be at most one day");
        }
        Ok(())
    }
}

/// Topic and consumer names: non-empty, printable, no braces (they are Redis Cluster hash tags
/// in the key names), at most 200 bytes.
fn check_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("must not be empty".into());
    }
    if name.len() > 200 {
        return Err(format!("is {} bytes long, at most 200 allowed", name.len()));
    }
    if let Some(c) = name
        .chars()
        .find(|c| c.is_whitespace() || c.is_control() || "{}".contains(*c))
    {
        return Err(format!(
            "contains {c:?}; whitespace, control characters and braces are not allowed"
        ));
    }
    Ok(())
}

pub(crate) fn validate_topic(topic: &str) -> QueueResult<()> {
    check_name(topic).map_err(|reason| QueueError::Invalid {
        what: format!("topic `{topic}`"),
        reason,
    })
}

pub(crate) fn validate_consumer(consumer: &str) -> QueueResult<()> {
    check_name(consumer).map_err(|reason| QueueError::Invalid {
        what: format!("consumer name `{consumer}`"),
        reason,
    })
}

/// Opens a queue by URL: `redis://…` / `rediss://…` (Redis Streams) or `memory://` (a private
/// in-process queue) / `memory://<name>` (the process-wide in-process queue of that name, so
/// the services of one embedded run share it).
pub async fn connect(url: &str, opts: QueueOptions) -> QueueResult<Arc<dyn WorkQueue>> {
    opts.validate()?;
    let scheme = url.split_once("://").map(|(s, _)| s.to_ascii_lowercase());
    match scheme.as_deref() {
        Some("redis") | Some("rediss") => Ok(Arc::new(RedisQueue::connect(url, opts).await?)),
        Some("memory") => {
            let name = &url["memory://".len()..];
            if name.is_empty() {
                Ok(Arc::new(MemoryQueue::new(opts)))
            } else {
                check_name(name).map_err(|reason| QueueError::InvalidUrl {
                    url: url.to_string(),
                    reason: format!("queue name {reason}"),
                })?;
                Ok(Arc::new(MemoryQueue::named(name, opts)))
            }
        }
        _ => Err(QueueError::InvalidUrl {
            url: redact(url),
            reason: "expected a `redis://`, `rediss://` or `memory://` URL".into(),
        }),
    }
}

/// The URL without its password, for error messages.
pub(crate) fn redact(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut u) if u.password().is_some() => {
            let _ = u.set_password(Some("***"));
            u.to_string()
        }
        Ok(_) => url.to_string(),
        Err(_) => url.split('@').next_back().unwrap_or_default().to_string(),
    }
}

/// Counters shared by both backends (the Prometheus recorder is installed by telemetry).
pub(crate) mod counters {
    pub fn published(topic: &str) {
        metrics::counter!("davinci_queue_published_total", "topic" => topic.to_string())
            .increment(1);
    }
    pub fn acked(topic: &str) {
        metrics::counter!("davinci_queue_acked_total", "topic" => topic.to_string()).increment(1);
    }
    pub fn redelivered(topic: &str) {
        metrics::counter!("davinci_queue_redelivered_total", "topic" => topic.to_string())
            .increment(1);
    }
    pub fn dead_lettered(topic: &str, n: u64) {
        if n > 0 {
            metrics::counter!("davinci_queue_dead_lettered_total", "topic" => topic.to_string())
                .increment(n);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn claim_check_round_trips_and_names_bad_field() {
        let c = ClaimCheck {
            run_id: "r1".into(),
            topic: "t".into(),
            uri: "file:///x/shard-0.jsonl.zst".into(),
            sha256: "ab".into(),
            records: 3,
            traceparent: None,
            work: Some("file:///x/runs/r1/work/reconstruct-0123".into()),
            part: Some("p1".into()),
        };
        assert_eq!(ClaimCheck::from_payload(&c.to_payload()).unwrap(), c);
        let err = ClaimCheck::from_payload(
            br#"{"run_id":"r","topic":"t","uri":"u","sha256":"s","records":"x"}"#,
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("records"), "{err}");
    }

    #[test]
    fn names_and_options_are_checked() {
        assert!(validate_topic("crawl.shards").is_ok());
        for bad in ["", "a{b}", "a b", "x\n"] {
            assert!(validate_topic(bad).is_err(), "{bad:?} accepted");
        }
        let err = QueueOptions {
            max_attempts: 0,
            ..Default::default()
        }
        .validate()
        .unwrap_err();
        assert!(err.to_string().contains("max_attempts"), "{err}");
        let err = QueueOptions {
            high_water_mark: 0,
            ..Default::default()
        }
        .validate()
        .unwrap_err();
        assert!(err.to_string().contains("high_water_mark"), "{err}");
        assert!(QueueOptions::default().validate().is_ok());
        let err = QueueOptions {
            retry_backoff: Duration::from_secs(2),
            max_retry_backoff: Duration::from_secs(1),
            ..Default::default()
        }
        .validate()
        .unwrap_err();
        assert!(err.to_string().contains("max_retry_backoff"), "{err}");
    }

    #[test]
    fn retry_delay_doubles_up_to_its_bound() {
        let o = QueueOptions {
            retry_backoff: Duration::from_millis(100),
            max_retry_backoff: Duration::from_millis(500),
            ..Default::default()
        };
        let ms: Vec<u128> = (1..=6).map(|a| o.retry_delay(a).as_millis()).collect();
        assert_eq!(ms, [100, 200, 400, 500, 500, 500]);
        assert_eq!(o.retry_delay(u32::MAX), Duration::from_millis(500));
        assert_eq!(o.retry_delay(0), Duration::from_millis(100));
    }

    #[test]
    fn redacts_passwords() {
        assert_eq!(
            redact("redis://u:secret@h:6379/0"),
            "redis://u:***@h:6379/0"
        );
        assert!(!redact("nonsense://:secret@x").contains("secret"));
    }
}
