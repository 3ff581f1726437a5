#!/usr/bin/env bash
# The GPU measurements of issue 5, planned for one session's 15 minutes of device time (the
# machine's start, every call, transfer and idle second count; no machine starts on < 4 min).
#
# Here, once:  bash eval/gpu-wheels.sh        (writes .gpu/1 .. .gpu/N, N = 2 today)
# Device calls, back to back (run tool, kind left out: an H100, else an H200; say which):
#   1 .. N-1  carry [".gpu/1"], ...:  source .gpu/*/device-setup.sh
#   N         carry [".gpu/N"]:  source .gpu/*/device-setup.sh && bash eval/h100.sh start [STEP...]
#   then      WAIT=S bash eval/h100.sh wait    (no setup: the runner has its environment)
#   then give_back.
# The machine goes back 30 s after a call returns (status: idle_release_s), and the runner and
# the installed wheels with it: make each call within seconds of the last, nothing between.
# `start` runs the steps one after another in a runner of its own process session (setsid),
# which goes on between calls while the machine is held, then waits like `wait`: up to WAIT
# seconds (default 480) or until the runner ends. Both keep everything written so far in one
# file, $OUT/h100.tgz, packed again every minute while they wait (a call stopped at its limit
# still returns the last one), and print the steps' log and the issue's targets as measured
# so far. Here: `rm -rf eval/results/h100 && mkdir -p eval/results/h100 && tar xzf
# <files_at>/h100.tgz -C eval/results/h100 && python -m pinsearch.eval.targets
# eval/results/h100` (a clean folder: a finished study's progress file is gone from later
# archives). Give the last wait what status's budget_left_s leaves, less about a minute for
# the copy back and give_back. A bare machine starts in 1-2 minutes.
#
# Steps (default: tests exact query jpeg embed embed-share index compile study), cheapest proof
# first; estimated minutes: tests 2, exact 1-2, query 2, jpeg 0.5 (decoding alone: nvJPEG on
# baseline and progressive copies vs PIL on one core), embed 2-3, embed-share 0-3 (each 8,000 img/s
# backbone the embed step left short of it, again with all cores but two as workers, decoding none,
# a quarter and a half of the JPEGs with PIL beside the GPU's decoder: --cpu-share; every embedding
# run has nvidia-smi dmon's engine use beside it, util-embed-*.txt: jpg near 100% within a row's
# end_to_end_window says the JPEG engines bound it), index 3, compile 1-2 (the torch.compile GPU
# test; each stopped at its limit below), study 6 or more: scikit-learn's side of the paper's grid
# outlasts any session, and the speed-up it shows is a floor that grows while it runs (nothing else
# may run beside it). About 10 minutes of a session are the runner's: the first session starts the
# seven steps before compile, of which index (no target) is the one likely cut at the session's end
# (the study would not finish its floor in the minutes left either), and a session that has the
# others runs `start compile study` (adding `index` where it was cut). Optional steps: embed-pil
# (the CPU-decoding baseline), embed-all (every registered backbone).
# STUDY_N, STUDY_DIM, STUDY_REFS and EMBED_N (files) make a try on a small machine small.
set -uo pipefail
self=$(readlink -f "$0")
here=$(dirname "$self")
cmd=${1:?"usage: h100.sh start [STEP...] | wait | one STEP"}; shift
dir=${H100_DIR:-/tmp/pinsearch-h100}  # outlives a call while the machine is held
jpegs=${dir}-jpegs  # the embedding steps' files, not packed
mkdir -p "$dir"
export PINSEARCH_OFFLINE=1 PYTHONUNBUFFERED=1
declare -A limit=([tests]=300 [compile]=270 [exact]=240 [query]=300 [jpeg]=120 [embed]=420
                  [index]=480 [embed-share]=300 [embed-pil]=240 [embed-all]=480 [study]=0)
three=(effnet_lite0 clip-vit-b-32 convnext_base)  # the issue's embedding targets

bench() {  # bench NAME ARGS...: one `pinsearch bench ... --json` into NAME.json / NAME.err
  local name=$1; shift
  pinsearch bench "$@" --json > "$dir/$name.json" 2> "$dir/$name.err"
}

