"""fp32 ONNX files made mixed precision by ``convert_onnx`` and by the other converters, on ONNX
Runtime's CPU provider: Cast nodes, error against torch fp32, file size, and whether a 4096-wide
sum of values ~100 is computed in fp16, whose range ends at 65504 (ONNX Runtime's CPU provider
computes many fp16 ops in fp32, so the sum reads finite there; on a GPU it is inf).

The files are the dynamo exports (opset 18, random weights) users have of: Hugging Face GPT-2,
BERT (with an attention mask) and Llama, 4 layers of width 256 and a vocabulary of 8192, at
4 x 256 tokens; a BatchNorm-ReLU-Conv CNN; and the big sum. Converters: ``convert_onnx``
(default, ``embedding_tables="low"``, ``islands="measure"`` at 10%, and the min-cast recipe ``force_low=("add",
"layer_norm")``), onnxconverter-common's
``convert_float_to_float16(keep_io_types=True)`` and NVIDIA ModelOpt AutoCast's
``convert_to_mixed_precision(keep_io_types=True)``, without data and with a calibration batch;
the last two only where installed (the ``dev`` extra: ``pip install -e ".[dev]"``). A converter that fails on a model is recorded with its error.

    $ python bench/onnx_converters_cpu.py --json bench/results/onnx-converters-cpu.json
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import warnings

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

from amp_compiler.bench.common import write_json


WIDTH, LAYERS, VOCAB, BATCH, TOKENS = 256, 4, 8192, 4, 256


class BnReluConv(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                                 nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
                                 nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10))

    def forward(self, x):
        return self.net(x)


class BigSum(nn.Module):
    """A 4096-wide sum of values ~100 (weighted by ones): 409600 overflows float16."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(4096))

    def forward(self, x):
        return (x * self.weight).sum(-1, keepdim=True)


def models() -> dict[str, tuple[nn.Module, dict[str, torch.Tensor]]]:
    import transformers as T

    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, VOCAB, (BATCH, TOKENS), generator=g)
    mask = torch.ones(BATCH, TOKENS, dtype=torch.long)
    mask[1, TOKENS // 2:] = 0
    text = dict(vocab_size=VOCAB, hidden_size=WIDTH, num_hidden_layers=LAYERS, num_attention_heads=4,
                intermediate_size=4 * WIDTH, max_position_embeddings=TOKENS)
    return {
        "gpt2": (T.GPT2LMHeadModel(T.GPT2Config(vocab_size=VOCAB, n_embd=WIDTH, n_layer=LAYERS, n_head=4,
                                                n_positions=TOKENS, use_cache=False)), {"input_ids": ids}),
        "bert": (T.BertModel(T.BertConfig(**text), add_pooling_layer=False),
                 {"input_ids": ids, "attention_mask": mask}),
        "llama": (T.LlamaForCausalLM(T.LlamaConfig(**{**text, "intermediate_size": 688},
                                                   num_key_value_heads=4, use_cache=False)),
                  {"input_ids": ids}),
        "cnn": (BnReluConv(), {"x": torch.randn(8, 3, 32, 32, generator=g)}),
        "big_sum": (BigSum(), {"x": 99.0 + 2.0 * torch.rand(16, 4096, generator=g)}),
    }


def export(model: nn.Module, inputs: dict, path: str) -> list[str]:
    model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(model, (), kwargs=inputs, dynamo=True, opset_version=18)
    program.save(path)
    return [i.name for i in onnx.load(path, load_external_data=False).graph.input]


def converters(fp32_path: str, feed: dict[str, np.ndarray], workdir: str):
    """name -> () -> ModelProto."""
    from amp_compiler.onnx.convert import convert_onnx

    out = {"convert_onnx": lambda: convert_onnx(fp32_path),
           "convert_onnx low tables": lambda: convert_onnx(fp32_path, embedding_tables="low"),
           "convert_onnx islands 10%": lambda: convert_onnx(fp32_path, islands="measure",
                                                             island_tolerance=0.1),
           "convert_onnx min-cast": lambda: convert_onnx(fp32_path, force_low=("add", "layer_norm"))}
    try:
        from onnxconverter_common import float16

        out["onnxconverter-common"] = lambda: float16.convert_float_to_float16(
            onnx.load(fp32_path), keep_io_types=True)
    except ImportError:
        pass
    try:
        from modelopt.onnx.autocast import convert_to_mixed_precision

        data = os.path.join(workdir, "calibration.npz")
        np.savez(data, **feed)
        out["ModelOpt AutoCast"] = lambda: convert_to_mixed_precision(
            fp32_path, low_precision_type="fp16", keep_io_types=True)
        out["ModelOpt AutoCast + data"] = lambda: convert_to_mixed_precision(
            fp32_path, low_precision_type="fp16", keep_io_types=True, calibration_data=data)
    except ImportError:
        pass
    return out


def sum_dtype(model: onnx.ModelProto) -> str | None:
    """The element type a ReduceSum of the file computes in (None: no ReduceSum). ONNX Runtime's
    CPU provider runs many float16 ops in float32 (it inserts its own casts), so a float16 sum
    can read finite there and still overflow on a device with float16 kernels."""
    inferred = onnx.shape_inference.infer_shapes(model)
    types = {v.name: v.type.tensor_type.elem_type for v in
             list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output)}
    for node in inferred.graph.node:
        if node.op_type == "ReduceSum" and node.output[0] in types:
            return onnx.helper.tensor_dtype_to_np_dtype(types[node.output[0]]).name
    return None


