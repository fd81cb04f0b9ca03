"""Where ONNX Runtime spends a run of each file: per op type, kernel count and time, from ORT's
own profiler (``SessionOptions.enable_profiling``), for files ``bench --mode onnx --files-dir``
kept. Explains latency gaps between converters (extra Cast kernels, fusions a Cast blocks).

    $ python bench/ort_profile.py --files-dir /tmp/files --model gpt2 --batch 1 --runs 20
"""

from __future__ import annotations

import argparse
import collections
import glob
import json
import os
import sys
import tempfile


WARMUP = 5


def profile(path: str, feeds: dict, runs: int, provider: str) -> dict:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.enable_profiling = True
    so.profile_file_prefix = os.path.join(tempfile.mkdtemp(), "ort")
    s = ort.InferenceSession(path, so, providers=[provider, "CPUExecutionProvider"])
    names = {i.name for i in s.get_inputs()}
    feed = {k: v for k, v in feeds.items() if k in names}
    for _ in range(WARMUP + runs):
        s.run(None, feed)
    events = json.load(open(s.end_profiling()))
    # the profile covers every run: count the kernels of the runs after the warm-up ones
    starts = sorted(e["ts"] for e in events if e.get("cat") == "Session" and e["name"] == "model_run")
    after = starts[WARMUP] if len(starts) > WARMUP else 0
    per_op = collections.defaultdict(lambda: [0, 0.0])
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and e["ts"] >= after:
            op = e["args"].get("op_name", "?")
            per_op[op][0] += 1
            per_op[op][1] += e["dur"] / 1e3
    return {op: (n / runs, ms / runs) for op, (n, ms) in per_op.items()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--files-dir", required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--runs", type=int, default=20)
    p.add_argument("--provider", default="CUDAExecutionProvider")
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    from amp_compiler.bench.onnx_files import _batch_of, build_model, code_digest

    _, inputs = build_model(a.model, "bench", a.batch, None)
    feeds = {f"input_{i}": t.numpy() for i, t in enumerate(_batch_of(inputs, a.batch))}
    out = {}
    # the files this code built (an older build of them carries another digest)
    for path in sorted(glob.glob(os.path.join(a.files_dir, f"{a.model}-*-{code_digest()}-*.onnx"))):
        if path.endswith("fp32.onnx"):
            continue
        ops = profile(path, feeds, a.runs, a.provider)
        out[os.path.basename(path)] = ops
        total_n = sum(n for n, _ in ops.values())
        total_ms = sum(ms for _, ms in ops.values())
        top = sorted(ops.items(), key=lambda kv: -kv[1][1])[:8]
        print(f"{os.path.basename(path)}: {total_n:.0f} kernels, {total_ms:.3f} ms of kernel time per run; "
              + ", ".join(f"{op} {n:.0f}x {ms:.3f}ms" for op, (n, ms) in top))
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"argv": sys.argv, "files": out}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