files=${EMBED_N:-16384}  # generated pin JPEGs, written once, shared by the embedding steps
write_jpegs() {
  [ -f "$jpegs/done-$files" ] && return
  rm -rf "$jpegs" && mkdir -p "$jpegs" && python3 -c "import sys; from pathlib import Path
from pinsearch.eval.bench import write_bench_images
write_bench_images(Path(sys.argv[1]), int(sys.argv[2]))" "$jpegs" "$files" \
    && touch "$jpegs/done-$files"
}

with_dmon() {  # with_dmon FILE CMD...: CMD with the GPU's engines sampled every second beside it
  # (nvidia-smi dmon: sm, mem, enc, dec, jpg, ofa in %, stamped HH:MM:SS as the embedding rows'
  # end_to_end_window) into FILE: whether the JPEG engines (jpg) or the SMs saturate. Line
  # buffered, so a sampler stopped at the end keeps its lines; -c ends it by itself as well
  local file=$1 mon= rc=0; shift
  if command -v nvidia-smi > /dev/null; then
    stdbuf -oL nvidia-smi dmon -s u -d 1 -o T -c 600 > "$file" 2>&1 &
    mon=$!
  fi
  "$@" || rc=$?
  if [ -n "$mon" ]; then kill "$mon" 2> /dev/null; wait "$mon" 2> /dev/null; fi
  return $rc
}

embed_each() {  # embed_each TAG ARGS...: one process and one file per backbone (a backbone
  # stopped or failing costs only its own row), over the same files, each with_dmon
  local tag=$1 b rc=0; shift
  write_jpegs || return
  for b in "$@"; do
    with_dmon "$dir/util-embed-$tag-$b.txt" \
      bench "embed-$tag-$b" embed -b "$b" --corpus "$jpegs" "${options[@]}" || rc=$?
  done
  return $rc
}

compile=tests/test_gpu_decode.py::test_compile_runs_and_agrees
timeout_each() {  # a hung test ends alone, not the whole step, with every thread's stack
  # (pytest-timeout, on the image); without it, pytest's own faulthandler prints
  # the stacks of a test running long (and not beside it: a dump between a test's name and
  # its outcome parts them, which targets.py allows for, but a second dump is noise)
  if python3 -c "import pytest_timeout" 2> /dev/null; then
    echo "--timeout $1"
  else
    echo "-o faulthandler_timeout=$(($1 * 3 / 4))"
  fi
}

one() {  # one step, in the foreground
  local options=() rc=0
  case $1 in
    tests)
      # -d UTILIZATION lists the engines (a JPEG line where the GPU has JPEG engines); shm:
      # the decode workers' batches
      { nvidia-smi; nvidia-smi -q -d UTILIZATION; df -h /dev/shm; } > "$dir/nvidia-smi.txt" 2>&1
      python3 -c "import faiss, torch, torchvision as tv; o = faiss.GpuClonerOptions();
print('faiss', faiss.__version__, 'gpus', faiss.get_num_gpus(), 'cuvs', getattr(o, 'use_cuvs', None));
print('torch', torch.__version__, 'cuda', torch.version.cuda, 'torchvision', tv.__version__)
from pinsearch.decode import device_decoder_error as why
print('nvjpeg', why('cuda') or 'ok')" > "$dir/versions.txt" 2>&1
      # torch.compile's test is a step of its own (compile): a cold compile may take a minute
      # or two, which the other GPU tests do not wait for. -v: each test's outcome is in the
      # file as it ends, also when the step is stopped at its limit
      python3 -m pytest -m gpu -v --tb=short -p no:cacheprovider -rs $(timeout_each 120) \
        --deselect "$compile" > "$dir/pytest-gpu.txt" 2>&1 ;;
    compile)
      python3 -m pytest -v --tb=short -p no:cacheprovider -rs $(timeout_each 240) "$compile" \
        > "$dir/pytest-gpu-compile.txt" 2>&1 ;;
    exact)  # 6,400 queries over 1M x 1024: raw FAISS-GPU vs pinsearch vs 16-bit scans; the
      # progress file keeps the rows measured if the step is stopped at its limit
      bench exact-1m-1024 exact --dim 1024 --progress "$dir/exact-progress.json"
      rc=$?
      [ -s "$dir/exact-1m-1024.json" ] && rm -f "$dir/exact-progress.json"
      return $rc ;;
    query)  # one similar-pin query with metadata over 1M pins (warm), vs raw FAISS
      bench query-1m-768 query --n 1000000 --dim 768 ;;
    jpeg)  # decoding alone at pin sizes, baseline vs progressive copies: nvJPEG in batches of
      # 128 (the JPEG engines take baseline files; progressive ones go one by one) vs PIL
      bench jpeg jpeg --n 256 --batch-size 128 ;;
    embed)  # end to end from JPEG files vs the bare forward, GPU decoding; batches of 256:
      # 64 of them, so the steady rate is taken past the workers' first wave (_steady_rate)
      options=(--n "$files" --batch-size 256 --decode device --random-weights)
      embed_each device "${three[@]}" ;;
    embed-share)  # the workers (all cores but two) decode a share of the JPEGs with PIL,
      # for each 8,000 img/s backbone the embed step left short of it
      local share b todo=()
      for b in effnet_lite0 clip-vit-b-32; do
        python3 -c "import json, sys
