"""Model configuration: one frozen section per component, composed by :class:`ModelConfig`.

``ModelConfig`` is the ``model:`` section of the main config. Every field has a default
and a comment saying why that default; unknown keys are rejected.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from consumers.schema import RANK_PACKAGE_SLOTS


class _Section(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class HSTUConfig(_Section):
    """The HSTU user encoder (Zhai et al., 2024, "Actions Speak Louder than Words")."""

    num_layers: int = Field(2, ge=1)  # the paper's smallest stacks use 2-4; 2 keeps a CPU training step cheap
    num_heads: int = Field(2, ge=1)  # 2 × 32 dims fill a 64-dim model; more heads would split it too thin
    qk_dim: int = Field(32, ge=1)  # per head; num_heads * qk_dim = model dim 64 keeps the projection square
    v_dim: int = Field(32, ge=1)  # per head; same reasoning as qk_dim
    activation: Literal["silu", "gelu", "relu", "identity"] = "silu"  # φ1 of the paper (Eq. 1)
    activate_qkv: bool = True  # paper applies φ1 to all of U,V,Q,K; False applies it to U only
    attention: Literal["pointwise", "softmax"] = "pointwise"  # HSTU's SiLU attention; softmax for ablations
    norm: Literal["layernorm", "rmsnorm"] = "layernorm"  # the paper's choice; rmsnorm is a little cheaper
    pre_norm: bool = True  # pre-norm trains stably without warm-up, which a streaming trainer cannot schedule
    dropout: float = Field(0.0, ge=0.0, lt=1.0)  # streaming sees each sample once: overfitting is rare
    time_buckets: int = Field(32, ge=1)  # log2 buckets of |Δt| in time_bucket_unit_ms: 2^31 s covers any gap
    time_bucket_unit_ms: int = Field(1000, ge=1)  # seconds: sub-second gaps carry no behavioural signal
    kernel: Literal["auto", "pytorch", "triton"] = "auto"  # auto: Triton for pointwise attention on CUDA
    # Distinct histories are encoded in this many length-sorted groups, each cropped to its longest
    # row. With lengths uniform in 1..L, 4 groups do ~47% of a padded pass's attention work
    # (Σ (g/4)² / 4), but each group repeats every op of the stack: at the shipped history of 32 a
    # step is per-op overhead, and 1 group ran the demo step with 36% fewer ops (forward.hstu 652 → 238
    # per step, backward 923 → 593; bench.trainer). Raise it for long histories (L in the hundreds).
    length_groups: int = Field(1, ge=1)

    @model_validator(mode="after")
    def _kernel_exists(self) -> HSTUConfig:
        if self.attention == "softmax" and self.kernel == "triton":
            raise ValueError("kernel=triton exists only for attention=pointwise")
        return self


class ESMMConfig(_Section):
    """ESMM heads (Ma et al., 2018) and the delayed-feedback correction."""

    hidden: tuple[int, ...] = (256, 128)  # ESMM's towers are small MLPs (360-200-80); sized for ~430 inputs (D=64)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)  # streaming sees each sample once: overfitting is rare
    time_dim: int = Field(8, ge=1)  # hour / weekday / gap embeddings: 24, 7 and ~64 values need few dims
    ctr_weight: float = Field(1.0, ge=0.0)  # the ESMM paper weighs both tasks equally
    ctcvr_weight: float = Field(1.0, ge=0.0)  # the ESMM paper weighs both tasks equally
    correction: Literal["cancel", "none"] = "cancel"  # see modules/esmm.py: undo the fake negative exactly
    correction_weight: float = Field(1.0, ge=0.0)  # 1 makes (fake negative + correction) ≈ one positive
    prob_eps: float = Field(1e-6, gt=0.0, lt=0.5)  # clamp of pCTCVR in log(1-p): bounds the cancel term
    # The CTR logit adds field-weighted dot products (FwFM) starting from user·item alone: user and
    # item rows learn their affinity from the first step, as MF's do, not through the towers' random
    # weights. CTR AUC, last 20 % of 100k demo-world exposures: 0.820 with, 0.801 without (plain FM,
    # every pair starting at 1, did worse than user·item alone). docs/model_quality.md
    ctr_dot_logit: bool = True


class RetrievalConfig(_Section):
    """Two-tower retrieval head trained with sampled softmax (InfoNCE)."""

    dim: int = Field(64, ge=1)  # matches the embedding dim; FAISS flat search cost is linear in it
    temperature: float = Field(0.05, gt=0.0)  # usual range for L2-normalised vectors (0.02-0.1)
    in_batch_negatives: bool = True  # free negatives; other rows' items follow the exposure distribution
    rank_loss: Literal["none", "pairwise", "listwise"] = "pairwise"  # order within the rank package
    # Grade per rank-package slot (cold click, hot click, cold exposure, hot exposure, random); the
    # positive is graded above all: clicked history items beat merely exposed ones beat random.
    rank_grades: tuple[int, ...] = (2, 2, 1, 1, 0)
    rank_weight: float = Field(0.1, ge=0.0)  # auxiliary: the InfoNCE term already separates positives
    # Whether the retrieval losses also train what ranking shares (item/user rows, HSTU) or only the
    # retrieval towers. Row-wise Adagrad keeps one accumulator per row for every loss, and InfoNCE's
    # 1/temperature-sized gradients filled the shared rows', slowing ranking. 100k demo-world
    # exposures: CTR AUC 0.820 off vs 0.784 on; prequential InfoNCE 4.97 vs 4.95 (chance ~5.6).
    train_shared: bool = False
    # Ablation: False reads every rank-package slot as empty, so InfoNCE sees only the random and
    # in-batch negatives and the rank loss has nothing to order (bench/ablations.py).
    rank_package_negatives: bool = True

    @model_validator(mode="after")
    def _one_grade_per_slot(self) -> RetrievalConfig:
        if len(self.rank_grades) != RANK_PACKAGE_SLOTS:
            raise ValueError(f"rank_grades needs {RANK_PACKAGE_SLOTS} entries, one per rank-package slot")
        return self


class ModelConfig(_Section):
    """The whole model: embeddings, HSTU encoder, ESMM heads, retrieval head."""

    embedding_dim: int = Field(64, ge=1)  # width of every injected id embedding and of the HSTU stream
    max_history_len: int = Field(200, ge=1)  # longer histories keep their most recent events; sizes rab tables
    num_sparse_features: int = Field(3, ge=0)  # must equal len(features.sparse) (S of the sample batch)
    num_dense_features: int = Field(1, ge=0)  # must equal len(features.dense) (D of the sample batch)
    num_gap_buckets: int = Field(64, ge=1)  # log-bucketed gaps; larger bucket ids share the last row
    prior_eps: float = Field(1e-4, gt=0.0, lt=0.5)  # CTR priors enter as logits; clamp keeps them finite
    retrieval_weight: float = Field(0.1, ge=0.0)  # retrieval is auxiliary to ranking in the total loss
    # hstu: the HSTU encoder; meanpool: a causal mean of the history (the ablation bench.quality compares)
    sequence_encoder: Literal["hstu", "meanpool"] = "hstu"
    # Ablation (bench/ablations.py): False feeds the model zeros for hour, weekday, gap bucket,
    # history ages and event times (HSTU's time bias then sees Δt = 0); the samples keep them.
    time_features: bool = True
    # Ablation (bench/ablations.py): False feeds the model 0.5 (logit 0) for the user and item CTR
    # priors (issue #14's comparison); the samples keep them.
    ctr_prior_features: bool = True
    hstu: HSTUConfig = HSTUConfig()
    esmm: ESMMConfig = ESMMConfig()
    retrieval: RetrievalConfig = RetrievalConfig()
