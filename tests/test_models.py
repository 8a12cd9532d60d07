"""Encoder, per-location BN, baselines, classifiers and attackers (Sec. 3 and 4 of the paper)."""

from __future__ import annotations

import itertools
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from conftest import needs_compiler
from privenc.config import ATTACKERS, NORMS, ClassifierConfig, EncoderConfig
from privenc.models import (
    BlurEncoder,
    Classifier,
    Encoder,
    IdentityEncoder,
    build_attacker,
    build_encoder,
    receptive_field,
)
from privenc.norms import BiasFreeBatchNorm2d, GlobalBatchNorm2d, PerLocationBatchNorm, make_norm

TINY = EncoderConfig(stages=[[4, 4], [4]], kernel_size=3, final_kernel_size=3, out_channels=3)
PAPER_STAGES = [[64] * 4, [128] * 4, [256] * 4, [256] * 2]


def skewed_batch(batch: int = 256, shape: tuple[int, int, int] = (2, 3, 3), seed: int = 0,
                 min_std: float = 0.5) -> torch.Tensor:
    """A batch where every (c, y, x) has its own mean (-5 to 12) and standard deviation."""
    g = torch.Generator().manual_seed(seed)
    means = torch.arange(int(np.prod(shape)), dtype=torch.float32).view(shape) - 5.0
    stds = torch.linspace(min_std, 4.0, int(np.prod(shape))).view(shape)
    return torch.randn((batch, *shape), generator=g) * stds + means


# --------------------------------------------------------------------------- PerLocationBatchNorm


def test_per_location_statistics_are_per_location() -> None:
    x = skewed_batch()
    y = PerLocationBatchNorm(2, 3, 3).train()(x)
    assert torch.allclose(y.mean(0), torch.zeros(2, 3, 3), atol=1e-5)
    assert torch.allclose(y.var(0, unbiased=False), torch.ones(2, 3, 3), atol=1e-3)
    # Per-channel BN normalizes each channel as a whole: locations keep their own offsets.
    z = nn.BatchNorm2d(2, affine=False).train()(x)
    assert z.mean(0).abs().max() > 0.5
    assert (z.var(0, unbiased=False) - 1).abs().max() > 0.5


def test_norm_variants_have_the_right_parameters() -> None:
    assert isinstance(make_norm("none", 4, 5, 5), nn.Identity)
    batch = make_norm("batch", 4, 5, 5)
    assert isinstance(batch, nn.BatchNorm2d) and batch.weight is not None and batch.bias is None
    assert set(dict(batch.named_parameters())) == {"weight"}
    affine = make_norm("per_location_affine", 4, 5, 5)
    assert isinstance(affine, PerLocationBatchNorm)
    assert affine.weight.shape == affine.bias.shape == (4, 5, 5)
    proposed = make_norm("per_location", 4, 5, 5)
    assert isinstance(proposed, PerLocationBatchNorm)
    assert proposed.weight.shape == (4, 5, 5) and proposed.bias is None
    assert list(PerLocationBatchNorm(4, 5, 5, scale=False, bias=False).parameters()) == []
    with pytest.raises(ValueError, match=", ".join(NORMS)):
        make_norm("group", 4, 5, 5)
    # The bias-free standard BN still normalizes and trains its scale.
    out = batch.train()(torch.randn(8, 4, 5, 5))
    out.sum().backward()
    assert batch.weight.grad is not None


def test_running_stats_are_tracked_and_used_in_eval() -> None:
    x = skewed_batch(batch=16)
    bn = PerLocationBatchNorm(2, 3, 3, scale=False, bias=False, momentum=1.0).train()
    bn(x)
    assert torch.allclose(bn.running_mean, x.mean(0), atol=1e-5)
    assert torch.allclose(bn.running_var, x.var(0, unbiased=True), atol=1e-4)
    assert bn.num_batches_tracked.item() == 1

    other = skewed_batch(batch=3, seed=1)
    expected = (other - x.mean(0)) / torch.sqrt(x.var(0, unbiased=True) + bn.eps)
    assert torch.allclose(bn.eval()(other), expected, atol=1e-5)

    slow = PerLocationBatchNorm(2, 3, 3, momentum=0.1).train()
    slow(x)
    assert torch.allclose(slow.running_mean, 0.1 * x.mean(0), atol=1e-5)
    assert torch.allclose(slow.running_var, 0.9 + 0.1 * x.var(0, unbiased=True), atol=1e-4)


