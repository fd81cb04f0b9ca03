"""The benchmarks behind ``amp-compiler bench``: fp32, torch.autocast and amp_compiler side by
side on the reference models, the real-model suite and ONNX Runtime files, and the README's
tables made from their JSON. ``README.md`` here lists the files; ``command.main`` is the entry.
"""
