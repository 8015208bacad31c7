//! PR metadata for many PRs per GraphQL query: what [`GithubClient::enrich`] fills with one
//! REST call, one GraphQL query and a REST call per `fixes #N` issue per PR, here for up to
//! [`BatchPages::prs`] PRs of a repository per query (aliases for the listed numbers).
//!
//! One query asks, per PR: title, body, author and type, association, timestamps, refs,
//! labels, closing issues with their text, conversation comments, reviews with their comments;
//! and the repository's stars, language, license and archived flag. Each nested connection
//! asks for a first page only; the PRs (and reviews) that overflow one are followed page by
//! page afterwards, each page its own small query. Issues referenced in bodies (`fixes #N`)
//! that are not closing references are fetched together, one aliased query per repository.
//!
//! Cost by GitHub's formula (every connection counts the requests that fill it: one per
//! parent node; the sum divided by 100, rounded, at least 1): a PR costs 4 top-level
//! connections plus one review-comments connection per review asked for, so 25 PRs with 20
//! reviews each cost 25 × 24 / 100 = 6 points.
use crate::github::{FIXES_RE, GithubClient, author_from_gql, reviews_from_graphql, str_of};
use anyhow::{Result, anyhow, bail};
use davinci_core::pr::{Comment, LinkedIssue, PullRequest, RepoMeta, ReviewComment};
use serde_json::{Value, json};
use std::collections::{BTreeMap, BTreeSet};

/// How much one batched query asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchPages {
    /// PRs per query.
    pub prs: usize,
    pub labels: u32,
    pub closing_issues: u32,
    pub comments: u32,
    pub reviews: u32,
    /// Comments per review.
    pub review_comments: u32,
}

impl Default for BatchPages {
    fn default() -> Self {
        Self {
            prs: 25,
            labels: 20,
            closing_issues: 10,
            comments: 30,
            reviews: 20,
            review_comments: 20,
        }
    }
}

/// Points for a query that needs `requests` requests (GitHub's rounding, minimum 1).
pub fn points(requests: u64) -> u64 {
    ((requests as f64 / 100.0).round() as u64).max(1)
}

impl BatchPages {
    /// The cost of one batched query for `prs` PRs.
    pub fn cost(&self, prs: usize) -> u64 {
        points(prs as u64 * (4 + u64::from(self.reviews)))
    }
}

/// The page size of follow-up queries for connections that overflowed.
const FOLLOW: u32 = 100;

const PAGE: &str = "pageInfo { hasNextPage endCursor }";
const AUTHOR: &str = "author { login __typename } authorAssociation";
const REVIEW_COMMENT: &str = "path line originalLine diffHunk body";

fn lit(s: &str) -> String {
    serde_json::to_string(s).expect("a string serializes")
}

fn after(cursor: Option<&str>) -> String {
    cursor.map_or_else(String::new, |c| format!(", after: {}", lit(c)))
}

fn labels_sel(first: u32, cursor: Option<&str>) -> String {
    format!(
        "labels(first: {first}{}) {{ {PAGE} nodes {{ name }} }}",
        after(cursor)
    )
}
fn closing_sel(first: u32, cursor: Option<&str>) -> String {
    format!(
        "closingIssuesReferences(first: {first}{}) {{ {PAGE} nodes {{ number title body }} }}",
        after(cursor)
    )
}
fn comments_sel(first: u32, cursor: Option<&str>) -> String {
    format!(
        "comments(first: {first}{}) {{ {PAGE} nodes {{ {AUTHOR} body createdAt }} }}",
        after(cursor)
    )
}
fn review_comments_sel(first: u32, cursor: Option<&str>) -> String {
    format!(
        "comments(first: {first}{}) {{ {PAGE} nodes {{ {REVIEW_COMMENT} }} }}",
        after(cursor)
    )
}
fn reviews_sel(first: u32, comments: u32, cursor: Option<&str>) -> String {
    format!(
        "reviews(first: {first}{}) {{ {PAGE} nodes {{ id {AUTHOR} state body {} }} }}",
        after(cursor),
        review_comments_sel(comments, None)
    )
}

