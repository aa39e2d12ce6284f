"""Make a diffusers UNet smaller: structured channel pruning (torch-pruning) and BK-SDM block removal.

Two ways to get the pruned student of "Efficient Fine-Tuning and Concept Suppression for Pruned
Diffusion Models" (Shirkavand et al., CVPR 2025, arXiv 2412.15341):

* :func:`prune_unet_channels` removes whole channels. torch-pruning's ``DependencyGraph`` traces the
  UNet once and groups every coupled dimension (a resnet's conv1 output with its norm2 and conv2 input,
  a residual stream with every skip concatenation that reads it, attention q/k/v with their output
  projection), ``BasePruner`` ranks each group by an importance (``"magnitude"``: L2 norm of the
  weights, as Diff-Pruning / "Structural Pruning for Diffusion Models", Fang et al., arXiv 2305.10924,
  uses; ``"taylor"``: |weight x gradient| of a calibration loss; ``"random"``) and cuts ``ratio`` of each
  group. GroupNorm grouping is honoured (the same count leaves every group). diffusers caches a few
  channel counts as plain attributes (``Upsample2D.channels``, ``Attention.query_dim``), which are
  synced afterwards so the pruned model runs in its pipeline unchanged.
* :func:`remove_unet_blocks` drops whole residual/attention pairs and the mid-block the way BK-SDM
  ("BK-SDM: A Lightweight, Fast, and Cheap Version of Stable Diffusion", Kim et al., arXiv 2305.15798)
  does for ``UNet2DConditionModel`` (it works on ``UNet2DModel`` too): keep the first ``keep`` pairs of
  every down stage, and in the mirrored up stage the first ``keep`` pairs plus the last one, so the
  skip connections still line up.

A pruned UNet cannot be rebuilt from its diffusers config alone, so :func:`save_pruned_unet` writes the
config, the pruning history (torch-pruning's replayable list of removed indices) or the block-removal
spec, and safetensors weights; :func:`load_pruned_unet` replays them on a fresh model.

Memory: pruning works in place on the model; the dependency graph holds one node per traced op (a few
MB for a small UNet); :func:`measure_unet` deep-copies the model once to count MACs.
"""

from __future__ import annotations

import copy
import json
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch_pruning as tp
from torch import Tensor, nn

IMPORTANCES = ("magnitude", "taylor", "random")
_HISTORY_FILE = "pruning_history.json"
_BLOCKS_FILE = "block_removal.json"
_WEIGHTS_FILE = "diffusion_pytorch_model.safetensors"


def unet_example_inputs(unet: nn.Module, batch_size: int = 2) -> dict[str, Tensor]:
    """Dummy ``forward`` keyword inputs for a diffusers UNet (tracing, MAC counts, timing).

    ``UNet2DModel`` gets ``class_labels`` when it is class-conditional; ``UNet2DConditionModel`` gets
    ``encoder_hidden_states`` of its ``cross_attention_dim`` (77 tokens is not needed: 8 suffice).
    """
    cfg = unet.config
    size = cfg.sample_size if isinstance(cfg.sample_size, int) else cfg.sample_size[0]
    device = next(unet.parameters()).device
    dtype = next(unet.parameters()).dtype
    inputs: dict[str, Tensor] = {
        "sample": torch.randn(batch_size, cfg.in_channels, size, size, device=device, dtype=dtype),
        "timestep": torch.full((batch_size,), 10, device=device, dtype=torch.long),
    }
    if getattr(cfg, "num_class_embeds", None):
        inputs["class_labels"] = torch.zeros(batch_size, dtype=torch.long, device=device)
    if getattr(cfg, "cross_attention_dim", None):
        inputs["encoder_hidden_states"] = torch.randn(
            batch_size, 8, cfg.cross_attention_dim, device=device, dtype=dtype
        )
    return inputs


def _forward_sample(model: nn.Module, inputs: dict[str, Tensor]) -> Tensor:
    return model(**inputs).sample


@dataclass
class PruneResult:
    """What :func:`prune_unet_channels` did: replayable history and the size before/after."""

    history: list[tuple[str, bool, list[int]]]
    params_before: int
    params_after: int

    @property
    def param_ratio(self) -> float:
        """Parameters kept, as a fraction of the original."""
        return self.params_after / self.params_before


