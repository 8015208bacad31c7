//! A fake GitHub for the crawler tests (axum on 127.0.0.1:0): REST with Link pagination,
//! ETags and per-token rate limits in fixed windows, GraphQL (a real parser and executor,
//! [`graphql`]) charged in points by GitHub's formula against a budget of its own per token,
//! search, and faults injected once per path (429 with `retry-after`, an HTML abuse page, a
//! 502). Payloads copy the shape of GitHub's (see shared/data/github/rest), with our own small
//! contents; each test sets the repositories, PRs, commits and files it needs in [`Data`]. One
//! model of each PR's conversation ([`Conversation`]) is rendered by both REST and GraphQL.
#![allow(dead_code)] // each test crate uses its own part of the fake

pub mod graphql;

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
    /// (`owner/name`, n) → reviews, comments and closing references; PRs not named here have
    /// [`Conversation::standard`].
    pub conversations: HashMap<(String, u64), Conversation>,
    /// (`owner/name`, n) → `(title, body)` of issues whose text is not the default
    /// `Issue {n}` / `issue body {n}`.
    pub issues: HashMap<(String, u64), (String, String)>,
    /// Numbers that are PRs though not in `pulls` (an issue reference that names a PR).
    pub other_pulls: HashSet<(String, u64)>,
}

/// A PR's reviews (each with its review comments) and conversation comments, in GraphQL's
/// shape, and the issues it closes.
#[derive(Clone, Debug)]
pub struct Conversation {
    pub closing: Vec<u64>,
    pub comments: Vec<Value>,
    pub reviews: Vec<Value>,
}

/// An author as GraphQL gives it.
pub fn gql_author(login: &str, kind: &str) -> Value {
    json!({"login": login, "__typename": kind})
}

pub fn gql_comment(login: &str, body: &str, at: &str) -> Value {
    json!({"__typename": "IssueComment", "author": gql_author(login, "User"), "authorAssociation": "NONE",
      "body": body, "createdAt": at})
}

pub fn gql_review(login: &str, state: &str, body: &str, comments: Vec<Value>) -> Value {
    json!({"__typename": "PullRequestReview", "author": gql_author(login, "User"), "authorAssociation": "MEMBER",
      "state": state, "body": body, "comments": comments})
}

pub fn gql_review_comment(path: &str, line: Option<u64>, body: &str) -> Value {
    json!({"__typename": "PullRequestReviewComment", "path": path, "line": line, "originalLine": 3,
      "diffHunk": "@@ -1 +1 @@", "body": body})
}

impl Conversation {
    /// What every PR has unless a test says otherwise: one review with one comment, one
    /// conversation comment, and (PR 1 only) a closing reference to issue 12.
    pub fn standard(n: u64) -> Self {
        Self {
            closing: if n == 1 { vec![12] } else { vec![] },
            comments: vec![gql_comment("carol", "thanks", "2024-01-02T00:00:00Z")],
            reviews: vec![gql_review(
                "bob",
                "CHANGES_REQUESTED",
                "please fix",
                vec![gql_review_comment("a.py", Some(3), "nit")],
            )],
        }
    }
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
            issues: [(
                ("acme/widgets".to_string(), 12),
                ("Crash".to_string(), "it crashes".to_string()),
            )]
            .into(),
            other_pulls: [("acme/widgets".to_string(), 11)].into(),
            ..Default::default()
        }
    }

    pub fn pull(&self, repo: &str, n: u64) -> Option<&Value> {
        self.pulls.get(repo)?.iter().find(|p| p["number"] == n)
    }

    pub fn is_pull(&self, repo: &str, n: u64) -> bool {
        self.pull(repo, n).is_some() || self.other_pulls.contains(&(repo.to_string(), n))
    }

    pub fn issue_text(&self, repo: &str, n: u64) -> (String, String) {
        self.issues
            .get(&(repo.to_string(), n))
            .cloned()
            .unwrap_or_else(|| (format!("Issue {n}"), format!("issue body {n}")))
    }

    pub fn conversation(&self, repo: &str, n: u64) -> Conversation {
        self.conversations
            .get(&(repo.to_string(), n))
            .cloned()
            .unwrap_or_else(|| Conversation::standard(n))
    }

    fn repo_value(&self, name: &str) -> Value {
        self.repos
            .iter()
            .find(|x| x["full_name"] == name)
            .cloned()
            .unwrap_or_else(|| repo_json(name, 120, false, "MIT", "Python"))
    }

    fn gql_issue(&self, repo: &str, n: u64) -> Value {
        let (title, body) = self.issue_text(repo, n);
        json!({"__typename": "Issue", "number": n, "title": title, "body": body})
    }

    /// PR `n` of `repo` as a GraphQL `PullRequest`, from its REST answer and conversation.
    fn gql_pull(&self, repo: &str, n: u64) -> Option<Value> {
        let p = self.pull(repo, n)?;
        let c = self.conversation(repo, n);
        let reviews: Vec<Value> = c
            .reviews
            .iter()
            .enumerate()
            .map(|(k, r)| {
                let mut r = r.clone();
                r["id"] = json!(format!("PRR:{repo}:{n}:{k}"));
                r
            })
            .collect();
        Some(
            json!({"__typename": "PullRequest", "id": format!("PR:{repo}:{n}"), "number": n,
          "title": p["title"], "body": p["body"].as_str().unwrap_or(""), "createdAt": p["created_at"],
          "mergedAt": p["merged_at"], "baseRefName": p["base"]["ref"], "headRefName": p["head"]["ref"],
          "author": gql_author(p["user"]["login"].as_str().unwrap_or("ghost"), p["user"]["type"].as_str().unwrap_or("User")),
          "authorAssociation": p["author_association"],
          "labels": p["labels"].as_array().into_iter().flatten().map(|l| json!({"__typename": "Label", "name": l["name"]})).collect::<Vec<_>>(),
          "closingIssuesReferences": c.closing.iter().map(|i| self.gql_issue(repo, *i)).collect::<Vec<_>>(),
          "comments": c.comments, "reviews": reviews}),
        )
    }
}

