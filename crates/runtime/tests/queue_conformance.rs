//! One WorkQueue conformance suite, run against a real `redis-server` (started by the testkit)
//! and against the in-process queue. Every check is a generic async fn over a [`Backend`];
//! the macro at the bottom instantiates each for both backends.
use davinci_runtime::queue::{self, Delivery, QueueOptions, WorkQueue};
use davinci_testkit::RedisServer;
use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Short visibility timeout so redelivery tests run quickly.
const VT: Duration = Duration::from_millis(300);

/// Where queues come from; several `connect`s share one queue (like several processes).
struct Backend {
    url: String,
    /// Kept alive for the test; killed on drop.
    _redis: Option<RedisServer>,
}

impl Backend {
    fn redis() -> Self {
        let server = RedisServer::start().expect("starting redis-server");
        Self {
            url: server.url(),
            _redis: Some(server),
        }
    }

    fn memory() -> Self {
        Self {
            url: format!("memory://conformance-{}", uuid::Uuid::new_v4()),
            _redis: None,
        }
    }

    async fn connect(&self, opts: QueueOptions) -> Arc<dyn WorkQueue> {
        queue::connect(&self.url, opts)
            .await
            .unwrap_or_else(|e| panic!("connecting to {}: {e}", self.url))
    }
}

fn opts() -> QueueOptions {
    QueueOptions {
        visibility_timeout: VT,
        max_attempts: 5,
        high_water_mark: 10_000,
        group: "conformance".into(),
        ..Default::default()
    }
}

async fn recv(
    q: &Arc<dyn WorkQueue>,
    topic: &str,
    consumer: &str,
    wait: Duration,
) -> Option<Delivery> {
    q.receive(topic, consumer, wait).await.expect("receive")
}

async fn publish_receive_ack(b: &Backend) {
    let q = b.connect(opts()).await;
    let id = q.publish("t", b"hello").await.unwrap();
    assert!(!id.is_empty());
    assert_eq!(q.backlog("t").await.unwrap(), 1);
    let d = recv(&q, "t", "c1", Duration::from_secs(2))
        .await
        .expect("an item");
    assert_eq!(
        (
            d.topic.as_str(),
            d.id.as_str(),
            d.payload.as_slice(),
            d.attempt
        ),
        ("t", id.as_str(), &b"hello"[..], 1)
    );
    assert_eq!(
        q.backlog("t").await.unwrap(),
        1,
        "an in-flight item is still backlog"
    );
    q.ack(&d).await.unwrap();
    assert_eq!(q.backlog("t").await.unwrap(), 0);
    assert!(q.dead_letters("t").await.unwrap().is_empty());
}

async fn acked_item_is_never_delivered_again(b: &Backend) {
    let q = b.connect(opts()).await;
    let other = b.connect(opts()).await;
    for i in 0..3 {
        q.publish("t", format!("item-{i}").as_bytes())
            .await
            .unwrap();
    }
    for _ in 0..3 {
        let d = recv(&q, "t", "c1", Duration::from_secs(2))
            .await
            .expect("an item");
        q.ack(&d).await.unwrap();
        // A second ack of the same delivery changes nothing.
        q.ack(&d).await.unwrap();
    }
    // Past the visibility timeout, neither the same nor another consumer sees them again.
    assert!(recv(&other, "t", "c2", VT * 3).await.is_none());
    assert!(recv(&q, "t", "c1", Duration::ZERO).await.is_none());
    assert_eq!(q.backlog("t").await.unwrap(), 0);
}