def prune_unet_channels(
    unet: nn.Module,
    ratio: float = 0.5,
    importance: str = "magnitude",
    calibration_loss: Callable[[nn.Module], Tensor] | None = None,
    ignored_layers: list[nn.Module] | None = None,
) -> PruneResult:
    """Remove ``ratio`` of the channels of every prunable group of a diffusers UNet, in place.

    Args:
        unet: a diffusers ``UNet2DModel`` or ``UNet2DConditionModel``.
        ratio: fraction of channels removed from each group, in ``[0, 1)``; 0.5 leaves about a
            quarter of the MACs and parameters (both sides of most convolutions shrink).
        importance: ``"magnitude"`` (L2 norm), ``"taylor"`` (|w * dL/dw| of ``calibration_loss``),
            or ``"random"``.
        calibration_loss: ``unet -> scalar loss`` (e.g. the denoising loss on a batch); required by
            ``"taylor"``, whose gradients it provides.
        ignored_layers: modules whose output channels must stay (``conv_out`` always stays).
    """
    if not isinstance(ratio, (int, float)) or not 0.0 <= ratio < 1.0:
        raise ValueError(
            f"ratio={ratio!r} is invalid: use a float in [0, 1), e.g. 0.5 to halve the channels."
        )
    if importance not in IMPORTANCES:
        raise ValueError(f"importance={importance!r} is invalid: use one of {IMPORTANCES}.")
    if importance == "taylor" and calibration_loss is None:
        raise ValueError(
            "importance='taylor' needs calibration_loss=(unet -> scalar loss) to get gradients; "
            "pass one or use importance='magnitude'."
        )
    params_before = sum(p.numel() for p in unet.parameters())
    if ratio == 0.0:
        return PruneResult([], params_before, params_before)
    imp: tp.importance.Importance
    if importance == "magnitude":
        imp = tp.importance.GroupMagnitudeImportance(p=2)
    elif importance == "taylor":
        imp = tp.importance.GroupTaylorImportance()
    else:
        imp = tp.importance.RandomImportance()
    ignored = [unet.conv_out, *(ignored_layers or [])]
    was_training = unet.training
    unet.eval()
    inputs = unet_example_inputs(unet)
    pruner = tp.pruner.BasePruner(
        unet,
        inputs,
        importance=imp,
        pruning_ratio=float(ratio),
        ignored_layers=ignored,
        forward_fn=_forward_sample,
    )
    if importance == "taylor":
        unet.zero_grad(set_to_none=True)
        with torch.enable_grad():
            loss = calibration_loss(unet)  # type: ignore[misc]
            loss.backward()
    pruner.step()
    unet.zero_grad(set_to_none=True)
    sync_diffusers_attributes(unet)
    unet.train(was_training)
    history = [(str(n), bool(o), [int(i) for i in idx]) for n, o, idx in pruner.pruning_history()]
    return PruneResult(history, params_before, sum(p.numel() for p in unet.parameters()))


def sync_diffusers_attributes(unet: nn.Module) -> None:
    """Update the channel counts diffusers keeps as plain attributes after their layers were pruned.

    ``Upsample2D``/``Downsample2D`` assert ``x.shape[1] == self.channels``; ``Attention`` keeps
    ``query_dim``/``inner_dim``/``out_dim``; the attention processors derive the head size from the
    projected tensors at run time, so heads stay and each head gets narrower.
    """
    from diffusers.models.attention_processor import Attention
    from diffusers.models.downsampling import Downsample2D
    from diffusers.models.upsampling import Upsample2D

    for module in unet.modules():
        if isinstance(module, (Upsample2D, Downsample2D)):
            conv = getattr(module, "conv", None)
            if isinstance(conv, nn.Conv2d):
                module.channels = conv.in_channels
                module.out_channels = conv.out_channels
        elif isinstance(module, Attention):
            module.query_dim = module.to_q.in_features
            module.inner_dim = module.to_q.out_features
            module.inner_kv_dim = module.to_k.out_features
            module.out_dim = module.to_out[0].out_features


def remove_unet_blocks(unet: nn.Module, keep: int = 1, drop_mid: bool = True) -> dict[str, Any]:
    """Drop residual/attention pairs and the mid-block of a diffusers UNet in place (BK-SDM).

    Every down stage keeps its first ``keep`` (resnet, attention) pairs; the mirrored up stage keeps
    its first ``keep`` pairs and its last one (the one that reads the previous stage's downsampled
    skip), so the skip stack the down path pushes is exactly what the up path pops. On SD-1.5
    (``layers_per_block=2``, 859.5 M parameters; counted on the meta device) ``keep=1`` with the
    mid-block kept is BK-SDM-Base's shape (579.4 M; the paper's 0.58 B), and ``drop_mid`` (the
    default) also removes the mid-block: BK-SDM-Small's shape (482.3 M; the paper's 0.49 B).
    Returns the spec, for :func:`save_pruned_unet`.
    """
    down_blocks, up_blocks = unet.down_blocks, unet.up_blocks
    layers = len(down_blocks[0].resnets)
    if not isinstance(keep, int) or not 1 <= keep <= layers:
        raise ValueError(
            f"keep={keep!r} is invalid: use an int in [1, {layers}] (the UNet has {layers} resnets per down stage)."
        )
    for block in down_blocks:
        _keep_pairs(block, list(range(keep)))
    for block in up_blocks:
        n = len(block.resnets)
        _keep_pairs(block, [*range(keep), n - 1])
    if drop_mid:
        unet.mid_block = None
    return {"keep": keep, "drop_mid": bool(drop_mid)}


