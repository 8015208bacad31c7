//! Crash test with separate OS processes on a real Redis: a consumer process is SIGKILLed while
//! holding items; another consumer process receives them after the visibility timeout; every
//! item's effect happens exactly once.
//!
//! The consumer processes are this test binary re-executed (`current_exe()`) to run the ignored
//! test `consumer_process`, with its role in an environment variable; no extra build step.
use davinci_runtime::queue::{self, QueueOptions, WorkQueue};
use davinci_testkit::RedisServer;
use redis::AsyncCommands;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

const ROLE_ENV: &str = "DAVINCI_QUEUE_SIGKILL_ROLE";
const URL_ENV: &str = "DAVINCI_QUEUE_SIGKILL_URL";
const DIR_ENV: &str = "DAVINCI_QUEUE_SIGKILL_DIR";
const TOPIC: &str = "sigkill";
const VT: Duration = Duration::from_secs(1);
const ITEMS: [&str; 3] = ["item-0", "item-1", "item-2"];

fn opts() -> QueueOptions {
    QueueOptions {
        visibility_timeout: VT,
        max_attempts: 3,
        high_water_mark: 100,
        group: "sigkill".into(),
        ..Default::default()
    }
}

fn now_ms() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis()
}

/// The item's effect, made idempotent by a marker key: `applied:{item}` and `effects_total`
/// are incremented only by whoever sets `effect:{item}` first. Returns whether it applied now.
async fn apply_effect(con: &mut redis::aio::MultiplexedConnection, item: &str, by: &str) -> bool {
    let script = redis::Script::new(
        r"if redis.call('SET', KEYS[1], ARGV[1], 'NX') then
            redis.call('INCR', KEYS[2]); redis.call('INCR', KEYS[3]); return 1
          end
          return 0",
    );
    let applied: i32 = script
        .key(format!("effect:{item}"))
        .key(format!("applied:{item}"))
        .key("effects_total")
        .arg(by)
        .invoke_async(con)
        .await
        .expect("applying the effect");
    applied == 1
}

