//! GH Archive hourly files (`YYYY-MM-DD-H.json.gz`, one event per line) → candidate merged PRs.
//!
//! `PullRequestEvent`s that close or merge a PR matter, in any of the three [`Shape`]s the
//! feed has used. Payloads before 2025-10-07 carry the whole pull request (`merged`, `title`,
//! `user`, `merged_at`, …); later ones are trimmed to `{url, id, number, head, base}`, so a
//! `closed` event without merge state is settled through the API ([`fill_from_api`]), while a
//! `merged` event needs no call. Parsing is lenient: every field is optional, unknown fields are
//! ignored, and a line that is not JSON is counted, never fatal.
use crate::filter::Counts;
use crate::github::GithubClient;
use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read};

#[derive(Debug, Deserialize, Default)]
struct RawEvent {
    #[serde(rename = "type", default)]
    kind: String,
    #[serde(default)]
    repo: Option<RawRepo>,
    #[serde(default)]
    payload: Option<RawPayload>,
    #[serde(default)]
    created_at: Option<String>,
}

#[derive(Debug, Deserialize, Default)]
struct RawRepo {
    #[serde(default)]
    name: String,
}

#[derive(Debug, Deserialize, Default)]
struct RawPayload {
    #[serde(default)]
    action: String,
    #[serde(default)]
    number: Option<u64>,
    #[serde(default)]
    pull_request: Option<RawPull>,
}

#[derive(Debug, Deserialize, Default)]
struct RawPull {
    #[serde(default)]
    number: Option<u64>,
    #[serde(default)]
    merged: Option<bool>,
    #[serde(default)]
    merged_at: Option<String>,
    #[serde(default)]
    merge_commit_sha: Option<String>,
    #[serde(default)]
    title: Option<String>,
    #[serde(default)]
    user: Option<RawUser>,
    #[serde(default)]
    head: Option<RawRef>,
    #[serde(default)]
    base: Option<RawRef>,
}

#[derive(Debug, Deserialize, Default)]
struct RawUser {
    #[serde(default)]
    login: String,
    #[serde(rename = "type", default)]
    kind: Option<String>,
}

#[derive(Debug, Deserialize, Default)]
struct RawRef {
    #[serde(rename = "ref", default)]
    name: Option<String>,
    #[serde(default)]
    sha: Option<String>,
}

/// How a `PullRequestEvent` says (or does not say) that its PR was merged. The feed has used
/// three shapes: `closed` with the full pull request (`merged: true|false`, before
/// 2025-10-07), `closed` trimmed to `{url, id, number, head, base}` (no merge state), and, as
/// public pipelines reading current hours report, `merged` as an action of its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Shape {
    /// `action: merged`: a merge, whatever else the payload carries.
    Merged,
    /// `action: closed` with `merged: true` (or a `merged_at`).
    ClosedMerged,
    /// `action: closed` with `merged: false`.
    ClosedUnmerged,
    /// `action: closed` without merge state: settled through the API.
    ClosedTrimmed,
}

impl Shape {
    pub const ALL: [Shape; 4] = [
        Shape::Merged,
        Shape::ClosedMerged,
        Shape::ClosedUnmerged,
        Shape::ClosedTrimmed,
    ];

    /// The key in `stats/crawl.json`.
    pub fn name(self) -> &'static str {
        match self {
            Shape::Merged => "merged",
            Shape::ClosedMerged => "closed_merged",
            Shape::ClosedUnmerged => "closed_unmerged",
            Shape::ClosedTrimmed => "closed_trimmed",
        }
    }

    /// Which event of a PR decides it: a merge beats a closing without merge, which beats
    /// a closing that says nothing.
    fn rank(self) -> u8 {
        match self {
            Shape::Merged | Shape::ClosedMerged => 2,
            Shape::ClosedUnmerged => 1,
            Shape::ClosedTrimmed => 0,
        }
    }
}

/// A closed or merged PR seen in the archive that may have been merged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ArchiveCandidate {
    /// `owner/name`.
    pub repo: String,
    pub number: u64,
    /// `Some(true)` from a `merged` event or a full payload; `None` when the payload was
    /// trimmed (ask the API).
    pub merged: Option<bool>,
    pub title: Option<String>,
    pub author: Option<String>,
    pub author_is_bot: bool,
    pub merge_commit_sha: Option<String>,
    pub head_sha: Option<String>,
    pub base_ref: Option<String>,
    pub event_at: Option<String>,
}