sys.path.insert(0, sys.argv[2])
from targets import EMBED_MIN_IMAGES_PER_S as least  # the issue's rate, as targets judge it
d = json.load(open(sys.argv[1]))
rate = max(r.get('steady_images_per_s', 0) for r in d.get('rows', [d]))
sys.exit(0 if rate >= least[sys.argv[3]] else 1)" \
          "$dir/embed-device-$b.json" "$here" "$b" 2> /dev/null || todo+=("$b")
      done
      if [ ${#todo[@]} -eq 0 ]; then
        echo "embed: both backbones at 8,000 img/s or more without a share" > "$dir/embed-share.txt"
        return 0
      fi
      local workers=$(($(nproc) > 3 ? $(nproc) - 2 : 1))
      for share in 0 0.25 0.5; do  # 0: the same workers and files without a share
        options=(--n "$files" --batch-size 256 --decode device --random-weights
                 --cpu-share "$share" --workers "$workers")  # 64 batches: 4 waves of 14
        embed_each "share$share" "${todo[@]}" || rc=$?
      done
      return $rc ;;
    embed-pil)
      options=(--n $((files / 2)) --batch-size 256 --decode pil --random-weights)
      embed_each pil "${three[@]}" ;;
    embed-all)
      options=(--n $((files / 2)) --batch-size 256 --decode device --random-weights)
      write_jpegs && with_dmon "$dir/util-embed-all.txt" \
        bench embed-all embed -b all --corpus "$jpegs" "${options[@]}" ;;
    index)  # build, memory, QPS, recall@10 at 1M; Flat once more in float16 (same vectors)
      for d in 1024 768; do
        bench "index-1m-$d" index --n 1000000 --dim "$d" --factory Flat \
          --factory IVF4096,Flat --factory IVF4096,PQ64 --fp16-also Flat || rc=$?
      done
      return $rc ;;
    study)  # the paper's grid for one backbone: 25,600 x 1,024 train, 32 classes, 5 folds,
      # every head; pinsearch's grids first, then scikit-learn's (quickest first), rewriting
      # the result so far in the progress file. Stopped rows take scikit-learn's macro-F1
      # from finished runs on the same split in eval/results/study-cpu2/.
      local refs=() f
      for f in "${STUDY_REFS:-eval/results/study-cpu2}"/*.json; do
        [ -s "$f" ] && refs+=(--sklearn-reference "$f")  # empty: a run not finished
      done
      pinsearch bench study --n "${STUDY_N:-32000}" --dim "${STUDY_DIM:-1024}" --head knn \
        --head lsvm --head mlp --no-sequential --sklearn-timeout 1800 "${refs[@]}" \
        --progress "$dir/study-progress.json" --json \
        > "$dir/study-final.json" 2> "$dir/study.err"
      rc=$?  # finished: the last snapshot is the final result
      [ -s "$dir/study-final.json" ] && rm -f "$dir/study-progress.json"
      return $rc ;;
    *) echo "unknown step $1" >&2; return 2 ;;
  esac
}

log() { echo "$(date +%T) $*" >> "$dir/steps.log"; }

roomy_shm() {  # DataLoader workers hand batches over through /dev/shm; a container's default
  # (64 MiB) leaves the embedding steps no workers (pinsearch.embed.loader_plan): enlarge
  # it where it is small and this machine lets us (docker --shm-size does the same)
  local kb
  kb=$(df -k --output=size /dev/shm 2> /dev/null | tail -n 1 | tr -d ' ') || return 0
  [[ $kb =~ ^[0-9]+$ ]] || return 0
  [ "$kb" -ge $((4 << 20)) ] && return 0
  { echo "/dev/shm: ${kb} KiB; remounting with 16G"
    mount -o remount,size=16G /dev/shm && df -h /dev/shm; } >> "$dir/shm.txt" 2>&1
}

runner() {  # the steps in order, each within its limit; a failing step does not stop the rest
  local s start rc
  echo $$ > "$dir/runner.pid"
  roomy_shm
  for s in "$@"; do
    start=$SECONDS; log "$s: started"
    if [ "${limit[$s]}" -gt 0 ]; then
      timeout -k 10 "${limit[$s]}" bash "$self" one "$s"; rc=$?
    else
      bash "$self" one "$s"; rc=$?
    fi
    # 124: stopped at the limit; 137: killed 10 s later (timeout -k) when it would not stop
    log "$s: exit $rc after $((SECONDS - start)) s$( { [ $rc = 124 ] || [ $rc = 137 ]; } \
      && echo ' (time limit)')"
  done
  log "runner: done"
  touch "$dir/ended-$$"
}

running() {  # a pid alone can outlive its process (a zombie nobody reaps, a pid reused)
  local pid
  pid=$(cat "$dir/runner.pid" 2> /dev/null) || return 1
  kill -0 "$pid" 2> /dev/null && ! [ -f "$dir/ended-$pid" ]
}

pack() {  # everything so far into $OUT/h100.tgz, replaced whole
  tar czf "$out/h100.tgz.part" --warning=no-file-changed --ignore-failed-read -C "$dir" \
    --exclude=runner.pid --exclude='ended-*' --exclude='*.tmp' . 2> /dev/null
  mv -f "$out/h100.tgz.part" "$out/h100.tgz"
}

wait_and_pack() {
  local start=$SECONDS packed=$SECONDS f
  out=${OUT:-/tmp/pinsearch-h100-out}
  mkdir -p "$out" && pack
  while running && [ $((SECONDS - start)) -lt "${WAIT:-480}" ]; do
    sleep 5
    [ $((SECONDS - packed)) -ge 60 ] && { pack; packed=$SECONDS; }
  done
  pack
  echo "== runner $(running && echo 'still running' || echo 'ended') after this call's" \
    "$((SECONDS - start)) s; results: $out/h100.tgz"
  cat "$dir/steps.log" 2> /dev/null
  for f in "$dir"/*.err "$dir"/pytest-gpu*.txt; do
    [ -s "$f" ] && { echo "== $(basename "$f") (end)"; tail -n 3 "$f"; }
  done
  echo "== targets"
  python3 "$here/targets.py" "$dir"  # plain Python: no setup needed in a wait call
}

case $cmd in
  start)
    if running; then echo "a runner is going already: use wait" >&2; exit 2; fi
    [ $# -gt 0 ] || set -- tests exact query jpeg embed embed-share index compile study
    for s in "$@"; do
      [ -n "${limit[$s]+set}" ] || { echo "unknown step $s: ${!limit[*]}" >&2; exit 2; }
    done
    rm -f "$dir/runner.pid"
    setsid bash "$self" runner "$@" > "$dir/runner.log" 2>&1 < /dev/null &
    for _ in $(seq 50); do [ -s "$dir/runner.pid" ] && break; sleep 0.2; done
    [ -s "$dir/runner.pid" ] || { echo "no runner: $(cat "$dir/runner.log")" >&2; exit 1; }
    wait_and_pack ;;
  wait) wait_and_pack ;;
  runner) runner "$@" ;;
  one) one "$1" ;;
  *) echo "unknown command $cmd: start, wait or one" >&2; exit 2 ;;
esac
