"""lmforge: one hackable toolkit for the foundation-model lifecycle."""

from lmforge.models import Config, Transformer, generate, load_model, save_model

__version__ = "0.1.0"


def load_tokenizer(path):  # noqa: ANN001, ANN201 - thin re-export, see lmforge.data.tokenizer
    from lmforge.data.tokenizer import load_tokenizer as _load

    return _load(path)


__all__ = ["Config", "Transformer", "load_model", "save_model", "load_tokenizer", "generate", "__version__"]