/// The batched query for `numbers` of `owner/name`.
fn batch_query(owner: &str, name: &str, numbers: &[u64], p: &BatchPages) -> String {
    let mut q = format!(
        "query {{ rateLimit {{ cost remaining resetAt }} repository(owner: {}, name: {}) {{ \
         nameWithOwner stargazerCount isArchived primaryLanguage {{ name }} licenseInfo {{ spdxId key }}",
        lit(owner),
        lit(name)
    );
    for n in numbers {
        q.push_str(&format!(" p{n}: pullRequest(number: {n}) {{ ...pr }}"));
    }
    q.push_str(&format!(
        " }} }} fragment pr on PullRequest {{ number title body createdAt mergedAt baseRefName \
         headRefName {AUTHOR} {} {} {} {} }}",
        labels_sel(p.labels, None),
        closing_sel(p.closing_issues, None),
        comments_sel(p.comments, None),
        reviews_sel(p.reviews, p.review_comments, None),
    ));
    q
}

/// Nodes of a connection and the cursor of its next page, if it has one.
fn page(conn: &Value) -> (Vec<Value>, Option<String>) {
    let nodes = conn
        .get("nodes")
        .and_then(|n| n.as_array())
        .cloned()
        .unwrap_or_default();
    let next = (conn.pointer("/pageInfo/hasNextPage") == Some(&Value::Bool(true)))
        .then(|| {
            conn.pointer("/pageInfo/endCursor")
                .and_then(|c| c.as_str())
                .map(str::to_string)
        })
        .flatten();
    (nodes, next)
}

/// Fails on errors other than `NOT_FOUND` (which leave `null`s the caller reads as "gone").
fn check_errors(errors: &[Value]) -> Result<()> {
    let bad: Vec<&str> = errors
        .iter()
        .filter(|e| e.get("type").and_then(|t| t.as_str()) != Some("NOT_FOUND"))
        .map(|e| e.get("message").and_then(|m| m.as_str()).unwrap_or("?"))
        .collect();
    if !bad.is_empty() {
        bail!("GraphQL errors: {}", bad.join("; "));
    }
    Ok(())
}

fn comment_from(c: &Value) -> Comment {
    Comment {
        author: author_from_gql(c),
        body: str_of(c, "body"),
        created_at: c
            .get("createdAt")
            .and_then(|v| v.as_str())
            .map(str::to_string),
    }
}

fn review_comment_from(c: &Value) -> ReviewComment {
    ReviewComment {
        path: str_of(c, "path"),
        line: c
            .get("line")
            .and_then(|l| l.as_u64())
            .or_else(|| c.get("originalLine").and_then(|l| l.as_u64())),
        diff_hunk: str_of(c, "diffHunk"),
        body: str_of(c, "body"),
    }
}

fn issue_from(i: &Value) -> Option<LinkedIssue> {
    Some(LinkedIssue {
        number: i.get("number")?.as_u64()?,
        title: str_of(i, "title"),
        body: str_of(i, "body"),
    })
}

fn repo_meta_from_gql(r: &Value) -> RepoMeta {
    RepoMeta {
        full_name: str_of(r, "nameWithOwner"),
        stars: r.get("stargazerCount").and_then(|s| s.as_u64()),
        language: r
            .pointer("/primaryLanguage/name")
            .and_then(|s| s.as_str())
            .map(str::to_string),
        license: r
            .pointer("/licenseInfo/spdxId")
            .or_else(|| r.pointer("/licenseInfo/key"))
            .and_then(|s| s.as_str())
            .map(str::to_string),
        archived: r
            .get("isArchived")
            .and_then(|a| a.as_bool())
            .unwrap_or(false),
    }
}