async fn unacked_item_is_redelivered_after_visibility_timeout(b: &Backend) {
    let q1 = b.connect(opts()).await;
    let q2 = b.connect(opts()).await;
    q1.publish("t", b"job").await.unwrap();
    // Taken before the receive: the delivery happens later, so elapsed time since this point
    // bounds the time since delivery from above.
    let before = Instant::now();
    let first = recv(&q1, "t", "c1", Duration::from_secs(2))
        .await
        .expect("an item");
    assert_eq!(first.attempt, 1);
    // Held: nobody else gets it before the visibility timeout.
    assert!(recv(&q2, "t", "c2", Duration::ZERO).await.is_none());
    let again = recv(&q2, "t", "c2", Duration::from_secs(3))
        .await
        .expect("redelivered");
    assert!(
        before.elapsed() >= VT,
        "redelivered after {:?}, before the timeout",
        before.elapsed()
    );
    assert_eq!(again.payload, b"job");
    assert_eq!(again.attempt, 2);
    q2.ack(&again).await.unwrap();
    assert_eq!(q1.backlog("t").await.unwrap(), 0);
    // The first consumer's late nack must not resurrect the finished item.
    q1.nack(&first, "late", None).await.unwrap();
    assert!(recv(&q1, "t", "c1", VT * 2).await.is_none());
    assert!(q1.dead_letters("t").await.unwrap().is_empty());
}

async fn attempts_count_redeliveries_and_retries(b: &Backend) {
    let q = b
        .connect(QueueOptions {
            max_attempts: 4,
            ..opts()
        })
        .await;
    q.publish("t", b"x").await.unwrap();
    let d1 = recv(&q, "t", "c", Duration::from_secs(2)).await.unwrap();
    assert_eq!(d1.attempt, 1);
    q.nack(&d1, "first failure", None).await.unwrap();
    let d2 = recv(&q, "t", "c", Duration::from_secs(2)).await.unwrap();
    assert_eq!(d2.attempt, 2);
    // Not acked: the timeout-driven redelivery counts as an attempt too.
    let d3 = recv(&q, "t", "c", Duration::from_secs(3)).await.unwrap();
    assert_eq!(d3.attempt, 3);
    q.nack(&d3, "third failure", Some(Duration::from_millis(50)))
        .await
        .unwrap();
    let d4 = recv(&q, "t", "c", Duration::from_secs(2)).await.unwrap();
    assert_eq!(d4.attempt, 4);
    assert_eq!(d4.payload, b"x");
    q.ack(&d4).await.unwrap();
    assert_eq!(q.backlog("t").await.unwrap(), 0);
}

async fn dead_letter_after_max_attempts(b: &Backend) {
    let q = b
        .connect(QueueOptions {
            max_attempts: 3,
            ..opts()
        })
        .await;
    let payload: Vec<u8> = (0..=255u8).collect(); // binary-safe all the way to the DLQ
    let id = q.publish("t", &payload).await.unwrap();
    q.publish("t", b"healthy").await.unwrap();
    for attempt in 1..=3 {
        let d = loop {
            let d = recv(&q, "t", "c", Duration::from_secs(2))
                .await
                .expect("an item");
            if d.payload == b"healthy" {
                q.ack(&d).await.unwrap();
                continue;
            }
            break d;
        };
        assert_eq!(d.attempt, attempt);
        assert_eq!(d.payload, payload);
        q.nack(&d, &format!("boom {attempt}"), None).await.unwrap();
    }
    let dlq = q.dead_letters("t").await.unwrap();
    assert_eq!(dlq.len(), 1, "{dlq:?}");
    assert_eq!(dlq[0].topic, "t");
    assert_eq!(dlq[0].original_id, id);
    assert_eq!(dlq[0].payload, payload);
    assert_eq!(dlq[0].attempts, 3);
    assert_eq!(dlq[0].error, "boom 3");
    assert!(
        recv(&q, "t", "c", VT * 2).await.is_none(),
        "a dead letter was delivered again"
    );
    assert_eq!(q.backlog("t").await.unwrap(), 0);
}