fn rest_user(author: &Value) -> Value {
    user(
        author["login"].as_str().unwrap_or("ghost"),
        author["__typename"].as_str().unwrap_or("User"),
    )
}

/// A PR's reviews, review comments or conversation comments as REST lists them.
fn rest_conversation(c: &Conversation, what: &str) -> Vec<Value> {
    match what {
        "reviews" => c
            .reviews
            .iter()
            .enumerate()
            .map(|(k, r)| {
                json!({"id": 7 + k as u64, "user": rest_user(&r["author"]), "body": r["body"], "state": r["state"],
                  "author_association": r["authorAssociation"], "submitted_at": "2024-01-02T00:00:00Z", "commit_id": "c"})
            })
            .collect(),
        "review_comments" => c
            .reviews
            .iter()
            .enumerate()
            .flat_map(|(k, r)| {
                let author = rest_user(&r["author"]);
                r["comments"]
                    .as_array()
                    .cloned()
                    .unwrap_or_default()
                    .into_iter()
                    .enumerate()
                    .map(move |(j, rc)| {
                        json!({"id": 1000 * (k as u64 + 1) + j as u64, "pull_request_review_id": 7 + k as u64,
                          "diff_hunk": rc["diffHunk"], "path": rc["path"], "user": author.clone(), "body": rc["body"],
                          "line": rc["line"], "original_line": rc["originalLine"], "author_association": "MEMBER"})
                    })
            })
            .collect(),
        _ => c
            .comments
            .iter()
            .enumerate()
            .map(|(k, m)| {
                json!({"id": 9 + k as u64, "user": rest_user(&m["author"]), "body": m["body"], "created_at": m["createdAt"],
                  "author_association": m["authorAssociation"]})
            })
            .collect(),
    }
}

async fn conversation_list(
    s: S,
    h: HeaderMap,
    uri: Uri,
    key: (String, u64),
    q: HashMap<String, String>,
    what: &str,
) -> Response {
    let items = {
        let d = s.data.lock().unwrap();
        if d.pull(&key.0, key.1).is_none() {
            None
        } else {
            Some(rest_conversation(&d.conversation(&key.0, key.1), what))
        }
    };
    let Some(items) = items else {
        return not_found();
    };
    let (chunk, next) = page_of(&s, &uri, items, &q);
    respond(&s, &h, &uri, Value::Array(chunk), next)
}

impl graphql::Lookup for Data {
    fn lookup(
        &self,
        parent: &Value,
        field: &str,
        args: &serde_json::Map<String, Value>,
    ) -> Option<Value> {
        let num = || args.get("number").and_then(|n| n.as_u64());
        let repo = parent["nameWithOwner"].as_str().unwrap_or_default();
        match field {
            "repository" => {
                let name = format!(
                    "{}/{}",
                    args.get("owner")?.as_str()?,
                    args.get("name")?.as_str()?
                );
                let r = self.repo_value(&name);
                Some(
                    json!({"__typename": "Repository", "nameWithOwner": name, "stargazerCount": r["stargazers_count"],
                  "isArchived": r["archived"],
                  "primaryLanguage": r["language"].as_str().map(|l| json!({"name": l})),
                  "licenseInfo": r["license"].as_object().map(|l| json!({"spdxId": l["spdx_id"], "key": l["key"]}))}),
                )
            }
            "pullRequest" => self.gql_pull(repo, num()?),
            "issueOrPullRequest" => {
                let n = num()?;
                if let Some(p) = self.gql_pull(repo, n) {
                    Some(p)
                } else if self.is_pull(repo, n) {
                    Some(json!({"__typename": "PullRequest", "number": n}))
                } else {
                    Some(self.gql_issue(repo, n))
                }
            }
            "node" => {
                // review ids are `PRR:{owner/name}:{n}:{k}`
                let id = args.get("id")?.as_str()?;
                let mut parts = id.strip_prefix("PRR:")?.rsplitn(3, ':');
                let k: usize = parts.next()?.parse().ok()?;
                let n: u64 = parts.next()?.parse().ok()?;
                let repo = parts.next()?;
                let pr = self.gql_pull(repo, n)?;
                pr["reviews"].get(k).cloned()
            }
            _ => None,
        }
    }
}