/// One merge-relevant event of an hour.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ArchiveEvent {
    pub shape: Shape,
    pub cand: ArchiveCandidate,
}

/// What one hourly file holds: its merge-relevant events in file order, and the other
/// pull-request events counted (`bad_line`, `not_closed`); `counts.input` is every
/// pull-request event.
#[derive(Debug, Clone, Default)]
pub struct HourRead {
    pub events: Vec<ArchiveEvent>,
    pub counts: Counts,
}

/// Per GH Archive file in `stats/crawl.json`: pull-request events in, candidates out, drops
/// by reason, and the events and candidates of each [`Shape`].
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ArchiveFileStats {
    #[serde(flatten)]
    pub counts: Counts,
    /// Events of each shape (plus `other_action` for opened, labeled, …).
    pub events: BTreeMap<String, u64>,
    /// Candidates each shape gave, after duplicates and the API's answers.
    pub candidates: BTreeMap<String, u64>,
}

impl ArchiveFileStats {
    /// Counts one candidate kept from an event of `shape`.
    pub fn keep(&mut self, shape: Shape) {
        self.counts.keep();
        *self.candidates.entry(shape.name().into()).or_default() += 1;
    }
}

/// Reads one hourly file (gzip if it starts with the gzip magic, plain JSONL otherwise).
/// Every `PullRequestEvent` is either returned as an [`ArchiveEvent`] or counted in
/// `counts.drops` (`bad_line`, `not_closed` for other actions); `counts.input` is the number
/// of pull-request events. Nothing is deduplicated here: see [`decide`].
pub fn read_hour(mut reader: impl Read) -> Result<HourRead> {
    let mut head = [0u8; 2];
    let n = reader.read(&mut head).context("reading GH Archive file")?;
    let chained = std::io::Cursor::new(head[..n].to_vec()).chain(reader);
    let lines: Box<dyn BufRead> = if n == 2 && head == [0x1f, 0x8b] {
        Box::new(BufReader::new(flate2::read::MultiGzDecoder::new(chained)))
    } else {
        Box::new(BufReader::new(chained))
    };
    let mut out = HourRead::default();
    for line in lines.lines() {
        let line = line.context("reading GH Archive line")?;
        if line.trim().is_empty() {
            continue;
        }
        // cheap pre-check: most events are not pull requests
        if !line.contains("\"PullRequestEvent\"") {
            continue;
        }
        let Ok(ev) = serde_json::from_str::<RawEvent>(&line) else {
            out.counts.drop("bad_line");
            continue;
        };
        if ev.kind != "PullRequestEvent" {
            continue;
        }
        match event_of(ev) {
            Ok(e) => {
                out.counts.input += 1;
                out.events.push(e);
            }
            Err(why) => out.counts.drop(why),
        }
    }
    Ok(out)
}

/// One pull-request event as an [`ArchiveEvent`], or why it is not one.
fn event_of(ev: RawEvent) -> std::result::Result<ArchiveEvent, &'static str> {
    let p = ev.payload.ok_or("bad_line")?;
    let repo = ev.repo.map(|r| r.name).unwrap_or_default();
    let pr = p.pull_request.unwrap_or_default();
    let number = p.number.or(pr.number).ok_or("bad_line")?;
    if repo.split('/').count() != 2 {
        return Err("bad_line");
    }
    let state = pr.merged.or(pr.merged_at.as_ref().map(|_| true));
    let shape = match (p.action.as_str(), state) {
        ("merged", _) => Shape::Merged,
        ("closed", Some(true)) => Shape::ClosedMerged,
        ("closed", Some(false)) => Shape::ClosedUnmerged,
        ("closed", None) => Shape::ClosedTrimmed,
        _ => return Err("not_closed"),
    };
    let author_is_bot = pr
        .user
        .as_ref()
        .is_some_and(|u| u.kind.as_deref() == Some("Bot") || u.login.ends_with("[bot]"));
    let merged = match shape {
        Shape::Merged | Shape::ClosedMerged => Some(true),
        Shape::ClosedUnmerged => Some(false),
        Shape::ClosedTrimmed => None,
    };
    Ok(ArchiveEvent {
        shape,
        cand: ArchiveCandidate {
            repo,
            number,
            merged,
            title: pr.title,
            author: pr.user.map(|u| u.login),
            author_is_bot,
            merge_commit_sha: pr.merge_commit_sha,
            head_sha: pr.head.as_ref().and_then(|h| h.sha.clone()),
            base_ref: pr.base.as_ref().and_then(|b| b.name.clone()),
            event_at: ev.created_at,
        },
    })
}