/// A permanent failure goes to the DLQ on its first attempt, with its error; a stale delivery's
/// `dead_letter` changes nothing.
async fn dead_letter_at_once(b: &Backend) {
    let q = b.connect(opts()).await;
    let id = q.publish("t", b"malformed").await.unwrap();
    let d = recv(&q, "t", "c1", Duration::from_secs(2)).await.unwrap();
    assert_eq!(d.attempt, 1);
    q.dead_letter(&d, "no such repository").await.unwrap();
    let dlq = q.dead_letters("t").await.unwrap();
    assert_eq!(dlq.len(), 1, "{dlq:?}");
    assert_eq!(
        (
            dlq[0].original_id.as_str(),
            dlq[0].attempts,
            dlq[0].error.as_str()
        ),
        (id.as_str(), 1, "no such repository")
    );
    assert_eq!(q.backlog("t").await.unwrap(), 0);
    assert!(recv(&q, "t", "c1", VT * 2).await.is_none());
    // Another item taken over after its lease expired: the old holder cannot dead-letter it.
    q.publish("t", b"slow").await.unwrap();
    let old = recv(&q, "t", "c1", Duration::from_secs(2)).await.unwrap();
    let new = recv(&q, "t", "c2", VT * 3).await.expect("redelivered");
    assert_eq!(new.attempt, 2);
    q.dead_letter(&old, "stale").await.unwrap();
    assert_eq!(q.dead_letters("t").await.unwrap().len(), 1);
    q.ack(&new).await.unwrap();
    assert_eq!(q.backlog("t").await.unwrap(), 0);
}

async fn dead_letter_when_consumers_keep_dying(b: &Backend) {
    let q = b
        .connect(QueueOptions {
            max_attempts: 2,
            ..opts()
        })
        .await;
    let id = q.publish("t", b"poison").await.unwrap();
    let d1 = recv(&q, "t", "c1", Duration::from_secs(2)).await.unwrap();
    q.nack(&d1, "parse error", None).await.unwrap();
    let d2 = recv(&q, "t", "c2", Duration::from_secs(2)).await.unwrap();
    assert_eq!(d2.attempt, 2);
    // c2 "dies" holding attempt 2 of 2: after the timeout the item goes to the DLQ instead.
    assert!(recv(&q, "t", "c3", VT * 3).await.is_none());
    let dlq = q.dead_letters("t").await.unwrap();
    assert_eq!(dlq.len(), 1, "{dlq:?}");
    assert_eq!(
        (dlq[0].original_id.as_str(), dlq[0].attempts),
        (id.as_str(), 2)
    );
    assert!(
        dlq[0].error.contains("visibility timeout"),
        "{}",
        dlq[0].error
    );
    assert!(
        dlq[0].error.contains("parse error"),
        "the last handler error is kept: {}",
        dlq[0].error
    );
    assert_eq!(q.backlog("t").await.unwrap(), 0);
}

async fn delayed_retry_is_invisible_until_due(b: &Backend) {
    let q = b.connect(opts()).await;
    q.publish("t", b"later").await.unwrap();
    let d = recv(&q, "t", "c", Duration::from_secs(2)).await.unwrap();
    let delay = Duration::from_millis(800);
    let nacked_at = Instant::now();
    q.nack(&d, "rate limited", Some(delay)).await.unwrap();
    assert_eq!(
        q.backlog("t").await.unwrap(),
        1,
        "a delayed item is backlog"
    );
    assert!(
        recv(&q, "t", "c", Duration::from_millis(300))
            .await
            .is_none(),
        "visible before its delay"
    );
    let again = recv(&q, "t", "c", Duration::from_secs(3))
        .await
        .expect("visible after its delay");
    assert!(
        nacked_at.elapsed() >= delay,
        "came back after {:?}",
        nacked_at.elapsed()
    );
    assert_eq!(
        (again.payload.as_slice(), again.attempt),
        (&b"later"[..], 2)
    );
    q.ack(&again).await.unwrap();
    assert_eq!(q.backlog("t").await.unwrap(), 0);
}

