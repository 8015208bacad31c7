//! Request budgets for GitHub tokens, shared by every crawler replica.
//!
//! Each token may spend `limit` units per window (REST: requests; GraphQL: points, under a key
//! of their own). A replica takes a request's units before sending it
//! ([`TokenBudget::try_acquire`]) and reports what GitHub said afterwards
//! ([`TokenBudget::observe`]: `x-ratelimit-remaining` / `x-ratelimit-reset`), so the shared
//! count follows the server's own: the server's reset time becomes the window end and the
//! remaining count never rises above what the server reported. Tokens are stored under a hash
//! of the token, never in clear.
use async_trait::async_trait;
use std::collections::HashMap;
use std::sync::Mutex;

/// What taking units from a token's budget gave.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Acquire {
    Granted,
    /// No budget left until this Unix time (seconds).
    Exhausted {
        until: u64,
    },
}

#[async_trait]
pub trait TokenBudget: Send + Sync + std::fmt::Debug {
    /// Takes `units` (at most `limit`) from `token_id`'s budget in the current window, or
    /// none when fewer are left.
    async fn try_acquire(
        &self,
        token_id: &str,
        units: u64,
        limit: u64,
        window_secs: u64,
        now: u64,
    ) -> anyhow::Result<Acquire>;
    /// Lowers the budget to the server's view: `remaining` requests until `reset` (Unix s).
    async fn observe(
        &self,
        token_id: &str,
        remaining: u64,
        reset: u64,
        now: u64,
    ) -> anyhow::Result<()>;
}

/// One process's budgets (embedded mode, tests).
#[derive(Debug, Default)]
pub struct MemoryBudget {
    slots: Mutex<HashMap<String, (u64, u64)>>, // token → (remaining, reset)
}

#[async_trait]
impl TokenBudget for MemoryBudget {
    async fn try_acquire(
        &self,
        token_id: &str,
        units: u64,
        limit: u64,
        window_secs: u64,
        now: u64,
    ) -> anyhow::Result<Acquire> {
        let units = units.clamp(1, limit.max(1));
        let mut slots = self.slots.lock().expect("budget lock");
        let slot = slots
            .entry(token_id.to_string())
            .or_insert((limit, now + window_secs));
        if now >= slot.1 {
            *slot = (limit, now + window_secs);
        }
        if slot.0 < units {
            return Ok(Acquire::Exhausted { until: slot.1 });
        }
        slot.0 -= units;
        Ok(Acquire::Granted)
    }

    async fn observe(
        &self,
        token_id: &str,
        remaining: u64,
        reset: u64,
        now: u64,
    ) -> anyhow::Result<()> {
        let mut slots = self.slots.lock().expect("budget lock");
        let slot = slots
            .entry(token_id.to_string())
            .or_insert((remaining, reset));
        apply_observation(slot, remaining, reset, now);
        Ok(())
    }
}

/// The shared count never rises above the server's (`min`) and the window never ends before
/// the server's (`max` of the resets), so a replica's local window cannot refill while the
/// server still counts the old one. Only once the local window is over does the server's
/// count replace it.
fn apply_observation(slot: &mut (u64, u64), remaining: u64, reset: u64, now: u64) {
    if now >= slot.1 {
        *slot = (remaining, reset.max(now));
    } else {
        slot.0 = slot.0.min(remaining);
        slot.1 = slot.1.max(reset);
    }
}

/// Budgets in Redis, one hash per token (`{prefix}:{token_id}` = remaining, reset), updated by
/// Lua scripts so concurrent replicas never both take the last unit.
#[derive(Clone)]
pub struct RedisBudget {
    conn: redis::aio::ConnectionManager,
    prefix: String,
}

impl std::fmt::Debug for RedisBudget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisBudget")
            .field("prefix", &self.prefix)
            .finish()
    }
}

const ACQUIRE_LUA: &str = r#"
local limit, window, now, units = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local rem = tonumber(redis.call('HGET', KEYS[1], 'remaining'))
local reset = tonumber(redis.call('HGET', KEYS[1], 'reset'))
if rem == nil or reset == nil or now >= reset then
  rem = limit
  reset = now + window
end
if rem < units then
  redis.call('HSET', KEYS[1], 'remaining', rem, 'reset', reset)
  return {0, reset}
