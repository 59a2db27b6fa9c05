#!/usr/bin/env bash
# The "arm64 proof" of the edge runner: run `python -m edge.run` inside an arm64 (aarch64) Debian userland
# under qemu-user on a few real test chest X-rays, run the very same command on x86 with .venv, and write
# docs/edge_arm64.md comparing the two (labels, probabilities, heatmap overlays, versions, commands).
#
#     sudo edge/arm64_check.sh [--models "edge/models/a.onnx edge/models/b.onnx"] [--per-class N]
#                              [--threads N] [--mode auto|chroot|qemu-L] [--cpu cortex-a72|cortex-a76|max]
#                              [--rebuild] [--no-report]
#
# Environment (each has the option above as its twin): ARM64_MODELS (space or comma separated),
# ARM64_PER_CLASS (4), ARM64_THREADS (1), ARM64_MODE (auto), ARM64_CACHE (.cache/arm64, git-ignored),
# ARM64_SUITE (bookworm: the release under Raspberry Pi OS 64-bit, Python 3.11 as our .venv),
# ARM64_MIRROR (http://deb.debian.org/debian), ARM64_INDEX_URL (https://pypi.org/simple),
# PNEUNET_DATA (../shared/data/kermany224, as training.data), X86_PYTHON (.venv/bin/python),
# ARM64_REPORT (docs/edge_arm64.md), ARM64_RETRIES (5: snapshot retries while the models are re-exported),
# ARM64_CPU (cortex-a72: the Raspberry Pi 4's core; cortex-a76 is the Pi 5's; max: every feature qemu has).
#
# Needs root (debootstrap, chroot, user namespaces) and only the Debian and PyPI mirrors: it installs
# qemu-user-static + debootstrap with apt when they are missing. Idempotent: the rootfs, the aarch64 wheels
# and the arm64 venv are built once under the cache folder (markers say which step is done) and reused;
# --rebuild starts the cache over. Every run re-copies the code, the models and the images, so it always
# tests what is in the working tree at that moment.
#
# How arm64 binaries run here (no binfmt_misc handler is registered on this machine, and registering one
# would change the kernel for everybody): "chroot" mode creates a private user + mount + pid namespace,
# mounts a namespace-own binfmt_misc instance there (Linux >= 6.7 "sandboxed" binfmt_misc), registers
# qemu-aarch64-static in it with the F (fix-binary) flag and chroots into the rootfs: every aarch64 ELF
# (dpkg, sh, python3, ...) then runs under qemu, so debootstrap's second stage, venv and pip work as on a
# Pi. Nothing outside the namespace sees the registration; it is gone when the command ends. If that is
# impossible (older kernel, no user namespaces) "qemu-L" mode runs python3 directly as
# `qemu-aarch64-static -L ROOTFS ROOTFS/usr/bin/python3` on the unconfigured first-stage rootfs with the
# wheels installed by the x86 pip for the aarch64 platform (--target); nothing there execs another binary.
#
# qemu 7.2 (bookworm) passes the host's x86 /proc/cpuinfo through to the guest, and onnxruntime's cpuinfo
# library crashes (SIGSEGV at import) parsing it as an ARM one. So the rootfs sees an ARM /proc/cpuinfo
# matching the emulated CPU (QEMU_CPU=cortex-a72 by default: a Raspberry Pi 4's core, so onnxruntime picks
# the kernels a Pi 4 has, e.g. no dot-product/SVE ones), bind-mounted over /proc/cpuinfo (or, in qemu-L
# mode, found first under ROOTFS/proc). On a real Pi the kernel's own /proc/cpuinfo is used, of course.
#
# qemu-user translates instructions on the x86 CPU: the wall times in the report are emulated times,
# not Raspberry Pi times.

set -euo pipefail
export LC_ALL=C

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
CACHE=${ARM64_CACHE:-$REPO/.cache/arm64}
ROOTFS=$CACHE/rootfs
SUITE=${ARM64_SUITE:-bookworm}
MIRROR=${ARM64_MIRROR:-http://deb.debian.org/debian}
INDEX_URL=${ARM64_INDEX_URL:-https://pypi.org/simple}
DATA=${PNEUNET_DATA:-$(cd "$REPO/.." && pwd)/shared/data/kermany224}
X86_PY=${X86_PYTHON:-$REPO/.venv/bin/python}
REPORT=${ARM64_REPORT:-$REPO/docs/edge_arm64.md}
PER_CLASS=${ARM64_PER_CLASS:-4}
THREADS=${ARM64_THREADS:-1}
MODE=${ARM64_MODE:-auto}
CPU=${ARM64_CPU:-cortex-a72}
MODELS=${ARM64_MODELS:-}
RETRIES=${ARM64_RETRIES:-5}
REBUILD=0
WRITE_REPORT=1
INVOCATION="edge/arm64_check.sh $*"

usage() { sed -n '2,16p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; }
while [[ $# -gt 0 ]]; do
  case $1 in
    --models) MODELS=$2; shift 2 ;;
    --models=*) MODELS=${1#*=}; shift ;;
    --per-class) PER_CLASS=$2; shift 2 ;;
    --threads) THREADS=$2; shift 2 ;;
    --mode) MODE=$2; shift 2 ;;
    --cpu) CPU=$2; shift 2 ;;
    --rebuild) REBUILD=1; shift ;;
    --no-report) WRITE_REPORT=0; shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "unknown argument: $1" >&2; usage >&2; exit 2 ;;
  esac
done

log() { printf '[arm64_check %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "error: $*"; exit 1; }
now() { date +%s.%N; }
elapsed() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }

[[ $(id -u) == 0 ]] || die "run as root (debootstrap, chroot and user namespaces need it)"
[[ -x $X86_PY ]] || die "$X86_PY missing: create the x86 venv first (python -m venv .venv; pip install -r edge/requirements.txt)"
# Be gentle with a shared machine: lower priority, one BLAS/OpenMP thread (children inherit both).
renice -n 10 -p $$ >/dev/null 2>&1 || true
export OMP_NUM_THREADS=1

# Default models: the two committed ONNX exports, plus the int8 TFLite export when it has been built.
if [[ -z $MODELS ]]; then
  MODELS="edge/models/model_fp32.onnx edge/models/model_int8.onnx"
  [[ -f $REPO/edge/models/model_int8.tflite ]] && MODELS="$MODELS edge/models/model_int8.tflite"
