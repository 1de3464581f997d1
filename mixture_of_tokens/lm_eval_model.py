"""A MoT-aware model for EleutherAI's lm-evaluation-harness, registered as `motgpt`, and the `mot-lm-eval` command.

lm-eval batches requests by length, so under plain `hf` a MoT model's score for a request depends on which other
requests happen to share its group, hence on `--batch_size` and on the order of the requests. `motgpt` removes that
dependence with the paper's recipe. The grouping rule:

- For a model whose `config.uses_groups` is true (MoT, uniform MoT, Expert Choice; `group_size > 1`), every request
  is scored in a group of its own: its row followed by `group_size - 1` filler rows from a filler bank (model arg
  `fillers=PATH`; by default the checkpoint's `group_fillers.json`). The fillers sit at the same positions as the
  request's tokens; a request row that is right-padded to the batch's length sees nothing of its padding, since by
  causality positions after its end affect none of its own. Only the request's row is read, so scores depend neither
  on `--batch_size` nor on the order of the requests (up to floating-point rounding). A batch of N requests runs
  N * group_size rows through the model, in one forward pass.
- `generate_until` decodes every context alone, without its left padding, through
  `model.generate(context, group_fillers=...)`: the fillers are fed their own text while the request decodes.
- Filler rows must be at least `max_length` tokens long (the model's `n_positions`, or the model arg `max_length`).
- A model whose `config.uses_groups` is false (a dense twin, Token Choice, any other causal LM) is evaluated exactly
  as by plain `hf`, without fillers; giving it `fillers` is an error.

From Python, import this module (that registers `motgpt`), then
`lm_eval.simple_evaluate(model="motgpt", model_args="pretrained=DIR", tasks=[...], task_manager=..., batch_size=N)`.
The offline tasks shipped in `mixture_of_tokens/tasks/` load with `lm_eval.tasks.TaskManager(include_path=TASK_DIR)`.
"""

import sys
from collections.abc import Sequence

import lm_eval.__main__
import torch
from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM
from transformers import PreTrainedModel

from .modeling_mot import check_filler_bank, find_filler_bank, isolated_groups, load_filler_bank
from .tasks import TASK_DIR

__all__ = ["TASK_DIR", "MoTLM", "main"]

# Arguments of lm-eval's command line through which the user chooses the task include path.
USER_PATH_ARGS = ("--include_path", "--config", "-C")


