//! A fake GitHub for the crawler tests (axum on 127.0.0.1:0): REST with Link pagination,
//! ETags and per-token rate limits in fixed windows, GraphQL, search, and faults injected once
//! per path (429 with `retry-after`, an HTML abuse page, a 502). Payloads copy the shape of
//! GitHub's (see shared/data/github/rest), with our own small contents; each test sets the
//! repositories, PRs, commits and files it needs in [`Data`].
#![allow(dead_code)] // each test crate uses its own part of the fake

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use davinci_crawler::github::GithubConfig;
use serde_json::{Value, json};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Rate-limit window of the fake, in seconds.
pub const WINDOW: u64 = 2;

/// What the fake knows.
#[derive(Default)]
pub struct Data {
    /// Search results, most starred first; also the `/repos/{o}/{r}` answers (others get a
    /// default repository).
    pub repos: Vec<Value>,
    /// `owner/name` → the PRs `/pulls` lists and `/pulls/{n}` answers.
    pub pulls: BTreeMap<String, Vec<Value>>,
    /// (`owner/name`, n) → `/pulls/{n}/commits` and `/pulls/{n}/files`.
    pub commits: HashMap<(String, u64), Vec<Value>>,
    pub files: HashMap<(String, u64), Vec<Value>>,
}

impl Data {
    /// Five search results and five `acme/widgets` PRs (4 closed unmerged, 5 by a bot).
    pub fn widgets() -> Self {
        Self {
            repos: vec![
                repo_json("acme/big", 900, false, "MIT", "Python"),
                repo_json("acme/old", 800, true, "MIT", "Python"),
                repo_json("acme/gpl", 700, false, "GPL-3.0", "Python"),
                repo_json("acme/widgets", 600, false, "Apache-2.0", "Python"),
                repo_json("acme/small", 3, false, "MIT", "Python"),
            ],
            pulls: [("acme/widgets".to_string(), widgets_pulls())].into(),
            ..Default::default()
        }
    }
}