def run(model: onnx.ModelProto, feed: dict) -> np.ndarray:
    from amp_compiler.onnx.check import probe_onnx

    blob = model.SerializeToString()
    died = [r for r in probe_onnx(blob, providers=["CPUExecutionProvider"]) if r.died]
    if died:  # opened in a child process first: a file that crashes ONNX Runtime is recorded
        raise RuntimeError(f"ONNX Runtime {died[0].status} opening the file: {died[0]}")
    session = ort.InferenceSession(blob, providers=["CPUExecutionProvider"])
    names = {i.name for i in session.get_inputs()}
    return session.run(None, {k: v for k, v in feed.items() if k in names})[0]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="gpt2,bert,llama,cnn,big_sum")
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    results: dict[str, dict] = {}
    all_models = models()
    with tempfile.TemporaryDirectory() as workdir:
        for name in a.models.split(","):
            model, inputs = all_models[name]
            path = os.path.join(workdir, f"{name}.onnx")
            export(model, inputs, path)
            feed = {k: v.numpy() for k, v in inputs.items()}
            with torch.no_grad():
                out = model.eval()(**inputs)
            ref = (out.logits if hasattr(out, "logits") else out.last_hidden_state
                   if hasattr(out, "last_hidden_state") else out).float().numpy()
            results[name] = {}
            for conv, make in converters(path, feed, workdir).items():
                try:
                    converted = make()
                    got = run(converted, feed).astype(np.float32)
                    row = {"casts": sum(n.op_type == "Cast" for n in converted.graph.node),
                           "mb": round(converted.ByteSize() / 1e6, 2),
                           "finite": bool(np.isfinite(got).all()),
                           "error": float(np.abs(got - ref).max() / np.abs(ref).max()),
                           "sum_dtype": sum_dtype(converted)}
                except Exception as e:  # noqa: BLE001 -- a converter failing is data
                    row = {"failed": f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"}
                results[name][conv] = row
                print(name, conv, row, flush=True)
    names = list(dict.fromkeys(c for r in results.values() for c in r))
    print("\n| converter | " + " | ".join(f"{m}: casts / rel. error / MB" for m in results) + " |")
    print("|---|" + "---|" * len(results))
    for conv in names:
        cells = []
        for m in results:
            r = results[m].get(conv)
            if r is None:
                cells.append("-")
            elif "failed" in r:
                cells.append(r["failed"].split(":")[0])
            else:
                err = f"{r['error']:.1e}" if r["finite"] else "inf"
                if m == "big_sum":
                    err += " (sum in fp16: inf where fp16 kernels run)" if r.get("sum_dtype") == "float16" else " (sum in fp32)"
                cells.append(f"{r['casts']} / {err} / {r['mb']}")
        print(f"| {conv} | " + " | ".join(cells) + " |")
    if a.json:
        write_json({"argv": sys.argv, "torch": torch.__version__, "onnxruntime": ort.__version__,
                    "results": results}, a.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
