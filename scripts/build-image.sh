#!/usr/bin/env bash
# Build the promptbatch image from Dockerfile, with whatever this machine has:
#  - `docker build` where a Docker daemon answers (Docker pulls debian:bookworm-slim);
#  - otherwise buildah, FROM debian:bookworm-slim when it is in the local store or can be
#    pulled, else FROM a base made here from Debian's packages (debootstrap --variant=minbase
#    bookworm, slimmed as the official image is, brought up to date from bookworm-security,
#    then `podman import`ed as localhost/debian:bookworm-slim).
# Both are cached: the base is made once (kept while its recipe is the same), and an image
# is built only when the digest of its inputs (the base, Dockerfile, .dockerignore and the
# files it copies) has no image yet. Runs one at a time per machine (a lock).
#
#   scripts/build-image.sh [TAG]          TAG defaults to promptbatch:latest
#   PROMPTBATCH_IMAGE_BUILDER=docker|buildah   to choose instead of detecting
#   DEBIAN_MIRROR=http://...              the mirror debootstrap uses (deb.debian.org)
#
# The last line printed is the image built or reused, tagged by its inputs
# (promptbatch:inputs-<digest>): a reference that another checkout's build cannot move.
set -euo pipefail
cd "$(dirname "$0")/.."

TAG="${1:-promptbatch:latest}"
SUITE=bookworm
MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
LOCAL_BASE="localhost/debian:${SUITE}-slim"
# What the image copies; .dockerignore lets only these into the build context.
INPUTS=(Dockerfile .dockerignore pyproject.toml README.md config jobs producers scheduler
        workers promptbatch)

say() { printf '%s\n' "--- $*" >&2; }
die() { printf 'build-image: %s\n' "$*" >&2; exit 1; }

inputs_digest() {  # of the files the build context holds, and of the base ($1)
  { printf 'base %s\n' "$1"
    find "${INPUTS[@]}" -type f ! -name '*.pyc' ! -path '*/__pycache__/*' -print0 \
      | LC_ALL=C sort -z | xargs -0 sha256sum
  } | sha256sum | cut -c1-16
}

# A CA bundle for PyPI, when this machine's pip needs one (a proxy's own CA): lent to the
# build's pip steps as a build secret, never stored in the image.
pip_cert="${PIP_CERT:-$(python3 -m pip config get global.cert 2>/dev/null || true)}"
secret=()
[ -n "$pip_cert" ] && [ -r "$pip_cert" ] && secret=(--secret "id=pip_cert,src=$pip_cert")

# --- docker ------------------------------------------------------------------------------
builder="${PROMPTBATCH_IMAGE_BUILDER:-}"
if [ -z "$builder" ]; then
  if command -v docker >/dev/null 2>&1 && docker info >/dev/null 2>&1; then
    builder=docker
  elif command -v buildah >/dev/null 2>&1; then
    builder=buildah
  else
    die "neither a Docker daemon nor buildah here: start Docker, or apt-get install buildah podman runc debootstrap"
  fi
fi
if [ "$builder" = docker ]; then
  digest="$(inputs_digest debian:${SUITE}-slim)"
  say "docker build -t $TAG"
  docker build "${secret[@]}" -t "$TAG" -t "promptbatch:inputs-$digest" --label "org.promptbatch.inputs=$digest" .
  echo "promptbatch:inputs-$digest"
  exit 0
fi
[ "$builder" = buildah ] || die "PROMPTBATCH_IMAGE_BUILDER=$builder: docker or buildah"
command -v podman >/dev/null 2>&1 || die "podman is needed next to buildah (apt-get install podman)"

# One build at a time on this machine: a second waits, then finds the first one's images.
LOCK="${TMPDIR:-/var/tmp}/promptbatch-build-image.lock"
exec 9>"$LOCK"
flock 9

# --- the base ------------------------------------------------------------------------------
# The recipe of the base made here; a change to it makes the base again.
RECIPE="$(printf '%s\n' "$SUITE" "$MIRROR" "minbase" "slim-v1" | sha256sum | cut -c1-16)"