#[derive(Default)]
pub struct Fake {
    /// Base URL (`http://127.0.0.1:port`).
    pub base: String,
    /// Requests allowed per token per window.
    pub limit: u64,
    /// (token, window index) → requests counted.
    pub used: Mutex<HashMap<(String, u64), u64>>,
    /// Requests refused because the token had no budget left: avoidable by a polite client.
    pub over_limit: Mutex<u64>,
    /// Paths (with query) that fail once with the given fault.
    pub faults: Mutex<HashMap<String, &'static str>>,
    fired: Mutex<HashSet<String>>,
    pub requests: Mutex<u64>,
    /// Answers `304 Not Modified`.
    pub not_modified: Mutex<u64>,
    /// Paths (with query) requested, in order.
    pub log: Mutex<Vec<String>>,
    /// Leave `x-ratelimit-*` off successful responses (as some proxies do).
    pub hide_headers: bool,
    pub data: Mutex<Data>,
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

pub type S = Arc<Fake>;

pub fn user(login: &str, kind: &str) -> Value {
    json!({"login": login, "id": 1, "node_id": "U_1", "avatar_url": "", "gravatar_id": "", "url": format!("https://api.github.com/users/{login}"), "type": kind, "site_admin": false})
}

pub fn repo_json(name: &str, stars: u64, archived: bool, license: &str, lang: &str) -> Value {
    json!({"id": stars, "node_id": "R_1", "name": name.split('/').nth(1), "full_name": name, "private": false,
      "owner": user(name.split('/').next().unwrap(), "Organization"), "description": "d", "fork": false,
      "stargazers_count": stars, "watchers_count": stars, "language": lang, "archived": archived,
      "license": {"key": license.to_lowercase(), "name": license, "spdx_id": license}, "default_branch": "main"})
}

/// A PR as `/pulls/{n}` answers it.
pub fn pull_json(
    repo: &str,
    n: u64,
    merged: bool,
    author: Value,
    body: &str,
    merge_commit_sha: &str,
) -> Value {
    json!({"url": format!("https://api.github.com/repos/{repo}/pulls/{n}"), "id": n, "number": n, "state": "closed",
      "title": format!("PR {n}"), "user": author, "body": body,
      "labels": [{"id": 1, "name": "bug"}], "created_at": "2024-01-01T00:00:00Z", "closed_at": "2024-01-02T00:00:00Z",
      "merged_at": if merged { json!("2024-01-02T00:00:00Z") } else { Value::Null },
      "merge_commit_sha": merge_commit_sha, "author_association": "CONTRIBUTOR",
      "head": {"ref": format!("feat{n}"), "sha": "h"}, "base": {"ref": "main", "sha": "b"}})
}

fn widgets_pulls() -> Vec<Value> {
    (1..=5u64)
        .map(|n| {
            let u = if n == 5 {
                user("renovate[bot]", "Bot")
            } else {
                user("alice", "User")
            };
            let body = if n == 1 {
                "Fixes #10 and also see #11.\r\n".to_string()
            } else {
                format!("body {n}")
            };
            pull_json("acme/widgets", n, n != 4, u, &body, &format!("{n:040}"))
        })
        .collect()
}

/// A commit as `/pulls/{n}/commits` lists it; `account` is the GitHub user (None: the email
/// belongs to no account).
pub fn commit_json(sha: &str, message: &str, account: Option<(&str, &str)>) -> Value {
    json!({"sha": sha, "node_id": "C_1", "url": format!("https://api.github.com/repos/a/b/commits/{sha}"),
      "commit": {"author": {"name": "A", "email": "a@example.com", "date": "2024-01-01T00:00:00Z"},
                 "committer": {"name": "A", "email": "a@example.com", "date": "2024-01-01T00:00:00Z"},
                 "message": message, "tree": {"sha": "t", "url": "u"}},
      "author": account.map(|(l, k)| user(l, k)), "committer": account.map(|(l, k)| user(l, k)),
      "parents": [{"sha": "p", "url": "u"}]})
}

/// A file as `/pulls/{n}/files` lists it.
pub fn file_json(path: &str, status: &str, previous: Option<&str>) -> Value {
    let mut f = json!({"sha": "s", "filename": path, "status": status, "additions": 1, "deletions": 1, "changes": 2,
      "blob_url": "u", "raw_url": "u", "contents_url": "u", "patch": "@@ -1 +1 @@\n-a\n+b"});
    if let Some(p) = previous {
        f["previous_filename"] = json!(p);
    }
    f
}

/// Counts the request against its token; `Err` is the 403 for a token over its budget.
#[allow(clippy::result_large_err)] // a test helper; the error is the response to send
fn meter(
    s: &Fake,
    headers: &HeaderMap,
    counts: bool,
) -> Result<Vec<(&'static str, String)>, Response> {
    *s.requests.lock().unwrap() += 1;
    let token = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("anon")
        .to_string();
    let w = now() / WINDOW;
    let reset = (w + 1) * WINDOW;
    let mut used = s.used.lock().unwrap();
    let n = used.entry((token, w)).or_default();
    if *n >= s.limit {
        *s.over_limit.lock().unwrap() += 1;
        let body = json!({"message": "API rate limit exceeded", "documentation_url": "https://docs.github.com/rest/overview/rate-limits-for-the-rest-api"});
        let mut r = (StatusCode::FORBIDDEN, axum::Json(body)).into_response();
        let h = r.headers_mut();
        h.insert("x-ratelimit-limit", s.limit.into());
        h.insert("x-ratelimit-remaining", 0u64.into());
        h.insert("x-ratelimit-reset", reset.into());
        return Err(r);
    }
    if counts {
        *n += 1;
    }
    if s.hide_headers {
        return Ok(vec![]);
    }
    Ok(vec![
        ("x-ratelimit-limit", s.limit.to_string()),
        ("x-ratelimit-remaining", (s.limit - *n).to_string()),
        ("x-ratelimit-reset", reset.to_string()),
    ])
}

/// A fault injected once for this path: 429 + retry-after, an HTML abuse page, or a 502.
fn fault(s: &Fake, key: &str) -> Option<Response> {
    let f = *s.faults.lock().unwrap().get(key)?;
    if !s.fired.lock().unwrap().insert(key.to_string()) {
        return None;
    }
    Some(match f {
        "429" => (StatusCode::TOO_MANY_REQUESTS, [("retry-after", "1"), ("content-type", "application/json")], r#"{"message":"You have exceeded a secondary rate limit"}"#).into_response(),
        "html" => (StatusCode::FORBIDDEN, [("content-type", "text/html; charset=utf-8"), ("retry-after", "1")], "<!DOCTYPE html><html><head><title>Whoa there!</title></head><body>You have triggered an abuse detection mechanism.</body></html>").into_response(),
        _ => (StatusCode::BAD_GATEWAY, "bad gateway").into_response(),
    })
}

/// JSON with ETag handling: a matching `If-None-Match` gets a 304 that does not count
/// against the rate limit (as on GitHub).
fn respond(
    s: &Fake,
    headers: &HeaderMap,
    uri: &Uri,
    body: Value,
    link: Option<String>,
) -> Response {
    let key = uri
        .path_and_query()
        .map(|p| p.as_str().to_string())
        .unwrap_or_default();
    s.log.lock().unwrap().push(key.clone());
    let text = body.to_string();
    let etag = format!(
        "\"{}\"",
        &davinci_core::hash::sha256_hex(text.as_bytes())[..20]
    );
    let not_modified =
        headers.get("if-none-match").and_then(|v| v.to_str().ok()) == Some(etag.as_str());
    let rl = match meter(s, headers, !not_modified) {
        Ok(h) => h,
        Err(r) => return r,
    };
    if let Some(r) = fault(s, &key) {
        return r;
    }
    let mut r = if not_modified {
        *s.not_modified.lock().unwrap() += 1;
        StatusCode::NOT_MODIFIED.into_response()
    } else {
        (
            StatusCode::OK,
            [("content-type", "application/json; charset=utf-8")],
            text,
        )
            .into_response()
    };
    let h = r.headers_mut();
    for (k, v) in rl {
        h.insert(k, v.parse().unwrap());
    }
    h.insert("etag", etag.parse().unwrap());
    if let Some(l) = link {
        h.insert("link", l.parse().unwrap());
    }
    r
}

fn not_found() -> Response {
    (
        StatusCode::NOT_FOUND,
        axum::Json(json!({"message": "Not Found"})),
    )
        .into_response()
}

/// One page of `items` by `per_page`/`page`, with GitHub's `Link` header for the next.
fn page_of(
    s: &Fake,
    uri: &Uri,
    items: Vec<Value>,
    q: &HashMap<String, String>,
) -> (Vec<Value>, Option<String>) {
    let per: usize = q.get("per_page").and_then(|v| v.parse().ok()).unwrap_or(30);
    let page: usize = q.get("page").and_then(|v| v.parse().ok()).unwrap_or(1);
    let chunk: Vec<Value> = items
        .iter()
        .skip((page - 1) * per)
        .take(per)
        .cloned()
        .collect();
    let next = (page * per < items.len()).then(|| {
        let mut u = url::Url::parse(&format!("{}{}", s.base, uri.path())).unwrap();
        let mut qs: BTreeMap<String, String> = q.clone().into_iter().collect();
        qs.insert("page".into(), (page + 1).to_string());
        u.query_pairs_mut().clear().extend_pairs(qs.iter());
        format!("<{u}>; rel=\"next\", <{u}>; rel=\"last\"")
    });
    (chunk, next)
}

type Q = Query<HashMap<String, String>>;

async fn repo(
    State(s): State<S>,
    h: HeaderMap,
    uri: Uri,
    Path((o, r)): Path<(String, String)>,
) -> Response {
    let name = format!("{o}/{r}");
    let found = s
        .data
        .lock()
        .unwrap()
        .repos
        .iter()
        .find(|x| x["full_name"] == name.as_str())
        .cloned();
    respond(
        &s,
        &h,
        &uri,
        found.unwrap_or_else(|| repo_json(&name, 120, false, "MIT", "Python")),
        None,
    )
}

async fn search(State(s): State<S>, h: HeaderMap, uri: Uri, Query(q): Q) -> Response {
    let items = s.data.lock().unwrap().repos.clone();
    let total = items.len();
    let (chunk, next) = page_of(&s, &uri, items, &q);
    respond(
        &s,
        &h,
        &uri,
        json!({"total_count": total, "incomplete_results": false, "items": chunk}),
        next,
    )
}

async fn pulls(
    State(s): State<S>,
    h: HeaderMap,
    uri: Uri,
    Path((o, r)): Path<(String, String)>,
    Query(q): Q,
) -> Response {
    let items = s
        .data
        .lock()
        .unwrap()
        .pulls
        .get(&format!("{o}/{r}"))
        .cloned()
        .unwrap_or_default();
    let (chunk, next) = page_of(&s, &uri, items, &q);
    respond(&s, &h, &uri, Value::Array(chunk), next)
}

async fn pull(
    State(s): State<S>,
    h: HeaderMap,
    uri: Uri,
    Path((o, r, n)): Path<(String, String, u64)>,
) -> Response {
    let found = s
        .data
        .lock()
        .unwrap()
        .pulls
        .get(&format!("{o}/{r}"))
        .and_then(|ps| ps.iter().find(|p| p["number"] == n).cloned());
    match found {
        Some(p) => respond(&s, &h, &uri, p, None),
        None => not_found(),
    }
}

async fn pull_list(
    s: S,
    h: HeaderMap,
    uri: Uri,
    key: (String, u64),
    q: HashMap<String, String>,
    files: bool,
) -> Response {
    let items = {
        let d = s.data.lock().unwrap();
        let known = d
            .pulls
            .get(&key.0)
            .is_some_and(|ps| ps.iter().any(|p| p["number"] == key.1));
        let m = if files { &d.files } else { &d.commits };
        match (known, m.get(&key)) {
            (false, _) => None,
            (true, l) => Some(l.cloned().unwrap_or_default()),
        }
    };
    let Some(items) = items else {
        return not_found();
    };
    let (chunk, next) = page_of(&s, &uri, items, &q);
    respond(&s, &h, &uri, Value::Array(chunk), next)
}

pub async fn serve_with(limit: u64, hide_headers: bool, data: Data) -> (String, S) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let s: S = Arc::new(Fake {
        base: base.clone(),
        limit,
        hide_headers,
        data: Mutex::new(data),
        ..Default::default()
    });
    let app = Router::new()
        .route("/repos/{o}/{r}", get(repo))
        .route("/search/repositories", get(search))
        .route("/repos/{o}/{r}/pulls", get(pulls))
        .route("/repos/{o}/{r}/pulls/{n}", get(pull))
        .route("/repos/{o}/{r}/pulls/{n}/commits", get(|State(s): State<S>, h: HeaderMap, uri: Uri, Path((o, r, n)): Path<(String, String, u64)>, Query(q): Q| async move {
            pull_list(s, h, uri, (format!("{o}/{r}"), n), q, false).await
        }))
        .route("/repos/{o}/{r}/pulls/{n}/files", get(|State(s): State<S>, h: HeaderMap, uri: Uri, Path((o, r, n)): Path<(String, String, u64)>, Query(q): Q| async move {
            pull_list(s, h, uri, (format!("{o}/{r}"), n), q, true).await
        }))
        .route("/repos/{o}/{r}/pulls/{n}/reviews", get(|State(s): State<S>, h: HeaderMap, uri: Uri| async move {
            respond(&s, &h, &uri, json!([{"id": 7, "user": user("bob", "User"), "body": "LGTM", "state": "APPROVED", "author_association": "MEMBER", "submitted_at": "2024-01-02T00:00:00Z", "commit_id": "c"}]), None)
        }))
        .route("/repos/{o}/{r}/pulls/{n}/comments", get(|State(s): State<S>, h: HeaderMap, uri: Uri| async move {
            respond(&s, &h, &uri, json!([{"id": 70, "pull_request_review_id": 7, "diff_hunk": "@@ -1 +1 @@", "path": "a.py", "user": user("bob", "User"), "body": "nit", "line": 3, "original_line": 3, "author_association": "MEMBER"}]), None)
        }))
        .route("/repos/{o}/{r}/issues/{n}/comments", get(|State(s): State<S>, h: HeaderMap, uri: Uri| async move {
            respond(&s, &h, &uri, json!([{"id": 9, "user": user("carol", "User"), "body": "thanks", "created_at": "2024-01-02T00:00:00Z", "author_association": "NONE"}]), None)
        }))
        .route("/repos/{o}/{r}/issues/{n}", get(|State(s): State<S>, h: HeaderMap, uri: Uri, Path((_, _, n)): Path<(String, String, u64)>| async move {
            let mut issue = json!({"number": n, "title": format!("Issue {n}"), "body": format!("issue body {n}"), "state": "closed", "user": user("dave", "User")});
            if n == 11 {
                issue["pull_request"] = json!({"url": "x"});
            }
            respond(&s, &h, &uri, issue, None)
        }))
        .route("/graphql", post(|State(s): State<S>, h: HeaderMap, uri: Uri, body: Bytes| async move {
            let req: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
            let n = req.pointer("/variables/number").and_then(|v| v.as_u64()).unwrap_or(0);
            if !req["query"].as_str().unwrap_or("").contains("closingIssuesReferences") {
                return respond(&s, &h, &uri, json!({"errors": [{"message": "unknown query"}]}), None);
            }
            let data = json!({"data": {"repository": {"pullRequest": {
                "closingIssuesReferences": {"nodes": if n == 1 { json!([{"number": 12, "title": "Crash", "body": "it crashes"}]) } else { json!([]) }},
                "comments": {"nodes": [{"author": {"login": "carol", "__typename": "User"}, "authorAssociation": "NONE", "body": "thanks", "createdAt": "2024-01-02T00:00:00Z"}]},
                "reviews": {"nodes": [{"author": {"login": "bob", "__typename": "User"}, "authorAssociation": "MEMBER", "state": "CHANGES_REQUESTED", "body": "please fix",
                    "comments": {"nodes": [{"path": "a.py", "line": 3, "originalLine": 3, "diffHunk": "@@ -1 +1 @@", "body": "nit"}]}}]}
            }}}});
            respond(&s, &h, &uri, data, None)
        }))
        .with_state(s.clone());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (base, s)
}

/// The client settings the tests use: the fake's window, short back-offs, small pages.
pub fn cfg(base: &str, budget: u64) -> GithubConfig {
    GithubConfig {
        api_url: base.to_string(),
        budget_per_window: budget,
        window_secs: WINDOW,
        secondary_backoff: Duration::from_millis(300),
        per_page: 2,
        ..Default::default()
    }
}

/// Runs `git` in `dir`; returns stdout.
pub fn git(dir: &std::path::Path, args: &[&str]) -> String {
    let o = std::process::Command::new("git")
        .current_dir(dir)
        .args(args)
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "git {args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).trim().to_string()
}
