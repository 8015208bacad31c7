#!/usr/bin/env bash
# Builds the base image the container sandbox tests run in, without pulling anything: the
# root filesystem is assembled from the files of installed Debian packages (the dependency
# closure of bash, coreutils, python3, git, patch, ...) and loaded with `docker import`.
#
#   scripts/build_sandbox_image.sh            prints the image tag (builds it when absent)
#   DAVINCI_SANDBOX_IMAGE=<tag> overrides the tag (then the image must exist)
#   DAVINCI_BASE_NAME / DAVINCI_BASE_ROOTS: another image name and package set from the same
#   recipe (scripts/build_image.sh makes davinci's runtime base this way)
#
# Needs dpkg (a Debian or Ubuntu host) and a Docker Engine.
set -euo pipefail

if [ -n "${DAVINCI_SANDBOX_IMAGE:-}" ]; then
  docker image inspect "$DAVINCI_SANDBOX_IMAGE" >/dev/null
  echo "$DAVINCI_SANDBOX_IMAGE"
  exit 0
fi

read -ra ROOTS <<<"${DAVINCI_BASE_ROOTS:-bash dash coreutils python3 git patch grep sed findutils diffutils procps util-linux tar gzip}"
command -v docker >/dev/null || { echo "docker CLI not found" >&2; exit 2; }
command -v dpkg-query >/dev/null || { echo "dpkg-query not found: needs a Debian host" >&2; exit 2; }

# The tag hashes the host's package database and this script: cheap to compute, and any
# package change or script change builds a new image.
hash=$( (cat /var/lib/dpkg/status "$0"; printf %s "${DAVINCI_BASE_ROOTS:-}") | sha256sum | cut -c1-12)
tag="${DAVINCI_BASE_NAME:-davinci-sandbox-base}:$hash"
if docker image inspect "$tag" >/dev/null 2>&1; then
  echo "$tag"
  exit 0
fi
echo "building $tag from host packages (about a minute)..." >&2

# Dependency closure over installed packages (Depends + Pre-Depends; alternatives: the first
# installed one).
declare -A seen=()
queue=("${ROOTS[@]}")
while [ ${#queue[@]} -gt 0 ]; do
  p=${queue[0]}; queue=("${queue[@]:1}")
  p=${p%%:*}
  [ -n "${seen[$p]:-}" ] && continue
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed'; then
    continue
  fi
  seen[$p]=1
  deps=$(dpkg-query -W -f='${Depends}, ${Pre-Depends}' "$p" | tr ',' '\n')
  while IFS= read -r alt; do
    [ -z "${alt// }" ] && continue
    IFS='|' read -ra choices <<<"$alt"
    for c in "${choices[@]}"; do
      name=$(echo "$c" | sed -E 's/\(.*\)//; s/[[:space:]]//g; s/:any$//')
      [ -z "$name" ] && continue
      if dpkg-query -W -f='${Status}' "$name" 2>/dev/null | grep -q 'install ok installed'; then
        queue+=("$name"); break
      fi
    done
  done <<<"$deps"
done
pkgs=$(printf '%s\n' "${!seen[@]}" | sort)

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
list="$work/files"
# Paths as dpkg records them (/bin/bash), resolved through merged-/usr symlinks (/usr/bin/bash)
# so the archive holds real directories only under /usr and the top-level links are added once.
for p in $pkgs; do dpkg-query -L "$p"; done | sort -u | while IFS= read -r f; do
  [ -e "$f" ] || [ -L "$f" ] || continue
  [ -d "$f" ] && [ ! -L "$f" ] && continue
  d=$(readlink -f "$(dirname "$f")")
  echo "${d#/}/$(basename "$f")"
done | sort -u >"$list"
# The dynamic loader and the alternatives links the packages' maintainer scripts made.
for f in /etc/alternatives/* /usr/bin/python3 /usr/bin/awk /usr/bin/pager; do
  [ -e "$f" ] || [ -L "$f" ] && echo "${f#/}"
done >>"$list"
# ca-certificates' bundle and hash links are made by update-ca-certificates, not shipped.
if [ -n "${seen[ca-certificates]:-}" ]; then
  find /etc/ssl/certs -maxdepth 1 \( -type f -o -type l \) | sed 's|^/||' >>"$list"
fi

root="$work/root"
mkdir -p "$root"/{etc,tmp,root,testbed,dev,proc,sys,run,var/tmp,home}
chmod 1777 "$root/tmp" "$root/var/tmp"
for l in bin sbin lib lib64; do
  [ -L "/$l" ] && ln -s "$(readlink "/$l")" "$root/$l"
done
cat >"$root/etc/passwd" <<'EOF'
root:x:0:0:root:/root:/bin/bash
nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin
EOF
cat >"$root/etc/group" <<'EOF'
root:x:0:
nogroup:x:65534:
EOF
echo "hosts: files dns" >"$root/etc/nsswitch.conf"
# Files from the host, then our own /etc and links on top.
(cd / && tar -cf - --no-recursion --numeric-owner -T "$list" 2>/dev/null) |
  tar -xf - -C "$root" --keep-directory-symlink --skip-old-files
tar -C "$root" --numeric-owner -cf "$work/rootfs.tar" .
docker import \
  --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
  --change 'ENV LANG=C.UTF-8' \
  --change 'WORKDIR /testbed' \
  --change 'CMD ["/bin/bash"]' \
  "$work/rootfs.tar" "$tag" >/dev/null
echo "$tag"