/// Writes `text` to `path` atomically, so the parent never reads a half-written marker.
fn write_atomic(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// Holder: takes two items, applies the first one's effect (then "crashes" before acking it)
/// and not the second's (crashes before doing the work), signals, and waits to be killed.
async fn holder(q: Arc<dyn WorkQueue>, mut con: redis::aio::MultiplexedConnection, dir: &Path) {
    let me = format!("holder-{}", std::process::id());
    // Before the first receive, so redelivery must come at least VT after this time.
    let started = now_ms();
    let first = q
        .receive(TOPIC, &me, Duration::from_secs(10))
        .await
        .unwrap()
        .expect("first item");
    assert!(apply_effect(&mut con, &String::from_utf8_lossy(&first.payload), "holder").await);
    let second = q
        .receive(TOPIC, &me, Duration::from_secs(10))
        .await
        .unwrap()
        .expect("second item");
    let marker = format!(
        "{}\n{}\n{}\n",
        started,
        String::from_utf8_lossy(&first.payload),
        String::from_utf8_lossy(&second.payload)
    );
    write_atomic(&dir.join("holder.ready"), &marker);
    tokio::time::sleep(Duration::from_secs(120)).await;
    panic!("the holder was not killed");
}

/// Worker: processes items idempotently until all of them are acked, reporting each delivery.
async fn worker(q: Arc<dyn WorkQueue>, mut con: redis::aio::MultiplexedConnection, dir: &Path) {
    let me = format!("worker-{}", std::process::id());
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut report = String::new();
    let mut acked = std::collections::BTreeSet::new();
    while acked.len() < ITEMS.len() {
        assert!(
            Instant::now() < deadline,
            "worker timed out; acked only {acked:?}"
        );
        let Some(d) = q.receive(TOPIC, &me, Duration::from_secs(1)).await.unwrap() else {
            continue;
        };
        let item = String::from_utf8(d.payload.clone()).unwrap();
        let applied = apply_effect(&mut con, &item, "worker").await;
        q.ack(&d).await.unwrap();
        report.push_str(&format!("{item} {} {applied} {}\n", d.attempt, now_ms()));
        acked.insert(item);
    }
    write_atomic(&dir.join("worker.report"), &report);
}

/// Entry point of the consumer child processes; does nothing unless started by the test below.
#[test]
#[ignore = "run as a child process by killed_consumer_items_take_effect_exactly_once"]
fn consumer_process() {
    let Ok(role) = std::env::var(ROLE_ENV) else {
        eprintln!(
            "consumer_process runs only as a child of killed_consumer_items_take_effect_exactly_once"
        );
        return;
    };
    let url = std::env::var(URL_ENV).unwrap();
    let dir = PathBuf::from(std::env::var(DIR_ENV).unwrap());
    tokio::runtime::Runtime::new().unwrap().block_on(async {
        let q = queue::connect(&url, opts()).await.unwrap();
        let con = redis::Client::open(url.as_str())
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .unwrap();
        match role.as_str() {
            "holder" => holder(q, con, &dir).await,
            "worker" => worker(q, con, &dir).await,
            other => panic!("unknown role {other}"),
        }
    });
}

fn spawn_consumer(role: &str, url: &str, dir: &Path) -> Child {
    let log = std::fs::File::create(dir.join(format!("{role}.log"))).unwrap();
    Command::new(std::env::current_exe().unwrap())
        .args([
            "consumer_process",
            "--exact",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(ROLE_ENV, role)
        .env(URL_ENV, url)
        .env(DIR_ENV, dir)
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .expect("starting the consumer process")
}

fn log_of(dir: &Path, role: &str) -> String {
    std::fs::read_to_string(dir.join(format!("{role}.log"))).unwrap_or_default()
}

/// Waits for `path` to appear while `child` is alive.
fn wait_for_file(path: &Path, child: &mut Child, dir: &Path, role: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(text) = std::fs::read_to_string(path) {
            return text;
        }
        if let Some(status) = child.try_wait().unwrap() {
            panic!(
                "{role} exited ({status}) before writing {}:\n{}",
                path.display(),
                log_of(dir, role)
            );
        }
        assert!(
            Instant::now() < deadline,
            "{role} did not write {} in time:\n{}",
            path.display(),
            log_of(dir, role)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn killed_consumer_items_take_effect_exactly_once() {
    let server = RedisServer::start().expect("starting redis-server");
    let url = server.url();
    let dir = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let q = rt.block_on(queue::connect(&url, opts())).unwrap();
    for item in ITEMS {
        rt.block_on(q.publish(TOPIC, item.as_bytes())).unwrap();
    }

    // 1. The holder takes item-0 (applies its effect) and item-1 (does not), then is killed.
    let mut holder = spawn_consumer("holder", &url, dir.path());
    let marker = wait_for_file(
        &dir.path().join("holder.ready"),
        &mut holder,
        dir.path(),
        "holder",
    );
    let mut lines = marker.lines();
    let taken_from: u128 = lines.next().unwrap().parse().unwrap();
    let held: Vec<&str> = lines.collect();
    assert_eq!(held, ["item-0", "item-1"]);
    holder.kill().unwrap(); // SIGKILL on Unix: no cleanup, no ack, no nack
    let status = holder.wait().unwrap();
    assert_eq!(
        status.signal(),
        Some(9),
        "holder should have died of SIGKILL, ended by {status}"
    );
    assert_eq!(
        rt.block_on(q.backlog(TOPIC)).unwrap(),
        3,
        "killed holder's items must stay in the backlog"
    );

    // 2. A second process gets everything, the held items only after the visibility timeout.
    let mut worker = spawn_consumer("worker", &url, dir.path());
    let report = wait_for_file(
        &dir.path().join("worker.report"),
        &mut worker,
        dir.path(),
        "worker",
    );
    let status = worker.wait().unwrap();
    assert!(
        status.success(),
        "worker failed ({status}):\n{}",
        log_of(dir.path(), "worker")
    );

    let mut seen = std::collections::BTreeMap::new();
    for line in report.lines() {
        let f: Vec<&str> = line.split(' ').collect();
        let (attempt, applied, at): (u32, bool, u128) = (
            f[1].parse().unwrap(),
            f[2].parse().unwrap(),
            f[3].parse().unwrap(),
        );
        assert!(
            seen.insert(f[0].to_string(), (attempt, applied, at))
                .is_none(),
            "{} delivered twice to the worker",
            f[0]
        );
    }
    let got: Vec<&String> = seen.keys().collect();
    assert_eq!(got, ITEMS.iter().collect::<Vec<_>>(), "report:\n{report}");
    for item in held {
        let (attempt, _, at) = seen[item];
        assert_eq!(attempt, 2, "{item} should be a redelivery");
        assert!(
            at >= taken_from + VT.as_millis(),
            "{item} redelivered {} ms after it was taken",
            at.saturating_sub(taken_from)
        );
    }
    assert!(
        !seen["item-0"].1,
        "item-0's effect was already applied by the holder"
    );
    assert!(seen["item-1"].1, "item-1's effect is the worker's to apply");
    assert_eq!(seen["item-2"], (1, true, seen["item-2"].2));

    // 3. Each effect happened exactly once, and nothing is left.
    rt.block_on(async {
        let mut con = redis::Client::open(url.as_str())
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .unwrap();
        for item in ITEMS {
            let n: Option<u64> = con.get(format!("applied:{item}")).await.unwrap();
            assert_eq!(n, Some(1), "effect count of {item}");
        }
        let total: u64 = con.get("effects_total").await.unwrap();
        assert_eq!(total, 3);
        let by: String = con.get("effect:item-0").await.unwrap();
        assert_eq!(by, "holder");
        assert_eq!(q.backlog(TOPIC).await.unwrap(), 0);
        assert!(q.dead_letters(TOPIC).await.unwrap().is_empty());
        let pending: redis::streams::StreamPendingReply = con
            .xpending(format!("{{{TOPIC}}}"), "sigkill")
            .await
            .unwrap();
        assert_eq!(pending.count(), 0, "entries left pending");
    });
    drop(server);
}
