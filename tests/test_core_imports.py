"""The core (model, MoE, upcycling, FLOPs, HF import) stays plain PyTorch: no Hydra, no Lightning."""

import subprocess
import sys


def test_core_imports_neither_hydra_nor_lightning():
    code = (
        "import sys, harness.model, harness.moe, harness.upcycle, harness.flops, harness.hf; "
        "frameworks = ('hydra', 'omegaconf', 'lightning', 'pytorch_lightning'); "
        "bad = [m for m in sys.modules if m.split('.')[0] in frameworks]; "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