@register_model("motgpt")
class MoTLM(HFLM):
    """[`~lm_eval.models.huggingface.HFLM`] that scores and decodes each request of a MoT model in a group of its own
    with filler rows (see the module docstring).

    Args:
        pretrained: a checkpoint folder, a Hub name or a loaded model, as for `hf`.
        fillers: a filler bank: a checkpoint folder holding `group_fillers.json` or such a JSON file. Defaults to the
            bank of `pretrained`; only for models whose `config.uses_groups` is true.
        backend: `"causal"`, as for every model this class is meant for.
        kwargs: the other model args of `hf` (`batch_size`, `device`, `dtype`, `max_length`, ...).
    """

    def __init__(
        self, pretrained: str | PreTrainedModel, fillers: str | None = None, backend: str = "causal", **kwargs
    ) -> None:
        # lm-eval cannot tell from its own lists that a MoTGPT model is causal.
        super().__init__(pretrained=pretrained, backend=backend, **kwargs)
        self.group_size = getattr(self.model.config, "group_size", 1)
        self.group_fillers = self._load_group_fillers(pretrained, fillers)

    def _load_group_fillers(self, pretrained: str | PreTrainedModel, fillers: str | None) -> torch.Tensor | None:
        """The `group_size - 1` filler rows on the model's device, or None for a model that mixes no rows."""
        if not getattr(self.model.config, "uses_groups", False) or self.group_size == 1:
            if fillers is not None:
                raise ValueError(
                    f"model arg `fillers` was given, but {pretrained!r} mixes no rows (config.uses_groups is false or "
                    "group_size is 1): it is scored like plain `hf`, with no fillers. Drop `fillers`."
                )
            return None
        need = (
            f"model arg `fillers`: {pretrained!r} mixes the rows of groups of {self.group_size}, so every request is "
            f"scored with {self.group_size - 1} filler rows of at least max_length={self.max_length} tokens"
        )
        # The model's bank; remote code from before the bank was part of the model has none: its checkpoint's file.
        source = fillers if fillers is not None else getattr(pretrained, "name_or_path", pretrained)
        model_bank = getattr(self.model, "group_fillers", None)
        if fillers is None and model_bank is None and find_filler_bank(source) is None:
            raise ValueError(f"{need}; it has no filler bank: add one with `mot-fillers`, or give `fillers=PATH`.")
        try:
            bank = (
                model_bank if fillers is None and model_bank is not None else load_filler_bank(source, self.group_size)
            )
            check_filler_bank(bank, self.group_size, self.max_length, "the filler bank")
        except ValueError as error:
            raise ValueError(f"{need}. {error} Give a longer bank, or a smaller `max_length`.") from error
        return bank[: self.group_size - 1].to(self.device)

    def _model_call(
        self, inps: torch.Tensor, attn_mask: torch.Tensor | None = None, labels: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Logits `(batch, seq_len, vocab)` of each row of `inps`, each computed in a group with the fillers."""
        if self.group_fillers is None:
            return super()._model_call(inps, attn_mask, labels)
        groups, _ = isolated_groups(inps, self.group_fillers, self.group_size)
        with (
            torch.no_grad(),
            torch.autocast(
                device_type=self.device.type,
                dtype=self.mixed_precision_dtype,
                enabled=self.mixed_precision_dtype is not None,
            ),
        ):
            hidden = self.model.get_decoder()(groups, use_cache=False).last_hidden_state
            # Only the request rows are projected to the vocabulary: the fillers' logits would take group_size
            # times the memory and are never read.
            return self.model.get_output_embeddings()(hidden[:: self.group_size])

    def _model_generate(self, context: torch.Tensor, max_length: int, stop: list[str], **generation_kwargs):
        """`(batch, context_len + new)` tokens: each left-padded context row decoded alone, in a group with the
        fillers, then padded back to one tensor as `hf` returns it."""
        if self.group_fillers is None:
            return super()._model_generate(context, max_length, stop, **generation_kwargs)
        attention_mask = generation_kwargs.pop("attention_mask")
        # `max_length` is the padded context plus the new tokens; a row without its padding gets the same new tokens.
        max_new_tokens = max_length - context.shape[1]
        rows = []
        for row, mask in zip(context, attention_mask.bool(), strict=True):
            prompt = row[mask][None]
            # HFLM builds its stop criteria for this one row: they watch the group's first row, the request
            # (`generate` puts each prompt first in its group), and end the whole group's decoding with it.
            output = super()._model_generate(
                prompt,
                prompt.shape[1] + max_new_tokens,
                stop,
                attention_mask=torch.ones_like(prompt),
                group_fillers=self.group_fillers,
                **generation_kwargs,
            )
            rows.append(torch.cat([row, output[0, prompt.shape[1] :]]))
        return torch.nn.utils.rnn.pad_sequence(rows, batch_first=True, padding_value=self.tokenizer.pad_token_id)


def with_task_dir(argv: Sequence[str]) -> list[str]:
    """`argv` plus `--include_path TASK_DIR` (the package's offline tasks), unless the user gives an include path or a
    `--config` file (which may set one: a command-line include path would override it), or asks only for help."""
    argv = list(argv)
    if not argv or argv[0] in ("-h", "--help") or any(arg.split("=")[0] in USER_PATH_ARGS for arg in argv):
        return argv
    return [*argv, "--include_path", str(TASK_DIR)]


def main(argv: Sequence[str] | None = None) -> None:
    """`mot-lm-eval`: lm-eval's own command line (`lm-eval run|ls|validate ...`), with the `motgpt` model registered
    and the package's tasks on the include path. lm-eval's command loads no plugins, hence this wrapper."""
    argv = sys.argv[1:] if argv is None else argv
    sys.argv = ["mot-lm-eval", *with_task_dir(argv)]
    lm_eval.__main__.cli_evaluate()


if __name__ == "__main__":
    main()