/// `POST /graphql`: parse, charge the query's points (refusing it, as GitHub does, when the
/// token's window has fewer left), execute.
async fn graphql_endpoint(
    State(s): State<S>,
    headers: HeaderMap,
    uri: Uri,
    body: Bytes,
) -> Response {
    *s.requests.lock().unwrap() += 1;
    s.log.lock().unwrap().push(uri.path().to_string());
    let req: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let vars = req.get("variables").cloned().unwrap_or(Value::Null);
    let doc = match graphql::parse(req["query"].as_str().unwrap_or("")) {
        Ok(d) => d,
        Err(e) => {
            return (
                StatusCode::OK,
                axum::Json(json!({"errors": [{"message": format!("Parse error: {e}")}]})),
            )
                .into_response();
        }
    };
    let cost = graphql::cost(&doc, &vars);
    let token = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("anon")
        .to_string();
    let w = now() / s.window;
    let reset = (w + 1) * s.window;
    let (used, remaining) = {
        let mut pts = s.points_used.lock().unwrap();
        let used = pts.entry((token, w)).or_default();
        if *used + cost > s.graphql_limit {
            *s.over_limit.lock().unwrap() += 1;
            let mut r = (
                StatusCode::FORBIDDEN,
                axum::Json(json!({"errors": [{"type": "RATE_LIMITED", "message": "API rate limit exceeded"}]})),
            )
                .into_response();
            let h = r.headers_mut();
            h.insert("x-ratelimit-limit", s.graphql_limit.into());
            h.insert("x-ratelimit-remaining", (s.graphql_limit - *used).into());
            h.insert("x-ratelimit-reset", reset.into());
            h.insert("x-ratelimit-resource", "graphql".parse().unwrap());
            return r;
        }
        *used += cost;
        (*used, s.graphql_limit - *used)
    };
    if let Some(r) = fault(&s, uri.path()) {
        return r;
    }
    *s.graphql_queries.lock().unwrap() += 1;
    *s.points.lock().unwrap() += cost;
    let root = json!({"__typename": "Query", "rateLimit": {"cost": cost, "limit": s.graphql_limit,
        "remaining": remaining, "used": used, "resetAt": reset}});
    let (data, errors) = {
        let d = s.data.lock().unwrap();
        let mut ex = graphql::Exec {
            doc: &doc,
            vars: &vars,
            lookup: &*d,
            errors: Vec::new(),
        };
        let data = ex.object(&root, &doc.operation, &[]);
        (data, ex.errors)
    };
    let mut answer = json!({"data": data});
    if !errors.is_empty() {
        answer["errors"] = Value::Array(errors);
    }
    let mut r = (
        StatusCode::OK,
        [("content-type", "application/json; charset=utf-8")],
        answer.to_string(),
    )
        .into_response();
    if !s.hide_headers {
        let h = r.headers_mut();
        h.insert("x-ratelimit-limit", s.graphql_limit.into());
        h.insert("x-ratelimit-remaining", remaining.into());
        h.insert("x-ratelimit-used", used.into());
        h.insert("x-ratelimit-reset", reset.into());
        h.insert("x-ratelimit-resource", "graphql".parse().unwrap());
    }
    r
}

#[derive(Default)]
pub struct Fake {
    /// Base URL (`http://127.0.0.1:port`).
    pub base: String,
    /// Requests allowed per token per window.
    pub limit: u64,
    /// GraphQL points allowed per token per window.
    pub graphql_limit: u64,
    /// The rate-limit window in seconds.
    pub window: u64,
    /// (token, window index) → requests counted.
    pub used: Mutex<HashMap<(String, u64), u64>>,
    /// (token, window index) → GraphQL points counted.
    pub points_used: Mutex<HashMap<(String, u64), u64>>,
    /// GraphQL queries answered, and the points they cost in all.
    pub graphql_queries: Mutex<u64>,
    pub points: Mutex<u64>,
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
    let w = now() / s.window;
    let reset = (w + 1) * s.window;
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
    serve_opts(limit, 5000, WINDOW, hide_headers, data).await
}

