"""The layers: parameters and buffers, BatchNorm compatibility, from_batchnorm, and the
errors for bad input."""

import io
import subprocess
import sys

import pytest
import torch
from torch import nn

import cbn_ext
from cbn_ext import CompoundBatchNorm1d, CompoundBatchNorm2d, CompoundBatchNorm3d
from conftest import HAS_CUDA, R, backend, device_params, rel_err, torch_device


def test_parameters_and_buffers():
    m = CompoundBatchNorm2d(6, num_components=3)
    assert m.weight.shape == (3, 6) and torch.equal(m.weight, torch.ones(3, 6))
    assert m.bias.shape == (3, 6) and torch.equal(m.bias, torch.zeros(3, 6))
    assert torch.equal(m.running_mean, torch.zeros(3, 6))
    assert torch.equal(m.running_var, torch.ones(3, 6))
    assert torch.allclose(m.running_prior, torch.full((3,), 1 / 3))
    assert m.num_batches_tracked.dtype == torch.long and m.num_batches_tracked.item() == 0
    sd = m.state_dict()
    assert set(sd) == {"weight", "bias", "running_mean", "running_var", "running_prior",
                       "num_batches_tracked"}
    assert "num_components=3" in repr(m)


def test_float64_layer_and_device_dtype_arguments():
    m = CompoundBatchNorm1d(4, 2, dtype=torch.float64, device="cpu")
    assert m.weight.dtype == torch.float64 and m.running_prior.dtype == torch.float64
    y = m(torch.randn(10, 4, dtype=torch.float64))
    assert y.dtype == torch.float64


def test_affine_false_and_no_tracking():
    m = CompoundBatchNorm2d(5, 2, affine=False)
    assert m.weight is None and m.bias is None
    assert "weight" not in m.state_dict()
    m1 = CompoundBatchNorm2d(5, 1, track_running_stats=False)
    assert m1.running_mean is None and "running_mean" not in m1.state_dict()
    x = torch.randn(4, 5, 3, 3)
    bn = nn.BatchNorm2d(5, track_running_stats=False)
    m1.eval()
    bn.eval()
    assert rel_err(m1(x), bn(x)) <= 1e-5  # batch statistics at eval, as BatchNorm


def test_track_running_stats_false_needs_one_component():
    with pytest.raises(ValueError, match="track_running_stats=False"):
        CompoundBatchNorm2d(5, 2, track_running_stats=False)


@pytest.mark.parametrize("cls,shape", [(CompoundBatchNorm1d, (9, 4)),
                                       (CompoundBatchNorm1d, (3, 4, 7)),
                                       (CompoundBatchNorm2d, (3, 4, 5, 6)),
                                       (CompoundBatchNorm3d, (2, 4, 3, 4, 5))])
def test_layer_matches_functional_reference(cls, shape):
    torch.manual_seed(0)
    m = cls(4, 3)
    with torch.no_grad():
        m.weight.normal_(1, 0.2)
        m.bias.normal_(0, 0.2)
    ref_state = {k: v.clone() for k, v in m.state_dict().items()}
    for step in range(3):
        x = torch.randn(shape) + step
        y = m(x)
        ref = R.compound_batch_norm(x.double(), ref_state["running_mean"].double(),
                                    ref_state["running_var"].double(),
                                    ref_state["running_prior"].double(),
                                    ref_state["weight"].double(), ref_state["bias"].double(),
                                    True, 0.1, 1e-5, ref_state["num_batches_tracked"], None)
        assert rel_err(y, ref) <= 1e-5
        ref_state = {k: v.clone() for k, v in m.state_dict().items()}
    assert m.num_batches_tracked.item() == 3
    m.eval()
    x = torch.randn(shape)
    ref = R.compound_batch_norm(x.double(), m.running_mean.double(), m.running_var.double(),
                                m.running_prior.double(), m.weight.double(), m.bias.double())
    assert rel_err(m(x), ref) <= 1e-5


def test_first_training_batch_initialises_the_mixture():
    torch.manual_seed(1)
    m = CompoundBatchNorm2d(3, 4, momentum=1.0)
    x = torch.randn(8, 3, 4, 4)
    m(x)
    # momentum 1: the running means are the batch's component means, not the zeros
    assert m.running_mean.abs().sum() > 0
    assert torch.allclose(m.running_prior.sum(), torch.tensor(1.0))
    m.reset_running_stats()
    assert m.num_batches_tracked.item() == 0 and torch.equal(m.running_mean, torch.zeros(4, 3))


