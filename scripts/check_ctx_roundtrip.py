#!/usr/bin/env python3
"""Rebuilds every ctx sample from its text alone and compares it with git at head_sha.

An independent reader of the two contextually-native formats (DESIGN.md §4), written from the
format description and sharing no code with the Rust renderer. For each sample:

* ctx-general: the `<file path>` contents under `<relevant_files>` are the files at base; each
  `<commit>`'s `<diff>` tags (status modified, added, deleted, renamed or copied; `old_path` the
  source of a rename or copy; `<diff …/>` a change without hunks) are applied in order with a
  strict unified-diff applier of its own.
  Samples of `davinci.ctx-general/v1`, which names no status, are read with a v1 reader's best
  guess (an unknown path is added; hunks to `+0,0` delete), to count what v1 got right.
* ctx-python: the fenced files under `## Relevant files` are the files at base; each
  `### Commit i/m` section's SEARCH/REPLACE blocks are applied in order with plain substring
  semantics (SEARCH must occur exactly once; empty SEARCH creates; SEARCH equal to the whole file
  with an empty REPLACE deletes).

In both, a body whose last line is `\\ No newline at end of file` ends without that line and its
newline. Every path the text names must then hold exactly the bytes of `git show head_sha:path`
(or not exist there), and every text file git says changed between base_sha and head_sha must be
named. Samples are read from `.jsonl.zst` (the `zstandard` module, else `zstd -dc`) or `.jsonl`.

usage: check_ctx_roundtrip.py --git GIT_DIR [--show N] SAMPLES_PATH...
Exit status 1 when a sample fails, 2 on bad usage or unreadable input.
"""
import argparse
import glob
import json
import os
import re
import shutil
import subprocess
import sys

NO_NL = "\\ No newline at end of file"
MARK_S, MARK_D, MARK_R = "<<<<<<< SEARCH", "=======", ">>>>>>> REPLACE"


class Bad(Exception):
    """The text does not determine its files."""


def split_lines(text):
    """Lines split at '\\n' only, each keeping it (str.splitlines also splits at '\\r' and more)."""
    parts = text.split("\n")
    out = [p + "\n" for p in parts[:-1]]
    if parts[-1]:
        out.append(parts[-1])
    return out


def bare(line):
    return line[:-1] if line.endswith("\n") else line


def body_of(lines):
    text = "".join(lines)
    if lines and bare(lines[-1]) == NO_NL:
        text = "".join(lines[:-1])
        if text.endswith("\n"):
            text = text[:-1]
    return text


# ---------------------------------------------------------------- unified diffs

HUNK_RE = re.compile(r"^@@ -(\d+)(?:,(\d+))? \+(\d+)(?:,(\d+))? @@")


def apply_hunks(old, hunks):
    """Applies unified-diff hunks to `old` exactly (no fuzz, no offsets)."""
    src = split_lines(old)
    lines = hunks.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    out, pos, i = [], 0, 0
    while i < len(lines) and not lines[i].startswith("@@"):
        i += 1
    while i < len(lines):
        m = HUNK_RE.match(lines[i])
        if not m:
            raise Bad(f"bad hunk header {lines[i]!r}")
        start, n_old = int(m.group(1)), int(m.group(2) or 1)
        n_new = int(m.group(4) or 1)
        i += 1
        old_side, new_side, last = [], [], None
        while i < len(lines):
            l = lines[i]
            if l.startswith("\\"):
                for side in last or ():
                    side[-1] = side[-1][:-1]
                last = None
                i += 1
                continue
            if n_old == 0 and n_new == 0:
                break
            tag, text = (l[0], l[1:] + "\n") if l else (" ", "\n")
            if tag == " " and n_old and n_new:
                old_side.append(text)
                new_side.append(text)
                n_old, n_new, last = n_old - 1, n_new - 1, (old_side, new_side)
            elif tag == "-" and n_old:
                old_side.append(text)
                n_old, last = n_old - 1, (old_side,)
            elif tag == "+" and n_new:
                new_side.append(text)
                n_new, last = n_new - 1, (new_side,)
            else:
                raise Bad(f"unexpected hunk line {l!r}")
            i += 1
        if n_old or n_new:
            raise Bad("hunk ends early")
        at = start if not old_side else start - 1
        if at < pos or at + len(old_side) > len(src) or src[at:at + len(old_side)] != old_side:
            raise Bad(f"hunk at old line {start} does not match")
        out.extend(src[pos:at])
        out.extend(new_side)
        pos = at + len(old_side)
    out.extend(src[pos:])
    return "".join(out)


