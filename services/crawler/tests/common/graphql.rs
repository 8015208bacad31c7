//! The GraphQL side of the fake GitHub: a small parser for the query language (operations,
//! fragments, inline fragments with type conditions, aliases, arguments with literals and
//! variables), GitHub's documented point cost, and an executor over JSON objects in the shape
//! of GitHub's schema, with `first`/`after` connections and `NOT_FOUND` errors for numbers
//! that resolve to nothing.
//!
//! Cost, as GitHub documents it ("Calculating a rate limit score before running the call"):
//! add up the requests needed to fulfill each connection, assuming every one reaches its
//! `first`/`last` limit (a connection nested under a connection of `first: 50` needs 50
//! requests), divide by 100 and round to the nearest whole number; a query costs at least 1.
use serde_json::{Map, Value, json};
use std::collections::BTreeMap;

#[derive(Debug, Clone)]
pub enum Arg {
    Int(i64),
    Str(String),
    Var(String),
    Enum(String),
}

#[derive(Debug, Clone)]
pub struct Field {
    pub alias: Option<String>,
    pub name: String,
    pub args: BTreeMap<String, Arg>,
    pub sel: Vec<Sel>,
}

#[derive(Debug, Clone)]
pub enum Sel {
    Field(Field),
    Spread(String),
    Inline(Option<String>, Vec<Sel>),
}

#[derive(Debug, Default)]
pub struct Document {
    pub operation: Vec<Sel>,
    pub fragments: BTreeMap<String, (String, Vec<Sel>)>,
}

#[derive(Debug, Clone, PartialEq)]
enum Tok {
    Name(String),
    Int(i64),
    Str(String),
    Punct(char),
    Spread,
}

fn lex(src: &str) -> Result<Vec<Tok>, String> {
    let c: Vec<char> = src.chars().collect();
    let (mut i, mut out) = (0, Vec::new());
    while i < c.len() {
        let ch = c[i];
        if ch.is_whitespace() || ch == ',' {
            i += 1;
        } else if ch == '#' {
            while i < c.len() && c[i] != '\n' {
                i += 1;
            }
        } else if ch == '.' {
            if c.get(i..i + 3) != Some(&['.', '.', '.']) {
                return Err(format!("unexpected `.` at {i}"));
            }
            out.push(Tok::Spread);
            i += 3;
        } else if "{}():$!=[]@".contains(ch) {
            out.push(Tok::Punct(ch));
            i += 1;
        } else if ch == '"' {
            let mut s = String::new();
            i += 1;
            while i < c.len() && c[i] != '"' {
                if c[i] == '\\' {
                    i += 1;
                    match c.get(i) {
                        Some('n') => s.push('\n'),
                        Some('t') => s.push('\t'),
                        Some('u') => {
                            let hex: String = c[i + 1..i + 5].iter().collect();
                            s.push(
                                char::from_u32(
                                    u32::from_str_radix(&hex, 16).map_err(|e| e.to_string())?,
                                )
                                .unwrap_or('\u{fffd}'),
                            );
                            i += 4;
                        }
                        Some(o) => s.push(*o),
                        None => return Err("unterminated string".into()),
                    }
                } else {
                    s.push(c[i]);
                }
                i += 1;
            }
            if i >= c.len() {
                return Err("unterminated string".into());
            }
            i += 1;
            out.push(Tok::Str(s));
        } else if ch == '-' || ch.is_ascii_digit() {
            let st = i;
            i += 1;
            while i < c.len() && c[i].is_ascii_digit() {
                i += 1;
            }
            let t: String = c[st..i].iter().collect();
            out.push(Tok::Int(t.parse().map_err(|_| format!("bad number {t}"))?));
        } else if ch == '_' || ch.is_ascii_alphabetic() {
            let st = i;
            while i < c.len() && (c[i] == '_' || c[i].is_ascii_alphanumeric()) {
                i += 1;
            }
            out.push(Tok::Name(c[st..i].iter().collect()));
        } else {
            return Err(format!("unexpected `{ch}` at {i}"));
        }
    }
    Ok(out)
}

struct P {
    t: Vec<Tok>,
    i: usize,
}

