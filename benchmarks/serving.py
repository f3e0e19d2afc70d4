"""HMAT serving and training speed (Sec. 3.4.2): one-pass ranking vs a per-candidate loop, anchor KV
cache append vs full recomputation and its size, training tokens/s with the MA mask, and (on CUDA)
FlexAttention vs dense-mask SDPA. Writes ``benchmarks/results/serving.json``.

The per-candidate loop costs the same for every candidate (one forward over history + candidate),
so for large ``C`` it is timed on ``--loop-limit`` candidates and scaled to ``C`` (flagged in the JSON);
it runs once after a one-candidate warm-up (every other time is the best of ``--repeats``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch

if __package__ in (None, ""):  # run as a script (the GPU machine has no venv): the repository's modules
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.environment import cpu_model, git_commit
from hisam_core.ranker.model import HMAT, HMATConfig
from hisam_core.ranker.objectives import sft_loss
from hisam_core.ranker.sequence import SequenceBuilder, SequenceConfig, UserHistory
from hisam_core.ranker.serving import HMATRanker, rank_reference
from hisam_core.ranker.synthetic import random_semantic_ids, synthetic_histories
from pipelines.settings import positive_int_arg

logger = logging.getLogger("benchmarks.serving")

PROFILE_FIELDS = {"age": 8, "gender": 3, "region": 64, "device": 4}


def timed(
    fn: Callable[[], Any], repeats: int, device: torch.device, warm_up: bool = True
) -> tuple[float, Any]:
    """Best wall time in ms over ``repeats`` calls (after one warm-up call) and the last result."""
    result = fn() if warm_up else None
    best = float("inf")
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        result = fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best * 1e3, result


def bench_ranking(
    ranker: HMATRanker,
    history: UserHistory,
    items: np.ndarray,
    sizes: list[int],
    loop_limit: int,
    repeats: int,
    device: torch.device,
) -> list[dict[str, Any]]:
    rows = []
    for size in sizes:
        candidates = items[:size]
        one_pass_ms, scores = timed(lambda c=candidates: ranker.rank(history, c), repeats, device)
        looped = candidates[: min(size, loop_limit)]

        def loop(c: np.ndarray = looped) -> torch.Tensor:
            config = ranker.builder.config
            return torch.cat(
                [rank_reference(ranker.model, config, history, c[i : i + 1]) for i in range(len(c))]
            )

        logger.info("per-candidate loop over %d candidates", len(looped))
        loop(looped[:1])  # warm-up, as timed() does for the one-pass
        loop_ms, reference = timed(loop, 1, device, warm_up=False)
        loop_ms *= size / len(looped)
        diff = float((scores[: len(looped)] - reference).abs().max())
        rows.append(
            {
                "candidates": size,
                "one_pass_ms": round(one_pass_ms, 2),
                "per_candidate_loop_ms": round(loop_ms, 2),
                "loop_timed_candidates": len(looped),
                "loop_extrapolated": len(looped) < size,
                "speedup": round(loop_ms / one_pass_ms, 2),
                "max_abs_score_diff": diff,
            }
        )
        logger.info("ranking %s", rows[-1])
    return rows


def bench_cache(
    ranker: HMATRanker, history: UserHistory, new_item: np.ndarray, repeats: int, device: torch.device
) -> dict[str, Any]:
    """Appending one interaction to the cache of ``history`` vs encoding the grown history again.
    ``history`` must leave room for the new item: a full one would make the append re-encode."""
    if len(history) + 1 > ranker.builder.max_items(with_candidate=True):
        raise ValueError(
            f"a history of {len(history)} items leaves no room to append within the budget "
            f"({ranker.builder.max_items(with_candidate=True)} items): the append would re-encode"
        )
    full_cache = ranker.encode(history, evict=False)
    cache = ranker.encode(history)
    recompute_ms, _ = timed(lambda: ranker.encode(history.append(new_item, 1)), repeats, device)
    append_ms, _ = timed(lambda: ranker.append(cache, new_item, 1), repeats, device)
    candidates = np.stack([new_item] * 4)
    grown = ranker.append(cache, new_item, 1)
    diff = float(
        (ranker.rank(grown, candidates) - ranker.rank(history.append(new_item, 1), candidates)).abs().max()
    )
    return {
        "history_items": cache.num_items,
        "history_tokens": cache.length,
        "append_ms": round(append_ms, 2),
        "full_recompute_ms": round(recompute_ms, 2),
        "append_speedup": round(recompute_ms / append_ms, 2),
        "append_vs_recompute_max_abs_score_diff": diff,
        "anchor_cache_tokens": cache.num_cached,
        "full_cache_tokens": full_cache.num_cached,
        "anchor_cache_bytes": cache.nbytes,
        "full_cache_bytes": full_cache.nbytes,
        "compression": round(full_cache.nbytes / cache.nbytes, 2),
        "tokens_per_item": ranker.builder.config.item_length,
    }


def bench_training(
    model: HMAT, builder: SequenceBuilder, histories: list[UserHistory], steps: int, device: torch.device
) -> dict[str, Any]:
    batch = builder.batch(histories).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model.train()

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        sft_loss(model, batch, builder.vocab).backward()
        optimizer.step()

    step_ms, _ = timed(step, steps, device)
    model.eval()
    return {
        "batch_users": len(histories),
        "batch_tokens": batch.num_tokens,
        "step_ms": round(step_ms, 2),
        "tokens_per_s": round(batch.num_tokens / step_ms * 1e3, 1),
        "mask": model.config.attention_mask,
        "backend": "flex" if model.config.attention_backend == "flex" else "sdpa",
    }


def bench_flex_vs_sdpa(config: HMATConfig, tokens: int, batch_tokens: int, repeats: int) -> dict[str, Any]:
    """CUDA only: the same weights under the MA mask with compiled FlexAttention vs dense-mask SDPA
    on histories of ``tokens`` tokens: mask build, forward, and an SFT training step (forward +
    backward), in fp32 and under the bf16 autocast training uses, with the peak memory of each and
    the largest hidden-state difference to the fp32 reference."""
    device = torch.device("cuda")
    torch._dynamo.reset()  # each length compiles afresh, as in its own process
    items = (tokens - len(PROFILE_FIELDS)) // 8
    sequence = SequenceConfig(profile_fields=PROFILE_FIELDS, max_tokens=len(PROFILE_FIELDS) + 8 * items + 7)
    builder = SequenceBuilder(sequence)
    catalogue = random_semantic_ids(20000, sequence, seed=0)
    users = max(1, batch_tokens // tokens)
    batch = builder.batch(synthetic_histories(catalogue, sequence, users, items, items, seed=3)).to(device)
    torch.manual_seed(0)
    sdpa = HMAT(config.model_copy(update={"attention_backend": "sdpa"}), builder.vocab.size).to(device)
    flex = HMAT(config.model_copy(update={"attention_backend": "flex"}), builder.vocab.size).to(device)
    flex.load_state_dict(sdpa.state_dict())
    row: dict[str, Any] = {
        "history_tokens": batch.tokens.shape[1],
        "users": users,
        "batch_tokens": batch.num_tokens,
    }
    hidden = {}
    variants = (
        ("sdpa", sdpa, False),
        ("sdpa_bf16", sdpa, True),
        ("flex", flex, False),
        ("flex_bf16", flex, True),
    )
    for name, model, bf16 in variants:  # peaks above what is allocated before each (weights, batch)
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
            mask_ms, mask = timed(lambda m=model: m.mask(batch, "memory_anchor"), repeats, device)
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            forward_ms, out = timed(lambda m=model, k=mask: m(batch, k).hidden, repeats, device)
            forward_peak = torch.cuda.max_memory_allocated() - base
            hidden[name] = out.float().cpu()  # off the GPU: it must not count in the next peaks
            del out, mask

        def step(m: HMAT = model, bf16: bool = bf16) -> None:
            m.zero_grad(set_to_none=True)
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
                loss = sft_loss(m, batch, builder.vocab)
            loss.backward()

        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step_ms, _ = timed(step, repeats, device)
        train_peak = torch.cuda.max_memory_allocated() - base
        model.zero_grad(set_to_none=True)  # its gradients must not count in the next variant's peaks
        row |= {
            f"{name}_mask_ms": round(mask_ms, 3),
            f"{name}_forward_ms": round(forward_ms, 3),
            f"{name}_train_step_ms": round(step_ms, 3),
            f"{name}_train_tokens_per_s": round(batch.num_tokens / step_ms * 1e3),
            f"{name}_forward_peak_mib": round(forward_peak / 2**20),
            f"{name}_train_peak_mib": round(train_peak / 2**20),
        }
    for precision in ("", "_bf16"):
        row[f"forward_speedup{precision}"] = round(
            row[f"sdpa{precision}_forward_ms"] / row[f"flex{precision}_forward_ms"], 2
        )
        row[f"train_step_speedup{precision}"] = round(
            row[f"sdpa{precision}_train_step_ms"] / row[f"flex{precision}_train_step_ms"], 2
        )
    valid = batch.valid.cpu()
    row["max_abs_hidden_diff"] = float((hidden["flex"] - hidden["sdpa"])[valid].abs().max())
    row["bf16_max_abs_hidden_diff"] = float((hidden["flex_bf16"].float() - hidden["sdpa"])[valid].abs().max())
    logger.info("flex vs sdpa %s", row)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--history-tokens", type=positive_int_arg, default=300, help="tokens of the encoded history"
    )
    parser.add_argument("--candidates", type=positive_int_arg, nargs="+", default=[10, 100, 500])
    parser.add_argument(
        "--loop-limit", type=positive_int_arg, default=100, help="candidates timed in the per-candidate loop"
    )
    parser.add_argument("--repeats", type=positive_int_arg, default=3)
    parser.add_argument(
        "--train-users", type=positive_int_arg, default=2, help="users (of ~history-tokens) per training step"
    )
    parser.add_argument(
        "--flex-tokens",
        type=int,
        nargs="+",
        default=[300, 1000, 3000],
        help="history lengths of the CUDA FlexAttention vs SDPA comparison",
    )
    parser.add_argument(
        "--flex-batch-tokens", type=int, default=16384, help="tokens per batch in that comparison"
    )
    parser.add_argument(
        "--threads", type=positive_int_arg, default=None, help="torch intra-op threads (default: torch's)"
    )
    parser.add_argument("--output", type=Path, default=Path(__file__).parent / "results" / "serving.json")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    profile_length = len(PROFILE_FIELDS)
    items_in_history = (args.history_tokens - profile_length) // 8
    sequence = SequenceConfig(
        profile_fields=PROFILE_FIELDS, max_tokens=profile_length + 8 * items_in_history + 7
    )
    builder = SequenceBuilder(sequence)
    config = HMATConfig()
    torch.manual_seed(0)
    model = HMAT(config, builder.vocab.size).to(device).eval()
    catalogue = random_semantic_ids(20000, sequence, seed=0)
    rng = np.random.default_rng(0)
    history = synthetic_histories(catalogue, sequence, 1, items_in_history, items_in_history, seed=1)[0]
    candidates = catalogue.codes[
        rng.choice(len(catalogue.item_ids), size=max(args.candidates), replace=False)
    ]
    ranker = HMATRanker(model, sequence)
    load_before = os.getloadavg()

    started = time.perf_counter()
    results: dict[str, Any] = {
        "timestamp": datetime.now(UTC).isoformat(timespec="seconds"),
        "git_commit": git_commit(),
        "device": str(device),
        "gpu": torch.cuda.get_device_name() if device.type == "cuda" else None,
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "model": config.model_dump(),
        "sequence": sequence.model_dump(),
        "ranking": bench_ranking(
            ranker, history, candidates, args.candidates, args.loop_limit, args.repeats, device
        ),
        "kv_cache": bench_cache(  # one item short of the budget: the append fits without re-encoding
            ranker,
            history.tail(builder.max_items(with_candidate=True) - 1),
            candidates[0],
            args.repeats,
            device,
        ),
    }
    train_users = synthetic_histories(
        catalogue, sequence, args.train_users, items_in_history, items_in_history, seed=2
    )
    results["training"] = bench_training(model, builder, train_users, args.repeats, device)
    results["flex_vs_sdpa"] = None
    if device.type == "cuda":
        results["flex_vs_sdpa"] = []
        for tokens in args.flex_tokens:
            results["flex_vs_sdpa"].append(
                bench_flex_vs_sdpa(config, tokens, args.flex_batch_tokens, args.repeats)
            )
            torch.cuda.empty_cache()
    results["load_average"] = {"before": load_before, "after": os.getloadavg()}
    results["wall_s"] = round(time.perf_counter() - started, 1)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(results, indent=2))
    logger.info("wrote %s in %.0f s", args.output, results["wall_s"])


if __name__ == "__main__":
    main()
