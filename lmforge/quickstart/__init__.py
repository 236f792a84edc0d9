"""The quickstarts: the whole lifecycle on a laptop CPU, nothing downloaded.

* ``lmforge quickstart`` (``pretrain_sft``): tokenizer, pretraining, SFT, evaluation, an HF checkpoint;
* ``lmforge quickstart-align`` (``align``): GRPO, PPO and DPO from that SFT model, on held-out problems.

The top of the package graph: a quickstart may use every stage; no stage imports a quickstart.
"""

from lmforge.quickstart.pretrain_sft import accuracy_by_skill, answer_accuracy, greedy_answers, stdlib_corpus

__all__ = ["accuracy_by_skill", "answer_accuracy", "greedy_answers", "stdlib_corpus"]