/// A PR's deciding event and the file (index into the hours given to [`decide`]) it is
/// counted in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decided {
    pub file: usize,
    pub shape: Shape,
    pub cand: ArchiveCandidate,
}

/// One decision per PR over every hour, in order: the first event of the highest-ranked
/// shape decides (a merge beats a closing without merge, which beats a trimmed closing);
/// every other event of that PR is a `duplicate_event` in its own file. A PR closed unmerged
/// is dropped as `not_merged`, a merge by a bot the payload names as `bot_author`. Returned:
/// the merges and the trimmed closings still to settle through the API, and per file its
/// stats so far (candidates are counted by the caller once settled, with
/// [`ArchiveFileStats::keep`]).
pub fn decide(hours: &[HourRead]) -> (Vec<Decided>, Vec<ArchiveFileStats>) {
    let mut stats: Vec<ArchiveFileStats> = hours
        .iter()
        .map(|h| {
            let mut s = ArchiveFileStats {
                counts: h.counts.clone(),
                ..Default::default()
            };
            // `input` is recounted below as each event finds its outcome
            s.counts.input = h.counts.dropped();
            for shape in Shape::ALL {
                s.events.insert(shape.name().into(), 0);
            }
            s.events.insert(
                "other_action".into(),
                h.counts.drops.get("not_closed").copied().unwrap_or(0),
            );
            for e in &h.events {
                *s.events.entry(e.shape.name().into()).or_default() += 1;
            }
            s
        })
        .collect();
    let mut best: BTreeMap<(&str, u64), (usize, usize)> = BTreeMap::new();
    for (f, h) in hours.iter().enumerate() {
        for (i, e) in h.events.iter().enumerate() {
            let key = (e.cand.repo.as_str(), e.cand.number);
            let loser = match best.get(&key).copied() {
                None => {
                    best.insert(key, (f, i));
                    continue;
                }
                Some((bf, bi)) if e.shape.rank() > hours[bf].events[bi].shape.rank() => {
                    best.insert(key, (f, i));
                    bf
                }
                Some(_) => f,
            };
            stats[loser].counts.drop("duplicate_event");
        }
    }
    let mut decided = Vec::new();
    for (f, i) in best.into_values() {
        let e = &hours[f].events[i];
        match e.shape {
            Shape::ClosedUnmerged => stats[f].counts.drop("not_merged"),
            _ if e.cand.author_is_bot => stats[f].counts.drop("bot_author"),
            shape => decided.push(Decided {
                file: f,
                shape,
                cand: e.cand.clone(),
            }),
        }
    }
    decided.sort_by(|a, b| {
        (a.file, &a.cand.repo, a.cand.number).cmp(&(b.file, &b.cand.repo, b.cand.number))
    });
    (decided, stats)
}

/// Settles a trimmed candidate with the API: `Ok(Some)` with merge state, title, author and
/// merge commit filled when GitHub says it was merged, `Ok(None)` when it was not (or is gone).
pub async fn fill_from_api(
    client: &GithubClient,
    mut c: ArchiveCandidate,
) -> Result<Option<ArchiveCandidate>> {
    let Some(page) = client
        .get(&format!("repos/{}/pulls/{}", c.repo, c.number))
        .await?
    else {
        return Ok(None);
    };
    let b = &page.body;
    let merged_at = b.get("merged_at").and_then(|v| v.as_str());
    if merged_at.is_none() {
        return Ok(None);
    }
    c.merged = Some(true);
    let s = |k: &str| b.get(k).and_then(|v| v.as_str()).map(str::to_string);
    c.title = c.title.or_else(|| s("title"));
    c.merge_commit_sha = c.merge_commit_sha.or_else(|| s("merge_commit_sha"));
    if c.author.is_none() {
        c.author = b
            .pointer("/user/login")
            .and_then(|v| v.as_str())
            .map(str::to_string);
        c.author_is_bot = b.pointer("/user/type").and_then(|v| v.as_str()) == Some("Bot")
            || c.author.as_deref().is_some_and(|l| l.ends_with("[bot]"));
    }
    Ok(Some(c))
}

