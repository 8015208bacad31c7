//! `WorkQueue` on Redis Streams.
//!
//! Keys of topic `t` share the hash tag `{t}`, so one topic lives on one Redis Cluster slot and
//! the Lua scripts below may touch all of them atomically:
//! - `{t}`: the stream; entry fields `p` payload, `a` deliveries before this entry, `o` the
//!   item's original entry id (absent on the first entry), `e` the last error;
//! - `{t}:delayed`: ZSET of nacked items waiting for their retry (score = due time in ms,
//!   member = msgpack `[payload, attempts, original id, error]`);
//! - `{t}:dlq`: stream of dead letters (`p`, `o`, `a`, `e`, `g` group).
//!
//! An entry's attempt is `a` + its delivery count in the group's pending list (which
//! XREADGROUP sets to 1 and XAUTOCLAIM raises), so redelivery after a consumer died counts;
//! a lease extension (`XCLAIM … JUSTID`) only resets the idle time.
//! Finished entries (acked, retried, dead-lettered) are XDELeted, so `XLEN` + `ZCARD` is
//! exactly the backlog. Receiving polls with backoff instead of `XREADGROUP BLOCK`, which
//! would stall the shared multiplexed connection for every other caller.
use super::{
    DeadLetter, Delivery, QueueError, QueueOptions, QueueResult, WorkQueue, counters, redact,
    validate_consumer, validate_topic,
};
use ::redis::aio::{ConnectionManager, ConnectionManagerConfig};
use ::redis::{AsyncCommands, Script};
use async_trait::async_trait;
use std::time::Duration;
use tokio::time::Instant;

/// First pause between polls of an empty topic; doubles up to [`MAX_POLL_PAUSE`].
const MIN_POLL_PAUSE: Duration = Duration::from_millis(5);
/// Longest pause between polls, i.e. the worst extra latency of an idle consumer.
const MAX_POLL_PAUSE: Duration = Duration::from_millis(100);
/// Longest pause of a producer waiting at the high-water mark.
const MAX_PUBLISH_PAUSE: Duration = Duration::from_millis(200);

/// Shared Lua helpers: group creation (idempotent) and server time in ms.
const LUA_PRELUDE: &str = r#"
local function ensure_group(stream, group)
  local r = redis.pcall('XGROUP', 'CREATE', stream, group, '0', 'MKSTREAM')
  if type(r) == 'table' and r.err and not string.find(r.err, 'BUSYGROUP') then
    return redis.error_reply(r.err)
  end
end
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local function fields(kv)
  local f = {}
  for i = 1, #kv, 2 do f[kv[i]] = kv[i + 1] end
  return f
end
"#;

/// KEYS: stream, delayed. ARGV: group, high-water mark, payload.
/// Adds the item unless the backlog is at the mark; returns the entry id or nil.
const PUBLISH: &str = r#"
local err = ensure_group(KEYS[1], ARGV[1]); if err then return err end
local backlog = redis.call('XLEN', KEYS[1]) + redis.call('ZCARD', KEYS[2])
if backlog >= tonumber(ARGV[2]) then return false end
return redis.call('XADD', KEYS[1], '*', 'p', ARGV[3], 'a', 0)
"#;

/// KEYS: stream, delayed, dlq. ARGV: group, consumer, visibility ms, max attempts.
/// Moves due retries back into the stream, then hands out one new entry, else one whose
/// visibility timeout expired (dead-lettering those past max attempts).
/// Returns {kind ('' | 'new' | 'claimed'), id, payload, attempt, dead-lettered count}.
const RECEIVE: &str = r#"
local stream, delayed, dlq = KEYS[1], KEYS[2], KEYS[3]
local group, consumer = ARGV[1], ARGV[2]
local vt, max = tonumber(ARGV[3]), tonumber(ARGV[4])
local err = ensure_group(stream, group); if err then return err end
local due = redis.call('ZRANGEBYSCORE', delayed, '-inf', now_ms(), 'LIMIT', 0, 100)
for _, m in ipairs(due) do
  local d = cmsgpack.unpack(m)
  redis.call('XADD', stream, '*', 'p', d[1], 'a', d[2], 'o', d[3], 'e', d[4])
  redis.call('ZREM', delayed, m)
end
local r = redis.call('XREADGROUP', 'GROUP', group, consumer, 'COUNT', 1, 'STREAMS', stream, '>')
if r and r[1][2][1] then
  local e = r[1][2][1]
  local f = fields(e[2])
  return {'new', e[1], f.p, (tonumber(f.a) or 0) + 1, 0}
