"""MethodSpec: what a run trains, read from the three objects that configure it.

A method is spread over the module (``model.coef_*``, ``model.loss_type``, the bonus), the
data (``data.mix_*``: the routes of each epoch) and the online loop
(``PairGenerationCallback``: the pair mode and the labeller). Each is valid alone; this
checks that they agree, once, before any model is built, and names the method.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from sail_lightning.callbacks import PairGenerationCallback
from sail_lightning.common import SFT
from sail_lightning.interfaces import Labeller
from sail_lightning.objectives.losses import get_loss
from sail_lightning.objectives.options import LossOptions
from sail_lightning.pair_modes import PairMode, get_pair_mode, pair_mode_names

_MODEL_FIELDS = ("coef_dp", "coef_pp", "coef_pr", "loss_type", "bonus_alpha", "bonus_form")
_DATA_FIELDS = ("mix_dp", "mix_pp", "mix_pr")


@dataclass(frozen=True)
class MethodSpec:
    """The method of a run.

    Attributes:
        mix_dp, mix_pp, mix_pr: the routes' shares of an epoch (``data.mix_*``).
        coef_dp, coef_pp, coef_pr: the SAIL terms' weights (``model.coef_*``).
        loss_type: the DPO term's form (``model.loss_type``).
        bonus_alpha, bonus_form: the exploration bonus (``model.bonus_*``).
        pair_mode: ``PairGenerationCallback.pair_mode``; None without that callback.
        labeller: the class name of the labeller of online pairs (the callback's, else
            ``data.oracle``); None without one.
        labeller_scores: whether that labeller has scores (``best_worst`` and ``selm`` rank
            candidates by score).
        update_reference: ``PairGenerationCallback.update_reference``.
    """

    mix_dp: float = 0.0
    mix_pp: float = 0.0
    mix_pr: float = 0.0
    coef_dp: float = 0.0
    coef_pp: float = 0.0
    coef_pr: float = 0.0
    loss_type: str = "sigmoid"
    bonus_alpha: float = 0.0
    bonus_form: str = "selm"
    pair_mode: str | None = None
    labeller: str | None = None
    labeller_scores: bool = False
    update_reference: bool = False

    @classmethod
    def from_options(cls, model: LossOptions | Mapping[str, Any], data: Mapping[str, Any],
                     generation: Mapping[str, Any] | None, labeller: Any = None) -> MethodSpec:
        """The spec of ``SAILModule``'s objective options ``model`` (its ``loss_options``, or
        its ``model.*`` options as a mapping), ``PreferenceDataModule``'s ``data``
        and ``PairGenerationCallback``'s ``generation`` (None without that callback), whose
        online pairs ``labeller`` labels (an object, or a class name)."""
        if isinstance(model, LossOptions):
            model = dataclasses.asdict(model)
        fields = {k: model[k] for k in _MODEL_FIELDS if model.get(k) is not None}
        fields.update({k: data[k] for k in _DATA_FIELDS if data.get(k) is not None})
        gen = dict(generation or {})
        name = labeller if isinstance(labeller, str) or labeller is None else (
            type(labeller).__name__)
        scores = isinstance(labeller, Labeller) and type(labeller).score is not Labeller.score
        return cls(**fields, pair_mode=gen.get("pair_mode", "two_samples") if generation is not
                   None else None, labeller=name, labeller_scores=scores,
                   update_reference=bool(gen.get("update_reference", False)))

    @classmethod
    def from_trainer(cls, trainer: Any) -> MethodSpec:
        """Reads the spec from a trainer's LightningModule, DataModule and callbacks."""
        dm = trainer.datamodule
        gen = next((c for c in trainer.callbacks if isinstance(c, PairGenerationCallback)), None)
        labeller = None
        if gen is not None:
            labeller = gen.labeller if gen.labeller is not None else getattr(dm, "oracle", None)
        options = None if gen is None else {"pair_mode": gen.pair_mode,
                                            "update_reference": gen.update_reference}
        return cls.from_options(trainer.lightning_module.loss_options,
                                dict(getattr(dm, "hparams", {}) or {}), options, labeller)

    @property
    def online(self) -> bool:
        return self.mix_pp + self.mix_pr > 0

    @property
    def name(self) -> str:
        """A short name for run folders and logs: ``sft``, ``dpo``, ``sail_pr``,
        ``sail_dp+sail_pp``..."""
        if self.loss_type == SFT:
            return "sft"
        if not self.online:
            offline = "dpo" if self.loss_type == "sigmoid" else self.loss_type
            name = "sail_dp" if self.mix_dp > 0 else offline
            return f"{name}_ref_updates" if self.update_reference else name
        if self.pair_mode is not None and get_pair_mode(self.pair_mode).method is not None:
            return get_pair_mode(self.pair_mode).method
        parts = [name for name, on in (("sail_dp", self.mix_dp > 0), ("sail_pp", self.mix_pp > 0),
                                       ("sail_pr" if self.coef_pr > 0 else "online_dpo",
                                        self.mix_pr > 0)) if on]
        return "+".join(parts)

    def conflicts(self) -> list[str]:
        """Every disagreement between the options, each naming the options involved."""
        out = []
        gen = "PairGenerationCallback"
        if self.loss_type == SFT and (self.mix_dp or self.online or self.pair_mode
                                        or self.bonus_alpha):
            out.append(f"model.loss_type=sft trains on the chosen responses of offline pairs "
                       f"alone: set data.mix_dp, data.mix_pp, data.mix_pr and "
                       f"model.bonus_alpha to 0 and remove {gen} (got mix_dp={self.mix_dp}, "
                       f"mix_pp={self.mix_pp}, mix_pr={self.mix_pr}, pair_mode="
                       f"{self.pair_mode!r}, bonus_alpha={self.bonus_alpha})")
            return out
        if self.online and self.pair_mode is None:
            out.append(f"data.mix_pp={self.mix_pp} / data.mix_pr={self.mix_pr} train on online "
                       f"pairs, which sail_lightning.callbacks.{gen} generates: add it to "
                       "trainer.callbacks (configs/method/*.yaml do)")
        if self.pair_mode is not None and not self.online and not self.update_reference:
            out.append(f"{gen} is set but data.mix_pp = data.mix_pr = 0: no epoch trains on "
                       "its pairs (and it does not update the reference); remove it or set "
                       "data.mix_pp / data.mix_pr")
        for route in ("dp", "pp", "pr"):
            coef, mix = getattr(self, f"coef_{route}"), getattr(self, f"mix_{route}")
            if coef > 0 and mix == 0:
                out.append(f"model.coef_{route}={coef} weighs SAIL-{route.upper()} examples, but "
                           f"data.mix_{route}=0 routes none to SAIL-{route.upper()}")
        mode = get_pair_mode(self.pair_mode) if self.pair_mode is not None else None
        fields = () if self.loss_type == SFT else get_loss(self.loss_type).fields
        if mode is not None and not mode.policy_labels and self.mix_pp > 0:
            out.append(f"data.mix_pp={self.mix_pp}: SAIL-PP pairs are labelled by the policy, "
                       f"which only {gen}.pair_mode={_modes('policy_labels')} does (got "
                       f"{self.pair_mode!r})")
        if mode is not None and not mode.response_term:
            for route in ("pp", "pr"):
                coef = getattr(self, f"coef_{route}")
                if coef > 0:
                    out.append(f"model.coef_{route}={coef}: the response term is derived for "
                               f"two samples of the policy per prompt, "
                               f"{gen}.pair_mode={_modes('response_term')} (got "
                               f"{self.pair_mode!r})")
        made = mode.pair_fields if mode is not None else ()
        if not set(fields) <= set(made):
            makers = " or ".join(m.name for m in _all_modes() if set(fields) <= set(
                m.pair_fields))
            out.append(f"model.loss_type={self.loss_type!r} with {gen}.pair_mode="
                       f"{self.pair_mode!r}: the loss reads the per-pair fields "
                       f"{', '.join(fields)} that only pair_mode={makers} makes; use "
                       "both or neither")
        if mode is not None and mode.loss_types is not None and \
                self.loss_type not in mode.loss_types:
            out.append(f"model.loss_type={self.loss_type!r} with {gen}.pair_mode="
                       f"{self.pair_mode!r}: that mode trains model.loss_type="
                       f"{' or '.join(mode.loss_types)}")
        if fields and (self.mix_dp > 0 or self.mix_pp > 0):
            out.append(f"model.loss_type={self.loss_type!r} with data.mix_dp={self.mix_dp} / "
                       f"data.mix_pp={self.mix_pp}: the loss reads per-pair fields that "
                       "offline and SAIL-PP pairs lack; it trains on its own pairs "
                       "(data.mix_pr) alone")
        if mode is not None and mode.needs_labeller and self.mix_pr > 0 and \
                self.labeller is None:
            out.append(f"data.mix_pr={self.mix_pr}: online pairs need a labeller: set "
                       f"{gen}.labeller (a reward model, judge, ranker or callable) or "
                       "data.oracle (the task's ground truth)")
        if mode is not None and mode.needs_scores and self.labeller is not None \
                and not self.labeller_scores:
            out.append(f"{gen}.pair_mode={self.pair_mode} ranks candidates by score, and "
                       f"{self.labeller} has none: use a scoring labeller")
        if self.bonus_alpha > 0:
            if mode is None or mode.bonus_form is None:
                out.append(f"model.bonus_alpha={self.bonus_alpha}: only {gen}.pair_mode="
                           f"{_modes('bonus_form')} makes bonus responses (got "
                           f"{self.pair_mode!r})")
            elif self.bonus_form != mode.bonus_form:
                out.append(f"model.bonus_form={self.bonus_form!r} with {gen}.pair_mode="
                           f"{self.pair_mode!r}: use the bonus of that method, "
                           f"model.bonus_form={mode.bonus_form!r}")
        if mode is not None:
            out.extend(mode.conflicts(self))
        return out

    def check(self) -> None:
        """Raises ``ValueError`` listing every conflict (see :meth:`conflicts`)."""
        if problems := self.conflicts():
            raise ValueError("the method's options disagree:\n  - " + "\n  - ".join(problems))


def _all_modes() -> list[PairMode]:
    return [get_pair_mode(name) for name in pair_mode_names()]


def _modes(rule: str) -> str:
    """The registered modes with the rule ``rule`` (a ``PairMode`` attribute), for messages."""
    return " or ".join(m.name for m in _all_modes() if getattr(m, rule))