/// A connection of one PR that did not fit its first page.
#[derive(Debug)]
enum Overflow {
    Labels(String),
    Closing(String),
    Comments(String),
    Reviews(String),
    /// (index of the review in the PR's list, review node id, cursor)
    ReviewComments(usize, String, String),
}

/// The scalar fields, first pages and overflows of one PR node.
fn fill(pr: &mut PullRequest, node: &Value, closing: &mut Vec<LinkedIssue>) -> Vec<Overflow> {
    let mut more = Vec::new();
    if let Some(t) = node.get("title").and_then(|t| t.as_str()) {
        pr.title = t.to_string();
    }
    pr.body = str_of(node, "body");
    pr.author = author_from_gql(node);
    pr.created_at = node
        .get("createdAt")
        .and_then(|v| v.as_str())
        .map(str::to_string)
        .or(pr.created_at.take());
    pr.merged_at = node
        .get("mergedAt")
        .and_then(|v| v.as_str())
        .map(str::to_string);
    if let Some(s) = node.get("baseRefName").and_then(|v| v.as_str()) {
        pr.base.name = s.to_string();
    }
    if let Some(s) = node.get("headRefName").and_then(|v| v.as_str()) {
        pr.head.name = s.to_string();
    }
    let (labels, next) = page(&node["labels"]);
    pr.labels = labels
        .iter()
        .filter_map(|l| l.get("name")?.as_str().map(str::to_string))
        .collect();
    more.extend(next.map(Overflow::Labels));
    let (issues, next) = page(&node["closingIssuesReferences"]);
    closing.extend(issues.iter().filter_map(issue_from));
    more.extend(next.map(Overflow::Closing));
    let (comments, next) = page(&node["comments"]);
    pr.comments = comments.iter().map(comment_from).collect();
    more.extend(next.map(Overflow::Comments));
    let (reviews, next) = page(&node["reviews"]);
    more.extend(review_overflows(&reviews, 0));
    pr.reviews = reviews_from_graphql(&json!({"reviews": {"nodes": reviews}}));
    more.extend(next.map(Overflow::Reviews));
    more
}

/// The reviews (numbered from `offset`) whose comments did not fit their first page.
fn review_overflows(reviews: &[Value], offset: usize) -> Vec<Overflow> {
    reviews
        .iter()
        .enumerate()
        .filter_map(|(k, r)| {
            let (_, next) = page(&r["comments"]);
            Some(Overflow::ReviewComments(
                offset + k,
                r.get("id")?.as_str()?.to_string(),
                next?,
            ))
        })
        .collect()
}

impl GithubClient {
    /// Fills every PR of `prs` with what the API knows, as [`GithubClient::enrich`] does one
    /// at a time, in batched GraphQL queries of `pages.prs` PRs (each group of PRs of one
    /// repository together). Returns, per PR, whether the API knows it. A batch the GraphQL
    /// API refuses (an error other than a missing PR) is filled one PR at a time instead.
    pub async fn enrich_batch(
        &self,
        prs: &mut [PullRequest],
        pages: &BatchPages,
    ) -> Result<Vec<bool>> {
        let mut known = vec![false; prs.len()];
        let mut by_repo: BTreeMap<String, Vec<usize>> = BTreeMap::new();
        for (i, pr) in prs.iter().enumerate() {
            by_repo
                .entry(pr.repo.full_name.clone())
                .or_default()
                .push(i);
        }
        for (full, idx) in by_repo {
            let (owner, name) = full
                .split_once('/')
                .ok_or_else(|| anyhow!("bad repository name {full}"))?;
            let mut closing: BTreeMap<usize, Vec<LinkedIssue>> = BTreeMap::new();
            for chunk in idx.chunks(pages.prs.max(1)) {
                match self.batch(owner, name, prs, chunk, pages).await {
                    Ok(found) => {
                        for (i, c) in found {
                            known[i] = true;
                            closing.insert(i, c);
                        }
                    }
                    Err(e) => {
                        tracing::warn!(repo = %full, error = %format!("{e:#}"), "batched GraphQL metadata failed; one PR at a time");
                        for &i in chunk {
                            known[i] = self.enrich(&mut prs[i]).await?;
                        }
                    }
                }
            }
            self.linked_issues_batch(owner, name, prs, closing).await?;
        }
        Ok(known)
    }

