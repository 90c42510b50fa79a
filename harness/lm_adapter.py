"""Our :class:`~harness.model.Decoder` as an lm-evaluation-harness model (``lm_eval.api.model.TemplateLM``).

Plain torch + lm_eval: no Hydra, no Lightning. It scores as lm-eval's ``HFLM`` does: a context and continuation
are tokenized together and split where the context's own tokens end (``TemplateLM._encode_pair``); the input is
the last ``max_length + 1`` tokens less one (left truncation); requests run longest first, right-padded, one
forward per batch; ``loglikelihood_rolling`` sums disjoint windows (``lm_eval.utils.get_rolling_token_windows``).
bf16 autocast on CUDA, fp32 on CPU. ``generate_until`` is greedy, one request at a time, no KV cache.

Shapes: B requests in a batch, T padded length, V vocabulary.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from lm_eval import utils
from lm_eval.api.model import TemplateLM
from tqdm import tqdm

from harness.model import Decoder


class DecoderLM(TemplateLM):
    """``model``: a Decoder (dense or MoE); ``tokenizer``: a ``tokenizers.Tokenizer`` (the BPE of the corpus
    shards, or an HF checkpoint's tokenizer.json); ``eot_id``: the end-of-text token the shards put between
    documents (also the prefix of an empty context, as HFLM's EOS). ``max_length``: the model's max_seq_len."""

    def __init__(
        self,
        model: Decoder,
        tokenizer,
        eot_id: int,
        batch_size: int = 32,
        device: str | torch.device | None = None,
        max_length: int | None = None,
        max_gen_toks: int = 256,
    ):
        super().__init__()
        self._device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = model.to(self._device).eval()
        self.tok = tokenizer
        self._eot = int(eot_id)
        self.batch_size = int(batch_size)
        self.max_length = int(max_length or model.cfg.max_seq_len)
        self.max_gen_toks = int(max_gen_toks)

    @property
    def eot_token_id(self) -> int:
        return self._eot

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        return self.tok.encode(string, add_special_tokens=bool(add_special_tokens)).ids

    def tok_decode(self, tokens: list[int]) -> str:
        return self.tok.decode(tokens)

    @torch.no_grad()
    def _hidden(self, inputs: list[list[int]]) -> torch.Tensor:
        """[B, T, D] final hidden states of right-padded ``inputs`` (padding is after every real token: causal
        attention keeps it out); the LM head is applied later only where a score is read (V is up to 49k)."""
        t = max(len(x) for x in inputs)
        idx = torch.full((len(inputs), t), self._eot, dtype=torch.long)
        for i, x in enumerate(inputs):
            idx[i, : len(x)] = torch.tensor(x, dtype=torch.long)
        head, self.model.lm_head = self.model.lm_head, torch.nn.Identity()  # forward returns norm(x), not logits
        try:
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self._device.type == "cuda"):
                return self.model(idx.to(self._device)).logits
        finally:
            self.model.lm_head = head

    def _logprobs_at(self, hidden: torch.Tensor) -> torch.Tensor:
        """[n, V] fp32 log-softmax of the LM head at ``hidden`` [n, D] (the autocast matmul the forward does)."""
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self._device.type == "cuda"):
            logits = self.model.lm_head(hidden)
        return F.log_softmax(logits.float(), dim=-1)

    @torch.no_grad()  # the LM head runs here too: with grad on it built a graph per scored row
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """(sum of continuation log-probs, whether greedy decoding gives the continuation), in request order."""
        rows = []  # (request index, model input, continuation)
        for i, (_, context, continuation) in enumerate(requests):
            whole = (context + continuation)[-(self.max_length + 1) :]
            rows.append((i, whole[:-1], continuation[-self.max_length :]))  # a longer continuation: its last part
        rows.sort(key=lambda r: (-len(r[1]), tuple(r[1])))  # longest first: an OOM shows at once, padding is small
        out: list[tuple[float, bool] | None] = [None] * len(rows)
        for s in tqdm(range(0, len(rows), self.batch_size), disable=disable_tqdm, desc="loglikelihood"):
            batch = rows[s : s + self.batch_size]
            hidden = self._hidden([inp for _, inp, _ in batch])
            for b, (i, inp, cont) in enumerate(batch):
                lp = self._logprobs_at(hidden[b, len(inp) - len(cont) : len(inp)])  # [n, V]: predicting cont
                target = torch.tensor(cont, device=lp.device)
                greedy = bool((lp.argmax(-1) == target).all())
                out[i] = (float(lp.gather(-1, target[:, None]).sum()), greedy)
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Each text's total log-likelihood over disjoint windows of ``max_length`` tokens (as HFLM)."""
        windows, owner = [], []
        for i, (string,) in enumerate(r.args for r in requests):
            toks = self.tok_encode(string)
            for ctx, cont in map(
                utils.make_disjoint_window,
                utils.get_rolling_token_windows(toks, self.prefix_token_id, self.max_length, context_len=1),
            ):
                windows.append((None, ctx, cont))
                owner.append(i)
        scores = self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)
        totals = [0.0] * len(requests)
        for i, (lp, _) in zip(owner, scores, strict=True):
            totals[i] += lp
        return totals

    @torch.no_grad()
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy decoding until a stop string or ``max_gen_toks`` tokens (the context left-truncated)."""
        out = []
        for req in tqdm(requests, disable=disable_tqdm, desc="generate_until"):
            context, kw = req.args
            until = kw.get("until") or [self.tok_decode([self._eot])]
            until = [until] if isinstance(until, str) else list(until)
            budget = int(kw.get("max_gen_toks", self.max_gen_toks))
            toks = self.tok_encode(context) or [self.prefix_token_id]
            new: list[int] = []
            text = ""
            for _ in range(budget):
                nxt = int(self._logprobs_at(self._hidden([(toks + new)[-self.max_length :]])[0, -1:])[0].argmax())
                if nxt == self._eot:
                    break
                new.append(nxt)
                text = self.tok_decode(new)
                if any(u in text for u in until):
                    break
            for u in until:
                text = text.split(u)[0]
            out.append(text)
        return out