end
local dead = 0
local cursor = '0-0'
for _ = 1, 100 do
  local c = redis.call('XAUTOCLAIM', stream, group, consumer, vt, cursor, 'COUNT', 1)
  cursor = c[1]
  local e = c[2][1]
  if e and type(e[2]) == 'table' then
    local id = e[1]
    local f = fields(e[2])
    local p = redis.call('XPENDING', stream, group, id, id, 1)
    local attempt = (tonumber(f.a) or 0) + p[1][4]
    if attempt > max then
      local msg = 'not acknowledged within the visibility timeout (' .. ARGV[3] .. ' ms) on attempt ' .. (attempt - 1)
      if f.e then msg = msg .. '; previous error: ' .. f.e end
      redis.call('XADD', dlq, '*', 'p', f.p, 'o', f.o or id, 'a', attempt - 1, 'e', msg, 'g', group)
      redis.call('XACK', stream, group, id)
      redis.call('XDEL', stream, id)
      dead = dead + 1
    else
      return {'claimed', id, f.p, attempt, dead}
    end
  end
  if cursor == '0-0' then break end
end
return {'', '', '', 0, dead}
"#;

/// KEYS: stream. ARGV: group, id. Returns 1 when the entry was pending and is now done.
const ACK: &str = r#"
local n = redis.call('XACK', KEYS[1], ARGV[1], ARGV[2])
if n == 1 then redis.call('XDEL', KEYS[1], ARGV[2]) end
return n
"#;

/// KEYS: stream. ARGV: group, consumer, id, attempt.
/// Resets the entry's idle time when it is still pending with this consumer at this attempt;
/// returns 1 then, else 0. `XCLAIM … JUSTID` leaves the delivery counter (the attempt) alone.
const EXTEND: &str = r#"
local stream, group, consumer, id = KEYS[1], ARGV[1], ARGV[2], ARGV[3]
local p = redis.pcall('XPENDING', stream, group, id, id, 1)
if p.err then
  if string.find(p.err, 'NOGROUP') then return 0 end
  return redis.error_reply(p.err)
end
if not p[1] or p[1][2] ~= consumer then return 0 end
local r = redis.call('XRANGE', stream, id, id)
if not r[1] then return 0 end
local f = fields(r[1][2])
if (tonumber(f.a) or 0) + p[1][4] ~= tonumber(ARGV[4]) then return 0 end
redis.call('XCLAIM', stream, group, consumer, 0, id, 'JUSTID')
return 1
"#;

/// KEYS: stream, delayed, dlq. ARGV: group, id, attempt, error, delay ms, max attempts
/// (0 dead-letters the item whatever its attempt: a permanent failure).
/// Returns 'dead' | 'retry' | 'delayed' | 'stale' (the delivery is no longer current).
const NACK: &str = r#"
local stream, delayed, dlq = KEYS[1], KEYS[2], KEYS[3]
local group, id, err = ARGV[1], ARGV[2], ARGV[4]
local p = redis.call('XPENDING', stream, group, id, id, 1)
if not p[1] then return 'stale' end
local r = redis.call('XRANGE', stream, id, id)
if not r[1] then
  redis.call('XACK', stream, group, id)
  return 'stale'
end
local f = fields(r[1][2])
local attempt = (tonumber(f.a) or 0) + p[1][4]
if attempt ~= tonumber(ARGV[3]) then return 'stale' end
local orig = f.o or id
redis.call('XACK', stream, group, id)
redis.call('XDEL', stream, id)
if attempt >= tonumber(ARGV[6]) then
  redis.call('XADD', dlq, '*', 'p', f.p, 'o', orig, 'a', attempt, 'e', err, 'g', group)
  return 'dead'
end
local delay = tonumber(ARGV[5])
if delay <= 0 then
  redis.call('XADD', stream, '*', 'p', f.p, 'a', attempt, 'o', orig, 'e', err)
  return 'retry'
end
redis.call('ZADD', delayed, now_ms() + delay, cmsgpack.pack({f.p, attempt, orig, err}))
return 'delayed'
"#;

/// Redis Streams work queue over a reconnecting [`ConnectionManager`].
#[derive(Clone)]
pub struct RedisQueue {
    con: ConnectionManager,
    opts: QueueOptions,
    /// The URL with its password masked, for messages.
    url: String,
    publish: Script,
    receive: Script,
    extend: Script,
    ack: Script,
    nack: Script,
}

impl std::fmt::Debug for RedisQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisQueue")
            .field("url", &self.url)
            .field("opts", &self.opts)
            .finish()
    }
}

struct Keys {
    stream: String,
    delayed: String,
    dlq: String,
}

fn keys(topic: &str) -> Keys {
    Keys {
        stream: format!("{{{topic}}}"),
        delayed: format!("{{{topic}}}:delayed"),
        dlq: format!("{{{topic}}}:dlq"),
    }
}

