"""``lmforge dpo``: preference optimisation (DPO, cDPO, IPO, SimPO) with the training engine."""

from __future__ import annotations

import argparse

from lmforge.cli import command
from lmforge.train.cli import _train_args


@command("dpo", "preference optimisation on prompt/chosen/rejected JSONL (DPO, IPO, SimPO, cDPO)")(_train_args)
def dpo_cmd(args: argparse.Namespace) -> int:
    from lmforge.align.dpo import preference_accuracy
    from lmforge.train.cli import _run

    def report(trainer, when: str) -> None:
        if trainer.data.val is not None and trainer.dist.main:
            acc = preference_accuracy(trainer, trainer.data.val, trainer.objective)
            print(f"held-out preference accuracy {when}: {acc['accuracy']:.1%} (mean reward margin {acc['margin']:+.3f})")

    return _run("dpo", args, before=lambda t: report(t, "before"), after=lambda t: report(t, "after"))
