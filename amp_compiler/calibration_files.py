"""Reading ``--calibration PATH`` into samples for an ONNX conversion: a list of dicts, graph-input
name -> numpy array, one dict per sample.

Three layouts are read: a folder of ``.npz`` files (one sample each, in file-name order), one
``.npz`` whose arrays share a leading sample axis, or a Polygraphy data-loader JSON file (a
list of feed dicts whose arrays are Polygraphy-encoded, as ``polygraphy run --save-inputs``
writes them). Nothing is unpickled. Every unreadable input is a ``ConfigError`` naming the file.

    >>> samples = load_calibration("samples/")
    >>> sorted(samples[0])
    ['attention_mask', 'input_ids']
"""

from __future__ import annotations

import base64
import binascii
import io
import json
from pathlib import Path

import numpy as np

from amp_compiler.errors import ConfigError


def _decode_polygraphy_array(value, where: str):
    """One array of a Polygraphy JSON file: ``{"array": base64 of np.save bytes,
    "polygraphy_class": "ndarray"}`` (``polygraphy.json``; older files latin-1 text, or an
    .npz archive holding one array)."""
    if not isinstance(value, dict) or not isinstance(value.get("array"), str):
        raise ConfigError(f"{where} is not a Polygraphy-encoded array (expected "
                          f"{{\"array\": <base64 .npy>, \"polygraphy_class\": \"ndarray\"}})")
    text = value["array"]
    try:
        data = base64.b64decode(text.encode(), validate=True)
    except (binascii.Error, ValueError):
        data = text.encode("latin-1", errors="replace")  # Polygraphy's older encoding
    try:
        arr = np.load(io.BytesIO(data), allow_pickle=False)
    except Exception as e:  # noqa: BLE001 -- not .npy / .npz bytes
        raise ConfigError(f"{where}: the array data is not a readable .npy payload "
                          f"({type(e).__name__}: {e})") from None
    if not isinstance(arr, np.ndarray):  # an .npz archive: its first array
        arr = arr[arr.files[0]]
    return arr


def load_calibration(path_text: str) -> list[dict]:
    """``--calibration PATH`` as a list of samples (dicts graph-input name -> array): a folder of
    ``.npz`` files (one sample each, in file-name order), one ``.npz`` whose arrays share a
    leading sample axis, or a Polygraphy data-loader JSON file (a list of feed dicts whose
    arrays are Polygraphy-encoded, as ``polygraphy run --save-inputs`` writes them)."""
    path = Path(path_text)
    what = f"--calibration {path_text!r}"

    def read_npz(p: Path) -> dict:
        try:
            with np.load(p, allow_pickle=False) as z:
                return {k: z[k] for k in z.files}
        except Exception as e:  # noqa: BLE001 -- not a zip, pickled objects, truncated
            raise ConfigError(f"{what}: {p} is not a readable .npz file ({type(e).__name__}: "
                              f"{' '.join(str(e).split())[:200]})") from None

    if not path.exists():
        raise ConfigError(f"{what} does not exist; give a folder of .npz files, an .npz file or "
                          f"a Polygraphy .json data file")
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() == ".npz" and p.is_file())
        if not files:
            raise ConfigError(f"{what} is a folder with no .npz files (one sample per file, "
                              f"arrays keyed by graph-input name)")
        samples = [read_npz(p) for p in files]
    elif path.suffix.lower() == ".npz":
        arrays = read_npz(path)
        lengths = {k: (a.shape[0] if a.ndim else None) for k, a in arrays.items()}
        if not arrays or None in lengths.values() or len(set(lengths.values())) != 1:
            raise ConfigError(f"{what}: the arrays of a single .npz need one leading sample axis "
                              f"of the same length; got shapes "
                              f"{ {k: list(a.shape) for k, a in arrays.items()} }")
        n = next(iter(lengths.values()))
        samples = [{k: a[i] for k, a in arrays.items()} for i in range(n)]
    elif path.suffix.lower() == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError) as e:
            raise ConfigError(f"{what} is not readable JSON ({' '.join(str(e).split())[:200]})") from None
        if isinstance(data, dict) and "polygraphy_class" not in data:
            data = [data]  # one feed dict alone
        if not isinstance(data, list) or not all(isinstance(d, dict) for d in data):
            raise ConfigError(f"{what}: a Polygraphy data file is a JSON list of "
                              f"{{input_name: array}} objects")
        samples = [{k: _decode_polygraphy_array(v, f"{what}: sample {i}, input {k!r}")
                    for k, v in d.items()} for i, d in enumerate(data)]
    else:
        raise ConfigError(f"{what}: use a folder of .npz files, an .npz file or a Polygraphy "
                          f".json data file")
    if not samples:
        raise ConfigError(f"{what} holds no samples")
    return samples
