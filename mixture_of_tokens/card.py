"""Model cards for MoTGPT checkpoints, rendered with `huggingface_hub.ModelCard` from `templates/motgpt.md`."""

from pathlib import Path

from huggingface_hub import EvalResult, ModelCard, ModelCardData

TEMPLATE = Path(__file__).parent / "templates" / "motgpt.md"
# Result key -> (dataset type, dataset name, split) for the model-index.
CORPORA = {
    "validation": ("sotu", "State of the Union addresses, 20 latest held out", "validation"),
    "kjv": ("kjv", "King James Bible (out of domain)", "test"),
}


def parameter_counts(model) -> tuple[int, int]:
    """Total parameters, and parameters active per token.

    A token only gets its share of the expert weights. In MoT each expert processes one mixture per group of G
    tokens, so `1 / G` of the expert weights is active per token (with the FLOP-matched width, exactly a dense MLP's
    worth). A Token Choice token uses `k / E` of them (k = `num_experts_per_tok`; tokens dropped for capacity
    ignored); in Expert Choice each expert takes `capacity` of a group's G tokens, so `capacity / G`.
    """
    total, expert = _parameter_totals(model)
    return total, round(total - expert * (1 - active_expert_fraction(model.config)))


def _parameter_totals(model) -> tuple[int, int]:
    """All parameters, and those of the experts (every weight of an expert layer's `experts` module)."""
    named = list(model.named_parameters())
    return sum(p.numel() for _, p in named), sum(p.numel() for n, p in named if ".mlp.experts." in n)


def active_expert_fraction(config) -> float:
    """The fraction of a layer's expert weights that one token uses (see `parameter_counts`)."""
    ffn_type = getattr(config, "ffn_type", "mot")
    group_size = getattr(config, "group_size", 1)
    if ffn_type == "token_choice":
        return config.num_experts_per_tok / config.n_experts
    if ffn_type == "expert_choice":
        return config.expert_choice_capacity / group_size
    return 1 / group_size


def flops_per_token(model) -> float:
    """Matmul FLOPs per token: 2 per non-embedding, non-expert weight (the router among them), 2 per expert weight
    times [`active_expert_fraction`] (the rows the expert matmuls process per token: MoT and Expert Choice fill their
    buffers exactly, and Token Choice computes each token's k assignments, dropped ones included), the LM head, and
    MoT's mixing and redistribution (2 * n_experts * n_embd multiply-adds per MoT layer; Token and Expert Choice only
    gather and scatter tokens)."""
    config = model.config
    total, expert = _parameter_totals(model)
    embeddings = config.vocab_size * config.n_embd + config.n_positions * config.n_embd
    mixes = getattr(config, "ffn_type", "mot") in ("mot", "uniform_mot")
    n_mot = len(getattr(config, "mot_layer_indices", [])) if mixes else 0
    mixing = 2 * getattr(config, "n_experts", 0) * config.n_embd * n_mot
    weights = total - expert - embeddings + expert * active_expert_fraction(config)
    return 2 * weights + 2 * config.vocab_size * config.n_embd + 2 * mixing


def evaluation_table(eval_results: dict) -> str:
    rows = ["| corpus | grouping | perplexity | loss (nats/token) |", "| --- | --- | --- | --- |"]
    for corpus, by_grouping in eval_results.items():
        if corpus in CORPORA:
            for grouping, result in by_grouping.items():
                rows.append(f"| {CORPORA[corpus][1]} | {grouping} | {result['perplexity']:.2f} | "
                            f"{result['mean_nll']:.4f} |")  # fmt: skip
    return "\n".join(rows)


def render_model_card(
    model, eval_results: dict, repo_id: str, training_details: str, dense_twin=None, license: str = "apache-2.0"
) -> ModelCard:
    """A model card with YAML metadata (including a `model-index` of `eval_results`) and the body from the template.

    `eval_results` is what `mot-evaluate` writes; `dense_twin` (a model) gives the FLOPs comparison.
    """
    results = [
        EvalResult(
            task_type="text-generation",
            dataset_type=CORPORA[corpus][0],
            dataset_name=CORPORA[corpus][1],
            dataset_split=CORPORA[corpus][2],
            metric_type="perplexity",
            metric_name=f"perplexity ({grouping} grouping)",
            metric_value=round(result["perplexity"], 4),
        )
        for corpus, by_grouping in eval_results.items()
        if corpus in CORPORA
        for grouping, result in by_grouping.items()
    ]
    if not results:
        raise ValueError("`eval_results` holds no evaluation results: run mot-evaluate first.")
    config = model.config
    total, active = parameter_counts(model)
    flops_ratio = f"{flops_per_token(model) / flops_per_token(dense_twin):.3f}x" if dense_twin is not None else "n/a"
    card_data = ModelCardData(
        language="en",
        license=license,
        library_name="transformers",
        pipeline_tag="text-generation",
        tags=["mixture-of-tokens", "motgpt", "mixture-of-experts", "custom_code"],
        datasets=["sotu"],
        model_name=repo_id.split("/")[-1],
        eval_results=results,
    )
    return ModelCard.from_template(
        card_data,
        template_path=str(TEMPLATE),
        model_name=repo_id.split("/")[-1],
        repo_id=repo_id,
        n_layer=config.n_layer,
        n_embd=config.n_embd,
        n_head=config.n_head,
        mot_layers=getattr(config, "mot_layer_indices", []) or "none (dense)",
        n_experts=getattr(config, "n_experts", "-"),
        group_size=getattr(config, "group_size", "-"),
        expert_size=getattr(config, "expert_size_resolved", "-"),
        router_temperature=getattr(config, "router_temperature", "-"),
        learnable_temperature=f"learnable: {getattr(config, 'learnable_temperature', 'none')}",
        total_params=f"{total:,}",
        active_params=f"{active:,}",
        flops_ratio=flops_ratio,
        training_details=training_details,
        evaluation_table=evaluation_table(eval_results),
    )
