#!/usr/bin/env python3
"""Writes a small git repository whose merged PRs hold what a ctx document must carry on its own:
a pure rename, a rename with edits, a copy, an empty new file, files without a final newline,
a last line deleted (with and without a final newline), a deletion, CRLF lines. PRs are merged
the way GitHub records them (`Merge pull request #N from …` merge commits, and a squash merge
`Title (#N)`), so `davinci crawl` finds them in history.

usage: ctx_fixture_repo.py DIR    (DIR must not exist)
"""
import os
import subprocess
import sys

CACHE = '''"""A tiny LRU cache."""
from collections import OrderedDict


class Cache:
    def __init__(self, maxsize):
        self.maxsize = maxsize
        self.data = OrderedDict()

    def get(self, key):
        if key not in self.data:
            return None
        self.data.move_to_end(key)
        return self.data[key]

    def put(self, key, value):
        self.data[key] = value
        if len(self.data) > self.maxsize:
            self.data.popitem(last=False)
'''
SETUP = "from setuptools import setup\n\nsetup(name='lrucache', version='1.0')"
UTIL = "import os\r\n\r\ndef home():\r\n\treturn os.environ['HOME']\r\n\r\ndef tmp():\r\n\treturn '/tmp'"
NOTES = "Release notes\n\n- first\n- second\n"
CHANGES = "1.0: first release\n1.1: fixes\n1.2: draft"
README = "# lrucache\n\nA tiny LRU cache.\n"


def main():
    root = sys.argv[1]
    os.makedirs(root)
    env = dict(os.environ, GIT_AUTHOR_NAME="Jane Doe", GIT_AUTHOR_EMAIL="jane@example.org",
               GIT_COMMITTER_NAME="Jane Doe", GIT_COMMITTER_EMAIL="jane@example.org",
               GIT_CONFIG_GLOBAL=os.devnull, GIT_CONFIG_NOSYSTEM="1")
    clock = [1_700_000_000]

    def git(*args):
        clock[0] += 60
        e = dict(env, GIT_AUTHOR_DATE=f"{clock[0]} +0000", GIT_COMMITTER_DATE=f"{clock[0]} +0000")
        subprocess.run(["git", "-C", root, *args], env=e, check=True, stdout=subprocess.DEVNULL)

    def write(path, text):
        full = os.path.join(root, path)
        os.makedirs(os.path.dirname(full), exist_ok=True)
        with open(full, "w", newline="") as f:
            f.write(text)

    def commit(msg, files):
        """Writes (or with None deletes) files and commits everything."""
        for path, text in files.items():
            if text is None:
                git("rm", "-q", path)
            else:
                write(path, text)
        git("add", "-A")
        git("commit", "-q", "-m", msg)

    def merge(n, branch, title):
        git("checkout", "-q", "main")
        git("merge", "-q", "--no-ff", branch, "-m",
            f"Merge pull request #{n} from jdoe/{branch}\n\n{title}")

    git("init", "-q", "-b", "main")
    commit("Initial import", {"cache.py": CACHE, "setup.py": SETUP, "util.py": UTIL,
                              "NOTES.txt": NOTES, "CHANGES": CHANGES, "VERSION": "1.1",
                              "README.md": README, "old.py": "def legacy():\n    return 1\n"})

    # PR 1: a pure rename and an empty new file, then a copy with an edit and a change to a file
    # without a final newline.
    git("checkout", "-q", "-b", "src-layout")
    os.makedirs(os.path.join(root, "src/lrucache"))
    git("mv", "cache.py", "src/lrucache/cache.py")
    commit("Move cache.py into src/lrucache", {"src/lrucache/__init__.py": ""})
    commit("Add a compat copy; package_dir in setup.py", {
        "src/lrucache/compat.py": CACHE.replace('"""A tiny LRU cache."""', '"""Old import path."""'),
        "setup.py": SETUP.replace("version='1.0')", "version='1.0',\n      package_dir={'': 'src'})"),
    })
    merge(1, "src-layout", "Move the package under src/")

    # PR 2: a rename with edits of a CRLF file without a final newline; last lines deleted.
    git("checkout", "-q", "-b", "tidy")
    git("mv", "util.py", "src/lrucache/paths.py")
    commit("Rename util to paths and use expanduser", {
        "src/lrucache/paths.py": UTIL.replace("os.environ['HOME']", "os.path.expanduser('~')"),
        "NOTES.txt": NOTES.replace("- second\n", ""),
    })
    commit("Drop the draft entry; bump VERSION; remove old.py",
           {"CHANGES": "1.0: first release\n1.1: fixes\n", "VERSION": "1.2", "old.py": None})
    merge(2, "tidy", "Rename util.py and trim the notes")

    # PR 3, squash-merged: a rename with edits, a file gaining its final newline.
    git("mv", "src/lrucache/compat.py", "src/lrucache/legacy.py")
    commit("Rename compat to legacy (#3)", {
        "src/lrucache/legacy.py": CACHE.replace('"""A tiny LRU cache."""', '"""Legacy path."""'),
        "VERSION": "1.2\n",
        "README.md": README + "\nSee `src/lrucache`.\n",
    })


if __name__ == "__main__":
    main()
