"""Perplexity from summed token negative log-likelihoods, as an `evaluate` metric loaded by path.

The Hub's "perplexity" metric runs a model itself and cannot load offline; this one only aggregates what the
evaluation loop measured: `add_batch(nll_sums=..., token_counts=...)` per batch, then `compute()`.
"""

import math

import datasets
import evaluate

_DESCRIPTION = "Perplexity exp(sum of token NLLs / number of tokens), aggregated over batches."
_KWARGS_DESCRIPTION = """
Args:
    nll_sums: summed negative log-likelihood (nats) of the predicted tokens of each sequence.
    token_counts: number of predicted tokens of each sequence.
Returns:
    perplexity: exp(mean NLL per token).
    mean_nll: mean NLL per token (nats), i.e. the cross-entropy loss.
    tokens: number of predicted tokens.
"""


class Perplexity(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"nll_sums": datasets.Value("float64"), "token_counts": datasets.Value("int64")}
            ),
        )

    def _compute(self, nll_sums: list[float], token_counts: list[int]) -> dict:
        tokens = sum(token_counts)
        if tokens == 0:
            raise ValueError("perplexity needs at least one predicted token, got token_counts summing to 0.")
        mean_nll = math.fsum(nll_sums) / tokens
        return {"perplexity": math.exp(mean_nll), "mean_nll": mean_nll, "tokens": tokens}