impl P {
    fn peek(&self) -> Option<&Tok> {
        self.t.get(self.i)
    }
    fn next(&mut self) -> Result<Tok, String> {
        let t = self
            .t
            .get(self.i)
            .cloned()
            .ok_or("unexpected end of query")?;
        self.i += 1;
        Ok(t)
    }
    fn eat(&mut self, p: char) -> bool {
        if self.peek() == Some(&Tok::Punct(p)) {
            self.i += 1;
            true
        } else {
            false
        }
    }
    fn expect(&mut self, p: char) -> Result<(), String> {
        if self.eat(p) {
            Ok(())
        } else {
            Err(format!("expected `{p}`, found {:?}", self.peek()))
        }
    }
    fn name(&mut self) -> Result<String, String> {
        match self.next()? {
            Tok::Name(n) => Ok(n),
            t => Err(format!("expected a name, found {t:?}")),
        }
    }
    /// Skips a balanced `( … )` (variable definitions).
    fn skip_parens(&mut self) -> Result<(), String> {
        if !self.eat('(') {
            return Ok(());
        }
        let mut depth = 1;
        while depth > 0 {
            match self.next()? {
                Tok::Punct('(') => depth += 1,
                Tok::Punct(')') => depth -= 1,
                _ => {}
            }
        }
        Ok(())
    }
    fn selection(&mut self) -> Result<Vec<Sel>, String> {
        self.expect('{')?;
        let mut out = Vec::new();
        while !self.eat('}') {
            if self.peek() == Some(&Tok::Spread) {
                self.i += 1;
                if self.peek() == Some(&Tok::Name("on".into())) {
                    self.i += 1;
                    let ty = self.name()?;
                    out.push(Sel::Inline(Some(ty), self.selection()?));
                } else if self.peek() == Some(&Tok::Punct('{')) {
                    out.push(Sel::Inline(None, self.selection()?));
                } else {
                    out.push(Sel::Spread(self.name()?));
                }
                continue;
            }
            let first = self.name()?;
            let (alias, name) = if self.eat(':') {
                (Some(first), self.name()?)
            } else {
                (None, first)
            };
            let mut args = BTreeMap::new();
            if self.eat('(') {
                while !self.eat(')') {
                    let k = self.name()?;
                    self.expect(':')?;
                    let v = match self.next()? {
                        Tok::Int(n) => Arg::Int(n),
                        Tok::Str(s) => Arg::Str(s),
                        Tok::Punct('$') => Arg::Var(self.name()?),
                        Tok::Name(n) => Arg::Enum(n),
                        t => return Err(format!("unsupported argument value {t:?}")),
                    };
                    args.insert(k, v);
                }
            }
            let sel = if self.peek() == Some(&Tok::Punct('{')) {
                self.selection()?
            } else {
                Vec::new()
            };
            out.push(Sel::Field(Field {
                alias,
                name,
                args,
                sel,
            }));
        }
        Ok(out)
    }
}

pub fn parse(src: &str) -> Result<Document, String> {
    let mut p = P { t: lex(src)?, i: 0 };
    let mut doc = Document::default();
    let mut have_op = false;
    while p.peek().is_some() {
        match p.peek() {
            Some(Tok::Punct('{')) => {
                doc.operation = p.selection()?;
                have_op = true;
            }
            Some(Tok::Name(n)) if n == "query" => {
                p.i += 1;
                if let Some(Tok::Name(_)) = p.peek() {
                    p.i += 1;
                }
                p.skip_parens()?;
                doc.operation = p.selection()?;
                have_op = true;
            }
            Some(Tok::Name(n)) if n == "fragment" => {
                p.i += 1;
                let name = p.name()?;
                if p.name()? != "on" {
                    return Err(format!("fragment {name}: expected `on`"));
                }
                let ty = p.name()?;
                let sel = p.selection()?;
                doc.fragments.insert(name, (ty, sel));
            }
            t => return Err(format!("unexpected {t:?} at the top level")),
        }
    }
    if !have_op {
        return Err("no query operation".into());
    }
    Ok(doc)
}

fn arg_value(a: &Arg, vars: &Value) -> Value {
    match a {
        Arg::Int(n) => json!(n),
        Arg::Str(s) | Arg::Enum(s) => json!(s),
        Arg::Var(v) => vars.get(v).cloned().unwrap_or(Value::Null),
    }
}

fn page_size(f: &Field, vars: &Value) -> Option<u64> {
    f.args
        .get("first")
        .or_else(|| f.args.get("last"))
        .and_then(|a| arg_value(a, vars).as_u64())
}

/// The query's cost in points by GitHub's formula.
pub fn cost(doc: &Document, vars: &Value) -> u64 {
    fn walk(doc: &Document, sel: &[Sel], parents: u64, vars: &Value, requests: &mut u64) {
        for s in sel {
            match s {
                Sel::Field(f) => match page_size(f, vars) {
                    Some(n) => {
                        *requests += parents;
                        walk(doc, &f.sel, parents * n, vars, requests);
                    }
                    None => walk(doc, &f.sel, parents, vars, requests),
                },
                Sel::Spread(name) => {
                    if let Some((_, fs)) = doc.fragments.get(name) {
                        walk(doc, fs, parents, vars, requests);
                    }
                }
                Sel::Inline(_, fs) => walk(doc, fs, parents, vars, requests),
            }
        }
    }
    let mut requests = 0;
    walk(doc, &doc.operation, 1, vars, &mut requests);
    ((requests as f64 / 100.0).round() as u64).max(1)
}