async fn concurrent_consumers_process_each_item_once(b: &Backend) {
    const N: usize = 200;
    const CONSUMERS: usize = 4;
    let o = QueueOptions {
        visibility_timeout: Duration::from_secs(5),
        ..opts()
    };
    let producer = b.connect(o.clone()).await;
    for i in 0..N {
        producer
            .publish("t", format!("{i}").as_bytes())
            .await
            .unwrap();
    }
    let seen = Arc::new(Mutex::new(Vec::new()));
    let mut tasks = Vec::new();
    for c in 0..CONSUMERS {
        let q = b.connect(o.clone()).await;
        let seen = seen.clone();
        tasks.push(tokio::spawn(async move {
            let mut mine = 0;
            while let Some(d) = q
                .receive("t", &format!("c{c}"), Duration::from_millis(500))
                .await
                .unwrap()
            {
                seen.lock()
                    .unwrap()
                    .push(String::from_utf8(d.payload.clone()).unwrap());
                q.ack(&d).await.unwrap();
                mine += 1;
                // Real handlers take time; without it one consumer may drain an in-process
                // topic before the others are first polled.
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            mine
        }));
    }
    let mut per_consumer = Vec::new();
    for t in tasks {
        per_consumer.push(t.await.unwrap());
    }
    let seen = seen.lock().unwrap().clone();
    let distinct: HashSet<&String> = seen.iter().collect();
    assert_eq!(seen.len(), N, "deliveries (per consumer {per_consumer:?})");
    assert_eq!(distinct.len(), N, "an item was processed twice");
    assert!(
        per_consumer.iter().filter(|&&n| n > 0).count() >= 2,
        "work was not shared: {per_consumer:?}"
    );
    assert_eq!(producer.backlog("t").await.unwrap(), 0);
}

async fn publish_waits_above_high_water_mark(b: &Backend) {
    let q = b
        .connect(QueueOptions {
            high_water_mark: 3,
            ..opts()
        })
        .await;
    for i in 0..3 {
        q.publish("t", format!("{i}").as_bytes()).await.unwrap();
    }
    assert!(
        tokio::time::timeout(Duration::from_millis(300), q.publish("t", b"over"))
            .await
            .is_err(),
        "publish did not wait at the high-water mark"
    );
    assert_eq!(q.backlog("t").await.unwrap(), 3);
    let producer = q.clone();
    let blocked = tokio::spawn(async move { producer.publish("t", b"3").await.unwrap() });
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        !blocked.is_finished(),
        "publish went through above the high-water mark"
    );
    // An in-flight item still counts; only the ack frees room.
    let d = recv(&q, "t", "c", Duration::from_secs(2)).await.unwrap();
    tokio::time::sleep(Duration::from_millis(150)).await;
    assert!(!blocked.is_finished(), "receiving alone freed room");
    q.ack(&d).await.unwrap();
    tokio::time::timeout(Duration::from_secs(3), blocked)
        .await
        .expect("publish resumed after the ack")
        .unwrap();
    assert_eq!(q.backlog("t").await.unwrap(), 3);
}

async fn topics_are_isolated(b: &Backend) {
    let q = b
        .connect(QueueOptions {
            max_attempts: 1,
            ..opts()
        })
        .await;
    q.publish("a", b"for-a").await.unwrap();
    assert!(
        recv(&q, "b", "c", Duration::from_millis(200))
            .await
            .is_none()
    );
    assert_eq!(q.backlog("b").await.unwrap(), 0);
    q.publish("b", b"for-b").await.unwrap();
    let d = recv(&q, "a", "c", Duration::from_secs(2)).await.unwrap();
    assert_eq!(d.payload, b"for-a");
    q.nack(&d, "only a fails", None).await.unwrap();
    assert_eq!(q.dead_letters("a").await.unwrap().len(), 1);
    assert!(q.dead_letters("b").await.unwrap().is_empty());
    let d = recv(&q, "b", "c", Duration::from_secs(2)).await.unwrap();
    assert_eq!(d.payload, b"for-b");
    q.ack(&d).await.unwrap();
    assert_eq!(
        (q.backlog("a").await.unwrap(), q.backlog("b").await.unwrap()),
        (0, 0)
    );
}