def test_momentum_none():
    torch.manual_seed(2)
    m = CompoundBatchNorm2d(3, 1, momentum=None)
    bn = nn.BatchNorm2d(3, momentum=None)
    for _ in range(3):
        x = torch.randn(4, 3, 5, 5) * 2 + 1
        m(x)
        bn(x)
    assert rel_err(m.running_mean[0], bn.running_mean) <= 1e-5
    assert rel_err(m.running_var[0], bn.running_var) <= 1e-5
    assert m.num_batches_tracked.item() == bn.num_batches_tracked.item() == 3


@pytest.mark.parametrize("K", [1, 2, 4])
@pytest.mark.parametrize("bn_cls,cls,shape", [
    (nn.BatchNorm1d, CompoundBatchNorm1d, (6, 5)),
    (nn.BatchNorm2d, CompoundBatchNorm2d, (3, 5, 4, 4)),
    (nn.BatchNorm3d, CompoundBatchNorm3d, (2, 5, 2, 3, 3))])
def test_from_batchnorm(bn_cls, cls, shape, K):
    """Equal components are BatchNorm: eval output equals the BatchNorm's."""
    torch.manual_seed(3)
    bn = bn_cls(5, momentum=0.3, eps=1e-3)
    with torch.no_grad():
        bn.weight.normal_(1, 0.3)
        bn.bias.normal_(0, 0.3)
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2)
    bn.bias.requires_grad_(False)
    bn.eval()
    m = cls.from_batchnorm(bn, K)
    assert not m.training and m.momentum == 0.3 and m.eps == 1e-3
    assert m.weight.requires_grad and not m.bias.requires_grad
    assert m.num_batches_tracked.item() == 0
    x = torch.randn(shape)
    assert rel_err(m(x), bn(x)) <= 1e-5
    bn.train()
    assert cls.from_batchnorm(bn, K).training


def test_from_batchnorm_rejects_other_layers():
    with pytest.raises(TypeError):
        CompoundBatchNorm2d.from_batchnorm(nn.LayerNorm(4))


def test_state_dict_round_trip():
    torch.manual_seed(4)
    m = CompoundBatchNorm2d(4, 3)
    for _ in range(2):
        m(torch.randn(4, 4, 3, 3))
    buf = io.BytesIO()
    torch.save(m.state_dict(), buf)
    buf.seek(0)
    m2 = CompoundBatchNorm2d(4, 3)
    m2.load_state_dict(torch.load(buf))
    m.eval()
    m2.eval()
    x = torch.randn(2, 4, 3, 3)
    assert torch.equal(m(x), m2(x))
    assert m2.num_batches_tracked.item() == 2


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_output_keeps_memory_format(memory_format):
    m = CompoundBatchNorm2d(6, 2)
    x = torch.randn(3, 6, 5, 4).contiguous(memory_format=memory_format)
    assert m(x).is_contiguous(memory_format=memory_format)
    m.eval()
    assert m(x).is_contiguous(memory_format=memory_format)


def test_half_precision_input_with_float_layer():
    m = CompoundBatchNorm2d(6, 2)
    for dt in (torch.float16, torch.bfloat16):
        y = m(torch.randn(3, 6, 5, 4).to(dt))
        assert y.dtype == dt and m.running_mean.dtype == torch.float32


# ---------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------

def test_wrong_ndim():
    with pytest.raises(ValueError, match=r"expected 4D input \(got 3D input\)"):
        CompoundBatchNorm2d(4)(torch.randn(2, 4, 5))
    with pytest.raises(ValueError, match="expected 2D or 3D input"):
        CompoundBatchNorm1d(4)(torch.randn(2, 4, 5, 5))
    with pytest.raises(ValueError, match="expected 5D input"):
        CompoundBatchNorm3d(4)(torch.randn(2, 4, 5, 5))


def test_wrong_channel_count():
    with pytest.raises(ValueError, match="expected input with 4 channels"):
        CompoundBatchNorm2d(4)(torch.randn(2, 5, 3, 3))
    # the functional form checks the parameter shapes
    with pytest.raises(ValueError, match=r"shape \(2, 5\)"):
        cbn_ext.compound_batch_norm(torch.randn(2, 5, 3, 3), torch.zeros(2, 4), torch.ones(2, 4),
                                    torch.full((2,), 0.5))


