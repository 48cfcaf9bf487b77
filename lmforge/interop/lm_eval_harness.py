"""An lmforge checkpoint as a model of EleutherAI's lm-evaluation-harness (``lm-eval``).

The three requests lm-eval makes are answered by lmforge's own scorer and generator, so a task scored
through lm-eval and the same task scored by ``lmforge eval`` agree exactly:

- ``loglikelihood``: ``score_continuations`` (BOS first, lm-eval's split of context and continuation);
- ``loglikelihood_rolling``: ``rolling_logprob`` (sliding windows of ``stride`` new tokens);
- ``generate_until``: ``generate`` with the request's stop strings, greedy unless sampling is asked for.

lm-eval has no plugin entry point for models, so the class registers itself as ``lmforge`` when this
module is imported. From the shell, run lm-eval through this module::

    python -m lmforge.interop.lm_eval_harness --model lmforge --model_args pretrained=runs/default \
        --tasks my_task --include_path my_tasks/

It needs ``pip install lm-eval`` (not a dependency of lmforge).
"""

from __future__ import annotations

import sys

from tqdm import tqdm

from lmforge.errors import LmforgeError

try:
    from lm_eval.api.model import LM
    from lm_eval.api.registry import register_model
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise LmforgeError("the lm-eval adapter needs lm-eval: pip install lm-eval") from exc

from lmforge.evaluation.loglikelihood import rolling_logprob, score_continuations
from lmforge.evaluation.task_metrics import fit_prompt
from lmforge.inference.generate import SamplingParams, generate


@register_model("lmforge")
class LmforgeLM(LM):
    """``pretrained`` is a run folder or checkpoint folder; ``stride`` is used by rolling log-likelihoods."""

    def __init__(self, pretrained: str, device: str = "cpu", batch_size: int | str = 16, stride: int | None = None,
                 max_gen_toks: int = 256, **_ignored):
        super().__init__()
        import torch

        from lmforge.evaluation.report import load_for_inference

        if str(device).startswith("cuda") and not torch.cuda.is_available():
            # lm-eval asks for cuda:0 unless told otherwise; on a machine without a GPU that means the CPU.
            print(f"lmforge: {device} is not available here; evaluating on the CPU", file=sys.stderr)
            device = "cpu"
        self.model, self.tokenizer, self.checkpoint = load_for_inference(pretrained, device)
        # lm-eval passes "auto" or a number as text; lmforge batches by count, so "auto" means our default.
        self.batch_size = int(batch_size) if str(batch_size).isdigit() else 16
        self.stride = int(stride) if stride is not None else None
        self.max_gen_toks = int(max_gen_toks)

    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict, additional_config: dict | None = None):
        # lm-eval adds its own --device/--batch_size; a value given in --model_args wins instead of clashing.
        extra = {key: value for key, value in (additional_config or {}).items() if value is not None and key not in arg_dict}
        return cls(**arg_dict, **extra)

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None):
        from lm_eval.utils import simple_parse_args_string

        return cls.create_from_arg_obj(simple_parse_args_string(arg_string), additional_config)

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        scored = score_continuations(self.model, self.tokenizer, [request.args for request in requests], self.batch_size)
        return [(result.logprob, result.is_greedy) for result in scored]

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        bar = tqdm(requests, desc="rolling log-likelihood", disable=disable_tqdm, file=sys.stderr)
        return [rolling_logprob(self.model, self.tokenizer, request.args[0], self.stride, self.batch_size) for request in bar]

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        outputs = []
        for request in tqdm(requests, desc="generating", disable=disable_tqdm, file=sys.stderr):
            context, options = request.args
            options = dict(options or {})
            until = options.get("until") or []
            if isinstance(until, str):
                until = [until]
            sampling = bool(options.get("do_sample")) and float(options.get("temperature", 1.0)) > 0
            params = SamplingParams(max_new_tokens=int(options.get("max_gen_toks", self.max_gen_toks)),
                                    temperature=float(options.get("temperature", 1.0)) if sampling else 0.0, stop=list(until),
                                    seed=options.get("seed"))
            # lm-eval truncates over-long prompts from the left too; keep room for at least half a window of answer.
            window = self.model.config.context_length
            context = fit_prompt(self.tokenizer, context, window - 1 - min(params.max_new_tokens, window // 2))
            outputs.append("".join(generate(self.model, self.tokenizer, context, params)))
        return outputs


def main(argv: list[str] | None = None) -> None:
    """lm-eval's own command line, with the ``lmforge`` model registered."""
    from lm_eval.__main__ import cli_evaluate

    sys.argv = [sys.argv[0], *(argv if argv is not None else sys.argv[1:])]
    cli_evaluate()


if __name__ == "__main__":
    main()
