"""The eval stage: downstream tasks (lm-evaluation-harness) for a run's model, its dense parent and its iso-FLOP
dense twin, with the same settings; each model's scores cached by its weights' checksum + the task's config.

    python -m harness.eval RUN_DIR [--tasks pydoc_cloze pydoc_next] [--limit 200]   # a finished run, its record
    python -m harness.eval --model-path HF_DIR --tasks pydoc_cloze [--backend hf]    # any HF checkpoint folder

Local tasks live in conf/eval/tasks/ (lm-eval's YAML format, built by conf/eval/build_tasks.py); standard tasks
(hellaswag, arc_easy, ...) need their datasets in the HF cache: nothing is downloaded (harness/__init__.py).
``results.json`` gains ``downstream: {model: {task: {metric: value, metric_stderr: stderr, n: items}}}``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from harness.errors import ConfigError
from harness.io import atomic_write_json, read_json

log = logging.getLogger("upcycle")
TASK_DIR = Path(__file__).resolve().parent.parent / "conf" / "eval" / "tasks"
CACHE_VERSION = 1


def local_tasks() -> dict[str, Path]:
    """Task name -> YAML file of the offline tasks shipped in conf/eval/tasks/."""
    import yaml

    return {yaml.safe_load(p.read_text())["task"]: p for p in sorted(TASK_DIR.glob("*.yaml"))}


@dataclass
class EvalConfig:
    """The ``eval`` block: which tasks score the run's models after training, and how (lm-eval's own knobs)."""

    tasks: list[str] = field(default_factory=list)  # local (conf/eval/tasks) or standard lm-eval task names
    num_fewshot: int = 0
    limit: int | None = None  # the first N items of each task (null: all)
    batch_size: int = 32  # requests per forward

    def __post_init__(self) -> None:
        if isinstance(self.tasks, str) or not all(isinstance(t, str) for t in self.tasks):
            raise ConfigError(f"eval.tasks={self.tasks!r} must be a list of task names, e.g. eval.tasks=[pydoc_cloze]")
        self.tasks = list(self.tasks)
        for key, low in (("num_fewshot", 0), ("batch_size", 1)):
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise ConfigError(f"eval.{key}={v!r} must be an integer >= {low}")
        if self.limit is not None and (
            isinstance(self.limit, bool) or not isinstance(self.limit, int) or self.limit < 1
        ):
            raise ConfigError(f"eval.limit={self.limit!r} must be an integer >= 1 (or null: every item)")
        local = local_tasks()
        unknown = [t for t in self.tasks if t not in local]
        if unknown:
            bad = [t for t in unknown if not _standard_task(t)]
            if bad:
                raise ConfigError(
                    f"eval.tasks: {bad[0]!r} is not a task: the local tasks are {', '.join(local)} "
                    "(conf/eval/tasks), or name a standard lm-eval task (hellaswag, arc_easy, piqa, lambada_openai ...)"
                )

    def check(self) -> None:
        """Before training: every task loads (a standard task's dataset is in the HF cache), one line if not."""
        if self.tasks:
            task_dict(self.tasks)


def _standard_task(name: str) -> bool:
    """Whether a YAML of lm-eval's own tasks names ``name`` as a task, group or tag (a text search: indexing
    every task with a TaskManager takes ~30 s; a name that only looks like one fails in ``check``)."""
    import re

    import lm_eval.tasks

    pattern = re.compile(rf"^[\s-]*(?:(?:task|group|tag)\s*:\s*)?{re.escape(name)}\s*$", re.M)
    root = Path(lm_eval.tasks.__file__).parent
    return any(pattern.search(p.read_text(errors="replace")) for p in root.rglob("*.yaml"))


def _quiet_lm_eval() -> None:
    """lm-eval's logger at ERROR (what its deprecated ``verbosity="ERROR"`` arguments did)."""
    from lm_eval.utils import setup_logging

    setup_logging(logging.ERROR)


def _task_manager(standard: bool):
    from lm_eval.tasks import TaskManager

    _quiet_lm_eval()
    return TaskManager(include_path=str(TASK_DIR), include_defaults=standard)


def _task_configs(names: list[str]) -> list:
    """Local tasks as config dicts with their data file made absolute (the YAML names it from the repo root)."""
    import yaml

    local = local_tasks()
    out = []
    for name in names:
        if name in local:
            cfg = yaml.safe_load(local[name].read_text())
            cfg["dataset_kwargs"] = {"data_files": {"test": str(local[name].with_suffix(".jsonl"))}}
            out.append(cfg)
        else:
            out.append(name)
    return out


def task_dict(names: list[str]) -> dict:
    """lm-eval's top-level task and group objects by name (their data loaded; ``TaskManager.load``); a standard
    task missing from the offline cache is one line (the HF libraries are offline: harness/__init__.py)."""
    standard = any(n not in local_tasks() for n in names)
    try:
        loaded = _task_manager(standard).load(_task_configs(names))
    except Exception as e:
        name = next((n for n in names if n not in local_tasks()), names[0])
        cache = os.environ.get("HF_DATASETS_CACHE") or os.path.join(
            os.environ.get("HF_HOME", "~/.cache/huggingface"), "datasets"
        )
        raise ConfigError(
            f"eval.tasks: {name!r} did not load ({type(e).__name__}: {str(e).splitlines()[0][:160]}); a standard "
            f"task reads its dataset from the HF cache ({cache}): nothing is downloaded at run time "
            "(HF_HUB_OFFLINE=0 allows it)"
        ) from None
    # a group's tasks are scored (and aggregated) through their group: only the outermost objects are passed on
    inner = {c for children in loaded["group_map"].values() for c in children}
    top = {n: g for n, g in loaded["groups"].items() if n not in inner}
    grouped = {t.task_name for g in top.values() for t in g.get_all_tasks()}
    return top | {n: t for n, t in loaded["tasks"].items() if n not in grouped}


def task_digest(name: str) -> str:
    """What a task's scores depend on besides the model: its YAML and data (local), or lm-eval's version."""
    import lm_eval

    local = local_tasks()
    h = hashlib.sha256(name.encode())
    if name in local:
        h.update(local[name].read_bytes())
        h.update(local[name].with_suffix(".jsonl").read_bytes())
    else:
        h.update(f"lm_eval {lm_eval.__version__}".encode())
    return h.hexdigest()[:16]


def weights_digest(model: torch.nn.Module) -> str:
    """sha256 over the state dict's names, dtypes, shapes and bytes: the checkpoint's identity, wherever it is."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}\0".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


def _metrics(task_result: dict, n: int | None) -> dict:
    out = {}
    for key, value in task_result.items():
        metric, _, filt = key.partition(",")
        if filt and isinstance(value, (int, float)) and value == value and metric != "alias":
            out[metric] = float(value)
    if n is not None:
        out["n"] = int(n)
    return out


def score(lm, ecfg: EvalConfig, weights: str, cache_dir: Path | None, precision: str) -> dict:
    """``{task: {metric: value, metric_stderr: stderr, n}}`` for one model; each task cached by (weights, task)."""
    import lm_eval

    out, todo = {}, []
    paths = {}
    for task in ecfg.tasks:
        key = {
            "version": CACHE_VERSION,
            "weights": weights,
            "task": task,
            "task_digest": task_digest(task),
            "num_fewshot": ecfg.num_fewshot,
            "limit": ecfg.limit,
            "precision": precision,
            "max_length": getattr(lm, "max_length", None),
        }
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
        paths[task] = cache_dir / "downstream" / f"{digest}.json" if cache_dir else None
        cached = read_json(paths[task]) if paths[task] else None
        if cached is not None:
            out[task] = cached["scores"]
        else:
            todo.append((task, key))
    if todo:
        tasks = list(task_dict([t for t, _ in todo]).values())
        try:
            res = lm_eval.simple_evaluate(
                model=lm,
                tasks=tasks,
                num_fewshot=ecfg.num_fewshot,
                limit=ecfg.limit,
                log_samples=False,
                bootstrap_iters=1000,
            )
        except AssertionError as e:
            raise ConfigError(_failed_check(e, lm)) from None
        for task, key in todo:
            n = res.get("n-samples", {}).get(task, {}).get("effective")
            out[task] = _metrics(res["results"][task], n)
            if paths[task]:
                atomic_write_json(paths[task], {"key": key, "scores": out[task]})
    return {t: out[t] for t in ecfg.tasks}


def _failed_check(e: AssertionError, lm) -> str:
    """lm-eval checks a request with a bare ``assert``: one line naming that check, and the likely cause."""
    frame = traceback.extract_tb(e.__traceback__)[-1]
    check = (frame.line or "").strip()
    line = f"lm-eval's check `{check}` failed ({Path(frame.filename).name}:{frame.lineno})"
    if "max_length" in check:
        line += (
            f": a request is longer than the model's context (max_length={getattr(lm, 'max_length', '?')}), which "
            "lm-eval's HFLM does not truncate; the default backend scores a long continuation's last max_length tokens"
        )
    return line


# ---- the run's models -------------------------------------------------------------------------------------------


def _tokenizer(cfg: dict):
    from harness.data import TokenDataModule, _eot_id, load_tokenizer

    data = TokenDataModule(**{k: v for k, v in cfg["data"].items() if k != "_target_"})
    tok = load_tokenizer(str(data.prepare()))  # the cached shards' tokenizer (the BPE, or the checkpoint's own)
    return tok, _eot_id(tok)


def _decoder(cfg: dict, state: dict):
    """The dense model of the run's ``model`` block (its ``_target_`` reads an HF base's shape from its folder)."""
    from hydra.utils import instantiate

    from harness.model import Decoder

    model = Decoder(instantiate(cfg["model"]))
    model.load_state_dict({k.removeprefix("model."): v for k, v in state.items()})
    return model.eval()


def run_models(run_dir: Path, res: dict, cfg: dict) -> dict:
    """name -> zero-argument loader of each model a run compares: itself, its dense parent, its iso-FLOP twin."""
    from harness.export import load_run
    from harness.weights import WEIGHTS, trained_state

    models = {"moe" if res.get("method") == "upcycle" else res.get("method", "model"): lambda: load_run(run_dir)[0]}
    base = str(res.get("dense_base", ""))
    if base.startswith("hf:"):
        from harness.hf import load_hf

        models["dense_parent"] = lambda: load_hf(cfg["model"]["hf_path"], max_seq_len=cfg["model"]["max_seq_len"])
    elif base:
        path = Path(cfg["paths"]["cache_dir"]) / "dense" / base / "model.pt"
        models["dense_parent"] = lambda: _decoder(cfg, torch.load(path, map_location="cpu", weights_only=True))
    iso = res.get("dense_iso") or {}
    state = trained_state(Path(iso["cache_dir"])) if iso.get("cache_dir") else None
    if state is not None:
        models["dense_iso"] = lambda: _decoder(cfg, state)
    elif iso:
        log.warning(
            "eval: the iso-FLOP twin %s kept neither last.ckpt nor %s (it was trained before eval.tasks were set, "
            "with train.save_checkpoints=false): not scored",
            iso.get("cache_dir"),
            WEIGHTS,
        )
    return models


def score_run(cfg, out_dir: Path, res: dict) -> dict:
    """The eval stage after training: ``res`` with ``downstream`` for each of the run's models (written back to
    ``results.json``); a run without ``eval.tasks``, or not complete, is returned as it is."""
    from omegaconf import DictConfig, OmegaConf

    plain = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else cfg
    block = {k: v for k, v in (plain.get("eval") or {}).items() if k != "_target_"}
    if not block.get("tasks") or res.get("status") != "complete":
        return res
    ecfg = EvalConfig(**block)
    tok, eot = _tokenizer(plain)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    precision = "bf16-autocast" if device.type == "cuda" else "fp32"
    from harness.lm_adapter import DecoderLM

    downstream = dict(res.get("downstream") or {})
    for name, load in run_models(Path(out_dir), res, plain).items():
        model = load()
        lm = DecoderLM(model, tok, eot, batch_size=ecfg.batch_size, device=device)
        scores = score(lm, ecfg, weights_digest(model), _cache(plain), precision)
        for line in replaced(downstream.get(name, {}), scores):
            log.info("eval %s: %s", name, line)
        downstream[name] = {**downstream.get(name, {}), **scores}
        log.info("eval %s: %s", name, _line(downstream[name]))
        model.to("cpu")
    res = {**res, "downstream": downstream}
    atomic_write_json(Path(out_dir) / "results.json", res)
    return res


def replaced(old: dict, new: dict) -> list[str]:
    """One line for each task whose stored scores the new ones replace on another number of items (a run scored
    with ``eval.limit=200`` and later with ``eval.limit=50`` keeps the later scores, and says so)."""
    return [
        f"{task}'s scores on n={old[task].get('n')} items are replaced by these on n={new[task].get('n')}"
        for task in new
        if task in old and old[task].get("n") != new[task].get("n")
    ]


def _cache(cfg: dict) -> Path | None:
    c = (cfg.get("paths") or {}).get("cache_dir")
    return Path(c).expanduser() if c else None


def _line(scores: dict) -> str:
    parts = []
    for task, m in scores.items():
        main = "acc_norm" if "acc_norm" in m else "acc"
        parts.append(f"{task} {main} {m.get(main, float('nan')):.4f} ± {m.get(main + '_stderr', float('nan')):.4f}")
    return ", ".join(parts)


# ---- CLI --------------------------------------------------------------------------------------------------------


def _hf_lm(path: Path, ecfg: EvalConfig, backend: str):
    from harness.data import _eot_id, load_tokenizer
    from harness.hf import load_hf, read_config
    from harness.lm_adapter import DecoderLM

    if backend == "hf":
        from lm_eval.models.huggingface import HFLM
        from transformers import AutoTokenizer

        hf_tok = AutoTokenizer.from_pretrained(str(path))
        if hf_tok.eos_token is None:  # our BPE's export names no EOS: HFLM needs one (the shards' end-of-text)
            raw = load_tokenizer(str(path))
            hf_tok.eos_token = raw.id_to_token(_eot_id(raw))
        device = "cuda" if torch.cuda.is_available() else "cpu"
        return HFLM(pretrained=str(path), tokenizer=hf_tok, batch_size=ecfg.batch_size, device=device), "hf"
    arch = read_config(path).get("model_type")
    if arch in ("mixtral", "qwen2_moe"):  # harness.export's MoE classes
        raise ConfigError(
            f"{path}: model_type={arch!r} is an MoE, and the default backend reads dense Llama/Qwen2/Mistral folders: "
            f"add --backend hf (transformers' class), or score the run it came from: python -m harness.eval RUN_DIR"
        )
    model = load_hf(path)
    tok = load_tokenizer(str(path))
    return DecoderLM(model, tok, _eot_id(tok), batch_size=ecfg.batch_size), weights_digest(model)


def main(argv=None) -> None:
    from omegaconf import OmegaConf

    ap = argparse.ArgumentParser(description="Downstream scores (lm-eval) of a run's models or an HF checkpoint")
    ap.add_argument("run_dir", nargs="?", help="a finished run folder (results.json + config_resolved.yaml)")
    ap.add_argument("--model-path", help="an HF checkpoint folder (e.g. from python -m harness.export)")
    ap.add_argument("--backend", choices=("ours", "hf"), default="ours", help="--model-path: our Decoder or HFLM")
    ap.add_argument("--tasks", nargs="+", help="default: the run's eval.tasks, else every local task")
    ap.add_argument("--num-fewshot", type=int)
    ap.add_argument("--limit", type=int)
    ap.add_argument("--batch-size", type=int)
    args = ap.parse_args(argv)
    if bool(args.run_dir) == bool(args.model_path):
        ap.error("give a RUN_DIR or --model-path HF_DIR")
    try:
        run_cfg = {}
        if args.run_dir:
            path = Path(args.run_dir) / "config_resolved.yaml"
            if not path.exists():
                raise ConfigError(f"{path} is missing: RUN_DIR must be a run folder")
            run_cfg = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
        block = {k: v for k, v in (run_cfg.get("eval") or {}).items() if k != "_target_"}
        for key in ("tasks", "num_fewshot", "limit", "batch_size"):
            if getattr(args, key) is not None:
                block[key] = getattr(args, key)
        block["tasks"] = block.get("tasks") or list(local_tasks())
        ecfg = EvalConfig(**block)
        if args.model_path:
            lm, digest = _hf_lm(Path(args.model_path), ecfg, args.backend)
            cache = None if digest == "hf" else Path(os.environ.get("UPCYCLE_CACHE", "~/.cache/upcycle")).expanduser()
            out = score(lm, ecfg, digest, cache, "bf16-autocast" if torch.cuda.is_available() else "fp32")
            print(json.dumps({"model": args.model_path, "eval": asdict(ecfg), "downstream": out}, indent=1))
            return
        res = read_json(Path(args.run_dir) / "results.json")
        if res is None or res.get("status") != "complete":
            raise ConfigError(f"{args.run_dir}/results.json is not a complete run's record")
        run_cfg["eval"] = asdict(ecfg)
        res = score_run(run_cfg, Path(args.run_dir), res)
        print(json.dumps(res["downstream"], indent=1))
    except ConfigError as e:
        raise SystemExit(f"eval error: {e}") from None


if __name__ == "__main__":
    main()