def _keep_pairs(block: nn.Module, indices: list[int]) -> None:
    indices = sorted(set(indices))
    block.resnets = nn.ModuleList([block.resnets[i] for i in indices])
    attentions = getattr(block, "attentions", None)
    if isinstance(attentions, nn.ModuleList) and len(attentions) > 0:
        block.attentions = nn.ModuleList([attentions[i] for i in indices])


def save_pruned_unet(
    unet: nn.Module,
    directory: str | Path,
    history: list[tuple[str, bool, list[int]]] | None = None,
    block_removal: dict[str, Any] | None = None,
) -> Path:
    """Write config, pruning history / block-removal spec and safetensors weights to ``directory``."""
    from safetensors.torch import save_file

    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    unet.save_config(path)
    if history:
        (path / _HISTORY_FILE).write_text(json.dumps(history))
    if block_removal:
        (path / _BLOCKS_FILE).write_text(json.dumps(block_removal))
    state = {k: v.detach().contiguous().cpu() for k, v in unet.state_dict().items()}
    save_file(state, str(path / _WEIGHTS_FILE))
    return path


def load_pruned_unet(directory: str | Path) -> nn.Module:
    """Rebuild a UNet written by :func:`save_pruned_unet` (or a plain diffusers ``save_pretrained``)."""
    import diffusers
    from safetensors.torch import load_file

    path = Path(directory)
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ValueError(
            f"directory={str(directory)!r} has no config.json: pass a folder saved by save_pruned_unet."
        )
    config = json.loads(config_file.read_text())
    cls = getattr(diffusers, config.get("_class_name", ""), None)
    if cls is None:
        raise ValueError(
            f"{config_file} names class {config.get('_class_name')!r}, which diffusers does not have."
        )
    unet = cls.from_config(config)
    if (path / _BLOCKS_FILE).is_file():
        remove_unet_blocks(unet, **json.loads((path / _BLOCKS_FILE).read_text()))
    if (path / _HISTORY_FILE).is_file():
        history = [tuple(h) for h in json.loads((path / _HISTORY_FILE).read_text())]
        graph = tp.DependencyGraph().build_dependency(
            unet, example_inputs=unet_example_inputs(unet), forward_fn=_forward_sample
        )
        graph.load_pruning_history(history)
        sync_diffusers_attributes(unet)
    weights = path / _WEIGHTS_FILE
    if weights.is_file():
        unet.load_state_dict(load_file(str(weights)))
    return unet


@dataclass
class UNetCost:
    """Size and speed of one UNet: parameters, multiply-accumulates and seconds per denoising step."""

    params: int
    macs: float
    step_seconds: float

    def as_dict(self) -> dict[str, float]:
        """Plain dict (for JSON)."""
        return asdict(self)


@torch.no_grad()
def measure_unet(
    unet: nn.Module,
    batch_size: int = 64,
    repeats: int = 20,
    warmup: int = 3,
    inputs: dict[str, Tensor] | None = None,
) -> UNetCost:
    """Parameters, MACs (torch-pruning's counter, per sample) and median seconds of one forward.

    A forward of the UNet is one denoising step of a sampler, so ``step_seconds`` is the per-step
    cost at ``batch_size`` samples. The median over ``repeats`` runs resists noise from other work.
    """
    if not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"repeats={repeats!r} is invalid: use an int >= 1.")
    was_training = unet.training
    unet.eval()
    one = unet_example_inputs(unet, batch_size=1)
    macs, params = tp.utils.count_ops_and_params(copy.deepcopy(unet), one)
    feed = inputs if inputs is not None else unet_example_inputs(unet, batch_size=batch_size)
    for _ in range(warmup):
        unet(**feed)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        unet(**feed)
        times.append(time.perf_counter() - start)
    unet.train(was_training)
    return UNetCost(params=int(params), macs=float(macs), step_seconds=statistics.median(times))
