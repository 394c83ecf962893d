"""Multi-query associative recall (MQAR, as in the Zoology benchmark) beyond the attention window.

A sequence lists key-value pairs, then `gap` filler tokens, then queries: a key from the pairs followed by its
value (teacher forcing, as in MQAR). The loss and the accuracy count only the values of the queries::

    <bos> k12 v3 k7 v30 k0 v9 ... f4 f1 f9 f4 ... k7 [v30] k12 [v3] ...
          `---- pairs ----'       `-- gap --'      `--- queries ---'

The gap is at least the model's *receptive field without test-time learning*: `num_hidden_layers *
max(sliding_window - 1, omega_window)` tokens (per layer, attention reaches `sliding_window - 1` tokens back and
the memory's Q-K projection `omega_window` tokens back). With TTL off, no path from a pair to its query exists,
so any model scores chance, `1 / num_values` (values are drawn uniformly and independently); everything above
chance with TTL on is carried by the memory the model wrote while reading the pairs.
"""

from __future__ import annotations

import logging
import math
import multiprocessing
import statistics
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedModel, PreTrainedTokenizerFast

from ..configuration_atlas import AtlasMAGConfig
from ..modeling_atlas import AtlasMAGForCausalLM
from .demo import CONDITIONS, condition_switches

logger = logging.getLogger(__name__)

SPECIAL_TOKENS = ("<pad>", "<unk>", "<bos>", "<eos>")
BOS_ID = SPECIAL_TOKENS.index("<bos>")
TTL_SETTINGS = ("ttl_on", "ttl_off")
# The test sequences of `evaluate_recall` (and of the lm-evaluation-harness tasks built on it) come from this seed.
EVAL_SEED = 1234


def receptive_field(config: AtlasMAGConfig) -> int:
    """How far back a token's output can depend on the input when the memory does not learn."""
    return config.num_hidden_layers * max(config.sliding_window - 1, config.omega_window)


def check_minimum(settings: Any, minimum: int, *names: str) -> None:
    """Refuse a settings object whose named fields fall below `minimum`, naming the field."""
    for name in names:
        value = getattr(settings, name)
        if value < minimum:
            raise ValueError(f"{type(settings).__name__}.{name} must be >= {minimum}, got {value}")