    /// One batched query for `chunk` (indices into `prs`) and the follow-up pages of what
    /// overflowed. Returns the PRs found, with their closing issues.
    async fn batch(
        &self,
        owner: &str,
        name: &str,
        prs: &mut [PullRequest],
        chunk: &[usize],
        pages: &BatchPages,
    ) -> Result<Vec<(usize, Vec<LinkedIssue>)>> {
        let numbers: Vec<u64> = chunk.iter().map(|&i| prs[i].number).collect();
        let (data, errors) = self
            .graphql_partial(
                &batch_query(owner, name, &numbers, pages),
                Value::Null,
                pages.cost(numbers.len()),
            )
            .await?;
        check_errors(&errors)?;
        let repo = &data["repository"];
        if repo.is_null() {
            return Ok(Vec::new());
        }
        let meta = repo_meta_from_gql(repo);
        let mut found = Vec::new();
        for &i in chunk {
            let node = &repo[format!("p{}", prs[i].number)];
            if node.is_null() {
                continue;
            }
            let pr = &mut prs[i];
            if pr.repo.stars.is_none() {
                pr.repo = meta.clone();
            }
            let mut closing = Vec::new();
            let more = fill(pr, node, &mut closing);
            self.follow(owner, name, pr, &mut closing, more).await?;
            found.push((i, closing));
        }
        Ok(found)
    }

    /// Follows every overflowing connection of `pr` to its last page.
    async fn follow(
        &self,
        owner: &str,
        name: &str,
        pr: &mut PullRequest,
        closing: &mut Vec<LinkedIssue>,
        mut todo: Vec<Overflow>,
    ) -> Result<()> {
        while let Some(o) = todo.pop() {
            let (sel, review) = match &o {
                Overflow::Labels(c) => (labels_sel(FOLLOW, Some(c)), None),
                Overflow::Closing(c) => (closing_sel(FOLLOW, Some(c)), None),
                Overflow::Comments(c) => (comments_sel(FOLLOW, Some(c)), None),
                Overflow::Reviews(c) => (reviews_sel(FOLLOW, FOLLOW, Some(c)), None),
                Overflow::ReviewComments(k, id, c) => {
                    (review_comments_sel(FOLLOW, Some(c)), Some((*k, id.clone())))
                }
            };
            let query = match &review {
                Some((_, id)) => format!(
                    "query {{ rateLimit {{ cost }} node(id: {}) {{ ... on PullRequestReview {{ {sel} }} }} }}",
                    lit(id)
                ),
                None => format!(
                    "query {{ rateLimit {{ cost }} repository(owner: {}, name: {}) {{ pullRequest(number: {}) {{ {sel} }} }} }}",
                    lit(owner),
                    lit(name),
                    pr.number
                ),
            };
            // a page of reviews asks for their comments too: 1 + FOLLOW requests
            let cost = points(match o {
                Overflow::Reviews(_) => 1 + u64::from(FOLLOW),
                _ => 1,
            });
            let (data, errors) = self.graphql_partial(&query, Value::Null, cost).await?;
            check_errors(&errors)?;
            let holder = match &review {
                Some(_) => &data["node"],
                None => &data["repository"]["pullRequest"],
            };
            if holder.is_null() {
                bail!(
                    "PR #{} of {owner}/{name} vanished while its pages were read",
                    pr.number
                );
            }
            match o {
                Overflow::Labels(_) => {
                    let (nodes, next) = page(&holder["labels"]);
                    pr.labels.extend(
                        nodes
                            .iter()
                            .filter_map(|l| l.get("name")?.as_str().map(str::to_string)),
                    );
                    todo.extend(next.map(Overflow::Labels));
                }
                Overflow::Closing(_) => {
                    let (nodes, next) = page(&holder["closingIssuesReferences"]);
                    closing.extend(nodes.iter().filter_map(issue_from));
                    todo.extend(next.map(Overflow::Closing));
                }
                Overflow::Comments(_) => {
                    let (nodes, next) = page(&holder["comments"]);
                    pr.comments.extend(nodes.iter().map(comment_from));
                    todo.extend(next.map(Overflow::Comments));
                }
                Overflow::Reviews(_) => {
                    let (nodes, next) = page(&holder["reviews"]);
                    todo.extend(review_overflows(&nodes, pr.reviews.len()));
                    pr.reviews
                        .extend(reviews_from_graphql(&json!({"reviews": {"nodes": nodes}})));
                    todo.extend(next.map(Overflow::Reviews));
                }
                Overflow::ReviewComments(k, id, _) => {
                    let (nodes, next) = page(&holder["comments"]);
                    pr.reviews[k]
                        .comments
                        .extend(nodes.iter().map(review_comment_from));
                    todo.extend(next.map(|c| Overflow::ReviewComments(k, id, c)));
                }
            }
        }
        Ok(())
    }

