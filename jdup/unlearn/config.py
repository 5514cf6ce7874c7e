"""In-memory unlearning settings: every knob of the algorithm (objective, LoRA, optimiser, batches, stop rule,
projection, seed), without paths. The ``jdup unlearn`` stage's :class:`jdup.stages.unlearn.UnlearnConfig` extends
it with the files (model, data, out, detection) and the built-in detection's settings; every key is a YAML/CLI key
of the ``unlearn`` section."""

from __future__ import annotations

import dataclasses

from jdup import losses
from jdup.errors import Invalid, check, check_one_of, check_range
from jdup.projection import PROJECTIONS, ProjectionOptions

EARLY_STOP = ("none", "proxy", "oracle_dev_poison")


@dataclasses.dataclass(frozen=True)
class UnlearnSettings:
    """Settings of the unlearning algorithm. Defaults follow the official DUP code (spec §4.2) except
    ``lambda_asr``."""

    # --- objective (spec §3.4)
    lambda_asr: float = 1.0  # weight of the forgetting term. The official demo ships 0, which DISABLES
    #                          unlearning (it then only fine-tunes LoRA on clean dev data); 1 is what the paper implies
    lambda_acc: float = 1.0  # weight of CE on labelled clean dev batches (official: 1)
    forget_loss: str = "kl"  # kl (official, −KL(p_T‖p_S), unbounded) | kl_capped | suppress_target (bounded)
    temperature: float = 1.0  # softmax temperature of the KL terms (official: 1, no temperature)
    kl_cap: float = 2.0  # kl_capped: per-sample cap on the KL being maximised (nats)
    suppress_eps: float = 1e-4  # suppress_target: −log(1 − p_target + eps)
    target_label: int | None = None  # backdoor target for suppress_target / proxy; None = inferred (majority
    #                                   teacher prediction on the flagged rows, which a defender can compute)

    # --- LoRA (spec §3.3)
    lora_rank: int = 32  # r
    lora_alpha: float = 64.0  # α; the adapter output is scaled by α/r (= 2)
    lora_dropout: float = 0.1  # dropout on the adapter input (training only)
    lora_targets: tuple[
        str, ...
    ] = ()  # linear-layer names to adapt; () = the family default (BERT query,key,value)
    train_head: bool = True  # train a full copy of the classification head (PEFT SEQ_CLS behaviour)
    model_dropout: bool = True  # the student's own dropout on during training (official: train() mode)

    # --- optimisation (spec §3.5)
    epochs: int = 5  # passes over the flagged (training) rows; clean batches are cycled in lock-step
    batch_size: int = 32  # rows per flagged batch and per clean batch (official: 32 PLM, 4 LLM)
    lr: float = 5e-4  # peak learning rate of AdamW
    weight_decay: float = 0.01  # decoupled weight decay (torch AdamW default), on all trainable leaves
    warmup_frac: float = 0.1  # warm-up steps = int(warmup_frac · total steps); lr 0 at the first update
    clip_norm: float = 1.0  # global gradient-norm clip (0 disables)
    eval_batch_size: int = 64  # rows per forward pass in evaluation
    fused_step: bool = (
        True  # one forward on [flagged; clean] padded to a common bucket (fewer compiles) vs two
    )
    #                          forwards at their own lengths (less padding; measured faster on CPU when the two
    #                          batches fall in different buckets, equal otherwise)
    length_group: int = 8  # length-grouped batches: rows are shuffled, cut into groups of this many batches,
    #                        sorted by length inside each group (HF group_by_length), the batches visited in a
    #                        random order; inside each epoch the flagged batches are paired with the clean
    #                        batches of the same steps by length rank. ~2x fewer padded tokens on SST-2;
    #                        0 = plain shuffled batches, paired in order
    pad_multiple: int = 8  # unlearning batches are padded to a multiple of this many tokens (each distinct
    #                        length compiles the step once); 0 = the encoding's buckets (32/64/128/...)

    # --- early stopping (spec §3.6, §10.4)
    early_stop: str = "proxy"  # proxy | oracle_dev_poison (official, uses ground-truth dev-poison) | none
    eval_every_steps: int = 0  # how often the stop rule is evaluated; 0 = once per epoch
    holdout_frac: float = (
        0.2  # proxy: fraction of the flagged rows held out (not trained on) to measure forgetting
    )
    proxy_asr_stop: float = 0.1  # proxy: stop once this fraction (or less) of the held-out flagged rows is
    #                               predicted as the target
    max_cacc_drop: float = (
        0.03  # proxy: a state is acceptable only if held-out clean accuracy fell by <= this
    )
    clean_holdout_frac: float = 0.2  # proxy: fraction of dev-clean held out of the CE set to measure accuracy
    #                                   honestly (accuracy on the CE rows themselves is optimistic); 0 = measure
    #                                   on the CE rows
    asr_threshold: float = 0.2  # oracle_dev_poison: stop once dev-poison ASR <= this (official 0.2)

    # --- UPGP projection (jdup.projection)
    projection: str = "none"  # none | gradient | representation | inflora
    projection_options: ProjectionOptions = dataclasses.field(default_factory=ProjectionOptions)

    # --- infrastructure
    seed: int = 2025  # one seed for LoRA init, data order and dropout
    ckpt_every_steps: int = 20  # orbax checkpoint period (0 = never); a killed run resumes from OUT/ckpt
    resume: bool = True  # resume from OUT/ckpt when it matches this config
    progress: bool = True  # tqdm progress bars

    def __post_init__(self):
        if isinstance(self.projection_options, dict):  # Python callers may pass the options as a mapping
            object.__setattr__(self, "projection_options", ProjectionOptions(**self.projection_options))

    def validate(self) -> None:
        """Value constraints (run by ``jdup.config.build`` and by the stage)."""
        check_one_of(self, "forget_loss", losses.FORGET_LOSSES)
        check_one_of(self, "early_stop", EARLY_STOP)
        check_one_of(self, "projection", PROJECTIONS)
        check_range(self, "epochs", 0)
        check_range(self, "batch_size", 1)
        check_range(self, "lora_rank", 1)
        check_range(self, "eval_batch_size", 1)
        check_range(self, "holdout_frac", 0, 1, hi_open=True)
        check_range(self, "clean_holdout_frac", 0, 1, hi_open=True)
        check_range(self, "warmup_frac", 0, 1)
        check_range(self, "lora_dropout", 0, 1, hi_open=True)
        check(self, "temperature", self.temperature > 0, "must be > 0")
        try:
            self.projection_options.validate()
        except Invalid as e:
            raise Invalid(f"projection_options.{e.key}", e.problem, e.value) from None