@pytest.mark.parametrize("scale, bias", [(True, True), (True, False), (False, False)])
def test_per_location_bn_gives_the_same_numbers_on_a_channels_last_input(scale: bool, bias: bool) -> None:
    torch.manual_seed(0)
    plain = PerLocationBatchNorm(5, 4, 3, scale=scale, bias=bias)
    with torch.no_grad():
        for p in plain.parameters():
            p.uniform_(0.5, 1.5)
    nhwc = PerLocationBatchNorm(5, 4, 3, scale=scale, bias=bias)
    nhwc.load_state_dict(plain.state_dict())
    x = torch.randn(8, 5, 4, 3) * 3 + 1
    x_plain = x.clone().requires_grad_()
    x_nhwc = x.contiguous(memory_format=torch.channels_last).requires_grad_()
    y_plain, y_nhwc = plain(x_plain), nhwc(x_nhwc)
    assert y_nhwc.is_contiguous(memory_format=torch.channels_last) and not y_nhwc.is_contiguous()
    torch.testing.assert_close(y_nhwc, y_plain)
    grad = torch.randn_like(y_plain)
    y_plain.backward(grad)
    y_nhwc.backward(grad)
    torch.testing.assert_close(x_nhwc.grad, x_plain.grad)
    for a, b in zip(plain.parameters(), nhwc.parameters()):
        torch.testing.assert_close(b.grad, a.grad)
    torch.testing.assert_close(nhwc.running_mean, plain.running_mean)
    torch.testing.assert_close(nhwc.running_var, plain.running_var)
    assert nhwc.running_mean.is_contiguous()  # the buffers keep their (C, H, W) layout
    plain.eval(), nhwc.eval()
    torch.testing.assert_close(nhwc(x.contiguous(memory_format=torch.channels_last)), plain(x))


