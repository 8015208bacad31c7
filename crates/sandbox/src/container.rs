//! What the container backends share: the wrapper every command runs under, and turning its
//! exit status and captured output into a [`RunOutput`].
//!
//! A container exec cannot be given rlimits, a process group to kill, or a reaper of its own,
//! so the command runs under a small POSIX `sh` wrapper inside the container:
//!
//! * per-process limits with `ulimit` (CPU seconds: soft = limit → SIGXCPU, hard = limit + 1;
//!   address space in KiB; file size in 512-byte blocks, the unit dash, busybox ash and bash in
//!   POSIX mode all use; no core files);
//! * after the command ends, a sweep that SIGKILLs every process of the container except PID 1
//!   (the init that reaps orphans), the lease sleeper and the wrapper itself, repeated until a
//!   pass finds nothing, so a background or `setsid` child never outlives [`Sandbox::run`]. The
//!   sweep uses shell builtins only (`for`, `read`, `kill`), so it still works when a fork bomb
//!   holds every process slot. The same sweep, run as its own exec, ends a command on wall-clock
//!   expiry or output overflow.
//!
//! The process-count limit is the container's (cgroup `pids.max`), set by the backend, since
//! RLIMIT_NPROC does not bind root, which task images run as.
//!
//! [`Sandbox::run`]: crate::Sandbox::run

use std::time::Duration;

use crate::output::Capture;
use crate::{Limits, RunOutput, RunSpec, StopReason};

/// SIGXCPU on Linux.
const SIGXCPU: i32 = 24;
/// SIGKILL on Linux.
const SIGKILL: i32 = 9;

/// The kill sweep as a shell function body; `$1` lists the pids to keep (space separated).
const SWEEP_FN: &str = r#"davinci_sweep() {
  keep=" 1 $$ $1 "; i=0
  while [ $i -lt 200 ]; do
    n=0
    for p in /proc/[0-9]*; do
      q=${p#/proc/}
      case "$keep" in *" $q "*) continue ;; esac
      s=''; read -r s < "$p/stat" 2>/dev/null || continue
      s=${s##*) }; s=${s%% *}
      [ "$s" = Z ] && continue
      kill -9 "$q" 2>/dev/null && n=$((n+1))
    done
    [ $n -eq 0 ] && return 0
    i=$((i+1))
  done
}"#;

