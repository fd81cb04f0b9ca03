"""``amp-compiler bench --suite real``: torch.autocast and amp_compiler on the models users bring.

The real-model suite of the design's targets: seven models nobody here wrote, built from their
libraries' default configurations with random weights (nothing is downloaded), with the default
attention implementation and dropout, trained on the library's own loss with labels:

- ``gpt2``: ``GPT2LMHeadModel(GPT2Config())``, 124M (12 x 768); float16, 8 x 1024 tokens.
- ``llama``: ``LlamaForCausalLM``, hidden 1024, 12 layers, 16 heads, intermediate 2816, vocab
  32000: 220M, 66M of it the untied embedding and head; bfloat16, 8 x 1024.
- ``bert``: ``BertForSequenceClassification(BertConfig())``, BERT-base, 109M; float16, 32 x 128.
- ``t5``: ``T5ForConditionalGeneration(T5Config(decoder_start_token_id=0))``, t5-small's values
  (d_model 512, 6 + 6 layers, 8 heads, d_ff 2048, vocab 32128), 61M; bfloat16, 16 x 512 tokens
  in, 128 labels. bfloat16 because T5 overflows float16: its own code clamps infinities only when
  the residual stream is float16, which under autocast it is not, while the feed-forward's
  float16 matmul outputs still overflow; T5 was pretrained in bfloat16 (on TPUs).
- ``vit``: ``ViTForImageClassification(ViTConfig())``, ViT-B/16, 86M; float16, 64 x 224 x 224.
- ``resnet50``: ``torchvision.models.resnet50(weights=None)`` and cross entropy, 26M; float16,
  128 x 224 x 224.
- ``convnext_tiny``: ``torchvision.models.convnext_tiny(weights=None)`` and cross entropy, 29M;
  float16, 128 x 224 x 224 (the design's CNN batch).

Per model and mode (``--modes train,infer``) one JSON file,
``<out>/real-<model>-<mode>-<dtype>[-compile[-<compile mode>]][-tiny].json``, written as soon
as that mode is done (a suite stopped half way keeps what it finished). Inference is timed at
batch 1 (64 tokens, or one image) and at the training batch; training at the training batch.
Everything else is ``amp-compiler bench``'s, shared through ``amp_compiler.bench.common``,
``variants`` and ``measure``: variants built
from copies of one fp32 master and timed interleaved in one process (median and IQR per step),
the steady-state peak memory of each variant's own window, the error ``max|out - ref| /
max|ref|`` of the eval forward's logits against fp32 (TF32 off), casts per forward, ratios to
autocast (compiled variants: to compiled autocast). A training step is
``loss = model(**batch).loss`` (torchvision: ``F.cross_entropy(model(x), labels)`` in a
wrapper), ``backward()``, fused AdamW (CUDA) and for float16 the loss scaler:
``torch.amp.GradScaler`` for autocast, ``amp.scaler`` for amp_compiler (driven by its graph
where the loss_scaling pass scales the loss gradient, like GradScaler otherwise). amp_compiler
is ``amp = convert(copy, example_kwargs=batch, dtype=..., training=...)`` called as
``amp(**batch)``; ``--compile`` adds ``torch.compile(amp)`` and ``torch.compile(model)`` called
under autocast, both with ``dynamic=False``.

A variant that fails anywhere (convert, forward, backward, optimizer step, OOM) is recorded with
its stage and exception text and the suite goes on; a model whose library is missing is
recorded as skipped with the ``pip install`` that enables it.

    $ amp-compiler bench --suite real                          # all seven models, eager
    $ amp-compiler bench --suite real --models gpt2,bert --modes train --compile
    $ amp-compiler bench --suite real --tiny --device cpu --steps 2 --rounds 1   # smoke test
    $ python -m amp_compiler.bench.table bench/results/real-*.json   # the README table

The suite's files: ``real_config`` (the request, the variants' names, the files' names),
``real_models`` (the models and their batches), ``real_variants`` (one variant, failures as
data), ``real_run`` (one model measured) and this one (the suite: every model, its files and
tables).
"""

from __future__ import annotations

import sys
from typing import Any

from amp_compiler.bench.common import print_tables, progress_bar, table_console, tick, write_json
from amp_compiler.bench.real_config import SuiteConfig, _resolve, out_path, variant_specs
from amp_compiler.bench.real_models import SPECS, batch_shapes
from amp_compiler.bench.real_run import run_model
from amp_compiler.bench.real_variants import first_line

__all__ = ["main", "run", "print_results"]


# ----------------------------------------------------------------------------- the suite


def run(suite: SuiteConfig) -> list[tuple[str, dict[str, Any]]]:
    """Run the suite, writing each model's modes as they finish; returns (path, result) of
    every file written."""
    specs = [SPECS[m] for m in suite.models]
    # inference first: its amp eval conversion is also the training mode's error reference
    modes = [m for m in ("infer", "train") if m in suite.modes]
    units = {(s.name, m): len(variant_specs(suite, m))
             * (1 + len(batch_shapes(s, m, suite.tiny, suite.infer_batches)) * suite.rounds)
             for s in specs for m in modes}
    written = []
    done = 0
    with progress_bar() as progress:
        task = progress.add_task("starting", total=sum(units.values()))
        for spec in specs:
            for mode, result in run_model(spec, suite, modes, progress, task):
                path = out_path(suite, spec, mode)
                write_json(result, path)
                written.append((path, result))
                # failed variants skip their windows: keep the bar true to what is left
                done += units[spec.name, mode]
                progress.update(task, completed=done)
                tick(progress, task, f"wrote {path}")
    return written


def print_results(written: list[tuple[str, dict[str, Any]]], console=None) -> None:
    """``amp-compiler bench``'s tables, one per model, mode and batch shape, each followed by
    the failures and missing errors of its variants."""
    if console is None:
        console = table_console()
    for path, r in written:
        if r["status"] != "ok":
            console.print(f"{r['model']} {r['mode']}: {r['status']}: {r['reason']}", markup=False)
        for shape in r["runs"]:
            print_tables({**r, "size": r["config"], "batch": shape["batch"],
                          "variants": shape["variants"], "ratios": shape["ratios"],
                          "loss": None}, console)
            for name, v in shape["variants"].items():
                if v["failure"]:
                    f = v["failure"]
                    console.print(f"  {name}: failed in {f['stage']}: {f['exception']}: "
                                  f"{first_line(f)}", markup=False)
                if v["error_note"]:
                    console.print(f"  {name}: no error vs fp32: {v['error_note'].splitlines()[0]}",
                                  markup=False)
        console.print(f"wrote {path}", markup=False)


def main(argv: list[str] | None = None) -> int:
    """``amp-compiler bench --suite real``: runs the suite, prints its tables, returns 0 (the
    failures of models and variants are in the files). A bad request raises ``BenchError``,
    which ``amp_compiler.bench.command.main`` (the command) turns into exit code 2.

    Example (every model at its tiny configuration, on the CPU)::

        main(["--suite", "real", "--tiny", "--device", "cpu", "--steps", "2", "--rounds", "1",
              "--out", "out/real-tiny"])
    """
    print_results(run(_resolve(list(sys.argv[1:] if argv is None else argv))))
    return 0