@pytest.mark.parametrize("channels_last", [False, True])
def test_per_location_bn_forward_and_gradients_match_a_float64_reference(channels_last: bool, device) -> None:
    torch.manual_seed(0)
    bn = PerLocationBatchNorm(3, 4, 5, scale=True, bias=True).to(device)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-1, 1)
    x = skewed_batch(batch=16, shape=(3, 4, 5)).to(device)
    x32 = (x.contiguous(memory_format=torch.channels_last) if channels_last else x.clone()).requires_grad_()
    grad = torch.randn(x.shape, generator=torch.Generator().manual_seed(1)).to(device)
    bn(x32).backward(grad)

    # The formula, in float64 autograd operations: every (c, y, x) over the batch.
    x64 = x.double().requires_grad_()
    weight, bias = bn.weight.detach().double().requires_grad_(), bn.bias.detach().double().requires_grad_()
    mean, var = x64.mean(0), x64.var(0, unbiased=False)
    y64 = (x64 - mean) / torch.sqrt(var + bn.eps) * weight + bias
    y64.backward(grad.double())

    torch.testing.assert_close(bn.eval()(x32.detach()).double(), (x64.detach() - 0.1 * mean.detach()) /
                               torch.sqrt(0.9 + 0.1 * x64.detach().var(0) + bn.eps) * weight.detach() + bias.detach(),
                               atol=1e-4, rtol=1e-4)  # eval: the running statistics after one step
    torch.testing.assert_close(x32.grad.double(), x64.grad, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(bn.weight.grad.double(), weight.grad, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(bn.bias.grad.double(), bias.grad, atol=1e-4, rtol=1e-4)


def test_per_location_bn_keeps_precision_at_nearly_constant_locations() -> None:
    # Mean 100, std 0.01 in float32: a one-pass E[x^2] - E[x]^2 variance loses every digit here
    # (1e4 * 6e-8 is larger than the variance, 1e-4); two passes keep the output within 1e-2.
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 4, 6, 6, generator=g, dtype=torch.float64) * 0.01 + 100
    reference = (x - x.mean(0)) / torch.sqrt(x.var(0, unbiased=False) + 1e-5)
    for memory_format in (torch.contiguous_format, torch.channels_last):
        y = PerLocationBatchNorm(4, 6, 6, scale=False, bias=False).train()(x.float().contiguous(
            memory_format=memory_format))
        assert (y.double() - reference).abs().max() < 1e-2


def test_per_location_bn_rejects_a_wrong_shape_and_a_single_image() -> None:
    bn = PerLocationBatchNorm(2, 3, 3).train()
    with pytest.raises(ValueError, match="shape"):
        bn(torch.zeros(4, 2, 3, 4))
    with pytest.raises(ValueError, match="more than one"):
        bn(torch.zeros(1, 2, 3, 3))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


BN_KINDS = {
    "per_location": lambda: PerLocationBatchNorm(2, 3, 3, scale=True, bias=True, momentum=0.5),
    "per_channel": lambda: GlobalBatchNorm2d(2, momentum=0.5),  # the classifiers' BN
    "per_channel_no_bias": lambda: BiasFreeBatchNorm2d(2, momentum=0.5),  # the encoder's "batch" ablation
}


def _make_distributed_bn(kind: str, dtype: torch.dtype) -> nn.Module:
    torch.manual_seed(0)
    bn = BN_KINDS[kind]()
    with torch.no_grad():  # non-trivial affine parameters, so their gradients matter
        bn.weight.uniform_(0.5, 1.5)
        if bn.bias is not None:
            bn.bias.uniform_(-0.5, 0.5)
    return bn.to(dtype).train()


def _bn_step(bn: nn.Module, x: torch.Tensor, g: torch.Tensor) -> dict[str, torch.Tensor]:
    """One training forward and backward of sum(bn(x) * g); everything the test compares."""
    x = x.clone().requires_grad_(True)
    y = bn(x)
    (y * g).sum().backward()
    found = {"y": y.detach(), "grad": x.grad, "weight_grad": bn.weight.grad,
             "running_mean": bn.running_mean.clone(), "running_var": bn.running_var.clone()}
    if bn.bias is not None:
        found["bias_grad"] = bn.bias.grad
    return found


DTYPES = {"float64": torch.float64, "float32": torch.float32}


def _distributed_worker(rank: int, world: int, port: int, out_dir: str, x: torch.Tensor, g: torch.Tensor,
                        splits: list[int]) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        part = slice(sum(splits[:rank]), sum(splits[:rank + 1]))
        results = {f"{kind}/{name}": _bn_step(_make_distributed_bn(kind, dtype), x[part].to(dtype), g[part].to(dtype))
                   for kind in BN_KINDS for name, dtype in DTYPES.items()}
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
        # Both ranks done before either tears gloo down: a rank that destroys the group while
        # the other is still in a collective can abort it (seen once on a loaded 2-core machine).
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_batch_norms_use_global_batch_statistics_across_ranks(tmp_path: Path) -> None:
    # Two gloo processes with unequal local batches must reproduce one process on the
    # concatenated batch: outputs, input gradients, summed parameter gradients, buffers; for the
    # per-location BN and for the per-channel ones (classifiers, the "batch" ablation), whose
    # single-process reference is torch's own kernel.
    # In float64 to 1e-5 (that checks the statistics and their gradients); in float32 too,
    # where locations with a large mean and a small spread check numerical stability (a
    # one-pass sum of squares is off by 1e-4 in the outputs).
    x = skewed_batch(batch=10, min_std=0.1).double()
    g = torch.randn(x.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    splits = [4, 6]
    mp.spawn(_distributed_worker, args=(2, _free_port(), str(tmp_path), x, g, splits), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]

    for kind, (name, dtype) in itertools.product(BN_KINDS, DTYPES.items()):
        single = _bn_step(_make_distributed_bn(kind, dtype), x.to(dtype), g.to(dtype))
        parts = [r[f"{kind}/{name}"] for r in ranks]
        name = f"{kind}/{name}"
        # float32 gradients are sums in a different order (and ~20 at the std-0.1 locations):
        # compare them relative to their size.
        grad_tol = 1e-5 if dtype == torch.float64 else 1e-5 * single["grad"].abs().max().item()
        param_tol = 1e-5 if dtype == torch.float64 else 1e-4
        assert torch.allclose(torch.cat([p["y"] for p in parts]), single["y"], atol=1e-5), name
        assert torch.allclose(torch.cat([p["grad"] for p in parts]), single["grad"], atol=grad_tol), name
        for key in ("weight_grad", "bias_grad"):
            if key in single:
                assert torch.allclose(parts[0][key] + parts[1][key], single[key], atol=param_tol), (name, key)
        for p in parts:
            assert torch.allclose(p["running_mean"], single["running_mean"], atol=1e-5), name
            assert torch.allclose(p["running_var"], single["running_var"], rtol=1e-5, atol=1e-5), name


# --------------------------------------------------------------------------- Encoder


def test_paper_reconstruction_shape_and_receptive_field() -> None:
    # The paper (Sec. 3): 224 -> 28x28x3 at stride 8 with a receptive field of exactly 112.
    paper = EncoderConfig(stages=PAPER_STAGES, kernel_size=3, final_kernel_size=3, out_channels=3)
    assert receptive_field(paper) == 112
    # Shape and receptive field do not depend on the widths: build it narrow to stay fast.
    narrow = EncoderConfig(stages=[[1] * 4, [1] * 4, [1] * 4, [1] * 2], kernel_size=3, final_kernel_size=3)
    encoder = Encoder(narrow, image_size=224)
    assert encoder.output_shape == (3, 28, 28)
    assert encoder.receptive_field == 112
    assert encoder(torch.randn(2, 3, 224, 224)).shape == (2, 3, 28, 28)


def test_receptive_field_matches_the_input_gradient_extent() -> None:
    # Positive weights and positive inputs keep every ReLU active, average pooling spreads the
    # gradient to every pixel of a window, and eval mode (running stats: identity-like) makes
    # the encoding a per-image function: the non-zero input gradient of one output element is
    # then exactly its receptive field.
    cfg = EncoderConfig(stages=[[2, 2], [2], [2]], kernel_size=3, final_kernel_size=5, pool="avg")
    encoder = Encoder(cfg, image_size=64).eval()
    with torch.no_grad():
        for module in encoder.modules():
            if isinstance(module, nn.Conv2d):  # averaging weights: no tanh saturation
                module.weight.fill_(1.0 / module.weight[0].numel())
    x = torch.rand(1, 3, 64, 64).add_(0.1).requires_grad_(True)
    _, h, w = encoder.output_shape
    encoder(x)[0, 0, h // 2, w // 2].backward()
    rows = torch.nonzero(x.grad.abs().sum(dim=(0, 1, 3)))
    cols = torch.nonzero(x.grad.abs().sum(dim=(0, 1, 2)))
    assert rows.min() > 0 and rows.max() < 63  # the window is not clipped by the border
    extent = (int(rows.max() - rows.min()) + 1, int(cols.max() - cols.min()) + 1)
    assert extent == (receptive_field(cfg), receptive_field(cfg)) == (encoder.receptive_field,) * 2
    assert receptive_field(cfg) == 1 + 2 + 2 + 1 + 2 * 2 + 2 + 4 * 2 + 4 * 4


def test_encoder_output_is_bounded_and_satisfies_the_variance_constraint(device) -> None:
    torch.manual_seed(0)
    encoder = Encoder(TINY, image_size=8).to(device).train()
    captured = {}
    output_norm = encoder.layers[-2]
    assert isinstance(output_norm, PerLocationBatchNorm) and list(output_norm.parameters()) == []
    output_norm.register_forward_hook(lambda module, inputs, output: captured.update(pre_tanh=output))
    z = encoder(torch.rand(32, 3, 8, 8, device=device))
    assert z.shape == (32, *encoder.output_shape) == (32, 3, 4, 4)
    assert z.abs().max() < 1
    pre = captured["pre_tanh"]
    assert torch.allclose(pre.mean(0), torch.zeros(3, 4, 4, device=device), atol=1e-5)
    assert torch.allclose(pre.var(0, unbiased=False), torch.ones(3, 4, 4, device=device), atol=1e-3)


@pytest.mark.parametrize("norm", NORMS)
def test_encoder_convs_have_no_bias_and_the_output_norm_is_always_there(norm: str) -> None:
    cfg = EncoderConfig(stages=TINY.stages, norm=norm)
    encoder = Encoder(cfg, image_size=8)
    convs = [m for m in encoder.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 4 and all(c.bias is None for c in convs)
    assert isinstance(encoder.layers[-2], PerLocationBatchNorm) and isinstance(encoder.layers[-1], nn.Tanh)
    assert encoder(torch.rand(4, 3, 8, 8)).shape == (4, 3, 4, 4)


def test_encoder_in_eval_mode_encodes_each_image_independently_of_the_batch(device) -> None:
    torch.manual_seed(0)
    encoder = Encoder(TINY, image_size=8).to(device).train()
    for _ in range(3):  # populate running statistics
        encoder(torch.rand(16, 3, 8, 8, device=device))
    encoder.eval()
    x = torch.rand(5, 3, 8, 8, device=device)
    with torch.no_grad():
        together = encoder(x)
        alone = torch.cat([encoder(x[i:i + 1]) for i in range(5)])
    assert torch.allclose(together, alone, atol=1e-6)


def test_encoder_rejects_an_indivisible_image_size() -> None:
    with pytest.raises(ValueError, match="divisible"):
        Encoder(EncoderConfig(stages=[[2], [2], [2]]), image_size=10)


# --------------------------------------------------------------------------- baselines


def test_blur_encoder_matches_a_hand_computation() -> None:
    # 16 px: window round(120/224 * 16) = 9, every 8th pixel sampled at offset 4.
    image = np.random.default_rng(0).random((1, 3, 16, 16)).astype(np.float32)
    blur = BlurEncoder(image_size=16, out_size=2)
    assert blur.window == 9 and blur.output_shape == (3, 2, 2)
    assert list(blur.parameters()) == []
    expected = np.zeros((1, 3, 2, 2))
    for c in range(3):
        for i in range(2):
            for j in range(2):
                cy, cx = 4 + 8 * i, 4 + 8 * j
                total, count = 0.0, 0
                for y in range(cy - 4, cy + 5):
                    for x in range(cx - 4, cx + 5):
                        if 0 <= y < 16 and 0 <= x < 16:  # padding is not averaged in
                            total += image[0, c, y, x]
                            count += 1
                expected[0, c, i, j] = total / count
    got = blur(torch.from_numpy(image))
    assert np.allclose(got.numpy(), expected, atol=1e-6)
    # one channel (grey images): the same filter, channel by channel
    grey = BlurEncoder(image_size=16, out_size=2, in_channels=1)
    assert grey.output_shape == (1, 2, 2)
    assert np.allclose(grey(torch.from_numpy(image[:, 1:2])).numpy(), expected[:, 1:2], atol=1e-6)


def test_blur_encoder_at_the_paper_size() -> None:
    blur = BlurEncoder(image_size=224, out_size=28)
    assert blur.window % 2 == 1 and abs(blur.window - 120) <= 1 and blur.factor == 8
    assert blur(torch.rand(1, 3, 224, 224)).shape == (1, 3, 28, 28)


def test_build_encoder_kinds() -> None:
    learned = build_encoder("learned", TINY, 8)
    assert isinstance(learned, Encoder)
    identity = build_encoder("identity", TINY, 8)
    x = torch.rand(2, 3, 8, 8)
    assert isinstance(identity, IdentityEncoder) and identity(x) is x and identity.output_shape == (3, 8, 8)
    blur = build_encoder("blur", TINY, 8)
    assert isinstance(blur, BlurEncoder) and blur.output_shape == learned.output_shape
    assert blur(x).shape == (2, *learned.output_shape)
    with pytest.raises(ValueError, match="learned, identity, blur"):
        build_encoder("pixelate", TINY, 8)


# --------------------------------------------------------------------------- classifiers


def test_classifier_shapes_and_features_head_split() -> None:
    cfg = ClassifierConfig(stages=[[4, 4], [8]], kernel_size=3, batch_norm=True)
    clf = Classifier(cfg, in_channels=3, num_classes=2, input_size=8)
    x = torch.rand(4, 3, 8, 8)
    assert clf.features(x).shape == (4, 8, 4, 4)
    assert clf(x).shape == (4, 2)
    assert all(m.bias is None for m in clf.modules() if isinstance(m, nn.Conv2d))
    no_bn = Classifier(ClassifierConfig(stages=[[4], [4], [4]], batch_norm=False), 3, 3, input_size=2)
    assert all(m.bias is not None for m in no_bn.modules() if isinstance(m, nn.Conv2d))
    assert sum(isinstance(m, nn.MaxPool2d) for m in no_bn.modules()) == 1  # 2 -> 1, then no more pools
    assert no_bn(torch.rand(4, 3, 2, 2)).shape == (4, 3)


@pytest.mark.parametrize("family", ATTACKERS)
def test_attackers_output_logits(family: str, device) -> None:
    cfg = ClassifierConfig(stages=[[4], [8]])
    attacker = build_attacker(family, cfg, in_channels=3, num_classes=2, input_size=8).to(device)
    assert attacker(torch.rand(5, 3, 8, 8, device=device)).shape == (5, 2)


def test_wide_attacker_is_wider_and_deeper() -> None:
    cfg = ClassifierConfig(stages=[[4], [8, 8]])
    paper = build_attacker("paper", cfg, 3, 2, 8)
    wide = build_attacker("wide", cfg, 3, 2, 8)
    widths = [m.out_channels for m in wide.modules() if isinstance(m, nn.Conv2d)]
    assert widths == [8, 8, 16, 16, 16]
    assert sum(isinstance(m, nn.Conv2d) for m in paper.modules()) == 3


def test_unknown_attacker_family_lists_the_valid_ones() -> None:
    with pytest.raises(ValueError, match="paper, wide, mlp, linear"):
        build_attacker("transformer", ClassifierConfig(), 3, 2, 8)


@pytest.mark.slow
@needs_compiler
def test_encoder_compiles_with_per_location_bn_on_a_channels_last_input(device) -> None:
    # benchmarks/gpu_check.py times a compiled encoder; the per-location BN must trace (no graph
    # break on data pointers) and give eager's numbers, its running statistics included.
    torch.manual_seed(0)
    eager = Encoder(TINY, 16).to(device, memory_format=torch.channels_last)
    compiled_module = Encoder(TINY, 16).to(device, memory_format=torch.channels_last)
    compiled_module.load_state_dict(eager.state_dict())
    compiled = torch.compile(compiled_module, fullgraph=True)
    x = torch.randn(8, 3, 16, 16, device=device).contiguous(memory_format=torch.channels_last)
    grad = torch.randn(8, *eager.output_shape, device=device)
    eager(x).backward(grad)
    compiled(x).backward(grad)
    for (name, a), b in zip(eager.state_dict().items(), compiled_module.state_dict().values()):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-4, msg=name)
    for a, b in zip(eager.parameters(), compiled_module.parameters()):
        torch.testing.assert_close(b.grad, a.grad, atol=1e-3, rtol=1e-3)
    eager.eval(), compiled_module.eval()
    torch.testing.assert_close(compiled(x), eager(x), atol=1e-5, rtol=1e-4)