fi
read -r -a MODEL_LIST <<< "${MODELS//,/ }"
for i in "${!MODEL_LIST[@]}"; do  # relative to the repository root, or absolute
  model=${MODEL_LIST[$i]}; [[ $model == /* ]] || model=$REPO/$model
  [[ -f $model ]] || die "$model: no such model"
  [[ $(dirname "$(realpath "$model")") == "$(realpath "$REPO/edge/models")" ]] || die "$model: models must live in edge/models (beside the sidecar)"
  MODEL_LIST[$i]=edge/models/$(basename "$model")
done

mkdir -p "$CACHE"
if [[ $REBUILD == 1 ]]; then log "--rebuild: removing $CACHE/{rootfs,wheels,*.done}"; rm -rf "$ROOTFS" "$CACHE/wheels" "$CACHE"/*.done; fi
SETUP_START=$(now)
# A setup step that ran records its wall time in setup_times.tsv (kept with the cache for the report).
step_done() {  # MARKER DESCRIPTION STEP_START
  printf '%s\t%s\t%s\n' "$2" "$(elapsed "$3")" "$(date -u '+%Y-%m-%d %H:%M UTC')" >> "$CACHE/setup_times.tsv"
  touch "$CACHE/$1"
}

# ---------------------------------------------------------------------------------------------------------
# 1. Host tools: qemu-user-static (static qemu-aarch64) and debootstrap, from the Debian mirror.
if ! command -v qemu-aarch64-static >/dev/null || ! command -v debootstrap >/dev/null; then
  log "installing qemu-user-static and debootstrap with apt"
  DEBIAN_FRONTEND=noninteractive apt-get update -q >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends qemu-user-static debootstrap >/dev/null
fi
QEMU=$(command -v qemu-aarch64-static)

# ---------------------------------------------------------------------------------------------------------
# 2. First stage of an arm64 Debian (minbase + python3 + venv): downloads and unpacks the .debs, no scripts.
if [[ ! -f $CACHE/stage1.done ]]; then
  rm -rf "$ROOTFS" "$CACHE"/*.done
  log "debootstrap --foreign --arch=arm64 $SUITE (first stage) into $ROOTFS"; t0=$(now); : > "$CACHE/setup_times.tsv"
  # container=lxc: debootstrap would take this machine for docker (/.dockerenv) and make ROOTFS/proc a
  # symlink to the host's /proc; as "lxc" it keeps a real /proc dir and skips the mknod probe that a user
  # namespace (second stage) cannot pass. Device nodes are bind-mounted from the host anyway.
  container=lxc debootstrap --arch=arm64 --foreign --variant=minbase --include=python3,python3-venv \
    "$SUITE" "$ROOTFS" "$MIRROR" > "$CACHE/debootstrap-stage1.log" 2>&1 \
    || die "debootstrap first stage failed; see $CACHE/debootstrap-stage1.log"
  if [[ -L $ROOTFS/proc ]]; then rm "$ROOTFS/proc"; mkdir "$ROOTFS/proc"; fi
  cp "$QEMU" "$ROOTFS/usr/bin/"  # not needed with the F flag, but lets a host-wide binfmt handler work too
  step_done stage1.done "debootstrap first stage (download + unpack, native)" "$t0"
fi

# run_ns SCRIPT ARGS...: run a bash script as root of a private user + mount + pid namespace (uids and gids
# 0..65535 mapped onto the same host ids) that has its own binfmt_misc with qemu-aarch64 registered, and
# the rootfs's /proc, /dev and /sys mounted. Nothing is visible outside; it all goes when the script ends.
# An ARM /proc/cpuinfo for the emulated CPU (see the header), one entry per host CPU.
case $CPU in
  cortex-a76) PART=0xd0b; VARIANT=0x4; REV=1; FEATURES="fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp" ;;
  *) PART=0xd08; VARIANT=0x0; REV=3; FEATURES="fp asimd evtstrm crc32 cpuid" ;;  # cortex-a72 (BCM2711)
esac
for ((cpu_index = 0; cpu_index < $(nproc --all); cpu_index++)); do
  printf 'processor\t: %d\nBogoMIPS\t: 108.00\nFeatures\t: %s\nCPU implementer\t: 0x41\nCPU architecture: 8\nCPU variant\t: %s\nCPU part\t: %s\nCPU revision\t: %s\n\n' \
    "$cpu_index" "$FEATURES" "$VARIANT" "$PART" "$REV"
done > "$CACHE/cpuinfo"

NS_PRELUDE=$CACHE/ns_prelude.sh
cat > "$NS_PRELUDE" <<EOF
set -euo pipefail
mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc
# Debian's qemu-aarch64 magic/mask (binfmts/qemu-aarch64); F: the interpreter is opened now, so it need
# not exist inside the chroot; O, C: credentials and file descriptor semantics as for a native binary.
printf '%s' ':qemu-aarch64:M::\\x7fELF\\x02\\x01\\x01\\x00\\x00\\x00\\x00\\x00\\x00\\x00\\x00\\x00\\x02\\x00\\xb7\\x00:\\xff\\xff\\xff\\xff\\xff\\xff\\xff\\x00\\xff\\xff\\xff\\xff\\xff\\xff\\xff\\xff\\xfe\\xff\\xff\\xff:$QEMU:FOC' > /proc/sys/fs/binfmt_misc/register
mount -t proc proc "$ROOTFS/proc"
mount --rbind /dev "$ROOTFS/dev"
mount --rbind /sys "$ROOTFS/sys"
mount --bind "$CACHE/cpuinfo" "$ROOTFS/proc/cpuinfo"
EOF
run_ns() {
  local fifo pid i
  fifo=$(mktemp -u "$CACHE/ns.XXXXXX"); mkfifo "$fifo"
  unshare --user --mount --pid --fork --propagation private \
    bash -c 'read -r _ < "$0"; rm -f "$0"; source "$1"; shift 1; source "$@"' "$fifo" "$NS_PRELUDE" "$@" &
  pid=$!
  for i in $(seq 200); do  # wait until unshare has entered its new user namespace
    [[ $(readlink "/proc/$pid/ns/user") != "$(readlink /proc/self/ns/user)" ]] && break; sleep 0.05
  done
  echo "0 0 65536" > "/proc/$pid/uid_map"; echo "0 0 65536" > "/proc/$pid/gid_map"
  echo go > "$fifo"
  wait "$pid"
}

# ---------------------------------------------------------------------------------------------------------
# 3. How to run aarch64 binaries here: chroot (private binfmt_misc) if the kernel allows it, else qemu -L.
if [[ $MODE == auto ]]; then
  probe=$CACHE/probe.sh
  echo "chroot \"$ROOTFS\" /usr/bin/uname -m" > "$probe"
  if [[ $(run_ns "$probe" 2>/dev/null) == aarch64 ]]; then MODE=chroot; else MODE=qemu-L; fi
  log "binfmt_misc: host instance $( [[ -e /proc/sys/fs/binfmt_misc/status ]] && echo mounted || echo 'not mounted' ); mode: $MODE"
fi
[[ $MODE == chroot || $MODE == qemu-L ]] || die "--mode must be auto, chroot or qemu-L"

# 4. Second stage (chroot mode only): dpkg configures every package under qemu, as on a real arm64 box.
if [[ $MODE == chroot && ! -f $CACHE/stage2.done ]]; then
  log "debootstrap --second-stage under qemu (a few minutes)"; t0=$(now)
  echo "container=lxc chroot \"$ROOTFS\" /debootstrap/debootstrap --second-stage" > "$CACHE/stage2.sh"
  run_ns "$CACHE/stage2.sh" > "$CACHE/debootstrap-stage2.log" 2>&1 \
    || die "second stage failed; see $CACHE/debootstrap-stage2.log (or rerun with --mode qemu-L)"
  step_done stage2.done "debootstrap second stage (dpkg configure, emulated)" "$t0"
fi
# qemu-L mode has no second stage: unpack the downloaded .debs (python3 and its libraries are only unpacked
# by the second stage) with the host's dpkg-deb, as the first stage does; nothing gets configured.
if [[ $MODE == qemu-L && ! -f $CACHE/unpacked.done ]]; then
  log "unpacking the arm64 .debs into $ROOTFS (qemu-L mode)"; t0=$(now)
  for deb in "$ROOTFS"/var/cache/apt/archives/*.deb; do
    dpkg-deb --fsys-tarfile "$deb" | tar -C "$ROOTFS" --keep-directory-symlink -xf -
  done
  step_done unpacked.done "unpack the .debs (qemu-L mode, native)" "$t0"
fi
PYVER=$(basename "$(ls -d "$ROOTFS"/usr/lib/python3.[0-9]* | sort -V | tail -1)")  # e.g. python3.11
PYVER=${PYVER#python}

# ---------------------------------------------------------------------------------------------------------
# 5. aarch64 wheels of edge/requirements.txt, downloaded by the x86 pip for the rootfs's Python and glibc.
# Only PyPI: no pip config files, no local find-links. ai-edge-litert is optional: if it has no aarch64
# wheel, that is recorded and the .tflite models are skipped on arm64.
REQ_SHA=$(sha256sum "$REPO/edge/requirements.txt" | cut -c1-16)
WHEELS=$CACHE/wheels
# Highest manylinux level the rootfs's glibc accepts (bookworm: glibc 2.36).
GLIBC_MINOR=$(grep -ao 'GLIBC 2\.[0-9]*' "$ROOTFS/usr/lib/aarch64-linux-gnu/libc.so.6" | head -1 | cut -d. -f2 || true)
GLIBC_MINOR=${GLIBC_MINOR:-36}
PLATFORMS=(--platform manylinux2014_aarch64)
for minor in $(seq 17 "$GLIBC_MINOR"); do PLATFORMS+=(--platform "manylinux_2_${minor}_aarch64"); done
grep -v '^\s*#' "$REPO/edge/requirements.txt" | sed 's/#.*//; s/\s*$//' | grep -v '^$' > "$CACHE/requirements.all.txt"
grep -iv '^ai-edge-litert' "$CACHE/requirements.all.txt" > "$CACHE/requirements.core.txt"
grep -i '^ai-edge-litert' "$CACHE/requirements.all.txt" > "$CACHE/requirements.litert.txt" || true
pip_x86() { env -u PIP_FIND_LINKS -u PIP_EXTRA_INDEX_URL -u PIP_INDEX_URL -u PIP_CONSTRAINT PIP_CONFIG_FILE=/dev/null \
  "$X86_PY" -m pip "$@" --index-url "$INDEX_URL" --only-binary=:all: "${PLATFORMS[@]}" \
  --python-version "$PYVER" --implementation cp; }
if [[ ! -f $CACHE/wheels.$REQ_SHA.done ]]; then
  rm -rf "$WHEELS" "$CACHE/venv.done"; mkdir -p "$WHEELS"
  log "downloading aarch64 wheels (cp${PYVER/./}, manylinux up to glibc 2.$GLIBC_MINOR) from $INDEX_URL"; t0=$(now)
  pip_x86 download -q --dest "$WHEELS" -r "$CACHE/requirements.core.txt" > "$CACHE/pip-download.log" 2>&1 \
    || die "aarch64 wheels of edge/requirements.txt missing; see $CACHE/pip-download.log"
  if [[ -s $CACHE/requirements.litert.txt ]]; then
    if pip_x86 download -q --dest "$WHEELS" -r "$CACHE/requirements.litert.txt" >> "$CACHE/pip-download.log" 2>&1; then
      echo "available: $(ls "$WHEELS" | grep -i '^ai_edge_litert')" > "$WHEELS/litert.status"
    else
      echo "unavailable: no aarch64 wheel of $(cat "$CACHE/requirements.litert.txt") for cp${PYVER/./} on $INDEX_URL" > "$WHEELS/litert.status"
    fi
  else
    echo "not requested by edge/requirements.txt" > "$WHEELS/litert.status"
  fi
  step_done "wheels.$REQ_SHA.done" "pip download of the aarch64 wheels (native)" "$t0"
fi
LITERT_STATUS=$(cat "$WHEELS/litert.status")

# 6. The arm64 Python environment: a venv made and filled by the arm64 python3/pip (chroot mode; pip then
# checks the wheel tags against the real aarch64 interpreter), or a --target folder (qemu-L mode).
if [[ ! -f $CACHE/venv.$MODE.$REQ_SHA.done ]]; then
  t0=$(now)
  rm -rf "$ROOTFS/opt/venv" "$ROOTFS/opt/site" "$ROOTFS/opt/wheels"
  mkdir -p "$ROOTFS/opt"; cp -r "$WHEELS" "$ROOTFS/opt/wheels"
  reqs=$CACHE/requirements.core.txt
  [[ $LITERT_STATUS == available* ]] && reqs=$CACHE/requirements.all.txt
  cp "$reqs" "$ROOTFS/opt/wheels/requirements.txt"
  if [[ $MODE == chroot ]]; then
    log "creating /opt/venv in the arm64 rootfs and installing the wheels with the arm64 pip (emulated)"
    cat > "$CACHE/venv.sh" <<EOF
chroot "$ROOTFS" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LANG=C.UTF-8 sh -ec '
  python3 -m venv /opt/venv
  /opt/venv/bin/pip install --disable-pip-version-check --no-index --find-links /opt/wheels -r /opt/wheels/requirements.txt'
EOF
    run_ns "$CACHE/venv.sh" > "$CACHE/venv.log" 2>&1 || die "arm64 venv failed; see $CACHE/venv.log"
  else
    log "installing the aarch64 wheels into $ROOTFS/opt/site with the x86 pip (--target)"
    pip_x86 install -q --no-index --find-links "$ROOTFS/opt/wheels" --target "$ROOTFS/opt/site" \
      -r "$ROOTFS/opt/wheels/requirements.txt" > "$CACHE/venv.log" 2>&1 || die "see $CACHE/venv.log"
  fi
  rm -f "$CACHE"/venv.*.done
  step_done "venv.$MODE.$REQ_SHA.done" "$( [[ $MODE == chroot ]] && echo 'arm64 venv + pip install (emulated)' || echo 'pip install --target (native)')" "$t0"
fi
SETUP_S=$(elapsed "$SETUP_START")

# arm64 SCRIPT_TEXT: run a shell snippet with the arm64 python as `python`, cwd /opt/pneunet in the rootfs.
arm64() {
  if [[ $MODE == chroot ]]; then
    printf 'chroot %q /usr/bin/env -i QEMU_CPU=%q PATH=/opt/venv/bin:/usr/bin:/bin HOME=/root LANG=C.UTF-8 OMP_NUM_THREADS=1 sh -c %q\n' \
      "$ROOTFS" "$CPU" "cd /opt/pneunet && $1" > "$CACHE/arm64_cmd.sh"
    run_ns "$CACHE/arm64_cmd.sh"
  else  # python() is a shell function here: the emulated rootfs python3 with the --target site folder.
    # qemu -L looks a path up under ROOTFS first, so ROOTFS/proc/cpuinfo (a plain file here) is the ARM one.
    if [[ -d $ROOTFS/proc && ! -e $ROOTFS/proc/cpuinfo ]]; then cp "$CACHE/cpuinfo" "$ROOTFS/proc/cpuinfo"; fi
    (cd "$ROOTFS/opt/pneunet" && env -i PATH=/usr/bin:/bin LANG=C.UTF-8 OMP_NUM_THREADS=1 \
      PYTHONPATH="$ROOTFS/opt/site" QEMU=$QEMU ROOTFS=$ROOTFS PYVER=$PYVER bash -c \
      "python() { \"\$QEMU\" -cpu $CPU -L \"\$ROOTFS\" \"\$ROOTFS/usr/bin/python\$PYVER\" \"\$@\"; }; uname() { \"\$QEMU\" -L \"\$ROOTFS\" \"\$ROOTFS/usr/bin/uname\" \"\$@\"; }; $1")
  fi
}
x86() { (cd "$ROOTFS/opt/pneunet" && env -i PATH="$(dirname "$X86_PY"):/usr/bin:/bin" LANG=C.UTF-8 OMP_NUM_THREADS=1 \
  bash -c "python() { \"$X86_PY\" \"\$@\"; }; $1"); }

# ---------------------------------------------------------------------------------------------------------
# 7. Snapshot of what the device needs (pneunet/ and edge/ code, the chosen models, sidecar, input gate) and
# of the images, into ROOTFS/opt/pneunet. x86 and arm64 both run this same copy, so they read the same
# bytes even if someone re-exports edge/models meanwhile. The sidecar's sha256 must match every model:
# otherwise an export is in progress, so wait a minute and copy again.
RUN=$ROOTFS/opt/pneunet
OUT=$RUN/out
snapshot() {
  rm -rf "$RUN"; mkdir -p "$RUN/pneunet" "$RUN/edge/models" "$RUN/images" "$OUT"
  cp "$REPO"/pneunet/*.py "$RUN/pneunet/"
  cp "$REPO"/edge/*.py "$REPO/edge/requirements.txt" "$RUN/edge/"
  cp "$REPO"/edge/models/pneunet_edge.json "$RUN/edge/models/"
  for f in pneunet.gate.safetensors parity.json; do
    [[ -f $REPO/edge/models/$f ]] && cp "$REPO/edge/models/$f" "$RUN/edge/models/"
  done
  for model in "${MODEL_LIST[@]}"; do cp "$REPO/$model" "$RUN/edge/models/"; done
  (cd "$RUN" && "$X86_PY" - "${MODEL_LIST[@]}" <<'EOF'
import hashlib, json, sys
from pathlib import Path
side = json.loads(Path("edge/models/pneunet_edge.json").read_text())
files = [Path(m).name for m in sys.argv[1:]] + ([side["gate"]["file"]] if side.get("gate") else [])
for name in files:
    want = side["gate"]["sha256"] if side.get("gate") and name == side["gate"]["file"] else side["models"].get(name, {}).get("sha256")
    got = hashlib.sha256(Path("edge/models", name).read_bytes()).hexdigest()
    if want != got:
        sys.exit(f"{name}: sha256 {got[:12]} but the sidecar says {str(want)[:12]}")
EOF
  )
}
for attempt in $(seq "$RETRIES"); do
  if msg=$(snapshot 2>&1); then break; fi
  [[ $attempt == "$RETRIES" ]] && die "models and sidecar still disagree after $RETRIES tries: $msg"
  log "models and sidecar disagree ($msg): an export is probably running; retrying in 60 s"; sleep 60
done
IMAGES=()
for cls in NORMAL PNEUMONIA; do  # the first PER_CLASS images of each class of the test split, by name
  [[ -d $DATA/test/$cls ]] || die "$DATA/test/$cls missing (set PNEUNET_DATA)"
  mkdir -p "$RUN/images/$cls"
  while read -r name; do
    cp "$DATA/test/$cls/$name" "$RUN/images/$cls/"; IMAGES+=("images/$cls/$name")
  done < <(ls "$DATA/test/$cls" | grep -iE '\.(jpe?g|png)$' | sort | head -n "$PER_CLASS")
done
printf '%s\n' "${IMAGES[@]}" > "$OUT/images.txt"

# ---------------------------------------------------------------------------------------------------------
# 8. Facts of both sides, then the same edge.run command per model on arm64 (emulated) and on x86.
FACTS_PY='import json, platform, sys, importlib.metadata as md
facts = {"uname_m": sys.argv[2], "uname_r": sys.argv[3], "platform_machine": platform.machine(),
         "python": platform.python_version(), "executable": sys.executable, "libc": " ".join(platform.libc_ver()),
         "os_release": dict(l.split("=", 1) for l in open("/etc/os-release").read().replace("\"", "").split("\n") if "=" in l),
         "packages": {}}
for name in ["numpy", "pillow", "onnxruntime", "ai-edge-litert", "safetensors", "ml-dtypes", "flatbuffers", "protobuf"]:
    try: facts["packages"][name] = md.version(name)
    except md.PackageNotFoundError: facts["packages"][name] = None
try:
    import onnxruntime; facts["onnxruntime_providers"] = onnxruntime.get_available_providers()
except Exception as e: facts["onnxruntime_providers"] = repr(e)
try: facts["debian_version"] = open("/etc/debian_version").read().strip()
except OSError: pass
try:  # the CPU features the (emulated) kernel reports: AT_HWCAP from /proc/self/auxv, on aarch64 only
    import struct
    if platform.machine() == "aarch64":
        aux = open("/proc/self/auxv", "rb").read()
        hw = dict(struct.iter_unpack("<QQ", aux[: len(aux) // 16 * 16])).get(16, 0)
        names = "fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm jscvt fcma lrcpc dcpop sha3 sm3 sm4 asimddp sha512 sve".split()
        facts["hwcap"] = " ".join(n for i, n in enumerate(names) if hw >> i & 1)
    else:
        flags = next((l.split(":", 1)[1].split() for l in open("/proc/cpuinfo") if l.startswith("flags")), [])
        facts["simd_flags"] = " ".join(f for f in flags if f.startswith(("avx", "fma", "sse4", "amx")))
    facts["cpuinfo_model"] = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith(("CPU part", "model name"))), None)
except OSError: pass
json.dump(facts, open(sys.argv[1], "w"), indent=1)'
log "collecting versions on arm64 ($MODE) and x86"
printf '%s' "$FACTS_PY" > "$RUN/facts.py"
cat > "$RUN/precise.py" <<'EOF'
# python precise.py MODEL THREADS OUT.npz INT8_KERNELS IMAGE...: full-precision outputs of edge.run's predictor.
import inspect
import sys
import numpy as np
from pneunet.predictor import Predictor
model, threads, out, kernels, paths = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5:]
options = {}
if kernels != "auto":  # int8 ONNX: "fused" integer kernels or "reference" (Q/DQ unfused), where the runner has the choice
    if "int8_kernels" not in inspect.signature(Predictor.load).parameters:
        sys.exit(3)
    options["int8_kernels"] = kernels
predictor = Predictor.load(model, threads=threads, **options)
runtime = predictor.runtime
inputs = np.stack([predictor.prepare(path)[1] for path in paths])  # one batch, as edge.run (<= 16 images)
results = predictor.predict_inputs(inputs, heatmap=True)
np.savez(out, paths=np.array(paths), runtime=np.array(str(runtime)), logit=np.array([r.logit for r in results], np.float64),
         probability=np.array([r.pneumonia_probability for r in results], np.float64),
         heatmap=np.stack([r.heatmap for r in results]).astype(np.float32))
EOF
arm64 'python facts.py out/arm64_facts.json "$(uname -m)" "$(uname -r)"' || die "arm64 python does not start"
x86 'python facts.py out/x86_facts.json "$(uname -m)" "$(uname -r)"'
[[ $MODE == qemu-L ]] && "$X86_PY" - "$OUT/arm64_facts.json" "$ROOTFS" <<'EOF'
import json, sys  # qemu -L: python's own /etc paths are the host's; read the rootfs's instead
path, root = sys.argv[1:]
f = json.load(open(path))
f["os_release"] = dict(l.split("=", 1) for l in open(root + "/etc/os-release").read().replace('"', "").split("\n") if "=" in l)
f["debian_version"] = open(root + "/etc/debian_version").read().strip()
json.dump(f, open(path, "w"), indent=1)
EOF

: > "$OUT/runs.tsv"
for model in "${MODEL_LIST[@]}"; do
  name=$(basename "$model"); stem=${name//./_}  # model_int8_onnx, model_int8_tflite
  rel=edge/models/$name
  for arch in arm64 x86; do
    if [[ $arch == arm64 && $name == *.tflite && $LITERT_STATUS != available* ]]; then
      printf '%s\t%s\tskipped\t0\t%s\n' "$name" "$arch" "ai-edge-litert: $LITERT_STATUS" >> "$OUT/runs.tsv"; continue
    fi
    cmd="python -m edge.run --model $rel --threads $THREADS --csv out/${arch}_$stem.csv --cam out/${arch}_${stem}_cam ${IMAGES[*]}"
    log "$arch: $cmd"
    start=$(now); rc=0
    "$arch" "$cmd" > "$OUT/${arch}_$stem.log" 2>&1 || rc=$?
    secs=$(elapsed "$start")
    # Full precision (the CSV has 4 decimals): logits, probabilities and heatmaps of the same batch through
    # the inference core's Predictor (what edge.run runs), saved as .npz for the report. Not timed.
    "$arch" "python precise.py $rel $THREADS out/${arch}_$stem.npz auto ${IMAGES[*]}" >> "$OUT/${arch}_$stem.precise.log" 2>&1 \
      || log "$arch $name: full-precision dump failed (see out/${arch}_$stem.precise.log)"
    # int8 ONNX: the runner picks fused integer kernels or Q/DQ-unfused float arithmetic per CPU (--int8-kernels
    # auto); run both explicitly on both sides to tell the platform's share from the arithmetic's.
    if [[ $name == *.onnx ]] && "$X86_PY" -c 'import json, sys; sys.exit(json.load(open(sys.argv[1]))["models"][sys.argv[2]].get("precision") != "int8")' \
         "$RUN/edge/models/pneunet_edge.json" "$name" 2>/dev/null; then
      for kernels in fused reference; do
        "$arch" "python precise.py $rel $THREADS out/${arch}_$stem.$kernels.npz $kernels ${IMAGES[*]}" >> "$OUT/${arch}_$stem.precise.log" 2>&1 || true
      done
    fi
    printf '%s\t%s\t%s\t%s\t%s\n' "$name" "$arch" "$rc" "$secs" "$cmd" >> "$OUT/runs.tsv"
    log "$arch $name: exit $rc in $secs s$( [[ $rc != 0 ]] && echo "; $(tail -2 "$OUT/${arch}_$stem.log" | tr '\n' ' ')")"
  done
done
sha256sum "$RUN"/edge/models/* | sed "s|$RUN/||" > "$OUT/sha256.txt"

# ---------------------------------------------------------------------------------------------------------
# 9. The report, from the files of this run only.
[[ $WRITE_REPORT == 1 ]] || { log "done (no report); results in $OUT"; exit 0; }
META_MODE=$MODE META_CPU=$CPU META_CACHE="$(realpath --relative-to="$REPO" "$CACHE")" META_SUITE=$SUITE META_MIRROR=$MIRROR META_INDEX_URL=$INDEX_URL META_QEMU="$("$QEMU" --version | head -1)" \
META_DEBOOTSTRAP="debootstrap $(dpkg-query -W -f '${Version}' debootstrap 2>/dev/null)" META_SETUP_S=$SETUP_S \
META_THREADS=$THREADS META_PER_CLASS=$PER_CLASS META_LITERT=$LITERT_STATUS META_INVOCATION=$INVOCATION \
META_HOST_KERNEL="$(uname -r)" META_PYVER=$PYVER META_GLIBC_MINOR=$GLIBC_MINOR META_DATA=$DATA/test \
META_HOST_BINFMT="$( [[ -e /proc/sys/fs/binfmt_misc/status ]] && echo "mounted ($(ls /proc/sys/fs/binfmt_misc | tr '\n' ' '))" || echo 'not mounted (empty /proc/sys/fs/binfmt_misc)')" \
META_DATE="$(date -u '+%Y-%m-%d %H:%M UTC')" META_COMMIT="$(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo '?')" \
META_DIRTY="$(git -C "$REPO" status --porcelain -- pneunet edge 2>/dev/null | grep -v arm64_check.sh | awk '{print $2}' | tr '\n' ' ' || true)" \
META_SETUP_TIMES="$(cat "$CACHE/setup_times.tsv" 2>/dev/null || true)" \
"$X86_PY" - "$OUT" "$REPORT" <<'EOF'
import csv, json, os, sys
from pathlib import Path
import numpy as np
from PIL import Image

out, report = Path(sys.argv[1]), Path(sys.argv[2])
meta = {k[5:].lower(): v for k, v in os.environ.items() if k.startswith("META_")}
arm, x86 = (json.loads((out / f"{a}_facts.json").read_text()) for a in ("arm64", "x86"))
runs = [dict(zip(["model", "arch", "rc", "secs", "cmd"], l.split("\t"))) for l in (out / "runs.tsv").read_text().splitlines()]
images = (out / "images.txt").read_text().split()
shas = dict(reversed(l.split()) for l in (out / "sha256.txt").read_text().splitlines())


def rows(arch, stem):
    p = out / f"{arch}_{stem}.csv"
    return {r["path"]: r for r in csv.DictReader(p.open())} if p.is_file() else {}


def precise(arch, stem, kernels=""):
    p = out / f"{arch}_{stem}{'.' + kernels if kernels else ''}.npz"
    if not p.is_file():
        return None
    z = np.load(p)
    return {str(path): (float(z["logit"][i]), float(z["probability"][i]), z["heatmap"][i]) for i, path in enumerate(z["paths"])}


def runtime_name(arch, stem, kernels=""):
    p = out / f"{arch}_{stem}{'.' + kernels if kernels else ''}.npz"
    return str(np.load(p)["runtime"]) if p.is_file() and "runtime" in np.load(p).files else "?"


def compare(a, b):
    """max abs difference of logit, probability and heatmap between two precise() results."""
    common = [i for i in images if a and b and i in a and i in b]
    if not common:
        return None
    return (max(abs(a[i][0] - b[i][0]) for i in common), max(abs(a[i][1] - b[i][1]) for i in common),
            max(float(np.abs(a[i][2] - b[i][2]).max()) for i in common))


def pkgs(f):
    return ", ".join(f"{k} {v}" for k, v in f["packages"].items() if v)


def g(v):
    return "n/a" if v is None else f"{v:.2g}" if v else "0"


L = []
w = L.append
w("# The edge runner on arm64 (aarch64 Debian under qemu-user) vs x86")
w("")
w(f"Written by `edge/arm64_check.sh` on {meta['date']} (commit `{meta['commit']}`"
  + (f"; uncommitted changes in the working tree at the time, copied as they were: {meta['dirty'].strip()}" if meta["dirty"].strip() else "")
  + "); rerun it to refresh this page. It is the closest thing to a Raspberry Pi that this x86 machine has: the same Python "
  "code, the same aarch64 wheels from PyPI that a Pi 4/5 on Raspberry Pi OS 64-bit (Bookworm, Python 3.11) installs, and "
  "aarch64 machine code, translated by qemu-user instead of run by a Cortex-A CPU. It shows that the runner installs and "
  "runs on arm64 and gives the same answers as on x86; it says nothing about speed on a Pi (see \"Summary and timing\").")
w("")
w("## What ran")
w("")
w(f"- Invocation: `sudo {meta['invocation'].strip()}` ({meta['per_class']} images per class, `--threads {meta['threads']}`, "
  f"`--cpu {meta['cpu']}`, mode `{meta['mode']}`); options and environment variables are listed at the top of the script.")
w(f"- arm64 userland: Debian {meta['suite']} {arm.get('debian_version', '?')} arm64 ({arm['os_release'].get('PRETTY_NAME', '?')}), "
  f"`container=lxc debootstrap --arch=arm64 --foreign --variant=minbase --include=python3,python3-venv {meta['suite']} ROOTFS "
  f"{meta['mirror']}` ({meta['debootstrap']}), cached in `{meta['cache']}/rootfs`")
if meta["mode"] == "chroot":
    w("- How arm64 code runs: the host's binfmt_misc is " + meta["host_binfmt"] + ", and registering a handler there would "
      "change the kernel for everyone, so the script makes a private user + mount + pid namespace "
      "(`unshare --user --mount --pid --fork`, uids/gids 0-65535 mapped onto themselves), mounts a namespace-own "
      "binfmt_misc instance in it (Linux >= 6.7), registers `qemu-aarch64-static` there with flags `FOC`, mounts "
      "/proc, /dev and /sys into the rootfs and `chroot`s. Every aarch64 binary then runs under qemu: "
      "`debootstrap --second-stage` configured the rootfs with the arm64 dpkg, and the arm64 `python3 -m venv "
      "/opt/venv` + `pip install --no-index --find-links /opt/wheels -r requirements.txt` chose the wheels by their aarch64 tags. "
      "(`container=lxc` stops debootstrap from taking this machine for docker, which would make ROOTFS/proc a symlink, and "
      "from probing mknod, which a user namespace may not do.)")
else:
    w("- How arm64 code runs: the host's binfmt_misc is " + meta["host_binfmt"] + "; a private binfmt_misc was not used, "
      "so python runs as `qemu-aarch64-static -cpu CPU -L ROOTFS ROOTFS/usr/bin/python3` on the first-stage rootfs whose "
      ".debs were unpacked but not configured, with the aarch64 wheels installed by the x86 pip (`--target`, "
      "`--platform manylinux_*_aarch64`).")
w(f"- qemu: {meta['qemu']} (Debian `qemu-user-static`); host kernel {meta['host_kernel']} x86_64. Emulated CPU "
  f"`QEMU_CPU={meta['cpu']}` (cortex-a72 is the Raspberry Pi 4's core, cortex-a76 the Pi 5's); AT_HWCAP seen inside: "
  f"`{arm.get('hwcap', '?')}` (qemu's Cortex-A72 model includes the optional crypto extension (aes, pmull, sha1/2), "
  "which a Pi 4's BCM2711 lacks; inference does not use it).")
w("- /proc/cpuinfo: qemu 7.2 hands the guest the host's x86 /proc/cpuinfo, and `import onnxruntime` then dies with "
  "SIGSEGV in its cpuinfo library, which parses that file as an ARM one. The script "
  + ("bind-mounts an ARM /proc/cpuinfo" if meta["mode"] == "chroot" else "puts an ARM cpuinfo at ROOTFS/proc/cpuinfo, which `-L` serves as /proc/cpuinfo,")
  + f" for the emulated core (CPU part {arm.get('cpuinfo_model', '?')}) into the rootfs. That crash comes from the emulator; "
  "a Pi's kernel reports its real ARM cores.")
w(f"- Inside: `uname -m` = **{arm['uname_m']}**, `platform.machine()` = {arm['platform_machine']}, Python {arm['python']} "
  f"({arm['executable']}, {arm['libc']}), kernel release seen inside {arm['uname_r']} (the x86 host's: qemu-user emulates "
  "the CPU, not the kernel)")
w(f"- arm64 packages: {pkgs(arm)}; onnxruntime providers {arm.get('onnxruntime_providers')}")
w(f"- x86 (`.venv`): `uname -m` = {x86['uname_m']}, Python {x86['python']}; {pkgs(x86)}")
w(f"- Wheels: `pip download --only-binary=:all: --platform manylinux2014_aarch64 --platform manylinux_2_17_aarch64 … "
  f"--platform manylinux_2_{meta['glibc_minor']}_aarch64 --python-version {meta['pyver']} --implementation cp -r "
  f"edge/requirements.txt` from {meta['index_url']} (pip config files and local wheel folders ignored). "
  f"ai-edge-litert for aarch64: {meta['litert']}.")
w(f"- Images: the first {meta['per_class']} of each class (sorted by name) of the Kermany test split `{meta['data']}`, copied "
  "with the code (pneunet/*.py, edge/*.py) and the models into `ROOTFS/opt/pneunet`; the x86 run uses that same copy, "
  "so both sides read identical bytes. The input gate (`pneunet.gate.safetensors`) was on.")
w("")
for name, sha in sorted(shas.items()):
    w(f"  - `{name}` sha256 `{sha[:16]}…`")
w("")
w("Per model, the same command on both sides, from `/opt/pneunet` (arm64: inside the chroot, `/opt/venv/bin` first on "
  "PATH; x86: from `ROOTFS/opt/pneunet` with `.venv/bin/python`; `arm64_`/`x86_` in the output names):")
w("")
w("```")
for r in runs:
    if r["arch"] == "arm64":
        w(r["cmd"] if r["rc"] != "skipped" else f"# {r['model']}: skipped on arm64 ({r['cmd']})")
w("```")
w("")
w("The probabilities in the tables are `edge.run`'s CSV output (4 decimals). Because 4 decimals hide small differences, the "
  "script also runs the same batch through the inference core's `Predictor` (what `edge.run` runs) on both sides (`precise.py` in the copy) and "
  "compares the float64 probabilities and logits and the float heatmaps (0..1) at full precision; the last column "
  "compares the heatmap overlay PNGs written by `--cam` (0..255 per channel).")
w("")

summary = []
for model in dict.fromkeys(r["model"] for r in runs):
    stem = model.replace(".", "_")
    ra = {r["arch"]: r for r in runs if r["model"] == model}
    w(f"## `{model}`")
    w("")
    if ra["arm64"]["rc"] == "skipped":
        w(f"Not run on arm64: {ra['arm64']['cmd']}. x86 exit code {ra['x86']['rc']}.")
        w("")
        summary.append((model, "skipped", "", "", "", "", ra["arm64"]["secs"], ra["x86"]["secs"]))
        continue
    a, x = rows("arm64", stem), rows("x86", stem)
    pa_full, px_full = precise("arm64", stem), precise("x86", stem)
    w(f"Exit code arm64 {ra['arm64']['rc']}, x86 {ra['x86']['rc']}. Runtime as the runner reports it: arm64 "
      f"`{runtime_name('arm64', stem)}`, x86 `{runtime_name('x86', stem)}`.")
    for arch in ("arm64", "x86"):
        lines = [l for l in (out / f"{arch}_{stem}.log").read_text().splitlines() if l.strip()]
        if lines:
            w(f"{arch} stderr: `{' | '.join(lines)[:500]}`")
    w("")
    w("| image | x86 label | x86 p | arm64 label | arm64 p | labels agree | abs diff p (full precision) | abs diff logit | heatmap max abs diff | overlay PNG max abs diff |")
    w("|---|---|---|---|---|---|---|---|---|---|")
    csv_diffs, dps, dls, dhs, cams, agree, n = [], [], [], [], [], 0, 0
    for img in images:
        ar, xr = a.get(img, {}), x.get(img, {})
        pa, px = ar.get("pneumonia_probability") or "", xr.get("pneumonia_probability") or ""
        if pa and px:
            csv_diffs.append(abs(float(pa) - float(px)))
        same = bool(pa and px and ar["label"] == xr["label"])
        agree += same; n += 1
        dp = dl = dh = None
        if pa_full and px_full and img in pa_full and img in px_full:
            (la, qa, ha), (lx, qx, hx) = pa_full[img], px_full[img]
            dp, dl, dh = abs(qa - qx), abs(la - lx), float(np.abs(ha - hx).max())
            dps.append(dp); dls.append(dl); dhs.append(dh)
        camd = None
        ca = out / f"arm64_{stem}_cam" / (Path(img).stem + "_cam.png")
        cx = out / f"x86_{stem}_cam" / (Path(img).stem + "_cam.png")
        if ca.is_file() and cx.is_file():
            va, vx = (np.asarray(Image.open(p).convert("RGB"), dtype=np.int16) for p in (ca, cx))
            if va.shape == vx.shape:
                camd = int(np.abs(va - vx).max()); cams.append(camd)
        err = (ar.get("error") or xr.get("error") or "")[:60]
        w(f"| {img} | {xr.get('label') or '-'} | {px or '-'} | {ar.get('label') or '-'} | {pa or '-'} | "
          f"{'yes' if same else '**NO**'}{(' (' + err + ')') if err else ''} | {g(dp)} | {g(dl)} | {g(dh)} | "
          f"{'' if camd is None else camd} |")
    w("")
    mx = lambda v: max(v) if v else None
    w(f"Labels agree on **{agree}/{n}**; max abs probability difference **{g(mx(dps))}** at full precision "
      f"({mx(csv_diffs) if csv_diffs else float('nan'):.4f} in the 4-decimal CSV); max abs logit difference {g(mx(dls))}; "
      f"heatmaps: max abs difference {g(mx(dhs))}, overlay PNGs {mx(cams) if cams else 'n/a'}/255.")
    w("")
    variants = {(arch, k): precise(arch, stem, k) for arch in ("arm64", "x86") for k in ("fused", "reference")}
    if any(variants.values()):
        ref_fp32 = {arch: precise(arch, "model_fp32_onnx") for arch in ("arm64", "x86")}
        w("int8 arithmetic: `edge.run --int8-kernels auto` (the default, above) picks onnxruntime's fused integer kernels or "
          "Q/DQ-unfused float arithmetic (`reference`) per CPU. The same batch with each choice forced, full precision:")
        w("")
        w("| compared | runtimes | max abs diff logit | max abs diff p | max heatmap diff |")
        w("|---|---|---|---|---|")
        pairs = [(("arm64", "reference"), ("x86", "reference")), (("arm64", "fused"), ("x86", "fused")),
                 (("arm64", "fused"), ("arm64", "reference")), (("x86", "fused"), ("x86", "reference"))]
        for (a1, k1), (a2, k2) in pairs:
            c = compare(variants[(a1, k1)], variants[(a2, k2)])
            if c:
                w(f"| {a1} {k1} vs {a2} {k2} | `{runtime_name(a1, stem, k1)}` / `{runtime_name(a2, stem, k2)}` | "
                  f"{g(c[0])} | {g(c[1])} | {g(c[2])} |")
        for arch in ("arm64", "x86"):
            for k in ("fused", "reference"):
                c = compare(variants[(arch, k)], ref_fp32[arch])
                if c:
                    w(f"| {arch} {k} vs {arch} fp32 ONNX | | {g(c[0])} | {g(c[1])} | {g(c[2])} |")
        w("")
    summary.append((model, f"{agree}/{n}", g(mx(dps)), g(mx(dls)), g(mx(dhs)), mx(cams) if cams else "n/a",
                    ra["arm64"]["secs"], ra["x86"]["secs"]))

# How far each model is from the fp32 ONNX export run on the same side (a reference that both sides agree on).
ref = {arch: precise(arch, "model_fp32_onnx") for arch in ("arm64", "x86")}
others = [m for m in dict.fromkeys(r["model"] for r in runs) if m != "model_fp32.onnx"]
if ref["arm64"] and ref["x86"] and others:
    w("## Distance to the fp32 ONNX export on the same machine")
    w("")
    w("Mean and max abs logit difference of each model from `model_fp32.onnx` run on the same side: which side the "
      "quantised models stray further on (8 images only, so indicative).")
    w("")
    w("| model | x86 mean / max | arm64 mean / max |")
    w("|---|---|---|")
    for model in others:
        cells = []
        for arch in ("x86", "arm64"):
            pr = precise(arch, model.replace(".", "_"))
            d = [abs(pr[i][0] - ref[arch][i][0]) for i in images if pr and i in pr and i in ref[arch]]
            cells.append(f"{np.mean(d):.3f} / {max(d):.3f}" if d else "n/a")
        w(f"| {model} | {cells[0]} | {cells[1]} |")
    w("")

w("## Summary and timing")
w("")
w("| model | labels agree | max abs diff p | max abs diff logit | max heatmap diff | max overlay PNG diff | arm64 wall s (emulated) | x86 wall s |")
w("|---|---|---|---|---|---|---|---|")
for s in summary:
    w("| " + " | ".join(str(v) for v in s) + " |")
w("")
w(f"Wall times are for the whole `edge.run` command (interpreter start, imports, model load with its sha256 check, "
  f"{2 * int(meta['per_class'])} images in one batch, input gate, CSV and heatmap PNGs) on a shared 2-core x86 VM at nice 10 "
  f"with one inference thread. **The arm64 times are qemu-user emulation times, not Raspberry Pi times**: qemu translates every "
  "aarch64 instruction (NEON included) into x86 code, which costs a different, unknown factor per kernel, so neither the "
  "absolute arm64 times nor the ratios between models (for example ONNX int8 vs TFLite int8) say anything about a Pi 4/5. "
  "Measure on a Pi (`python -m export.benchmark`) for real numbers.")
w("")
setup = [l.split("\t") for l in meta.get("setup_times", "").splitlines() if l.strip()]
if setup:
    w("One-time setup, as recorded in the cache (reruns reuse it):")
    w("")
    w("| step | wall s | when |")
    w("|---|---|---|")
    for step, secs, when in setup:
        w(f"| {step} | {secs} | {when} |")
    w(f"| **total** | {sum(float(s) for _, s, _ in setup):.0f} | |")
    w("")
w(f"This invocation spent {meta['setup_s']} s on setup (checks of the cached steps).")
w("")
int8_runs = [r for r in runs if r["arch"] == "arm64" and r["model"] == "model_int8.onnx" and r["rc"] == "0"]
est_hours = f"{float(int8_runs[0]['secs']) / len(images) * 1276 / 3600:.1f}" if int8_runs and images else "?"
int8_note = ""
if (out / "x86_model_int8_onnx.npz").is_file() and (out / "arm64_model_int8_onnx.npz").is_file():
    ra_, rx_ = runtime_name("arm64", "model_int8_onnx"), runtime_name("x86", "model_int8_onnx")
    rr = compare(precise("arm64", "model_int8_onnx", "reference"), precise("x86", "model_int8_onnx", "reference"))
    ff = compare(precise("arm64", "model_int8_onnx", "fused"), precise("x86", "model_int8_onnx", "fused"))
    int8_note = (f"For the int8 ONNX model the runner itself chose different arithmetic: `{rx_}` on this x86 host and "
                 f"`{ra_}` on arm64. pneunet/backends.py (`int8_kernels_saturate`) avoids onnxruntime's fused int8 kernels on "
                 "x86 CPUs without VNNI, whose 16-bit pair sums saturate, and uses them on ARM, which accumulates in int32; "
                 "fused integer accumulation with requantisation and float arithmetic on the same int8 values round "
                 "differently. ") if ra_ != rx_ else ""
    aa = compare(precise("arm64", "model_int8_onnx"), precise("x86", "model_int8_onnx"))
    if rr and aa:
        int8_note += (f"Forced to the same arithmetic, arm64 and x86 differ by {g(rr[0])} in the logit with `reference` "
                      + (f"and by {g(ff[0])} with `fused` (on x86 the saturating path)" if ff else "")
                      + f", against {g(aa[0])} with the default choice: "
                      + ("the default's difference comes mostly from the choice of arithmetic, not from the platform. "
                         if rr[0] < aa[0] / 3 else "the platform contributes as much as the choice of arithmetic. "))
    int8_note += ("So the int8 model's parity numbers (docs/export_parity.md, measured on x86) carry over to a Pi only "
                  "approximately; running the parity set on arm64 would measure them there (at this run's emulated pace "
                  f"at most about {est_hours} h for the 1,276 images).")
w("## Why the two sides differ")
w("")
w("qemu emulates aarch64 floating point in software to the architecture's rules, so the emulator is not expected to add "
  "differences of its own: a Pi running the same wheels should give the arm64 column. The differences come from the "
  "aarch64 and x86_64 builds of onnxruntime and LiteRT running different kernels. For float models that is summation "
  f"order (NEON here vs the x86 host's {x86.get('simd_flags', '?').replace(' ', ', ')}): differences around 1e-6 in the logit. "
  + int8_note + " Measured in this run, max abs logit difference arm64 vs x86: "
  + "; ".join(f"`{m}` {dl}" for m, _, _, dl, *_ in summary if dl) + ".")
report.parent.mkdir(parents=True, exist_ok=True)
report.write_text("\n".join(L) + "\n")
print(f"wrote {report}")
EOF
log "done: $REPORT (setup ${SETUP_S} s); run files in $OUT"