def test_wrong_dtype():
    m = CompoundBatchNorm2d(4)
    with pytest.raises(TypeError, match="float32, float64, float16 or bfloat16"):
        m(torch.ones(2, 4, 3, 3, dtype=torch.int64))
    with pytest.raises(TypeError, match="of dtype float64 for float64 input, got float32"):
        m(torch.randn(2, 4, 3, 3, dtype=torch.float64))
    with pytest.raises(TypeError, match="of dtype float32 for float32 input, got float64"):
        m.double()(torch.randn(2, 4, 3, 3))


def test_device_mismatch():
    x = torch.randn(2, 4, 3, 3)
    rm = torch.zeros(2, 4, device="meta")
    with pytest.raises(RuntimeError, match="expected running_mean on cpu"):
        cbn_ext.compound_batch_norm(x, rm, torch.ones(2, 4), torch.full((2,), 0.5))


def test_cuda_tensor_without_cuda_kernels(monkeypatch):
    """A build without CUDA kernels says so, instead of a dispatcher error."""
    from cbn_ext import functional
    monkeypatch.setattr(functional, "_cuda_built", False)

    class FakeCudaTensor:
        device = torch.device("cuda")

    with pytest.raises(RuntimeError, match="no CUDA kernels"):
        functional._check_devices(FakeCudaTensor())


def test_one_value_per_channel_in_training():
    m = CompoundBatchNorm2d(4, 2)
    with pytest.raises(ValueError, match="Expected more than 1 value per channel when training"):
        m(torch.randn(1, 4, 1, 1))
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        CompoundBatchNorm1d(4, 1)(torch.randn(1, 4))
    m.eval()
    assert m(torch.randn(1, 4, 1, 1)).shape == (1, 4, 1, 1)