# ---------------------------------------------------------------- ctx-general

ATTR_RE = re.compile(r' ([a-z_]+)="([^"]*)"')


def parse_tag(line, name):
    """Attributes of `<name a="…">` / `<name a="…"/>` alone on a line, and whether it closes."""
    if not line.startswith("<" + name):
        return None
    rest = line[len(name) + 1:]
    attrs = {}
    while True:
        if rest in (">", "/>"):
            return attrs, rest == "/>"
        m = ATTR_RE.match(rest)
        if not m or m.group(1) in attrs:
            return None
        attrs[m.group(1)] = m.group(2)
        rest = rest[m.end():]


def read_general(text, v1=False):
    lines = split_lines(text)
    i = 0

    def until(end):
        nonlocal i
        for k in range(i, len(lines)):
            if bare(lines[k]) == end:
                got, i = lines[i:k], k + 1
                return got
        raise Bad(f"no {end} after line {i}")

    opening = parse_tag(bare(lines[0]), "pull_request") if lines else None
    if not opening or opening[1]:
        raise Bad("does not open with <pull_request>")
    i = 1
    files, base = {}, {}
    while True:
        if i >= len(lines):
            raise Bad("no </pull_request>")
        l = bare(lines[i])
        i += 1
        if l == "</pull_request>":
            break
        if l in ("<description>", "<summary>"):
            until("</" + l[1:])
        elif l == "<relevant_files>":
            while True:
                if i >= len(lines):
                    raise Bad("no </relevant_files>")
                f = bare(lines[i])
                i += 1
                if f == "</relevant_files>":
                    break
                t = parse_tag(f, "file")
                if not t or t[1] or set(t[0]) != {"path"}:
                    raise Bad(f"expected <file path>, got {f!r}")
                if t[0]["path"] in base:
                    raise Bad(f"{t[0]['path']} listed twice")
                base[t[0]["path"]] = body_of(until("</file>"))
            files = dict(base)
        elif l.startswith("<title>") and l.endswith("</title>"):
            pass
        elif parse_tag(l, "issue"):
            until("</issue>")
        elif parse_tag(l, "review"):
            until("</review>")
        elif parse_tag(l, "commit"):
            first = True
            while True:
                if i >= len(lines):
                    raise Bad("no </commit>")
                d = bare(lines[i])
                i += 1
                if d == "</commit>":
                    break
                if first and d == "<message>":
                    until("</message>")
                    first = False
                    continue
                first = False
                t = parse_tag(d, "diff")
                if not t:
                    raise Bad(f"unexpected line in a commit: {d!r}")
                attrs, closed = t
                hunks = "" if closed else "".join(until("</diff>"))
                if v1 and "status" not in attrs:
                    attrs["status"] = infer_v1_status(files, attrs["path"], hunks)
                apply_diff(files, attrs, hunks)
        else:
            raise Bad(f"unexpected line {l!r}")
    if i < len(lines):
        raise Bad("text after </pull_request>")
    return set(base), files


def infer_v1_status(files, path, hunks):
    """v1 diffs name no status: a reader's best guess is an addition when the path is unknown
    and a deletion when the hunks remove every line (`+0,0`)."""
    if path not in files:
        return "added"
    headers = [HUNK_RE.match(l) for l in hunks.split("\n") if l.startswith("@@")]
    if len(headers) == 1 and headers[0] and headers[0].group(3) == "0":
        return "deleted"
    return "modified"


def apply_diff(files, attrs, hunks):
    try:
        apply_diff_tag(files, attrs, hunks)
    except Bad as e:
        raise Bad(f"<diff path=\"{attrs.get('path')}\">: {e}") from None


def apply_diff_tag(files, attrs, hunks):
    if not set(attrs) <= {"path", "old_path", "status"} or "path" not in attrs:
        raise Bad(f"bad <diff> attributes {attrs}")
    path, old, status = attrs["path"], attrs.get("old_path"), attrs.get("status", "modified")
    if status in ("renamed", "copied") and old is not None:
        if old not in files:
            raise Bad(f"{status} source {old} does not exist")
        new = apply_hunks(files[old], hunks)
        if status == "renamed":
            del files[old]
        files[path] = new
    elif old is not None:
        raise Bad(f"old_path on a {status} diff")
    elif status == "added":
        if path in files:
            raise Bad(f"added {path} exists")
        files[path] = apply_hunks("", hunks)
    elif status in ("modified", "deleted"):
        if path not in files:
            raise Bad(f"{status} {path} does not exist")
        new = apply_hunks(files[path], hunks)
        if status == "deleted":
            if new:
                raise Bad(f"deleting {path} leaves text")
            del files[path]
        else:
            files[path] = new
    else:
        raise Bad(f"unknown status {status}")


