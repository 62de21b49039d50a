"""What a model's content identity costs (``isdelta/program/identity.py``): the hash it uses
against its peers, and the identity of a 1 GB checkpoint folder cold and warm.

1. Hash throughput: one 1 GiB file read in 4 MiB blocks from the page cache through xxh3-128
   (the one used), blake3 (when installed), sha256 and blake2b (hashlib), interleaved rounds,
   medians; a bare read of the same blocks is the floor.
2. The identity of a folder of four 256 MiB "shards" plus a config:
   - ``cold (disk)``: no identity cache and the files dropped from the page cache
     (``posix_fadvise(DONTNEED)``), as after a reboot or for a checkpoint just copied in;
   - ``cold (page cache)``: no identity cache, the bytes in memory (a checkpoint just written);
   - ``warm``: the identity cache holds every file (an unchanged folder): one ``stat`` and one
     small JSON read per file;
   - ``after cp -p``: one shard rewritten with other bytes, its size and mtime kept: that shard
     alone is read again.

    python benchmarks/bench_identity.py            # about a minute; 1.1 GB in a temporary folder

One JSON line per measurement in ``benchmarks/results/identity_cpu.jsonl``; a markdown table on
stdout.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
sys.path.insert(0, str(ROOT))

BLOCK = 1 << 22


def _drop_page_cache(folder: Path) -> bool:
    """Ask the kernel to forget the folder's pages (clean pages only: written files are synced first)."""
    if not hasattr(os, "posix_fadvise"):
        return False
    for f in folder.iterdir():
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    return True


def _hashers() -> dict:
    import xxhash

    out = {"read only": None, "xxh3_128": xxhash.xxh3_128, "sha256": hashlib.sha256, "blake2b": hashlib.blake2b}
    try:
        import blake3

        out["blake3"] = blake3.blake3
    except ImportError:
        pass
    return out


def _hash_file(path: Path, make) -> float:
    buf = bytearray(BLOCK)
    view = memoryview(buf)
    h = make() if make is not None else None
    t0 = time.perf_counter()
    with open(path, "rb") as f:
        while n := f.readinto(buf):
            if h is not None:
                h.update(view[:n])
    return time.perf_counter() - t0


def throughput(path: Path, rounds: int) -> dict[str, float]:
    """Seconds per GiB of each hash (medians of interleaved rounds; the file is in the page cache)."""
    hashers = _hashers()
    _hash_file(path, None)  # into the page cache
    times = {name: [] for name in hashers}
    for _ in range(rounds):
        for name, make in hashers.items():
            times[name].append(_hash_file(path, make))
    gib = path.stat().st_size / (1 << 30)
    return {name: statistics.median(t) / gib for name, t in times.items()}


def folder_identity(folder: Path, cache: Path, rounds: int) -> dict[str, float]:
    """Seconds of ``model_identity`` on the folder: cold from disk, cold from the page cache, warm,
    and after a ``cp -p`` of one shard (medians)."""
    from isdelta.program import ModelConfig
    from isdelta.program.identity import model_identity

    cfg = ModelConfig(path=str(folder))

    def timed() -> float:
        t0 = time.perf_counter()
        model_identity(cfg)
        return time.perf_counter() - t0

    res: dict[str, list[float]] = {"cold (disk)": [], "cold (page cache)": [], "warm": [], "after cp -p": []}
    for _ in range(rounds):
        shutil.rmtree(cache, ignore_errors=True)
        if _drop_page_cache(folder):
            res["cold (disk)"].append(timed())
        shutil.rmtree(cache, ignore_errors=True)
        res["cold (page cache)"].append(timed())
        res["warm"].append(timed())
        shard = folder / "model-00001-of-00004.safetensors"
        st = shard.stat()
        with open(shard, "r+b") as f:  # other bytes, same size
            f.write(os.urandom(16))
        os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns))
        res["after cp -p"].append(timed())
    return {k: statistics.median(v) for k, v in res.items() if v}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--shard-mib", type=int, default=256, help="size of each of the 4 shards")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="isdelta-bench-identity-") as tmp:
        tmp = Path(tmp)
        os.environ["ISDELTA_CACHE_DIR"] = str(tmp / "cache")
        folder = tmp / "ckpt"
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps({"model_type": "llama"}))
        for i in range(1, 5):
            (folder / f"model-0000{i}-of-00004.safetensors").write_bytes(os.urandom(args.shard_mib << 20))
        size = sum(f.stat().st_size for f in folder.iterdir())
        speeds = throughput(folder / "model-00002-of-00004.safetensors", args.rounds)
        ident = folder_identity(folder, tmp / "cache", args.rounds)
    RESULTS.mkdir(parents=True, exist_ok=True)
    run = time.strftime("%Y%m%dT%H%M%S")
    from benchmarks.provenance import device_name

    cpu = device_name("cpu")
    meta = {"run_id": run, "device": "cpu", "cpu": cpu, "folder_bytes": size, "rounds": args.rounds}
    with (RESULTS / "identity_cpu.jsonl").open("a") as f:
        for name, s in speeds.items():
            f.write(json.dumps({**meta, "measure": "hash", "hash": name, "s_per_gib": s}) + "\n")
        for name, s in ident.items():
            f.write(json.dumps({**meta, "measure": "identity", "case": name, "seconds": s}) + "\n")
    floor = speeds["read only"]
    lines = [
        f"cpu ({cpu}), run {run}, medians of {args.rounds}",
        "",
        "| hash | s / GiB | × a bare read |",
        "|---|---|---|",
    ]
    lines += [f"| {n} | {s:.3f} | {s / floor:.2f} |" for n, s in speeds.items()]
    lines += ["", f"| identity of a {size / 1e9:.2f} GB folder (5 files) | seconds |", "|---|---|"]
    lines += [f"| {n} | {s:.4f} |" for n, s in ident.items()]
    print("\n".join(lines))


if __name__ == "__main__":
    main()