impl RedisQueue {
    /// Connects (failing fast when the server cannot be reached); later outages are retried
    /// by the connection manager with exponential backoff.
    pub async fn connect(url: &str, opts: QueueOptions) -> QueueResult<Self> {
        opts.validate()?;
        let shown = redact(url);
        let client = ::redis::Client::open(url).map_err(|e| QueueError::InvalidUrl {
            url: shown.clone(),
            reason: e.to_string(),
        })?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(5)))
            .set_response_timeout(Some(Duration::from_secs(10)))
            .set_max_delay(Duration::from_secs(2));
        let con = ConnectionManager::new_with_config(client, config)
            .await
            .map_err(|e| QueueError::Backend(format!("connecting to {shown}: {e}")))?;
        let script = |body: &str| Script::new(&format!("{LUA_PRELUDE}\n{body}"));
        Ok(Self {
            con,
            opts,
            url: shown,
            publish: script(PUBLISH),
            receive: script(RECEIVE),
            extend: script(EXTEND),
            ack: script(ACK),
            nack: script(NACK),
        })
    }

    fn err(&self, op: &str, topic: &str, e: ::redis::RedisError) -> QueueError {
        QueueError::Backend(format!("{op} on topic `{topic}` at {}: {e}", self.url))
    }

    /// Runs [`NACK`]: `max_attempts` 0 dead-letters the item at once.
    async fn fail(
        &self,
        delivery: &Delivery,
        error: &str,
        delay_ms: u64,
        max_attempts: u32,
    ) -> QueueResult<()> {
        let topic = &delivery.topic;
        validate_topic(topic)?;
        let k = keys(topic);
        let mut con = self.con.clone();
        let outcome: String = self
            .nack
            .key(&k.stream)
            .key(&k.delayed)
            .key(&k.dlq)
            .arg(&self.opts.group)
            .arg(&delivery.id)
            .arg(delivery.attempt)
            .arg(error)
            .arg(delay_ms)
            .arg(max_attempts)
            .invoke_async(&mut con)
            .await
            .map_err(|e| self.err("nack", topic, e))?;
        match outcome.as_str() {
            // A permanent failure was logged by whoever declared it.
            "dead" if max_attempts == 0 => {
                tracing::debug!(topic, id = delivery.id, "queue item dead-lettered: {error}");
                counters::dead_lettered(topic, 1);
            }
            "dead" => {
                tracing::warn!(
                    topic,
                    id = delivery.id,
                    attempts = delivery.attempt,
                    "queue item dead-lettered: {error}"
                );
                counters::dead_lettered(topic, 1);
            }
            "stale" => {
                tracing::debug!(topic, id = delivery.id, "ignoring nack of a stale delivery")
            }
            _ => {}
        }
        Ok(())
    }

    /// One non-blocking look for an item.
    async fn receive_once(&self, topic: &str, consumer: &str) -> QueueResult<Option<Delivery>> {
        let k = keys(topic);
        let mut con = self.con.clone();
        let (kind, id, payload, attempt, dead): (String, String, Vec<u8>, u32, u64) = self
            .receive
            .key(&k.stream)
            .key(&k.delayed)
            .key(&k.dlq)
            .arg(&self.opts.group)
            .arg(consumer)
            .arg(self.opts.visibility_timeout.as_millis() as u64)
            .arg(self.opts.max_attempts)
            .invoke_async(&mut con)
            .await
            .map_err(|e| self.err("receive", topic, e))?;
        if dead > 0 {
            tracing::warn!(
                topic,
                dead,
                "queue items dead-lettered after their visibility timeout expired"
            );
            counters::dead_lettered(topic, dead);
        }
        match kind.as_str() {
            "" => Ok(None),
            "new" | "claimed" => {
                if kind == "claimed" {
                    tracing::debug!(
                        topic,
                        id,
                        attempt,
                        "redelivering an item whose visibility timeout expired"
                    );
                    counters::redelivered(topic);
                }
                Ok(Some(Delivery {
                    topic: topic.to_string(),
                    id,
                    payload,
                    attempt,
                    consumer: consumer.to_string(),
                }))
            }
            other => Err(QueueError::Backend(format!(
                "receive on topic `{topic}`: unexpected script reply `{other}`"
            ))),
        }
    }
}

