"""Block reconstruction after calibration (docs/algorithm.md §7, the README's "Retrain").

Block by block (patch embedding, transformer blocks, Swin patch mergings, head; optionally the
last ViT blocks and the head as one unit, ``kl_tail``), AdaRound learns
each weight's rounding and Adam refines the activation scales through straight-through
gradients, so that the quantized block reproduces the FP block's outputs; an optional
end-to-end stage then tunes the float parts and scales of the whole model on its logits.
Weights end up on the quantization grid and the post-GELU shift is folded with the final
weights (§4).

Under ``torchrun`` (``ranks`` of several processes) training is data-parallel: every rank holds
the same views and draws the same batch indices and QDrop masks, computes the loss of its share
of each batch (every world_size-th sample) and the gradients are summed over the ranks before
each step, so every rank takes the same steps, equal to one process's up to the order of float
sums (docs/guide.md, "Several processes").
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from adalog.devices import model_device, resolve_device
from adalog.distributed import Ranks, gather_text, sum_tensors_across_
from adalog.errors import ConfigError, DataError
from adalog.models.qmodules import QuantLinear, set_quant_mode
from adalog.pipelines.calibrate import fold_post_gelu_shift
from adalog.pipelines.runstore import (
    load_progress,
    read_progress_extras,
    run_fingerprint,
    save_progress,
    state_digest,
    tensor_digest,
)
from adalog.quant import LogQuantizer
from adalog.recon.blocks import (
    BlockTraining,
    ends_in_logits,
    is_tail,
    prepare_block,
    reconstruction_blocks,
    unit_entry,
    unit_module,
    with_kl_tail,
)
from adalog.recon.config import ReconstructConfig
from adalog.recon.data import (
    BlockData,
    augmented_views,
    capture_fp,
    capture_inputs,
    run_in_batches,
)

_POSTFIX_EVERY = 25


def reconstruct(
    model: nn.Module,
    images: Tensor,
    config: ReconstructConfig | None = None,
    progress: bool = True,
    stats: dict[str, dict[str, float]] | None = None,
    resume_dir: str | Path | None = None,
    device: str | torch.device | None = None,
    ranks: Ranks | None = None,
) -> nn.Module:
    """Reconstruct a calibrated model (from ``adalog.quantize`` or ``load_quantized``) in place.

    ``images`` are the calibration images (never evaluation images); the training set is
    ``config.data_size`` seeded views of them. ``stats``, when given, receives per block the
    wall seconds, the reconstruction loss of the first and last iterations, and the loss on a
    fixed probe batch without QDrop before and after training (``probe_before``/``_after``);
    the end-to-end stage (``config.network_iterations``) reports under ``"network"``.
    With ``resume_dir`` the model, the random generators and ``stats`` are saved there after
    every unit (and after the end-to-end stage); rerunning with the same starting model,
    config and images continues after the last saved unit, bit for bit as an uninterrupted run.
    ``device`` moves the model there first (``"auto"``: CUDA when available); by default it
    trains where the model is. ``ranks`` (:func:`adalog.distributed.join`) of several processes
    share each batch out (module doc); each must pass the same model, images and config, and
    all end with the same parameters (checked: a mismatch is an error).
    """
    ranks = ranks or Ranks()
    config = ReconstructConfig.fast() if config is None else config
    stats = {} if stats is None else stats
    if getattr(model, "adalog_meta", None) is None:
        raise ConfigError("reconstruct needs a model calibrated by adalog (no adalog_meta)")
    if model.adalog_meta.get("config", {}).get("weight_rounding", "nearest") != "nearest":
        raise ConfigError(
            "reconstruct needs the FP weights, but this model's weights were GPTQ-rounded during "
            "calibration (weight_rounding='gptq'); calibrate with weight_rounding='nearest' "
            "before reconstructing (AdaRound learns the rounding itself)"
        )
    if images.dim() != 4 or images.shape[0] == 0:
        raise DataError(f"images must be a non-empty (N, C, H, W) batch, got {tuple(images.shape)}")
    if min(config.batch_size, config.data_size) < ranks.world_size:
        raise ConfigError(
            f"batches of {min(config.batch_size, config.data_size)} views cannot be shared by "
            f"{ranks.world_size} ranks"
        )
    # units first: a bad kl_tail is refused before the model is touched
    names = reconstruction_blocks(model) if config.iterations > 0 else []
    names = with_kl_tail(model, names, config.kl_tail) if names else names
    if device is not None:
        model.to(resolve_device(device))
    device = model_device(model)
    images = images.to(device)
    torch.manual_seed(config.seed)
    model.eval()
    unfold_post_gelu_shift(model)  # the fold must use the final weights (§4, §10.22)
    fp_model = copy.deepcopy(model)
    set_quant_mode(fp_model, False)
    fp_model.requires_grad_(False)
    set_quant_mode(model, True)
    grad_flags = {p: p.requires_grad for p in model.parameters()}
    model.requires_grad_(False)
    data = augmented_views(
        images, config.data_size, config.crop_scale_min, config.hflip, config.seed, config.mix_prob
    )
    gens = _Generators(config.seed, device)
    stages = names + (["network"] if config.network_iterations > 0 else [])
    done: list[str] = []
    previous: tuple[str, BlockData] | None = None  # the last trained unit and its data
    if resume_dir is not None:
        fingerprint = _fingerprint(model, config, images)
        done = _resume(model, resume_dir, fingerprint, gens, stats)
    total = len(names) * config.iterations + config.network_iterations
    initial = sum(config.iterations for name in names if name in done)
    initial += config.network_iterations if "network" in done else 0
    bar = tqdm(
        total=total, initial=initial, desc="reconstruct", disable=not progress or not ranks.is_main
    )
    try:
        for name in stages:
            if name in done:
                continue
            start = time.perf_counter()
            if name == "network":
                losses = _train_network(model, fp_model, data, config, gens, bar, ranks)
            else:
                block_data = _block_data(model, fp_model, name, data, config, gens, previous)
                losses = _train_block(model, name, block_data, config, gens, bar, ranks)
                previous = (name, block_data)
            stats[name] = {"seconds": time.perf_counter() - start} | losses
            if resume_dir is not None:
                done.append(name)
                if ranks.is_main:  # every rank holds the same state
                    save_progress(model, resume_dir, done, fingerprint, gens.states(), stats)
    finally:
        bar.close()
        for param, flag in grad_flags.items():
            param.requires_grad_(flag)
    fold_post_gelu_shift(model)
    _check_same_state(model, ranks)
    model.adalog_meta = model.adalog_meta | {"reconstruct": config.to_dict()}
    return model.eval()


def _check_same_state(model: nn.Module, ranks: Ranks) -> None:
    """Data-parallel training must leave every rank with the same model, bit for bit."""
    if not ranks.active:
        return
    digests = gather_text(state_digest(model), ranks)
    if len(set(digests)) > 1:
        raise RuntimeError(
            f"the ranks ended reconstruction with different models (state digests {digests}); "
            "they must start from the same model, images and config"
        )


class _Generators:
    """Seeded random streams: batch order and Fisher labels (CPU), QDrop masks (device)."""

    def __init__(self, seed: int, device: torch.device) -> None:
        self.cpu = torch.Generator(device="cpu").manual_seed(seed + 1)
        self.device = torch.Generator(device=device).manual_seed(seed + 2)

    def batch(self, n: int, size: int, device: torch.device) -> Tensor:
        """``size`` random indices of ``n`` items, drawn on the CPU stream (the same batches
        on every device), on ``device``."""
        order = torch.randperm(n, generator=self.cpu, device=self.cpu.device)
        return order[:size].to(device)

    def states(self) -> dict[str, Tensor]:
        """These streams' states and torch's global one, to resume a run."""
        return {
            "rng_cpu": self.cpu.get_state(),
            "rng_device": self.device.get_state(),
            "rng_global": torch.get_rng_state(),
        }

    def restore(self, states: dict[str, Tensor]) -> None:
        self.cpu.set_state(states["rng_cpu"])
        self.device.set_state(states["rng_device"])
        torch.set_rng_state(states["rng_global"])


def _fingerprint(model: nn.Module, config: ReconstructConfig, images: Tensor) -> dict:
    """What must match for saved reconstruction progress to be resumed: the starting model
    (its whole state), the config and the images."""
    return run_fingerprint(
        {},
        reconstruct=config,
        start_state_sha256=state_digest(model),
        images_sha256=tensor_digest([images]),
    )


def _resume(
    model: nn.Module,
    directory: str | Path,
    fingerprint: dict,
    gens: _Generators,
    stats: dict,
) -> list[str]:
    """Load saved progress into ``model``, ``gens`` and ``stats``; the units already done."""
    done = load_progress(model, directory, fingerprint)
    if done:
        extras, record = read_progress_extras(directory)
        gens.restore(extras)
        stats.update(record)
    return done


def unfold_post_gelu_shift(model: nn.Module) -> None:
    """Undo §4's fold (bias back, quantizer subtracts the shift again), using the same quantized
    weight as the fold did, so the quantized model is unchanged and its raw mode is FP again."""
    for module in model.modules():
        quant = getattr(module, "input_quant", None)
        if not isinstance(module, QuantLinear) or not isinstance(quant, LogQuantizer):
            continue
        if not bool(quant.shift_folded):
            continue
        with torch.no_grad():
            module.bias.add_(float(quant.shift) * module.quantized_weight().sum(dim=1))
        quant.set_shift_folded(False)


def _block_data(
    model: nn.Module,
    fp_model: nn.Module,
    name: str,
    data: Tensor,
    config: ReconstructConfig,
    gens: _Generators,
    previous: tuple[str, BlockData] | None = None,
) -> BlockData:
    """FP inputs/targets of the block; quantized-model inputs and Fisher weights if asked.

    When the block directly reads the output of the ``previous`` trained unit (the next member
    of the same ``nn.Sequential``), its FP inputs are that unit's FP targets and its quantized
    inputs are that unit, as trained, applied to its own inputs: one block forward per view
    instead of running both models from the images up to this block. A tail unit's targets
    are the FP logits."""
    logits = ends_in_logits(model, name)
    fisher = _sampled_label_loss(gens.cpu) if config.loss == "fisher" and not logits else None
    entry = unit_entry(name)
    carry = previous is not None and fisher is None and follows(model, previous[0], entry)
    if carry:
        fp_x, grad_sq = previous[1].targets, None
    else:
        fp_x, y, grad_sq = capture_fp(fp_model, entry, data, config.batch_size, fisher)
    if carry or is_tail(name):
        y = run_in_batches(unit_module(fp_model, name), fp_x, config.batch_size)
    weights = None if grad_sq is None else grad_sq / grad_sq.mean().clamp_min(1e-30)
    if config.loss == "token_norm" and not logits:
        weights = token_norm_weights(y)
    if config.input_source == "fp":
        return BlockData(fp_x, y, None, weights)
    if carry:
        prev_name, prev_data = previous
        x = run_in_batches(model.get_submodule(prev_name), prev_data.inputs, config.batch_size)
    else:
        x = capture_inputs(model, entry, data, config.batch_size)
    return BlockData(x, y, fp_x if config.drop_prob > 0 else None, weights)


def follows(model: nn.Module, previous: str, name: str) -> bool:
    """Whether unit ``name`` reads exactly the output of unit ``previous``: consecutive
    members of one ``nn.Sequential`` (ViT ``blocks.3`` -> ``blocks.4``, Swin blocks of a
    stage); anything else (patch embedding -> first block, last block -> head) is not."""
    parent, _, index = previous.rpartition(".")
    other_parent, _, other_index = name.rpartition(".")
    if parent != other_parent or not (index.isdigit() and other_index.isdigit()):
        return False
    container = model.get_submodule(parent) if parent else model
    return isinstance(container, nn.Sequential) and int(other_index) == int(index) + 1


def token_norm_weights(targets: Tensor) -> Tensor:
    """``1/σ²`` of each FP output token (variance over its channels), normalised to mean 1.

    The next LayerNorm divides a token by its σ, so an error δ there reaches the rest of the
    network as about δ/σ: tokens with massive activations (large σ) tolerate large absolute
    errors, which a plain MSE would chase first."""
    inv = 1.0 / targets.float().var(-1, keepdim=True).clamp_min(1e-12)
    return inv / inv.mean()


def _sampled_label_loss(generator: torch.Generator) -> Callable[[Tensor], Tensor]:
    """Cross-entropy against labels drawn from the FP model's own softmax: its squared
    gradients estimate the diagonal of the (true) Fisher information without labels."""

    def loss(logits: Tensor) -> Tensor:
        probs = logits.detach().float().softmax(-1).cpu()
        labels = torch.multinomial(probs, 1, generator=generator).squeeze(1)
        return F.cross_entropy(logits, labels.to(logits.device), reduction="sum")

    return loss


def round_beta(step: int, config: ReconstructConfig) -> float | None:
    """β of the rounding regulariser at 1-based ``step``, or None during the warm-up (§7.6:
    off before 20 % of the iterations, then linear from ``beta_start`` to ``beta_end``)."""
    start = int(config.warmup * config.iterations)
    if step < max(start, 1):
        return None
    progress = (step - start) / max(1, config.iterations - start)
    return config.beta_end + (config.beta_start - config.beta_end) * (1.0 - progress)


def reconstruction_loss(
    out: Tensor,
    target: Tensor,
    head: bool,
    rec_weight: float,
    weights: Tensor | None = None,
    batch_total: int | None = None,
) -> Tensor:
    """Head: ``KL(softmax(y) ‖ softmax(ŷ))`` per image; other blocks: ``rec_weight ·
    mean Σ_dim1 w·(ŷ − y)²`` (sum over tokens, mean over the rest, §7.6). ``batch_total``: the
    images are one rank's share of a batch of that many, and the means are over the whole batch
    (the ranks' losses add up to it)."""
    if head:
        if batch_total is None:
            return F.kl_div(out.log_softmax(-1), target.softmax(-1), reduction="batchmean")
        return F.kl_div(out.log_softmax(-1), target.softmax(-1), reduction="sum") / batch_total
    err = (out - target).square()
    if weights is not None:
        err = err * weights
    per_token_sum = err.sum(dim=1)
    if batch_total is None:
        return rec_weight * per_token_sum.mean()
    per_image = per_token_sum.numel() // max(per_token_sum.shape[0], 1)
    return rec_weight * per_token_sum.sum() / (per_image * batch_total)


def _train_block(
    model: nn.Module,
    name: str,
    data: BlockData,
    config: ReconstructConfig,
    gens: _Generators,
    bar: tqdm,
    ranks: Ranks,
) -> dict[str, float]:
    block = unit_module(model, name)
    head = ends_in_logits(model, name)
    before = _probe_error(block, data, config, head)
    calibrated = {k: v.detach().clone() for k, v in block.state_dict().items()}
    batch = min(config.batch_size, len(data))
    state = prepare_block(
        block,
        config.train_weights,
        config.train_act,
        config.drop_prob,
        gens.device,
        config.train_bias_norm,
        (ranks.rank, ranks.world_size, batch) if ranks.active else None,
    )
    optimizers, schedulers = _optimizers(state, config, config.iterations)
    first = None
    bar.set_description(f"reconstruct {name}")
    try:
        for step in range(1, config.iterations + 1):
            x, y, w = _batch(data, config, gens, ranks)
            total = batch if ranks.active else None
            rec = reconstruction_loss(block(x), y, head, config.rec_weight, w, total)
            beta = round_beta(step, config)
            reg = 0.0
            if beta is not None and state.adarounds:  # the same on every rank: count it once
                reg = config.round_reg * state.regularizer(beta) / ranks.world_size
            last = _descend(rec, rec + reg, optimizers, schedulers, state, ranks)
            first = last if first is None else first
            bar.update()
            if step % _POSTFIX_EVERY == 0 or step == config.iterations:
                reg_all = ranks.world_size * float(reg.detach() if torch.is_tensor(reg) else reg)
                bar.set_postfix(it=step, loss=f"{last + reg_all:.4g}", rec=f"{last:.4g}")
    finally:
        state.finish()
    after = _probe_error(block, data, config, head)
    return _keep_or_revert(block, calibrated, config, first, last, before, after)


def _train_network(
    model: nn.Module,
    fp_model: nn.Module,
    data: Tensor,
    config: ReconstructConfig,
    gens: _Generators,
    bar: tqdm,
    ranks: Ranks,
) -> dict[str, float]:
    """End-to-end stage: activation scales, biases and LayerNorm affines of the whole model
    trained on ``KL(softmax(y_FP) ‖ softmax(ŷ))`` of the logits, weights as they are."""
    with torch.no_grad():
        targets = torch.cat(
            [
                fp_model(data[i : i + config.batch_size])
                for i in range(0, len(data), config.batch_size)
            ]
        )
    probe = min(config.batch_size, len(data))

    def probe_loss() -> float:
        with torch.no_grad():
            return float(reconstruction_loss(model(data[:probe]), targets[:probe], True, 1.0))

    before = probe_loss()
    snapshot = {k: v.detach().clone() for k, v in model.state_dict().items()}
    state = prepare_block(model, False, config.train_act, 0.0, gens.device, True)
    optimizers, schedulers = _optimizers(state, config, config.network_iterations)
    bar.set_description("reconstruct network")
    first = last = None
    try:
        for step in range(1, config.network_iterations + 1):
            idx = gens.batch(len(data), config.batch_size, data.device)
            total = len(idx) if ranks.active else None
            idx = idx[ranks.rank :: ranks.world_size]
            loss = reconstruction_loss(model(data[idx]), targets[idx], True, 1.0, None, total)
            last = _descend(loss, loss, optimizers, schedulers, state, ranks)
            first = last if first is None else first
            bar.update()
            if step % _POSTFIX_EVERY == 0 or step == config.network_iterations:
                bar.set_postfix(it=step, kl=f"{last:.4g}")
    finally:
        state.finish()
    return _keep_or_revert(model, snapshot, config, first, last, before, probe_loss())


def _descend(
    rec: Tensor,
    loss: Tensor,
    optimizers: list,
    schedulers: list,
    state: BlockTraining,
    ranks: Ranks,
) -> float:
    """One optimisation step of every optimiser and scheduler on ``loss`` (scales kept
    positive); the reconstruction term ``rec`` of the whole batch, returned as a float. Ranks
    sum their gradients and ``rec`` first, so all take the same step."""
    params = [p for opt in optimizers for group in opt.param_groups for p in group["params"]]
    for opt in optimizers:
        opt.zero_grad(set_to_none=True)
    if optimizers:
        loss.backward()
    rec = rec.detach().reshape(1).clone()
    sum_tensors_across_([p.grad for p in params if p.grad is not None] + [rec], ranks)
    for opt in optimizers:
        opt.step()
    for scheduler in schedulers:
        scheduler.step()
    state.clamp_scales()
    return float(rec)


def _keep_or_revert(
    module: nn.Module,
    snapshot: dict[str, Tensor],
    config: ReconstructConfig,
    first: float | None,
    last: float | None,
    before: float,
    after: float,
) -> dict[str, float]:
    """Keep the training unless ``keep_if_worse`` is off and the probe loss rose (then the
    module goes back to ``snapshot``); the per-stage stats."""
    kept = config.keep_if_worse or after <= before
    if not kept:
        module.load_state_dict(snapshot)
    return {
        "rec_first": first,
        "rec_last": last,
        "probe_before": before,
        "probe_after": after,
        "kept": kept,
    }


def _probe_error(block: nn.Module, data: BlockData, config: ReconstructConfig, head: bool):
    """The block's loss in eval mode (no QDrop, hard rounding) on its first ``batch_size``
    samples (the unaugmented images): a noise-free before/after measure of the training."""
    n = min(config.batch_size, len(data))
    w = None if data.weights is None else data.weights[:n]
    with torch.no_grad():
        out = block(data.inputs[:n])
        return float(reconstruction_loss(out, data.targets[:n], head, config.rec_weight, w))


def _optimizers(state: BlockTraining, config: ReconstructConfig, iterations: int):
    """Adam on the AdaRound logits (constant lr), on the activation scales and on the float
    biases/LayerNorms (both cosine to 0 over ``iterations``)."""
    optimizers, schedulers = [], []
    if state.alphas:
        optimizers.append(torch.optim.Adam(state.alphas, lr=config.weight_lr))
    for params, lr in ((state.scales, config.act_lr), (state.floats, config.bias_norm_lr)):
        if params:
            opt = torch.optim.Adam(params, lr=lr)
            schedulers.append(torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=iterations))
            optimizers.append(opt)
    return optimizers, schedulers


def _batch(
    data: BlockData, config: ReconstructConfig, gens: _Generators, ranks: Ranks
) -> tuple[Tensor, Tensor, Tensor | None]:
    """A fresh random subset (§7.5); under QDrop with quantized inputs each element of the
    block input is the FP one with probability ``drop_prob``. Every rank draws the whole
    batch's indices and mask (the same on all) and keeps its share, every world_size-th."""
    idx = gens.batch(len(data), config.batch_size, data.inputs.device)
    share = slice(ranks.rank, None, ranks.world_size)
    mine = idx[share]
    x = data.inputs[mine]
    if data.fp_inputs is not None:
        whole = (len(idx), *x.shape[1:])
        rand = torch.rand(whole, generator=gens.device, device=x.device, dtype=x.dtype)
        keep_fp = (rand[share] < config.drop_prob).to(x.dtype)
        x = x.lerp_(data.fp_inputs[mine], keep_fp)
    w = None if data.weights is None else data.weights[mine]
    return x, data.targets[mine], w