end
redis.call('HSET', KEYS[1], 'remaining', rem - units, 'reset', reset)
redis.call('EXPIREAT', KEYS[1], reset + 3600)
return {1, reset}
"#;

const OBSERVE_LUA: &str = r#"
local srem, sreset, now = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local rem = tonumber(redis.call('HGET', KEYS[1], 'remaining'))
local reset = tonumber(redis.call('HGET', KEYS[1], 'reset'))
if rem == nil or reset == nil or now >= reset then
  rem = srem
  reset = math.max(sreset, now)
else
  rem = math.min(rem, srem)
  reset = math.max(reset, sreset)
end
redis.call('HSET', KEYS[1], 'remaining', rem, 'reset', reset)
redis.call('EXPIREAT', KEYS[1], reset + 3600)
return rem
"#;

impl RedisBudget {
    pub async fn connect(url: &str, prefix: &str) -> anyhow::Result<Self> {
        let client =
            redis::Client::open(url).map_err(|e| anyhow::anyhow!("redis URL `{url}`: {e}"))?;
        let conn = redis::aio::ConnectionManager::new(client)
            .await
            .map_err(|e| anyhow::anyhow!("connecting to redis: {e}"))?;
        Ok(Self {
            conn,
            prefix: prefix.to_string(),
        })
    }

    fn key(&self, token_id: &str) -> String {
        format!("{}:{}", self.prefix, token_id)
    }
}

#[async_trait]
impl TokenBudget for RedisBudget {
    async fn try_acquire(
        &self,
        token_id: &str,
        units: u64,
        limit: u64,
        window_secs: u64,
        now: u64,
    ) -> anyhow::Result<Acquire> {
        let mut conn = self.conn.clone();
        let (granted, reset): (i64, u64) = redis::Script::new(ACQUIRE_LUA)
            .key(self.key(token_id))
            .arg(limit)
            .arg(window_secs)
            .arg(now)
            .arg(units.clamp(1, limit.max(1)))
            .invoke_async(&mut conn)
            .await
            .map_err(|e| anyhow::anyhow!("token budget script: {e}"))?;
        Ok(if granted == 1 {
            Acquire::Granted
        } else {
            Acquire::Exhausted { until: reset }
        })
    }

    async fn observe(
        &self,
        token_id: &str,
        remaining: u64,
        reset: u64,
        now: u64,
    ) -> anyhow::Result<()> {
        let mut conn = self.conn.clone();
        let _: i64 = redis::Script::new(OBSERVE_LUA)
            .key(self.key(token_id))
            .arg(remaining)
            .arg(reset)
            .arg(now)
            .invoke_async(&mut conn)
            .await
            .map_err(|e| anyhow::anyhow!("token budget script: {e}"))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn memory_budget_counts_down_and_follows_the_server() {
        let b = MemoryBudget::default();
        for _ in 0..3 {
            assert_eq!(
                b.try_acquire("t", 1, 3, 10, 100).await.unwrap(),
                Acquire::Granted
            );
        }
        assert_eq!(
            b.try_acquire("t", 1, 3, 10, 101).await.unwrap(),
            Acquire::Exhausted { until: 110 }
        );
        assert_eq!(
            b.try_acquire("t", 1, 3, 10, 110).await.unwrap(),
            Acquire::Granted
        );
        // the server says only 1 left until 130: that wins over the local 2
        b.observe("t", 1, 130, 111).await.unwrap();
        assert_eq!(
            b.try_acquire("t", 1, 3, 10, 112).await.unwrap(),
            Acquire::Granted
        );
        assert_eq!(
            b.try_acquire("t", 1, 3, 10, 121).await.unwrap(),
            Acquire::Exhausted { until: 130 }
        );
        // several units at once, never more than are left
        assert_eq!(
            b.try_acquire("g", 4, 5, 10, 200).await.unwrap(),
            Acquire::Granted
        );
        assert_eq!(
            b.try_acquire("g", 2, 5, 10, 201).await.unwrap(),
            Acquire::Exhausted { until: 210 }
        );
        assert_eq!(
            b.try_acquire("g", 1, 5, 10, 202).await.unwrap(),
            Acquire::Granted
        );
    }
}