/// Answers the lookups that take arguments (`repository(owner:, name:)`,
/// `pullRequest(number:)`, `issueOrPullRequest(number:)`, `node(id:)`): the object, or `None`
/// for a `NOT_FOUND`.
pub trait Lookup {
    fn lookup(&self, parent: &Value, field: &str, args: &Map<String, Value>) -> Option<Value>;
}

pub struct Exec<'a> {
    pub doc: &'a Document,
    pub vars: &'a Value,
    pub lookup: &'a dyn Lookup,
    pub errors: Vec<Value>,
}

const LOOKUPS: [&str; 4] = ["repository", "pullRequest", "issueOrPullRequest", "node"];

impl Exec<'_> {
    /// Resolves `sel` on `obj`; `path` names the place for errors.
    pub fn object(&mut self, obj: &Value, sel: &[Sel], path: &[Value]) -> Value {
        let mut out = Map::new();
        self.fill(obj, sel, path, &mut out);
        Value::Object(out)
    }

    fn fill(&mut self, obj: &Value, sel: &[Sel], path: &[Value], out: &mut Map<String, Value>) {
        for s in sel {
            match s {
                Sel::Spread(name) => {
                    let Some((ty, fs)) = self.doc.fragments.get(name).cloned() else {
                        continue;
                    };
                    if obj["__typename"] == ty.as_str() {
                        self.fill(obj, &fs, path, out);
                    }
                }
                Sel::Inline(ty, fs) => {
                    if ty.as_ref().is_none_or(|t| obj["__typename"] == t.as_str()) {
                        self.fill(obj, fs, path, out);
                    }
                }
                Sel::Field(f) => {
                    let key = f.alias.clone().unwrap_or_else(|| f.name.clone());
                    let mut here = path.to_vec();
                    here.push(json!(key));
                    let v = self.field(obj, f, &here);
                    out.insert(key, v);
                }
            }
        }
    }

    fn field(&mut self, obj: &Value, f: &Field, path: &[Value]) -> Value {
        let args: Map<String, Value> = f
            .args
            .iter()
            .map(|(k, a)| (k.clone(), arg_value(a, self.vars)))
            .collect();
        let value = if LOOKUPS.contains(&f.name.as_str()) {
            match self.lookup.lookup(obj, &f.name, &args) {
                Some(v) => v,
                None => {
                    self.errors.push(json!({"type": "NOT_FOUND", "path": path,
                        "message": format!("Could not resolve to a node with the arguments {}", Value::Object(args.clone()))}));
                    return Value::Null;
                }
            }
        } else {
            obj.get(&f.name).cloned().unwrap_or(Value::Null)
        };
        if let (Some(first), Value::Array(items)) = (page_size(f, self.vars), &value) {
            let start = args
                .get("after")
                .and_then(|c| c.as_str())
                .and_then(|c| c.strip_prefix("cursor:"))
                .and_then(|c| c.parse::<usize>().ok())
                .map_or(0, |i| i + 1);
            let end = (start + first as usize).min(items.len());
            let page = &items[start.min(end)..end];
            let conn = json!({
                "__typename": "Connection",
                "totalCount": items.len(),
                "nodes": page,
                "pageInfo": {"hasNextPage": end < items.len(),
                             "endCursor": if end > start { json!(format!("cursor:{}", end - 1)) } else { Value::Null }},
            });
            return self.shape(&conn, &f.sel, path);
        }
        self.shape(&value, &f.sel, path)
    }

    fn shape(&mut self, v: &Value, sel: &[Sel], path: &[Value]) -> Value {
        if sel.is_empty() {
            return v.clone();
        }
        match v {
            Value::Object(_) => self.object(v, sel, path),
            Value::Array(items) => Value::Array(
                items
                    .iter()
                    .enumerate()
                    .map(|(i, it)| {
                        let mut p = path.to_vec();
                        p.push(json!(i));
                        self.shape(it, sel, &p)
                    })
                    .collect(),
            ),
            _ => v.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cost_follows_githubs_documented_examples() {
        // "Calculating a rate limit score": 1 + 100 + 100*50 = 5,101 requests → 51 points
        let q = "query { viewer { login repositories(first: 100) { edges { node { id
            issues(first: 50) { edges { node { id labels(first: 60) { edges { node { name } } } } } } } } } } }";
        assert_eq!(cost(&parse(q).unwrap(), &Value::Null), 51);
        // one connection: 1 request rounds to 0, but a call costs at least 1
        let q = "query($n: Int!) { repository(owner: \"a\", name: \"b\") { issues(first: $n) { nodes { title } } } }";
        assert_eq!(cost(&parse(q).unwrap(), &json!({"n": 100})), 1);
    }
}
