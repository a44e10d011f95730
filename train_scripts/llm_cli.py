"""``seed llm train``: the DeepSpeed LLM recipe (train_scripts/train_llm.py) from the command line.

The ``seed llm`` group is shared with ``llm_adapters`` (``seed llm merge``); whichever registers
first creates it (``llm_adapters.cli.llm_group``).
"""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    from llm_adapters.cli import llm_group
    from train_scripts.train_llm import LLMTrainConfig

    group = llm_group(sub)
    p = group.add_parser("train", help="train the multimodal LLM (DeepSpeed; full or LoRA) on pairs, documents, chats",
                         description="Interleaved text–image next-token training under DeepSpeed; see "
                                     "train_scripts/train_llm.py. Two processes: deepspeed --num_gpus 2 -m "
                                     "train_scripts.train_llm … (or torchrun --nproc_per_node 2).")
    LLMTrainConfig.add_arguments(p)
    # `deepspeed $(which seed) llm train …` appends --local_rank=N (LOCAL_RANK carries the same).
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    p.set_defaults(func=_train)


def _train(args: argparse.Namespace) -> int:
    import os

    from train_scripts.train_llm import LLMTrainConfig, train_llm

    metrics = train_llm(LLMTrainConfig.from_cli(args))
    if metrics and os.environ.get("RANK", "0") == "0":
        width = max(len(k) for k in metrics)
        for k, v in metrics.items():
            print(f"{k:<{width}}  {v:.4f}")
    return 0