@pytest.mark.parametrize("device", device_params(emu=True))
def test_bad_group_ids(device):
    """On the CPU a ValueError names the id; on a GPU (and the emulated backend) the kernel
    checks the ids, a device-side assert, so that the host never waits to read them."""
    if device == "cuda":
        pytest.skip("a device-side assert ends the CUDA context: "
                    "test_bad_group_ids_device_side_assert runs it in a subprocess")
    dev = torch_device(device)
    x = torch.randn(4, 3, 2, 2, device=dev)
    args = (torch.zeros(2, 3, device=dev), torch.ones(2, 3, device=dev),
            torch.full((2,), 0.5, device=dev))
    bad_ids = (ValueError, r"group ids in \[0, 2\)") if device == "cpu" else (
        RuntimeError, r"device-side assertion `grp >= 0 && grp < K")
    with backend(device):
        for training in (True, False):
            with pytest.raises(bad_ids[0], match=bad_ids[1]):
                cbn_ext.compound_batch_norm(x, *args, training=training,
                                            groups=torch.tensor([0, 1, 2, 0], device=dev))
            with pytest.raises(bad_ids[0], match=bad_ids[1]):
                cbn_ext.compound_batch_norm(x, *args, training=training,
                                            groups=torch.tensor([0, -1, 1, 0], device=dev))
            with pytest.raises(ValueError, match="one group per sample"):
                cbn_ext.compound_batch_norm(x, *args, training=training,
                                            groups=torch.tensor([0, 1, 1], device=dev))
            with pytest.raises(TypeError, match="int64"):
                cbn_ext.compound_batch_norm(x, *args, training=training,
                                            groups=torch.tensor([0., 1., 1., 0.], device=dev))
        # K = 1 reads no group ids, yet checks them as well
        for training in (True, False):
            with pytest.raises(bad_ids[0], match=bad_ids[1].replace("2", "1")):
                cbn_ext.compound_batch_norm(x, args[0][:1], args[1][:1], training=training,
                                            groups=torch.tensor([0, 1, 0, 0], device=dev))


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device and a build with CUDA kernels")
def test_bad_group_ids_device_side_assert():
    """A group id outside [0, K) on a GPU stops the kernel (a device-side assert, as
    PyTorch's index kernels do); in a subprocess, since the CUDA context is lost after."""
    code = (
        "import torch, cbn_ext\n"
        "x = torch.randn(4, 3, 2, 2, device='cuda')\n"
        "a = (torch.zeros(2, 3, device='cuda'), torch.ones(2, 3, device='cuda'),\n"
        "     torch.full((2,), 0.5, device='cuda'))\n"
        "y = cbn_ext.compound_batch_norm(x, *a, training=True,\n"
        "                                groups=torch.tensor([0, 1, 2, 0], device='cuda'))\n"
        "torch.cuda.synchronize()\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode != 0
    assert "device-side assert" in out.stderr, out.stderr[-2000:]


def test_missing_running_statistics():
    x = torch.randn(4, 3, 2, 2)
    with pytest.raises(ValueError, match="needs running_mean"):
        cbn_ext.compound_batch_norm(x, None, None, weight=torch.ones(2, 3), training=True)
    with pytest.raises(ValueError, match="needed when not training"):
        cbn_ext.compound_batch_norm(x, None, None)
    with pytest.raises(ValueError, match="needs running_prior"):
        cbn_ext.compound_batch_norm(x, torch.zeros(2, 3), torch.ones(2, 3), None, training=True)
    with pytest.raises(ValueError, match="momentum=None"):
        cbn_ext.compound_batch_norm(x, torch.zeros(2, 3), torch.ones(2, 3), torch.full((2,), .5),
                                    training=True, momentum=None)


def test_build_info():
    info = cbn_ext.build_info()
    assert info["cpu"] is True and isinstance(info["cuda"], bool)
    assert info["torch"].split(".")[:2] == torch.__version__.split(".")[:2]
    assert info["cpu_isa"] in ("avx512", "avx2", "baseline")


# ---------------------------------------------------------------------------------------
# Drop-in points with nn.BatchNorm*d (bias=False, eps, BatchNorm checkpoints)
# ---------------------------------------------------------------------------------------

def _small_net(norm, C=6):
    """A torchvision-style block, built with the given norm_layer."""
    return nn.Sequential(nn.Conv2d(3, C, 3, padding=1, bias=False), norm(C), nn.ReLU(),
                         nn.Conv2d(C, C, 3, padding=1, bias=False), norm(C), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(C, 3))


@pytest.mark.parametrize("K", [1, 2])
def test_bias_false(K):
    """BatchNorm's keyword-only bias=False: a weight without bias."""
    torch.manual_seed(5)
    m = CompoundBatchNorm2d(4, K, bias=False)
    assert m.bias is None and m.weight.shape == (K, 4)
    assert set(m.state_dict()) == {"weight", "running_mean", "running_var", "running_prior",
                                   "num_batches_tracked"}
    assert "bias=False" in repr(m)
    x = torch.randn(3, 4, 5, 5, requires_grad=True)
    m(x).sum().backward()
    assert m.weight.grad is not None and x.grad is not None
    bn = nn.BatchNorm2d(4, bias=False)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.running_mean.normal_()
    bn.eval()
    c = CompoundBatchNorm2d.from_batchnorm(bn, K)
    assert c.bias is None
    assert rel_err(c(x), bn(x)) <= 1e-5
    sync = cbn_ext.SyncCompoundBatchNorm(4, K, bias=False)
    assert sync.bias is None
    assert cbn_ext.SyncCompoundBatchNorm.convert_sync_batchnorm(c).bias is None


def test_convert_model_with_bias_false_batchnorm():
    torch.manual_seed(6)
    model = _small_net(lambda C: nn.BatchNorm2d(C, bias=False)).eval()
    x = torch.randn(4, 3, 7, 7)
    before = model(x)
    converted = cbn_ext.convert_batchnorm(model, num_components=2)
    assert all(m.bias is None for m in converted.modules()
               if isinstance(m, cbn_ext.CompoundBatchNorm2d))
    assert rel_err(converted(x), before) <= 1e-5
    converted.train()
    converted(x).sum().backward()


def test_eps_must_be_positive_in_training():
    x = torch.randn(4, 3, 2, 2)
    for eps in (0.0, -1.0):
        m = CompoundBatchNorm2d(3, 2, eps=eps)
        with pytest.raises(ValueError, match="eps must be positive during training"):
            m(x)
        assert m.num_batches_tracked.item() == 0
    with pytest.raises(ValueError, match="eps must be non-negative"):
        CompoundBatchNorm2d(3, 2, eps=-1.0).eval()(x)
    assert torch.isfinite(CompoundBatchNorm2d(3, 2, eps=0.0).eval()(x)).all()  # as BatchNorm


@pytest.mark.parametrize("K", [1, 2, 3])
def test_load_batchnorm_checkpoint(K):
    """A BatchNorm checkpoint loads into the same model built with compound layers: every
    component is the BatchNorm, so eval output is unchanged; the next training batch
    initialises the mixture."""
    torch.manual_seed(7)
    bn_model = _small_net(nn.BatchNorm2d)
    bn_model.train()
    for _ in range(3):
        bn_model(torch.randn(8, 3, 7, 7))
    bn_model.eval()
    state = bn_model.state_dict()
    model = _small_net(lambda C: CompoundBatchNorm2d(C, num_components=K)).eval()
    model.load_state_dict(state)
    x = torch.randn(4, 3, 7, 7)
    assert rel_err(model(x), bn_model(x)) <= 1e-5
    layer = model[1]
    assert layer.num_batches_tracked.item() == 0
    assert torch.allclose(layer.running_prior, torch.full((K,), 1.0 / K))
    assert torch.equal(layer.running_mean, state["1.running_mean"].expand(K, -1))
    model.train()
    model(torch.randn(8, 3, 7, 7))
    assert layer.num_batches_tracked.item() == 1
    if K > 1:  # initialised from the batch: the components now differ
        assert not torch.equal(layer.running_mean[0], layer.running_mean[1])


def test_load_mismatched_checkpoint_raises():
    model = _small_net(lambda C: CompoundBatchNorm2d(C, num_components=2))
    wrong = _small_net(nn.BatchNorm2d, C=5).state_dict()
    with pytest.raises(RuntimeError, match="size mismatch"):
        model.load_state_dict(wrong)
    other_k = _small_net(lambda C: CompoundBatchNorm2d(C, num_components=3)).state_dict()
    with pytest.raises(RuntimeError, match="size mismatch"):
        model.load_state_dict(other_k)


def test_counter_reset_by_hand_initialises_again():
    """A num_batches_tracked set to 0 from outside (zero_(), copying a fresh layer's
    buffers) makes the next training batch initialise the mixture, as the SPEC says."""
    torch.manual_seed(8)
    m = CompoundBatchNorm2d(3, 2, momentum=1.0)
    fresh = CompoundBatchNorm2d(3, 2, momentum=1.0)
    for _ in range(2):
        m(torch.randn(8, 3, 4, 4))
    with torch.no_grad():
        for name, buf in fresh.named_buffers():
            getattr(m, name).copy_(buf)
    x = torch.randn(8, 3, 4, 4) * 2 + 1
    m(x)
    fresh(x)
    assert torch.equal(m.running_mean, fresh.running_mean)  # both initialised from x
    assert not torch.equal(m.running_mean[0], m.running_mean[1])


def test_read_mixture_state():
    torch.manual_seed(9)
    model = nn.Sequential(CompoundBatchNorm2d(3, 2), nn.ReLU(), CompoundBatchNorm2d(3, 2))
    assert cbn_ext.read_mixture_state(model) is model
    assert not model[0]._mixture_ready
    model(torch.randn(4, 3, 5, 5))
    cbn_ext.read_mixture_state(model)
    assert model[0]._mixture_ready and model[2]._mixture_ready
    model[0].reset_running_stats()
    assert not model[0]._mixture_ready


def test_parametrized_and_pruned_weight():
    """torch.nn.utils.parametrize and prune move the weight out of _parameters; the layer
    still finds it, as BatchNorm does."""
    from torch.nn.utils import parametrize, prune

    class Double(nn.Module):
        def forward(self, w):
            return 2 * w

    torch.manual_seed(10)
    x = torch.randn(4, 3, 5, 5)
    m = CompoundBatchNorm2d(3, 2).eval()
    ref = m(x)
    parametrize.register_parametrization(m, "weight", Double())
    y = m(x)
    assert not torch.equal(y, ref) and torch.isfinite(y).all()
    p = CompoundBatchNorm2d(3, 2).eval()
    prune.l1_unstructured(p, "bias", amount=0.5)
    assert torch.isfinite(p(x)).all()


def test_load_batchnorm_checkpoint_with_assign():
    bn = nn.BatchNorm2d(4)
    m = CompoundBatchNorm2d(4, 2)
    m.load_state_dict(bn.state_dict(), assign=True)
    assert m.running_mean.is_contiguous() and m.weight.is_contiguous()
    m(torch.randn(6, 4, 3, 3)).sum().backward()  # trains
    assert m.weight.grad is not None
