#!/usr/bin/env bash
# The GPU measurements of issue 5, one step per device call (each well under the 10-minute
# limit of a call; all steps together fit the 30 minutes of device time of a session).
#
# Here, once:   bash ../shared/gpu/fetch-wheels.sh kneed hypothesis sortedcontainers attrs
#               (writes .gpu/1 .. .gpu/4; the extra names are imported by pinsearch and the
#               test modules and are not on the GPU machine)
# Device calls, back to back within 30 s (run tool, carry=[".gpu/N"]):
#               source .gpu/*/device-setup.sh                       (for .gpu/1 .. .gpu/3)
#               source .gpu/*/device-setup.sh && bash eval/h100.sh tests    (with .gpu/4)
# then, while the machine is warm, one call per step:
#               source .gpu/*/device-setup.sh && bash eval/h100.sh exact
#               ... index | embed | query | (embed-all, optional) | study | study-wait ...
#               (nothing else after study: its scikit-learn side is timed in the background)
# Every step writes JSON/text files under $OUT, which come back to this machine.
# Device time (30 min a session) is what limits this, so the steps are in the order of what
# the issue asks and are sized to take about 1 (tests, exact, query) and 3-5 (index, embed)
# minutes. study starts the paper's grid in the background (scikit-learn's side takes longer
# than a call) and waits up to 9 minutes; each study-wait waits 9 more and brings back how far
# it got: call it until the machine's time runs out or the run is done.
set -uo pipefail
step=${1:?"step: tests | exact | index | embed | query | study | study-wait | embed-all"}
out=${OUT:-/tmp/pinsearch-h100}
mkdir -p "$out"
export PINSEARCH_OFFLINE=1
run() {  # run NAME CMD...: keep the output, say how long it took
  local name=$1; shift
  local start=$SECONDS
  "$@" > "$out/$name" 2> "$out/$name.err"
  echo "$name: exit $? in $((SECONDS - start)) s"
}
case $step in
  tests)
    nvidia-smi > "$out/nvidia-smi.txt" 2>&1
    python3 -c "import faiss, torch, torchvision as tv; o = faiss.GpuClonerOptions();
print('faiss', faiss.__version__, 'gpus', faiss.get_num_gpus(), 'cuvs', getattr(o, 'use_cuvs', None));
print('torch', torch.__version__, 'cuda', torch.version.cuda, 'torchvision', tv.__version__)" \
      > "$out/versions.txt" 2>&1
    cat "$out/versions.txt"
    python3 -m pytest -m gpu -q -p no:cacheprovider -rs > "$out/pytest-gpu.txt" 2>&1
    echo "pytest -m gpu: exit $?"; tail -5 "$out/pytest-gpu.txt"
    ;;
  exact)  # 6,400 queries over 1M x 1024: raw FAISS-GPU vs pinsearch vs 16-bit scans
    run exact-1m-1024.json pinsearch bench exact --dim 1024 --json
    ;;
  index)  # build, memory, QPS and recall@10 at 1M, float32 and float16 GPU indexes
    for d in 1024 768; do
      run index-1m-$d.json pinsearch bench index --n 1000000 --dim $d --factory Flat \
        --factory IVF4096,Flat --factory IVF4096,PQ64 --json
      # float16 changes Flat storage only (IVF-Flat ignores it; PQ64 has float16 tables anyway)
      run index-1m-$d-fp16.json pinsearch bench index --n 1000000 --dim $d --factory Flat \
        --fp16 --json
    done
    ;;
  embed)  # end to end from JPEG files vs the bare forward, GPU decoding, batch by memory;
    # the issue's three backbones over one set of files per decoder (a row each)
    three=(-b effnet_lite0 -b clip-vit-b-32 -b convnext_base)
    run embed-device.json pinsearch bench embed "${three[@]}" --n 16384 --batch-size 0 \
      --decode device --random-weights --json
    run embed-pil.json pinsearch bench embed "${three[@]}" --n 4096 --batch-size 256 \
      --decode pil --random-weights --json
    ;;
  embed-all)  # every registered backbone, one table (random weights: speed only)
    run embed-all.json pinsearch bench embed -b all --n 4096 --batch-size 0 --decode device \
      --random-weights --json
    ;;
  query)  # one similar-pin query with metadata over 1M pins (warm), vs raw FAISS
    run query-1m-768.json pinsearch bench query --n 1000000 --dim 768 --json
    ;;
  study|study-wait)  # the paper's grid for one backbone: 25,600 x 1,024 train, 32 classes,
    # 5 folds, every head; pinsearch's grids first, then scikit-learn's (LinearSVC's alone
    # took an hour on 2 cores). The run goes on in its own session (setsid) after this call
    # returns, rewriting its result so far (a grid still running counts as a lower bound) in
    # a file that this call and each study-wait bring back. Stopped rows take scikit-learn's
    # macro-F1 from the finished runs on the same split in eval/results/study-cpu2/.
    dir=/tmp/pinsearch-study; mkdir -p "$dir"
    if [ "$step" = study ] && ! [ -f "$dir/pid" ]; then
      refs=(); for f in "${STUDY_REFS:-eval/results/study-cpu2}"/*.json; do
        [ -s "$f" ] && refs+=(--sklearn-reference "$f"); done  # empty: a run not finished
      setsid pinsearch bench study --n "${STUDY_N:-32000}" --dim "${STUDY_DIM:-1024}" \
        --head knn --head lsvm --head mlp \
        --no-sequential --sklearn-timeout 1800 "${refs[@]}" \
        --progress "$dir/study-25600-1024.json" --json \
        > "$dir/study-final.json" 2> "$dir/study-25600-1024.err" < /dev/null &
      echo $! > "$dir/pid"
    fi
    [ -f "$dir/pid" ] || { echo "no study running: run the study step first" >&2; exit 2; }
    start=$SECONDS
    while kill -0 "$(cat "$dir/pid")" 2> /dev/null && [ $((SECONDS - start)) -lt 540 ]; do
      sleep 5
    done
    kill -0 "$(cat "$dir/pid")" 2> /dev/null && state=running || state=ended
    cp "$dir"/study-* "$out"/ 2> /dev/null
    echo "study: $state after $((SECONDS - start)) s of this call"
    python3 -c "import json, sys; r = json.load(open(sys.argv[1]));
print(r['status'], r['total']); [print(x) for x in r['rows']]" "$dir/study-25600-1024.json"
    ;;
  *)
    echo "unknown step $step" >&2; exit 2
    ;;
esac
ls -la "$out"
