"""Our models as an lm-eval model type: `--model llamatrain --model_args pretrained=PATH[,adapter=DIR]`.

PATH is anything `launch/generate.py` takes: a run folder (its adapter on its base, else its
exported model, else its newest checkpoint), one checkpoint, an HF Llama folder or an adapter
folder. Nothing is exported first: the weights run in our `Transformer` (LoRA merged, prompt
tuning as its wrapper), and generation goes through our batched KV cache.

Tokenization, the empty-context prefix, rolling windows and stop-sequence handling follow
lm-eval's `hf` model, so the scores equal `hf` on the exported folder (tests/test_eval_benchmarks.py).
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import _add_special_kwargs, handle_stop_sequences, has_bos_prefix, normalize_gen_kwargs

MODEL_NAME = "llamatrain"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def find_tokenizer(model: str | Path, adapter: str | Path | None = None) -> Path:
    """The tokenizer that goes with the adapter, else with the model (see trainer.run_folder)."""
    from trainer.run_folder import resolve

    for path in ([adapter] if adapter else []) + [model]:
        found = resolve(path).tokenizer
        if found is not None:
            return found
    raise FileNotFoundError(f"{model}: no tokenizer found beside the model; pass tokenizer=DIR")


@register_model(MODEL_NAME)
class LlamatrainLM(TemplateLM):
    def __init__(self, pretrained: str, adapter: str | None = None, tokenizer: str | None = None,
                 batch_size: int | str = 8, max_length: int | None = None, max_gen_toks: int = 256,
                 device: str = "cpu", dtype: str = "float32", add_bos_token: bool | None = None, **_ignored):
        super().__init__()
        from trainer.data.tokenizer import load_tokenizer
        from trainer.export import load_model

        if dtype not in DTYPES:
            raise ValueError(f"dtype={dtype} is not one of {', '.join(DTYPES)}")
        self.tokenizer = load_tokenizer(Path(tokenizer) if tokenizer else find_tokenizer(pretrained, adapter))
        self.model = load_model(pretrained, adapter).to(device=device, dtype=DTYPES[dtype]).eval()
        self._device = torch.device(device)
        self.batch_size = int(batch_size) if str(batch_size) != "auto" else 8
        self._max_length = int(max_length) if max_length else self.model.cfg.max_seq_len
        self.max_gen_toks = int(max_gen_toks)
        self.add_bos_token = add_bos_token
        self.pretrained = str(pretrained)

    # -- what lm-eval asks of a model ----------------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        return self.tokenizer.bos_token_id if self.tokenizer.bos_token_id is not None else self.eot_token_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def tokenizer_name(self) -> str:
        return self.tokenizer.name_or_path.replace("/", "__")

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """Chat-rendered tasks (`apply_chat_template=True`: IFEval on an instruction-tuned model) as lm-eval's
        `hf` model renders them: the tokenizer's own template, as text."""
        if not getattr(self.tokenizer, "chat_template", None):
            raise ValueError(f"{self.pretrained}: the tokenizer has no chat template; evaluate without "
                             "apply_chat_template (a base model continues raw text)")
        return self.tokenizer.apply_chat_template(chat_history, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt,
                                                  continue_final_message=not add_generation_prompt)

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, left_truncate_len: int | None = None,
                   **kwargs) -> list[int]:
        special = _add_special_kwargs(add_special_tokens, self.add_bos_token)
        if add_special_tokens is None and has_bos_prefix(string, self.tokenizer.decode(self.prefix_token_id)):
            special["add_special_tokens"] = False
        ids = self.tokenizer.encode(string, **special)
        return ids[-left_truncate_len:] if left_truncate_len else ids

    def tok_decode(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=True)

    # -- scoring -----------------------------------------------------------------------------------------------
    @torch.no_grad()
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """Sum of the continuation's log-probabilities and whether greedy decoding gives it, per request.

        Rows are right-padded: under causal attention padding after a row's last token cannot change
        its logits, so no mask is needed."""
        # Longest first, as lm-eval does: similar lengths share a batch, and the order is restored below.
        order = sorted(range(len(requests)), key=lambda i: -len(requests[i][1] + requests[i][2]))
        results: list[tuple[float, bool] | None] = [None] * len(requests)
        for start in range(0, len(order), self.batch_size):
            chunk = order[start:start + self.batch_size]
            rows, spans = [], []
            for i in chunk:
                _, context, continuation = requests[i]
                if not continuation or len(continuation) > self.max_length:
                    raise ValueError(f"a continuation of {len(continuation)} tokens cannot be scored in a window "
                                     f"of {self.max_length}")
                rows.append((context + continuation)[-(self.max_length + 1):][:-1])
                spans.append(len(continuation))
            width = max(len(r) for r in rows)
            ids = torch.zeros(len(rows), width, dtype=torch.long)
            for j, row in enumerate(rows):
                ids[j, :len(row)] = torch.tensor(row)
            logprobs = F.log_softmax(self.model(ids.to(self.device)).float(), dim=-1).cpu()
            for j, i in enumerate(chunk):
                n, end = spans[j], len(rows[j])
                target = torch.tensor(requests[i][2])
                piece = logprobs[j, end - n:end]  # (n, vocab): the positions that predict the continuation
                greedy = bool((piece.argmax(dim=-1) == target).all())
                results[i] = (float(piece.gather(-1, target[:, None]).sum()), greedy)
                if self.cache_hook is not None and requests[i][0] is not None:
                    self.cache_hook.add_partial("loglikelihood", requests[i][0], results[i])
        return results  # type: ignore[return-value]

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Whole-text log-likelihood in disjoint windows of the model's length, as lm-eval's `hf` computes it."""
        windows, owners = [], []
        for index, (string,) in enumerate(req.args for req in requests):
            for window in map(lm_utils.make_disjoint_window, lm_utils.get_rolling_token_windows(
                    token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)):
                windows.append((None,) + window)
                owners.append(index)
        totals = [0.0] * len(requests)
        for owner, (logprob, _) in zip(owners, self._loglikelihood_tokens(windows)):
            totals[owner] += logprob
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    @torch.no_grad()
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy (or sampled) continuations through our KV cache, cut at the first stop sequence."""
        from model_defs.generate import generate

        eos = self.tokenizer.decode([self.eot_token_id], skip_special_tokens=False)
        # Requests with the same settings are batched together; answers go back in request order.
        groups: dict[str, list[int]] = {}
        for i, req in enumerate(requests):
            groups.setdefault(repr(sorted(req.args[1].items())), []).append(i)
        answers: list[str | None] = [None] * len(requests)
        generator = torch.Generator().manual_seed(1234)
        for indices in groups.values():
            settings = normalize_gen_kwargs(requests[indices[0]].args[1], self.max_gen_toks)
            until = handle_stop_sequences(settings.pop("until", None), eos=eos)
            max_new = settings.pop("max_gen_toks")
            temperature = float(settings.get("temperature", 0.0)) if settings.get("do_sample") else 0.0
            if max_new >= self.max_length:
                raise ValueError(f"max_gen_toks {max_new} must be below the model's length {self.max_length}")
            for start in range(0, len(indices), self.batch_size):
                chunk = indices[start:start + self.batch_size]
                prompts = [self.tok_encode(requests[i].args[0], left_truncate_len=self.max_length - max_new)
                           for i in chunk]
                width = max(len(p) for p in prompts)
                ids = torch.full((len(prompts), width), self.eot_token_id, dtype=torch.long)
                mask = torch.zeros(len(prompts), width, dtype=torch.bool)
                for j, p in enumerate(prompts):
                    ids[j, width - len(p):] = torch.tensor(p)
                    mask[j, width - len(p):] = True
                # Prompt tuning prepends virtual tokens, which the KV cache's fixed layout does not hold.
                out = generate(self.model, ids.to(self.device), attention_mask=mask.to(self.device),
                               max_new_tokens=max_new, temperature=temperature, stop_token_ids=[self.eot_token_id],
                               pad_token_id=self.eot_token_id, generator=generator,
                               use_cache=hasattr(self.model, "layers"))
                for j, i in enumerate(chunk):
                    text = self.tok_decode(out[j, width:].tolist())
                    for stop in until:
                        if stop:
                            text = text.split(stop)[0]
                    answers[i] = text
                    self.cache_hook.add_partial("generate_until", requests[i].args, text)
        return answers  # type: ignore[return-value]