# ---------------------------------------------------------------- ctx-python

def fence_of(line):
    n = len(line) - len(line.lstrip("`"))
    return line[:n] if n >= 3 and "`" not in line[n:] else None


def read_python(text):
    lines = split_lines(text)
    base, i = {}, 0
    if "## Relevant files\n" in lines:
        i = lines.index("## Relevant files\n") + 1
        while True:
            j = i
            while j < len(lines) and lines[j] == "\n":
                j += 1
            if not (j + 1 < len(lines) and lines[j].startswith("### ")
                    and fence_of(bare(lines[j + 1]))):
                break
            path, fence = bare(lines[j])[4:], fence_of(bare(lines[j + 1]))
            k = j + 2
            while k < len(lines) and bare(lines[k]) != fence:
                k += 1
            if k == len(lines):
                raise Bad(f"fence of {path} does not close")
            if path in base:
                raise Bad(f"{path} listed twice")
            base[path] = body_of(lines[j + 2:k])
            i = k + 1
    try:
        i = lines.index("## Edits\n", i) + 1
    except ValueError:
        raise Bad("no ## Edits")
    files, commits, total = dict(base), 0, None
    while i < len(lines):
        if lines[i].startswith("### ") and i + 1 < len(lines) and bare(lines[i + 1]) == MARK_S:
            if total is None:
                raise Bad("block before the first commit")
            path = bare(lines[i])[4:]
            d = i + 2
            while d < len(lines) and bare(lines[d]) not in (MARK_D, MARK_S):
                d += 1
            r = d + 1
            while r < len(lines) and bare(lines[r]) not in (MARK_R, MARK_D, MARK_S):
                r += 1
            if d >= len(lines) or r >= len(lines) or bare(lines[d]) != MARK_D \
                    or bare(lines[r]) != MARK_R:
                raise Bad(f"unterminated block for {path}")
            apply_block(files, path, body_of(lines[i + 2:d]), body_of(lines[d + 1:r]))
            i = r + 1
            continue
        m = re.match(r"### Commit (\d+)/(\d+): ", lines[i])
        if m and int(m.group(1)) == commits + 1 and (total is None or int(m.group(2)) == total):
            commits, total = commits + 1, int(m.group(2))
        i += 1
    if total is None or commits != total:
        raise Bad(f"{commits} commit sections, header says {total}")
    return set(base), files


def apply_block(files, path, search, replace):
    if path not in files:
        if search:
            raise Bad(f"SEARCH on missing {path}")
        files[path] = replace
    elif search == files[path] and replace == "":
        del files[path]
    elif search == "":
        if files[path]:
            raise Bad(f"empty SEARCH on non-empty {path}")
        files[path] = replace
    else:
        content = files[path]
        n, at = 0, content.find(search)
        while at >= 0 and n < 2:
            n += 1
            at = content.find(search, at + 1)
        if n != 1:
            raise Bad(f"SEARCH occurs {n} times in {path}")
        files[path] = content.replace(search, replace, 1)


def named_paths_python(text):
    """Every path a ctx-python text names: relevant files and block headers."""
    lines = split_lines(text)
    out = set()
    for k, l in enumerate(lines[:-1]):
        if l.startswith("### ") and bare(lines[k + 1]) == MARK_S:
            out.add(bare(l)[4:])
    return out


def named_paths_general(text):
    out = set()
    for l in split_lines(text):
        t = parse_tag(bare(l), "diff")
        if t:
            out.update(v for k, v in t[0].items() if k in ("path", "old_path"))
    return out


# ---------------------------------------------------------------- git