make_base() {
  command -v debootstrap >/dev/null 2>&1 \
    || die "no registry answers and debootstrap is missing: apt-get install debootstrap"
  [ "$(id -u)" = 0 ] || die "making the base with debootstrap needs root (or pull debian:${SUITE}-slim)"
  local root
  root="$(mktemp -d "${TMPDIR:-/var/tmp}/promptbatch-base.XXXXXX")"
  # shellcheck disable=SC2064
  trap "rm -rf '$root'" EXIT
  say "making debian:${SUITE}-slim from $MIRROR (debootstrap --variant=minbase)"
  mkdir -p "$root/etc/dpkg/dpkg.cfg.d"
  # What the official slim image leaves out (documentation, manuals, translations).
  cat > "$root/etc/dpkg/dpkg.cfg.d/docker" <<'EOF'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/groff/*
path-exclude /usr/share/info/*
path-exclude /usr/share/linda/*
path-exclude /usr/share/lintian/*
path-exclude /usr/share/locale/*
path-include /usr/share/locale/locale.alias
path-exclude /usr/share/man/*
EOF
  debootstrap --variant=minbase "$SUITE" "$root" "$MIRROR" >&2
  # The official image's apt settings: no caches or translations kept in a layer.
  cat > "$root/etc/apt/apt.conf.d/docker-clean" <<'EOF'
DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
APT::Update::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
Dir::Cache::pkgcache "";
Dir::Cache::srcpkgcache "";
EOF
  echo 'Acquire::Languages "none";' > "$root/etc/apt/apt.conf.d/docker-no-languages"
  echo 'Acquire::GzipIndexes "true";' > "$root/etc/apt/apt.conf.d/docker-gzip-indexes"
  printf 'APT::AutoRemove::SuggestsImportant "false";\n' \
    > "$root/etc/apt/apt.conf.d/docker-autoremove-suggests"
  printf '#!/bin/sh\nexit 101\n' > "$root/usr/sbin/policy-rc.d"
  chmod +x "$root/usr/sbin/policy-rc.d"
  rm -f "$root/etc/apt/sources.list"
  cat > "$root/etc/apt/sources.list.d/debian.sources" <<EOF
Types: deb
URIs: $MIRROR
Suites: $SUITE $SUITE-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: ${MIRROR%/debian}/debian-security
Suites: $SUITE-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
  find "$root/usr/share/doc" -mindepth 1 -not -name copyright -not -type d -delete
  find "$root/usr/share/doc" -mindepth 1 -type d -empty -delete
  rm -rf "$root"/usr/share/{man,info,groff,lintian,linda}/* "$root/var/cache/apt/"*.bin \
    "$root"/var/cache/apt/archives/*.deb \
    "$root"/var/lib/apt/lists/* "$root"/var/log/*.log "$root"/var/cache/debconf/*-old
  find "$root/usr/share/locale" -mindepth 1 -maxdepth 1 -not -name locale.alias \
    -exec rm -rf {} +
  tar --numeric-owner -C "$root" -c . \
    | podman import --change 'CMD ["bash"]' --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
      --message "debootstrap --variant=minbase $SUITE" - "$LOCAL_BASE-bootstrap" >/dev/null
  rm -rf "$root"
  trap - EXIT
  # Security and point-release updates, as the official image carries them.
  say "bringing the base up to date (bookworm-updates, bookworm-security)"
  local ctr
  ctr="$(buildah from --pull=never --isolation chroot "$LOCAL_BASE-bootstrap")"
  # shellcheck disable=SC2064
  trap "buildah rm '$ctr' >/dev/null 2>&1" EXIT
  buildah run --isolation chroot "$ctr" -- sh -c \
    'apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get upgrade -y -qq >/dev/null && apt-get clean && rm -rf /var/lib/apt/lists/*' >&2
  buildah config --label "org.promptbatch.base-recipe=$RECIPE" "$ctr"
  buildah commit --quiet --squash --rm "$ctr" "$LOCAL_BASE" >/dev/null
  trap - EXIT
  podman rmi "$LOCAL_BASE-bootstrap" >/dev/null
}

base_recipe() {
  podman image inspect --format '{{index .Labels "org.promptbatch.base-recipe"}}' "$1" 2>/dev/null
}

if podman image exists "docker.io/library/debian:${SUITE}-slim"; then
  base="docker.io/library/debian:${SUITE}-slim"
elif podman image exists "$LOCAL_BASE" && [ "$(base_recipe "$LOCAL_BASE")" = "$RECIPE" ]; then
  base="$LOCAL_BASE"
elif timeout 120 podman pull --quiet "docker.io/library/debian:${SUITE}-slim" >/dev/null 2>&1; then
  base="docker.io/library/debian:${SUITE}-slim"
else
  started=$SECONDS
  make_base
  say "base made in $((SECONDS - started)) s"
  base="$LOCAL_BASE"
fi
base_id="$(podman image inspect --format '{{.Id}}' "$base")"

# --- the image -----------------------------------------------------------------------------
digest="$(inputs_digest "$base_id")"
ref="localhost/promptbatch:inputs-$digest"
if podman image exists "$ref"; then
  say "$ref is up to date (its inputs did not change)"
else
  started=$SECONDS
  say "buildah bud FROM $base"
  # docker format: the OCI format has no HEALTHCHECK.
  buildah bud --isolation chroot --format docker --pull=never "${secret[@]}" \
    --build-arg "BASE=$base" --label "org.promptbatch.inputs=$digest" -t "$ref" . >&2
  say "image built in $((SECONDS - started)) s"
fi
podman tag "$ref" "$TAG"
# Older builds go, but for the two newest before this one (an image a container still
# uses stays: rmi without --force refuses it).
podman images --sort created --format '{{.Repository}}:{{.Tag}}' \
  | grep '^localhost/promptbatch:inputs-' | grep -vx "$ref" | tail -n +3 \
  | xargs -r podman rmi >/dev/null 2>&1 || true
say "$(podman image inspect --format '{{.Size}}' "$ref" | awk '{printf "%.0f MB", $1 / 1e6}') ($TAG)"
echo "$ref"