async fn extended_item_stays_with_its_consumer(b: &Backend) {
    let vt = Duration::from_secs(1);
    let o = QueueOptions {
        visibility_timeout: vt,
        ..opts()
    };
    let a = b.connect(o.clone()).await;
    let other = b.connect(o).await;
    assert_eq!(a.visibility_timeout(), vt);
    a.publish("t", b"long").await.unwrap();
    let held = recv(&a, "t", "a", Duration::from_secs(2))
        .await
        .expect("an item");
    assert_eq!((held.attempt, held.consumer.as_str()), (1, "a"));
    // B keeps asking while A extends every 300 ms for 2.5 s, well past the timeout.
    let b_queue = other.clone();
    let b_waits = tokio::spawn(async move {
        b_queue
            .receive("t", "b", Duration::from_millis(2500))
            .await
            .unwrap()
    });
    let started = Instant::now();
    let mut last_extend = Instant::now();
    while started.elapsed() < Duration::from_millis(2500) {
        tokio::time::sleep(Duration::from_millis(300)).await;
        last_extend = Instant::now();
        assert!(a.extend(&held).await.unwrap(), "A lost its lease");
    }
    let got = b_waits.await.unwrap();
    assert!(got.is_none(), "B got an extended item: {got:?}");
    // A stops extending: B gets the item one timeout after the last extend, as attempt 2
    // (the extends did not count as deliveries).
    let taken = recv(&other, "t", "b", Duration::from_secs(3))
        .await
        .expect("taken over after the timeout");
    assert!(
        last_extend.elapsed() >= vt,
        "taken over {:?} after the last extend",
        last_extend.elapsed()
    );
    assert_eq!(
        (
            taken.payload.as_slice(),
            taken.attempt,
            taken.consumer.as_str()
        ),
        (&b"long"[..], 2, "b")
    );
    assert!(
        !a.extend(&held).await.unwrap(),
        "the old holder extended a taken-over item"
    );
    assert!(other.extend(&taken).await.unwrap());
    other.ack(&taken).await.unwrap();
    assert!(
        !other.extend(&taken).await.unwrap(),
        "an acked item was extended"
    );
    // A nacked delivery is no longer the holder's either.
    a.publish("t", b"fails").await.unwrap();
    let d = recv(&a, "t", "a", Duration::from_secs(2)).await.unwrap();
    a.nack(&d, "boom", None).await.unwrap();
    assert!(!a.extend(&d).await.unwrap(), "a nacked item was extended");
    let retry = recv(&a, "t", "a", Duration::from_secs(2)).await.unwrap();
    assert_eq!(retry.attempt, 2);
    a.ack(&retry).await.unwrap();
    assert_eq!(a.backlog("t").await.unwrap(), 0);
}

async fn stale_delivery_to_the_same_consumer_is_not_extended(b: &Backend) {
    let q = b.connect(opts()).await;
    q.publish("t", b"x").await.unwrap();
    let first = recv(&q, "t", "c", Duration::from_secs(2)).await.unwrap();
    // The lease expires and the same consumer name gets the item again (a restarted worker).
    let second = recv(&q, "t", "c", Duration::from_secs(3)).await.unwrap();
    assert_eq!((first.id.as_str(), second.attempt), (second.id.as_str(), 2));
    assert!(
        !q.extend(&first).await.unwrap(),
        "a stale delivery was extended"
    );
    assert!(q.extend(&second).await.unwrap());
    q.ack(&second).await.unwrap();
}

async fn bad_names_are_refused(b: &Backend) {
    let q = b.connect(opts()).await;
    let err = q.publish("has{brace}", b"x").await.unwrap_err().to_string();
    assert!(err.contains("topic"), "{err}");
    let err = q
        .receive("t", "", Duration::ZERO)
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("consumer"), "{err}");
}

macro_rules! conformance {
    ($($name:ident),* $(,)?) => {
        mod redis {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name(&super::Backend::redis()).await;
                }
            )*
        }
        mod memory {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name(&super::Backend::memory()).await;
                }
            )*
        }
    };
}

conformance!(
    publish_receive_ack,
    acked_item_is_never_delivered_again,
    unacked_item_is_redelivered_after_visibility_timeout,
    attempts_count_redeliveries_and_retries,
    dead_letter_after_max_attempts,
    dead_letter_at_once,
    dead_letter_when_consumers_keep_dying,
    delayed_retry_is_invisible_until_due,
    concurrent_consumers_process_each_item_once,
    publish_waits_above_high_water_mark,
    topics_are_isolated,
    extended_item_stays_with_its_consumer,
    stale_delivery_to_the_same_consumer_is_not_extended,
    bad_names_are_refused,
);