#[async_trait]
impl WorkQueue for RedisQueue {
    async fn publish(&self, topic: &str, payload: &[u8]) -> QueueResult<String> {
        validate_topic(topic)?;
        let k = keys(topic);
        let mut con = self.con.clone();
        let mut pause = MIN_POLL_PAUSE;
        let mut waited = false;
        loop {
            let id: Option<String> = self
                .publish
                .key(&k.stream)
                .key(&k.delayed)
                .arg(&self.opts.group)
                .arg(self.opts.high_water_mark)
                .arg(payload)
                .invoke_async(&mut con)
                .await
                .map_err(|e| self.err("publish", topic, e))?;
            if let Some(id) = id {
                counters::published(topic);
                return Ok(id);
            }
            if !waited {
                tracing::debug!(
                    topic,
                    high_water_mark = self.opts.high_water_mark,
                    "publish waits for the backlog to shrink"
                );
                waited = true;
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(MAX_PUBLISH_PAUSE);
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
        let mut pause = MIN_POLL_PAUSE;
        loop {
            if let Some(d) = self.receive_once(topic, consumer).await? {
                return Ok(Some(d));
            }
            let now = Instant::now();
            if now >= deadline {
                return Ok(None);
            }
            tokio::time::sleep(pause.min(deadline - now)).await;
            pause = (pause * 2).min(MAX_POLL_PAUSE);
        }
    }

    async fn extend(&self, delivery: &Delivery) -> QueueResult<bool> {
        let topic = &delivery.topic;
        validate_topic(topic)?;
        let mut con = self.con.clone();
        let n: u32 = self
            .extend
            .key(keys(topic).stream)
            .arg(&self.opts.group)
            .arg(&delivery.consumer)
            .arg(&delivery.id)
            .arg(delivery.attempt)
            .invoke_async(&mut con)
            .await
            .map_err(|e| self.err("extend", topic, e))?;
        Ok(n == 1)
    }

    fn visibility_timeout(&self) -> Duration {
        self.opts.visibility_timeout
    }

    fn retry_delay(&self, attempt: u32) -> Duration {
        self.opts.retry_delay(attempt)
    }

    async fn ack(&self, delivery: &Delivery) -> QueueResult<()> {
        let topic = &delivery.topic;
        validate_topic(topic)?;
        let mut con = self.con.clone();
        let n: u32 = self
            .ack
            .key(keys(topic).stream)
            .arg(&self.opts.group)
            .arg(&delivery.id)
            .invoke_async(&mut con)
            .await
            .map_err(|e| self.err("ack", topic, e))?;
        if n > 0 {
            counters::acked(topic);
        }
        Ok(())
    }

    async fn nack(
        &self,
        delivery: &Delivery,
        error: &str,
        retry_after: Option<Duration>,
    ) -> QueueResult<()> {
        let delay_ms = retry_after.map_or(0, |d| d.as_millis().min(u64::MAX as u128) as u64);
        self.fail(delivery, error, delay_ms, self.opts.max_attempts)
            .await
    }

    async fn dead_letter(&self, delivery: &Delivery, error: &str) -> QueueResult<()> {
        self.fail(delivery, error, 0, 0).await
    }

    async fn dead_letter_count(&self, topic: &str) -> QueueResult<u64> {
        validate_topic(topic)?;
        let mut con = self.con.clone();
        con.xlen(keys(topic).dlq)
            .await
            .map_err(|e| self.err("dead_letter_count", topic, e))
    }

    async fn dead_letters(&self, topic: &str) -> QueueResult<Vec<DeadLetter>> {
        validate_topic(topic)?;
        let mut con = self.con.clone();
        let reply: ::redis::streams::StreamRangeReply = con
            .xrange_all(keys(topic).dlq)
            .await
            .map_err(|e| self.err("dead_letters", topic, e))?;
        reply
            .ids
            .into_iter()
            .map(|e| {
                let missing = |field: &str| {
                    QueueError::Backend(format!(
                        "dead letter {} on topic `{topic}` lacks field `{field}`",
                        e.id
                    ))
                };
                Ok(DeadLetter {
                    topic: topic.to_string(),
                    original_id: e.get("o").ok_or_else(|| missing("o"))?,
                    payload: e.get("p").ok_or_else(|| missing("p"))?,
                    attempts: e.get("a").ok_or_else(|| missing("a"))?,
                    error: e.get("e").ok_or_else(|| missing("e"))?,
                })
            })
            .collect()
    }

    async fn backlog(&self, topic: &str) -> QueueResult<u64> {
        validate_topic(topic)?;
        let k = keys(topic);
        let mut con = self.con.clone();
        let (waiting, delayed): (u64, u64) = ::redis::pipe()
            .atomic()
            .xlen(&k.stream)
            .zcard(&k.delayed)
            .query_async(&mut con)
            .await
            .map_err(|e| self.err("backlog", topic, e))?;
        Ok(waiting + delayed)
    }
}
