"""``amp-compiler bench``, the command: it picks the suite from the arguments (``--mode onnx``: the
ONNX Runtime files, ``onnx_run``; ``--suite real``: the real-model suite, ``real``; otherwise one
reference-model workload, ``workloads_run``) and owns the exit code: 0, 2 for a bad request
(``BenchError``), 1 when a conversion fails (``AmpCompilerError``).

    $ amp-compiler bench --model gpt --size bench --mode train --dtype float16
    $ python -m amp_compiler.bench.command --model mlp --size tiny --device cpu
"""

from __future__ import annotations

import argparse
import sys

from amp_compiler.bench import onnx_run, real, workloads_run
from amp_compiler.bench.common import BenchError
from amp_compiler.errors import AmpCompilerError

__all__ = ["main"]


def _peek(argv: list[str], option: str) -> str | None:
    """The value of ``option`` in ``argv``, before the parser of the chosen suite reads it all."""
    probe = argparse.ArgumentParser(add_help=False)
    probe.add_argument(option, dest="value")
    return probe.parse_known_args(argv)[0].value


def main(argv: list[str] | None = None) -> int:
    """``amp-compiler bench``: returns 0, 2 for a bad request, 1 when conversion fails.

    Example (prints the table, writes the JSON file, returns 0)::

        main(["--model", "mlp", "--size", "tiny", "--device", "cpu", "--dtype", "bfloat16",
              "--rounds", "1", "--steps", "2", "--out", "bench/results/mlp-tiny.json"])
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if _peek(argv, "--mode") == "onnx":
            return onnx_run.main(argv)
        if _peek(argv, "--suite") == "real":
            return real.main(argv)
        return workloads_run.main(argv)
    except SystemExit as e:  # --help: argparse printed it and asked to exit
        return int(e.code or 0)
    except BenchError as e:
        print(f"amp-compiler bench: error: {e}", file=sys.stderr)
        return 2
    except AmpCompilerError as e:
        print(f"amp-compiler bench: {type(e).__name__}: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