    /// Linked issues of the PRs of one repository: closing references, then `fixes #N`
    /// references in the body that are issues (not PRs, not missing), all such issues of
    /// the repository fetched in aliased queries of up to 100.
    async fn linked_issues_batch(
        &self,
        owner: &str,
        name: &str,
        prs: &mut [PullRequest],
        closing: BTreeMap<usize, Vec<LinkedIssue>>,
    ) -> Result<()> {
        let mut wanted: BTreeMap<usize, Vec<u64>> = BTreeMap::new();
        let mut all: BTreeSet<u64> = BTreeSet::new();
        for (&i, found) in &closing {
            let known: BTreeSet<u64> = found.iter().map(|x| x.number).collect();
            let mut w: Vec<u64> = Vec::new();
            for m in FIXES_RE.captures_iter(&prs[i].body) {
                if let Ok(n) = m[1].parse::<u64>()
                    && !known.contains(&n)
                    && !w.contains(&n)
                {
                    w.push(n);
                }
            }
            all.extend(&w);
            wanted.insert(i, w);
        }
        let mut issues: BTreeMap<u64, LinkedIssue> = BTreeMap::new();
        let all: Vec<u64> = all.into_iter().collect();
        for chunk in all.chunks(100) {
            let mut q = format!(
                "query {{ rateLimit {{ cost }} repository(owner: {}, name: {}) {{",
                lit(owner),
                lit(name)
            );
            for n in chunk {
                q.push_str(&format!(
                    " i{n}: issueOrPullRequest(number: {n}) {{ __typename ... on Issue {{ number title body }} }}"
                ));
            }
            q.push_str(" } }");
            let (data, errors) = self.graphql_partial(&q, Value::Null, 1).await?;
            check_errors(&errors)?;
            for n in chunk {
                let node = &data["repository"][format!("i{n}")];
                if node.get("__typename").and_then(|t| t.as_str()) == Some("Issue")
                    && let Some(i) = issue_from(node)
                {
                    issues.insert(*n, i);
                }
            }
        }
        for (i, mut found) in closing {
            for n in &wanted[&i] {
                if let Some(issue) = issues.get(n) {
                    found.push(issue.clone());
                }
            }
            prs[i].linked_issues = found;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batch_cost_follows_githubs_formula() {
        let p = BatchPages::default();
        // 25 PRs × (labels, closing issues, comments, reviews + 20 review-comment pages)
        assert_eq!(p.cost(25), 6);
        assert_eq!(p.cost(1), 1);
        assert_eq!(points(149), 1);
        assert_eq!(points(150), 2);
        let q = batch_query("acme", "widgets", &[3, 7], &p);
        assert!(q.contains(" p3: pullRequest(number: 3) { ...pr }"), "{q}");
        assert!(q.contains("reviews(first: 20)"), "{q}");
    }
}
