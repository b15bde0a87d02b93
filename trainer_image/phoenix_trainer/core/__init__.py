"""The torch-free checkpoint core, shared by the trainer runtime and the operator.

``contract`` (env names, termination message), ``errors``, ``storage`` (the Storage protocol,
``open_storage`` and its two backends), ``layout`` (step dirs, manifest, verification),
``handshake`` (fence.json and control.json) and ``writer`` (shards first, manifest last,
retention). Nothing under ``core`` may import torch or any ``phoenix_trainer`` module outside
``core`` (tests/unit/trainer/test_layout.py checks both).
"""
