"""``ClosedFormErasure``: apply UCE or MACE's closed-form refinement to a module's UNet once, at setup.

The edit (:mod:`lightning_zobi.unlearn.closed_form`) needs no training, so the callback runs it in
``setup`` — before the first ``validate``/``fit`` batch — on the module's text-conditioned UNet
(``pl_module.student`` by default, e.g. ``DiffusionModule(stable_diffusion=...)``), reading the
module's ``text_encoder`` and ``tokenizer``. ``zobi validate`` then scores the edited model;
``zobi fit`` fine-tunes from it. It runs once per callback instance; when a fit resumes from a
checkpoint, the restored weights (which already hold the edit) overwrite the fresh edit.

Memory: see :mod:`lightning_zobi.unlearn.closed_form` (two ``d_in²`` float64 matrices per layer).
"""

from __future__ import annotations

from typing import Any, Literal

import lightning.pytorch as pl

from lightning_zobi.unlearn.closed_form import mace_refine_, uce_erase_


class ClosedFormErasure(pl.Callback):
    """Erase concepts from the cross-attention K/V projections in closed form (UCE or MACE-CFR).

    Args:
        method: ``"uce"`` (arXiv 2308.14761) or ``"mace"`` (MACE's closed-form refinement, arXiv
            2403.06381, without its LoRA stage).
        concepts: prompts to erase (UCE: edit concepts; MACE: prompts containing the concept).
        guides: UCE — one guide prompt per concept or one for all (``""`` = unconditional);
            MACE — one mapping prompt per concept prompt (the concept replaced or removed).
        preserve: prompts whose projections must not move (UCE: last tokens; MACE: every token).
        erase_scale / preserve_scale: α and β of the closed form (UCE's defaults 1, 1).
        lamb: λ; None = the method's published default (UCE 0.5, MACE 1e3).
        all_words: MACE only — map every token position (MACE's ``all_words`` option).
        unet_attr / text_encoder_attr / tokenizer_attr: where the module keeps them.
    """

    def __init__(
        self,
        method: Literal["uce", "mace"] = "uce",
        concepts: list[str] | None = None,
        guides: list[str] | str = "",
        preserve: list[str] | None = None,
        erase_scale: float = 1.0,
        preserve_scale: float = 1.0,
        lamb: float | None = None,
        all_words: bool = False,
        unet_attr: str = "student",
        text_encoder_attr: str = "text_encoder",
        tokenizer_attr: str = "tokenizer",
    ) -> None:
        if method not in ("uce", "mace"):
            raise ValueError(f"method={method!r} is invalid: use 'uce' or 'mace'.")
        if not concepts:
            raise ValueError(
                "concepts is empty: name at least one prompt to erase, e.g. ['a handwritten digit three']."
            )
        if method == "mace" and (isinstance(guides, str) or len(guides) != len(concepts)):
            raise ValueError(
                f"method='mace' needs one mapping prompt per concept prompt in guides ({len(concepts)} concepts, "
                f"guides={guides!r}), e.g. 'a handwritten digit' for 'a handwritten digit three'."
            )
        self.method = method
        self.concepts = list(concepts)
        self.guides = guides
        self.preserve = list(preserve or [])
        self.erase_scale, self.preserve_scale = erase_scale, preserve_scale
        self.lamb = lamb if lamb is not None else (0.5 if method == "uce" else 1e3)
        self.all_words = all_words
        self.attrs = (unet_attr, text_encoder_attr, tokenizer_attr)
        self.done = False
        self.report: dict[str, Any] | None = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Apply the edit (once) before any batch runs."""
        if self.done:
            return
        unet_attr, text_attr, tok_attr = self.attrs
        missing = [a for a in self.attrs if getattr(pl_module, a, None) is None]
        if missing:
            raise ValueError(
                f"{type(pl_module).__name__} has no {missing}: ClosedFormErasure needs a text-conditioned module, "
                "e.g. DiffusionModule(stable_diffusion='tiny' or a local SD folder)."
            )
        unet, text, tok = (getattr(pl_module, a) for a in self.attrs)
        if self.method == "uce":
            report = uce_erase_(
                unet,
                text,
                tok,
                self.concepts,
                self.guides,
                self.preserve,
                erase_scale=self.erase_scale,
                preserve_scale=self.preserve_scale,
                lamb=self.lamb,
            )
        else:
            report = mace_refine_(
                unet,
                text,
                tok,
                self.concepts,
                list(self.guides),
                self.preserve,
                preserve_scale=self.preserve_scale,
                lamb=self.lamb,
                all_words=self.all_words,
            )
        self.report = {
            "method": report.method,
            "layers": len(report.layers),
            "erase_rows": report.erase_rows,
            "preserve_rows": report.preserve_rows,
            "lamb": self.lamb,
        }
        self.done = True

    def state_dict(self) -> dict[str, Any]:
        """Whether the edit ran and what it did."""
        return {"done": self.done, "report": self.report}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        self.done = bool(state_dict.get("done", False))
        self.report = state_dict.get("report")