@dataclass(frozen=True)
class RecallTask:
    """The shape of the task. Token ids: the four specials, then keys `k0..`, values `v0..` and filler `f0..`."""

    num_keys: int = 32
    num_values: int = 32
    num_filler: int = 16
    num_pairs: int = 2
    num_queries: int = 2
    gap: int = 8

    def __post_init__(self) -> None:
        check_minimum(self, 1, "num_keys", "num_values", "num_filler", "num_pairs", "num_queries")
        check_minimum(self, 0, "gap")
        if self.num_pairs > self.num_keys:
            raise ValueError(f"num_pairs ({self.num_pairs}) exceeds num_keys ({self.num_keys}): keys must be distinct")
        if self.num_queries > self.num_pairs:
            raise ValueError(f"num_queries ({self.num_queries}) exceeds num_pairs ({self.num_pairs})")

    @property
    def vocab(self) -> list[str]:
        return (
            list(SPECIAL_TOKENS)
            + [f"k{i}" for i in range(self.num_keys)]
            + [f"v{i}" for i in range(self.num_values)]
            + [f"f{i}" for i in range(self.num_filler)]
        )

    @property
    def vocab_size(self) -> int:
        return len(SPECIAL_TOKENS) + self.num_keys + self.num_values + self.num_filler

    @property
    def key_offset(self) -> int:
        return len(SPECIAL_TOKENS)

    @property
    def value_offset(self) -> int:
        return self.key_offset + self.num_keys

    @property
    def filler_offset(self) -> int:
        return self.value_offset + self.num_values

    @property
    def sequence_length(self) -> int:
        return 1 + 2 * self.num_pairs + self.gap + 2 * self.num_queries

    @property
    def pair_value_positions(self) -> slice:
        """Where the pairs' values lie (each right after its key)."""
        return slice(2, 2 + 2 * self.num_pairs, 2)

    @property
    def first_query_position(self) -> int:
        """Where the first query's key lies (its value follows; the next query's key follows that)."""
        return 1 + 2 * self.num_pairs + self.gap

    @property
    def chance(self) -> float:
        return 1.0 / self.num_values

    def sample(self, batch_size: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """`batch_size` sequences: input ids [B, L] and labels [B, L] (-100 except at the queried values)."""
        pairs, queries = 2 * self.num_pairs, 2 * self.num_queries
        keys = torch.rand(batch_size, self.num_keys, generator=generator).argsort(1)[:, : self.num_pairs]
        values = torch.randint(self.num_values, (batch_size, self.num_pairs), generator=generator)
        filler = torch.randint(self.num_filler, (batch_size, self.gap), generator=generator)
        asked = torch.rand(batch_size, self.num_pairs, generator=generator).argsort(1)[:, : self.num_queries]

        input_ids = torch.empty(batch_size, self.sequence_length, dtype=torch.long)
        input_ids[:, 0] = BOS_ID
        input_ids[:, 1 : 1 + pairs : 2] = self.key_offset + keys
        input_ids[:, self.pair_value_positions] = self.value_offset + values
        input_ids[:, 1 + pairs : 1 + pairs + self.gap] = self.filler_offset + filler
        start = self.first_query_position
        input_ids[:, start : start + queries : 2] = self.key_offset + keys.gather(1, asked)
        input_ids[:, start + 1 : start + queries : 2] = self.value_offset + values.gather(1, asked)
        labels = torch.full_like(input_ids, -100)
        labels[:, start + 1 :: 2] = input_ids[:, start + 1 :: 2]
        return input_ids, labels

    def check_beyond_reach(self, config: AtlasMAGConfig) -> None:
        """Refuse a task whose queries the model could answer without test-time learning."""
        if self.gap < receptive_field(config):
            raise ValueError(
                f"gap {self.gap} is within the model's receptive field without TTL ({receptive_field(config)} "
                f"tokens = {config.num_hidden_layers} layers x max(sliding_window - 1, omega_window)): the queries "
                "would not be beyond the window"
            )


def build_tokenizer(task: RecallTask) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over the task's symbols (`<pad> <unk> <bos> <eos> k0 .. v0 .. f0 ..`): text is
    space-separated symbols, e.g. "<bos> k3 v17 f2 k3"."""
    vocab = {token: index for index, token in enumerate(task.vocab)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>", bos_token="<bos>", eos_token="<eos>"
    )


# Small enough to train on a laptop CPU in minutes; the TTL chunk and Omega window are short so that the memory
# is updated several times while reading the pairs (see README, "Associative recall").
RECALL_MODEL_DEFAULTS: dict[str, Any] = dict(
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=128,
    sliding_window=4,
    memory_key_dim=16,
    memory_expansion=2,
    poly_rank=64,
    omega_window=4,
    gamma_gate_hidden_size=16,
    qk_normalizer_scale=0.05,
    # The Q-K projection's persistent term s q has to outweigh the filler keys mixed into q', or a query reads what
    # the filler wrote: at the default s = 0.1 it is ~2% of ||q'|| at initialisation.
    qk_persistent_scale=10.0,
    # At this width the default std 0.02 shrinks every linear map's output ~6x (0.02 * sqrt(64)): the memory's read,
    # five maps deep, reaches its output LayerNorm at ~1e-3, in the eps regime, and barely depends on what was
    # written, so training waited on a chance plateau for a seed-dependent number of steps. 0.07 (~0.55 / sqrt(64),
    # as 0.02 is at GPT-2's width 768) makes the pair's effect on the query's logits ~45x larger at initialisation.
    initializer_range=0.07,
    ttl_chunk_size=2,
    ttl_lr=0.1,
    memory_optimizer="gd",
    ttl_backprop_through_updates=True,
)


def recall_model_config(task: RecallTask, **overrides: Any) -> AtlasMAGConfig:
    fields = {**RECALL_MODEL_DEFAULTS, **overrides}
    return AtlasMAGConfig(
        vocab_size=task.vocab_size, pad_token_id=0, bos_token_id=BOS_ID, eos_token_id=3, **fields
    )


@dataclass
class TrainingRecipe:
    """AdamW with a linear warmup, then a constant learning rate, and a curriculum: the first `single_pair_steps`
    steps train on the task with one pair and one query (same gap). The mechanism (write a pair into the memory,
    read it back beyond the window) is learnt far sooner there and carries over to several pairs: with 2 pairs,
    250 single-pair steps then 350 on the task reached 0.45 and 0.75 recall (seeds 0, 1) where 600 steps on the
    task alone stayed near chance (0.09, 0.05).

    Training first sits on a loss plateau at chance (ln num_values). With the model's own initialisation it lasted
    a seed-dependent number of steps (some seeds never left it); with `RECALL_MODEL_DEFAULTS` every seed measured
    left it within 75-225 single-pair steps (README, "Associative recall"). `candidates > 1` trains that many models
    side by side, `slice_steps` at a time, until one of them leaves the plateau (its mean loss over a slice falls
    below `escape_fraction * ln(num_values)`) or `probe_steps` have passed, and finishes only the one with the
    lowest training loss. The choice sees training loss only, never evaluation data. `candidates=1` is a plain run.
    """

    steps: int = 800
    single_pair_steps: int = 250
    batch_size: int = 16
    learning_rate: float = 1e-2
    weight_decay: float = 0.01
    adam_betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = 20
    max_grad_norm: float = 1.0
    candidates: int = 1
    probe_steps: int = 300
    slice_steps: int = 25
    escape_fraction: float = 0.75
    seed: int = 0

    def __post_init__(self) -> None:
        check_minimum(self, 1, "steps", "batch_size", "candidates", "slice_steps")
        check_minimum(self, 0, "single_pair_steps")


class RecallTrainer:
    """One model with its optimizer and its own stream of training sequences."""

    def __init__(self, task: RecallTask, config: AtlasMAGConfig, recipe: TrainingRecipe, seed: int) -> None:
        self.task, self.recipe, self.seed = task, recipe, seed
        self.single_pair_task = replace(task, num_pairs=1, num_queries=1)
        torch.manual_seed(seed)
        self.model = AtlasMAGForCausalLM(config)
        self.model.train()
        self.optimizer = torch.optim.AdamW(
            self.model.parameters(),
            lr=recipe.learning_rate,
            betas=tuple(recipe.adam_betas),
            weight_decay=recipe.weight_decay,
        )
        self.schedule = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: min(1.0, (step + 1) / max(recipe.warmup_steps, 1))
        )
        self.data = torch.Generator().manual_seed(seed)
        self.step = 0

    def train(self, steps: int) -> float:
        """Train `steps` steps (TTL on, as at inference); returns their mean loss."""
        self.model.train()
        total = 0.0
        for _ in range(steps):
            task = self.single_pair_task if self.step < self.recipe.single_pair_steps else self.task
            input_ids, labels = task.sample(self.recipe.batch_size, self.data)
            loss = self.model(input_ids, labels=labels, ttl=True).loss
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.recipe.max_grad_norm)
            self.optimizer.step()
            self.schedule.step()
            self.step += 1
            total += loss.item()
        return total / max(steps, 1)


def train_recall(
    task: RecallTask, config: AtlasMAGConfig, recipe: TrainingRecipe
) -> tuple[AtlasMAGForCausalLM, list[dict[str, float]]]:
    """Train a model on the task by `recipe` (candidates, then the chosen one to `recipe.steps`). TTL is on during
    training; with `ttl_backprop_through_updates` the loss also shapes what the memory writes.
    Returns the model (in eval mode) and the training log: one entry per slice and candidate."""
    task.check_beyond_reach(config)
    candidates = [
        RecallTrainer(task, config, recipe, seed=recipe.seed + 1000 * index) for index in range(recipe.candidates)
    ]
    escaped = recipe.escape_fraction * math.log(task.num_values)
    history: list[dict[str, float]] = []
    started = time.perf_counter()

    def train_slice(index: int, trainer: RecallTrainer) -> float:
        loss = trainer.train(min(recipe.slice_steps, recipe.steps - trainer.step))
        history.append(
            {"candidate": index, "step": trainer.step, "loss": loss, "seconds": time.perf_counter() - started}
        )
        return loss

    active = dict(enumerate(candidates))
    while len(active) > 1:
        losses = {index: train_slice(index, trainer) for index, trainer in active.items()}
        best = min(losses, key=losses.get)
        done = next(iter(active.values())).step
        logger.info("recall step %d, candidate losses %s", done, ", ".join(f"{loss:.3f}" for loss in losses.values()))
        if losses[best] < escaped or done >= min(recipe.probe_steps, recipe.steps):
            logger.info("recall: candidate %d chosen at step %d (loss %.3f)", best, done, losses[best])
            active = {best: active[best]}
    index, chosen = next(iter(active.items()))
    while chosen.step < recipe.steps:
        loss = train_slice(index, chosen)
        if chosen.step % 100 == 0 or chosen.step == recipe.steps:
            logger.info(
                "recall seed %d step %d/%d loss %.4f (%.0fs)",
                recipe.seed, chosen.step, recipe.steps, loss, history[-1]["seconds"],
            )
    return chosen.model.eval(), history


@torch.inference_mode()
def predicted_next_tokens(
    model: PreTrainedModel, input_ids: torch.Tensor, condition: str, batch_size: int = 256
) -> torch.Tensor:
    """The greedy prediction (argmax over the whole vocabulary) after every position [N, L], on the CPU, under
    `condition`, `batch_size` sequences per forward."""
    switches = condition_switches(condition)
    model.eval()
    device = next(model.parameters()).device
    batches = [
        model(input_ids[start : start + batch_size].to(device), use_cache=False, **switches).logits.argmax(-1).cpu()
        for start in range(0, input_ids.shape[0], batch_size)
    ]
    return torch.cat(batches)


def recall_accuracy(
    model: PreTrainedModel, input_ids: torch.Tensor, labels: torch.Tensor, condition: str, batch_size: int = 256
) -> float:
    """Fraction of queried values predicted (argmax over the whole vocabulary) under `condition`."""
    predicted = predicted_next_tokens(model, input_ids, condition, batch_size)[:, :-1]
    targets = labels[:, 1:]
    scored = targets != -100
    return (predicted[scored] == targets[scored]).sum().item() / scored.sum().item()


def evaluate_recall(
    model: PreTrainedModel,
    task: RecallTask,
    num_sequences: int = 256,
    seed: int = EVAL_SEED,
    conditions: Sequence[str] = CONDITIONS,
) -> dict[str, float]:
    """Accuracy per condition on `num_sequences` fresh sequences (the same ones for every condition)."""
    input_ids, labels = task.sample(num_sequences, torch.Generator().manual_seed(seed))
    accuracy = {condition: recall_accuracy(model, input_ids, labels, condition) for condition in conditions}
    accuracy["chance"] = task.chance
    return accuracy


def recall_by_query(
    model: PreTrainedModel,
    task: RecallTask,
    num_sequences: int = 256,
    seed: int = EVAL_SEED,
    condition: str = "ttl_on",
) -> list[dict[str, float]]:
    """For each query, in the order asked: the fraction answered with its own value (`right`) and the fraction
    answered with the value of a pair it did not ask for (`other_pair`). A memory that holds the pairs' values but
    not which key each belongs to answers the first query with one of them at random (`right` ~ 1 / num_pairs, the
    rest `other_pair`) and the later ones by elimination."""
    input_ids, _ = task.sample(num_sequences, torch.Generator().manual_seed(seed))
    predicted = predicted_next_tokens(model, input_ids, condition)
    pair_values = input_ids[:, task.pair_value_positions]
    breakdown = []
    for query in range(task.num_queries):
        key_position = task.first_query_position + 2 * query
        answer = predicted[:, key_position]
        right = answer == input_ids[:, key_position + 1]
        other_pair = (answer[:, None] == pair_values).any(1) & ~right
        breakdown.append({"right": right.float().mean().item(), "other_pair": other_pair.float().mean().item()})
    return breakdown


def mean_and_std(values: Sequence[float]) -> dict[str, float]:
    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "min": min(values),
        "max": max(values),
    }


def binomial_std(probability: float, trials: int) -> float:
    """Standard deviation of an accuracy measured on `trials` independent queries."""
    return math.sqrt(probability * (1.0 - probability) / trials)


def _train_and_evaluate(
    task: RecallTask, config: AtlasMAGConfig, recipe: TrainingRecipe, eval_sequences: int, eval_gaps: Sequence[int]
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """One seed of `recall_experiment`: train, evaluate; returns the run's summary and the trained weights."""
    model, history = train_recall(task, config, recipe)
    run: dict[str, Any] = {
        "seed": recipe.seed,
        "accuracy": evaluate_recall(model, task, eval_sequences),
        "by_query": recall_by_query(model, task, eval_sequences),
        "chosen_candidate": int(history[-1]["candidate"]),
        "history": history,
    }
    if eval_gaps:
        run["by_gap"] = {
            str(gap): evaluate_recall(model, replace(task, gap=gap), eval_sequences, conditions=TTL_SETTINGS)
            for gap in eval_gaps
        }
    logger.info("seed %d: %s", recipe.seed, {key: round(value, 3) for key, value in run["accuracy"].items()})
    return run, model.state_dict()


def _worker_setup() -> None:
    # One thread per worker: the workers are the parallelism (training is bitwise the same with 1 or 2 threads).
    torch.set_num_threads(1)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")


def recall_experiment(
    task: RecallTask,
    config: AtlasMAGConfig,
    recipe: TrainingRecipe,
    seeds: Sequence[int] = (0, 1, 2),
    eval_sequences: int = 256,
    eval_gaps: Sequence[int] = (),
    workers: int = 1,
) -> tuple[dict[str, Any], list[AtlasMAGForCausalLM]]:
    """Train one model per seed and evaluate each with TTL on, off and the memory gate removed (and, for every gap
    in `eval_gaps`, with the queries that far from the pairs). `workers > 1` trains seeds in parallel processes.
    Returns a JSON-ready summary and the models."""
    task.check_beyond_reach(config)
    jobs = [(task, config, replace(recipe, seed=seed), eval_sequences, list(eval_gaps)) for seed in seeds]
    if workers > 1 and len(jobs) > 1:
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(min(workers, len(jobs)), mp_context=context, initializer=_worker_setup) as pool:
            results = list(pool.map(_train_and_evaluate, *zip(*jobs, strict=True)))
    else:
        results = [_train_and_evaluate(*job) for job in jobs]
    runs, trained = [], []
    for run, state in results:
        model = AtlasMAGForCausalLM(config)
        model.load_state_dict(state)
        runs.append(run)
        trained.append(model.eval())
    summary = {
        condition: mean_and_std([run["accuracy"][condition] for run in runs]) for condition in CONDITIONS
    }
    queries = eval_sequences * task.num_queries
    return {
        "task": asdict(task),
        "receptive_field_without_ttl": receptive_field(config),
        "model_config": {key: getattr(config, key) for key in ("vocab_size", *RECALL_MODEL_DEFAULTS)},
        "num_parameters": sum(p.numel() for p in trained[0].parameters()),
        "recipe": asdict(recipe),
        "seeds": list(seeds),
        "eval_queries_per_seed": queries,
        "chance": task.chance,
        "chance_binomial_std": binomial_std(task.chance, queries),
        "summary": summary,
        "eval_gaps": list(eval_gaps),
        "runs": runs,
    }, trained