/// Candidates grouped by repository, numbers sorted (what the git crawl takes as `only`).
pub fn by_repo(cands: &[ArchiveCandidate]) -> BTreeMap<String, Vec<u64>> {
    let mut m: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    for c in cands {
        m.entry(c.repo.clone()).or_default().push(c.number);
    }
    for v in m.values_mut() {
        v.sort_unstable();
        v.dedup();
    }
    m
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    const OLD_MERGED: &str = r#"{"id":"1","type":"PullRequestEvent","actor":{"id":1,"login":"alice"},"repo":{"id":9,"name":"acme/widgets","url":"u"},"payload":{"action":"closed","number":5,"pull_request":{"url":"u","id":55,"number":5,"state":"closed","title":"Fix it","user":{"login":"alice","type":"User"},"body":null,"merged":true,"merged_at":"2024-01-01T00:00:00Z","merge_commit_sha":"abc","head":{"ref":"f","sha":"h"},"base":{"ref":"main","sha":"b"},"additions":3}},"public":true,"created_at":"2024-01-01T00:00:01Z"}"#;
    const OLD_CLOSED: &str = r#"{"type":"PullRequestEvent","repo":{"name":"acme/widgets"},"payload":{"action":"closed","number":6,"pull_request":{"number":6,"merged":false,"merged_at":null}}}"#;
    const OLD_BOT: &str = r#"{"type":"PullRequestEvent","repo":{"name":"acme/widgets"},"payload":{"action":"closed","number":8,"pull_request":{"number":8,"merged":true,"user":{"login":"dependabot[bot]","type":"Bot"}}}}"#;
    const OPENED: &str = r#"{"type":"PullRequestEvent","repo":{"name":"acme/widgets"},"payload":{"action":"opened","number":7,"pull_request":{"number":7}}}"#;
    const TRIMMED: &str = r#"{"id":"2","type":"PullRequestEvent","actor":{"id":1,"login":"bob"},"repo":{"id":10,"name":"acme/gadgets","url":"u"},"payload":{"action":"closed","number":12,"pull_request":{"url":"u","id":1212,"node_id":"PR_x","number":12,"head":{"ref":"x","sha":"h2","repo":{"id":10,"url":"u","name":"gadgets"}},"base":{"ref":"main","sha":"b2","repo":{"id":10,"url":"u","name":"gadgets"}}}},"public":true,"created_at":"2025-11-01T00:00:00Z"}"#;
    const PUSH: &str = r#"{"type":"PushEvent","repo":{"name":"acme/widgets"},"payload":{}}"#;

    const MERGED_NOW: &str = r#"{"id":"3","type":"PullRequestEvent","actor":{"id":1,"login":"carol"},"repo":{"id":10,"name":"acme/gadgets","url":"u"},"payload":{"action":"merged","number":13,"pull_request":{"url":"u","id":1313,"number":13,"head":{"ref":"y","sha":"h3"},"base":{"ref":"main","sha":"b3"}}},"public":true,"created_at":"2025-11-01T00:10:00Z"}"#;

    fn gz(lines: &[&str]) -> Vec<u8> {
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        for l in lines {
            writeln!(gz, "{l}").unwrap();
        }
        gz.finish().unwrap()
    }

    #[test]
    fn reads_every_shape_from_gzip_and_plain_jsonl() {
        let data = gz(&[
            OLD_MERGED,
            OLD_CLOSED,
            OLD_BOT,
            OPENED,
            TRIMMED,
            MERGED_NOW,
            PUSH,
            "{\"type\":\"PullRequestEvent\", broken",
        ]);
        let hour = read_hour(&data[..]).unwrap();
        let shapes: Vec<_> = hour
            .events
            .iter()
            .map(|e| (e.cand.number, e.shape))
            .collect();
        assert_eq!(
            shapes,
            [
                (5, Shape::ClosedMerged),
                (6, Shape::ClosedUnmerged),
                (8, Shape::ClosedMerged),
                (12, Shape::ClosedTrimmed),
                (13, Shape::Merged)
            ]
        );
        let merged_now = &hour.events[4].cand;
        assert_eq!(
            (
                merged_now.merged,
                merged_now.head_sha.as_deref(),
                merged_now.title.as_deref()
            ),
            (Some(true), Some("h3"), None)
        );
        assert_eq!(hour.events[0].cand.merge_commit_sha.as_deref(), Some("abc"));
        assert_eq!(
            hour.counts.input, 7,
            "every pull-request event, opened and broken included"
        );
        assert_eq!(hour.counts.drops.get("not_closed"), Some(&1));
        assert_eq!(hour.counts.drops.get("bad_line"), Some(&1));
        let plain = format!("{OLD_MERGED}\n{TRIMMED}\n");
        assert_eq!(read_hour(plain.as_bytes()).unwrap().events.len(), 2);
    }

    #[test]
    fn one_decision_per_pr_across_shapes_and_hours() {
        // hour 1: PR 12 trimmed, then merged (same hour); PR 5 merged twice; PR 6 closed
        // unmerged; a bot's merge. hour 2: PR 12 closed trimmed again, PR 6 merged after a
        // reopen, PR 5 trimmed.
        let closed_trimmed_12 = TRIMMED;
        let merged_12 = MERGED_NOW.replace("\"number\":13", "\"number\":12");
        let merged_6 = MERGED_NOW
            .replace("acme/gadgets", "acme/widgets")
            .replace("\"number\":13", "\"number\":6");
        let trimmed_5 = TRIMMED
            .replace("acme/gadgets", "acme/widgets")
            .replace("\"number\":12", "\"number\":5");
        let h1 = read_hour(
            gz(&[
                closed_trimmed_12,
                &merged_12,
                OLD_MERGED,
                OLD_MERGED,
                OLD_CLOSED,
                OLD_BOT,
                OPENED,
            ])
            .as_slice(),
        )
        .unwrap();
        let h2 = read_hour(gz(&[closed_trimmed_12, &merged_6, &trimmed_5]).as_slice()).unwrap();
        let (decided, stats) = decide(&[h1, h2]);
        let got: Vec<_> = decided
            .iter()
            .map(|d| (d.file, d.cand.repo.as_str(), d.cand.number, d.shape))
            .collect();
        assert_eq!(
            got,
            [
                (0, "acme/gadgets", 12, Shape::Merged),
                (0, "acme/widgets", 5, Shape::ClosedMerged),
                (1, "acme/widgets", 6, Shape::Merged),
            ]
        );
        let d = |f: usize, k: &str| stats[f].counts.drops.get(k).copied().unwrap_or(0);
        // hour 1: the trimmed 12 and the second 5 are duplicates, the bot is dropped, 6 lost
        // to hour 2's merge (a duplicate here), opened is not a closing
        assert_eq!(
            (
                d(0, "duplicate_event"),
                d(0, "bot_author"),
                d(0, "not_closed"),
                d(0, "not_merged")
            ),
            (3, 1, 1, 0)
        );
        assert_eq!(d(1, "duplicate_event"), 2);
        assert_eq!(stats[0].events["merged"], 1);
        assert_eq!(stats[0].events["closed_merged"], 3);
        assert_eq!(stats[0].events["closed_unmerged"], 1);
        assert_eq!(stats[0].events["closed_trimmed"], 1);
        assert_eq!(stats[0].events["other_action"], 1);
        assert_eq!(stats[1].events["closed_trimmed"], 2);
        // every event has one outcome once the candidates are kept
        let mut s0 = stats[0].clone();
        s0.keep(Shape::Merged);
        s0.keep(Shape::ClosedMerged);
        assert_eq!((s0.counts.input, s0.counts.out), (7, 2));
        assert_eq!(s0.candidates["merged"], 1);
        // hour 2 so far: its two duplicates; the merge of 6 is counted once kept
        assert_eq!(stats[1].counts.input, 2);
    }

    #[test]
    fn by_repo_groups_and_sorts_numbers() {
        let c = |repo: &str, n| ArchiveCandidate {
            repo: repo.into(),
            number: n,
            merged: Some(true),
            title: None,
            author: None,
            author_is_bot: false,
            merge_commit_sha: None,
            head_sha: None,
            base_ref: None,
            event_at: None,
        };
        let m = by_repo(&[c("a/b", 3), c("a/c", 1), c("a/b", 2), c("a/b", 3)]);
        assert_eq!(m["a/b"], [2, 3]);
        assert_eq!(m["a/c"], [1]);
    }
}