/// A fake allowing `limit` REST requests and `graphql_limit` GraphQL points per token per
/// `window` seconds.
pub async fn serve_opts(
    limit: u64,
    graphql_limit: u64,
    window: u64,
    hide_headers: bool,
    data: Data,
) -> (String, S) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let s: S = Arc::new(Fake {
        base: base.clone(),
        limit,
        graphql_limit,
        window,
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
        .route("/repos/{o}/{r}/pulls/{n}/reviews", get(|State(s): State<S>, h: HeaderMap, uri: Uri, Path((o, r, n)): Path<(String, String, u64)>, Query(q): Q| async move {
            conversation_list(s, h, uri, (format!("{o}/{r}"), n), q, "reviews").await
        }))
        .route("/repos/{o}/{r}/pulls/{n}/comments", get(|State(s): State<S>, h: HeaderMap, uri: Uri, Path((o, r, n)): Path<(String, String, u64)>, Query(q): Q| async move {
            conversation_list(s, h, uri, (format!("{o}/{r}"), n), q, "review_comments").await
        }))
        .route("/repos/{o}/{r}/issues/{n}/comments", get(|State(s): State<S>, h: HeaderMap, uri: Uri, Path((o, r, n)): Path<(String, String, u64)>, Query(q): Q| async move {
            conversation_list(s, h, uri, (format!("{o}/{r}"), n), q, "comments").await
        }))
        .route("/repos/{o}/{r}/issues/{n}", get(|State(s): State<S>, h: HeaderMap, uri: Uri, Path((o, r, n)): Path<(String, String, u64)>| async move {
            let repo = format!("{o}/{r}");
            let (title, body) = s.data.lock().unwrap().issue_text(&repo, n);
            let mut issue = json!({"number": n, "title": title, "body": body, "state": "closed", "user": user("dave", "User")});
            if s.data.lock().unwrap().is_pull(&repo, n) {
                issue["pull_request"] = json!({"url": format!("https://api.github.com/repos/{repo}/pulls/{n}")});
            }
            respond(&s, &h, &uri, issue, None)
        }))
        .route("/graphql", post(graphql_endpoint))
        .with_state(s.clone());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (base, s)
}

/// `n` PRs of `repo`, numbered 1..=n, all merged by alice with the standard conversation, one
/// commit and one file each; every fourth body says `Fixes #{n + 10000}` (an issue not closed
/// through GraphQL's closing references, so it is looked up on its own).
pub fn corpus(repo: &str, n: u64) -> Data {
    let mut d = Data::default();
    let pulls = (1..=n)
        .map(|k| {
            let body = if k % 4 == 0 {
                format!("Does {k}.\n\nFixes #{}", k + 10_000)
            } else {
                format!("Does {k}.")
            };
            pull_json(
                repo,
                k,
                true,
                user("alice", "User"),
                &body,
                &format!("{k:040}"),
            )
        })
        .collect();
    d.pulls.insert(repo.to_string(), pulls);
    for k in 1..=n {
        let key = (repo.to_string(), k);
        d.commits.insert(
            key.clone(),
            vec![commit_json(
                &format!("{k:040}"),
                &format!("Do {k}"),
                Some(("alice", "User")),
            )],
        );
        d.files
            .insert(key, vec![file_json("a.py", "modified", None)]);
    }
    d
}

/// A PR record as the git source leaves it, before the API fills it in.
pub fn skeleton(repo: &str, n: u64) -> davinci_core::pr::PullRequest {
    use davinci_core::pr::{GitRef, PR_SCHEMA, PrSource, PullRequest, RepoMeta};
    PullRequest {
        schema: PR_SCHEMA.into(),
        id: PullRequest::make_id(repo, n),
        repo: RepoMeta {
            full_name: repo.into(),
            ..Default::default()
        },
        number: n,
        title: String::new(),
        body: String::new(),
        author: Default::default(),
        created_at: None,
        merged_at: Some("x".into()),
        base: GitRef::default(),
        head: GitRef::default(),
        merge_commit_sha: "m".into(),
        labels: vec![],
        linked_issues: vec![],
        commits: vec![],
        base_files: vec![],
        reviews: vec![],
        comments: vec![],
        source: PrSource::Git,
        extra: Default::default(),
    }
}

/// REST requests charged (304s are free) and GraphQL points charged, over every token.
pub fn charged(f: &Fake) -> (u64, u64) {
    (
        f.used.lock().unwrap().values().sum(),
        f.points_used.lock().unwrap().values().sum(),
    )
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