/// Run once when a workspace starts (`$1`: the mount point, created): prints the pids the
/// kill sweep must spare, i.e. every process but PID 1 and this shell at that moment — the
/// lease sleeper (a child of docker-init, or with a pod's shared process namespace a
/// sibling of the pause container).
pub(crate) const DISCOVER_KEEP: &str = r#"mkdir -p "$1" || exit 1
for p in /proc/[0-9]*; do q=${p#/proc/}; [ "$q" = 1 ] || [ "$q" = $$ ] || echo "$q"; done"#;

/// Parses what [`DISCOVER_KEEP`] printed.
pub(crate) fn parse_keep(children: &str) -> Vec<u32> {
    children
        .split_whitespace()
        .filter_map(|s| s.parse().ok())
        .collect()
}

fn keep_list(keep: &[u32]) -> String {
    keep.iter()
        .map(u32::to_string)
        .collect::<Vec<_>>()
        .join(" ")
}

/// `argv` of the exec that runs `spec` under `limits`.
pub(crate) fn wrapped_argv(spec: &RunSpec, limits: &Limits, keep: &[u32]) -> Vec<String> {
    wrapped_argv_with("", spec, limits, keep)
}

/// [`wrapped_argv`] with shell lines run first (where the exec API has no working directory
/// or environment of its own).
pub(crate) fn wrapped_argv_with(
    prelude: &str,
    spec: &RunSpec,
    limits: &Limits,
    keep: &[u32],
) -> Vec<String> {
    let mut script = String::from(SWEEP_FN);
    script.push('\n');
    script.push_str(prelude);
    if let Some(c) = limits.cpu_time {
        let c = c.as_secs().max(1);
        script.push_str(&format!(
            "ulimit -S -t {c} && ulimit -H -t {} || exit 125\n",
            c + 1
        ));
    }
    if let Some(m) = limits.memory_bytes {
        script.push_str(&format!("ulimit -v {} || exit 125\n", (m / 1024).max(1)));
    }
    if let Some(f) = limits.file_size_bytes {
        script.push_str(&format!("ulimit -f {} || exit 125\n", (f / 512).max(1)));
    }
    script.push_str("ulimit -c 0 2>/dev/null\n");
    if spec.stdin.is_some() {
        script.push_str("\"$@\"\n");
    } else {
        script.push_str("\"$@\" </dev/null\n");
    }
    script.push_str(&format!(
        "rc=$?\ndavinci_sweep '{}'\nexit $rc\n",
        keep_list(keep)
    ));
    let mut argv = vec![
        "/bin/sh".to_string(),
        "-c".to_string(),
        script,
        "davinci-sandbox".to_string(),
    ];
    argv.extend(spec.argv.iter().cloned());
    argv
}

/// `argv` of the exec that kills everything a command left (wall time, output cap, drop).
pub(crate) fn sweep_argv(keep: &[u32]) -> Vec<String> {
    vec![
        "/bin/sh".to_string(),
        "-c".to_string(),
        format!("{SWEEP_FN}\ndavinci_sweep '{}'", keep_list(keep)),
    ]
}

/// The clean environment a command gets on top of the image's own.
pub(crate) fn base_env(spec: &RunSpec, python_hash_seed: &str) -> Vec<String> {
    let mut env = std::collections::BTreeMap::new();
    env.insert("LANG".to_string(), "C.UTF-8".to_string());
    env.insert("TZ".to_string(), "UTC".to_string());
    env.insert("PYTHONHASHSEED".to_string(), python_hash_seed.to_string());
    for (k, v) in &spec.env {
        env.insert(k.clone(), v.clone());
    }
    env.into_iter().map(|(k, v)| format!("{k}={v}")).collect()
}

/// Stdout and stderr of one exec, bounded, with the kill threshold on their sum.
pub(crate) struct Collected {
    pub(crate) out: Capture,
    pub(crate) err: Capture,
    kill_at: Option<u64>,
}

impl Collected {
    pub(crate) fn new(limits: &Limits) -> Self {
        Collected {
            out: Capture::new(limits.output_bytes),
            err: Capture::new(limits.output_bytes),
            kill_at: limits.output_kill_bytes,
        }
    }

    /// Takes a chunk; true when the output passed the kill threshold.
    pub(crate) fn push(&mut self, stderr: bool, data: &[u8]) -> bool {
        if stderr {
            self.err.push(data);
        } else {
            self.out.push(data);
        }
        self.kill_at
            .is_some_and(|k| self.out.total + self.err.total > k)
    }

    /// The run's result from the wrapper's exit code (`None` when it was killed by us).
    pub(crate) fn finish(
        self,
        exit_code: Option<i64>,
        forced: Option<StopReason>,
        wall: Duration,
    ) -> RunOutput {
        let truncated = self.out.truncated() || self.err.truncated();
        let (stdout_bytes, stderr_bytes) = (self.out.total, self.err.total);
        let (exit_code, signal, stop) = match forced {
            Some(r) => (None, Some(SIGKILL), r),
            None => {
                let code = exit_code.map(|c| c as i32);
                // sh reports a command killed by signal N as 128 + N (as bwrap does).
                let sig = code
                    .filter(|c| (129..=128 + 64).contains(c))
                    .map(|c| c - 128);
                let stop = match sig {
                    Some(SIGXCPU) => StopReason::CpuTimeLimit,
                    _ if code.is_none() => StopReason::Signaled,
                    _ => StopReason::Exited,
                };
                (code, sig, stop)
            }
        };
        RunOutput {
            exit_code,
            signal,
            stop,
            stdout: self.out.finish(),
            stderr: self.err.finish(),
            stdout_bytes,
            stderr_bytes,
            truncated,
            wall_time: wall,
            cpu_time: None,
            max_rss_bytes: None,
        }
    }
}

/// A tar archive holding `files` (relative paths already checked), with their parent
/// directories, for upload into a container.
pub(crate) fn tar_files(files: &[(std::path::PathBuf, &[u8])]) -> std::io::Result<Vec<u8>> {
    let mut b = tar::Builder::new(Vec::new());
    let mut dirs = std::collections::BTreeSet::new();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    for (rel, _) in files {
        for anc in rel.ancestors().skip(1) {
            if !anc.as_os_str().is_empty() {
                dirs.insert(anc.to_path_buf());
            }
        }
    }
    for d in &dirs {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Directory);
        h.set_mode(0o755);
        h.set_size(0);
        h.set_mtime(now);
        b.append_data(&mut h, d, std::io::empty())?;
    }
    for (rel, data) in files {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Regular);
        h.set_mode(0o644);
        h.set_size(data.len() as u64);
        h.set_mtime(now);
        b.append_data(&mut h, rel, *data)?;
    }
    b.into_inner()
}