/// Publishes 3 items: one acked at once, one redelivered then acked, one dead-lettered, and
/// returns the Prometheus text the queue's counters produced.
fn counted_metrics(b: &Backend) -> String {
    let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
    let handle = recorder.handle();
    // A current-thread runtime keeps every counter call on this thread's local recorder.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    metrics::with_local_recorder(&recorder, || {
        rt.block_on(async {
            let q = b
                .connect(QueueOptions {
                    max_attempts: 2,
                    ..opts()
                })
                .await;
            for item in ["ok", "slow", "bad"] {
                q.publish("m", item.as_bytes()).await.unwrap();
            }
            let wait = Duration::from_secs(2);
            let ok = recv(&q, "m", "c", wait).await.unwrap();
            q.ack(&ok).await.unwrap();
            let _slow = recv(&q, "m", "c", wait).await.unwrap();
            let bad = recv(&q, "m", "c", wait).await.unwrap();
            q.nack(&bad, "e1", None).await.unwrap();
            let bad = recv(&q, "m", "c", wait).await.unwrap();
            assert_eq!(bad.payload, b"bad");
            q.nack(&bad, "e2", None).await.unwrap();
            let slow = recv(&q, "m", "c", Duration::from_secs(3)).await.unwrap();
            assert_eq!((slow.payload.as_slice(), slow.attempt), (&b"slow"[..], 2));
            q.ack(&slow).await.unwrap();
            // What the dashboards' dead-letter gauge reads.
            assert_eq!(q.dead_letter_count("m").await.unwrap(), 1);
            assert_eq!(q.dead_letter_count("never-used").await.unwrap(), 0);
        })
    });
    handle.render()
}

fn assert_counters(text: &str) {
    for line in [
        r#"davinci_queue_published_total{topic="m"} 3"#,
        r#"davinci_queue_acked_total{topic="m"} 2"#,
        r#"davinci_queue_redelivered_total{topic="m"} 1"#,
        r#"davinci_queue_dead_lettered_total{topic="m"} 1"#,
    ] {
        assert!(
            text.lines().any(|l| l == line),
            "missing `{line}` in:\n{text}"
        );
    }
}

#[test]
fn redis_counts_metrics() {
    assert_counters(&counted_metrics(&Backend::redis()));
}

#[test]
fn memory_counts_metrics() {
    assert_counters(&counted_metrics(&Backend::memory()));
}

/// A `redis-server` started on a given port (to restart one where a killed one was).
struct RestartedRedis(std::process::Child);

impl RestartedRedis {
    fn on_port(port: u16, dir: &std::path::Path) -> Self {
        let child = std::process::Command::new("redis-server")
            .args([
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .arg("--dir")
            .arg(dir)
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("restarting redis-server");
        Self(child)
    }
}

impl Drop for RestartedRedis {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_queue_survives_a_server_restart() {
    let mut server = RedisServer::start().expect("starting redis-server");
    let port = server.port();
    let q = queue::connect(&server.url(), opts()).await.unwrap();
    q.publish("t", b"before").await.unwrap();
    server.kill();
    let err = q
        .backlog("t")
        .await
        .expect_err("the server is down")
        .to_string();
    assert!(err.contains("backlog on topic `t`"), "{err}");

    let dir = tempfile::tempdir().unwrap();
    let _restarted = RestartedRedis::on_port(port, dir.path());
    // The same handle reconnects by itself; the group is recreated on first use.
    let deadline = Instant::now() + Duration::from_secs(20);
    while q.backlog("t").await.is_err() {
        assert!(Instant::now() < deadline, "the queue did not reconnect");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    q.publish("t", b"after").await.unwrap();
    let d = recv(&q, "t", "c", Duration::from_secs(2))
        .await
        .expect("an item after the restart");
    assert_eq!(
        d.payload, b"after",
        "the restarted server has no persistence, so only new items"
    );
    q.ack(&d).await.unwrap();
    assert_eq!(q.backlog("t").await.unwrap(), 0);
}

#[tokio::test]
async fn unknown_url_scheme_is_refused() {
    let err = queue::connect("amqp://user:secret@host/", opts())
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("amqp://") && err.contains("redis://"), "{err}");
    assert!(!err.contains("secret"), "password leaked: {err}");
    let err = queue::connect("redis://127.0.0.1:1", opts())
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("127.0.0.1:1"), "{err}");
}