class Git:
    """Blob contents at a commit through one `git cat-file --batch` process."""

    def __init__(self, git_dir):
        self.dir = git_dir
        self.p = subprocess.Popen(["git", "--git-dir", git_dir, "cat-file", "--batch"],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE)

    def blob(self, sha, path):
        """Bytes of `sha:path`, or None when it does not exist (or is not a blob)."""
        if "\n" in path:
            r = subprocess.run(["git", "--git-dir", self.dir, "show", f"{sha}:{path}"],
                               capture_output=True)
            return r.stdout if r.returncode == 0 else None
        self.p.stdin.write(f"{sha}:{path}\n".encode())
        self.p.stdin.flush()
        header = self.p.stdout.readline().decode().split()
        if len(header) != 3:
            return None
        data = self.p.stdout.read(int(header[2]) + 1)[:-1]
        return data if header[1] == "blob" else None

    def changed(self, base, head):
        r = subprocess.run(["git", "--git-dir", self.dir, "diff", "--no-renames", "--name-only",
                            "-z", base, head], capture_output=True)
        if r.returncode != 0:
            raise Bad(f"git diff {base[:10]} {head[:10]}: {r.stderr.decode().strip()}")
        return [p.decode() for p in r.stdout.split(b"\0") if p]


def as_text(data, max_bytes):
    """The blob as text the way the crawler reads it, or None (binary, not UTF-8, too large)."""
    if data is None or len(data) > max_bytes or b"\0" in data[:8000]:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


def check(sample, git, max_bytes):
    text, md = sample["text"], sample["metadata"]
    if sample["source"] == "ctx-general":
        relevant, files = read_general(text, v1=md.get("format", "").endswith("/v1"))
        named = named_paths_general(text)
    elif sample["source"] == "ctx-python":
        relevant, files = read_python(text)
        named = named_paths_python(text)
    else:
        raise Bad(f"not a ctx sample: {sample['source']}")
    base, head = md["base_sha"], md["head_sha"]
    named |= relevant | set(files)
    for path in sorted(named):
        want = git.blob(head, path)
        got = files.get(path)
        if got is None and want is None:
            continue
        if got is None or want is None or got.encode() != want:
            state = ("absent" if got is None else f"{len(got.encode())} bytes") + " rebuilt, " + \
                ("absent" if want is None else f"{len(want)} bytes") + " at head"
            raise Bad(f"{path}: {state}")
    for path in git.changed(base, head):
        if path in named:
            continue
        if as_text(git.blob(head, path), max_bytes) is not None or \
                as_text(git.blob(base, path), max_bytes) is not None:
            raise Bad(f"{path} changed between base and head but the text does not name it")


def read_samples(path):
    if path.endswith(".zst"):
        try:
            import zstandard
            with open(path, "rb") as f:
                data = zstandard.ZstdDecompressor().stream_reader(f).read()
        except ImportError:
            if not shutil.which("zstd"):
                sys.exit(f"{path}: neither the zstandard module nor the zstd tool is available")
            data = subprocess.run(["zstd", "-dc", path], capture_output=True, check=True).stdout
    else:
        with open(path, "rb") as f:
            data = f.read()
    return [json.loads(l) for l in data.decode().split("\n") if l.strip()]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--git", required=True, help="git dir holding base_sha and head_sha")
    ap.add_argument("--max-file-bytes", type=int, default=1 << 20,
                    help="files over this size are outside the text, as in `davinci crawl`")
    ap.add_argument("--show", type=int, default=10, help="failures printed per format")
    ap.add_argument("samples", nargs="+", help="sample shards or directories holding them")
    args = ap.parse_args()
    paths = []
    for p in args.samples:
        if os.path.isdir(p):
            paths += sorted(glob.glob(os.path.join(p, "**", "*.jsonl*"), recursive=True))
        else:
            paths.append(p)
    if not paths:
        print(f"no sample shards under {args.samples}", file=sys.stderr)
        sys.exit(2)
    git = Git(args.git)
    counts = {}
    for p in paths:
        for s in read_samples(p):
            c = counts.setdefault(s["source"], {"emitted": 0, "ok": 0, "failed": 0, "shown": 0})
            c["emitted"] += 1
            try:
                check(s, git, args.max_file_bytes)
                c["ok"] += 1
            except Bad as e:
                c["failed"] += 1
                if c["shown"] < args.show:
                    c["shown"] += 1
                    print(f"FAIL {s['id']} ({s['metadata'].get('format')}): {e}")
    for fmt, c in sorted(counts.items()):
        print(f"{fmt}: {c['emitted']} emitted, {c['ok']} rebuilt OK, {c['failed']} failed")
    sys.exit(1 if any(c["failed"] for c in counts.values()) else 0)


if __name__ == "__main__":
    main()