/// A tar archive of a host tree (symbolic links kept as links, never followed).
pub(crate) fn tar_tree(src: &std::path::Path) -> std::io::Result<Vec<u8>> {
    let mut b = tar::Builder::new(Vec::new());
    b.follow_symlinks(false);
    b.append_dir_all(".", src)?;
    b.into_inner()
}

/// The one regular file in a tar archive read back from a container.
pub(crate) fn untar_file(rel: &str, archive: &[u8]) -> Result<Vec<u8>, String> {
    let mut a = tar::Archive::new(archive);
    let mut entries = a.entries().map_err(|e| e.to_string())?;
    let Some(e) = entries.next() else {
        return Err("empty archive".into());
    };
    let mut e = e.map_err(|e| e.to_string())?;
    match e.header().entry_type() {
        tar::EntryType::Regular | tar::EntryType::Continuous => {}
        tar::EntryType::Symlink => {
            return Err(format!("`{rel}` is a symbolic link (not followed)"));
        }
        t => return Err(format!("`{rel}` is not a regular file ({t:?})")),
    }
    let mut data = Vec::new();
    std::io::Read::read_to_end(&mut e, &mut data).map_err(|e| e.to_string())?;
    Ok(data)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wrapper_sets_limits_and_passes_argv_verbatim() {
        let spec = RunSpec::new(["echo", "a b", "$HOME"]);
        let l = Limits {
            cpu_time: Some(Duration::from_secs(3)),
            memory_bytes: Some(1 << 30),
            file_size_bytes: Some(1 << 20),
            ..Limits::default()
        };
        let argv = wrapped_argv(&spec, &l, &[7]);
        assert_eq!(&argv[3..], ["davinci-sandbox", "echo", "a b", "$HOME"]);
        let s = &argv[2];
        assert!(s.contains("ulimit -S -t 3 && ulimit -H -t 4"), "{s}");
        assert!(s.contains("ulimit -v 1048576"), "{s}");
        assert!(s.contains("ulimit -f 2048"), "{s}");
        assert!(s.contains("\"$@\" </dev/null"), "{s}");
        assert!(s.contains("davinci_sweep '7'"), "{s}");
        assert_eq!(parse_keep("7 12\n"), vec![7, 12]);
    }

    #[test]
    fn exit_codes_map_like_the_local_backend() {
        let l = Limits::default();
        let o = Collected::new(&l).finish(Some(3), None, Duration::ZERO);
        assert_eq!(
            (o.exit_code, o.signal, o.stop),
            (Some(3), None, StopReason::Exited)
        );
        let o = Collected::new(&l).finish(Some(152), None, Duration::ZERO);
        assert_eq!(o.stop, StopReason::CpuTimeLimit);
        assert_eq!(o.signal, Some(24));
        let o = Collected::new(&l).finish(None, Some(StopReason::WallTimeout), Duration::ZERO);
        assert_eq!((o.exit_code, o.signal), (None, Some(9)));
    }

    #[test]
    fn tar_round_trip() {
        let t = tar_files(&[("a/b.txt".into(), b"hi")]).unwrap();
        let mut a = tar::Archive::new(&t[..]);
        let names: Vec<String> = a
            .entries()
            .unwrap()
            .map(|e| e.unwrap().path().unwrap().display().to_string())
            .collect();
        assert_eq!(names, ["a", "a/b.txt"]);
    }
}
